"""Idle activations are evicted once their writes are durable; their data stays reachable."""

import asyncio
import signal
import time

import psutil
import pytest

import durable
from durable.ring import Ring
from tests.integration.cluster import all_slots_up, running_cluster
from tests.integration.procs import async_wait_for


def active(stats):
    return sum(s["reported"].get("active", 0) for s in stats["slots"])


async def test_idle_activations_are_evicted_and_reactivate_with_their_data(tmp_path):
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            ns = client.namespace("COUNTER")
            stubs = [ns.get(ns.id_from_name(f"e{i}")) for i in range(20)]
            await asyncio.gather(*[s.fetch("http://do/inc", method="POST") for s in stubs])
            seen = []

            async def all_evicted():
                seen.append(active(await client.statistics()))
                return seen[-1] == 0 and max(seen) > 0

            try:
                await async_wait_for(all_evicted, 5, "every object to be evicted", 0.1)
            except AssertionError as e:
                raise AssertionError(f"{e}; active objects over time: {seen}") from None
            assert max(seen) >= 20, f"active objects over time: {seen}"
            evicted = sum(s["reported"].get("evicted", 0) for s in (await client.statistics())["slots"])
            assert evicted >= 20
            values = await asyncio.gather(*[s.fetch("http://do/inc", method="POST") for s in stubs])
            assert [await v.text() for v in values] == ["2"] * 20


@pytest.mark.slow  # (~17 s: an idle_timeout of 12 s, then the scans)
async def test_a_scan_that_stops_at_its_chunk_goes_on_at_once_not_a_quarter_timeout_later(
        tmp_path):
    """A scan evicts ``EVICT_CHUNK`` objects a step (a stall of every object of the slot
    otherwise: ~6 µs an object); the rest of the idle ones go at the loop's next turns (at the
    timer's next ticks, before 2026-12-07: this bound was set for those). Each slot holds ~2,500
    objects made within a second or two: scans a quarter timeout (3 s) apart need at least 6 s
    from the first eviction to the last (three scans), ticks a tenth of a second apart at most
    the time the objects took to make and one quarter timeout (the last objects made may go
    idle just after a scan that found fewer than 1,000)."""
    with running_cluster(tmp_path, slots=2, idle_timeout=12) as cluster:
        async with durable.connect(cluster.frontend, timeout=20) as client:
            await all_slots_up(client)
            ns = client.namespace("COUNTER")
            todo = iter(range(5000))
            t0 = time.monotonic()

            async def make() -> None:
                for i in todo:
                    await ns.get(ns.id_from_name(f"c{i}")).fetch("http://do/inc", method="POST")
            await asyncio.gather(*[make() for _ in range(64)])
            made = time.monotonic() - t0
            seen: list[tuple[float, list[int]]] = []

            async def all_evicted() -> bool:
                stats = await client.statistics()
                seen.append((time.monotonic(), [s["reported"].get("active", 0)
                                                for s in stats["slots"]]))
                return not any(seen[-1][1])
            await async_wait_for(all_evicted, 30, "every object to be evicted", 0.05)
            totals = [sum(n) for _, n in seen]
            peak = max(totals)
            at_peak = totals.index(peak)
            first = next(t for (t, _), n in zip(seen[at_peak:], totals[at_peak:], strict=True)
                         if n < peak)
            took = seen[-1][0] - first
            most = [max(n[i] for _, n in seen) for i in range(2)]
            assert min(most) >= 2100, f"objects per slot: {most}"
            assert made < 2.5, f"making the objects took {made:.1f} s"
            assert took < 5.8, (f"{took:.1f} s from the first eviction to the last "
                                f"(active over time: {totals[at_peak::5]})")


async def test_evicted_instances_that_outlive_their_eviction_are_counted_for_the_collector(
        tmp_path):
    """An instance in a reference cycle of its own outlives its eviction (its process freezes
    what survives a tick: objectproc/collector.py); the process counts such instances, and a
    full collection comes sooner when there are many. Plain instances are not counted."""
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            for ns, n in (("COUNTER", 20), ("CYCLIC", 30)):
                space = client.namespace(ns)
                if ns == "COUNTER":
                    await asyncio.gather(*[space.get_by_name(f"p{i}").fetch(
                        "http://do/inc", method="POST") for i in range(n)])
                else:
                    await asyncio.gather(*[space.get_by_name(f"c{i}").touch() for i in range(n)])
            seen = []

            async def counted():
                stats = await client.statistics()
                seen.append(([s["reported"].get("evicted", 0) for s in stats["slots"]],
                             [s["reported"].get("gc", {}) for s in stats["slots"]]))
                return sum(seen[-1][0]) >= 50
            await async_wait_for(counted, 10, "every object to be evicted", 0.1)
            gcs = seen[-1][1]
            assert sum(g["suspects"] for g in gcs) == 30, seen[-1]
            assert all(g["full_collections"] == 0 for g in gcs), seen[-1]


