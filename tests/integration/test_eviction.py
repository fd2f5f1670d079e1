"""Idle activations are evicted once their writes are durable; their data stays reachable."""

import asyncio

import durable
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
