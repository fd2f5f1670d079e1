"""scripts/soak_disk.py: DuckDB's WAL stays bounded and the main file grows under sustained writes.

CI runs 30 s of it; the 10-minute figures are in docs/operating.md ("Disk use").
The WAL threshold here is 4 MiB, not the script's 16: on a slow CI machine 30 s of writes
made 14 MiB of WAL, so no size-triggered checkpoint came, and the 30-s timer had not yet
fired either. A small threshold checkpoints several times whatever the machine's speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak_disk.py"


@pytest.mark.slow
def test_wal_and_log_stay_bounded_for_30_seconds_of_writes():
    out = subprocess.run([sys.executable, str(SOAK), "--seconds", "30", "--checkpoint-wal-mb", "4",
                          "--wal-bound-mb", "16"], capture_output=True,
                         text=True, timeout=300)
    r = json.loads(out.stdout)
    summary = {k: v for k, v in r.items() if k != "samples"}
    print(summary)
    assert out.returncode == 0 and r["ok"], (summary, out.stderr[-2000:])
    assert r["peak_wal_mb"] <= r["wal_bound_mb"]
    assert r["main_mb_end"] > r["main_mb_start"]  # checkpoints move the data into the file
    assert r["wal_drops"] >= 1, summary  # ...and truncate the WAL behind them
    assert r["writes"] > 10_000 and r["errors"] == 0
    assert len(r["samples"]) >= 20  # (one a second, while the writers run)
