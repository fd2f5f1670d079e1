"""`durable import SRC`: an export (``durable export``) laid out as a new data dir.

Every row is checked before anything is written where the daemon would
look: the namespace and the object id have the right form, the key and the
value fit the configured limits, and the value is one that the codec wrote
(decoded, then encoded again, so it is stored exactly as the daemon would
store it and comes back with its exact Python type). Objects go to the
slots the ring gives them for the configured slot count, with their names
and alarms; the data dir gets the export's id secret, so every object keeps
its id. A failure leaves the data dir as empty as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from durable import codec
from durable.broker.ring import Ring
from durable.fsutil import fsync_dir, write_durably
from durable.objectproc.storage.duck import DuckStore
from durable.query import EXPORT_FORMAT, EXPORT_MANIFEST, NAME_PREFIX

from .config import Config
from .datadir import LOCK_FILE, lock_data_dir, open_data_dir

__all__ = ["ImportError_", "import_export"]

_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OBJECT_ID = re.compile(r"[0-9a-f]{64}\Z")
_BATCH = 100_000


class ImportError_(Exception):  # (not the builtin ImportError: nothing failed to import)
    """The export cannot be imported; the message names the file, the row and what to do."""


def _rows_sql(src: Path, manifest: dict[str, Any], name: str) -> str:
    fmt = manifest.get("file_format")
    path = str(src / f"{name}.{'parquet' if fmt == 'parquet' else 'jsonl'}").replace("'", "''")
    if fmt == "parquet":
        source = f"read_parquet('{path}')"
    elif fmt == "jsonl":
        cols = ("{namespace: 'VARCHAR', object_id: 'VARCHAR', object_name: 'VARCHAR', "
                + ("key: 'VARCHAR', value: 'JSON', updated_at: 'TIMESTAMP'}" if name == "kv"
                   else "scheduled_at: 'TIMESTAMP'}"))
        source = f"read_json('{path}', format = 'newline_delimited', columns = {cols})"
    else:
        raise ImportError_(f"{src / EXPORT_MANIFEST}: file_format must be parquet or jsonl, "
                           f"got {fmt!r}")
    if name == "kv":
        return ("SELECT namespace, object_id, object_name, key, value::VARCHAR, "
                f"epoch_ms(updated_at) FROM {source}")
    return f"SELECT namespace, object_id, object_name, epoch_ms(scheduled_at) FROM {source}"


class _Batch:
    """Rows for one slot's DuckDB file, inserted together through Arrow (no per-row SQL)."""

    def __init__(self) -> None:
        self.pk: list[bytes] = []
        self.obj: list[bytes] = []
        self.v: list[bytes] = []
        self.t: list[int | None] = []

    def add(self, obj: bytes, key: bytes, value: bytes, t: int | None) -> None:
        self.pk.append(obj + b"/" + key)
        self.obj.append(obj)
        self.v.append(value)
        self.t.append(t)

    def flush(self, store: DuckStore) -> None:
        if not self.pk:
            return
        table = pa.table({"pk": pa.array(self.pk, pa.binary()),
                          "obj": pa.array(self.obj, pa.binary()),
                          "v": pa.array(self.v, pa.binary()), "t": pa.array(self.t, pa.int64())})
        try:
            store.insert_new(table)
        except duckdb.ConstraintException as e:
            raise ImportError_(f"the export holds a key twice ({e}); it was not written by "
                               "`durable export`, or was changed since") from None
        self.__init__()


def _key(src: str, row: int, key: Any, limits: Any) -> bytes:
    if type(key) is not str:
        raise ImportError_(f"{src} row {row}: key {key!r} is not text")
    try:
        kb = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ImportError_(f"{src} row {row}: key {key!r} is not UTF-8: {e}") from None
    if len(kb) > limits.max_key_bytes:
        raise ImportError_(f"{src} row {row}: key is {len(kb)} bytes; keys are limited to "
                           f"{limits.max_key_bytes} bytes")
    return kb


def _value(src: str, row: int, value: Any, limits: Any) -> bytes:
    # (SQL NULL: a JSON null that read_json gave as NULL; exported rows all have values)
    try:
        raw = b"null" if value is None else value.encode("utf-8")
        v = codec.encode(codec.decode(raw))
    except (ValueError, TypeError, AttributeError) as e:
        raise ImportError_(f"{src} row {row}: the value is not one durable stores: "
                           f"{e}") from None
    if len(v) > limits.max_value_bytes:
        raise ImportError_(f"{src} row {row}: value is {len(v)} bytes; values are limited "
                           f"to {limits.max_value_bytes} bytes")
    return v


def _check_object(where: str, namespace: Any, object_id: Any) -> None:
    if type(namespace) is not str or not _NAMESPACE.match(namespace) or namespace.startswith("_durable"):
        raise ImportError_(f"{where}: namespace {namespace!r} is not an identifier")
    if type(object_id) is not str or not _OBJECT_ID.match(object_id):
        raise ImportError_(f"{where}: object id {object_id!r} is not 64 lowercase hex digits")


