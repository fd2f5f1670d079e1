"""A slot's side of ``durable sql``, ``durable export`` and ``list_objects`` (docs/query.md).

The engine that runs a user's SQL is not here: it runs in the caller's
process (``durable.query``), over rows that each slot streams to it. A slot
only ever *reads* its files, and only through a snapshot:

1. :meth:`SlotStore.capture` begins a DuckDB read transaction and takes the
   log records that DuckDB may lack, up to ``cut_seq`` (every write
   acknowledged before the request).
2. Those records are folded into small Arrow tables (``durable_ov*``) and
   laid over the snapshot in SQL: a row the overlay wrote or an object it
   cleared comes from the overlay, every other from DuckDB. So a query sees
   each slot at one point, with nothing partial and nothing unacknowledged.
3. A thread of its own (nice 10, DuckDB on one thread) runs the snapshot's
   query and pushes Arrow IPC batches, at most :data:`_HWM` ahead of the
   reader, over a PUSH socket bound in the daemon's 0700 run dir. The loop
   thread never waits for it, so object calls go on.

Why rows and not SQL: each slot's DuckDB file is locked by its own process,
and an arbitrary query (a join, a ``GROUP BY``) cannot be split into per-slot
parts in general. Shipping rows keeps the daemon's part simple and bounded,
and puts a query's CPU and memory in the process that asked for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import orjson
import zmq

from durable import codec, pushdown
from durable.osthread import name_os_thread

from .storage.duck import KV_ROWS, name_rows, order_key
from .storage.duck import NAME_PREFIX as _NAME_BYTES
from .storage.log import ALARM_DELETE, WriteSet
from .storage.slot import SlotStore, fold

if TYPE_CHECKING:  # (imported where used: pyarrow costs an object process ~0.3 s to start)
    import pyarrow as pa

log = logging.getLogger("durable.objectproc")

__all__ = ["QUERY_METHOD", "QUERY_URL", "NAME_PREFIX", "SnapshotStream", "list_objects",
           "namespace_ranges", "MAX_SNAPSHOTS"]

QUERY_METHOD = "QUERY"
QUERY_URL = "durable:query"
#: Where object names are kept (objectproc/loop.py stores them there, beside each object).
NAME_PREFIX = _NAME_BYTES.decode()
#: Snapshots one object process streams at once; more wait (see loop.py) or are refused.
MAX_SNAPSHOTS = 2
_HWM = 8  # batches queued towards a reader (~2 MB each): bounds the slot's memory per query
_BATCH_ROWS = 16_384  # (65,536: twice the time, and the GIL held up to 4 ms at a time, measured)
_NICE = 10

@dataclass(frozen=True, slots=True)
class Overlay:
    """Records DuckDB's snapshot may lack, folded: rows to lay over it, objects it cleared,
    alarm changes (due ms, or a negative number: deleted)."""

    rows: pa.Table
    clears: pa.Table
    alarms: pa.Table

    @classmethod
    def of(cls, records: list[WriteSet]) -> Overlay:
        rows: dict[bytes, tuple[bytes, bytes | None, int | None]] = {}
        clears: set[bytes] = set()
        alarms: dict[bytes, int] = {}
        fold(records, rows, clears, alarms)
        import pyarrow as pa
        schema = pa.schema([("pk", pa.binary()), ("obj", pa.binary()), ("v", pa.binary()),
                            ("t", pa.int64())])
        return cls(
            pa.table([pa.array(list(rows), pa.binary()),
                      pa.array([r[0] for r in rows.values()], pa.binary()),
                      pa.array([r[1] for r in rows.values()], pa.binary()),
                      pa.array([r[2] for r in rows.values()], pa.int64())], schema=schema),
            pa.table({"obj": pa.array(sorted(clears), pa.binary())}),
            pa.table({"obj": pa.array(list(alarms), pa.binary()),
                      "due": pa.array([ALARM_DELETE if d < 0 else d for d in alarms.values()],
                                      pa.int64())}))

    @property
    def empty(self) -> bool:
        return not (self.rows.num_rows or self.clears.num_rows or self.alarms.num_rows)

    def register(self, cur: duckdb.DuckDBPyConnection) -> None:
        cur.register("durable_ov", self.rows)
        cur.register("durable_ovc", self.clears)
        cur.register("durable_ova", self.alarms)


def namespace_ranges(namespace: str | None) -> list[tuple[bytes, bytes]]:
    """``obj`` ranges holding a namespace's objects and their names (all, for None)."""
    if namespace is None:
        return []
    return [(f"{namespace}/".encode(), f"{namespace}0".encode()),  # ("0" follows "/")
            (f"{NAME_PREFIX}{namespace}/".encode(), f"{NAME_PREFIX}{namespace}0".encode())]


