"""ObjectStorage: one activation's view of its storage (``state.storage``).

The rules this file keeps:

* **Cache.** Every key the activation has read or written is cached as
  encoded bytes (``None`` = known missing); a cached read does no I/O. Values
  are decoded on every read so that a caller mutating what it got back never
  changes storage. After the first ``list()`` the cache holds the whole object
  (``_complete``) and nothing more is read from disk.
* **Turns.** Writes apply to the cache at once (reads see them) and collect
  in the *turn buffer*. The buffer becomes one atomic log record when the
  object's code next really waits: a flush is scheduled with ``call_soon``,
  which runs only after the current task step yields. Storage calls never
  yield (a cache miss reads DuckDB synchronously), so the turn lasts until
  the object waits on something other than storage, as in workerd.
* **Writes are made when called.** ``put``, ``delete``, ``delete_all``, ``set_alarm`` and
  ``delete_alarm`` (and a transaction's) are plain methods returning an awaitable
  (:class:`~.eager.Done`): a write without ``await`` is made, as in workerd.
* **Output gate.** :meth:`sync` returns when every write made so far is
  durable; the object process awaits it before a response leaves.
  :meth:`unsynced` tells whether there is anything to wait for.
* **Input gate.** Holds by construction: a read miss blocks the loop, so no
  other event reaches any object while storage I/O is in flight. The one read
  that leaves the loop is an existing object's first (``SlotStore.warm``, up to
  256 rows, before its constructor): its calls wait for it, other objects run.
* **Failure.** If the slot cannot make a write durable, :meth:`sync` raises
  :class:`~durable.errors.StorageCommitError`, every later call raises it,
  and the activation must be reset (its cache may hold writes that never
  became durable). A full disk refuses a write before it touches the cache
  (:class:`~durable.errors.StorageFullError`); if the disk fills between a
  write and its commit, the write is discarded and :attr:`broken` is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from durable.codec import decode
from durable.errors import (
    StorageError,
    StorageFullError,
    TransactionClosedError,
    TransactionConflictError,
)

from .duck import NAME_KEY, name_twin
from .eager import NONE, Done
from .limits import alarm_time, check_key, check_keys, encode_entries, encode_value, list_range
from .log import ALARM_DELETE, ALARM_KEEP, LogFullError
from .slot import SlotStore, object_key

__all__ = ["ObjectStorage", "Transaction"]

T = TypeVar("T")
_NO_VALUE: Any = object()
_MISSING: Any = object()
# Above this many cache misses, one multi-key get reads the whole object in one query.
_POINT_READS_MAX = 4
MAX_TRANSACTION_ATTEMPTS = 10


class ObjectStorage:
    """Transactional key-value storage of one object (all methods are atomic)."""

    def __init__(self, slot: SlotStore, namespace: str, object_id: str) -> None:
        self._slot = slot
        self._limits = slot.limits
        self._obj = object_key(namespace, object_id)
        self.namespace = namespace
        self.object_id = object_id
        self._vals: dict[str, bytes | None] = {}
        self._complete = False
        self._sorted: list[str] | None = None
        self._turn: dict[str, bytes | None] = {}
        self._turn_clear = False
        self._turn_alarm = ALARM_KEEP  # this turn's alarm change (due ms, or ALARM_DELETE)
        self._alarm: Any = _MISSING  # cached alarm: due ms, None, or _MISSING (not read)
        #: set by the activation: whether the object's class has an ``alarm`` handler
        #: (None: unknown, as in the storage contract tests)
        self.alarm_handler: bool | None = None
        self._flush_scheduled = False
        self._last_seq = 0
        #: the object's name record's value, to be stored with its next write (set by the
        #: object process when it learns a name not stored yet); see :meth:`store_name`
        self._name: bytes | None = None
        self._writes = 0  # bumped on every write; transactions use it to detect conflicts
        #: Set when writes of this object were discarded (a full disk): the cache is wrong and
        #: the activation must be reset; every operation raises it.
        self.broken: StorageError | None = None
        slot.register(self._obj, self)

    def _usable(self) -> None:
        if self.broken is not None:
            raise self.broken
        self._slot.check_usable()

    def _writable(self) -> None:
        if self.broken is not None:
            raise self.broken
        self._slot.check_writable()

    def warm(self, vals: dict[str, bytes | None], complete: bool) -> None:
        """Start with what :meth:`SlotStore.warm` read off the loop (before the first call)."""
        for k, v in vals.items():
            self._vals.setdefault(k, v)
        if complete:
            self._complete = True
            self._sorted = None

    # -- internal helpers (synchronous) ---------------------------------------
    def _data(self, key: str) -> bytes | None:
        data = self._vals.get(key, _MISSING)
        if data is _MISSING:
            if self._complete:
                return None
            self._usable()
            data = self._vals[key] = self._slot.read(self._obj, key)
        return data

    def _ensure_complete(self) -> None:
        if self._complete:
            return
        self._usable()
        rows = self._slot.read_all(self._obj)
        vals = self._vals
        for k, v in rows.items():
            if k not in vals:
                vals[k] = v
        self._complete = True
        self._sorted = None

    def _sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(k for k, v in self._vals.items() if v is not None)
        return self._sorted

    def _prefetch(self, keys: list[str]) -> None:
        if self._complete:
            return
        misses = [k for k in keys if k not in self._vals]
        if len(misses) > _POINT_READS_MAX:
            self._ensure_complete()
        else:
            for k in misses:
                self._data(k)

    def _write(self, key: str, data: bytes | None) -> None:
        prev = self._vals.get(key)
        if (prev is None) != (data is None):
            self._sorted = None
        self._vals[key] = data
        self._turn[key] = data
        self._schedule_flush()

    def _write_alarm(self, due: int | None) -> None:
        self._alarm = due
        self._turn_alarm = ALARM_DELETE if due is None else due
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._writes += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._slot.loop.call_soon(self._flush)

    def _pending_turn(self) -> bool:
        return bool(self._turn) or self._turn_clear or self._turn_alarm != ALARM_KEEP

    def _flush(self, kick: bool = True) -> None:
        self._flush_scheduled = False
        if not self._pending_turn():
            return
        turn, clear, alarm = self._turn, self._turn_clear, self._turn_alarm
        self._turn, self._turn_clear, self._turn_alarm = {}, False, ALARM_KEEP
        name, self._name = self._name, None
        try:
            self._last_seq = self._slot.submit(self._obj, clear, turn, kick=kick, alarm=alarm,
                                               name=name)
        except (LogFullError, StorageFullError) as e:  # the disk filled since the write
            self.broken = e if isinstance(e, StorageFullError) else StorageFullError(
                f"{self.namespace}/{self.object_id}: the disk is full; this turn's writes were "
                f"not stored and the object was reset ({e})")

    # -- the public API ---------------------------------------------------------
    async def get(self, key: str | list[str]) -> Any:
        """A value (``None`` if missing), or for a list of keys a dict in key order."""
        if type(key) is str:
            check_key(key, self._limits)
            self._usable()
            data = self._data(key)
            return None if data is None else decode(data)
        keys = check_keys(key, self._limits, "get")
        self._usable()
        self._prefetch(keys)
        out = {}
        for k in sorted(set(keys)):
            data = self._data(k)
            if data is not None:
                out[k] = decode(data)
        return out

    def put(self, key: str | dict[str, Any], value: Any = _NO_VALUE) -> Done[None]:
        """Store one value, or every entry of a dict atomically (all or nothing)."""
        if type(key) is str:
            if value is _NO_VALUE:
                raise TypeError("put(key, value) needs a value; to store several, put({k: v})")
            check_key(key, self._limits)
            data = encode_value(key, value, self._limits)
            self._writable()
            self._write(key, data)
            return NONE
        if value is not _NO_VALUE:
            raise TypeError("put(entries) takes a dict and no second argument")
        entries = encode_entries(key, self._limits)
        self._writable()
        for k, data in entries.items():
            self._write(k, data)
        return NONE

    def delete(self, key: str | list[str]) -> Done[bool | int]:
        """Delete a key (returns whether it existed) or a list of keys (returns how many did)."""
        if type(key) is str:
            check_key(key, self._limits)
            self._writable()
            existed = self._data(key) is not None
            if existed:
                self._write(key, None)
            return Done(existed)
        keys = set(check_keys(key, self._limits, "delete"))
        self._writable()
        self._prefetch(list(keys))
        existing = [k for k in keys if self._data(k) is not None]
        for k in existing:
            self._write(k, None)
        return Done(len(existing))

    async def list(self, *, start: str | None = None, end: str | None = None,
                   prefix: str | None = None, reverse: bool = False,
                   limit: int | None = None) -> dict[str, Any]:
        """Keys in ``[start, end)`` with ``prefix``, in UTF-8 byte order (or reversed)."""
        r = list_range(start, end, prefix, reverse, limit)
        self._usable()
        if r.empty():
            return {}
        self._ensure_complete()
        return {k: decode(self._vals[k]) for k in r.select(self._sorted_keys())}

    def delete_all(self) -> Done[None]:
        """Delete every key of this object, and its alarm, atomically (as workerd does
        from compatibility date 2026-02-24)."""
        self._writable()
        self._vals = {}
        self._complete = True
        self._sorted = None
        self._turn = {}
        self._turn_clear = True
        self._write_alarm(None)
        return NONE

    # -- alarms -------------------------------------------------------------------
    def _check_alarm_handler(self) -> None:
        if self.alarm_handler is False:
            raise TypeError(f"{self.namespace}: this object's class has no alarm() handler, so "
                            "an alarm could never run; define `async def alarm(self, info)`")

    def _read_alarm(self) -> int | None:
        if self._alarm is _MISSING:
            self._usable()
            self._alarm = self._slot.read_alarm(self._obj)
        return self._alarm

    async def get_alarm(self) -> int | None:
        """The alarm's time in epoch milliseconds, or None when none is set."""
        self._usable()
        return self._read_alarm()

    def set_alarm(self, when: Any) -> Done[None]:
        """Run the object's ``alarm()`` at ``when`` (an aware datetime, or epoch ms); it
        replaces any alarm set before. Durable like a ``put``: it commits with this turn."""
        due = alarm_time(when)
        self._check_alarm_handler()
        self._writable()
        self._write_alarm(due)
        return NONE

    def delete_alarm(self) -> Done[None]:
        """Cancel the alarm, if one is set."""
        self._writable()
        self._write_alarm(None)
        return NONE

    async def transaction(self, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run ``fn(txn)``; its writes commit together, or not at all if it raises.

        If another task of this object writes while ``fn`` is suspended and
        ``fn`` has read something, ``fn`` runs again (at most
        :data:`MAX_TRANSACTION_ATTEMPTS` times), as the seed API retries
        failed transactions.
        """
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            txn = Transaction(self)
            before = self._writes
            try:
                result = await fn(txn)
            finally:
                txn._open = False
            if txn._rolled_back:
                return result
            if txn._did_read and self._writes != before:
                continue
            self._writable()
            for k, data in txn._writes.items():
                self._write(k, data)
            if txn._alarm is not _MISSING:
                self._write_alarm(txn._alarm)
            return result
        raise TransactionConflictError(
            f"transaction on {self.namespace}/{self.object_id} conflicted with concurrent writes "
            f"{MAX_TRANSACTION_ATTEMPTS} times in a row; it was not committed")

    async def sync(self) -> None:
        """Return once every write made so far is durable (raises if it cannot be)."""
        if self._flush_scheduled or self._pending_turn():
            self._flush(kick=False)  # wait_durable starts the write
        if self.broken is not None:
            raise self.broken
        if self._last_seq:  # an activation that never wrote has nothing to wait for
            await self._slot.wait_durable(self._last_seq)

    # -- hooks for the object process ------------------------------------------
    def store_name(self, value: bytes) -> None:
        """Store the object's name (its name record's value) with its next write: one record
        instead of two for a new object's first call. A caller that must have it stored
        anyway calls :meth:`flush_name` a little later."""
        self._name = value

    def flush_name(self, kick: bool = False) -> bool:
        """Log the name not stored yet, alone (no write carried it); return whether it did.
        Without ``kick`` the caller kicks the log (one kick for the names of a timer tick). It
        is not waited for: a call that wrote nothing answers without it."""
        if self._name is None or self.broken is not None:
            return False
        name, self._name = self._name, None
        self._slot.submit(name_twin(self._obj), False, {NAME_KEY: name}, kick=kick)
        return True

    def unsynced(self) -> bool:
        """Whether some write of this object is not durable yet (the output gate is shut)."""
        return self._pending_turn() or self._last_seq > self._slot.durable_seq

    def fence(self, error: StorageError) -> None:
        """No more use through this storage (its object was evicted or reset): every call raises.

        Writes already made go on to the log (a reset keeps the object's writes); nothing
        made after this is accepted.
        """
        if self.broken is None and self._pending_turn():
            self._flush()
        if self.broken is None and self._name is not None:
            with contextlib.suppress(LogFullError, StorageError):  # (learnt again later)
                self.flush_name(kick=True)  # (no name timer kicks for it now)
        self.broken = error

    def evict(self) -> bool:
        """Drop the cache if every write is durable; return whether it was dropped."""
        if self.unsynced():
            return False
        self._vals = {}
        self._complete = False
        self._sorted = None
        self._alarm = _MISSING
        self._slot.unregister(self._obj, self)
        return True


class Transaction:
    """The ``txn`` handed to ``transaction(fn)``: reads see its own writes."""

    def __init__(self, storage: ObjectStorage) -> None:
        self._s = storage
        self._writes: dict[str, bytes | None] = {}
        self._alarm: Any = _MISSING  # this transaction's alarm change, if any
        self._open = True
        self._rolled_back = False
        self._did_read = False

    def _check(self) -> None:
        if self._s.broken is not None:
            raise self._s.broken
        if not self._open:
            what = "rolled back" if self._rolled_back else "finished"
            raise TransactionClosedError(f"this transaction was {what}; no more operations on it")

    def _data(self, key: str) -> bytes | None:
        if key in self._writes:
            return self._writes[key]
        self._did_read = True
        return self._s._data(key)

    async def get(self, key: str | list[str]) -> Any:
        self._check()
        lim = self._s._limits
        if type(key) is str:
            check_key(key, lim)
            data = self._data(key)
            return None if data is None else decode(data)
        keys = check_keys(key, lim, "get")
        self._s._prefetch([k for k in keys if k not in self._writes])
        out = {}
        for k in sorted(set(keys)):
            data = self._data(k)
            if data is not None:
                out[k] = decode(data)
        return out

    def put(self, key: str | dict[str, Any], value: Any = _NO_VALUE) -> Done[None]:
        self._check()
        lim = self._s._limits
        if type(key) is str:
            if value is _NO_VALUE:
                raise TypeError("put(key, value) needs a value; to store several, put({k: v})")
            check_key(key, lim)
            self._writes[key] = encode_value(key, value, lim)
            return NONE
        if value is not _NO_VALUE:
            raise TypeError("put(entries) takes a dict and no second argument")
        self._writes.update(encode_entries(key, lim))
        return NONE

    def delete(self, key: str | list[str]) -> Done[bool | int]:
        self._check()
        lim = self._s._limits
        if type(key) is str:
            check_key(key, lim)
            existed = self._data(key) is not None
            self._writes[key] = None
            return Done(existed)
        keys = set(check_keys(key, lim, "delete"))
        self._s._prefetch([k for k in keys if k not in self._writes])
        n = 0
        for k in keys:
            n += self._data(k) is not None
            self._writes[k] = None
        return Done(n)

    async def list(self, *, start: str | None = None, end: str | None = None,
                   prefix: str | None = None, reverse: bool = False,
                   limit: int | None = None) -> dict[str, Any]:
        self._check()
        r = list_range(start, end, prefix, reverse, limit)
        if r.empty():
            return {}
        s = self._s
        s._ensure_complete()
        self._did_read = True
        keys = s._sorted_keys()
        if self._writes:
            live = set(keys)
            for k, v in self._writes.items():
                if v is None:
                    live.discard(k)
                else:
                    live.add(k)
            keys = sorted(live)
        return {k: decode(self._data(k)) for k in r.select(keys)}

    async def get_alarm(self) -> int | None:
        self._check()
        if self._alarm is not _MISSING:
            return self._alarm
        self._did_read = True
        return self._s._read_alarm()

    def set_alarm(self, when: Any) -> Done[None]:
        self._check()
        due = alarm_time(when)
        self._s._check_alarm_handler()
        self._alarm = due
        return NONE

    def delete_alarm(self) -> Done[None]:
        self._check()
        self._alarm = None
        return NONE

    def rollback(self) -> None:
        """Discard this transaction's writes; later operations on ``txn`` raise."""
        self._check()
        self._rolled_back = True
        self._open = False
        self._writes.clear()
        self._alarm = _MISSING

    def delete_all(self) -> Done[None]:
        raise StorageError("delete_all() cannot run inside a transaction; "
                           "call state.storage.delete_all() outside it")
