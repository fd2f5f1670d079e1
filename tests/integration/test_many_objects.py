"""scripts/many_objects.py at a small size: objects written once are evicted; the daemon serves on."""

import json
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