def _where(ranges: list[tuple[bytes, bytes]], params: dict[str, Any], col: str = "obj") -> str:
    if not ranges:
        return "TRUE"
    parts = []
    for i, (lo, hi) in enumerate(ranges):
        params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        parts.append(f"({col} >= $lo{i} AND {col} < $hi{i})")
    return "(" + " OR ".join(parts) + ")"


def _live_kv(ov: Overlay, where: str, cols: str = "pk, obj, v, t", *,
             tombstones: bool = False, kv: str = "kv") -> str:
    """Live rows of the snapshot with the overlay laid over them (and deleted keys' rows,
    ``v`` NULL, with ``tombstones``); ``kv``: the rows read (KV_ROWS: with the name rows,
    which are kept in ``objects``, objectproc/storage/duck.py, NAME_PREFIX)."""
    where = where if tombstones else f"v IS NOT NULL AND {where}"
    if ov.empty:
        return f"SELECT {cols} FROM {kv} WHERE {where}"
    return (f"SELECT {cols} FROM {kv} WHERE {where} "
            "AND pk NOT IN (SELECT pk FROM durable_ov) AND obj NOT IN (SELECT obj FROM durable_ovc) "
            f"UNION ALL SELECT {cols} FROM durable_ov WHERE {where}")


def _live_alarms(ov: Overlay, where: str) -> str:
    if ov.empty:
        return f"SELECT obj, due FROM alarms WHERE {where}"
    return (f"SELECT obj, due FROM alarms WHERE {where} "
            "AND obj NOT IN (SELECT obj FROM durable_ova) "
            f"UNION ALL SELECT obj, due FROM durable_ova WHERE due >= 0 AND {where}")


def _data_where(namespace: str | None, params: dict[str, Any]) -> str:
    """Rows of ``namespace`` (all, for None) but not the name rows."""
    params["nlo"], params["nhi"] = NAME_PREFIX.encode(), NAME_PREFIX[:-1].encode() + b"`"
    return f"NOT (obj >= $nlo AND obj < $nhi) AND {_where(namespace_ranges(namespace), params)}"


