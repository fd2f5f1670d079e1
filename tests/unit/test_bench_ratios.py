"""bench.py vs-workerd's ratios by round (pure arithmetic on recorded rounds), and its wait for a
quiet machine before each round (on a fake clock and CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
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


class FakeMachine:
    """CPU seconds used so far by the servers, growing at ``rates[i]`` cores in window ``i``
    (the last rate from then on), on a clock that only ``sleep`` moves."""

    def __init__(self, rates: list[float]) -> None:
        self.rates, self.now, self.cpu, self.windows = rates, 0.0, 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.cpu += self.rates[min(self.windows, len(self.rates) - 1)] * seconds
        self.now += seconds
        self.windows += 1

    def settle(self, limit: float = 30.0, quiet: int = bench.QUIET_WINDOWS) -> float | None:
        return bench._settle([1], window=1.0, limit=limit, quiet_windows=quiet,
                             clock=self.monotonic, sleep=self.sleep, cpu=lambda pids: self.cpu)


def test_a_round_waits_until_the_servers_are_quiet():
    """workerd's ~10 s of work after a round (0.1-0.24 of a core): the next round waits."""
    m = FakeMachine([0.24, 0.18, 0.1, 0.02])
    assert m.settle() == 3.0 + bench.QUIET_WINDOWS
    assert m.windows == 3 + bench.QUIET_WINDOWS


def test_the_quiet_second_before_workerds_tail_does_not_end_the_wait():
    """workerd's work after a round starts ~1 s after it ends (measured: 0.00 of a core in
    the first second, then 0.17-0.28 for ~9 s): one quiet window ended the wait there, and
    durable's next round ran beside that work."""
    m = FakeMachine([0.0, 0.24, 0.25, 0.28, 0.25, 0.23, 0.17, 0.11, 0.17, 0.22, 0.0])
    assert bench.QUIET_WINDOWS >= 2
    assert m.settle(quiet=1) == 1.0  # (the old wait)
    m = FakeMachine([0.0, 0.24, 0.25, 0.28, 0.25, 0.23, 0.17, 0.11, 0.17, 0.22, 0.0])
    assert m.settle() == 10.0 + bench.QUIET_WINDOWS


def test_a_quiet_machine_costs_the_quiet_windows():
    assert FakeMachine([0.0]).settle() == float(bench.QUIET_WINDOWS)


def test_a_machine_never_quiet_gives_up_at_the_limit_and_says_so():
    m = FakeMachine([0.5])
    assert m.settle(limit=5.0) is None
    assert m.now == 5.0


def test_the_threshold_is_below_not_at():
    assert FakeMachine([bench.QUIET_CORES, 0.0]).settle() == 1.0 + bench.QUIET_WINDOWS
