#!/usr/bin/env python3
"""Many objects: write N distinct objects once each; watch memory, eviction and `durable status`.

    python scripts/many_objects.py [--objects 1000000] [--idle-timeout 5] [--rpc] [--unnamed]
                                   [--json]

Starts `durable serve`, writes one key into each of N objects (64 calls in
flight), samples the RSS of every process and times `durable status` as it
goes, then reports the peak RSS, the active objects at the peak and the
memory per active and per evicted object (from the object processes' RSS
against their active and evicted counts), the slots' files on disk once the
objects are evicted (DuckDB's files, their WALs, the commit logs; in all and
per object), the CPU a write cost each role (the daemon's processes, this
client) and the cores used, the object processes' garbage collections (by generation:
how many, and their pauses), and each write's latency (p50, p99, p99.9, the longest).
Objects are reached by name (``id_from_name``, whose name is stored with each
object), or with ``--unnamed`` by unique id. A write is tried again on a broken stub or
an overloaded slot (``retries``, by error; the longest write says how many attempts it
took and when it ended); one that fails every attempt is counted in ``failed_writes``,
not in the rate, and fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import _cpu_by_process, _growth_by_role, _role, ms, pct  # noqa: E402
from harness import active_objects, gc_pauses, machine_speed, serving  # noqa: E402

import durable  # noqa: E402


def rss_by_role(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            role = _role(p.cmdline())
            out[role] = out.get(role, 0) + p.memory_info().rss
        except psutil.Error:
            pass
    return out


def cpu_by_process(daemon_pid: int) -> dict[tuple[str, int], float]:
    """CPU seconds (user + system) so far by (role, pid): the daemon's processes (bench.py's
    reader) and this program, the client (not the `durable status` runs it waits for)."""
    out = _cpu_by_process([daemon_pid])
    t = psutil.Process().cpu_times()
    out[("client", os.getpid())] = t.user + t.system
    return out


def disk_use(data: Path) -> dict[str, int]:
    """The slots' files on disk, by kind: DuckDB's main files (with the blocks a checkpoint
    freed for reuse), their WALs, and the commit logs' segments."""
    out = {"duckdb": 0, "duckdb_wal": 0, "commit_log": 0}
    for f in data.glob("slot-*.duckdb"):
        out["duckdb"] += f.stat().st_size
    for f in data.glob("slot-*.duckdb.wal"):
        out["duckdb_wal"] += f.stat().st_size
    for f in data.glob("slot-*.log/*.seg"):
        out["commit_log"] += f.stat().st_size
    return out


#: tries of one write, 50 ms apart, on a broken stub or an overloaded slot
ATTEMPTS = 20


