"""The object process's collection policy (objectproc/collector.py), on this process's own
collector: young garbage goes at a tick, survivors are frozen, and garbage among frozen objects
goes at a full collection, which comes only when due and within its share of the time."""

from __future__ import annotations

import gc
import weakref

import pytest

from durable.objectproc import collector as collector_mod
from durable.objectproc.collector import (
    FULL_EVERY,
    FULL_FROZEN_GARBAGE,
    FULL_FRUITLESS,
    FULL_GROWTH,
    FULL_GROWTH_FLOOR,
    FULL_GROWTH_MAX,
    FULL_SUSPECTS,
    HOT_FOR,
    SAMPLE_EVERY,
    Collector,
)


class _Node:
    """A container the collector tracks; ``cycle()`` makes one that refers to itself."""

    def __init__(self) -> None:
        self.other: object = None

    @classmethod
    def cycle(cls) -> _Node:
        n = cls()
        n.other = n
        return n


class _World:
    """A clock and a resident-memory figure the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.rss = 1 << 30  # (a heap whose doubling is past FULL_GROWTH_FLOOR)

    def clock(self) -> float:
        return self.now


@pytest.fixture
def world():
    """A started collector on a fake clock; this process's collector is put back afterwards.
    Garbage that earlier tests left in the oldest generation goes first: the collector would
    freeze it, and its first full collection would find it (not fruitless, whatever the test)."""
    thresholds = gc.get_threshold()
    gc.collect()
    w = _World()
    c = Collector(clock=w.clock, rss=lambda: w.rss, rand=lambda lo, hi: SAMPLE_EVERY - 1)
    c.start()
    try:
        yield w, c
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.collect()


def _frozen(obj: object) -> bool:
    """Whether ``obj`` is in the permanent generation (``get_objects`` lists the others)."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


def test_a_tick_collects_young_cycles_and_freezes_what_survives(world):
    w, c = world
    dead = weakref.ref(_Node.cycle())
    live = _Node.cycle()
    assert dead() is not None and not _frozen(live)
    c.tick()
    assert dead() is None, "young cyclic garbage outlived a tick"
    assert _frozen(live)
    assert c.full_collections == 0


def test_a_cycle_that_dies_once_frozen_waits_for_a_full_collection_and_goes_then(world):
    w, c = world
    live = _Node.cycle()
    c.tick()  # (frozen)
    ref = weakref.ref(live)
    del live
    w.now += 1
    c.tick()
    assert ref() is not None, "a tick traversed the frozen objects"
    c.suspects = FULL_SUSPECTS  # (the object process counts evicted instances still alive)
    w.now += 1
    c.tick()
    assert ref() is None
    assert c.full_collections == 1 and c.suspects == 0
    assert c.last_full_seconds is not None and c.last_full_seconds >= 0


@pytest.mark.parametrize("why", ["suspects", "growth", "time"])
def test_a_full_collection_comes_for_each_reason_and_not_before(world, why):
    w, c = world
    w.now += 1
    c.tick()
    assert c.full_collections == 0  # (none due)
    if why == "suspects":
        c.suspects = FULL_SUSPECTS - 1
        w.now += 2
        c.tick()
        assert c.full_collections == 0
        c.suspects += 1
    elif why == "growth":
        w.rss = int(w.rss * FULL_GROWTH) - 4096
        w.now += 2
        c.tick()
        assert c.full_collections == 0
        w.rss += 8192
    else:
        w.now += FULL_EVERY - 5
        c.tick()
        assert c.full_collections == 0
        w.now += 5
    w.now += 2  # (the resident memory is read once a second)
    c.tick()
    assert c.full_collections == 1


def _grow_past(w, c) -> None:
    """Grow the resident memory to the growth the next full collection waits for, and tick
    once it is read (a full collection is due, as far as the growth rule goes)."""
    w.rss = int(w.rss * c.growth) + 4096
    w.now += 60  # (past the last pause's share of the time and the memory's last reading)
    c.tick()


