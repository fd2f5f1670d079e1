#!/usr/bin/env python3
"""Benchmarks for durable; JSON on stdout.

    python scripts/bench.py storage [--quick] [--repeat N]
    python scripts/bench.py rpc [--quick] [--repeat N] [--slots N] [--broker-path]
    python scripts/bench.py http [--quick] [--repeat N] [--slots N] [--http-processes N]
    python scripts/bench.py backup [--quick] [--repeat N] [--backup-mib 1024]
    python scripts/bench.py alarms [--quick] [--repeat N]
    python scripts/bench.py websockets [--quick] [--repeat N]
    python scripts/bench.py testing [--quick] [--repeat N]
    python scripts/bench.py metrics [--quick] [--repeat N]
    python scripts/bench.py idle [--quick] [--repeat N] [--workerd PATH]
    python scripts/bench.py evict-tail [--quick] [--repeat N] [--cycles 4]
    python scripts/bench.py calls [--quick] [--repeat N]

``storage`` measures the storage engine in-process (no sockets), together
with this machine's floors (an fsync of a 4 KiB append and of a 100-byte
write into a preallocated file, one DuckDB single-row commit), so that
ratios can be compared within one run on a noisy machine.
``rpc`` starts a real broker and object processes on ipc endpoints and calls
them through the async client: sequential no-op fetch, no-op fetch with 64 in
flight over 100 objects, a durable counter increment (get + put, response
after durability) both ways, and in the same run two floors: the bare 2-hop
zmq echo (DEALER -> ROUTER/ROUTER broker loop -> DEALER worker, sync loops)
the 1-hop one (DEALER -> ROUTER worker: what a call straight to the object process
would cost), each with the CPU of every process per round trip, and the commit log's
fsync (100 bytes into a preallocated file).

``http`` runs ``durable serve`` with its HTTP gateway and drives it from a
separate load-generator process (asyncio, raw keep-alive sockets, one request
in flight per connection): no-op and durable-counter calls, sequential and
with 64 connections over 100 objects.

``backup`` runs ``durable serve`` (2 slots), writes ``--backup-mib`` of random
24 KB values, then runs ``durable backup`` while a prober makes small reads and
writes on both slots: how long the backup took, and the longest any call waited
during it (against the same prober before it).

``alarms`` runs a broker and one object process: how late alarms fire (idle,
and beside 64 calls in flight), how many fire per second when 20,000 come due at
once (each handler a durable write that also deletes its alarm), and with
1,000,000 alarms pending (written into the slot's file while the daemon is down):
the object process's memory against the idle daemon's, its start-up time, and
setting one more against a ``put``.

``websockets`` runs ``durable serve`` (1 slot, 1 gateway process, objects evicted
after 2 s idle) and drives it from a separate process of aiohttp WebSocket
clients: 10,000 sockets over 100 rooms left idle until every room is evicted
(hibernated), with the gateway's and the object process's memory per socket
against the idle daemon's; the echo round trip (client -> object -> client) on
an idle daemon, through the gateway and through the Python client; one message
broadcast to 1,000 sockets of one room (until the last delivery); and
sustained fan-out (messages delivered per second).

``testing`` measures ``durable.testing`` in this process: how long a ``Runtime``
takes to start (and close), sequential no-op method calls and durable counter
increments per second, and a pytest run (a subprocess) of 1,000 small tests
that each get a fresh runtime from the ``durable_runtime`` fixture.

``metrics`` runs two daemons side by side, one with ``[metrics]`` on (and scraped
every second, as Prometheus would, faster), one without, and alternates rounds
of sequential no-op method calls between them: p50 and calls/s of each, and
their ratios.

``idle`` runs ``durable serve`` (its defaults, one Counter namespace), makes a few requests,
lets it settle 10 s and then measures 30 s of nothing: the CPU (% of one core) and the wake-ups
a second (voluntary context switches of every thread) of each process role; with
``--workerd PATH``, the same of workerd.

``evict-tail`` runs ``durable serve`` (2 slots, ``idle_timeout`` 20 s) and, each of
``--cycles`` times, makes new objects for 5 s, then times the no-op with 64 connections over
100 other objects twice: while nothing is due for eviction, and as the new ones go idle. The
figure is each cycle's difference of the two p99s (what eviction adds to other calls' tail).

``calls`` runs ``durable serve`` (2 slots, HTTP in the object processes) under ``vs-workerd``'s
64-connection counter loads (on 100 objects, spread, over 10,000 existing objects, and every
request to a new object) with cProfile switched on in each object process's main thread for
each load (``scripts/cprofile_hook``): the Python calls a request in all, the most called
functions, and the functions whose calls differ most from the counter on 100 objects'.

With ``--repeat N`` every figure is the median of N runs (all runs are kept
under ``"runs"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


def ms(x: float) -> float:
    return round(x * 1000, 4)


def us(x: float) -> float:
    return round(x * 1e6, 3)


# -- floors ---------------------------------------------------------------------------
def floor_fsync(directory: Path, n: int, *, size: int = 4096,
                preallocated: bool = False) -> dict[str, float]:
    """``write + fdatasync`` of ``size`` bytes: appended, or in place as the commit log does."""
    fd = os.open(directory / f"fsync-probe-{size}-{preallocated}",
                 os.O_WRONLY | os.O_CREAT | (0 if preallocated else os.O_APPEND), 0o600)
    block = os.urandom(size)
    times = []
    try:
        if preallocated:
            os.posix_fallocate(fd, 0, size * n)
            os.fsync(fd)
        for i in range(n):
            t = time.perf_counter()
            if preallocated:
                os.pwrite(fd, block, i * size)
            else:
                os.write(fd, block)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return {"p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99))}


def floor_duckdb_commit(directory: Path, n: int) -> dict[str, float]:
    import duckdb

    con = duckdb.connect(str(directory / "probe.duckdb"), config={"threads": 1})
    con.execute("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB)")
    times = []
    for i in range(n):
        t = time.perf_counter()
        con.execute("BEGIN")
        con.execute("INSERT INTO t VALUES ($1, $2) ON CONFLICT DO UPDATE SET v = excluded.v",
                    [str(i % 10).encode(), b"x" * 16])
        con.execute("COMMIT")
        times.append(time.perf_counter() - t)
    con.close()
    return {"p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99))}


# -- storage workloads ------------------------------------------------------------------
async def sequential_put(directory: Path, n: int, *, inline: bool = False) -> dict[str, float]:
    """put + sync in a loop; ``inline`` lets sync commit on the loop thread, as a quiet
    object process does (otherwise the writer thread commits, as under concurrency)."""
    from durable.objectproc.storage import ObjectStorage, SlotStore

    slot = SlotStore(directory, 0)
    if inline:
        slot.commit_inline_when = lambda: True
    s = ObjectStorage(slot, "BENCH", "seq")
    times = []
    for i in range(n):
        t = time.perf_counter()
        await s.put("n", i)
        await s.sync()
        times.append(time.perf_counter() - t)
    await slot.close()
    return {"n": n, "p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99))}


def preload(directory: Path, rows: int, objects_with_100_keys: int) -> list[str]:
    """Fill a slot's DuckDB file directly (bulk), as if objects had written before."""
    from durable.codec import encode
    from durable.objectproc.storage.duck import DuckStore

    duck = DuckStore(directory / "slot-0.duckdb")
    value = encode({"payload": "x" * 40, "n": 1})
    batch: dict[bytes, tuple[bytes, bytes | None]] = {}
    cold = [f"cold{i}" for i in range(objects_with_100_keys)]
    for oid in cold:
        obj = f"BENCH/{oid}".encode()
        for k in range(100):
            batch[obj + f"/key{k:03d}".encode()] = (obj, value, None)
    done = len(batch)
    i = 0
    while done < rows:
        obj = f"BENCH/filler{i}".encode()
        for k in range(10):
            batch[obj + f"/k{k}".encode()] = (obj, value, None)
        done += 10
        i += 1
        if len(batch) >= 100_000:
            duck.apply(batch, set(), 0)
            batch = {}
    if batch:
        duck.apply(batch, set(), 0)
    duck._con.execute("CHECKPOINT")
    duck.close()
    return cold


async def concurrent_puts(directory: Path, writers: int, seconds: float) -> dict[str, float]:
    from durable.objectproc.storage import ObjectStorage, SlotStore

    slot = SlotStore(directory, 0)
    waits: list[float] = []
    stop = time.monotonic() + seconds

    async def writer(i: int) -> None:
        s = ObjectStorage(slot, "BENCH", f"w{i}")
        n = 0
        while time.monotonic() < stop:
            t = time.perf_counter()
            await s.put(f"k{n % 100}", n)
            await s.sync()
            waits.append(time.perf_counter() - t)
            n += 1

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(writers):
            tg.create_task(writer(i))
    elapsed = time.perf_counter() - t0
    stored = slot.duck.row_count()
    await slot.close()
    return {"writers": writers, "puts": len(waits), "puts_per_s": round(len(waits) / elapsed),
            "wait_p50_ms": ms(pct(waits, 0.5)), "wait_p99_ms": ms(pct(waits, 0.99)),
            "stored_rows": stored}