def snapshot_sql(what: str, ov: Overlay, namespace: str | None,
                 split: pushdown.Plan | None = None) -> tuple[str, dict[str, Any]]:
    """The query a slot streams for ``what``: ``kv`` rows as ``(pk, v, t)`` (``data``: without
    the name rows), ``alarms`` as
    ``(obj, due)``, bytes as stored. The reader splits them (``durable.query``): doing it
    here would cost the slot ~3x the CPU (UTF-8 checks and string splits, measured).
    ``agg``: the partial rows of a query's per-slot aggregates (``split``, planned by
    ``durable.pushdown``), which needs the split columns, but only reads them here, once."""
    params: dict[str, Any] = {}
    where = _where(namespace_ranges(namespace), params)
    if what == "kv":
        return f"SELECT pk, v, t FROM ({_live_kv(ov, where, kv=KV_ROWS)})", params
    if what in ("data", "agg"):  # (kv without the name rows: for a query that reads no names)
        params.clear()
        where = _data_where(namespace, params)
        if what == "data":
            return f"SELECT pk, v, t FROM ({_live_kv(ov, where)})", params
        if split is None:
            raise ValueError("what=agg needs q=QUERY, a query that a slot aggregates "
                             "(docs/query.md)")
        # The columns as durable.query's kv view has them (ids and namespaces are ASCII, so
        # the key starts at the same character as byte); durable_obj: namespace/id as stored;
        # durable_text: the value's JSON text, for JSON functions (durable.pushdown).
        view = ("SELECT split_part(decode(obj), '/', 1) AS namespace, "
                "split_part(decode(obj), '/', 2) AS object_id, "
                "decode(pk)[octet_length(obj) + 2:] AS key, decode(v)::JSON AS value, "
                "make_timestamp(t * 1000) AS updated_at, obj AS durable_obj, "
                "decode(v) AS durable_text "
                f"FROM ({_live_kv(ov, where)})")
        return f"WITH {pushdown.SLOT_VIEW} AS ({view}) {split.slot_sql}", params
    if what == "names":  # (the name rows only: what the alarms view needs besides alarms)
        ranges = (namespace_ranges(namespace)[1:] if namespace else
                  [(NAME_PREFIX.encode(), NAME_PREFIX[:-1].encode() + b"`")])  # "`" follows "_"
        return (f"SELECT pk, v, t FROM ({_live_kv(ov, _where(ranges, params), kv=KV_ROWS)})",
                params)
    if what == "alarms":
        return f"SELECT obj, due FROM ({_live_alarms(ov, where)})", params
    raise ValueError(f"what must be kv, data, names or alarms, got {what!r}")


def objects_sql(ov: Overlay, namespace: str | None) -> tuple[str, dict[str, Any]]:
    """How many objects hold a key in the snapshot (for an export's manifest: counting them
    here, beside their rows, costs the slot ~0.3 s per million rows; the reader would
    spend ~1.2 s on the same 3M rows as text)."""
    params: dict[str, Any] = {}
    where = _data_where(namespace, params)
    return f"SELECT count(DISTINCT obj) FROM ({_live_kv(ov, where, 'obj')})", params


def list_objects(cur: duckdb.DuckDBPyConnection, ov: Overlay, namespace: str, *,
                 start_after: str | None, limit: int, prefix: str | None) -> list[list[Any]]:
    """One slot's first ``limit`` objects of ``namespace`` after ``start_after`` (by id), as
    ``[id, name, keys, bytes, last write ms, alarm due ms]``; only objects holding a key or
    an alarm (a deleted object holds neither). ``prefix``: only names starting with it.

    From the ``objects`` table the applier keeps (objectproc/storage/duck.py): a top-N of
    one small row per object, rather than of every key's row. The objects the overlay
    touches are counted again from their rows, as the overlay leaves them.
    """
    ov.register(cur)
    lo, hi = f"{namespace}/{start_after or ''}".encode(), f"{namespace}0".encode()
    touched = sorted(o for o in _overlay_objects(ov) if lo < o < hi)
    fresh = _count_objects(cur, ov, touched)
    base = _objects_page(cur, namespace, lo, limit + len(touched), prefix)
    skip = set(touched)
    rows = [r for r in base if bytes(r[0]) not in skip]
    rows += [r for r in fresh if r[1] > 0 or r[4] is not None]
    if prefix:
        rows = [r for r in rows if _name(r[5]) is not None and _name(r[5]).startswith(prefix)]
    rows.sort(key=lambda r: bytes(r[0]))
    cut = len(namespace) + 1
    return [[bytes(obj)[cut:].decode(), _name(name), keys, nbytes, t, due]
            for obj, keys, nbytes, t, due, name in rows[:limit]]


