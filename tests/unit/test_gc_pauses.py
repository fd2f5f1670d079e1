"""GcPauses: the garbage collector's pauses by generation, as [metrics] reports them."""

from __future__ import annotations

import gc

from durable.objectproc.metrics import GC_BUCKETS, GcPauses


def test_each_collection_is_timed_under_its_generation():
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # (twice: still one callback, one observation a collection)
    try:
        assert sum(cb is pauses for cb in gc.callbacks) == 1
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert not any(cb is pauses for cb in gc.callbacks)
    snap = pauses.snapshot()
    counts, total, n = snap["2"]
    assert n == 2 and sum(counts) == 2 and total > 0
    assert len(counts) == len(GC_BUCKETS) + 1
    assert snap["0"][2] >= 1  # (other collections may have run meanwhile, never fewer)
    gc.collect(2)  # uninstalled: not counted
    assert pauses.snapshot()["2"][2] == 2
    pauses.uninstall()  # (again: no error)


def test_a_pause_lands_in_its_bucket_and_a_stop_without_a_start_is_ignored():
    pauses = GcPauses()
    pauses("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    assert pauses.snapshot() == {}
    pauses._started = 0.0  # (a start long ago: over every bound)
    pauses("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    counts, total, n = pauses.snapshot()["1"]
    assert n == 1 and counts[-1] == 1 and total > GC_BUCKETS[-1]
