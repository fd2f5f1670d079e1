#!/usr/bin/env python3
"""Where the CPU of a call goes: per process and thread, new objects against existing ones.

    python scripts/cpu_split.py [--calls 50000] [--existing 0] [--unnamed] [--concurrency 64]
                                [--via-broker | --curve] [--json]

Starts `durable serve` (2 slots, the Counter example), then one program increments
``--calls`` objects, ``--concurrency`` calls in flight (64: the many_objects workload):
every call to a new object, or with ``--existing K`` round-robin over K objects; by name,
or with ``--unnamed`` by unique id; with ``--via-broker`` through the broker, as a
client on another machine or without access to the run directory calls (not by the peer
links); with ``--curve`` from a client on "another machine": over TCP to the broker's
public endpoint, CurveZMQ-encrypted, with a key made for the run. Reports the rate and the CPU each thread of each process
spent per call (from /proc: user + system), so that the cost of a new object (its
activation, its name, its rows in DuckDB) can be told from a call's own; and per call, each
thread's time runnable but waiting for a CPU and its involuntary context switches (a thread it
woke took its CPU), with the cores the run kept busy; and the object processes' garbage
collections, by generation: how many, and their pauses per call (``durable_gc_pause_seconds``).

A call's CPU depends on the rate: a process woken for fewer calls at a time spends more per
call on the wake-ups (the loop's, the log writer's, the client's). Compare new and existing
objects at the same rate too, by lowering ``--concurrency`` for the existing ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from harness import gc_pauses, machine_speed, serving  # noqa: E402

import durable  # noqa: E402

CONFIG = """
data_dir = "{data}"
slots = 2
idle_timeout = 5
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
#: ``--curve``: the broker's public endpoint, and the keys ``make_keys`` writes
CURVE = """
[broker]
public_endpoint = "tcp://127.0.0.1:{port}"
curve_secret_key = "{data}/../keys/broker.key_secret"
authorized_keys = "{data}/../allowed"
"""


def make_keys(root: Path) -> None:
    """The broker's key pair and one authorized client's (``durable keygen``), beside the
    data dir (made now, empty: the config names the keys through it)."""
    (root / "data").mkdir()
    for folder, name in (("keys", "broker"), ("allowed", "client")):
        subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "keygen",
                        str(root / folder), "--name", name], check=True, capture_output=True,
                       timeout=60)


