"""scripts/cpu_split.py at a small size: the rate and each thread's CPU per call, as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real daemon: the full suite runs it

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cpu_split.py"


def test_cpu_split_reports_each_processs_cpu_per_call_at_the_concurrency_asked():
    out = subprocess.run([sys.executable, str(SCRIPT), "--calls", "600", "--existing", "20",
                          "--concurrency", "8", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert (result["calls"], result["existing"], result["concurrency"]) == (600, 20, 8), result
    assert result["per_s"] > 0, result
    per_call = result["cpu_us_per_call"]
    # the calls ran in the object processes, and were sent by this program
    assert per_call.get("objectproc/main", 0) > 0 and per_call.get("program/main", 0) > 0, result
    assert result["cpu_us_per_call_total"] >= per_call["objectproc/main"], result
    # the cores the run kept busy, and where threads waited for a CPU (each call wakes an object
    # process's loop, and a wake-up is never instant) or lost it to a thread they woke
    assert 0 < result["cores_used"] <= os.cpu_count() + 0.5, result
    if Path("/proc/self/schedstat").exists():
        assert result["runqueue_wait_us_per_call"].get("objectproc/main", 0) > 0, result
    assert all(v > 0 for v in result["preempted_per_call"].values()), result
    # the object processes' garbage collections during the run, by generation (the slots'
    # durable_gc_pause_seconds), counted from before the calls: none can be negative
    gcs, gc_us = result["gc_collections"], result["gc_us_per_call"]
    assert set(gcs) == set(gc_us) <= {"0", "1", "2"}, result
    assert all(type(n) is int and n >= 0 and gc_us[g] >= 0 for g, n in gcs.items()), result
    # (the machine's speed before and after, to scale the figures by)
    assert len(result["python_10m_additions_s"]) == 2, result
    assert all(0 < s < 60 for s in result["python_10m_additions_s"]), result


def test_cpu_split_refuses_no_calls_in_flight_by_name():
    out = subprocess.run([sys.executable, str(SCRIPT), "--concurrency", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--concurrency 0" in out.stderr, out.stderr


@pytest.mark.parametrize(("flag", "path"), [
    ("--via-broker", "broker"),  # (no peer links)
    ("--curve", "CurveZMQ over TCP to the broker"),  # (a client on another machine, its keys
])                                                   # made for the run)
def test_cpu_split_on_the_brokers_path_has_the_broker_relay_every_call(flag, path):
    """The broker's loop carries every call: its CPU per call is that of a relay, not of the
    heartbeats alone."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--calls", "600", "--existing", "20",
                          "--concurrency", "8", flag, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["path"] == path, result
    assert result["per_s"] > 0 and result["cpu_us_per_call"].get("broker/main", 0) >= 5, result
