"""Cluster mode end to end (issue #21, docs/cluster.md): three `durable serve --cluster`
hosts (real supervisors, brokers, object processes, DuckDB files) on a real 3-node NATS
JetStream cluster, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

import durable
from tests.integration.clusterhosts import (
    cluster_hosts,
    host_log,
    kill_host,
    wait_all_ready,
    wait_balanced,
)

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@contextlib.asynccontextmanager
async def _connected(frontends: list[str]):  # noqa: ANN202
    """A client on each host's endpoint."""
    clients = [await durable.connect(f, timeout=30).__aenter__() for f in frontends]
    try:
        yield clients
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


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
            wait_balanced(hosts)  # (a stub breaks when its slot moves, as documented)

            async def main() -> None:
                async with _connected([h.frontend for h in hosts]) as clients:
                    names = [f"obj-{i}" for i in range(24)]
                    for round_ in range(3):
                        for i, name in enumerate(names):  # each round through another host
                            assert await _inc(clients[(i + round_) % 3], name) == round_ + 1
                    for c in clients:
                        assert [await _get(c, n) for n in names] == [3] * len(names)
                    for c in clients:  # each slot reads batches from each host's broker, by
                        slots = (await c.statistics())["slots"]  # its own or a cluster link
                        assert all(s["batches"] for s in slots if s["up"]), slots
                    strangers = _pose_as_slots(hosts)  # no key, and a key of their own
                    await asyncio.sleep(1.0)
                    for i, name in enumerate(names):  # still the real slots, data intact
                        assert await _inc(clients[i % 3], name) == 4
                    for s in strangers:
                        s.close(linger=0)

            asyncio.run(main())
            wait_balanced(hosts)
            for h in hosts:  # the strangers (pid 1) were never registered as a slot
                assert "registered (pid 1," not in h.log_text(), h.log_text()[-3000:]
        except BaseException:
            print(host_log(hosts))
            raise


def _pose_as_slots(hosts) -> list:  # noqa: ANN001
    """DEALERs that try to register as every slot with each host's broker, over its cluster
    TCP endpoint: one without CurveZMQ, one with a key pair of its own (not the cluster's).
    The brokers must admit neither (a stranger on the port cannot take calls)."""
    import zmq
    import zmq.auth  # noqa: F401

    from durable.protocol.messages import Ready

    ctx = zmq.Context.instance()
    out = []
    for h in hosts:
        endpoint = h.status()["cluster"]["hosts"][h.root.name]
        for keyed in (False, True):
            s = ctx.socket(zmq.DEALER)
            if keyed:
                public, secret = zmq.curve_keypair()
                server = open(h.root / "durable.toml").read().split('curve_key = "')[1]
                from zmq.auth import load_certificate
                s.curve_serverkey = load_certificate(server.split('"')[0])[0]
                s.curve_publickey, s.curve_secretkey = public, secret
            s.connect(endpoint)
            for slot in range(4):
                try:  # a refused handshake drops the pipe: nothing more can be sent
                    s.send_multipart(Ready(slot, 1, 12345 + slot).encode(), zmq.NOBLOCK)
                except zmq.Again:
                    break
            out.append(s)
    return out


def test_a_killed_host_loses_no_acknowledged_write(tmp_path):
    with cluster_hosts(tmp_path) as (_nats, hosts):
        try:
            wait_all_ready(hosts)
            wait_balanced(hosts)
            survivors = hosts[1:]

            async def main() -> None:
                async with _connected([h.frontend for h in survivors]) as clients:
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

            asyncio.run(main())
        except BaseException:
            print(host_log(hosts))
            raise


class Register:
    """Per-object checker for counters: an increment's answer must be the last acknowledged
    value + 1 (or more, after increments whose outcome was unknown), and a read never less
    than the last acknowledged value."""

    def __init__(self, names: list[str]) -> None:
        self.acked = {n: 0 for n in names}
        self.unknown = {n: 0 for n in names}  # increments that failed: applied or not

    async def inc(self, client, name: str, timeout: float = 5.0) -> bool:  # noqa: ANN001
        before = self.acked[name]
        try:
            got = await _inc(client, name, timeout)
        except durable.errors.DurableError:
            self.unknown[name] += 1
            return False
        assert before + 1 <= got <= before + 1 + self.unknown[name], (name, before, got)
        self.unknown[name] -= got - before - 1
        self.acked[name] = got
        return True

    async def read(self, client, name: str, timeout: float = 5.0) -> None:  # noqa: ANN001
        before = self.acked[name]
        try:
            got = await _get(client, name, timeout)
        except durable.errors.DurableError:
            return
        assert before <= got <= before + self.unknown[name], (name, before, got)


