"""The suite's own order under pytest-xdist (tests/conftest.py): each worker is handed an even
share of the long tests, among short ones, and ends on short ones."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import assume, given
from hypothesis import strategies as st

from tests.conftest import worker_layout, xdist_shares


@dataclass(frozen=True)
class Item:
    nodeid: str
    long: bool

    @property
    def module(self) -> str:
        return self.nodeid.split("::")[0]


def test_shares_are_xdists_first_hand_out():
    assert xdist_shares(10, 4) == [2, 2, 3, 3]
    assert xdist_shares(1177, 4) == [294, 294, 294, 295]
    assert xdist_shares(3, 1) == [3]


@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([False] * 4 + [True])),
                max_size=120), st.integers(2, 6))
def test_each_worker_is_handed_its_share_of_long_tests_and_ends_on_short_ones(spec, workers):
    items = [Item(f"tests/m{m}.py::t{k}", long) for k, (m, long) in enumerate(spec)]
    out = worker_layout(items, workers, lambda i: i.long)
    assert sorted(out, key=lambda i: i.nodeid) == sorted(items, key=lambda i: i.nodeid)
    per_module: dict[str, int] = {}
    for i in items:
        per_module[i.module] = per_module.get(i.module, 0) + i.long
    sizes = xdist_shares(len(out), workers)
    # (where every worker's share of the long tests fits in what it is first handed)
    assume(sum(per_module.values()) + max(per_module.values(), default=0) <= min(sizes))
    hands, start = [], 0
    for size in sizes:
        hands.append(out[start:start + size])
        start += size
    longs = [sum(i.long for i in hand) for hand in hands]
    assert max(longs) - min(longs) <= max(per_module.values(), default=0)
    for hand, n in zip(hands, longs, strict=True):
        if n:
            assert hand[0].long  # a worker begins on a long test
            shorts = len(hand) - n
            assert not any(i.long for i in hand[len(hand) - shorts // 5:])  # ends on short ones
    owner: dict[str, int] = {}  # a module's long tests are handed to one worker, together
    for w, hand in enumerate(hands):
        runs = [i.module for k, i in enumerate(hand) if i.long and (k == 0 or not hand[k - 1].long
                                                                   or hand[k - 1].module != i.module)]
        assert len(runs) == len(set(runs)), runs
        for i in hand:
            if i.long:
                assert owner.setdefault(i.module, w) == w


def test_the_long_tests_are_spread_among_the_short_ones():
    items = [Item(f"tests/l{k}.py::t", True) for k in range(4)] + [
        Item(f"tests/s.py::t{k}", False) for k in range(16)]
    out = [i.nodeid.replace("tests/", "").replace(".py::t", "") for i in
           worker_layout(items, 2, lambda i: i.long)]
    assert out == ["l0", "s0", "s1", "s2", "l2", "s3", "s4", "s5", "s6", "s7",
                   "l1", "s8", "s9", "s10", "l3", "s11", "s12", "s13", "s14", "s15"]


def test_one_process_runs_the_long_tests_first():
    items = [Item("tests/a.py::x", False), Item("tests/b.py::y", True), Item("tests/a.py::z", False)]
    assert [i.nodeid for i in worker_layout(items, 1, lambda i: i.long)] == [
        "tests/b.py::y", "tests/a.py::x", "tests/a.py::z"]