def test_a_fruitless_full_collection_doubles_the_growth_the_next_one_waits_for(world):
    """Growth that is live (a slot holding its new objects) is not traversed at each doubling:
    the wait doubles up to FULL_GROWTH_MAX; a collection that finds garbage puts it back."""
    w, c = world
    w.now += 1
    c.tick()
    assert c.growth == FULL_GROWTH
    live = [_Node.cycle() for _ in range(1000)]  # (frozen, alive: nothing for a collection)
    c.tick()
    expected, n = FULL_GROWTH, 0
    while expected < FULL_GROWTH_MAX:
        base = w.rss
        w.rss = int(base * c.growth) - 4096  # (short of the growth: nothing due)
        w.now += 60
        c.tick()
        assert c.full_collections == n
        w.rss = base
        _grow_past(w, c)
        n += 1
        expected = min(expected * 2, FULL_GROWTH_MAX)
        assert c.full_collections == n and c.growth == expected, (n, c.growth)
    _grow_past(w, c)
    assert c.growth == FULL_GROWTH_MAX  # (capped)
    # Garbage among the frozen objects: enough of what a full collection traverses
    garbage = [_Node.cycle() for _ in range(int(gc.get_freeze_count() * FULL_FRUITLESS * 4))]
    c.tick()  # (frozen: only a full collection finds them)
    ref = weakref.ref(garbage[0])
    del garbage
    _grow_past(w, c)
    assert ref() is None, "the full collection did not run"
    assert c.growth == FULL_GROWTH, "a full collection that found garbage kept the longer wait"
    _grow_past(w, c)
    assert c.growth == 2 * FULL_GROWTH
    # A few cycles that hold much memory: one found, a fifth of the memory freed with it
    big = _Node.cycle()
    weakref.finalize(big, lambda: setattr(w, "rss", w.rss * 4 // 5))
    c.tick()
    del big
    _grow_past(w, c)
    assert c.growth == FULL_GROWTH, "a collection that freed much memory kept the longer wait"
    assert live[0].other is live[0]


def test_a_small_heap_doubling_is_not_a_reason(world):
    """Growth brings a full collection only once it is FULL_GROWTH_FLOOR bytes as well."""
    w, c = world
    base = c._base = 64 << 20
    assert base * FULL_GROWTH * 2 < base + FULL_GROWTH_FLOOR  # (the case this is about)
    w.rss = base + FULL_GROWTH_FLOOR - 4096  # (more than four times the base)
    w.now += 2
    c.tick()
    assert c.full_collections == 0
    w.rss = base + FULL_GROWTH_FLOOR + 4096
    w.now += 2
    c.tick()
    assert c.full_collections == 1


def test_full_collections_keep_to_their_share_of_the_time(world, monkeypatch):
    """After a full collection that paused for p, the next waits p / FULL_SHARE at least,
    however many suspects; the time rule (FULL_EVERY) still applies after it."""
    w, c = world
    ticks = iter([0.0, 0.5])  # (the full collection's pause: half a second)
    monkeypatch.setattr(collector_mod.time, "perf_counter", lambda: next(ticks))
    c.suspects = FULL_SUSPECTS
    w.now += 1
    c.tick()
    assert c.full_collections == 1 and c.last_full_seconds == 0.5
    monkeypatch.undo()
    wait = 0.5 / collector_mod.FULL_SHARE  # 50 s
    c.suspects = FULL_SUSPECTS
    w.now += wait - 1
    c.tick()
    assert c.full_collections == 1
    w.now += 1
    c.tick()
    assert c.full_collections == 2


def test_ticks_between_samples_only_freeze_and_a_sample_that_finds_garbage_estimates_theirs(world):
    """Most ticks only freeze (their objects are never traversed); one in SAMPLE_EVERY
    collects what was made since the tick before it, and garbage it finds stands for as much
    at each skipped tick, frozen uncollected."""
    w, c = world
    c.tick()  # (the first tick collects)
    assert c.young_collections == 1
    skipped = [weakref.ref(_Node.cycle())]
    for _ in range(SAMPLE_EVERY - 1):
        w.now += 0.1
        c.tick()
        skipped.append(weakref.ref(_Node.cycle()))
    assert c.young_collections == 1 and c.frozen_garbage == 0
    assert all(r() is not None for r in skipped[:-1]), "a skipped tick collected"
    w.now += 0.1
    c.tick()  # (the sample: the last cycle was made since the tick before it)
    assert c.young_collections == 2
    assert skipped[-1]() is None and skipped[0]() is not None
    assert c.frozen_garbage >= SAMPLE_EVERY - 1, c.frozen_garbage  # (found × ticks skipped)


def test_after_garbage_is_found_every_tick_collects_until_none_is_found_for_a_while(world):
    w, c = world
    _Node.cycle()  # (garbage for the first tick, a sample)
    c.tick()
    hot_ticks = 0
    for _ in range(3 * SAMPLE_EVERY):  # (each tick finds more: the ticks stay hot)
        dead = weakref.ref(_Node.cycle())
        w.now += 0.1
        c.tick()
        assert dead() is None, "a tick skipped while garbage was being found"
        hot_ticks += 1
    assert c.young_collections == 1 + hot_ticks
    assert c.frozen_garbage == 0  # (nothing skipped, nothing estimated)
    w.now += HOT_FOR + 0.1  # (no garbage for HOT_FOR: sampling again)
    c.tick()
    before = c.young_collections
    kept = weakref.ref(_Node.cycle())
    w.now += 0.1
    c.tick()
    assert kept() is not None and c.young_collections == before


def test_garbage_frozen_by_skipped_ticks_brings_a_full_collection_once_enough_may_be(world):
    w, c = world
    c.tick()
    w.now += 0.1
    c.tick()  # (skipped: this cycle is frozen uncollected)
    frozen = weakref.ref(_Node.cycle())
    w.now += 0.1
    c.tick()
    assert frozen() is not None
    c.frozen_garbage = FULL_FROZEN_GARBAGE - 1
    w.now += 2
    c.tick()
    assert c.full_collections == 0 and frozen() is not None
    c.frozen_garbage += 1
    w.now += 0.1
    c.tick()
    assert c.full_collections == 1 and frozen() is None and c.frozen_garbage == 0


def test_the_ticks_between_samples_vary_around_sample_every(world):
    """(So that garbage made at a period of its own does not keep falling between samples.)"""
    import random
    w, c = world
    c2 = Collector(clock=w.clock, rss=lambda: w.rss, rand=random.Random(7).randint)
    c2.start()
    gaps, last = [], 1  # (the first tick collects)
    for i in range(1, 400):
        w.now += 0.1
        c2.tick()
        if c2.young_collections > len(gaps) + 1:
            gaps.append(i - last)
            last = i
    assert len(set(gaps)) > 3, gaps
    assert all(SAMPLE_EVERY // 2 + 1 <= g <= SAMPLE_EVERY + SAMPLE_EVERY // 2 for g in gaps), gaps
    assert SAMPLE_EVERY - 2 <= sum(gaps) / len(gaps) <= SAMPLE_EVERY + 2, gaps
