"""Idle activations are evicted once their writes are durable; their data stays reachable."""

import asyncio
import time

import durable
from tests.integration.cluster import running_cluster
from tests.integration.test_messaging import all_slots_up


def active(stats):
    return sum(s["reported"].get("active", 0) for s in stats["slots"])


async def test_idle_activations_are_evicted_and_reactivate_with_their_data(tmp_path):
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            ns = client.namespace("COUNTER")
            stubs = [ns.get(ns.id_from_name(f"e{i}")) for i in range(20)]
            await asyncio.gather(*[s.fetch("http://do/inc", method="POST") for s in stubs])
            deadline = time.monotonic() + 5
            seen = []
            while time.monotonic() < deadline:
                seen.append(active(await client.statistics()))
                if seen[-1] == 0 and max(seen) > 0:
                    break
                await asyncio.sleep(0.1)
            assert max(seen) >= 20 and seen[-1] == 0, f"active objects over time: {seen}"
            evicted = sum(s["reported"].get("evicted", 0) for s in (await client.statistics())["slots"])
            assert evicted >= 20
            values = await asyncio.gather(*[s.fetch("http://do/inc", method="POST") for s in stubs])
            assert [await v.text() for v in values] == ["2"] * 20
