"""bench.py vs-workerd's ratios by round: pure arithmetic on recorded rounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ratios_by_round  # noqa: E402


def test_each_rounds_ratio_then_their_median():
    a = [{"x": 10, "y": 1.0, "s": "slots"}, {"x": 30, "y": 2.0, "s": "slots"},
         {"x": 20, "y": 3.0, "s": "slots"}]
    b = [{"x": 5, "y": 1.0}, {"x": 10, "y": 0.0}, {"x": 40, "y": 3.0}]
    # x: 2.0, 3.0, 0.5 -> 2.0; y: a zero in one round leaves it out; s: not a number
    assert ratios_by_round(a, b) == {"x": 2.0}


def test_rounds_must_pair():
    with pytest.raises(ValueError):
        ratios_by_round([{"x": 1}, {"x": 2}], [{"x": 1}])


def test_a_recorded_run_whose_ratio_of_medians_hid_its_rounds():
    """docs/bench/vs-workerd-2026-12-04j.json: 1.63x as the ratio of the medians, 1.35x by
    round (1.82, 1.33, 1.35); CPU per no-op 0.93x against 1.07x."""
    run = json.loads((ROOT / "docs/bench/vs-workerd-2026-12-04j.json").read_text())["median"]
    by_round = ratios_by_round(run["rounds"]["durable"], run["rounds"]["workerd"])
    assert run["durable_over_workerd"]["noop_64_per_s"] == 1.63
    assert by_round["noop_64_per_s"] == 1.35
    assert run["durable_over_workerd"]["server_cpu_per_noop_ms"] == 0.93
    assert by_round["server_cpu_per_noop_ms"] == 1.07