def test_a_stopped_host_serves_nothing_after_its_lease(tmp_path):
    from tests.integration.clusterhosts import stop_host

    lease = 2.0
    with cluster_hosts(tmp_path, lease=lease) as (_nats, hosts):
        try:
            wait_all_ready(hosts)
            wait_balanced(hosts)
            frozen = hosts[0]
            assert frozen.status()["cluster"]["slots"], "the host to stop holds no slot"

            async def main() -> None:
                async with _connected([h.frontend for h in hosts]) as clients:
                    names = [f"obj-{i}" for i in range(16)]
                    reg = Register(names)
                    for n in names:
                        assert await reg.inc(clients[1], n)
                    stop_host(frozen, signal.SIGSTOP)
                    stopped = time.monotonic()
                    while time.monotonic() - stopped < 3 * lease:  # the others take over
                        await asyncio.gather(*(reg.inc(clients[1 + i % 2], n, 3.0)
                                               for i, n in enumerate(names)))
                    stop_host(frozen, signal.SIGCONT)
                    resumed = time.monotonic()
                    while time.monotonic() - resumed < 3.0:  # every host, the old one too
                        for i, n in enumerate(names):
                            c = clients[i % 3]
                            await reg.inc(c, n, 5.0)
                            await reg.read(c, n, 5.0)
                    for n in names:  # a last round that must succeed, through the old host
                        for _ in range(20):
                            if await reg.inc(clients[0], n, 5.0):
                                break
                        else:
                            raise AssertionError(f"{n}: not served through the resumed host")
                        await reg.read(clients[0], n)
                    assert all(reg.acked[n] >= 3 for n in names), reg.acked

            asyncio.run(main())
            log = frozen.log_text()
            assert "lease on the slot ended" in log or "no longer holds it" in log, log[-3000:]
        except BaseException:
            print(host_log(hosts))
            raise


def test_a_joining_host_takes_slots_with_their_data(tmp_path):
    from tests.integration.clusterhosts import host_config
    from tests.integration.daemon import serving

    with cluster_hosts(tmp_path, hosts=2) as (nats_, hosts):
        try:
            wait_all_ready(hosts)

            async def main(phase: int, frontends: list[str]) -> None:
                async with _connected(frontends) as clients:
                    for i in range(24):
                        got = await _inc(clients[i % len(clients)], f"obj-{i}")
                        assert got == phase, (i, got)

            asyncio.run(main(1, [h.frontend for h in hosts]))
            with serving(tmp_path / "h3", host_config(nats_, "h3", slots=4, lease=2.0)) as h3:
                all_hosts = [*hosts, h3]
                try:
                    deadline = time.monotonic() + 60
                    while not h3.status().get("cluster", {}).get("slots"):
                        assert time.monotonic() < deadline, "the new host took no slot"
                        time.sleep(0.2)
                    h3.wait_ready(60)
                    asyncio.run(main(2, [h.frontend for h in all_hosts]))
                    owned = wait_balanced(all_hosts)
                    assert all(owned), owned
                except BaseException:
                    print(host_log([h3]))
                    raise
        except BaseException:
            print(host_log(hosts))
            raise


def test_nats_nodes_lost_one_keeps_writes_two_acknowledge_none(tmp_path):
    with cluster_hosts(tmp_path) as (nats_, hosts):
        try:
            wait_all_ready(hosts)
            wait_balanced(hosts)

            async def rounds(reg: Register, clients, names, seconds: float) -> int:  # noqa: ANN001
                ok, end = 0, time.monotonic() + seconds
                while time.monotonic() < end:
                    got = await asyncio.gather(*(reg.inc(clients[i % 3], n, 3.0)
                                                 for i, n in enumerate(names)))
                    ok += sum(got)
                return ok

            async def main() -> None:
                async with _connected([h.frontend for h in hosts]) as clients:
                    names = [f"obj-{i}" for i in range(8)]
                    reg = Register(names)
                    assert await rounds(reg, clients, names, 2.0) > 0
                    nats_.kill(nats_.nodes[0])  # quorum kept: writes go on (after an election)
                    # (when the node led the log's and the leases' streams, its slots restart
                    # and read the log again after the elections: 9-18 s measured, so a fixed
                    # 11-s window failed a CI-like run; writes must come back within 30 s)
                    lost = time.monotonic()
                    while await rounds(reg, clients, names, 1.0) == 0:
                        assert time.monotonic() - lost < 30, "no write within 30 s of one loss"
                    assert await rounds(reg, clients, names, 3.0) > 0, "writes stopped again"
                    acked_before = dict(reg.acked)
                    nats_.kill(nats_.nodes[1])  # no quorum: nothing may be acknowledged
                    await asyncio.sleep(1.0)  # (writes in flight at the loss settle)
                    settled = dict(reg.acked)
                    assert await rounds(reg, clients, names, 6.0) == 0
                    assert reg.acked == settled and all(
                        settled[n] >= acked_before[n] for n in names)
                    for node in nats_.nodes[:2]:  # back: every acknowledged write is there
                        nats_.start(node)
                    deadline = time.monotonic() + 120  # (for all: a stuck slot fails soon)
                    for n in names:
                        while not await reg.inc(clients[0], n, 5.0):
                            if time.monotonic() > deadline:
                                raise AssertionError(f"{n} not served 120 s after the nodes "
                                                     "came back")
                            await asyncio.sleep(0.5)
                        await reg.read(clients[1], n)

            asyncio.run(main())
        except BaseException:
            print(host_log(hosts))
            print(nats_.logs())
            raise