@pytest.mark.slow
async def test_cycles_that_die_after_they_were_frozen_are_freed_when_the_process_has_grown(
        tmp_path):
    """Garbage in reference cycles that outlived a tick of the collector is frozen, and only
    a full collection frees it: one comes when the process's memory has doubled
    (objectproc/collector.py), so such garbage cannot grow an object process without bound.
    Each call here drops 16 MiB held since the call before (a tick between them)."""
    with running_cluster(tmp_path, slots=2) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            stub = client.namespace("CHURN").get_by_name("churn")
            owner = Ring(2).slot_for(str(stub.id))
            process = psutil.Process(cluster.workers[owner].pid)
            rss: list[int] = []
            for _ in range(40):
                await stub.churn(16)
                await asyncio.sleep(0.2)  # (the slot's timer ticks 0.1 s after a call)
                rss.append(process.memory_info().rss >> 20)
            slot = next(s["reported"] for s in (await client.statistics())["slots"]
                        if s["slot"] == owner)
            alive, dropped = await stub.dropped()
            assert dropped == 39
            # Without a full collection all 39 (624 MiB) would still be alive.
            assert alive <= 30, (f"{alive} of {dropped} dropped cycles alive (collector: "
                                 f"{slot['gc']}); the object process's RSS over the calls "
                                 f"(MiB): {rss}")
            assert slot["gc"]["full_collections"] >= 1, slot["gc"]


def reads(stats):
    """(DuckDB reads on the slots' loops, objects whose first read left the loop)."""
    r = [s["reported"].get("reads", {}) for s in stats["slots"]]
    return sum(x.get("on_loop", 0) for x in r), sum(x.get("warmed_objects", 0) for x in r)


async def test_an_evicted_objects_first_read_leaves_the_loop_and_its_calls_keep_their_order(
        tmp_path):
    """An existing object's activation reads its rows on the slot's reader thread, not on
    the loop (other objects are served meanwhile); its calls wait for it and go in, in order."""
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            ns = client.namespace("RECORDER")
            stubs = [ns.get_by_name(f"w{i}") for i in range(20)]
            await asyncio.gather(*[s.fetch("http://do/?n=0", method="POST") for s in stubs])

            async def all_evicted():
                return active(await client.statistics()) == 0
            await async_wait_for(all_evicted, 5, "every object to be evicted", 0.1)
            await asyncio.sleep(1.5)  # (the slots report their figures every second)
            loop_before, warmed_before = reads(await client.statistics())
            # each cold object gets five calls at once from its stub: they wait for its rows
            # and run in the order they were sent
            await asyncio.gather(*[s.fetch(f"http://do/?n={n}", method="POST")
                                   for s in stubs for n in range(1, 6)])
            got = await asyncio.gather(*[s.fetch("http://do/") for s in stubs])
            assert {await g.text() for g in got} == {"[0,1,2,3,4,5]"}
            seen = []

            async def reported():
                seen.append(reads(await client.statistics()))
                return seen[-1][1] - warmed_before >= 20
            await async_wait_for(reported, 5, "the warmed objects to be reported", 0.2)
            loop_after, warmed_after = seen[-1]
            assert warmed_after - warmed_before == 20, (warmed_before, warmed_after)
            assert loop_after == loop_before, "an activation read DuckDB on the loop"


async def test_a_constructor_that_raises_after_the_read_off_the_loop_fails_every_waiting_call(
        tmp_path):
    """The calls that waited for an evicted object's rows get its constructor's error (as a
    call to an activation that fails to construct does); the next call constructs anew."""
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            ns = client.namespace("RETURNS")
            stub = ns.get_by_name("r")
            assert await (await stub.fetch("http://do/", method="POST")).text() == "kept"

            async def evicted():  # (not "none active": the figures may predate the call)
                return sum(s["reported"].get("evicted", 0)
                           for s in (await client.statistics())["slots"]) >= 1
            await async_wait_for(evicted, 5, "the object to be evicted", 0.1)
            # The three calls reach the process together (it is stopped while they are sent):
            # sent freely on a loaded machine, a later one could come after the failed
            # constructor, and then construct anew (seen in CI).
            owner = cluster.workers[Ring(2).slot_for(str(stub.id))]
            owner.send_signal(signal.SIGSTOP)
            try:
                calls = [asyncio.ensure_future(stub.fetch("http://do/")) for _ in range(3)]
                await asyncio.sleep(0.3)
            finally:
                owner.send_signal(signal.SIGCONT)
            got = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(e, durable.ObjectError) and e.type_name == "KeyError"
                       for e in got), got
            assert await (await stub.fetch("http://do/")).text() == "kept"
            await asyncio.sleep(1.5)  # (the slots report their figures every second)
            assert reads(await client.statistics())[1] >= 2  # both returns read off the loop
