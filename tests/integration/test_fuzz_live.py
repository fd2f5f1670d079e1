"""Live fuzzing of a running daemon: 100,000 junk messages and junk HTTP, correct traffic beside."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# real processes, seconds each: the full suite runs it; it measures, so it runs alone
pytestmark = [pytest.mark.slow, pytest.mark.serial]

FUZZ = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_live.py"


def test_live_fuzz_100000_frames():
    out = subprocess.run([sys.executable, str(FUZZ), "--frames", "100000", "--http", "1000",
                          "--seed", "11", "--json"], capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    print({k: result[k] for k in ("frames_client", "frames_workers", "http_junk", "correct_calls",
                                  "dropped", "restarted_processes")})
    assert out.returncode == 0 and result["ok"], result
    assert result["frames_client"] + result["frames_workers"] >= 100_000
    assert result["wrong_answers"] == 0 and result["restarted_processes"] == 0