def _objects_page(cur: duckdb.DuckDBPyConnection, namespace: str, lo: bytes, want: int,
                  prefix: str | None) -> list[tuple[Any, ...]]:
    """The first ``want`` rows of ``objects`` after ``lo`` in ``namespace`` (holding a key or
    an alarm; named with ``prefix``), by ``obj``.

    In two steps: a top-N of the order key ``k`` alone, then the rows from the first ``k``
    to the last, so that only those rows are read whole (a top-N of the rows themselves
    reads every row of the namespace whole). Equal ``k`` (ids alike in their first bytes)
    only widen the second step; rows at or before ``lo`` are dropped after it.
    """
    live = "(keys > 0 OR due IS NOT NULL)"
    params: dict[str, Any] = {"ns": namespace, "ka": order_key(lo)[1]}
    if prefix:
        live += " AND starts_with(json_extract_string(decode(name), '$'), $prefix)"
        params["prefix"] = prefix
    m = want + 1
    while True:
        params["m"] = m
        ks = cur.execute(f"SELECT k FROM objects WHERE ns = $ns AND k >= $ka AND {live} "
                         "ORDER BY k LIMIT $m", params).fetchall()
        if not ks:
            return []
        rows = cur.execute(
            "SELECT obj, keys, bytes, t, due, name FROM objects WHERE ns = $ns "
            f"AND k >= $ka AND k <= $kz AND {live}",
            {**{k: v for k, v in params.items() if k != "m"}, "kz": ks[-1][0]}).fetchall()
        rows = sorted((r for r in rows if bytes(r[0]) > lo), key=lambda r: bytes(r[0]))
        if len(rows) >= want or len(ks) < m:
            return rows[:want]
        m *= 4  # (the rows at `lo`'s own k took places: rare)


def _name(stored: bytes | None) -> str | None:
    """A stored name (the codec's form of a str: JSON text)."""
    return None if stored is None else codec.decode(stored)


def _overlay_objects(ov: Overlay) -> set[bytes]:
    """The objects whose rows, alarm or name the overlay changes."""
    out: set[bytes] = set()
    for col in (ov.rows.column("obj"), ov.clears.column("obj"), ov.alarms.column("obj")):
        for obj in col.to_pylist():
            out.add(obj[len(NAME_PREFIX):] if obj.startswith(_NAME_BYTES) else obj)
    return out


def _count_objects(cur: duckdb.DuckDBPyConnection, ov: Overlay,
                   objs: list[bytes]) -> list[tuple[Any, ...]]:
    """``(obj, keys, bytes, t, due, name)`` of these objects, from their rows with the overlay
    laid over them (as the ``objects`` table would hold them once the overlay is applied)."""
    if not objs:
        return []
    params = {f"o{i}": o for i, o in enumerate(objs)}
    names = {f"n{i}": _NAME_BYTES + o for i, o in enumerate(objs)}
    inlist = ", ".join(f"$o{i}" for i in range(len(objs)))
    stats = {o: [0, 0, None, None, None] for o in objs}
    for obj, size, t in cur.execute(  # (a deleted key's write is a write: its time counts)
            "SELECT obj, octet_length(pk) - octet_length(obj) - 1 + octet_length(v), t "
            f"FROM ({_live_kv(ov, f'obj IN ({inlist})', tombstones=True)})", params).fetchall():
        st = stats[bytes(obj)]
        if size is not None:
            st[0] += 1
            st[1] += size
        if t is not None and (st[2] is None or t > st[2]):
            st[2] = t
    for obj, due in cur.execute(f"SELECT obj, due FROM ({_live_alarms(ov, f'obj IN ({inlist})')})",
                                params).fetchall():
        stats[bytes(obj)][3] = due
    # (these objects' names only, through the index of `objects`: not a scan of all names)
    names.update(params)
    kv = f"(SELECT pk, obj, v, t FROM kv UNION ALL {name_rows(f'obj IN ({inlist})')})"
    named = _live_kv(ov, "obj IN (" + ", ".join(f"$n{i}" for i in range(len(objs))) + ")",
                     kv=kv)
    for obj, v in cur.execute(f"SELECT obj, v FROM ({named}) "
                              "WHERE octet_length(pk) = octet_length(obj) + 5", names).fetchall():
        stats[bytes(obj)[len(NAME_PREFIX):]][4] = v
    return [(o, *st) for o, st in stats.items()]


