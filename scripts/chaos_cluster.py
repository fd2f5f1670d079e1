"""The cluster chaos run (``python scripts/chaos.py --cluster``; docs/cluster.md).

Three ``durable serve --cluster`` hosts on a 3-node NATS JetStream cluster, all on this
machine (loopback). For a bounded time, writers increment counters through every host
while faults come one after another: a whole host SIGKILLed (started again on its data dir
a few seconds later), a whole host SIGSTOPped for up to three leases and continued, a NATS
node SIGKILLed (started again later; at most one down at a time, so JetStream keeps its
quorum). Each object's answers are checked as they come, as a register:

* an increment answers the last acknowledged value + 1, or more only by increments whose
  outcome was unknown (a call that failed may have run): an answer at or below the last
  acknowledged value is an acknowledged write lost, or a write acknowledged by a deposed
  owner (it could not see the newer writes);
* at the end, with every fault healed, each counter lies between its acknowledged and its
  attempted increments.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import durable  # noqa: E402
from tests.integration.clusterhosts import (  # noqa: E402
    cluster_hosts,
    kill_host,
    restart_config,
    stop_host,
    wait_all_ready,
    wait_balanced,
)
from tests.integration.daemon import serving  # noqa: E402

SLOTS = 4


class Checker:
    def __init__(self, names: list[str]) -> None:
        self.acked = {n: 0 for n in names}
        self.unknown = {n: 0 for n in names}
        self.calls = self.acknowledged = self.failed = 0
        self.problems: list[str] = []
        self.errors: dict[str, int] = {}
        # Availability: the longest time an object went without an acknowledged write.
        self.last_ack = {n: time.monotonic() for n in names}
        self.max_gap = 0.0

    async def inc(self, client: durable.Client, name: str) -> None:
        before = self.acked[name]
        self.calls += 1
        try:
            resp = await client.namespace("COUNTER").get_by_name(name).fetch(
                "http://o/", method="POST", timeout=4.0)
            if resp.status != 200:
                raise durable.errors.DurableError(f"status {resp.status}")
            got = int(await resp.text())
        except (TimeoutError, durable.errors.DurableError, ConnectionError) as e:
            self.unknown[name] += 1
            self.failed += 1
            self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
            await asyncio.sleep(0.1)  # (a host down answers at once: no busy loop)
            return
        if not before + 1 <= got <= before + 1 + self.unknown[name]:
            self.problems.append(f"{name}: answered {got} after {before} acknowledged "
                                 f"({self.unknown[name]} unknown)")
            return
        self.unknown[name] -= got - before - 1
        self.acked[name] = max(before, got)
        self.acknowledged += 1
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self.last_ack[name])
        self.last_ack[name] = now


async def replicas_current(urls: list[str], timeout: float) -> None:
    """Until every replica of the cluster's streams (the slot logs, the slot table) is current."""
    from tests.integration.natscluster import connect

    deadline = time.monotonic() + timeout
    nc = await connect(urls)
    try:
        js = nc.jetstream(timeout=2.0)
        while True:
            try:
                ok = True
                for stream in ("DURABLE_LOG", "KV_durable_slots"):
                    info = await js.stream_info(stream)
                    c = info.cluster
                    ok = ok and c is not None and c.leader is not None and all(
                        r.current for r in (c.replicas or []))
                if ok:
                    return
            except Exception:  # noqa: BLE001  (no leader yet)
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the NATS streams' replicas not current in {timeout} s")
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _clients(frontends: list[str]) -> list[Any]:
    out = []
    for f in frontends:
        c = durable.connect(f, timeout=10)
        await c.start()
        out.append(c)
    return out


async def _writers(check: Checker, clients: list[Any], up: list[bool], names: list[str],
                   stop: list[float], writers: int, rng: random.Random) -> None:
    """``stop[0]``: when to stop (the faulter may put it later, to reach its faults)."""
    async def one(k: int) -> None:
        mine = names[k::writers]
        while time.monotonic() < stop[0]:
            live = [c for c, u in zip(clients, up, strict=True) if u]
            if not live or not mine:
                await asyncio.sleep(0.1)
                continue
            await check.inc(rng.choice(live), rng.choice(mine))
    await asyncio.gather(*(one(k) for k in range(writers)))