async def reads(directory: Path, cold_ids: list[str], n: int) -> dict[str, Any]:
    from durable.objectproc.storage import ObjectStorage, SlotStore

    slot = SlotStore(directory, 0)
    # Cold activation: a fresh activation lists its 100 keys from DuckDB.
    cold = []
    for oid in cold_ids:
        t = time.perf_counter()
        s = ObjectStorage(slot, "BENCH", oid)
        got = await s.list()
        cold.append(time.perf_counter() - t)
        assert len(got) == 100
    # Cached get and warm list on the last one.
    await s.get("key050")
    t = time.perf_counter()
    for _ in range(n):
        await s.get("key050")
    cached_get = (time.perf_counter() - t) / n
    lists = []
    for _ in range(max(20, n // 100)):
        t = time.perf_counter()
        await s.list()
        lists.append(time.perf_counter() - t)
    # Cold point read (cache miss to DuckDB).
    misses = []
    for oid in cold_ids[: min(len(cold_ids), 200)]:
        s = ObjectStorage(slot, "BENCH", oid)
        t = time.perf_counter()
        await s.get("key007")
        misses.append(time.perf_counter() - t)
    await slot.close()
    return {"cold_activation_100_keys_p50_ms": ms(pct(cold, 0.5)),
            "cold_activation_100_keys_p99_ms": ms(pct(cold, 0.99)),
            "cached_get_us": us(cached_get),
            "list_100_keys_cached_p50_ms": ms(pct(lists, 0.5)),
            "cold_point_get_p50_ms": ms(pct(misses, 0.5))}


async def recovery(directory: Path, records: int) -> dict[str, float]:
    """Write records that DuckDB never gets, 'crash', and time the replay on reopen."""
    from durable.objectproc.storage import ObjectStorage, SlotStore

    slot = SlotStore(directory, 0, apply_min_records=10**12, apply_max_delay=10**6)
    objs = [ObjectStorage(slot, "BENCH", f"r{i}") for i in range(100)]
    for i in range(records):
        await objs[i % 100].put(f"k{i % 1000}", i)
        if i % 100 == 99:
            await asyncio.sleep(0)  # end the turn: each put becomes its own record
    for o in objs:
        await o.sync()
    logged = slot.log.last_seq
    slot.abandon()
    slot = SlotStore(directory, 0)
    elapsed = slot.recovery_seconds  # reading, checking and applying the log, not opening DuckDB
    replayed = slot.replayed
    await slot.close()
    return {"records": replayed, "logged": logged, "seconds": round(elapsed, 4),
            "records_per_s": round(replayed / elapsed)}


async def activation_memory(directory: Path, n: int) -> dict[str, float]:
    from durable.objectproc.storage import ObjectStorage, SlotStore

    slot = SlotStore(directory, 0)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    acts = []
    for i in range(n):
        s = ObjectStorage(slot, "BENCH", f"m{i}")
        await s.put({f"k{j}": j for j in range(10)})
        acts.append(s)
    for s in acts:
        await s.sync()
    await slot.flush()
    gc.collect()
    active = tracemalloc.get_traced_memory()[0] - base
    for s in acts:
        assert s.evict()
    gc.collect()
    idle = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    await slot.close()
    return {"activations": n, "bytes_per_activation_with_10_keys": round(active / n),
            "bytes_per_idle_activation_after_evict": round(idle / n)}


def apply_batches(directory: Path, rows: int, reps: int = 9) -> dict[str, float]:
    """The applier's batch (upsert of existing keys, one new key, objects kept) over a slot of
    ``rows`` rows: ms per batch by size, medians of ``reps``. DuckDB 2.0's ON CONFLICT was a
    scan of the whole table per batch; a delete by key list and an insert are not."""
    import random

    import pyarrow as pa

    from durable.objectproc.storage.duck import DuckStore
    duck = DuckStore(directory / "slot-0.duckdb")
    try:
        objs = [f"NS/{i:064x}".encode() for i in range(rows // 3)]
        pks = [o + b"/" + k for o in objs for k in (b"a", b"b", b"c")]
        duck.insert_new(pa.table({"pk": pks, "obj": [p[:-2] for p in pks],
                                  "v": [b"1"] * len(pks), "t": [0] * len(pks)}))
        duck.rebuild_objects()
        duck.checkpoint()
        rng = random.Random(1)
        out: dict[str, float] = {}
        seq = 1
        for size in (1, 100, 1000):
            times = []
            for _ in range(reps):
                batch = {p: (p[:-2], b"42", 1) for p in rng.sample(pks, size)}
                batch[b"NS/new%d/a" % seq] = (b"NS/new%d" % seq, b"1", 1)
                t = time.perf_counter()
                duck.apply(batch, set(), seq)
                times.append(time.perf_counter() - t)
                seq += 1
            out[f"batch_{size}_existing_keys_ms"] = ms(statistics.median(times))
        return out
    finally:
        duck.close()


def storage_suite(quick: bool) -> dict[str, Any]:
    from durable.objectproc.collector import Collector

    Collector().start()  # as the object process does at start (its ticks are not run here)
    big_rows = 100_000 if quick else 1_000_000
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        root = Path(tmp)

        def fresh(name: str) -> Path:
            d = root / name
            d.mkdir()
            return d

        out["floor_fsync_4k"] = floor_fsync(fresh("fsync"), 200 if quick else 2000)
        out["floor_fsync_100b_preallocated"] = floor_fsync(
            fresh("fsync-pre"), 200 if quick else 2000, size=100, preallocated=True)
        out["floor_duckdb_single_row_commit"] = floor_duckdb_commit(fresh("duck"), 50 if quick else 300)
        out["apply_batches"] = {"rows": 30_000 if quick else big_rows, **apply_batches(
            fresh("apply"), 30_000 if quick else big_rows, 3 if quick else 9)}
        out["sequential_durable_put"] = asyncio.run(sequential_put(fresh("seq"), 300 if quick else 3000))
        out["sequential_durable_put_inline"] = asyncio.run(
            sequential_put(fresh("seq-inline"), 300 if quick else 3000, inline=True))
        secs = 1.0 if quick else 4.0
        d10k = fresh("c10k")
        preload(d10k, 10_000, 0)
        out["concurrent_durable_puts_10k_rows"] = asyncio.run(concurrent_puts(d10k, 100, secs))
        dbig = fresh("cbig")
        cold = preload(dbig, big_rows, 50 if quick else 300)
        out[f"concurrent_durable_puts_{big_rows // 1000}k_rows"] = asyncio.run(
            concurrent_puts(dbig, 100, secs))
        out["ratio_big_to_10k_throughput"] = round(
            out[f"concurrent_durable_puts_{big_rows // 1000}k_rows"]["puts_per_s"]
            / out["concurrent_durable_puts_10k_rows"]["puts_per_s"], 3)
        out[f"reads_at_{big_rows // 1000}k_rows"] = asyncio.run(reads(dbig, cold, 20_000 if quick else 200_000))
        out["recovery_replay"] = asyncio.run(recovery(fresh("rec"), 20_000 if quick else 200_000))
        out["activation_memory"] = asyncio.run(activation_memory(fresh("mem"), 1000 if quick else 10_000))
    return out


# -- rpc ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def _echo_broker(front: str, back: str) -> None:
    import zmq

    ctx = zmq.Context.instance()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(front)
    b.bind(back)
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    worker = None
    while True:
        events = dict(poller.poll())
        if b in events:
            while True:
                try:
                    frames = b.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 2:
                    worker = frames[0]
                else:
                    f.send_multipart(frames[1:])
        if f in events and worker is not None:
            while True:
                try:
                    frames = f.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                b.send_multipart([worker, *frames])


def _echo_worker(back: str) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([b"ready"])
    while True:
        s.send_multipart(s.recv_multipart())


def _echo_direct(front: str) -> None:
    """The 1-hop echo: a worker that binds its own ROUTER (a call straight to the object
    process, no broker between)."""
    import zmq

    s = zmq.Context.instance().socket(zmq.ROUTER)
    s.bind(front)
    while True:
        s.send_multipart(s.recv_multipart())


def zmq_echo_floor(tmp: Path, n: int, hops: int = 2) -> dict[str, float]:
    """Sequential round trips of a 40-byte message through ``hops`` zmq hops each way (2:
    DEALER -> ROUTER broker loop -> DEALER worker, as calls travel today; 1: DEALER ->
    ROUTER worker), with the CPU every process spent per round trip."""
    import subprocess

    import psutil
    import zmq

    front, back = f"ipc://{tmp}/echo-f{hops}.sock", f"ipc://{tmp}/echo-b{hops}.sock"
    if hops == 2:
        procs = [subprocess.Popen([sys.executable, __file__, "_echo-broker", front, back]),
                 subprocess.Popen([sys.executable, __file__, "_echo-worker", back])]
    else:
        procs = [subprocess.Popen([sys.executable, __file__, "_echo-direct", front])]
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(front)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
        for _ in range(50):  # until the worker is known
            s.send_multipart([b"warm", b"x"])
            try:
                s.setsockopt(zmq.RCVTIMEO, 200)
                s.recv_multipart()
                break
            except zmq.Again:
                continue
        s.setsockopt(zmq.RCVTIMEO, 10_000)
        while True:  # drop stray warm-up answers
            try:
                s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        times = []
        watched = [psutil.Process(), *(psutil.Process(p.pid) for p in procs)]
        cpu = sum(sum(p.cpu_times()[:2]) for p in watched)
        # (and for 0.5 s at least: CPU times count in clock ticks of 10 ms, and 500 round
        # trips of --quick once measured 0.0 in a CI-like run)
        until = time.perf_counter() + 0.5
        while len(times) < n or time.perf_counter() < until:
            t = time.perf_counter()
            s.send_multipart([b"call", b"x" * 40])
            s.recv_multipart()
            times.append(time.perf_counter() - t)
        cpu = sum(sum(p.cpu_times()[:2]) for p in watched) - cpu
        n = len(times)
        s.close(linger=0)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {"p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99)),
            "cpu_ms_per_round_trip": round(cpu / n * 1000, 4)}


def _sink(front: str) -> None:
    """A ROUTER that reads and drops every message (for :func:`zmq_send_floor`)."""
    import zmq

    s = zmq.Context.instance().socket(zmq.ROUTER)
    s.setsockopt(zmq.RCVHWM, 0)
    s.bind(front)
    while True:
        s.recv_multipart()


def zmq_send_floor(tmp: Path, n: int) -> dict[str, float]:
    """The sending thread's CPU for one 3-frame message on a DEALER (to another process's
    ROUTER over ipc): sent back to back, and alone, 1 ms after the last (ZMQ's I/O thread
    has gone to sleep and the send wakes it). Each hop of a call pays the second on its way
    out, and a call to another slot's object makes two such hops (docs/messaging.md)."""
    import subprocess

    import zmq

    front = f"ipc://{tmp}/sink.sock"
    proc = subprocess.Popen([sys.executable, __file__, "_echo-sink", front])
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(front)
        time.sleep(0.3)  # (connected)
        frames = [b"c" * 20, b"h" * 100, b"b" * 50]
        out: dict[str, float] = {}
        for label, pause in (("back_to_back", 0.0), ("alone", 0.001)):
            spent = []
            for _ in range(n):
                if pause:
                    until = time.perf_counter() + pause
                    while time.perf_counter() < until:  # (spinning: the thread stays awake)
                        pass
                t = time.thread_time()
                s.send(frames[0], zmq.SNDMORE)
                s.send(frames[1], zmq.SNDMORE)
                s.send(frames[2])
                spent.append(time.thread_time() - t)
            out[f"{label}_cpu_us"] = us(pct(spent, 0.5))
        s.close(linger=0)
    finally:
        proc.kill()
        proc.wait()
    return out


class Daemon:
    """A broker and object processes, as ``durable serve`` will run them (killed on exit)."""

    def __init__(self, tmp: Path, slots: int) -> None:

        from durable.ids import load_or_create_secret
        from durable.supervisor.config import from_dict, write_settings

        run = tmp / "run"
        run.mkdir(mode=0o700)
        data = tmp / "data"
        load_or_create_secret(data)
        (data / "run").mkdir(mode=0o700)  # (as `durable serve` makes it: the peer sockets)
        self.frontend, backend = f"ipc://{run}/broker.sock", f"ipc://{run}/workers.sock"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))
        ns = {"NOOP": "bench_objects:Noop", "COUNTER": "durable.examples.counter:Counter",
              "RELAY": "bench_objects:Relay", "ALARM": "bench_objects:AlarmBench"}
        config = from_dict({"data_dir": str(data), "slots": slots,
                            "broker": {"endpoint": self.frontend, "workers_endpoint": backend},
                            "namespaces": {n: {"class": c} for n, c in ns.items()}}, "bench.py")
        settings = run / "settings.json"
        write_settings(config, settings)
        self._env = env
        self._slots = slots
        self.data = data
        self._common = ["--settings", str(settings), "--log-level", "WARNING"]
        self.start()

    def start_slot(self, slot: int) -> Any:
        import subprocess

        return subprocess.Popen([sys.executable, "-m", "durable.objectproc", *self._common,
                                 "--slot", str(slot)], env=self._env)

    def stop(self) -> None:
        self.close()

    def start(self) -> None:
        """Start the broker and every slot again on the same settings and data."""
        import subprocess

        self.procs = [subprocess.Popen([sys.executable, "-m", "durable.broker", *self._common],
                                       env=self._env)]
        for slot in range(self._slots):
            self.procs.append(self.start_slot(slot))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


async def rpc_measure(endpoint: str, quick: bool, direct: bool = True) -> dict[str, Any]:
    import durable

    out: dict[str, Any] = {}
    async with durable.connect(endpoint, timeout=30, direct=direct) as client:
        deadline = time.monotonic() + 30
        while not all(s["up"] for s in (await client.statistics())["slots"]) or (
                client.peers is not None and client.peers.statistics()["peer_links_up"]
                < len(client.peers.links)):  # (stubs made before the links keep the broker)
            if time.monotonic() > deadline:
                raise RuntimeError("object processes did not register")
            await asyncio.sleep(0.05)
        n = 300 if quick else 3000
        secs = 1.0 if quick else 4.0

        def fetch(path: str, method: str) -> Any:
            return lambda stub: stub.fetch(path, method=method)

        async def sequential(ns: str, call: Any) -> dict[str, float]:
            stub = client.namespace(ns).get_by_name("seq")
            for _ in range(50):
                await call(stub)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await call(stub)
                times.append(time.perf_counter() - t)
            return {"n": n, "p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99))}

        async def interleaved(ns: str, a: Any, b: Any) -> tuple[dict[str, float], dict[str, float]]:
            """``a`` and ``b`` on one stub, alternately: drift in the machine hits both alike."""
            stub = client.namespace(ns).get_by_name("seq")
            for _ in range(50):
                await a(stub)
                await b(stub)
            ta, tb = [], []
            for _ in range(n):
                for call, times in ((a, ta), (b, tb)):
                    t = time.perf_counter()
                    await call(stub)
                    times.append(time.perf_counter() - t)
            return tuple({"n": n, "p50_ms": ms(pct(t, 0.5)), "p99_ms": ms(pct(t, 0.99))}
                         for t in (ta, tb))

        async def in_flight(ns: str, *calls: Any, width: int = 64, objects: int = 100,
                            blocks: int = 1) -> list[dict[str, float]]:
            """Each call kind with ``width`` in flight over ``objects`` objects for ``secs``
            in all: in ``blocks`` turns, alternating kinds, when there are several."""
            space = client.namespace(ns)
            stubs = [space.get_by_name(f"o{i}") for i in range(objects)]
            for call in calls:
                await asyncio.gather(*[call(s) for s in stubs])
            times: list[list[float]] = [[] for _ in calls]
            spent = [0.0 for _ in calls]
            for _ in range(blocks):
                for j, call in enumerate(calls):
                    stop = time.monotonic() + secs / blocks

                    async def worker(k: int, call: Any = call, out: list = times[j],
                                     stop: float = stop) -> None:
                        i = k
                        while time.monotonic() < stop:
                            t = time.perf_counter()
                            await call(stubs[i % objects])
                            out.append(time.perf_counter() - t)
                            i += width

                    t0 = time.perf_counter()
                    await asyncio.gather(*[worker(k) for k in range(width)])
                    spent[j] += time.perf_counter() - t0
            return [{"in_flight": width, "objects": objects, "calls": len(t),
                     "per_s": round(len(t) / e), "p50_ms": ms(pct(t, 0.5)),
                     "p99_ms": ms(pct(t, 0.99))} for t, e in zip(times, spent, strict=True)]

        # Each fetch figure beside the same call as a method on the stub (await stub.noop(),
        # await stub.increment()), measured right after it: the same state of the process.
        noop, inc = fetch("http://do/", "GET"), fetch("http://do/inc", "POST")
        out["noop_sequential"], out["method_noop_sequential"] = await interleaved(
            "NOOP", noop, lambda s: s.noop())
        out["noop_64_in_flight_100_objects"], out["method_noop_64_in_flight_100_objects"] = \
            await in_flight("NOOP", noop, lambda s: s.noop(), blocks=4)
        out["counter_sequential"], out["method_counter_sequential"] = await interleaved(
            "COUNTER", inc, lambda s: s.increment())
        out["counter_64_in_flight_100_objects"], = await in_flight("COUNTER", inc)
        # Object to object: a call out of an object, and the same call after a write (it
        # leaves once the write is durable: the output gate).
        out["object_call_sequential"] = await sequential("RELAY", fetch("http://do/", "GET"))
        out["object_write_then_call_sequential"] = await sequential("RELAY",
                                                                    fetch("http://do/", "POST"))
    return out


def codec_call_cost(n: int) -> dict[str, float]:
    """Encoding and decoding a method call whose argument is a 1 KB dict (µs, median)."""
    from durable.protocol.messages import decode_method_call, encode_method_call

    arg = {f"key{i:02d}": "v" * 16 for i in range(40)}
    head, body = encode_method_call("update", (arg,), {})
    enc, dec = [], []
    for _ in range(n):
        t = time.perf_counter()
        encode_method_call("update", (arg,), {})
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode_method_call(head, body)
        dec.append(time.perf_counter() - t)
    return {"bytes": len(body), "encode_p50_us": us(pct(enc, 0.5)),
            "decode_p50_us": us(pct(dec, 0.5))}


def rpc_suite(quick: bool, slots: int, direct: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        root = Path(tmp)
        out: dict[str, Any] = {"slots": slots, "direct": direct}
        out["floor_zmq_2hop_echo"] = zmq_echo_floor(root, 500 if quick else 5000)
        out["floor_zmq_1hop_echo"] = zmq_echo_floor(root, 500 if quick else 5000, hops=1)
        out["floor_zmq_send"] = zmq_send_floor(root, 300 if quick else 3000)
        fdir = root / "fsync"
        fdir.mkdir()
        out["floor_fsync_100b_preallocated"] = floor_fsync(fdir, 300 if quick else 3000, size=100,
                                                           preallocated=True)
        daemon = Daemon(root, slots)
        try:
            out.update(asyncio.run(rpc_measure(daemon.frontend, quick, direct)))
        finally:
            daemon.close()
        # What a durable increment adds to a no-op call; the fsync floor above is its bulk.
        out["counter_minus_noop_p50_ms"] = round(
            out["counter_sequential"]["p50_ms"] - out["noop_sequential"]["p50_ms"], 4)
        # Methods against fetch, same run: a ratio <= 1 means the method call is no slower.
        out["method_vs_fetch_noop_p50"] = round(
            out["method_noop_sequential"]["p50_ms"] / out["noop_sequential"]["p50_ms"], 3)
        out["method_vs_fetch_noop_per_s"] = round(
            out["method_noop_64_in_flight_100_objects"]["per_s"]
            / out["noop_64_in_flight_100_objects"]["per_s"], 3)
        out["method_vs_fetch_counter_p50"] = round(
            out["method_counter_sequential"]["p50_ms"] / out["counter_sequential"]["p50_ms"], 3)
        out["call_codec_1kb_dict"] = codec_call_cost(300 if quick else 3000)
        # The output gate's price: a write then a call, against the call plus one fsync.
        plain = out["object_call_sequential"]["p50_ms"]
        fsync = out["floor_fsync_100b_preallocated"]["p50_ms"]
        out["gate_write_then_call_vs_call_plus_fsync"] = round(
            out["object_write_then_call_sequential"]["p50_ms"] / (plain + fsync), 3)
    return out


# -- http -------------------------------------------------------------------------------
async def _http_conn(host: str, port: int, reqs: list[bytes], stop: float,
                     n: int | None, times: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while (n is None and time.monotonic() < stop) or (n is not None and i < n):
            t = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response {head[:60]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            times.append(time.perf_counter() - t)
            i += 1
    finally:
        writer.close()


def _http_load(host: str, port: int, ns: str, path: str, method: str, conns: int, objects: int,
               secs: float, n: int | None, prefix: str = "", per_conn: int | None = None
               ) -> dict[str, Any]:
    """Connection ``k`` cycles through objects ``k + j * conns`` (mod ``objects``) for ``j`` in
    ``range(per_conn)``: by default just enough to cover ``objects`` (with 100 objects over 64
    connections, two objects each)."""
    async def run() -> dict[str, Any]:
        times: list[float] = []
        # (made before the clock starts: 400,000 new objects' requests take ~0.15 s to build,
        # which the rate of new objects used to pay inside its window)
        per = [[f"{method} /{ns}/{prefix}o{(k + j * conns) % objects}{path} HTTP/1.1\r\n"
                f"Host: bench\r\nContent-Length: 0\r\n\r\n".encode()
                for j in range(per_conn or max(1, objects // conns + 1))] for k in range(conns)]
        stop = time.monotonic() + secs
        t0 = time.perf_counter()
        await asyncio.gather(*[_http_conn(host, port, per[k], stop, n, times)
                               for k in range(conns)])
        elapsed = time.perf_counter() - t0
        return {"connections": conns, "objects": objects, "requests": len(times),
                "per_s": round(len(times) / elapsed), "p50_ms": ms(pct(times, 0.5)),
                "p99_ms": ms(pct(times, 0.99))}
    return asyncio.run(run())


def http_suite(quick: bool, slots: int, processes: int) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    from harness import serving

    config = f"""
data_dir = "{{data}}"
slots = {slots}
[http]
listen = "127.0.0.1:{{port}}"
processes = {processes}
[namespaces.NOOP]
class = "bench_objects:Noop"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    with serving(config) as d:
        n = 300 if quick else 3000
        secs = 1.0 if quick else 4.0
        out: dict[str, Any] = {"slots": slots, "http_processes": processes}
        with ProcessPoolExecutor(1) as pool:  # the load generator is its own process
            def load(*a: Any) -> dict[str, Any]:
                return pool.submit(_http_load, "127.0.0.1", d.port, *a).result()
            load("NOOP", "/", "GET", 1, 1, 0, 50)  # warm-up
            out["noop_sequential"] = load("NOOP", "/", "GET", 1, 1, 0, n)
            out["noop_64_connections_100_objects"] = load("NOOP", "/", "GET", 64, 100, secs, None)
            out["counter_sequential"] = load("COUNTER", "/inc", "POST", 1, 1, 0, n)
            out["counter_64_connections_100_objects"] = load("COUNTER", "/inc", "POST", 64, 100, secs, None)
    return out


BACKUP_CONFIG = """
data_dir = "{data}"
slots = 2
[broker]
heartbeat = 1.0
[namespaces.KV]
class = "tests.integration.objects:KV"
"""


async def _fill(frontend: str, total: int, value: int) -> int:
    """Write ``total`` bytes of random values over 200 objects, 64 puts in flight."""
    import durable
    writes = total // value
    async with durable.connect(frontend) as client:
        ns = client.namespace("KV")
        stubs = [ns.get(ns.id_from_name(f"fill-{i}")) for i in range(200)]
        next_i = iter(range(writes))

        async def worker() -> None:
            for i in next_i:
                await stubs[i % 200].fetch(f"http://do/?k=v{i}", method="PUT",
                                           body=os.urandom(value), timeout=60)

        await asyncio.gather(*(worker() for _ in range(64)))
    return writes


async def _probe_during(frontend: str, work: Any) -> dict[str, float]:
    """Sequential small writes and reads on both slots while ``work`` runs: how long calls wait."""
    import durable
    lat: list[float] = []
    async with durable.connect(frontend) as client:
        ns = client.namespace("KV")
        stubs = [ns.get(ns.id_from_name(f"probe-{i}")) for i in range(8)]
        i = 0
        while not work.done():
            t = time.perf_counter()
            if i % 2:
                await stubs[i % 8].fetch(f"http://do/?k=p{i}&v={i}", method="POST", timeout=60)
            else:
                await stubs[i % 8].fetch("http://do/?k=p0", timeout=60)
            lat.append(time.perf_counter() - t)
            i += 1
            await asyncio.sleep(0.002)
    return {"calls": len(lat), "p50_ms": ms(pct(lat, 0.5)), "p99_ms": ms(pct(lat, 0.99)),
            "max_ms": ms(max(lat)) if lat else 0.0}


def backup_suite(quick: bool, mib: int) -> dict[str, Any]:
    """`durable backup` of ``mib`` MiB while calls go on: the longest a call waited."""
    from harness import serving
    total = (64 if quick else mib) << 20
    with serving(BACKUP_CONFIG) as d, tempfile.TemporaryDirectory(prefix="durable-backup-") as out:
        t = time.perf_counter()
        writes = asyncio.run(_fill(d.frontend, total, 24_000))
        fill_s = time.perf_counter() - t
        dest = Path(out) / "b"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))

        async def run() -> tuple[dict[str, float], dict[str, Any], float]:
            quiet = asyncio.ensure_future(_probe_during(d.frontend, asyncio.ensure_future(
                asyncio.sleep(3.0))))
            before = await quiet
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "durable.supervisor.cli", "backup", str(dest), "--json",
                "--config", str(d.config), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env=env)
            work = asyncio.ensure_future(proc.communicate())
            during = await _probe_during(d.frontend, work)
            out_b, _ = await work
            if proc.returncode != 0:
                raise RuntimeError("durable backup failed")
            return during | {"before_" + k: v for k, v in before.items()}, orjson.loads(out_b), \
                time.perf_counter() - t0

        during, manifest, seconds = asyncio.run(run())
    return {"backup": {"mib": round(manifest["bytes"] / 2**20, 1), "seconds": round(seconds, 2),
                       "mib_per_s": round(manifest["bytes"] / 2**20 / seconds, 1),
                       "pin_seconds": [s["pin_seconds"] for s in manifest["slot_files"]]},
            "fill": {"writes": writes, "seconds": round(fill_s, 1)},
            "calls_during_backup": during}


async def _all_up(client: Any, timeout: float = 60, pid: int | None = None) -> None:
    """Every slot registered (with ``pid``: slot 0 by that process)."""
    deadline = time.monotonic() + timeout
    while True:
        slots = (await client.statistics())["slots"]
        if all(s["up"] for s in slots) and (pid is None or slots[0]["pid"] == pid):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("object processes did not register")
        await asyncio.sleep(0.01)


async def _gather_bounded(calls: Any, width: int = 64) -> list[Any]:
    """Run coroutine factories with at most ``width`` in flight; results in order."""
    calls = list(calls)
    out: list[Any] = [None] * len(calls)
    it = iter(range(len(calls)))

    async def worker() -> None:
        for i in it:
            out[i] = await calls[i]()

    await asyncio.gather(*[worker() for _ in range(width)])
    return out


async def _lateness(client: Any, prefix: str, n: int, load: bool) -> dict[str, float]:
    """``n`` alarms due over the next second; how late each handler started (ms)."""
    ns = client.namespace("ALARM")
    stubs = [ns.get_by_name(f"{prefix}{i}") for i in range(n)]
    stop = time.monotonic() + 3.0
    noop = client.namespace("NOOP")
    targets = [noop.get_by_name(f"o{i}") for i in range(100)]

    async def busy(k: int) -> int:  # 64 calls in flight beside the alarms
        done = 0
        while time.monotonic() < stop:
            await targets[(k + done) % 100].fetch("http://do/")
            done += 1
        return done

    loaders = [asyncio.ensure_future(busy(k)) for k in range(64)] if load else []
    base = time.time() * 1000 + 500
    await _gather_bounded([lambda s=s, i=i: s.arm(base + i * 1000 / n) for i, s in enumerate(stubs)])
    await asyncio.sleep(max(0.0, (base + 1000) / 1000 - time.time()) + 0.5)
    calls = sum(await asyncio.gather(*loaders)) if loaders else 0
    results = await _gather_bounded([lambda s=s: s.result() for s in stubs])
    deadline = time.monotonic() + 30
    while any(r is None for r in results) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        results = await _gather_bounded([lambda s=s: s.result() for s in stubs])
    late = [r["late"] for r in results if r is not None]
    out = {"alarms": n, "fired": len(late), "p50_ms": round(pct(late, 0.5), 2),
           "p99_ms": round(pct(late, 0.99), 2), "max_ms": round(max(late), 2),
           "early": sum(x < 0 for x in late)}
    if load:
        out["calls_beside"] = calls
    return out


async def alarms_measure(daemon: Daemon, quick: bool) -> dict[str, Any]:
    import durable

    out: dict[str, Any] = {}
    import psutil

    async with durable.connect(daemon.frontend, timeout=60) as client:
        await _all_up(client)
        await asyncio.sleep(2.0)
        rss_idle = psutil.Process(daemon.procs[1].pid).memory_info().rss  # a fresh daemon's
        ns = client.namespace("ALARM")
        out["lateness_idle"] = await _lateness(client, "idle", 50 if quick else 300, False)
        out["lateness_64_in_flight"] = await _lateness(client, "busy", 50 if quick else 300, True)
        # Throughput: many alarms due at one moment, each handler a durable write that
        # also deletes its alarm (one commit).
        m = 2_000 if quick else 20_000
        stubs = [ns.get_by_name(f"t{i}") for i in range(m)]
        # First contact activates each object (and stores its name): slower than a set, so
        # arm them all far ahead first, then move every alarm to one moment past the end.
        await _gather_bounded([lambda s=s: s.arm(time.time() * 1000 + 3_600_000) for s in stubs])
        t = time.perf_counter()
        due = time.time() * 1000 + (3_000 if quick else 8_000)
        await _gather_bounded([lambda s=s: s.arm(due) for s in stubs])
        rearm = time.perf_counter() - t
        if time.time() * 1000 >= due:
            raise RuntimeError(f"setting {m} alarms took {rearm:.1f} s: past their due time")
        await asyncio.sleep(max(0.0, due / 1000 - time.time()))
        results: list[Any] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            results = await _gather_bounded([lambda s=s: s.result() for s in stubs[-200:]])
            if all(r is not None for r in results):
                break
        results = await _gather_bounded([lambda s=s: s.result() for s in stubs])
        at = [r["at"] for r in results if r is not None]
        span = (max(at) - due) / 1000
        out["throughput"] = {"alarms": m, "set_per_s": round(m / rearm), "fired": len(at),
                             "seconds_from_due_to_last": round(span, 3),
                             "per_s": round(len(at) / span) if span > 0 else None,
                             "early": sum(a < due for a in at)}
    # Many pending alarms: memory, start-up, and the cost of one more. They are written
    # straight into the slot's DuckDB file while the daemon is down (as a restored backup
    # would hold them: setting a million through calls is a million first activations).
    pending = 20_000 if quick else 1_000_000
    far = int(time.time() * 1000) + 86_400_000
    daemon.stop()
    import duckdb

    con = duckdb.connect(str(daemon.data / "slot-0.duckdb"))
    con.execute("INSERT INTO alarms SELECT ('ALARM/' || printf('%064x', i))::BLOB, $1 + i "
                "FROM range($2) t(i)", [far, pending])
    con.execute("CHECKPOINT")
    con.close()
    t = time.perf_counter()
    daemon.start()
    async with durable.connect(daemon.frontend, timeout=60) as client:
        await _all_up(client, 120)
        start_s = time.perf_counter() - t
        await asyncio.sleep(2.0)
        rss = psutil.Process(daemon.procs[1].pid).memory_info().rss
        ns = client.namespace("ALARM")
        one = ns.get_by_name("one-more")
        ta, tp = [], []
        for i in range(300 if quick else 2000):
            t = time.perf_counter()
            await one.arm(far + i)
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            await one.put_one(i)
            tp.append(time.perf_counter() - t)
        stats = (await client.statistics())["slots"][0]["reported"]
        out["pending"] = {
            "alarms": pending, "start_to_serving_s": round(start_s, 2),
            "rss_fresh_daemon_mb": round(rss_idle / 2**20, 1),
            "rss_with_them_pending_mb": round(rss / 2**20, 1),
            "rss_for_pending_alarms_mb": round((rss - rss_idle) / 2**20, 1),
            "alarms_in_memory": stats.get("alarms_in_memory"),
            "status_counts": stats.get("alarms"),
            "set_one_more_p50_ms": ms(pct(ta, 0.5)), "put_one_p50_ms": ms(pct(tp, 0.5)),
            "set_vs_put_p50": round(pct(ta, 0.5) / pct(tp, 0.5), 3)}
    return out


def alarms_suite(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        daemon = Daemon(Path(tmp), 1)
        try:
            return asyncio.run(alarms_measure(daemon, quick))
        finally:
            daemon.close()


# -- websockets -------------------------------------------------------------------------
WS_CONFIG = """
data_dir = "{data}"
slots = 1
idle_timeout = 2
[http]
listen = "127.0.0.1:{port}"
front = "gateways"  # (its figures are a gateway process's memory per socket)
[namespaces.WSROOM]
class = "bench_objects:WsRoom"
"""


async def _ws_load(port: int, quick: bool, frontend: str) -> dict[str, Any]:
    """Runs in its own process: the clients (and the clock for latencies)."""
    import aiohttp

    import durable

    base = f"http://127.0.0.1:{port}/WSROOM"
    out: dict[str, Any] = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        # echo round trip, sequential, one socket
        ws = await s.ws_connect(f"{base}/echo/")
        n = 300 if quick else 3000
        for _ in range(50):
            await ws.send_str("warm")
            await ws.receive()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await ws.send_str("x" * 32)
            await ws.receive()
            times.append(time.perf_counter() - t)
        out["echo_gateway"] = {"messages": n, "p50_ms": ms(pct(times, 0.5)),
                               "p99_ms": ms(pct(times, 0.99))}
        await ws.close()
        async with durable.connect(frontend, timeout=30) as client:
            room = client.namespace("WSROOM").get_by_name("echo-py")
            async with room.websocket("/") as pws:
                for _ in range(50):
                    await pws.send("warm")
                    await pws.receive()
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    await pws.send("x" * 32)
                    await pws.receive(timeout=10)
                    times.append(time.perf_counter() - t)
            out["echo_python_client"] = {"messages": n, "p50_ms": ms(pct(times, 0.5)),
                                         "p99_ms": ms(pct(times, 0.99))}
        # one message to 1,000 sockets of one room: until the last delivery
        fan = 200 if quick else 1000
        socks = [await s.ws_connect(f"{base}/fan/") for _ in range(fan)]
        await asyncio.sleep(0.5)
        sender = socks[0]
        # Each socket has its reader (as each browser would): a round ends when all have
        # the message; the figure is the send-to-last-arrival time.
        seen, target = [0], [len(socks)]
        round_done: list[asyncio.Future[None]] = []

        async def reader(w: Any) -> None:
            async for msg in w:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    return
                seen[0] += 1
                if seen[0] == target[0] and round_done and not round_done[0].done():
                    round_done[0].set_result(None)

        readers = [asyncio.ensure_future(reader(w)) for w in socks]
        lasts = []
        rounds = 20 if quick else 100
        for k in range(rounds):
            seen[0] = 0
            round_done[:] = [asyncio.get_running_loop().create_future()]
            t = time.perf_counter()
            await sender.send_str(f"b:{k}")
            await asyncio.wait_for(round_done[0], 30)
            lasts.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
        out["broadcast"] = {"sockets": fan, "rounds": rounds,
                            "last_delivery_p50_ms": ms(pct(lasts, 0.5)),
                            "last_delivery_p99_ms": ms(pct(lasts, 0.99))}
        # sustained fan-out: messages sent back to back, counted where they arrive
        burst = 30 if quick else 200
        seen[0], target[0] = 0, burst * fan
        round_done[:] = [asyncio.get_running_loop().create_future()]
        t = time.perf_counter()
        for k in range(burst):
            await sender.send_str(f"b:{k}")
        await asyncio.wait_for(round_done[0], 60)
        span = time.perf_counter() - t
        delivered = seen[0]
        for r in readers:
            r.cancel()
        out["fanout_sustained"] = {"sockets": fan, "messages_sent": burst,
                                   "delivered": delivered, "seconds": round(span, 3),
                                   "delivered_per_s": round(delivered / span)}
        for w in socks:
            await w.close()
    return out


async def _ws_idle(port: int, total: int, rooms: int, hold: float) -> dict[str, Any]:
    """Runs in its own process: ``total`` sockets over ``rooms`` rooms, held ``hold`` s."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t = time.perf_counter()
        socks: list[Any] = []
        for start in range(0, total, 500):
            socks += await asyncio.gather(*[
                s.ws_connect(f"http://127.0.0.1:{port}/WSROOM/r{i % rooms}/", autoping=False)
                for i in range(start, min(total, start + 500))])
        opened = time.perf_counter() - t
        await asyncio.sleep(hold)
        alive = sum(not w.closed for w in socks)
        for w in socks:
            await w.close()
    return {"opened_s": round(opened, 2), "still_open_after_hold": alive}


def websockets_suite(quick: bool) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    import psutil
    from harness import serving

    import durable

    with serving(WS_CONFIG) as d:
        kids = psutil.Process(d.proc.pid).children(recursive=True)
        gateway = next(k for k in kids if "durable.broker.gateway" in " ".join(k.cmdline()))
        objectproc = next(k for k in kids if "durable.objectproc" in " ".join(k.cmdline())
                          and "--standby" not in k.cmdline())  # (not the warm spare)

        async def evicted_and_active() -> tuple[int, int, int]:
            async with durable.connect(d.frontend, timeout=30) as c:
                slot = (await c.statistics())["slots"][0]["reported"]
                return slot.get("evicted", 0), slot.get("active", 0), slot.get("websockets", 0)

        out: dict[str, Any] = {}
        with ProcessPoolExecutor(1) as pool:
            out.update(pool.submit(_run, _ws_load, d.port, quick, d.frontend).result())
            time.sleep(3.0)  # (the rooms of the measurements above are evicted)
            rss_gw, rss_op = gateway.memory_info().rss, objectproc.memory_info().rss
            total = 1000 if quick else 10_000
            rooms = 100
            hold = 6.0 if quick else 25.0
            fut = pool.submit(_run, _ws_idle, d.port, total, rooms, hold)
            deadline = time.monotonic() + hold + 120
            sample: dict[str, Any] = {}
            while time.monotonic() < deadline and not fut.done():
                time.sleep(1.0)
                evicted, active, open_ = asyncio.run(evicted_and_active())
                if open_ == total and active == 0:  # every room hibernated, all sockets open
                    sample = {"gateway": gateway.memory_info().rss,
                              "objectproc": objectproc.memory_info().rss}
                    break
            held = fut.result()
        if not sample:
            raise RuntimeError(f"the {total} sockets were not all open with every room evicted")
        out["hibernated"] = {
            "sockets": total, "rooms": rooms, **held,
            "gateway_rss_idle_mb": round(rss_gw / 2**20, 1),
            "gateway_rss_with_sockets_mb": round(sample["gateway"] / 2**20, 1),
            "gateway_bytes_per_socket": round((sample["gateway"] - rss_gw) / total),
            "objectproc_bytes_per_socket": round((sample["objectproc"] - rss_op) / total),
        }
    return out


# -- testing ----------------------------------------------------------------------------
THOUSAND_TESTS = """
import pytest
from durable.examples.counter import Counter


@pytest.mark.parametrize("i", range({n}))
async def test_counter(durable_runtime, i):
    rt = await durable_runtime({{"COUNTER": Counter}})
    stub = rt.namespace("COUNTER").get_by_name(f"c{{i}}")
    assert await stub.increment(by=i) == i
    assert await stub.value() == i
"""


async def _testing_in_process(quick: bool) -> dict[str, Any]:
    from bench_objects import Noop

    from durable.examples.counter import Counter
    from durable.testing import Runtime

    classes = {"NOOP": Noop, "COUNTER": Counter}
    starts, closes = [], []
    for _ in range(20 if quick else 200):
        rt = Runtime(classes)
        t = time.perf_counter()
        await rt.start()
        starts.append(time.perf_counter() - t)
        t = time.perf_counter()
        await rt.close()
        closes.append(time.perf_counter() - t)
    out: dict[str, Any] = {"start_p50_ms": ms(pct(starts, 0.5)),
                           "start_p99_ms": ms(pct(starts, 0.99)),
                           "close_p50_ms": ms(pct(closes, 0.5))}
    n = 2_000 if quick else 20_000
    async with Runtime(classes) as rt:
        noop = rt.namespace("NOOP").get_by_name("n")
        counter = rt.namespace("COUNTER").get_by_name("c")
        await noop.noop()
        t = time.perf_counter()
        for _ in range(n):
            await noop.noop()
        out["noop_calls_per_s"] = round(n / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(n // 2):
            await counter.increment()
        out["counter_increments_per_s"] = round(n // 2 / (time.perf_counter() - t))
        assert await counter.value() == n // 2
    return out


def testing_suite(quick: bool) -> dict[str, Any]:
    import subprocess

    out = asyncio.run(_testing_in_process(quick))
    n = 100 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        Path(tmp, "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n"
                                           "asyncio_default_fixture_loop_scope = function\n")
        Path(tmp, "test_many.py").write_text(THOUSAND_TESTS.format(n=n))
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-c", str(Path(tmp, "pytest.ini")), "--rootdir", tmp, tmp],
                             cwd=tmp, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            raise RuntimeError(f"the {n} tests failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    out["pytest_fresh_runtime_tests"] = {"tests": n, "seconds": round(wall, 2),
                                         "per_test_ms": round(wall / n * 1000, 2)}
    return out


METRICS_CONFIG = """
data_dir = "{{data}}"
slots = 1
{metrics}
[namespaces.NOOP]
class = "bench_objects:Noop"
"""


async def _noop_rounds(frontends: list[str], rounds: int, n: int) -> list[dict[str, Any]]:
    import durable

    clients = [durable.connect(f, timeout=30) for f in frontends]
    for c in clients:
        await c.start()
    try:
        stubs = [c.namespace("NOOP").get_by_name("n") for c in clients]
        times: list[list[float]] = [[] for _ in clients]
        spans = [0.0 for _ in clients]
        for s in stubs:
            for _ in range(200):
                await s.noop()
        for _ in range(rounds):
            for i, s in enumerate(stubs):  # alternate: the machine's noise falls on both
                t0 = time.perf_counter()
                for _ in range(n):
                    t = time.perf_counter()
                    await s.noop()
                    times[i].append(time.perf_counter() - t)
                spans[i] += time.perf_counter() - t0
        return [{"p50_ms": ms(pct(t, 0.5)), "calls_per_s": round(len(t) / sp)}
                for t, sp in zip(times, spans, strict=True)]
    finally:
        for c in clients:
            await c.close()


def metrics_suite(quick: bool) -> dict[str, Any]:
    import threading
    import urllib.request

    from harness import free_port, serving

    port = free_port()
    off = METRICS_CONFIG.format(metrics="")
    on = METRICS_CONFIG.format(metrics=f'[metrics]\nlisten = "127.0.0.1:{port}"')
    with serving(off) as a, serving(on) as b:
        stop = threading.Event()
        scrapes = [0]

        def scraper() -> None:  # as Prometheus would, every second (and once at once: the
            # calls of --quick may take under a second, and a CI-like run then counted 0)
            while True:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                scrapes[0] += 1
                if stop.wait(1.0):
                    break

        t = threading.Thread(target=scraper, daemon=True)
        t.start()
        try:
            without, with_ = asyncio.run(_noop_rounds([a.frontend, b.frontend],
                                                      4 if quick else 10, 500 if quick else 3000))
        finally:
            stop.set()
            t.join()
    return {"without_metrics": without, "with_metrics": with_, "scrapes": scrapes[0],
            "p50_ratio": round(with_["p50_ms"] / without["p50_ms"], 3),
            "calls_per_s_ratio": round(with_["calls_per_s"] / without["calls_per_s"], 3)}


QUERY_CONFIG = """
data_dir = "{data}"
slots = 2
[broker]
heartbeat = 1.0
[namespaces.KV]
class = "tests.integration.objects:KV"
[namespaces.Other]
class = "tests.integration.objects:KV"
"""


def make_export(dest: Path, objects: int) -> float:
    """An export of ``objects`` named objects of 3 keys each (half in KV, half in Other), as
    `durable export --format parquet` writes it, with its id secret; return the seconds."""
    import secrets as _secrets

    import duckdb
    import pyarrow as pa

    from durable.ids import IdFactory, namespace_key
    from durable.query import EXPORT_FORMAT
    t = time.perf_counter()
    dest.mkdir(mode=0o700)
    secret = _secrets.token_bytes(32)
    (dest / "secret").write_bytes(secret)
    ids = {ns: IdFactory(ns, namespace_key(secret, ns)) for ns in ("KV", "Other")}
    nss, oids, names = [], [], []
    for i in range(objects):
        ns = "KV" if i % 2 else "Other"
        name = f"object-{i}"
        nss.append(ns)
        oids.append(str(ids[ns].from_name(name)))
        names.append(name)
    base = pa.table({"namespace": nss, "object_id": oids, "object_name": names,
                     "i": pa.array(range(objects), pa.int64())})
    con = duckdb.connect()
    con.register("base", base)
    con.execute(
        "COPY (SELECT namespace, object_id, object_name, k AS key, "
        "(CASE k WHEN 'count' THEN (i % 1000)::VARCHAR WHEN 'name' THEN to_json(object_name)::VARCHAR "
        "ELSE '{\"score\":' || i || ',\"tags\":[\"l\",\"a\",\"b\"]}' END)::JSON AS value, "
        "make_timestamp(1764460800000000 + i * 1000) AS updated_at "
        "FROM base, (VALUES ('count'), ('name'), ('meta')) ks(k)) "
        f"TO '{dest / 'kv.parquet'}' (FORMAT parquet, COMPRESSION zstd)")
    con.execute("COPY (SELECT 'KV' AS namespace, '' AS object_id, '' AS object_name, "
                "now()::TIMESTAMP AS scheduled_at WHERE false) "
                f"TO '{dest / 'alarms.parquet'}' (FORMAT parquet)")
    con.close()
    (dest / "manifest.json").write_bytes(orjson.dumps({
        "format": EXPORT_FORMAT, "file_format": "parquet", "rows": objects * 3,
        "objects": objects, "alarms": 0}))
    return time.perf_counter() - t


def query_suite(quick: bool, objects: int) -> dict[str, Any]:
    """#17's targets: SQL, listing and export over ``objects`` objects of 3 keys each, and how
    object calls fare during a full scan."""
    from harness import serving

    import durable

    objects = 20_000 if quick else objects
    out: dict[str, Any] = {"objects": objects, "rows": objects * 3}
    with tempfile.TemporaryDirectory(prefix="durable-query-") as tmp:
        src = Path(tmp) / "export"
        out["generate_s"] = round(make_export(src, objects), 2)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))

        def prepare(root: Path) -> None:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "import",
                                str(src), "--json", "--config", str(root / "durable.toml")],
                               env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"durable import failed: {r.stderr}")
            out["import_s"] = round(time.perf_counter() - t, 2)

        with serving(QUERY_CONFIG, prepare=prepare) as d:
            async def run() -> None:
                admin = f"ipc://{d.root / 'data' / 'run' / 'admin.sock'}"
                async with durable.connect(admin, timeout=120) as c:
                    async def timed(fn: Any, n: int = 3) -> tuple[float, Any]:
                        times, last = [], None
                        for _ in range(n):
                            t = time.perf_counter()
                            last = await fn()
                            times.append(time.perf_counter() - t)
                        return round(statistics.median(times), 3), last

                    s, r = await timed(lambda: c.sql("SELECT count(*) FROM kv", timeout=300))
                    assert r.rows[0][0] == objects * 3, r.rows
                    out["count_s"] = s
                    s, r = await timed(lambda: c.sql(
                        "SELECT namespace, count(*) AS rows, count(DISTINCT object_id) AS objects, "
                        "sum(CAST(value->>'$.score' AS BIGINT)) AS score FROM kv "
                        "GROUP BY namespace ORDER BY namespace", timeout=300))
                    out["group_by_namespace_s"] = s
                    out["group_by_rows"] = [list(x) for x in r.rows]

                    async def first_page() -> list[Any]:
                        return [o async for o in c.namespace("KV").list_objects(limit=1000)]
                    s, page = await timed(first_page)
                    assert len(page) == 1000
                    out["list_first_1000_s"] = s

                    async def export_once() -> dict[str, Any]:
                        dest = Path(tmp) / f"out-{time.monotonic_ns()}"
                        try:
                            return await durable.query.export(c, dest, timeout=600)
                        finally:
                            import shutil
                            shutil.rmtree(dest, ignore_errors=True)
                    s, manifest = await timed(export_once)
                    assert manifest["rows"] == objects * 3
                    out["export_parquet_s"] = s

                    async def scans(query: str) -> None:  # as an operator would: `durable sql`
                        for _ in range(3):
                            proc = await asyncio.create_subprocess_exec(
                                sys.executable, "-m", "durable.supervisor.cli", "sql", "--json",
                                query, "--config",
                                str(d.root / "durable.toml"), env=env,
                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                            _, err = await proc.communicate()
                            if proc.returncode != 0:
                                raise RuntimeError(f"durable sql failed: {err.decode()}")
                    before = await _probe_during(d.frontend, asyncio.ensure_future(asyncio.sleep(5)))
                    # (split: each slot scans its rows itself; shipped: each slot sends every row)
                    during = await _probe_during(d.frontend, asyncio.ensure_future(
                        scans("SELECT count(*), max(updated_at) FROM kv")))
                    shipped = await _probe_during(d.frontend, asyncio.ensure_future(
                        scans("SELECT count(DISTINCT key), max(updated_at) FROM kv")))
                    out["calls_before"], out["calls_during_scan"] = before, during
                    out["calls_during_shipped_scan"] = shipped
                    out["p99_ratio"] = round(during["p99_ms"] / before["p99_ms"], 2)
                    out["p99_ratio_shipped"] = round(shipped["p99_ms"] / before["p99_ms"], 2)

            import durable.query  # noqa: F401
            asyncio.run(run())
    return out


def cold_suite(quick: bool, objects: int) -> dict[str, Any]:
    """#18's cold path: requests to objects never seen before, beside ``objects`` stored ones
    (made by `durable import`): sequential latency, and the rate at 64 in flight."""
    from harness import serving

    import durable

    objects = 20_000 if quick else objects
    n, burst = (300, 3000) if quick else (2000, 20_000)
    out: dict[str, Any] = {"stored_objects": objects}
    with tempfile.TemporaryDirectory(prefix="durable-cold-") as tmp:
        src = Path(tmp) / "export"
        make_export(src, objects)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))

        def prepare(root: Path) -> None:
            subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "import", str(src),
                            "--config", str(root / "durable.toml")], env=env, check=True,
                           capture_output=True, timeout=1800)

        with serving(QUERY_CONFIG, prepare=prepare) as d:
            async def run() -> None:
                async with durable.connect(d.frontend, timeout=60) as c:
                    ns = c.namespace("KV")
                    for label, names in (("existing", [f"object-{2 * i + 1}" for i in range(n)]),
                                         ("new", [f"new-{i}" for i in range(n)])):
                        lat = []
                        for name in names:
                            t = time.perf_counter()
                            await ns.get_by_name(name).fetch("http://do/?k=count")
                            lat.append(time.perf_counter() - t)
                        out[f"{label}_sequential_p50_ms"] = ms(pct(lat, 0.5))
                        out[f"{label}_sequential_p90_ms"] = ms(pct(lat, 0.9))
                    hot_stub = ns.get_by_name("object-0")
                    await hot_stub.fetch("http://do/?k=count")  # (active from here on)
                    # 64 in flight: new objects, then stored ones not yet read (each
                    # activation's first read: the slot's reader thread, off the loop),
                    # and the latency of an active object's calls meanwhile
                    for label, names in (("new", [f"burst-{i}" for i in range(burst)]),
                                         ("existing", [f"object-{2 * i + 1}"
                                                       for i in range(n, n + burst)])):
                        it = iter(names)

                        async def worker(it: Any = it) -> None:
                            for name in it:
                                await ns.get_by_name(name).fetch("http://do/?k=count")
                        hot_lat: list[float] = []
                        busy = [True]

                        async def hot(busy: list[bool] = busy, hot_lat: list[float] = hot_lat
                                      ) -> None:  # one active object's calls meanwhile
                            while busy[0]:
                                t1 = time.perf_counter()
                                await hot_stub.fetch("http://do/?k=count")
                                hot_lat.append(time.perf_counter() - t1)
                        hot_task = asyncio.create_task(hot())
                        t = time.perf_counter()
                        await asyncio.gather(*(worker() for _ in range(64)))
                        out[f"{label}_objects_per_s_64_in_flight"] = round(
                            len(names) / (time.perf_counter() - t))
                        busy[0] = False
                        await hot_task
                        out[f"hot_object_p50_ms_during_{label}"] = ms(pct(hot_lat, 0.5))
                        out[f"hot_object_p99_ms_during_{label}"] = ms(pct(hot_lat, 0.99))
            asyncio.run(run())
    return out


@contextlib.contextmanager
def _workerd(path: str) -> Any:
    """workerd serving scripts/workerd/counter.js with on-disk Durable Objects: (port, pids)."""
    from harness import free_port
    from workerd_config import workerd_config
    with tempfile.TemporaryDirectory(prefix="durable-workerd-") as tmp:
        root, port = Path(tmp), free_port()
        (root / "worker.js").write_text((REPO / "scripts" / "workerd" / "counter.js").read_text())
        (root / "disk").mkdir()
        (root / "config.capnp").write_text(workerd_config(
            disk=root / "disk", port=port, date="2026-11-17",
            classes={"NOOP": "Noop", "COUNTER": "Counter"}))
        proc = subprocess.Popen([path, "serve", str(root / "config.capnp")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"workerd ({path}) did not listen on {port}") from None
                    time.sleep(0.05)
            yield port, [proc.pid]
        finally:
            proc.kill()
            proc.wait()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and all their children, so far."""
    return sum(_cpu_by_role(pids).values())


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for role in ("gateway", "objectproc", "broker"):
        if f"durable.{role}" in text or f"broker.{role}" in text:
            return role
    if "durable.supervisor" in text:
        return "supervisor"
    return Path(cmdline[0]).name if cmdline else "?"


def _tree(pids: list[int]) -> list[Any]:
    """These processes and their children (psutil), those that still run."""
    import psutil
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            out += [root, *root.children(recursive=True)]
    return out


def _cpu_by_process(pids: list[int]) -> dict[tuple[str, int], float]:
    """User + system CPU so far of these processes and their children, by (role, pid): a
    durable process's role is its module (gateway, broker, objectproc, supervisor), another's
    its program."""
    import psutil
    out: dict[tuple[str, int], float] = {}
    for p in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            out[(_role(p.cmdline()), p.pid)] = t.user + t.system
    return out


def _cpu_by_role(pids: list[int]) -> dict[str, float]:
    """``_cpu_by_process`` summed by role."""
    out: dict[str, float] = {}
    for (role, _pid), cpu in _cpu_by_process(pids).items():
        out[role] = out.get(role, 0.0) + cpu
    return out


def _wakeups_by_thread(pids: list[int]) -> dict[tuple[str, int, int], int]:
    """Each thread's voluntary context switches so far (each one a sleep it woke from), keyed
    by (role, pid, thread id), for these processes and their children."""
    import psutil
    out: dict[tuple[str, int, int], int] = {}
    for p in _tree(pids):
        with contextlib.suppress(psutil.Error, OSError):
            role = _role(p.cmdline())
            for t in p.threads():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{p.pid}/task/{t.id}/status").read_text()
                    switches = status.split("voluntary_ctxt_switches:")[1].split()[0]
                    out[(role, p.pid, t.id)] = int(switches)
    return out


def _idle_figures(port: int, pids: list[int], seconds: float, settle: float) -> dict[str, Any]:
    """A few counter requests, then ``settle`` s of quiet, then ``seconds`` of measuring:
    CPU (% of one core) and wake-ups a second, by role and in total. A process or thread
    that came or went meanwhile (the warm spare starting) is left out."""
    _http_load("127.0.0.1", port, "COUNTER", "/inc", "POST", 4, 10, 0, 100)
    time.sleep(settle)
    cpu0, wake0 = _cpu_by_process(pids), _wakeups_by_thread(pids)
    time.sleep(seconds)
    cpu1, wake1 = _cpu_by_process(pids), _wakeups_by_thread(pids)
    return {"cpu_percent_of_a_core": _growth_by_role(cpu0, cpu1, 100 / seconds, 3),
            "wakeups_per_s": _growth_by_role(wake0, wake1, 1 / seconds, 1)}


def _growth_by_role(before: dict[tuple[Any, ...], float], after: dict[tuple[Any, ...], float],
                    scale: float, digits: int) -> dict[str, float]:
    """How much each figure keyed (role, ...) grew, times ``scale``, summed by role, and the
    total of the rounded figures; a key not in both (a process or thread that came or went)
    is left out."""
    out: dict[str, float] = {}
    for key, v in after.items():
        if key in before:
            out[key[0]] = out.get(key[0], 0.0) + (v - before[key]) * scale
    out = {role: round(v, digits) for role, v in out.items()}
    return {**out, "total": round(sum(out.values()), digits)}


def evict_tail_suite(quick: bool, cycles: int) -> dict[str, Any]:
    """Whether evicting many objects lifts the p99 of other objects' calls: each cycle makes
    new objects for a while (64 connections), then runs the no-op with 64 connections over
    100 other objects twice, while none is due for eviction and as the new ones go idle
    (each window a quarter ``idle_timeout`` and a second long, so that it holds a scan).
    The difference of the two p99s within a cycle is the figure: the machine's drift moves
    both (docs/messaging.md, "Eviction in steps"). Each window's ``evicted`` is net of the
    objects activated meanwhile."""
    from concurrent.futures import ProcessPoolExecutor

    from harness import active_objects, serving
    # (quick: the quiet window, ~1 s after the making and a `durable status` in, ends before
    # the new objects are due, also on a loaded machine: at idle 2 s it did not, and a third
    # of them went in the quiet window under the full suite)
    idle, making = (4.0, 0.5) if quick else (20.0, 5.0)
    window = idle / 4 + 1.0
    config = f"""
data_dir = "{{data}}"
slots = 2
idle_timeout = {idle}
[http]
listen = "127.0.0.1:{{port}}"
[namespaces.NOOP]
class = "bench_objects:Noop"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    rows = []
    with serving(config) as d, ProcessPoolExecutor(1) as pool:
        def load(*a: Any) -> dict[str, Any]:
            return pool.submit(_http_load, "127.0.0.1", d.port, *a).result()
        load("NOOP", "/", "GET", 64, 100, 0.5, None)  # warm-up
        for c in range(cycles):
            t0 = time.monotonic()
            made = load("COUNTER", "/inc", "POST", 64, 400_000, making, None, f"e{c}")["requests"]
            time.sleep(max(0.0, t0 + making + 0.5 - time.monotonic()))
            before = active_objects(d.status())
            quiet = load("NOOP", "/", "GET", 64, 100, window, None)
            middle = active_objects(d.status())
            time.sleep(max(0.0, t0 + idle + 0.3 - time.monotonic()))
            busy = load("NOOP", "/", "GET", 64, 100, window, None)
            after = active_objects(d.status())
            rows.append({"objects_made": made, "quiet_p99_ms": quiet["p99_ms"],
                         "quiet_per_s": quiet["per_s"], "quiet_evicted": before - middle,
                         "evicting_p99_ms": busy["p99_ms"], "evicting_per_s": busy["per_s"],
                         "evicted": middle - after,
                         "p99_difference_ms": round(busy["p99_ms"] - quiet["p99_ms"], 3)})
            time.sleep(max(0.0, t0 + idle + making + window + 2.0 - time.monotonic()))
    return {"idle_timeout_s": idle, "window_s": window, "cycles": rows,
            "p99_difference_ms": round(statistics.median(r["p99_difference_ms"] for r in rows), 3),
            "evicted": round(statistics.median(r["evicted"] for r in rows))}


def idle_suite(quick: bool, workerd: str | None) -> dict[str, Any]:
    """What a daemon costs while nobody calls it (it runs for years as a service)."""
    from harness import serving
    seconds, settle = (3.0, 1.0) if quick else (30.0, 10.0)  # (the spare starts 5 s after ready)
    config = """
data_dir = "{data}"
[http]
listen = "127.0.0.1:{port}"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    out: dict[str, Any] = {"seconds": seconds}
    with serving(config) as d:
        out["durable"] = _idle_figures(d.port, [d.proc.pid], seconds, settle)
    if workerd:
        with _workerd(workerd) as (port, pids):
            out["workerd"] = _idle_figures(port, pids, seconds, settle)
    return out


#: a round starts once every server's processes together used less than this many cores in
#: each of ``QUIET_WINDOWS`` windows in a row (``_settle``)
QUIET_CORES = 0.05
QUIET_WINDOWS = 3


def _settle(pids: list[int], window: float, limit: float, *, quiet_windows: int = QUIET_WINDOWS,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep,
            cpu: Callable[[list[int]], float] = _cpu_seconds) -> float | None:
    """Wait until these processes and their children together use under ``QUIET_CORES`` in
    each of ``quiet_windows`` windows of ``window`` seconds in a row, for at most ``limit``;
    return the seconds waited, or None if they never did. Why: workerd goes on working for
    ~10 s after a round (0.1–0.24 of a core on this VM, measured), and a round of the other
    server that starts meanwhile measured it too (the no-op's p99 with 64 connections 12–15
    ms for ~10 s, then 8 ms again). Why in a row: that work starts ~1 s after the round
    ends, and one quiet second, the first, ended the wait just before it (measured)."""
    started, quiet = clock(), 0
    while True:
        before, t0 = cpu(pids), clock()
        sleep(window)
        used = (cpu(pids) - before) / (clock() - t0)
        waited = clock() - started
        quiet = quiet + 1 if used < QUIET_CORES else 0
        if quiet >= quiet_windows:
            return round(waited, 1)
        if waited >= limit:
            return None


def _vs_round(port: int, pids: list[int], quick: bool, tag: str) -> dict[str, Any]:
    """One round of #18's table against one server (the load generator is its own process)."""
    from concurrent.futures import ProcessPoolExecutor
    n, secs = (100, 0.5) if quick else (3000, 4.0)
    out: dict[str, Any] = {}
    with ProcessPoolExecutor(1) as pool:
        def load(*a: Any) -> dict[str, Any]:
            return pool.submit(_http_load, "127.0.0.1", port, *a).result()
        load("NOOP", "/", "GET", 1, 1, 0, 50)  # warm-up
        out["noop_sequential_p50_ms"] = load("NOOP", "/", "GET", 1, 1, 0, n)["p50_ms"]
        out["counter_sequential_p50_ms"] = load("COUNTER", "/inc", "POST", 1, 1, 0, n)["p50_ms"]
        cpu = _cpu_by_role(pids)
        r = load("NOOP", "/", "GET", 64, 100, secs, None)
        spent = {k: (v - cpu.get(k, 0.0)) / r["requests"] * 1000
                 for k, v in _cpu_by_role(pids).items()}
        out["server_cpu_per_noop_ms"] = round(sum(spent.values()), 4)
        for role, v in sorted(spent.items()):  # where it goes (durable: by process)
            out[f"server_cpu_per_noop_ms_{role}"] = round(v, 4)
        out["noop_64_per_s"], out["noop_64_p99_ms"] = r["per_s"], r["p99_ms"]

        def timed(figure: str, *a: Any) -> None:
            """The load's rate, and the server's CPU per request in it."""
            before = _cpu_seconds(pids)
            r = load(*a)
            out[f"{figure}_per_s"] = r["per_s"]
            out[f"server_cpu_per_{figure}_ms"] = round(
                (_cpu_seconds(pids) - before) / r["requests"] * 1000, 4)

        timed("counter_64", "COUNTER", "/inc", "POST", 64, 100, secs, None)
        # the same 100 counters, each connection cycling through 25 of them, on both slots as
        # a connection to new objects is (two objects a connection often share one slot, and
        # a request for the other slot takes the peer path): separates what routing costs
        # from what a new object costs (docs/messaging.md)
        timed("counter_spread_64", "COUNTER", "/inc", "POST", 64, 100, secs, None, "", 25)
        # existing objects that are not a hot few: the counter over the WIDE objects made
        # before the first round (_make_wide). Over 100 objects, each batch of the applier
        # folds into one row an object, and their state stays in the CPU's caches; a request
        # to a new object is measured against both (docs/messaging.md)
        timed("counter_wide_64", "COUNTER", "/inc", "POST", 64, _wide(quick), secs, None,
              "wide")
        # every request to a new object: names are never repeated within a round
        timed("new_object_64", "COUNTER", "/inc", "POST", 64, 5_000 if quick else 400_000,
              secs, None, tag)
    return out


def _wide(quick: bool) -> int:
    """How many existing objects the wide counter spreads its requests over."""
    return 500 if quick else 10_000


def _make_wide(port: int, quick: bool) -> None:
    """Make the wide counter's objects (one request each, before the rounds: workerd makes
    ~230 new objects a second, so 10,000 take it ~45 s, once)."""
    from concurrent.futures import ProcessPoolExecutor
    n = _wide(quick)
    with ProcessPoolExecutor(1) as pool:
        pool.submit(_http_load, "127.0.0.1", port, "COUNTER", "/inc", "POST", 64, n, 0,
                    n // 64 + 1, "wide").result()


def _front_config(config: str, front: str) -> str:
    """``front`` is an [http] front value, optionally with ``:broker`` (``slots:broker``:
    calls between object processes go through the broker, ``[broker] peer_calls = false``)."""
    front, _, path = front.partition(":")
    if path not in ("", "broker"):
        raise SystemExit(f"--front {front}:{path}: the only suffix is ':broker'")
    out = config.replace("FRONT", front)
    return out + "[broker]\npeer_calls = false\n" if path else out


#: ``vs-workerd``'s daemon (and ``calls``'), FRONT an [http] front value (``_front_config``)
_VS_CONFIG = """
data_dir = "{data}"
slots = 2
[http]
listen = "127.0.0.1:{port}"
front = "FRONT"
[namespaces.NOOP]
class = "bench_objects:Noop"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""


def vs_workerd_suite(quick: bool, workerd: str | None, rounds: int,
                     fronts: tuple[str, ...] = ("slots",)) -> dict[str, Any]:
    """#18's side-by-side table: workerd and durable serve (2 slots) in alternating rounds,
    the same load generator; medians of the rounds and durable ÷ workerd ratios. Without
    ``workerd`` only durable's half runs (CI's smoke test). ``fronts``: [http] front values
    to measure, each its own daemon ("durable" is the first; the others are reported as
    "durable_<front>", with their ratios)."""
    from harness import serving
    config = _VS_CONFIG
    names = ["durable" if i == 0 else f"durable_{f}" for i, f in enumerate(fronts)]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in [*names, "workerd"]}
    with contextlib.ExitStack() as stack:
        ds = [stack.enter_context(serving(_front_config(config, f))) for f in fronts]
        w = stack.enter_context(_workerd(workerd)) if workerd else None
        for d in ds:
            _make_wide(d.port, quick)
        if w is not None:
            _make_wide(w[0], quick)
        every = [d.proc.pid for d in ds] + (list(w[1]) if w is not None else [])
        settled: dict[str, list[float | None]] = {n: [] for n in runs}
        window, limit, quiet = (0.3, 5.0, 1) if quick else (1.0, 30.0, QUIET_WINDOWS)
        for i in range(rounds):
            for name, d in zip(names, ds, strict=True):
                settled[name].append(_settle(every, window, limit, quiet_windows=quiet))
                runs[name].append(_vs_round(d.port, [d.proc.pid], quick, f"{name}{i}"))
            if w is not None:
                settled["workerd"].append(_settle(every, window, limit, quiet_windows=quiet))
                runs["workerd"].append(_vs_round(w[0], w[1], quick, f"w{i}"))
    out: dict[str, Any] = {"fronts": dict(zip(names, fronts, strict=True)),
                           # (seconds each round waited for the machine to be quiet; None:
                           # it never was, within the limit, and the round ran anyway)
                           "settled_s": {n: v for n, v in settled.items() if v},
                           "quiet_cores": QUIET_CORES, "quiet_windows": quiet}
    out.update({k: median_of(v) for k, v in runs.items() if v})
    for name in [*names, "workerd"]:  # each server's new objects against its own counter
        m = out.get(name)
        if m and m.get("counter_64_per_s") and m.get("counter_spread_64_per_s"):
            # (the ratio of the medians, and the median of each round's ratio: the loads of
            # one round run back to back, so a slow spell of the machine moves both of them,
            # where the medians of each figure may come from different rounds)
            out[f"{name}_new_object_over_counter"] = {
                "counter_64": round(m["new_object_64_per_s"] / m["counter_64_per_s"], 2),
                "counter_spread_64": round(m["new_object_64_per_s"]
                                           / m["counter_spread_64_per_s"], 2),
                **({"counter_wide_64": round(m["new_object_64_per_s"]
                                             / m["counter_wide_64_per_s"], 2)}
                   if m.get("counter_wide_64_per_s") else {}),
                **{f"{k}_by_round": round(statistics.median(
                    r["new_object_64_per_s"] / r[f"{k}_per_s"] for r in runs[name]), 2)
                   for k in ("counter_64", "counter_spread_64", "counter_wide_64")
                   if all(r.get(f"{k}_per_s") for r in runs[name])}}
    if workerd:
        for name in names:
            out[f"{name}_over_workerd"] = {
                k: round(out[name][k] / out["workerd"][k], 2)
                for k in out[name] if out["workerd"].get(k)}
            out[f"{name}_over_workerd_by_round"] = ratios_by_round(runs[name], runs["workerd"])
    out["rounds"] = runs
    return out


def _calls_loads(quick: bool, secs: float) -> dict[str, tuple[Any, ...]]:
    """``calls``' loads, as ``vs-workerd`` names and runs them (``_http_load``'s arguments
    after the host and port)."""
    return {
        "counter_64": ("COUNTER", "/inc", "POST", 64, 100, secs, None),
        "counter_spread_64": ("COUNTER", "/inc", "POST", 64, 100, secs, None, "", 25),
        "counter_wide_64": ("COUNTER", "/inc", "POST", 64, _wide(quick), secs, None, "wide"),
        "new_object_64": ("COUNTER", "/inc", "POST", 64, 5_000 if quick else 400_000, secs,
                          None, "calls"),
    }


def _label(func: tuple[str, int, str]) -> str:
    """A pstats function key as text: the checkout's files relative to it, others by name."""
    path, line, name = func
    if path == "~":
        return name
    path = path[len(str(REPO)) + 1:] if path.startswith(str(REPO)) else Path(path).name
    return f"{path}:{line} {name}"


def calls_suite(quick: bool) -> dict[str, Any]:
    """Python calls a request in the object processes, by load: cProfile in each one's main
    thread, switched on around each load (``scripts/cprofile_hook``), so each function's
    calls are counted exactly where a sampling profiler sees a difference spread thin
    (docs/messaging.md, "Python calls a request, counted"). Counts only: the profiler makes
    each call ~3 times dearer, so its times are no figures."""
    import pstats
    import signal
    from concurrent.futures import ProcessPoolExecutor

    import psutil
    from harness import serving
    config = _front_config(_VS_CONFIG, "slots")  # (vs-workerd's daemon)
    secs = 0.5 if quick else 4.0
    out: dict[str, Any] = {"seconds_a_load": secs}
    with tempfile.TemporaryDirectory(prefix="durable-calls-") as dumps, \
            serving(config, extra_env={"DURABLE_BENCH_CPROFILE": dumps},
                    path_first=REPO / "scripts" / "cprofile_hook") as d, \
            ProcessPoolExecutor(1) as pool:
        # (the slots' processes, not the warm spare, which starts a few seconds after ready
        # with --standby and serves no slot until one dies)
        ops = [p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)
               if _role(p.cmdline()) == "objectproc" and "--slot" in p.cmdline()]
        if len(ops) != 2:
            raise RuntimeError(f"expected 2 slots' object processes, found {len(ops)}")
        _make_wide(d.port, quick)
        pool.submit(_http_load, "127.0.0.1", d.port, "COUNTER", "/inc", "POST", 64, 100,
                    0.3 if quick else 1.0, None).result()  # warm-up, not profiled
        counts: dict[str, dict[tuple[str, int, str], float]] = {}
        for i, (name, args) in enumerate(_calls_loads(quick, secs).items(), 1):
            for pid in ops:
                os.kill(pid, signal.SIGRTMIN + 1)
            time.sleep(0.3)  # (each process switches it on at its loop's next turn)
            r = pool.submit(_http_load, "127.0.0.1", d.port, *args).result()
            for pid in ops:
                os.kill(pid, signal.SIGRTMIN + 1)
            files = [Path(dumps) / f"op-{slot}-{i}.prof" for slot in (0, 1)]
            deadline = time.monotonic() + 30
            while not all(f.exists() for f in files):
                if time.monotonic() > deadline or d.proc.poll() is not None:
                    raise RuntimeError(f"the object processes wrote no profile of {name}: "
                                       "did one restart?")
                time.sleep(0.1)
            stats = pstats.Stats(*map(str, files)).stats  # type: ignore[attr-defined]
            n = r["requests"]
            counts[name] = {f: v[1] / n for f, v in stats.items()}
            top = sorted(counts[name].items(), key=lambda kv: -kv[1])[:15]
            out[name] = {"requests": n, "per_s_profiled": r["per_s"],
                         "calls_per_request": round(sum(counts[name].values()), 1),
                         # (of them, calls of functions written in Python, not built-ins)
                         "python_function_calls_per_request": round(sum(
                             v for f, v in counts[name].items() if f[0] != "~"), 1),
                         "most_called": [[_label(f), round(c, 2)] for f, c in top]}
    base = counts["counter_64"]
    for name, c in counts.items():
        if name == "counter_64":
            continue
        # (the Python functions whose calls a request differ most from the counter on 100
        # objects': built-ins such as len() follow them)
        more = sorted((f for f in set(c) | set(base) if f[0] != "~"),
                      key=lambda f: -abs(c.get(f, 0.0) - base.get(f, 0.0)))
        out[name]["against_counter_64"] = [
            [_label(f), round(base.get(f, 0.0), 2), round(c.get(f, 0.0), 2)] for f in more[:20]]
    return out


def ratios_by_round(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    """For each figure both sides have in every round, the median of round ``i``'s ratio
    ``a[i] / b[i]``. Why: the two servers of one round run back to back, so a slow spell of
    this shared VM moves both, where the medians of each figure may come from different
    rounds (one run's no-op with 64 connections was 1.63x as a ratio of medians and 1.35x by
    round: 1.82, 1.33, 1.35)."""
    out: dict[str, float] = {}
    for k in a[0] if a else ():
        pairs = [(x.get(k), y.get(k)) for x, y in zip(a, b, strict=True)]
        if all(isinstance(x, (int, float)) and isinstance(y, (int, float)) and y
               for x, y in pairs):
            out[k] = round(statistics.median(x / y for x, y in pairs), 2)
    return out


CLUSTER_SINGLE = """
data_dir = "{data}"
slots = 4
warm_spare = false
[broker]
heartbeat = 0.5
[namespaces.COUNTER]
class = "tests.integration.objects:Counter"
"""


async def _counter_figures(frontend: str, quick: bool) -> dict[str, Any]:
    """Sequential durable counter p50 over 32 objects (every slot), and calls/s with 64 in
    flight over 100 objects, through one host's client endpoint."""
    import durable

    n = 300 if quick else 2000
    async with durable.connect(frontend, timeout=30) as client:
        ns = client.namespace("COUNTER")
        stubs = [ns.get_by_name(f"bench-{i}") for i in range(100)]
        for s in stubs:  # activated, and each slot's path warm
            await s.fetch("http://o/", method="POST")
        times = []
        for i in range(n):
            t = time.perf_counter()
            await stubs[i % 32].fetch("http://o/", method="POST")
            times.append(time.perf_counter() - t)
        calls = 0
        end = time.perf_counter() + (2.0 if quick else 8.0)

        async def worker(k: int) -> None:
            nonlocal calls
            while time.perf_counter() < end:
                await stubs[(k * 7 + calls) % 100].fetch("http://o/", method="POST")
                calls += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(64)))
        return {"counter_p50_ms": ms(pct(times, 0.5)), "counter_p99_ms": ms(pct(times, 0.99)),
                "counter_64_per_s": round(calls / (time.perf_counter() - t0))}


async def _all_served(frontends: list[str], names: list[str], timeout: float) -> float:
    """Seconds until every object in ``names`` answered an increment through the first
    endpoint (each call retried until the deadline)."""
    import durable

    start = time.monotonic()
    async with durable.connect(frontends[0], timeout=30) as client:
        ns = client.namespace("COUNTER")
        pending = set(names)
        while pending and time.monotonic() - start < timeout:
            async def one(name: str) -> str | None:
                try:
                    await ns.get_by_name(name).fetch("http://o/", method="POST", timeout=2.0)
                    return name
                except durable.errors.DurableError:
                    return None
            done = await asyncio.gather(*(one(n) for n in pending))
            pending -= {d for d in done if d}
            if pending:
                await asyncio.sleep(0.05)
    if pending:
        raise RuntimeError(f"{len(pending)} objects not served {timeout} s after the kill")
    return time.monotonic() - start


def cluster_suite(quick: bool, kills: int, lease: float) -> dict[str, Any]:
    """Cluster mode (docs/cluster.md): the durable counter through a 3-host cluster against
    one host, and how long a SIGKILLed host's slots take to serve again."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness import serving as serving_one

    from tests.integration.clusterhosts import (
        cluster_hosts,
        kill_host,
        restart_config,
        wait_all_ready,
        wait_balanced,
    )
    from tests.integration.daemon import serving

    with serving_one(CLUSTER_SINGLE) as one:
        single = asyncio.run(_counter_figures(one.frontend, quick))
    failover: list[float] = []
    with tempfile.TemporaryDirectory(prefix="durable-cluster-bench-") as tmp:
        root = Path(tmp)
        with cluster_hosts(root, lease=lease) as (nats_, hosts):
            wait_all_ready(hosts)
            wait_balanced(hosts)
            cluster = asyncio.run(_counter_figures(hosts[0].frontend, quick))
            names = [f"probe-{i}" for i in range(32)]  # (every slot, with near certainty)
            asyncio.run(_all_served([hosts[0].frontend], names, 60))
            with contextlib.ExitStack() as stack:
                for k in range(kills):
                    i = 1 + k % 2  # a host other than the one the probes go through
                    kill_host(hosts[i])
                    failover.append(asyncio.run(_all_served([hosts[0].frontend], names, 60)))
                    hosts[i] = stack.enter_context(serving(  # back, on its old data dir
                        hosts[i].root, restart_config(hosts[i])))
                    hosts[i].wait_ready(90)
                    wait_balanced(hosts)
    return {"single_host": single, "cluster_3_hosts": cluster, "lease_s": lease,
            "kills": kills, "failover_s": [round(x, 2) for x in failover],
            "failover_p50_s": round(pct(failover, 0.5), 2) if failover else None,
            "failover_p99_s": round(pct(failover, 0.99), 2) if failover else None,
            "counter_p50_ratio": round(cluster["counter_p50_ms"] / single["counter_p50_ms"], 2),
            "counter_64_ratio": round(cluster["counter_64_per_s"] / single["counter_64_per_s"],
                                      2)}


def _run(fn: Any, *args: Any) -> Any:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(fn(*args))


def median_of(runs: list[Any]) -> Any:
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        m = statistics.median(runs)
        return round(m, 4) if isinstance(m, float) else m
    return first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv is None and len(sys.argv) > 1 and sys.argv[1].startswith("_echo-"):
        if sys.argv[1] == "_echo-broker":
            _echo_broker(sys.argv[2], sys.argv[3])
        elif sys.argv[1] == "_echo-direct":
            _echo_direct(sys.argv[2])
        elif sys.argv[1] == "_echo-sink":
            _sink(sys.argv[2])
        else:
            _echo_worker(sys.argv[2])
        return 0
    p.add_argument("suite", choices=["storage", "rpc", "http", "backup", "alarms", "websockets",
                                     "testing", "metrics", "query", "cold", "vs-workerd",
                                     "cluster", "idle", "evict-tail", "calls"])
    p.add_argument("--workerd", help="vs-workerd, idle: the workerd binary (npm install "
                   "workerd@1.20261117.1); without it, only durable's half runs")
    p.add_argument("--rounds", type=int, default=3, help="vs-workerd: alternating rounds")
    p.add_argument("--cycles", type=int, default=4, help="evict-tail: cycles")
    p.add_argument("--front", default="slots",
                   help='vs-workerd: [http] front values to measure, comma-separated (e.g. '
                        '"slots,gateways"; "slots:broker": slots with [broker] peer_calls = '
                        'false; the first is reported as "durable")')
    p.add_argument("--kills", type=int, default=20, help="cluster: hosts SIGKILLed, one by one")
    p.add_argument("--lease", type=float, default=5.0, help="cluster: the slot lease (s)")
    p.add_argument("--objects", type=int, default=1_000_000,
                   help="query, cold: objects of 3 keys stored first")
    p.add_argument("--backup-mib", type=int, default=1024, help="backup: data to write first")
    p.add_argument("--http-processes", type=int, default=1, help="http: gateway processes")
    p.add_argument("--slots", type=int, default=1, help="rpc: object processes to start")
    p.add_argument("--broker-path", action="store_true",
                   help="rpc: the client calls through the broker (durable.connect(direct="
                        "False)), not straight to the object processes")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI smoke runs")
    p.add_argument("--repeat", type=int, default=1, help="run N times; report medians")
    p.add_argument("--low-latency-idle", action="store_true",
                   help="hold /dev/cpu_dma_latency at 0 during the run, as the daemon's "
                        "low_latency_idle setting does (needs root)")
    args = p.parse_args(argv)
    from harness import machine_speed
    speed = [machine_speed()]  # (again after the runs: the VM's speed drifts)
    held = None
    if args.low_latency_idle:
        from durable.supervisor import cpu_latency

        held = cpu_latency.hold()
        if held is None:
            p.error("--low-latency-idle: cannot write /dev/cpu_dma_latency (run as root)")
    if args.suite == "storage":
        runs = [storage_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "rpc":
        runs = [rpc_suite(args.quick, args.slots, not args.broker_path)
                for _ in range(args.repeat)]
    elif args.suite == "alarms":
        runs = [alarms_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "websockets":
        runs = [websockets_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "testing":
        runs = [testing_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "metrics":
        runs = [metrics_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "backup":
        runs = [backup_suite(args.quick, args.backup_mib) for _ in range(args.repeat)]
    elif args.suite == "query":
        runs = [query_suite(args.quick, args.objects) for _ in range(args.repeat)]
    elif args.suite == "cold":
        runs = [cold_suite(args.quick, args.objects) for _ in range(args.repeat)]
    elif args.suite == "cluster":
        runs = [cluster_suite(args.quick, 2 if args.quick else args.kills, args.lease)
                for _ in range(args.repeat)]
    elif args.suite == "idle":
        runs = [idle_suite(args.quick, args.workerd) for _ in range(args.repeat)]
    elif args.suite == "evict-tail":
        runs = [evict_tail_suite(args.quick, 1 if args.quick else args.cycles)
                for _ in range(args.repeat)]
    elif args.suite == "calls":
        runs = [calls_suite(args.quick) for _ in range(args.repeat)]
    elif args.suite == "vs-workerd":
        fronts = tuple(f.strip() for f in args.front.split(",") if f.strip())
        runs = [vs_workerd_suite(args.quick, args.workerd, args.rounds, fronts)
                for _ in range(args.repeat)]
    else:
        runs = [http_suite(args.quick, args.slots, args.http_processes) for _ in range(args.repeat)]
    if held is not None:
        held.close()
    result = {"suite": args.suite, "quick": args.quick, "repeat": args.repeat,
              "low_latency_idle": args.low_latency_idle,
              "python": sys.version.split()[0], "cpus": os.cpu_count(),
              "python_10m_additions_s": [*speed, machine_speed()],
              "median": median_of(runs)}
    if args.repeat > 1:
        result["runs"] = runs
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