def _ipc(batch: pa.RecordBatch) -> pa.Buffer:
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def _bind(sock: zmq.Socket[Any], run_dir: Path, slot: int) -> str:
    """Bind in the run dir under a name of 12 characters at most: as long as "workers.sock",
    whose path the configuration checks against the 107-byte limit of ipc paths."""
    for _ in range(5):
        name = f"q{slot}-" + secrets.token_hex(8)[:max(4, 10 - len(str(slot)))]
        endpoint = f"ipc://{run_dir / name}"
        try:
            sock.bind(endpoint)
            return endpoint
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
    raise OSError(f"no free socket name for a query in {run_dir}")


class SnapshotStream:
    """One snapshot streamed to one reader, from a thread of its own.

    Made on the loop thread (which captures the snapshot and binds the
    socket, so that the reply can name it); :meth:`start` hands both to the
    thread. Ends by itself: at the end of the rows, after ``timeout`` seconds
    in all, or once the reader has taken nothing for ``stall`` seconds.
    """

    def __init__(self, store: SlotStore, ctx: zmq.Context[Any], run_dir: Path, what: str,
                 namespace: str | None, *, timeout: float, stall: float = 30.0,
                 split: pushdown.Plan | None = None, count_objects: bool = False) -> None:
        self.what, self.namespace, self.split = what, namespace, split
        self.count_objects = count_objects
        self.deadline = time.monotonic() + timeout
        self.stall = stall
        self.cancelled = False
        self.thread: threading.Thread | None = None
        self.cursor = store.duck._con.cursor()
        try:
            records, self.applied_seq, self.cut_seq = store.capture(self.cursor)
            self.overlay = Overlay.of(records)
            self.sock = ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.SNDHWM, _HWM)
            self.sock.setsockopt(zmq.LINGER, int(stall * 1000))
            self.endpoint = _bind(self.sock, run_dir, store.slot)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self.cursor.close()
            raise
        self.rows = 0

    def start(self, done: Callable[[SnapshotStream, BaseException | None], None]) -> None:
        self.thread = threading.Thread(target=self._run, args=(done,), name="durable-snapshot",
                                       daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """End it soon (the process stops): from any thread; join ``thread`` after."""
        self.cancelled = True
        with contextlib.suppress(Exception):
            self.cursor.interrupt()

    def _send(self, frames: list[Any]) -> None:
        """Send once the reader has room; give up if it takes nothing for ``stall`` s."""
        since = time.monotonic()
        while not self.sock.poll(100, zmq.POLLOUT):
            if self.cancelled:
                raise RuntimeError("the object process is stopping")
            if time.monotonic() - since > self.stall:
                raise TimeoutError(f"the reader took nothing for {self.stall:g} s")
        self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _run(self, done: Callable[[SnapshotStream, BaseException | None], None]) -> None:
        name_os_thread()
        error: BaseException | None = None
        with contextlib.suppress(OSError):  # (this thread only: objects' calls keep priority)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        try:
            self.overlay.register(self.cursor)
            sql, params = snapshot_sql(self.what, self.overlay, self.namespace, self.split)
            reader = self.cursor.sql(sql, params=params).to_arrow_reader(_BATCH_ROWS)
            for batch in reader:
                if time.monotonic() > self.deadline:
                    raise TimeoutError("the query's time ran out while its rows were sent")
                self._send([b"D", _ipc(batch)])
                self.rows += batch.num_rows
            end = {"rows": self.rows, "applied_seq": self.applied_seq, "cut_seq": self.cut_seq}
            if self.count_objects:
                sql, params = objects_sql(self.overlay, self.namespace)
                end["objects"] = self.cursor.execute(sql, params).fetchone()[0]
            self._send([b"E", orjson.dumps(end)])
        except BaseException as e:  # noqa: BLE001  (reported to the reader, then to done())
            error = e
            with contextlib.suppress(zmq.ZMQError):  # (a reader that stopped reading: dropped)
                self.sock.send_multipart([b"X", f"{type(e).__name__}: {e}".encode()],
                                         flags=zmq.NOBLOCK)
        finally:
            with contextlib.suppress(duckdb.Error):
                self.cursor.execute("ROLLBACK")
            with contextlib.suppress(duckdb.Error):
                self.cursor.close()
            if error is not None:
                self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.close()
            done(self, error)