def run(seconds: float, objects: int, writers: int, seed: int, lease: float,
        keep: Path | None = None, min_faults: int = 0) -> dict[str, Any]:
    """``keep``: run in this directory and leave it (every host's and node's whole log).
    ``min_faults``: go on past ``seconds`` (by at most 180 s) until that many faults are done:
    on a slow machine one fault and its healing can take most of a minute."""
    rng = random.Random(seed)
    names = [f"c{i}" for i in range(objects)]
    check = Checker(names)
    faults: dict[str, int] = {}
    restarts: list[float | None] = []  # seconds until a restarted host was ready (None: > 60)
    events: list[tuple[float, str, int]] = []  # (seconds in, fault, host index)
    began = time.monotonic()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(keep)) if keep is not None else
          tempfile.TemporaryDirectory(prefix="durable-chaos-cluster-")) as tmp, \
            cluster_hosts(Path(tmp), lease=lease, slots=SLOTS) as (nats_, hosts), \
            contextlib.ExitStack() as restarted:
        wait_all_ready(hosts)
        wait_balanced(hosts, SLOTS)
        up = [True] * len(hosts)

        async def faulter(stop: list[float]) -> None:
            cap = stop[0] + 180
            while (time.monotonic() < stop[0] - 2 * lease
                   or (sum(faults.values()) < min_faults and time.monotonic() < cap)):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                kind = rng.choice(["host_killed", "host_stopped", "nats_node_killed"])
                faults[kind] = faults.get(kind, 0) + 1
                i = rng.randrange(len(hosts))
                events.append((round(time.monotonic() - began, 1), kind, i))
                if kind == "host_killed":
                    up[i] = False
                    await asyncio.to_thread(kill_host, hosts[i])
                    await asyncio.sleep(rng.uniform(1.0, 2 * lease))
                    hosts[i] = restarted.enter_context(serving(hosts[i].root,
                                                               restart_config(hosts[i])))
                    # Ready means every slot registered at its broker at once: under
                    # continuous faults that can take long (slots lapse while NATS elects
                    # leaders). Counted, not fatal: what must hold is that nothing acknowledged
                    # is lost, and that every object is served once the faults stop (below).
                    t0 = time.monotonic()
                    try:
                        await asyncio.to_thread(hosts[i].wait_ready, 60)
                        restarts.append(round(time.monotonic() - t0, 1))
                    except AssertionError:
                        restarts.append(None)
                    up[i] = True
                elif kind == "host_stopped":
                    stop_host(hosts[i], signal.SIGSTOP)
                    await asyncio.sleep(rng.uniform(0.2, 3 * lease))
                    stop_host(hosts[i], signal.SIGCONT)
                else:
                    node = nats_.nodes[rng.randrange(len(nats_.nodes))]
                    await asyncio.to_thread(nats_.kill, node)
                    await asyncio.sleep(rng.uniform(1.0, 2 * lease))
                    nats_.start(node)
                    # One node at a time: the next fault waits until every replica of the
                    # slot logs and the slot table is current again (else two "down" at once).
                    try:
                        await replicas_current(nats_.urls, 120)
                    except AssertionError:
                        print(nats_.logs(), file=sys.stderr)
                        raise
                # let the cluster settle a little between faults
                await asyncio.sleep(rng.uniform(0.5, lease))
            stop[0] = max(stop[0], time.monotonic() + lease)  # (writes after the last fault)

        async def main() -> dict[str, Any]:
            clients = await _clients([h.frontend for h in hosts])
            try:
                stop = [time.monotonic() + seconds]
                await asyncio.gather(faulter(stop),
                                     _writers(check, clients, up, names, stop, writers, rng))
                try:
                    await asyncio.to_thread(wait_balanced, hosts, SLOTS, 120)
                except AssertionError as e:  # (reported with each host's state; reads go on)
                    states = []
                    for h in hosts:
                        try:
                            states.append(psutil.Process(h.proc.pid).status())
                        except psutil.Error as err:
                            states.append(type(err).__name__)
                    check.problems.append(f"{e} (the hosts' supervisors: {states})")
                final = {}
                deadline = time.monotonic() + 120  # (for all: a slot never served fails soon)
                for n in names:  # every fault healed: each object is served and read back
                    while time.monotonic() < deadline:
                        try:
                            resp = await clients[0].namespace("COUNTER").get_by_name(n).fetch(
                                "http://o/", timeout=5.0)
                            final[n] = int(await resp.text())
                            break
                        except durable.errors.DurableError:
                            await asyncio.sleep(0.5)
                    else:
                        check.problems.append(f"{n}: not served after the faults healed")
                return final
            finally:
                for c in clients:
                    with contextlib.suppress(Exception):
                        await c.close()

        final = asyncio.run(main())
    lost = 0
    for n, v in final.items():
        if not check.acked[n] <= v <= check.acked[n] + check.unknown[n]:
            lost += 1
            check.problems.append(f"{n}: holds {v}, acknowledged {check.acked[n]} "
                                  f"(+{check.unknown[n]} unknown)")
    lost += sum(1 for p in check.problems if "answered" in p)
    return {"seconds": seconds, "seed": seed, "lease": lease, "faults": faults,
            "faults_total": sum(faults.values()), "calls": check.calls,
            "acknowledged": check.acknowledged, "failed_calls": check.failed,
            "failures": check.errors,
            "lost_or_stale": lost, "problems": check.problems[:20],
            "max_seconds_without_ack": round(check.max_gap, 1),
            "host_restarts_ready_s": restarts, "events": events,
            "ok": not check.problems}
