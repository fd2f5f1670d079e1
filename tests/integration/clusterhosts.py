"""Several `durable serve --cluster` hosts on one machine, on a real NATS JetStream cluster
(``natscluster.py``): each host its own data dir, broker port and run dir; every process
killed at the end, even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.integration.daemon import Daemon, serving
from tests.integration.natscluster import NatsCluster, nats_cluster
from tests.integration.procs import free_port

CONFIG = """
slots = {slots}
grace_period = 5.0
warm_spare = false
[broker]
heartbeat = 0.5
[namespaces.COUNTER]
class = "tests.integration.objects:Counter"
[namespaces.KV]
class = "tests.integration.objects:KV"
[cluster]
nats = "{nats}"
host_id = "{host}"
listen = "127.0.0.1:{port}"
lease = {lease}
curve_key = "{key}"
"""


def cluster_key(root: Path) -> Path:
    """The cluster's CurveZMQ key pair (as `durable keygen DIR --name cluster` makes it)."""
    import zmq.auth

    secret = root / "cluster.key_secret"
    if not secret.exists():
        zmq.auth.create_certificates(root, "cluster")
    return secret


def host_config(cluster: NatsCluster, host: str, *, slots: int, lease: float,
                port: int | None = None) -> str:
    return CONFIG.format(slots=slots, nats=",".join(cluster.urls), host=host,
                         port=port or free_port(), lease=lease, key=cluster_key(cluster.root))


def restart_config(d: Daemon) -> str:
    """The config a host was started with (a host restarts on its own settings: the same
    name, data dir and cluster port)."""
    return (d.root / "durable.toml").read_text()


def kill_host(d: Daemon) -> None:
    """SIGKILL a whole host at once: its supervisor and every child (a machine that dies)."""
    procs = [psutil.Process(d.proc.pid), *d.children()]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=10)


def stop_host(d: Daemon, sig: int) -> None:
    """SIGSTOP / SIGCONT a whole host (a machine that freezes, then comes back)."""
    for p in [psutil.Process(d.proc.pid), *d.children()]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


@contextlib.contextmanager
def cluster_hosts(root: Path, hosts: int = 3, *, slots: int = 4,
                  lease: float = 2.0) -> Iterator[tuple[NatsCluster, list[Daemon]]]:
    with nats_cluster(root / "nats") as cluster, contextlib.ExitStack() as stack:
        daemons = []
        for i in range(hosts):
            name = f"h{i + 1}"
            daemons.append(stack.enter_context(serving(
                root / name, host_config(cluster, name, slots=slots, lease=lease))))
        yield cluster, daemons


def wait_all_ready(daemons: list[Daemon], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    for d in daemons:
        d.wait_ready(max(1.0, deadline - time.monotonic()))


def wait_balanced(daemons: list[Daemon], slots: int = 4, timeout: float = 60.0) -> list[list[int]]:
    """Until the hosts' status files show every slot served once, each host at most its
    fair share and within one slot of every other (no slot moves after that in a quiet
    cluster: a stub breaks when its slot moves); returns each host's slots."""
    deadline = time.monotonic() + timeout
    share = -(-slots // len(daemons))
    while True:
        owned = [sorted(d.status().get("cluster", {}).get("slots", [])) for d in daemons]
        if sorted(s for o in owned for s in o) == list(range(slots)) and all(
                len(o) <= share for o in owned) and (
                max(map(len, owned)) - min(map(len, owned)) <= 1):  # (where the moves end)
            return owned
        if time.monotonic() > deadline:
            raise AssertionError(f"slots not spread over the hosts within {timeout} s: {owned}")
        time.sleep(0.2)


def host_log(daemons: list[Daemon]) -> str:
    return "\n".join(f"--- {d.root.name}\n{d.log_text()[-4000:]}" for d in daemons)


__all__ = ["cluster_hosts", "wait_balanced", "restart_config", "kill_host", "stop_host", "wait_all_ready", "host_log",
           "host_config", "os"]
