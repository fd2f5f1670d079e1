"""Cluster mode end to end (issue #21, docs/cluster.md): three `durable serve --cluster`
hosts (real supervisors, brokers, object processes, DuckDB files) on a real 3-node NATS
JetStream cluster, on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

import durable
from tests.integration.clusterhosts import cluster_hosts, host_log, kill_host, wait_all_ready

pytestmark = [pytest.mark.slow, pytest.mark.serial]


async def _inc(client, name: str, timeout: float = 30.0) -> int:  # noqa: ANN001
    stub = client.namespace("COUNTER").get_by_name(name)
    resp = await stub.fetch("http://o/", method="POST", timeout=timeout)
    assert resp.status == 200, await resp.text()
    return int(await resp.text())


async def _get(client, name: str, timeout: float = 30.0) -> int:  # noqa: ANN001
    stub = client.namespace("COUNTER").get_by_name(name)
    resp = await stub.fetch("http://o/", timeout=timeout)
    assert resp.status == 200, await resp.text()
    return int(await resp.text())


def test_calls_through_any_host_reach_one_object(tmp_path):
    with cluster_hosts(tmp_path) as (_nats, hosts):
        try:
            wait_all_ready(hosts)

            async def main() -> None:
                clients = [await durable.connect(h.frontend, timeout=30).__aenter__()
                           for h in hosts]
                try:
                    names = [f"obj-{i}" for i in range(24)]
                    for round_ in range(3):
                        for i, name in enumerate(names):  # each round through another host
                            assert await _inc(clients[(i + round_) % 3], name) == round_ + 1
                    for c in clients:
                        assert [await _get(c, n) for n in names] == [3] * len(names)
                finally:
                    for c in clients:
                        await c.__aexit__(None, None, None)

            asyncio.run(main())
            owners = [sorted(h.status().get("cluster", {}).get("slots", [])) for h in hosts]
            assert sorted(s for o in owners for s in o) == [0, 1, 2, 3], owners
        except BaseException:
            print(host_log(hosts))
            raise


def test_a_killed_host_loses_no_acknowledged_write(tmp_path):
    with cluster_hosts(tmp_path) as (_nats, hosts):
        try:
            wait_all_ready(hosts)
            survivors = hosts[1:]

            async def main() -> None:
                clients = [await durable.connect(h.frontend, timeout=30).__aenter__()
                           for h in survivors]
                try:
                    names = [f"obj-{i}" for i in range(16)]
                    acked = {n: 0 for n in names}
                    for i, n in enumerate(names):
                        acked[n] = await _inc(clients[i % 2], n)
                    kill_host(hosts[0])
                    killed = time.monotonic()
                    served_again = {}
                    for i, n in enumerate(names):  # every object, through the survivors
                        for _attempt in range(40):
                            try:
                                acked[n] = await _inc(clients[i % 2], n, timeout=10)
                                break
                            except durable.errors.DurableError:
                                await asyncio.sleep(0.25)
                        served_again[n] = time.monotonic() - killed
                    for n in names:
                        assert await _get(clients[0], n) == acked[n] == 2, n
                    assert max(served_again.values()) < 30, served_again
                finally:
                    for c in clients:
                        await c.__aexit__(None, None, None)

            asyncio.run(main())
        except BaseException:
            print(host_log(hosts))
            raise