def thread_stats(procs: list[psutil.Process]) -> dict[tuple[str, str], list[float]]:
    """(role, thread) -> [CPU seconds, seconds runnable but waiting for a CPU, involuntary
    context switches] so far; the process's main thread is "main". (The last two from
    ``schedstat`` and ``status``: 0 where the kernel does not keep them.)"""
    out: dict[tuple[str, str], list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        role = ("program" if p.pid == os.getpid() else "objectproc" if "durable.objectproc" in cmd
                else "broker" if "durable.broker" in cmd else "supervisor")
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            task = f"/proc/{p.pid}/task/{tid}"
            try:
                stat = Path(f"{task}/stat").read_text()
                comm = Path(f"{task}/comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            try:
                waited = int(Path(f"{task}/schedstat").read_text().split()[1]) / 1e9
                status = Path(f"{task}/status").read_text()
                preempted = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            except (OSError, IndexError, ValueError):
                waited, preempted = 0.0, 0
            name = "main" if tid == str(p.pid) else comm
            acc = out.setdefault((role, name), [0.0, 0.0, 0.0])
            acc[0] += (int(fields[11]) + int(fields[12])) / tick
            acc[1] += waited
            acc[2] += preempted
    return out


async def drive(frontend: str, calls: int, existing: int, rpc: bool = False,
                unnamed: bool = False, concurrency: int = 64, via_broker: bool = False,
                **connect: Any) -> float:
    """``connect``: more of ``durable.connect``'s arguments (a remote client's keys)."""
    async with durable.connect(frontend, timeout=60, direct=not via_broker, **connect) as c:
        await asyncio.sleep(1)  # (the client's links to the slots)
        ns = c.namespace("COUNTER")
        todo = iter(range(calls))
        ids = [ns.new_unique_id() for _ in range(existing)] if unnamed else []

        async def worker() -> None:
            for i in todo:
                if unnamed:
                    stub = ns.get(ids[i % existing] if existing else ns.new_unique_id())
                else:
                    stub = ns.get(ns.id_from_name(f"obj-{i % existing if existing else i}"))
                if rpc:
                    await stub.increment()
                else:
                    await stub.fetch("http://do/inc", method="POST")

        started = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=50_000)
    p.add_argument("--existing", type=int, default=0,
                   help="round-robin over this many objects (0: every call to a new object)")
    p.add_argument("--rpc", action="store_true",
                   help="call the Counter's increment() method on the stub instead of fetch")
    p.add_argument("--unnamed", action="store_true",
                   help="objects by unique id (newUniqueId), not by name: no name is stored, "
                        "so the difference with a named run is what names cost")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--via-broker", action="store_true",
                      help="call through the broker, not by the peer links (a remote client's path)")
    path.add_argument("--curve", action="store_true",
                      help="call as a client on another machine: TCP and CurveZMQ to the broker")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency {args.concurrency}: at least one call must be in flight")
    speed = [machine_speed()]  # (again after the run: the VM's speed drifts)
    with serving(CONFIG + (CURVE if args.curve else ""),
                 prepare=make_keys if args.curve else None) as d:
        time.sleep(1)
        procs = [psutil.Process(os.getpid()), psutil.Process(d.proc.pid),
                 *psutil.Process(d.proc.pid).children(recursive=True)]
        frontend, keys = d.frontend, {}
        if args.curve:
            frontend = f"tcp://127.0.0.1:{d.port}"
            keys = {"server_key": str(d.root / "keys" / "broker.key"),
                    "client_key": str(d.root / "allowed" / "client.key_secret")}
        gc_before = asyncio.run(gc_pauses(d.frontend))
        before = thread_stats(procs)
        seconds = asyncio.run(drive(frontend, args.calls, args.existing, args.rpc, args.unnamed,
                                    args.concurrency, args.via_broker or args.curve, **keys))
        after = thread_stats(procs)
        time.sleep(1.5)  # (each slot reports with its heartbeat, once a second)
        gc_after = asyncio.run(gc_pauses(d.frontend))

    def per(i: int, scale: float, digits: int, least: float) -> dict[str, float]:
        """Figure ``i`` of each thread, its growth over the run per call (largest first)."""
        zero = [0.0, 0.0, 0.0]
        got = {f"{role}/{name}": round((v[i] - before.get((role, name), zero)[i]) * scale
                                       / args.calls, digits)
               for (role, name), v in after.items()}
        return {k: v for k, v in sorted(got.items(), key=lambda kv: -kv[1]) if v >= least}

    per_call = per(0, 1e6, 1, 0.1)
    result = {"calls": args.calls, "existing": args.existing or None,
              "concurrency": args.concurrency,
              "call": "increment()" if args.rpc else "fetch POST /inc",
              "objects": "by unique id" if args.unnamed else "by name",
              "path": "CurveZMQ over TCP to the broker" if args.curve
              else "broker" if args.via_broker else "peer links",
              "per_s": round(args.calls / seconds), "cpu_us_per_call": per_call,
              "cpu_us_per_call_total": round(sum(per_call.values()), 1),
              # how many of the machine's cores the run kept busy (the rest idle: hand-offs)
              "cores_used": round(sum(per_call.values()) * args.calls / 1e6 / seconds, 2),
              # time runnable but waiting for a CPU, and how often another thread took the
              # CPU from it (a woken thread preempting the one that woke it, mostly)
              "runqueue_wait_us_per_call": per(1, 1e6, 1, 0.1),
              "preempted_per_call": per(2, 1.0, 3, 0.001),
              # the object processes' garbage collections (inside their threads' CPU above),
              # by generation: how many, and their pauses' time per call
              "gc_collections": {g: int(n - gc_before.get(g, [0, 0.0])[0])
                                 for g, (n, _) in sorted(gc_after.items())},
              "gc_us_per_call": {g: round((t - gc_before.get(g, [0, 0.0])[1]) * 1e6 / args.calls, 1)
                                 for g, (_, t) in sorted(gc_after.items())},
              "python_10m_additions_s": [*speed, machine_speed()]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['per_s']} calls/s; CPU per call {result['cpu_us_per_call_total']} µs:")
        waits, preempted = result["runqueue_wait_us_per_call"], result["preempted_per_call"]
        for k, v in per_call.items():
            print(f"  {v:8.1f} µs  {k}  (waited for a CPU {waits.get(k, 0.0):.1f} µs, "
                  f"preempted {preempted.get(k, 0.0):.3f} times)")
        print(f"  {result['cores_used']} cores busy of {os.cpu_count()}")
        print("  garbage collections in the object processes: " + (", ".join(
            f"generation {g}: {n} ({result['gc_us_per_call'][g]:.1f} µs a call)"
            for g, n in result["gc_collections"].items() if n) or "none"))
        print("  machine speed: 10M Python additions in {} s before, {} s after".format(
            *result["python_10m_additions_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
