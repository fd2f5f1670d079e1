"""A 3-node NATS JetStream cluster from Debian's ``nats-server``, on loopback, for the tests of
cluster mode (issue #21): each node has its own store dir and ports; every node is killed and
reaped when the block ends, even on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.procs import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store: Path
    config: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class NatsCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, node: Node) -> None:
        with open(node.log, "ab") as out:
            node.proc = subprocess.Popen([NATS_SERVER, "-c", str(node.config)],
                                         stdout=out, stderr=out)

    def kill(self, node: Node) -> None:
        """SIGKILL, as a machine that dies."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-2000:]}"
                         for n in self.nodes if n.log.exists())


async def quiet(_error: Exception) -> None:
    """nats-py's error callback: a node down is what these tests do (nats-py would print a
    traceback for each refused connection)."""


async def connect(urls: list[str]) -> Any:
    import nats

    return await nats.connect(servers=urls, error_cb=quiet, connect_timeout=2,
                              reconnect_time_wait=0.2)


async def jetstream_ready(urls: list[str], timeout: float = 30.0) -> None:
    """Until JetStream can place a stream on every node: a meta leader elected and every peer
    known to it (a 3-node cluster takes ~2-5 s; a meta leader alone still answered "no
    suitable peers for placement" to a 3-replica stream under load, seen in CI)."""
    import nats

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    probe = f"READY_{os.getpid()}_{time.monotonic_ns()}"
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(servers=urls, connect_timeout=1, max_reconnect_attempts=0,
                                    error_cb=quiet)
            try:
                js = nc.jetstream()
                await js.account_info()
                await js.add_stream(name=probe, subjects=[f"{probe}.x"],
                                    num_replicas=min(3, len(urls)))
                await js.delete_stream(probe)
                return
            finally:
                await nc.close()
        except Exception as e:  # noqa: BLE001  (not up yet: no servers, no leader)
            last = e
            await asyncio.sleep(0.2)
    raise AssertionError(f"JetStream not ready within {timeout} s: {last!r}")


@contextlib.contextmanager
def nats_cluster(root: Path, size: int = 3) -> Iterator[NatsCluster]:
    """``size`` nats-server nodes with JetStream, routed to each other, on loopback."""
    if not os.path.exists(NATS_SERVER):
        raise AssertionError("nats-server is not installed: apt-get install nats-server "
                             "(.ci/run does so)")
    cluster = NatsCluster(root)
    ports = [(free_port(), free_port()) for _ in range(size)]
    for i, (port, cport) in enumerate(ports):
        name = f"n{i + 1}"
        store = root / name
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats://127.0.0.1:{c}" for j, (_, c) in enumerate(ports) if j != i)
        config = root / f"{name}.conf"
        config.write_text(
            f'server_name: "{name}"\nlisten: "127.0.0.1:{port}"\n'
            f'jetstream {{ store_dir: "{store}" }}\n'
            f'cluster {{ name: "durable-test", listen: "127.0.0.1:{cport}", '
            f"routes: [{routes}] }}\n")
        cluster.nodes.append(Node(name, port, cport, store, config, root / f"{name}.log"))
    try:
        for node in cluster.nodes:
            cluster.start(node)
        yield cluster
    finally:
        for node in cluster.nodes:
            cluster.kill(node)