async def write_all(frontend: str, n: int, daemon_pid: int, status: Callable[[], dict], samples: list,
                    latencies: list[float], rpc: bool = False, unnamed: bool = False,
                    trouble: dict[str, Any] | None = None) -> float:
    """``status`` reads ``durable status --json`` (every 5 s, timed). ``trouble`` gets the
    retries by error, the writes that failed every attempt, and the longest write (its
    seconds, attempts, and when it ended, in seconds from the start)."""
    trouble = {} if trouble is None else trouble
    retries: dict[str, int] = trouble.setdefault("retries", {})
    trouble.setdefault("failed_writes", 0)
    async with durable.connect(frontend, timeout=60) as c:
        ns = c.namespace("COUNTER")
        next_i = 0
        t0 = time.monotonic()

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                t = time.perf_counter()  # (a write's latency includes its retries)
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        stub = ns.get(ns.new_unique_id() if unnamed
                                      else ns.id_from_name(f"obj-{i}"))
                        if rpc:
                            await stub.increment()
                        else:
                            await stub.fetch("http://do/inc", method="POST")
                        latencies.append(took := time.perf_counter() - t)
                        if took > trouble.get("longest_write", {}).get("seconds", 0.0):
                            trouble["longest_write"] = {
                                "seconds": round(took, 3), "attempts": attempt,
                                "ended_at_s": round(time.monotonic() - t0, 1)}
                        break
                    except (durable.StubBrokenError, durable.OverloadedError) as e:
                        retries[type(e).__name__] = retries.get(type(e).__name__, 0) + 1
                        await asyncio.sleep(0.05)
                else:
                    trouble["failed_writes"] += 1

        async def sampler() -> None:
            while next_i < n:
                await asyncio.sleep(5)
                t = time.monotonic()
                active = active_objects(await asyncio.to_thread(status))
                took = time.monotonic() - t
                samples.append({"at": round(t - t0, 1), "written": next_i,
                                "rss": rss_by_role(daemon_pid),
                                "active": active, "status_seconds": round(took, 2)})

        # The rate is over the writes: the sampler, asleep for up to 5 s when the last write
        # ends, is not waited for (the rate of a million used to include that tail, ~2.5 s).
        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*[worker() for _ in range(64)])
        elapsed = time.monotonic() - t0
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=1_000_000)
    p.add_argument("--idle-timeout", type=float, default=5.0)
    p.add_argument("--rpc", action="store_true",
                   help="write through the Counter's increment() method on the stub, not fetch")
    p.add_argument("--unnamed", action="store_true",
                   help="objects by unique id, not by name: no name is stored with them")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    config = f"""
data_dir = "{{data}}"
slots = 2
idle_timeout = {args.idle_timeout}
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    samples: list = []
    latencies: list[float] = []  # (each acknowledged write's, seconds)
    trouble: dict[str, Any] = {}
    speed = [machine_speed()]  # (again after the run: the VM's speed drifts)
    with serving(config) as d:
        time.sleep(1)
        base = rss_by_role(d.proc.pid)
        cpu_before = cpu_by_process(d.proc.pid)
        gc_before = asyncio.run(gc_pauses(d.frontend))
        elapsed = asyncio.run(write_all(d.frontend, args.objects, d.proc.pid, d.status, samples,
                                       latencies, args.rpc, args.unnamed, trouble))
        cpu_after = cpu_by_process(d.proc.pid)
        gc_after = asyncio.run(gc_pauses(d.frontend))  # (the heartbeats' figures: ~1 s late)
        # Eviction runs a quarter timeout apart, and `durable status` hears of it once a second:
        # read until every object is gone, or twice the timeout and 5 s have passed.
        deadline = time.monotonic() + args.idle_timeout * 2 + 5
        time.sleep(args.idle_timeout * 1.5 + 1)
        final = d.status()
        while active_objects(final) and time.monotonic() < deadline:
            time.sleep(0.5)
            final = d.status()
        after = rss_by_role(d.proc.pid)
        disk = disk_use(d.data)
        alive = d.proc.poll() is None
    peak = max(samples, key=lambda s: sum(s["rss"].values())) if samples else None
    per_active = None
    if peak and peak["active"]:
        per_active = round((peak["rss"].get("objectproc", 0) - base.get("objectproc", 0)) / peak["active"])
    result = {
        "objects": args.objects, "call": "increment()" if args.rpc else "fetch POST /inc",
        "by": "unique id" if args.unnamed else "name",
        # (acknowledged writes only: one that failed all its attempts is not counted)
        "seconds": round(elapsed, 2), "writes_per_s": round(len(latencies) / elapsed),
        **trouble,
        "rss_start_mib": round(sum(base.values()) / 2**20, 1),
        "rss_peak_mib": round(sum(peak["rss"].values()) / 2**20, 1) if peak else None,
        "active_at_peak": peak["active"] if peak else None,
        "bytes_per_active_object": per_active,
        "rss_after_eviction_mib": round(sum(after.values()) / 2**20, 1),
        "rss_by_role_start_mib": {k: round(v / 2**20, 1) for k, v in base.items()},
        "rss_by_role_after_mib": {k: round(v / 2**20, 1) for k, v in after.items()},
        "bytes_per_evicted_object": round((after.get("objectproc", 0) - base.get("objectproc", 0)) / args.objects),
        "active_after": active_objects(final),
        "status_seconds_max": max((s["status_seconds"] for s in samples), default=None),
        "daemon_alive": alive,
        # (after the wait for eviction; the WAL and the log shrink at the next checkpoint)
        "disk_mib": {k: round(v / 2**20, 1) for k, v in disk.items()},
        "disk_bytes_per_object": round(sum(disk.values()) / args.objects),
        # (a write waits for every object of its slot: an eviction scan, a long collection)
        # (what the writes cost, by role: a slow VM raises these, a daemon that waits does not)
        # (a process that restarted during the run is left out)
        "cpu_us_per_write": _growth_by_role(cpu_before, cpu_after, 1e6 / max(1, len(latencies)), 1),
        "cores_used": round(_growth_by_role(cpu_before, cpu_after, 1.0, 3)["total"] / elapsed, 2),
        "write_ms": {k: round(ms(pct(latencies, q)), 2) if latencies else None
                     for k, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))},
        # (the object processes' collections during the writes, by generation: how many,
        # and the seconds the slots stood still for them, both slots summed)
        "gc_pauses": {g: {"collections": int(n - gc_before.get(g, [0, 0.0])[0]),
                          "seconds": round(t - gc_before.get(g, [0, 0.0])[1], 4)}
                      for g, (n, t) in sorted(gc_after.items())},
        "python_10m_additions_s": [*speed, machine_speed()],
        # (the rate between samples: does it fall as the files and their indexes grow?)
        "rate_per_s_over_time": [
            [b["at"], round((b["written"] - a["written"]) / max(0.1, b["at"] - a["at"]))]
            for a, b in itertools.pairwise([{"at": 0.0, "written": 0}, *samples])],
    }
    print(json.dumps(result, indent=2) if args.json else result)
    return 0 if alive and not trouble["failed_writes"] else 1


if __name__ == "__main__":
    sys.exit(main())
