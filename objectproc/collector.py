"""The object process's garbage collector: a live object is traversed once, not at every collection.

A slot keeps its live objects (activations, their storage, state and instances, the overlay of
writes not yet applied) for ``idle_timeout`` or longer, and Python's generational collector
traversed each of them again in every generation-1 and generation-2 collection, to find nothing
(an activation's own cycles are broken when it is evicted: ``Activation.evict``). Measured with
``scripts/many_objects.py --objects 700000 --idle-timeout 40`` (~170,000 live objects a slot):
8.3 s of the two object processes' time in 90 s, collecting nothing, in pauses of up to 170 ms
(generation 0), 316 ms (1) and 448 ms (2), which every call of the slot waited out.

So the young generations are collected at each tick of the process's timer (ten a second while
calls come; the automatic collections still run between ticks), and what survives is frozen
(``gc.freeze``): never traversed again, and still freed by reference counting when it dies.
Reference cycles that become garbage after they were frozen are found by a full collection
(``gc.unfreeze``, ``gc.collect()``), which pauses the slot for as long as it has live objects to
traverse (~1 s at 190,000 live objects, measured), so it comes only when such garbage may have
piled up: when ``FULL_SUSPECTS`` evicted instances outlived their eviction (an instance that
refers to itself, or that something else still holds: the object process counts them), when the
process has grown ``FULL_GROWTH`` times since the last one, or ``FULL_EVERY`` seconds after it;
and never takes more than ``FULL_SHARE`` of the time. Garbage cycles that die young (within a
tick: a call's) are found at the ticks, as before.

**Sampled ticks.** Each live object was still traversed once, at the tick after it was made, and
under new objects that was ~19 containers an object (its activation, storage, state, id and
instance; its write's record and overlay entries until applied) at 0.2-0.6 µs each: 1-4 ms a
tick, 13.2 s of the two processes' time over a million new objects (``many_objects.py``), 5% of
a write's CPU, to find nothing (no garbage at any of those ticks). So a tick collects only once
in ``SAMPLE_EVERY`` on average (the objects made since the tick before it: a sample of the
process's young garbage; the ticks between samples vary, so that garbage made at a period of its
own cannot keep falling between them), and the others only freeze. When a sample finds
garbage, every tick collects again for ``HOT_FOR`` seconds, renewed while they find more; what
the skipped ticks froze is estimated from the sample (its garbage times the ticks skipped), and
once ``FULL_FROZEN_GARBAGE`` objects may be frozen so, a full collection is due (within its
share of the time). A workload that makes cyclic garbage all the time is collected at every
tick, as before; garbage a sample never sees is still bounded by the memory rule above.

**Growth that is live.** A slot taking new objects grows because it holds them, and a full
collection at each doubling of the memory traversed them all to find nothing: 0.21-0.29 s a
pause at ~20,000 live objects a slot (64 HTTP connections making new objects). One came in the
new objects' 4 s of one ``bench.py vs-workerd`` round in three, which ran at 5,419 and 6,055/s
against 6,243-6,583 in the others (measured). So a full collection that freed less than
``FULL_FRUITLESS`` of the objects it traversed, and less than ``FULL_FRUITLESS_MEMORY`` of the
memory (a few large cycles are few objects), doubles the growth the next one waits for (up to
``FULL_GROWTH_MAX``); one that freed more puts it back at ``FULL_GROWTH``. A heap that grows
with garbage is still collected at each doubling, and one that grows with live objects is
traversed ~1.3 times an object instead of ~2. Nor does a small heap's doubling bring one: the
growth must also be ``FULL_GROWTH_FLOOR`` bytes (a process starts at ~70 MB, and its first
doubling came within seconds of new objects). What a collection can miss is bounded as before
by the other rules (suspects, the samples' estimate, ``FULL_EVERY``).
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Callable

import psutil

__all__ = ["Collector", "FULL_EVERY", "FULL_FROZEN_GARBAGE", "FULL_FRUITLESS",
           "FULL_FRUITLESS_MEMORY", "FULL_GROWTH", "FULL_GROWTH_FLOOR", "FULL_GROWTH_MAX",
           "FULL_SHARE", "FULL_SUSPECTS", "HOT_FOR", "SAMPLE_EVERY", "THRESHOLDS", "rss_bytes"]

#: the automatic collections' thresholds between ticks: with the default generation-0 threshold
#: (700) a slot under 100 concurrent writers collected so often that the pauses alone added
#: ~3 ms to the p99 write wait (scripts/bench.py)
THRESHOLDS = (20_000, 20, 20)
#: a full collection once this many evicted instances outlived their eviction
FULL_SUSPECTS = 10_000
#: a full collection when the resident memory has grown this much since the last one
FULL_GROWTH = 2.0
#: ... or this much, at most, after full collections that found (almost) no garbage (the most a
#: process can grow with frozen garbage before a full collection, within ``FULL_EVERY``)
FULL_GROWTH_MAX = 4.0
#: ... and by this many bytes at least: a small heap's doubling is no memory to win back
FULL_GROWTH_FLOOR = 256 << 20
#: a full collection that freed less than this share of the objects it traversed, and less
#: than ``FULL_FRUITLESS_MEMORY`` of the resident memory, was fruitless
FULL_FRUITLESS = 0.01
FULL_FRUITLESS_MEMORY = 0.1
#: ... and at least this often (seconds)
FULL_EVERY = 600.0
#: full collections' share of the time at most: the next one waits for at least the last
#: one's pause divided by this
FULL_SHARE = 0.01
#: how often the resident memory is read (seconds)
RSS_EVERY = 1.0
#: one tick in this many (on average) collects the young generation (the others freeze it),
#: while no garbage was found lately
SAMPLE_EVERY = 10
#: after a collection found garbage, every tick collects for this long (seconds)
HOT_FOR = 10.0
#: a full collection once this many young garbage objects may have been frozen uncollected
#: (estimated from the samples)
FULL_FROZEN_GARBAGE = 100_000

_SELF: psutil.Process | None = None


def rss_bytes() -> int | None:
    """This process's resident memory (psutil, as the supervisor reads it), or None where
    it cannot be read."""
    global _SELF
    try:
        if _SELF is None or _SELF.pid != os.getpid():  # (a forked child reads its own)
            _SELF = psutil.Process()
        return int(_SELF.memory_info().rss)
    except (psutil.Error, OSError):
        return None


class Collector:
    """The garbage-collection policy of one object process (``start`` once, ``tick`` often)."""

    __slots__ = ("_clock", "_rss", "_rand", "_rss_at", "_grown", "_base", "_earliest", "_latest",
                 "_skipped", "_skip", "_hot_until", "growth", "_last_rss", "suspects",
                 "frozen_garbage", "young_collections", "full_collections", "last_full_seconds")

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rss: Callable[[], int | None] = rss_bytes,
                 rand: Callable[[int, int], int] = random.randint) -> None:
        self._clock = clock
        self._rss = rss
        self._rand = rand  # (ticks to skip before the next sample: rand(lo, hi), both included)
        self._rss_at = float("-inf")
        self._grown = False
        self._base: int | None = None  # the resident memory after the last full collection
        #: the growth over ``_base`` that brings the next full collection
        self.growth = FULL_GROWTH
        self._last_rss: int | None = None  # (as last read)
        self._earliest = self._latest = float("inf")
        #: evicted instances that outlived their eviction since the last full collection
        self.suspects = 0
        #: young garbage objects that ticks may have frozen without collecting them (estimated)
        self.frozen_garbage = 0
        self._skipped = 0  # ticks that froze without collecting since the last that did
        self._skip = 0  # ... and how many to skip before the next sample
        self._hot_until = float("-inf")  # every tick collects until then
        #: ticks that collected the young generation
        self.young_collections = 0
        self.full_collections = 0
        #: the last full collection's pause (seconds), or None before the first
        self.last_full_seconds: float | None = None

    def start(self) -> None:
        """Freeze what start-up made (modules, classes: ~35,000 objects)."""
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)
        now = self._clock()
        self._base = self._rss()
        self._earliest, self._latest = now, now + FULL_EVERY

    def tick(self) -> None:
        """Collect what was made since the last tick (at a sample, or while garbage was found
        lately) and freeze what survives; or, when due, collect everything once."""
        now = self._clock()
        if now - self._rss_at >= RSS_EVERY:
            self._rss_at = now
            rss = self._last_rss = self._rss()
            self._grown = rss is not None and self._base is not None and \
                rss >= max(self._base * self.growth, self._base + FULL_GROWTH_FLOOR)
        due = self._grown or self.suspects >= FULL_SUSPECTS or \
            self.frozen_garbage >= FULL_FROZEN_GARBAGE
        if now < self._latest and not (due and now >= self._earliest):
            hot = now < self._hot_until
            if hot or self._skipped >= self._skip or not self.young_collections:
                found = gc.collect(1)
                self.young_collections += 1
                if found:
                    if not hot:  # (the skipped ticks' objects were likely the same)
                        self.frozen_garbage += found * self._skipped
                    self._hot_until = now + HOT_FOR
                self._skipped = 0
                self._skip = self._rand(SAMPLE_EVERY // 2, SAMPLE_EVERY + SAMPLE_EVERY // 2 - 1)
            else:
                self._skipped += 1
            gc.freeze()
            return
        started = time.perf_counter()
        traversed = gc.get_freeze_count() + gc.get_count()[0]  # (the young: since the tick)
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        pause = time.perf_counter() - started
        self.full_collections += 1
        self.last_full_seconds = pause
        now = self._clock()
        before, after = self._last_rss, self._rss()
        # (fruitless: few objects freed, and little memory: a few cycles can hold much of it)
        fruitless = found < traversed * FULL_FRUITLESS and (
            before is None or after is None or after > before * (1 - FULL_FRUITLESS_MEMORY))
        self.growth = min(self.growth * 2, FULL_GROWTH_MAX) if fruitless else FULL_GROWTH
        self._base, self._grown, self._rss_at, self.suspects = after, False, now, 0
        self._last_rss = after
        self.frozen_garbage = 0
        self._earliest, self._latest = now + pause / FULL_SHARE, now + FULL_EVERY