def import_export(config: Config, src: Path, *, say: Callable[[str], None] = lambda _m: None
                  ) -> dict[str, Any]:
    """Lay the export ``src`` out as the configured data dir, which must be new or empty."""
    src = src.absolute()
    try:
        manifest = orjson.loads((src / EXPORT_MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ImportError_(f"{src} has no {EXPORT_MANIFEST}: it is not a finished "
                           "`durable export`") from None
    except orjson.JSONDecodeError as e:
        raise ImportError_(f"{src / EXPORT_MANIFEST} is damaged: {e}") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise ImportError_(f"{src / EXPORT_MANIFEST} is not a durable export "
                           f"({manifest.get('format')!r})")
    data = config.data_path
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise ImportError_(f"data dir {data} is not empty; import only into a new or empty data "
                           "dir (set data_dir to one, or move this one's files away)")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = lock_data_dir(data)  # (a daemon started meanwhile is refused, and we are by it)
    try:
        return _import(config, src, manifest, data, say)
    except BaseException as e:
        for item in data.iterdir():  # leave it as empty as it was
            if item.name == LOCK_FILE:
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        if isinstance(e, Exception):  # (the refusals before the try touched nothing)
            what = str(e) if isinstance(e, ImportError_) else f"{type(e).__name__}: {e}"
            raise ImportError_(f"{what}; the data dir was left empty") from e
        raise
    finally:
        os.close(lock)


def _import(config: Config, src: Path, manifest: dict[str, Any], data: Path,
            say: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    identity = open_data_dir(data)  # (a new identity and secret)
    secret = src / "secret"
    if secret.exists():  # the export's: every object keeps its id
        write_durably(data / "secret", secret.read_bytes())
    else:
        say("the export holds no id secret: this data dir has a new one, so names lead to "
            "other ids than the exported objects'")
    ring = Ring(config.slots)
    stores = []
    for n in range(config.slots):
        store = DuckStore(data / f"slot-{n}.duckdb")
        store.set_meta_text("data_dir_id", identity.id)
        (data / f"slot-{n}.log").mkdir(mode=0o700, exist_ok=True)
        stores.append(store)
    limits = config.limits
    slot_of: dict[str, int] = {}
    # obj -> (slot, name): a name row is written after the rows (the slot's next open moves
    # it into its table of objects, which keeps names without a write time).
    named: dict[bytes, tuple[int, Any]] = {}
    rows = objects_seen = 0
    namespaces: set[str] = set()
    reader = duckdb.connect(config={"threads": 2, "autoinstall_known_extensions": False,
                                    "autoload_known_extensions": False})
    try:
        batches = [_Batch() for _ in range(config.slots)]
        label = str(src / f"kv.{'parquet' if manifest.get('file_format') == 'parquet' else 'jsonl'}")
        last = time.monotonic()
        try:
            result = reader.execute(_rows_sql(src, manifest, "kv")).fetchmany
        except duckdb.Error as e:
            raise ImportError_(f"{src}: the rows cannot be read: {e}") from None
        while True:
            try:
                chunk = result(_BATCH)
            except duckdb.Error as e:
                raise ImportError_(f"{src}: the rows cannot be read: {e}") from None
            if not chunk:
                break
            for namespace, object_id, name, key, value, t in chunk:
                rows += 1
                slot = slot_of.get(object_id)
                if slot is None:
                    _check_object(f"{label} row {rows}", namespace, object_id)
                    slot = slot_of[object_id] = ring.slot_for(object_id)
                    objects_seen += 1
                    namespaces.add(namespace)
                elif namespace not in namespaces:
                    _check_object(f"{label} row {rows}", namespace, object_id)
                    namespaces.add(namespace)
                obj = f"{namespace}/{object_id}".encode()
                batches[slot].add(obj, _key(label, rows, key, limits),
                                  _value(label, rows, value, limits), t)
                if name is not None and obj not in named:
                    named[obj] = (slot, name)
            for n, batch in enumerate(batches):
                if len(batch.pk) >= _BATCH:
                    batch.flush(stores[n])
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                say(f"imported {rows:,} rows of {objects_seen:,} objects")
        for obj, (slot, name) in named.items():
            batches[slot].add(NAME_PREFIX.encode() + obj, b"name", codec.encode(name), None)
            if len(batches[slot].pk) >= _BATCH:
                batches[slot].flush(stores[slot])
        named.clear()
        for n, batch in enumerate(batches):
            batch.flush(stores[n])
        alarms = _import_alarms(reader, src, manifest, ring, stores)
    finally:
        reader.close()
    for n, store in enumerate(stores):
        say(f"slot {n}: listing its objects")
        store.rebuild_objects()
        store.checkpoint()
        store.close()
        say(f"slot {n}: written")
    fsync_dir(data)
    notes = [f"namespace {ns!r} is not configured: its objects are stored, and reached once "
             "it is" for ns in sorted(namespaces - set(config.namespaces))]
    return {"data_dir": str(data), "from": str(src), "rows": rows, "objects": objects_seen,
            "alarms": alarms, "slots": config.slots, "notes": notes,
            "seconds": round(time.monotonic() - started, 3)}


def _import_alarms(reader: duckdb.DuckDBPyConnection, src: Path, manifest: dict[str, Any],
                   ring: Ring, stores: list[DuckStore]) -> int:
    try:
        rows = reader.execute(_rows_sql(src, manifest, "alarms")).fetchall()
    except duckdb.Error as e:
        raise ImportError_(f"{src}: the alarms cannot be read: {e}") from None
    per_slot: list[dict[bytes, int]] = [{} for _ in stores]
    for i, (namespace, object_id, _name, due) in enumerate(rows, 1):
        _check_object(f"alarms row {i}", namespace, object_id)
        if type(due) is not int or due < 0:
            raise ImportError_(f"alarms row {i}: scheduled_at {due!r} is not a time")
        per_slot[ring.slot_for(object_id)][f"{namespace}/{object_id}".encode()] = due
    for store, alarms in zip(stores, per_slot, strict=True):
        if alarms:
            store.apply({}, set(), 0, alarms)
    return len(rows)
