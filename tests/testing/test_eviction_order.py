"""Eviction reads the catalog's oldest entries only, and evicts exactly the idle objects.

The object process keeps its catalog in order of each activation's ``placed`` time (a call's
activation goes back to the end at most 8 times per ``idle_timeout``), so ``evict_idle``
stops at the first entry placed since the cutoff. These tests check the result against the
plain rule (idle for ``idle_timeout``, nothing running) and count the entries it reads; the
last one does so for any interleaving of calls, time and scans (hypothesis, on a clock of its
own).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from durable.examples.counter import Counter
from durable.testing import Runtime
from tests.budget import examples

IDLE = 0.3


class _Counting(dict):
    """A catalog that counts the entries a scan of ``items()`` reads."""

    read = 0

    def items(self):  # noqa: ANN201
        for kv in super().items():
            self.read += 1
            yield kv


def _counting(proc) -> _Counting:  # noqa: ANN001
    proc.catalog = _Counting(proc.catalog)
    return proc.catalog


@contextlib.asynccontextmanager
async def _runtime():  # noqa: ANN202
    """A runtime whose objects go idle after ``IDLE`` seconds: (its process, the namespace)."""
    async with Runtime({"COUNTER": Counter}) as rt:
        rt._proc.config.idle_timeout = IDLE
        yield rt, rt._proc, rt.namespace("COUNTER")


def _idle_by_rule(proc) -> set[tuple[str, str]]:  # noqa: ANN001
    """What a scan of every entry would evict (no object here starts tasks of its own)."""
    import durable.objectproc.loop as loop

    cutoff = loop.time.monotonic() - proc.config.idle_timeout  # (the process's clock)
    return {k for k, a in dict.items(proc.catalog)
            if a.last_used <= cutoff and a.evictable(proc.config.idle_timeout)}


async def test_eviction_reads_only_the_entries_placed_before_the_cutoff():
    async with _runtime() as (rt, proc, ns):
        for i in range(50):
            await ns.get_by_name(f"old{i}").increment()
        await asyncio.sleep(IDLE + 0.05)
        for i in range(10):  # used again: back to the end
            assert await ns.get_by_name(f"old{i}").increment() == 2
        for i in range(200):  # placed since the cutoff: never read
            await ns.get_by_name(f"new{i}").increment()
        catalog = _counting(proc)
        expected = _idle_by_rule(proc)
        assert expected == {("COUNTER", str(ns.id_from_name(f"old{i}"))) for i in range(10, 50)}
        assert proc.evict_idle() == 40
        assert not expected & set(catalog)
        assert len(catalog) == 210
        # the 40 idle entries, and the first one placed since the cutoff
        assert catalog.read == 41, f"read {catalog.read} of 250 entries"
        # and the objects kept and evicted still answer, with their state
        assert await ns.get_by_name("old3").increment() == 3
        assert await ns.get_by_name("old30").increment() == 2


async def test_an_object_busy_past_the_cutoff_is_kept_and_evicted_once_idle():
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(instance, state):  # noqa: ANN001, ANN202
        started.set()
        await release.wait()

    async with _runtime() as (rt, proc, ns):
        busy = ns.get_by_name("busy")
        await busy.increment()
        for i in range(5):
            await ns.get_by_name(f"o{i}").increment()
        held = asyncio.ensure_future(rt.run_in_object(busy, hold))
        await started.wait()
        await asyncio.sleep(IDLE + 0.05)
        key = ("COUNTER", str(busy.id))
        assert proc.evict_idle() == 5  # (the five behind it were read past it)
        assert key in proc.catalog
        release.set()
        await held
        await asyncio.sleep(IDLE + 0.05)
        assert _idle_by_rule(proc) == {key}
        assert proc.evict_idle() == 1
        assert not proc.catalog
        assert await busy.increment() == 2


async def test_a_hot_object_goes_back_to_the_end_at_most_eight_times_per_idle_timeout():
    async with _runtime() as (rt, proc, ns):
        hot = ns.get_by_name("hot")
        await hot.increment()
        key = ("COUNTER", str(hot.id))
        act = proc.catalog[key]
        placed = [act.placed]
        until = time.monotonic() + IDLE
        while time.monotonic() < until:
            await hot.increment()
            if act.placed != placed[-1]:
                placed.append(act.placed)
            await asyncio.sleep(0.002)
        assert 1 <= len(placed) - 1 <= 8, placed
        assert all(b - a >= IDLE / 8 for a, b in itertools.pairwise(placed)), placed
        assert act.placed <= act.last_used
        assert list(proc.catalog)[-1] == key


class _FakeTime:
    """The object process's and its activations' clock, moved by the test (the rest of the
    time module, and the event loop's clock, stay real)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(time, name)


_OPS = st.lists(st.one_of(st.tuples(st.just("call"), st.integers(0, 11)),
                          # (steps around the move interval, IDLE / 8, and the timeout)
                          st.tuples(st.just("advance"), st.one_of(
                              st.sampled_from([IDLE / 32, IDLE / 16, IDLE / 8, IDLE / 2,
                                               IDLE * 7 / 8, IDLE]),
                              st.floats(0, 1.5 * IDLE))),
                          st.just(("evict",))), max_size=60)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
# (an object used again too soon to move, ahead of one that went idle: a scan that stopped at
# the first entry used since the cutoff, not placed since it, would keep the idle one)
@example(ops=[("call", 0), ("advance", 0.01), ("call", 1), ("advance", 0.01), ("call", 0),
              ("advance", IDLE - 0.005), ("evict",)])
def test_eviction_in_placed_order_evicts_what_a_full_scan_would(ops):
    """Against the plain rule over every entry, for any interleaving of calls, time and scans;
    and the catalog stays in order of ``placed``, none after its ``last_used``."""
    import durable.objectproc.activation as activation
    import durable.objectproc.loop as loop

    fake = _FakeTime()
    defaults = activation.Activation.__init__.__defaults__
    assert defaults[0] is time.monotonic  # (the activations' clock)

    async def run() -> None:
        async with _runtime() as (_rt, proc, ns):
            for op in ops:
                if op[0] == "call":
                    await ns.get_by_name(f"o{op[1]}").increment()
                elif op[0] == "advance":
                    fake.now += op[1]
                else:
                    expected = _idle_by_rule(proc)
                    before = set(proc.catalog)
                    assert proc.evict_idle() == len(expected)
                    assert set(proc.catalog) == before - expected
                acts = list(proc.catalog.values())
                assert all(a.placed <= a.last_used for a in acts)
                assert all(a.placed <= b.placed for a, b in itertools.pairwise(acts))

    with pytest.MonkeyPatch.context() as patch:  # (each example its own clock)
        patch.setattr(loop, "time", fake)
        patch.setattr(activation.Activation.__init__, "__defaults__",
                      (fake.monotonic, *defaults[1:]))
        asyncio.run(run())


async def test_a_scan_evicts_at_most_its_chunk_the_oldest_first_and_the_next_goes_on():
    """Evicting a whole quarter-timeout's objects at once stalled the slot (~6 µs each: 214–281
    ms at a 40-s timeout); a scan now stops at its chunk and its next step goes on."""
    async with _runtime() as (rt, proc, ns):
        for i in range(50):
            await ns.get_by_name(f"o{i}").increment()
        order = list(proc.catalog)
        await asyncio.sleep(IDLE + 0.05)
        assert len(_idle_by_rule(proc)) == 50
        assert proc.evict_idle(chunk=20) == 20
        assert list(proc.catalog) == order[20:]  # (the oldest twenty)
        assert proc.evict_idle(chunk=20) == 20
        assert proc.evict_idle(chunk=20) == 10
        assert proc.evict_idle(chunk=20) == 0
        assert not proc.catalog and proc.counters["evicted"] == 50
        assert await ns.get_by_name("o7").increment() == 2  # (its state, from storage)


async def test_a_scan_goes_on_in_steps_at_the_loops_next_turns_reading_what_it_kept_once():
    """Chunks of 1,000 a timer tick still held the loop ~6 ms ten times a second while a slot
    evicted thousands of objects, which lifted the p99 of other objects' calls: a scan now
    evicts ``EVICT_CHUNK`` objects a step and goes on at the loop's next turn, after what was
    ready meanwhile. Objects an earlier step kept (here 30 that cannot go yet) are read once
    a scan, not once a step."""
    import durable.objectproc.loop as loop_mod

    chunk = loop_mod.EVICT_CHUNK
    async with _runtime() as (rt, proc, ns):
        n = 2 * chunk + 50
        for i in range(30):
            await ns.get_by_name(f"stuck{i}").increment()
        for i in range(n):
            await ns.get_by_name(f"o{i}").increment()
        asked: list[tuple[str, str]] = []

        def stuck(key: tuple[str, str]):  # noqa: ANN202
            def evictable(idle: float) -> bool:
                asked.append(key)
                return False
            return evictable
        for k in list(proc.catalog)[:30]:
            proc.catalog[k].evictable = stuck(k)
        await asyncio.sleep(IDLE + 0.05)
        proc._evict_step()
        assert len(proc.catalog) == 30 + n - chunk and proc._evict_handle is not None
        loop = asyncio.get_running_loop()
        between: list[int] = []  # (the catalog's size each time other work got the loop)
        while proc._evict_handle is not None:
            loop.call_soon(lambda: between.append(len(proc.catalog)))
            await asyncio.sleep(0)
        assert between == [30 + n - 2 * chunk, 30]
        assert len(asked) == 30 and len(set(asked)) == 30  # (each stuck one read once)
        assert proc.counters["evicted"] == n
        assert await ns.get_by_name("o7").increment() == 2  # (its state, from storage)
        assert await ns.get_by_name("stuck3").increment() == 2
