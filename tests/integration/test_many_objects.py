"""scripts/many_objects.py at a small size: objects written once are evicted; the daemon serves on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "many_objects.py"


@pytest.mark.parametrize("by", ["name", "unique id"])
def test_many_objects_are_evicted_and_status_stays_responsive(by):
    out = subprocess.run([sys.executable, str(SCRIPT), "--objects", "5000", "--idle-timeout", "1",
                          "--json", *(["--unnamed"] if by == "unique id" else [])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["by"] == by and result["objects"] == 5000, result
    assert result["daemon_alive"] and result["active_after"] == 0, result
    assert all(0 < s < 60 for s in result["python_10m_additions_s"]), result
    assert result["status_seconds_max"] is None or result["status_seconds_max"] < 5
    lat = result["write_ms"]  # (each acknowledged write's latency, its retries included)
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], lat
    assert result["failed_writes"] == 0 and result["writes_per_s"] > 0, result
    longest = result["longest_write"]
    assert longest["seconds"] * 1000 == pytest.approx(lat["max"], abs=1), (longest, lat)
    # (to a tenth of a second: the first writes, cold, may be the longest and end by 0.05 s)
    assert longest["attempts"] >= 1 and 0 <= longest["ended_at_s"] <= result["seconds"] + 1
    assert all(n > 0 for n in result["retries"].values()), result["retries"]
    cpu = result["cpu_us_per_write"]  # (by role, this client's too, and their total)
    assert {"objectproc", "client", "total"} <= set(cpu) and cpu["objectproc"] > 0, cpu
    assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"),
                                         abs=0.5), cpu
    assert 0 < result["cores_used"] <= (os.cpu_count() or 1) + 0.5, result
    pauses = result["gc_pauses"]  # (the ticks' young collections at least: 10 a second)
    assert pauses["1"]["collections"] > 0, pauses
    assert all(p["collections"] >= 0 and 0 <= p["seconds"] < result["seconds"]
               for p in pauses.values()), pauses
    disk = result["disk_mib"]  # (5,000 objects: DuckDB's main files hold them by now)
    assert set(disk) == {"duckdb", "duckdb_wal", "commit_log"} and disk["duckdb"] > 0, disk
    assert result["disk_bytes_per_object"] == pytest.approx(
        sum(disk.values()) * 2**20 / 5000, rel=0.01, abs=30), result


def test_a_write_that_fails_every_attempt_is_counted_and_fails_the_run(monkeypatch, capsys):
    """An overloaded slot that never takes one write: its retries are counted, the write is
    not in the rate, and the run's exit status says so (it used to be counted as written)."""
    import importlib.util

    import durable

    spec = importlib.util.spec_from_file_location("many_objects", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "ATTEMPTS", 3)
    real = durable.Stub.fetch

    async def fetch(self, *a, **kw):
        if self.id.name == "obj-7":
            raise durable.OverloadedError("the test's slot takes nothing for obj-7")
        return await real(self, *a, **kw)

    monkeypatch.setattr(durable.Stub, "fetch", fetch)
    assert script.main(["--objects", "200", "--idle-timeout", "1", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["failed_writes"] == 1, result
    assert result["retries"] == {"OverloadedError": 3}, result
    assert result["daemon_alive"], result


def test_the_rate_is_over_the_writes_not_the_samplers_wait(capsys):
    """The run's seconds end with its last write: the sampler of `durable status`, which sleeps
    5 s between samples, is not waited for (it was: every run took at least 5 s, and a million
    objects' rate counted up to 5 s of nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("many_objects", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--objects", "1000", "--idle-timeout", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["failed_writes"] == 0 and result["daemon_alive"], result
    assert 0 < result["seconds"] < 4.0, result  # (1,000 writes; the sampler's first sleep: 5 s)
    assert result["writes_per_s"] * result["seconds"] == pytest.approx(1000, rel=0.15), result
