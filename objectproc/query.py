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
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import zmq

from .storage.log import ALARM_DELETE, WriteSet
from .storage.slot import SlotStore, fold

log = logging.getLogger("durable.objectproc")

__all__ = ["QUERY_METHOD", "QUERY_URL", "NAME_PREFIX", "SnapshotStream", "list_objects",
           "namespace_ranges", "MAX_SNAPSHOTS"]

QUERY_METHOD = "QUERY"
QUERY_URL = "durable:query"
#: Where object names are kept (objectproc/loop.py stores them there, beside each object).
NAME_PREFIX = "_durable_name_"
#: Snapshots one object process streams at once; more wait (see loop.py) or are refused.
MAX_SNAPSHOTS = 2
_HWM = 4  # batches queued towards a reader: bounds the slot's memory per query
_BATCH_ROWS = 65_536
_NICE = 10

_EMPTY_ROWS = pa.schema([("pk", pa.binary()), ("obj", pa.binary()), ("v", pa.binary()),
                         ("t", pa.int64())])


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
        return cls(
            pa.table([pa.array(list(rows), pa.binary()),
                      pa.array([r[0] for r in rows.values()], pa.binary()),
                      pa.array([r[1] for r in rows.values()], pa.binary()),
                      pa.array([r[2] for r in rows.values()], pa.int64())], schema=_EMPTY_ROWS),
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


def _live_kv(ov: Overlay, where: str, cols: str = "pk, obj, v, t") -> str:
    """Live rows of the snapshot with the overlay laid over them."""
    if ov.empty:
        return f"SELECT {cols} FROM kv WHERE v IS NOT NULL AND {where}"
    return (f"SELECT {cols} FROM kv WHERE v IS NOT NULL AND {where} "
            "AND pk NOT IN (SELECT pk FROM durable_ov) AND obj NOT IN (SELECT obj FROM durable_ovc) "
            f"UNION ALL SELECT {cols} FROM durable_ov WHERE v IS NOT NULL AND {where}")


def _live_alarms(ov: Overlay, where: str) -> str:
    if ov.empty:
        return f"SELECT obj, due FROM alarms WHERE {where}"
    return (f"SELECT obj, due FROM alarms WHERE {where} "
            "AND obj NOT IN (SELECT obj FROM durable_ova) "
            f"UNION ALL SELECT obj, due FROM durable_ova WHERE due >= 0 AND {where}")


def snapshot_sql(what: str, ov: Overlay, namespace: str | None) -> tuple[str, dict[str, Any]]:
    """The query a slot streams for ``what`` (``kv`` or ``alarms``): text columns, split ids."""
    params: dict[str, Any] = {}
    where = _where(namespace_ranges(namespace), params)
    if what == "kv":
        return ("SELECT split_part(o, '/', 1) AS namespace, split_part(o, '/', 2) AS object_id, "
                "p[length(o) + 2:] AS key, decode(v) AS value, t "
                f"FROM (SELECT decode(obj) AS o, decode(pk) AS p, v, t FROM ({_live_kv(ov, where)}))",
                params)
    if what == "alarms":
        return ("SELECT split_part(o, '/', 1) AS namespace, split_part(o, '/', 2) AS object_id, due "
                f"FROM (SELECT decode(obj) AS o, due FROM ({_live_alarms(ov, where)}))", params)
    raise ValueError(f"what must be kv or alarms, got {what!r}")


def list_objects(cur: duckdb.DuckDBPyConnection, ov: Overlay, namespace: str, *,
                 start_after: str | None, limit: int, prefix: str | None) -> list[list[Any]]:
    """One slot's first ``limit`` objects of ``namespace`` after ``start_after`` (by id), as
    ``[id, name, keys, bytes, last write ms, alarm due ms]``; only objects holding a key or
    an alarm (a deleted object holds neither)."""
    ov.register(cur)
    params: dict[str, Any] = {"lo": f"{namespace}/{start_after or ''}".encode(),
                              "hi": f"{namespace}0".encode(), "n": limit,
                              "nlo": f"{NAME_PREFIX}{namespace}/".encode(),
                              "nhi": f"{NAME_PREFIX}{namespace}0".encode(),
                              "nskip": len(NAME_PREFIX)}
    rng = "obj > $lo AND obj < $hi"
    names = ("SELECT encode(decode(obj)[$nskip + 1:]) AS obj, "
             "json_extract_string(decode(v), '$') AS name "
             f"FROM ({_live_kv(ov, 'obj >= $nlo AND obj < $nhi', 'pk, obj, v, t')})")
    head = (f"WITH live AS ({_live_kv(ov, rng)}), "
            "agg AS (SELECT obj, count(*) AS keys, "
            "sum(octet_length(pk) - octet_length(obj) - 1 + octet_length(v)) AS bytes, "
            "max(t) AS t FROM live GROUP BY obj), "
            f"al AS ({_live_alarms(ov, rng)}), "
            f"names AS ({names}), "
            "every AS (SELECT coalesce(agg.obj, al.obj) AS obj, coalesce(keys, 0) AS keys, "
            "coalesce(bytes, 0) AS bytes, t, due FROM agg FULL OUTER JOIN al ON agg.obj = al.obj)")
    if prefix:
        params["prefix"] = prefix
        sql = (f"{head} SELECT every.obj, name, keys, bytes, t, due FROM every "
               "JOIN names ON every.obj = names.obj WHERE starts_with(name, $prefix) "
               "ORDER BY every.obj LIMIT $n")
    else:
        sql = (f"{head} SELECT first.obj, name, keys, bytes, t, due FROM "
               "(SELECT * FROM every ORDER BY obj LIMIT $n) first "
               "LEFT JOIN names ON first.obj = names.obj ORDER BY first.obj")
    rows = cur.execute(sql, params).fetchall()
    cut = len(namespace) + 1
    return [[bytes(o)[cut:].decode(), name, keys, int(nbytes), t, due]
            for o, name, keys, nbytes, t, due in rows]


def _ipc(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


class SnapshotStream:
    """One snapshot streamed to one reader, from a thread of its own.

    Made on the loop thread (which captures the snapshot and binds the
    socket, so that the reply can name it); :meth:`start` hands both to the
    thread. Ends by itself: at the end of the rows, after ``timeout`` seconds
    in all, or once the reader has taken nothing for ``stall`` seconds.
    """

    def __init__(self, store: SlotStore, ctx: zmq.Context[Any], run_dir: Path, what: str,
                 namespace: str | None, *, timeout: float, stall: float = 30.0) -> None:
        self.what, self.namespace = what, namespace
        self.deadline = time.monotonic() + timeout
        self.cursor = store.duck._con.cursor()
        try:
            records, self.applied_seq, self.cut_seq = store.capture(self.cursor)
            self.overlay = Overlay.of(records)
            self.endpoint = f"ipc://{run_dir / f'q-{store.slot}-{secrets.token_hex(8)}.sock'}"
            self.sock = ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.SNDHWM, _HWM)
            self.sock.setsockopt(zmq.SNDTIMEO, int(stall * 1000))
            self.sock.setsockopt(zmq.LINGER, int(stall * 1000))
            self.sock.bind(self.endpoint)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self.cursor.close()
            raise
        self.rows = 0

    def start(self, done: Callable[[SnapshotStream, BaseException | None], None]) -> None:
        threading.Thread(target=self._run, args=(done,), name="durable-snapshot",
                         daemon=True).start()

    def _run(self, done: Callable[[SnapshotStream, BaseException | None], None]) -> None:
        error: BaseException | None = None
        with contextlib.suppress(OSError):  # (this thread only: objects' calls keep priority)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        try:
            self.overlay.register(self.cursor)
            sql, params = snapshot_sql(self.what, self.overlay, self.namespace)
            reader = self.cursor.sql(sql, params=params).to_arrow_reader(_BATCH_ROWS)
            for batch in reader:
                if time.monotonic() > self.deadline:
                    raise TimeoutError("the query's time ran out while its rows were sent")
                self.sock.send_multipart([b"D", _ipc(batch)], copy=False)
                self.rows += batch.num_rows
            self.sock.send_multipart([b"E", orjson.dumps(
                {"rows": self.rows, "applied_seq": self.applied_seq, "cut_seq": self.cut_seq})])
        except BaseException as e:  # noqa: BLE001  (reported to the reader, then to done())
            error = e
            if not isinstance(e, zmq.Again):  # (a reader that stopped reading hears nothing)
                with contextlib.suppress(zmq.ZMQError):
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
