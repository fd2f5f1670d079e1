"""SlotStore: every object of one slot, on one commit log and one DuckDB file.

Threads and who owns what
-------------------------
* The **event loop thread** runs object code. It calls :meth:`SlotStore.submit`
  (encode a record, append it to the log, remember it in the *overlay*) and
  reads (overlay first, then DuckDB through the reader cursor). Reads of
  DuckDB are synchronous: a point read is ~0.3 ms, and holding the loop for
  it makes the *input gate* structural (no event of any object is delivered
  while a read is in flight) instead of a lock that every path must honour.
* The **log thread** (``log.CommitLog``) group-commits records and reports
  the durable position; the loop thread then resolves the waiters.
* The **applier thread** folds durable records into deduplicated batches and
  applies each in one DuckDB transaction that also stores the batch's last
  sequence number, then deletes the log segments it covered. It waits for a
  batch of at least ``apply_min_records`` or for ``apply_max_delay`` seconds:
  a DuckDB commit costs 2.5–4 ms of CPU whatever it carries, so applying each
  record on its own would burn a core at moderate load.

The overlay maps each object to its writes that DuckDB does not have yet
(durable or not), so that a read never misses a write: an activation may be
evicted once its writes are durable, long before they are applied.

Disk faults (docs/storage.md, "Faults"):

* **Recovery verifies before it changes anything.** Every segment is read and
  classified first; damage that a crash cannot explain (see ``log.py``) raises
  :class:`StorageCorruptError` naming file, offset and records, and every file
  stays as it was. Only then is the log replayed, DuckDB checkpointed, and
  the segments deleted.
* **Segments are deleted only behind a checkpoint**, never merely behind a
  DuckDB commit: DuckDB's WAL is then not the only copy of a record.
* **A full disk is a degraded mode.** Writes raise :class:`StorageFullError`
  before anything is written; reads go on; a write whose group could not be
  allocated is *discarded* (certainly) and its object reset. A probe (the
  log) and the applier's retries (DuckDB) end the mode by themselves once
  space is free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import math
import os
import re
import shutil
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from rbloom import Bloom

from durable.errors import StorageCommitError, StorageCorruptError, StorageFullError
from durable.osthread import name_os_thread

from .duck import (
    NAME_KEY,
    NAME_PK_SUFFIX,
    NAME_PREFIX,
    DuckStore,
    is_corruption,
    is_out_of_memory,
    name_twin,
    named_target,
)
from .limits import DEFAULT_LIMITS, StorageLimits
from .log import (
    ALARM_DELETE,
    ALARM_KEEP,
    CommitLog,
    Damage,
    WriteSet,
    decode_writeset,
    encode_writeset,
    is_disk_full,
)
from .recovery import check_identity, replay_log

log = logging.getLogger("durable.objectproc")

__all__ = ["SlotStore"]

_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OBJECT_ID = re.compile(r"[A-Za-z0-9_\-]+\Z")
_REPLAY_BATCH = 50_000
# Live batches stay small while DuckDB keeps up: converting a batch's parameters
# holds the GIL (measured ~1 ms per 1,000 rows, stalling every object of the
# slot), so a 2,048-record cap bounds that stall. When a backlog builds, batches
# grow to _REPLAY_BATCH: bigger batches cost far less CPU per row at 1M rows
# (~6 µs vs ~35 µs), so DuckDB catches up instead of falling further behind.
_LIVE_BATCH = 2048
#: memory DuckDB keeps beside its indexes at its ceiling (see SlotStore._check_memory_room)
_MEMORY_RESERVE = 6 << 20
_BACKLOG = 16_384
# ...and by bytes: the WAL grows by about a batch between two checkpoint checks, and a read
# that starts during a checkpoint waits for it (~11 ms per MB of WAL, measured). 50,000
# records of 24 KB made one checkpoint stall the slot for 1.4 s.
_BATCH_BYTES = 4 << 20
#: rows an activation's first read (``warm``) takes off the loop; a bigger object is cached
#: this far and read on by key (on the loop) as before
WARM_ROWS = 256
#: objects (an object and its name record are two) whose first reads one statement takes
#: together at most; DuckDB looks an ``IN`` list up in the index while it matches at most
#: 2,048 rows (``index_scan_max_count``): 16 objects of up to ~120 keys stay under it
WARM_BATCH = 32
#: how many objects' worth of rows (each up to ``WARM_ROWS + 1`` and its name record) one
#: batched read may hold before its objects are read one by one: 4 x 2 x 257 rows, about
#: what DuckDB looks up in the index (and up to 64 MiB of 32-KiB values)
_WARM_BATCH_OBJECTS = 4


class StoredObjects:
    """The objects that may have rows in the slot's DuckDB file (keys or an alarm), so that
    a new object's reads do no I/O: a DuckDB point read that finds nothing costs ~0.3 ms of
    the event loop (measured at 2M rows), and a new named object made three of them.

    Bloom filters (rbloom) at 1 false positive in 10,000 (``FALSE_POSITIVES``): 2.4 MB per
    million entries (a named object is two), beside DuckDB's ~650 bytes of index an object.
    Filled at start from DuckDB (every row and alarm there got there from a record submitted
    since, or was there at start) and by every submitted write set before it is logged, so a
    stored object is never missed; a false positive only costs the read it would have cost
    anyway. When one filter is full, another twice its size is added (lookups ask each).
    """

    __slots__ = ("_filters", "_room", "_capacity")

    #: A false positive costs a new object a read of DuckDB off the loop and its applier
    #: batch a delete. At 1% (1.2 MB per million entries), a slot filled toward its capacity
    #: (500,000 named objects are a million entries: the object and its name) took 0.2-0.8%
    #: of its new objects for stored ones; late in `many_objects.py --objects 1000000` the
    #: applier's deletes cost 9.1 us a new object and the reads 4.8 (py-spy). 1 in 10,000
    #: costs 1.2 MB more per million entries; that run's second half went from 4,646-4,654
    #: to 5,196-5,212 new objects/s (2 alternating pairs, docs/storage.md).
    FALSE_POSITIVES = 0.0001

    def __init__(self, capacity: int) -> None:
        self._filters = [Bloom(capacity, self.FALSE_POSITIVES)]
        self._room = self._capacity = capacity

    @classmethod
    def of(cls, duck: DuckStore, minimum: int = 1 << 20) -> StoredObjects:
        rows = duck.object_count_bound()
        stored = cls(max(minimum, 2 * rows))
        for chunk in duck.iter_objects():
            stored._filters[-1].update(chunk)
            stored._room -= len(chunk)
        return stored

    def add(self, obj: bytes) -> None:
        if self._room <= 0:
            self._capacity *= 2
            self._filters.append(Bloom(self._capacity, self.FALSE_POSITIVES))
            self._room = self._capacity
        self._filters[-1].add(obj)
        self._room -= 1

    def __contains__(self, obj: bytes) -> bool:
        for f in self._filters:  # (a loop, not any(genexpr): asked once per new object)
            if obj in f:
                return True
        return False


class _Retry(Exception):
    """The applier met a full disk: back off and try again."""


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


class _Record:
    """A submitted write set; its identity marks which overlay entries it still owns."""

    __slots__ = ("seq", "ws", "size", "first", "first_of_family", "name_first")

    def __init__(self, seq: int, ws: WriteSet, size: int = 0, first: bool = False,
                 first_of_family: bool = False, name_first: bool = False) -> None:
        self.seq = seq
        self.ws = ws
        self.size = size  # bytes in the log: bounds the applier's batches
        #: the object's first record ever (it was not in ``stored``): DuckDB holds no row or
        #: alarm of it before the batch this record is applied in
        self.first = first
        #: and the first of its family (the object and its name record): no ``objects`` row
        self.first_of_family = first_of_family
        #: it carries the object's name (``ws.name``) and the name record is new too
        self.name_first = name_first

    def value(self, obj: bytes, key: str) -> bytes | None:
        """What this record wrote to ``obj``'s ``key`` (``obj``: its object, or the object's
        name record, for a record that carries the name)."""
        return self.ws.entries[key] if obj == self.ws.obj else self.ws.name


class _Pending:
    """One object's not-yet-applied writes: key -> record that wrote it last."""

    __slots__ = ("entries", "clear", "alarm")

    def __init__(self) -> None:
        self.entries: dict[str, _Record] = {}
        self.clear: _Record | None = None
        self.alarm: _Record | None = None  # the record that last changed the alarm


#: registered storages kept before dead references are swept (SlotStore.register)
_STORAGES_SWEEP = 4096
#: namespaces already checked by :func:`object_key` (a process serves a few: one check each)
_CHECKED_NAMESPACES: set[str] = set()


def object_key(namespace: str, object_id: str) -> bytes:
    """The ``obj`` column value; raise ``ValueError`` for names that would break the layout."""
    if type(namespace) is not str or namespace not in _CHECKED_NAMESPACES:
        if type(namespace) is not str or not _NAMESPACE.match(namespace):
            raise ValueError(f"namespace {namespace!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if len(_CHECKED_NAMESPACES) < 1024:  # (bounded, whatever callers send)
            _CHECKED_NAMESPACES.add(namespace)
    if type(object_id) is not str or not _OBJECT_ID.match(object_id):
        raise ValueError(f"object id {object_id!r} must be letters, digits, '_' or '-'")
    return f"{namespace}/{object_id}".encode()


def fold(records: list[WriteSet], rows: dict[bytes, tuple[bytes, bytes | None, int | None]],
         clears: set[bytes], alarms: dict[bytes, int] | None = None) -> None:
    """Fold write sets, in order, into last-write-wins rows plus objects to clear first,
    and each object's last alarm change (due ms, or ALARM_DELETE) into ``alarms``."""
    by_obj: dict[bytes, list[bytes]] = {}
    for ws in records:
        if alarms is not None and ws.alarm != ALARM_KEEP:
            alarms[ws.obj] = ws.alarm
        if ws.clear:
            for pk in by_obj.pop(ws.obj, ()):
                rows.pop(pk, None)
            clears.add(ws.obj)
        prefix = ws.obj + b"/"
        pks = by_obj.setdefault(ws.obj, [])
        for key, value in ws.entries.items():
            pk = prefix + key.encode("utf-8")
            rows[pk] = (ws.obj, value, ws.time or None)
            pks.append(pk)
        if ws.name is not None:  # (the object's name record, as if a record of its own)
            twin = name_twin(ws.obj)
            pk = twin + NAME_PK_SUFFIX
            rows[pk] = (twin, ws.name, ws.time or None)
            by_obj.setdefault(twin, []).append(pk)


class SlotStore:
    """Storage for every object of one slot. Create it inside the running event loop."""

    def __init__(self, directory: str | os.PathLike[str], slot: int = 0, *,
                 limits: StorageLimits = DEFAULT_LIMITS, segment_bytes: int = 4 << 20,
                 apply_min_records: int = 2048, apply_max_delay: float = 1.0,
                 fsync: Callable[[int], None] = os.fdatasync,
                 trace: Callable[[str], None] | None = None,
                 memory_limit: str = "512MB", memory_ceiling: int | None = None,
                 checkpoint_wal_bytes: int = 8 << 20, checkpoint_interval: float = 30.0,
                 data_dir_id: str | None = None,
                 fallocate: Callable[[int, int, int], None] = os.posix_fallocate,
                 free_bytes: Callable[[Path], int] | None = None,
                 replication: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.slot = slot
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._trace = trace
        self._apply_min = apply_min_records
        self._apply_delay = apply_max_delay
        self._segment_bytes = segment_bytes
        self._ckpt_bytes = checkpoint_wal_bytes
        self._ckpt_interval = checkpoint_interval
        self._free_bytes = free_bytes or _free_bytes
        self.duck = DuckStore(self.directory / f"slot-{slot}.duckdb", memory_limit=memory_limit,
                              memory_ceiling=memory_ceiling)
        self._opened_limit = self.duck.memory_limit
        #: opens that found a checkpoint cut short and put its blocks back (docs/storage.md)
        self.checkpoints_put_back = int(self.duck.recovered is not None)
        if data_dir_id is not None:
            check_identity(self.duck, data_dir_id)
        self._applier: threading.Thread | None = None
        self._alarms_changed = False
        self._alarms_counted = 0.0
        #: namespace -> [pending alarms, soonest due ms] as applied (refreshed by _count_alarms)
        self.alarm_counts: dict[str, list[int]] = {}
        log_dir = self.directory / f"slot-{slot}.log"
        log_dir.mkdir(exist_ok=True, mode=0o700)
        self.replayed = 0
        self.torn: Damage | None = None  # the torn tail recovery dropped, if any
        started = time.perf_counter()
        #: the checkpoint at open ran out of memory at the ceiling: opened on DuckDB's WAL,
        #: writes refused until a restart with more memory (set once, then a second try)
        no_checkpoint: BaseException | None = None
        applied = self.duck.applied_seq()
        while True:
            try:
                next_seq = self._recover(log_dir, checkpoint=no_checkpoint is None)
                break
            except duckdb.FatalException as e:
                no_checkpoint = self._reopen_at_open(e, no_checkpoint)
        self.replayed = next_seq - 1 - applied  # (records follow each other: else it raised)
        #: cluster mode (objectproc/replication.py): records of the slot's replicated log
        #: that this host's files lacked, applied before serving
        self.caught_up = 0
        while replication is not None:
            try:
                next_seq = self._catch_up(replication, next_seq,
                                          checkpoint=no_checkpoint is None)
                break
            except duckdb.FatalException as e:
                no_checkpoint = self._reopen_at_open(e, no_checkpoint)
                next_seq = self.duck.applied_seq() + 1  # (the batches committed are kept)
        self.recovery_seconds = time.perf_counter() - started
        self._count_alarms(writer=False)
        started = time.perf_counter()
        while True:  # (before the applier: nothing else reads)
            try:
                self.stored = StoredObjects.of(self.duck)
                break
            except duckdb.Error as e:  # (a scan of every object, beside the indexes)
                if not is_out_of_memory(e) or not self.duck.grow_memory(e):
                    raise
        self.duck.grow_memory()  # (room for the indexes, if replay filled them)
        self._memory_checked = time.monotonic()
        self.stored_seconds = time.perf_counter() - started
        self.checkpointed_seq = next_seq - 1 if no_checkpoint is None else 0
        self.checkpoints = 0
        self.checkpoints_refused = 0  # DuckDB said another transaction holds its lock: retried
        self._ckpt_backoff = 0.0
        self._ckpt_retry_at = 0.0
        self._ckpt_refused_since: float | None = None
        self._ckpt_warned = False
        self._last_checkpoint = time.monotonic()
        #: Why DuckDB cannot take writes now (a full disk); set and cleared by the applier.
        self._duck_full: BaseException | None = None
        #: Set by the applier while DuckDB's indexes fill its memory ceiling (writes refused
        #: before a commit fails for memory, which DuckDB answers by invalidating the file)
        self._memory_full: MemoryError | None = None
        #: set when DuckDB ran out of memory at its ceiling: writes stay refused (see
        #: :meth:`_refuse_for_memory`)
        self._memory_oom: MemoryError | None = None
        self._memory_near = False  # (then checked after every batch, not every 2 s)
        #: bytes the indexes may still grow by before writes are refused (at the ceiling),
        #: and rows applied since the last check: a check is due once they could have
        #: taken half of it (at ~800 bytes a row, two long keys' entries), or every 2 s
        self._memory_headroom = math.inf
        self._rows_since_check = 0
        self._probe: asyncio.TimerHandle | None = None
        #: obj -> its live storage, weakly (see :meth:`register`)
        self._storages: dict[bytes, weakref.ref[Any]] = {}
        self._storages_sweep = _STORAGES_SWEEP
        self._pin: asyncio.Future[int] | None = None
        self._pinned = False
        self._pin_timer: asyncio.TimerHandle | None = None
        self._overlay: dict[bytes, _Pending] = {}
        #: DuckDB reads made on the loop thread, and objects whose first read left it (warm)
        self.loop_reads = 0
        self.warmed = 0
        #: the slot's reader thread and its DuckDB cursor (``warm``), made on first use
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: first reads waiting for the reader thread: (objects, limit, future), and whether
        #: a batch of them is being read (``_next_warm_batch``)
        self._warm_queue: deque[tuple[list[bytes], int, asyncio.Future[Any]]] = deque()
        self._warm_busy = False
        self._reader_local = threading.local()
        self._unapplied: deque[_Record] = deque()
        #: the batch the applier took from ``_unapplied`` and has not finished applying
        #: (both change under ``_apply_cond``, so that :meth:`capture` misses no record)
        self._in_flight: list[_Record] = []
        #: records that change an alarm, not yet durable (``on_alarm`` hears of each once it is)
        self._alarm_records: deque[_Record] = deque()
        #: set by the object process's alarm scheduler: ``on_alarm(obj, due_ms or None)``
        self.on_alarm: Callable[[bytes, int | None], None] | None = None
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        #: Run once the calls a durable group woke have run to their replies (scheduled
        #: after their tasks' steps, before the next turn's input): the object process sends
        #: those replies then (LoopSocket.send_queued).
        self.after_durable: Callable[[], None] | None = None
        #: The loop's ready callbacks (CPython's asyncio keeps them in a deque; None on a loop
        #: that does not). The log's word comes as one of them, and the steps of the calls it
        #: wakes were queued behind the turn's new input, ~1 ms of handling on this VM while
        #: their callers wait: they are moved to the front instead (docs/messaging.md,
        #: "Replies leave before the next calls are read"). No order between them and those
        #: callbacks is anyone's to rely on: each call's own steps keep their order.
        ready = getattr(self.loop, "_ready", None)
        self._loop_ready: deque[Any] | None = ready if isinstance(ready, deque) else None
        self._kick_due = False
        self.failed: BaseException | None = None
        self.applied_seq = next_seq - 1
        self._apply_cond = threading.Condition()
        self._stopping = False
        self._urgent = 0
        self._applier_idle = False
        self._apply_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.log = CommitLog(log_dir, next_seq, on_durable=self._durable_from_thread,
                             on_error=self._error_from_thread, on_discard=self._discard_from_thread,
                             segment_bytes=segment_bytes, fsync=fsync, trace=trace,
                             fallocate=fallocate,
                             replicate=replication.append_group if replication else None)
        if no_checkpoint is not None:
            self._refuse_for_memory(no_checkpoint)
        self._check_memory_room()  # (a slot reopened at its ceiling refuses writes at once)
        self._applier = threading.Thread(target=self._apply_loop, name="durable-applier",
                                         daemon=True)
        self._applier.start()
        self._closed = False
        #: Set by the object process: whether a lone ``wait_durable`` may write and sync
        #: on the loop thread (nothing else would wait behind that ~0.1 ms block).
        self.commit_inline_when: Callable[[], bool] | None = None
        self.inline_commits = 0  # syncs that wrote and synced on the loop thread

    # -- recovery -----------------------------------------------------------------
    def _recover(self, log_dir: Path, *, checkpoint: bool = True) -> int:
        """Verify and replay the log (``recovery.replay_log``); return the next sequence number."""
        result = replay_log(self.duck, log_dir, slot=self.slot, apply=self._apply_writesets,
                            batch=_REPLAY_BATCH, quarantine=self.directory / "quarantine",
                            checkpoint=checkpoint)
        self.torn = result.torn
        return result.next_seq

    def _reopen_at_open(self, e: duckdb.FatalException, no_checkpoint: BaseException | None
                        ) -> BaseException | None:
        """DuckDB failed fatally while the slot opened (the file and WAL are intact): open
        it again, with the limit grown if memory was what it lacked. At the ceiling, the
        next try checkpoints nothing (``no_checkpoint``: returned) and a second failure
        there raises: a replay or catch-up that cannot commit cannot serve the slot."""
        limit = self.duck.memory_limit
        with contextlib.suppress(duckdb.Error):
            self.duck.close()
        if not is_out_of_memory(e):
            raise e
        if limit > self._opened_limit:
            self._opened_limit = limit
        elif no_checkpoint is None:
            no_checkpoint = e
        else:
            raise e
        self.duck = DuckStore(self.duck.path, memory_limit=f"{limit}B",
                              memory_ceiling=self.duck.memory_ceiling)
        self.checkpoints_put_back += self.duck.recovered is not None
        return no_checkpoint

    def _catch_up(self, replication: Any, next_seq: int, *, checkpoint: bool = True) -> int:
        """Apply the replicated log's records from ``next_seq`` on (each checked whole by
        its checksum), checkpoint (unless out of memory at the ceiling made that fail once:
        the records stay in DuckDB's WAL, and in the replicated log); return the next
        sequence number."""
        pending: list[WriteSet] = []
        last = next_seq - 1
        for seq, payload in replication.catch_up(next_seq):
            pending.append(decode_writeset(payload))
            last = seq
            if len(pending) >= _REPLAY_BATCH:
                self._apply_writesets(pending, last)
                self.caught_up += len(pending)
                pending = []
        if pending:
            self._apply_writesets(pending, last)
            self.caught_up += len(pending)
        if self.caught_up and checkpoint:
            self.duck.checkpoint()
        return last + 1

    def _apply_writesets(self, batch: list[WriteSet], last_seq: int,
                         new: tuple[set[bytes], set[bytes]] | None = None) -> None:
        """``new``: objects without rows, and objects without an ``objects`` row, before this
        batch (a live batch's first records; replayed ones are not known so)."""
        rows: dict[bytes, tuple[bytes, bytes | None, int | None]] = {}
        clears: set[bytes] = set()
        alarms: dict[bytes, int] = {}
        fold(batch, rows, clears, alarms)
        if self._trace:
            self._trace("apply_begin")
        self.duck.apply(rows, clears, last_seq, alarms,
                        new_objects=new[0] if new else None, new_stats=new[1] if new else None)
        if alarms:
            self._alarms_changed = True
        if self._alarms_changed and time.monotonic() - self._alarms_counted >= 5.0:
            self._count_alarms(writer=threading.current_thread() is self._applier)
        if self._trace:
            self._trace("apply_commit")

    def _count_alarms(self, *, writer: bool) -> None:
        """Pending alarms per namespace and the soonest, for `durable status` (a scan of the
        alarms table: at most every 5 s, and only after alarms changed)."""
        self.alarm_counts = self.duck.alarm_counts(writer=writer)
        self._alarms_changed = False
        self._alarms_counted = time.monotonic()

    # -- writes (loop thread) -----------------------------------------------------
    def submit(self, obj: bytes, clear: bool, entries: dict[str, bytes | None], *,
               kick: bool = True, alarm: int = ALARM_KEEP, name: bytes | None = None) -> int:
        """Log one atomic write set; return its sequence number (durable later).

        ``kick=False`` is for a caller that calls :meth:`wait_durable` at once,
        which then decides whether to commit on this thread. ``alarm``: the object's
        alarm changes with the entries (due ms, or ALARM_DELETE). ``name``: the value of
        the object's name record, written in this record (not one of its own).
        """
        self.check_writable()
        now = int(time.time() * 1000)
        ws = WriteSet(obj, clear, entries, alarm, now, name)
        payload = encode_writeset(obj, clear, entries, alarm, now, name)
        seq = self.log.append(payload, kick=kick)
        stored = self.stored
        first = obj not in stored
        # (the name record's filter entry is asked only when it matters: not on every write)
        twin = name_twin(obj) if first or name is not None else None
        twin_new = twin is not None and twin not in stored
        family = first and twin_new
        stored.add(obj)  # (before it can reach DuckDB: the filter never misses a row)
        if name is not None and twin_new:
            stored.add(twin)
        rec = _Record(seq, ws, len(payload), first, family, name is not None and twin_new)
        self._remember(rec)
        self._unapplied.append(rec)
        if alarm != ALARM_KEEP:
            self._alarm_records.append(rec)
        return seq

    def _remember(self, rec: _Record, only: set[bytes] | None = None) -> None:
        """Put a record's writes in the overlay (they shadow DuckDB until applied); ``only``:
        of these objects only (the record's object, or its name record's)."""
        obj = rec.ws.obj
        if only is None or obj in only:
            pending = self._overlay.get(obj)
            if pending is None:
                pending = self._overlay[obj] = _Pending()
            if rec.ws.clear:
                pending.entries.clear()
                pending.clear = rec
            for key in rec.ws.entries:
                pending.entries[key] = rec
            if rec.ws.alarm != ALARM_KEEP:
                pending.alarm = rec
        if rec.ws.name is not None:
            twin = name_twin(obj)
            if only is None or twin in only:
                pending = self._overlay.get(twin)
                if pending is None:
                    pending = self._overlay[twin] = _Pending()
                pending.entries[NAME_KEY] = rec

    @property
    def durable_seq(self) -> int:
        return self.log.durable_seq

    async def wait_durable(self, seq: int) -> None:
        """Return once record ``seq`` (and every one before it) is durable."""
        if seq <= self.log.durable_seq and not self._waiters:
            return  # (with waiters queued, wait behind them: replies keep the order of syncs)
        self.check_usable()
        if not self._waiters and self.commit_inline_when is not None and self.commit_inline_when():
            last = self.log.commit_inline()
            if last is not None:
                self.inline_commits += 1
                self._durable_alarms(last)  # (the log thread tells of its own groups only)
                self._wake_applier()
            if seq <= self.log.durable_seq and not self._waiters:
                return
        # The writer is woken once, at the end of this loop turn: woken by the turn's first
        # sync, it took a group each time the loop let go of the GIL (a socket send does), and
        # one turn's records went out as several groups, each an fdatasync and two wake-ups.
        if not self._kick_due:
            self._kick_due = True
            self.loop.call_soon(self._kick)
        fut = self.loop.create_future()
        self._waiters.append((seq, fut))
        await fut

    def _kick(self) -> None:
        self._kick_due = False
        self.log.kick()

    def check_usable(self) -> None:
        if self.failed is not None:
            raise StorageCommitError(
                f"slot {self.slot} storage failed ({type(self.failed).__name__}: {self.failed}); "
                "this call's writes were not stored and the slot's process restarts to recover",
                outcome="discarded")
        if self._closed:
            raise StorageCommitError(f"slot {self.slot} storage is closed", outcome="discarded")

    @property
    def full(self) -> BaseException | None:
        """Why writes are refused now (a full disk, or DuckDB's memory ceiling), or ``None``."""
        return self.log.full or self._duck_full or self._memory_full

    def check_writable(self) -> None:
        """Raise before anything is written if the slot cannot take writes (deletes too: at
        DuckDB's memory ceiling a batch of deletes needs memory as well, and at a 16 MB
        ceiling one failed the slot, tried)."""
        self.check_usable()
        why = self.full
        if why is not None and why is self._memory_full:
            raise StorageFullError(
                f"slot {self.slot}: {why}; the write was not stored. Reads still work. Raise "
                "memory_limit_mb (or remove it: the ceiling is then half the machine's memory), "
                "or give the daemon more slots, and restart it (docs/operating.md, \"Memory\")")
        if why is not None:
            raise StorageFullError(
                f"slot {self.slot}: the disk holding {self.directory} is full "
                f"({self._free_text()}; {why}); the write was not stored. Reads still work, and "
                "writes are accepted again by themselves within seconds once space is freed")

    def _free_text(self) -> str:
        try:
            return f"{self._free_bytes(self.directory) / 2**20:.1f} MiB free"
        except OSError:
            return "free space unknown"

    def register(self, obj: bytes, storage: Any) -> None:
        """Remember an object's storage, so that discarded writes can reset it.

        A dict of plain weak references, where a ``WeakValueDictionary`` spent ~2 µs of
        each new object (its Python ``__setitem__`` and its removal callback): an evicted
        storage leaves by :meth:`unregister`, and any other dead reference at a sweep once
        the dict has doubled (amortised: one pass per as many registrations)."""
        storages = self._storages
        storages[obj] = weakref.ref(storage)
        if len(storages) > self._storages_sweep:
            self._storages = storages = {k: r for k, r in storages.items() if r() is not None}
            self._storages_sweep = max(_STORAGES_SWEEP, 2 * len(storages))

    def unregister(self, obj: bytes, storage: Any) -> None:
        """``storage`` was evicted: forget it (unless another took its place)."""
        ref = self._storages.get(obj)
        if ref is not None and ref() is storage:
            del self._storages[obj]

    def _storage_of(self, obj: bytes) -> Any:
        ref = self._storages.get(obj)
        return None if ref is None else ref()

    def _durable_from_thread(self, seq: int) -> None:
        self.loop.call_soon_threadsafe(self._resolve, seq)
        self._wake_applier()

    def _wake_applier(self) -> None:
        # Wake the applier only when it has something to decide: it sleeps without a
        # deadline when idle, and a wake-up per fsync would take the GIL from the loop.
        if len(self._unapplied) >= self._apply_min:
            with self._apply_cond:
                self._apply_cond.notify()
            return
        with self._apply_cond:  # read under the lock: the applier sets it just before it waits
            if self._applier_idle:
                self._apply_cond.notify()

    def _resolve(self, seq: int) -> None:
        """The log's word that records through ``seq`` are durable: the calls waiting for
        them go on, ahead of the callbacks that were ready before (see ``_loop_ready``), and
        ``after_durable`` follows them."""
        w = self._waiters
        ready = self._loop_ready
        before = 0 if ready is None else len(ready)
        woke = False
        while w and w[0][0] <= seq:
            _, fut = w.popleft()
            if not fut.done():
                fut.set_result(None)
                woke = True
        if woke:
            if self.after_durable is not None:
                self.loop.call_soon(self.after_durable)
            if ready is not None:
                ready.rotate(len(ready) - before)
        self._durable_alarms(seq)

    def _durable_alarms(self, seq: int) -> None:
        """Alarm changes durable through ``seq``: the scheduler may act on them now."""
        a = self._alarm_records
        while a and a[0].seq <= seq:
            rec = a.popleft()
            if self.on_alarm is not None:
                self.on_alarm(rec.ws.obj, None if rec.ws.alarm == ALARM_DELETE else rec.ws.alarm)

    def _error_from_thread(self, exc: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._fail, exc)

    def _fail(self, exc: BaseException) -> None:
        """The slot cannot go on: fail every waiter, saying truthfully what became of its write."""
        self.failed = exc
        durable = self.log.durable_seq
        # Records after the durable point were being written (or queued) when the log or DuckDB
        # failed: recovery after the restart decides whether they are stored.
        unknown = StorageCommitError(
            f"slot {self.slot} could not confirm that writes are durable ({type(exc).__name__}: "
            f"{exc}); the write may or may not be stored (read it back before writing again); "
            "the object is reset and the slot's process restarts", outcome="unknown")
        for waiters in (self._waiters, self._apply_waiters):
            while waiters:
                seq, fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(unknown if seq > durable else StorageCommitError(
                        f"slot {self.slot} failed ({type(exc).__name__}: {exc}) after this write "
                        "was durable", outcome="unknown"))

    def _discard_from_thread(self, exc: BaseException, first: int, last: int) -> None:
        self.loop.call_soon_threadsafe(self._discard, exc, first, last)

    def _discard(self, exc: BaseException, first: int, last: int) -> None:
        """Records ``first..last`` never reached the disk (it is full): forget them, reset owners."""
        err = StorageFullError(
            f"slot {self.slot}: the disk holding {self.directory} is full ({self._free_text()}); "
            "this write was not stored and the object was reset. Writes are accepted again by "
            "themselves within seconds once space is freed")
        dropped: list[_Record] = []
        with self._apply_cond:  # (the applier's batch is in _in_flight or back in _unapplied)
            while self._unapplied and self._unapplied[-1].seq >= first:
                dropped.append(self._unapplied.pop())
            remaining = [*self._in_flight, *self._unapplied]
        while self._alarm_records and self._alarm_records[-1].seq >= first:
            self._alarm_records.pop()  # never durable: the scheduler never hears of them
        objs = {r.ws.obj for r in dropped}
        touched = objs | {name_twin(r.ws.obj) for r in dropped if r.ws.name is not None}
        for obj in touched:  # rebuild their overlay from what remains, in order
            self._overlay.pop(obj, None)
        # (the batch the applier holds too: it was durable, and DuckDB may not have it yet.
        # Without it, an object whose older writes were in that batch lost sight of them
        # while the disk stayed full: the disk-full test, once the applier waited 250 ms)
        for rec in remaining:
            if rec.ws.obj in touched or (rec.ws.name is not None
                                         and name_twin(rec.ws.obj) in touched):
                self._remember(rec, touched)
        kept: deque[tuple[int, asyncio.Future[None]]] = deque()
        for seq, fut in self._waiters:
            if seq >= first:
                if not fut.done():
                    fut.set_exception(err)
            else:
                kept.append((seq, fut))
        self._waiters = kept
        for obj in objs:
            storage = self._storage_of(obj)
            if storage is not None:
                storage.broken = err
            if self.on_alarm is not None and any(r.ws.alarm != ALARM_KEEP for r in dropped
                                                 if r.ws.obj == obj):
                # a discarded alarm change: the scheduler hears again what is stored
                with contextlib.suppress(Exception):
                    self.on_alarm(obj, self.read_alarm(obj))
        log.error("slot %d: the disk is full (%s); %d writes of %d objects were not stored and "
                  "their objects were reset; refusing writes until space is freed",
                  self.slot, exc, len(dropped), len(objs))
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._probe is None and not self._closed:
            self._probe = self.loop.call_later(0.5, self._probe_space)

    def _probe_space(self) -> None:
        """While the log is full: accept writes again once a segment's worth of space is free."""
        self._probe = None
        if self.log.full is None or self._closed:
            return
        try:
            free = self._free_bytes(self.directory)
        except OSError:
            free = 0
        if free >= 2 * self._segment_bytes + (1 << 20):
            self.log.resume()
            log.warning("slot %d: %.1f MiB free again; accepting writes", self.slot, free / 2**20)
        else:
            self._schedule_probe()

    # -- reads (loop thread) ------------------------------------------------------
    def read(self, obj: bytes, key: str) -> bytes | None:
        pending = self._overlay.get(obj)
        if pending is not None:
            rec = pending.entries.get(key)
            if rec is not None:
                return rec.value(obj, key)
            if pending.clear is not None:
                return None
        if obj not in self.stored:  # a new object: DuckDB has nothing of it (no I/O)
            return None
        self.loop_reads += 1
        try:
            return self.duck.read_key(obj + b"/" + key.encode("utf-8"))
        except duckdb.Error as e:
            raise self._read_failed(e) from e

    def read_alarm(self, obj: bytes) -> int | None:
        """The object's alarm (due, epoch ms), unapplied changes included; None if none."""
        pending = self._overlay.get(obj)
        if pending is not None and pending.alarm is not None:
            due = pending.alarm.ws.alarm
            return None if due == ALARM_DELETE else due
        if obj not in self.stored:
            return None
        self.loop_reads += 1
        try:
            return self.duck.read_alarm(obj)
        except duckdb.Error as e:
            raise self._read_failed(e) from e

    def pending_alarms(self) -> dict[bytes, int | None]:
        """Alarm changes DuckDB does not have yet (durable or not): obj -> due or None."""
        out: dict[bytes, int | None] = {}
        for obj, pending in self._overlay.items():
            if pending.alarm is not None:
                due = pending.alarm.ws.alarm
                out[obj] = None if due == ALARM_DELETE else due
        return out

    def _read_failed(self, exc: duckdb.Error) -> Exception:
        """A DuckDB read failed: damaged bytes fail the slot (it restarts as ``corrupt``)."""
        if is_corruption(exc):
            err = StorageCorruptError(f"slot {self.slot}: DuckDB file {self.duck.path} is "
                                      f"damaged: {exc}")
            if self.failed is None:
                self._fail(err)
            return err
        return StorageCommitError(f"slot {self.slot}: reading storage failed: {exc}",
                                  outcome="discarded")

    async def warm(self, objs: list[bytes], limit: int = WARM_ROWS
                   ) -> dict[bytes, tuple[dict[str, bytes | None], bool]]:
        """Existing objects' rows (up to ``limit`` each), read by the slot's reader thread so
        that the loop serves other objects meanwhile, unapplied writes included: obj ->
        (key -> value or None for deleted, whether that is every key of the object).

        Consistent without a lock: the writes not yet applied are taken before the read
        starts (any applied after that are in the read's snapshot or in what was taken), and
        those written or still unapplied when it ends are laid over both."""
        taken = {obj: self._capture(obj) for obj in objs}
        fut: asyncio.Future[dict[bytes, tuple[list[tuple[bytes, bytes | None]], bool]]] = \
            self.loop.create_future()
        self._warm_queue.append((objs, limit, fut))
        if not self._warm_busy:
            self._next_warm_batch()
        try:
            rows = await fut
        except duckdb.Error as e:
            raise self._read_failed(e) from e
        out: dict[bytes, tuple[dict[str, bytes | None], bool]] = {}
        self.warmed += 1
        for obj in objs:
            got, more = rows[obj]
            vals: dict[str, bytes | None] = {}
            complete = not more
            for layer in (taken[obj], self._capture(obj)):
                if layer is None:
                    continue
                cleared, entries = layer
                if cleared:
                    vals, got, complete = {}, [], True
                vals.update(entries)
            cut = len(obj) + 1
            for pk, v in got:
                vals.setdefault(pk[cut:].decode("utf-8"), v)
            out[obj] = (vals, complete)
        return out

    def _next_warm_batch(self) -> None:
        """(loop thread) Hand the reader thread every first read queued meanwhile, up to
        ``WARM_BATCH`` objects, as one job: their rows come in one DuckDB statement (16 small
        objects in 1.3 ms, against 10 ms one by one, measured among 500,000 rows), so objects
        whose first calls wait together are read together."""
        queue = self._warm_queue
        while queue:
            limit = queue[0][1]
            batch: list[tuple[list[bytes], int, asyncio.Future[Any]]] = []
            count = 0
            while queue and queue[0][1] == limit and (
                    not batch or count + len(queue[0][0]) <= WARM_BATCH):
                item = queue.popleft()
                if not item[2].done():  # (else its caller was cancelled meanwhile)
                    batch.append(item)
                    count += len(item[0])
            if not batch:
                continue
            if self._reader_pool is None:
                self._reader_pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"slot-{self.slot}-reader")
            try:
                job = self.loop.run_in_executor(self._reader_pool, self._read_rows,
                                                [objs for objs, _, _ in batch], limit)
            except RuntimeError as e:  # (the pool is shut down: the slot is closing)
                for _, _, fut in batch:
                    fut.set_exception(e)
                continue
            self._warm_busy = True
            job.add_done_callback(lambda job, batch=batch: self._warm_batch_done(job, batch))
            return
        self._warm_busy = False

    def _warm_batch_done(self, job: asyncio.Future[Any],
                         batch: list[tuple[list[bytes], int, asyncio.Future[Any]]]) -> None:
        error = None if job.cancelled() else job.exception()
        for objs, _, fut in batch:
            if fut.done():
                continue
            if job.cancelled():
                fut.cancel()
            elif error is not None:
                fut.set_exception(error)
            else:
                rows = job.result()
                fut.set_result({obj: rows[obj] for obj in objs})
        self._next_warm_batch()

    def _capture(self, obj: bytes) -> tuple[bool, dict[str, bytes | None]] | None:
        """An object's unapplied writes now: (cleared first, key -> value or None)."""
        pending = self._overlay.get(obj)
        if pending is None:
            return None
        return pending.clear is not None, {k: r.value(obj, k) for k, r in pending.entries.items()}

    def _read_rows(self, groups: list[list[bytes]], limit: int
                   ) -> dict[bytes, tuple[list[tuple[bytes, bytes | None]], bool]]:
        """(reader thread) Each object's rows, and whether it has more than ``limit``;
        ``groups``: the objects of each first read in the batch (an object and its name
        record), read in one statement if they fit, else group by group."""
        cur = getattr(self._reader_local, "cursor", None)
        if cur is None:
            cur = self._reader_local.cursor = self.duck.cursor()
        out: dict[bytes, tuple[list[tuple[bytes, bytes | None]], bool]] = {}
        # (asked once: the loop thread adds to the filter meanwhile)
        stored = {obj for group in groups for obj in group if obj in self.stored}
        if len(groups) > 1 and len(stored) > 1:
            together = self.duck.read_objects(sorted(stored), limit=limit + 1, cursor=cur,
                                              objects=min(len(groups), _WARM_BATCH_OBJECTS))
            if together is not None:
                for group in groups:
                    self._rows_of(group, stored, together, limit, cur, out)
                return out
        for group in groups:
            in_group = [obj for obj in group if obj in stored]
            together = self.duck.read_objects(in_group, limit=limit + 1, cursor=cur) \
                if len(in_group) > 1 else None
            self._rows_of(group, stored, together, limit, cur, out)
        return out

    def _rows_of(self, group: list[bytes], stored: set[bytes],
                 together: dict[bytes, list[tuple[bytes, bytes | None]]] | None, limit: int,
                 cur: duckdb.DuckDBPyConnection,
                 out: dict[bytes, tuple[list[tuple[bytes, bytes | None]], bool]]) -> None:
        """(reader thread) A group's rows into ``out``: from ``together`` (read already), or
        one statement each."""
        for obj in group:
            if obj not in stored:
                out[obj] = ([], False)
            elif together is not None:
                rows = together[obj]
                out[obj] = (rows[:limit], len(rows) > limit)
            elif obj.startswith(NAME_PREFIX):  # (a name record has one key: a point read)
                pk = obj + NAME_PK_SUFFIX
                v = self.duck.read_key(pk, cursor=cur)
                out[obj] = ([] if v is None else [(pk, v)], False)
            else:
                rows = self.duck.read_object(obj, limit=limit + 1, cursor=cur)
                out[obj] = (rows[:limit], len(rows) > limit)

    def _close_reader(self) -> None:
        cur = getattr(self._reader_local, "cursor", None)
        if cur is not None:
            cur.close()
            self._reader_local.cursor = None

    def read_all(self, obj: bytes) -> dict[str, bytes]:
        """Every stored key of an object, unapplied writes included."""
        pending = self._overlay.get(obj)
        out: dict[str, bytes] = {}
        if (pending is None or pending.clear is None) and obj in self.stored:
            cut = len(obj) + 1
            self.loop_reads += 1
            try:
                rows = self.duck.read_object(obj)
            except duckdb.Error as e:
                raise self._read_failed(e) from e
            for pk, v in rows:
                if v is not None:
                    out[pk[cut:].decode("utf-8")] = v
        if pending is not None:
            for key, rec in pending.entries.items():
                v = rec.value(obj, key)
                if v is None:
                    out.pop(key, None)
                else:
                    out[key] = v
        return out

    # -- applier (its own thread) -----------------------------------------------
    def _apply_loop(self) -> None:
        name_os_thread()
        while True:
            deadline = None
            with self._apply_cond:
                while True:
                    if self._pin is not None and not self._pinned:
                        break
                    ready = self._ready_count()
                    if ready and (self._stopping or self._urgent or ready >= self._apply_min):
                        break
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._duck_full is not None or self._checkpoint_due(now) or (
                            self._alarms_changed and now - self._alarms_counted >= 5.0) or (
                            self._memory_full is not None and now - self._memory_checked >= 2.0):
                        break  # retry the full disk / a checkpoint, an alarm count or a
                        # memory check is due (writes refused: no batch would wake it)
                    if ready:
                        if deadline is None:
                            deadline = now + self._apply_delay
                        if now >= deadline:
                            break
                        self._apply_cond.wait(deadline - now)
                    else:
                        deadline = None
                        self._applier_idle = True
                        # Wake by the next checkpoint's age (an idle slot folds its WAL too),
                        # or to count the alarms that changed.
                        wait = (self._ckpt_interval if self.checkpointed_seq < self.applied_seq
                                else None)
                        if wait is not None and self._ckpt_retry_at > now:  # (a refused one)
                            wait = min(wait, self._ckpt_retry_at - now + 0.001)
                        if self._alarms_changed:
                            wait = min(wait or 5.0, 5.0)
                        if self._memory_full is not None:
                            wait = min(wait or 2.0, 2.0)
                        self._apply_cond.wait(wait)
                        self._applier_idle = False
            try:
                if self._pin is not None and not self._pinned:
                    self._hold_pin()
                    continue
                self._apply_ready()
                self._maybe_checkpoint(force=self._duck_full is not None)
                # (~0.3 ms a check; ~1-5 ms near the ceiling, where each batch is checked)
                if (self._memory_near or time.monotonic() - self._memory_checked >= 2.0
                        or self._rows_since_check * 800 >= self._memory_headroom / 2
                        or (self._memory_headroom == math.inf  # (it just reached the ceiling)
                            and self.duck.memory_limit >= self.duck.memory_ceiling)):
                    self._memory_checked = time.monotonic()
                    try:
                        self.duck.grow_memory()
                    except duckdb.Error as e:  # (its query of DuckDB's memory: out of memory?)
                        if not (is_out_of_memory(e) and self.duck.grow_memory(e)):
                            log.warning("slot %d: DuckDB's memory check failed: %s", self.slot, e)
                    self._check_memory_room()
                if self._alarms_changed and time.monotonic() - self._alarms_counted >= 5.0:
                    self._count_alarms(writer=True)
            except _Retry:
                with self._apply_cond:  # a full disk: try again in a second, or when woken
                    if not self._stopping:
                        self._apply_cond.wait(1.0)
            except BaseException as e:  # the DuckDB file is unusable: fail the slot
                if is_corruption(e):
                    e = StorageCorruptError(f"slot {self.slot}: DuckDB file {self.duck.path} is "
                                            f"damaged: {e}")
                self.loop.call_soon_threadsafe(self._fail, e)
                return

    def _check_memory_room(self) -> None:
        """At DuckDB's memory ceiling, refuse writes while the indexes fill 85% of it, and
        leave at least ``_MEMORY_RESERVE`` and the WAL's worth (take them again 10% below): a
        commit that then ran out of memory would invalidate the file, and the slot would fail
        and not open again. What is left covers what was accepted before (the applier's
        backlog), the rows not checkpointed yet and the blocks a commit pins (measured at a
        20 MB ceiling: a commit failed beside 12.6 MB of indexes; at 64 MB, a checkpoint
        passed beside 91% and a commit failed beside 95%)."""
        duck = self.duck
        self._rows_since_check = 0
        if self._memory_oom is not None:  # (refused until a restart)
            self._memory_full = self._memory_oom
            return
        if duck.memory_limit < duck.memory_ceiling:  # (it can still grow)
            self._memory_near = False
            self._memory_full = None
            self._memory_headroom = math.inf
            return
        ceiling = duck.memory_ceiling
        try:
            need = duck.index_need()
        except duckdb.Error as e:  # (a figure: never a reason to fail the slot)
            if not is_out_of_memory(e):
                log.warning("slot %d: could not size DuckDB's indexes: %s", self.slot, e)
                self._memory_headroom = ceiling * 0.05  # (asked again soon, not every batch)
                return
            need = ceiling  # (out of memory to count them: full)
        # (what was acknowledged and is not applied yet goes in too: under load the applier
        # trails by thousands of records, and the indexes then grew past the threshold)
        need += len(self._unapplied) * 600
        refuse_at = min(ceiling * 0.85,
                        ceiling - _MEMORY_RESERVE - self.checkpoint_wal_threshold())
        self._memory_near = need >= refuse_at * 0.6
        self._memory_headroom = max(0.0, refuse_at - need)
        if self._memory_full is None and need >= refuse_at:
            self._memory_full = MemoryError(
                f"DuckDB's indexes need ~{need >> 20} MiB of the {ceiling >> 20} MiB its memory "
                "may grow to (they cannot be evicted: ~650 bytes per stored object)")
            log.error("slot %d: writes refused: %s; raise memory_limit_mb or add slots, and "
                      "restart (docs/operating.md, \"Memory\")", self.slot, self._memory_full)
        elif self._memory_full is not None and need < refuse_at - ceiling * 0.1:
            self._memory_full = None
            log.warning("slot %d: DuckDB's indexes need ~%d MiB of %d MiB: writes accepted again",
                        self.slot, need >> 20, ceiling >> 20)

    def _apply_ready(self) -> None:
        """Apply one batch of durable records (a full disk puts them back and raises _Retry)."""
        batch: list[_Record] = []
        durable = self.log.durable_seq
        cap = (_LIVE_BATCH if len(self._unapplied) < _BACKLOG or self._memory_near
               else _REPLAY_BATCH)  # (near DuckDB's memory ceiling, checked batch by batch)
        size = 0
        with self._apply_cond:
            while (self._unapplied and self._unapplied[0].seq <= durable and len(batch) < cap
                   and size < _BATCH_BYTES):
                rec = self._unapplied.popleft()
                batch.append(rec)
                size += rec.size
            self._in_flight = batch
        if not batch:
            return
        self._rows_since_check += sum(len(r.ws.entries) + 1 + (r.ws.name is not None)
                                      for r in batch)
        new_objects = {r.ws.obj for r in batch if r.first}
        new_objects.update(name_twin(r.ws.obj) for r in batch if r.name_first)
        new_stats = {named_target(r.ws.obj) for r in batch if r.first_of_family}
        try:
            self._apply_writesets([r.ws for r in batch], batch[-1].seq, (new_objects, new_stats))
        except duckdb.Error as e:
            for r in batch:  # (after a failed commit, assume nothing of what it held)
                r.first = r.first_of_family = r.name_first = False
            with self._apply_cond:
                self._unapplied.extendleft(reversed(batch))  # still durable in the log
                self._in_flight = []
            self._duck_write_failed(e)
        with self._apply_cond:
            self._in_flight = []
        self.applied_seq = batch[-1].seq
        self._clear_duck_full()
        self.loop.call_soon_threadsafe(self._forget, batch)

    def _checkpoint_due(self, now: float) -> bool:
        if self.checkpointed_seq >= self.applied_seq or now < self._ckpt_retry_at:
            return False
        if self._memory_oom is not None:  # (at the ceiling, each would fail and reopen DuckDB)
            return False
        return (now - self._last_checkpoint >= self._ckpt_interval
                or self.duck.wal_bytes() >= self.checkpoint_wal_threshold())

    def checkpoint_wal_threshold(self) -> int:
        """``checkpoint_wal_bytes``, or 1/16 of the DuckDB file once that is more and the file
        has passed 128 MiB (where 1/16 is the default 8 MiB: smaller files keep the setting).

        A checkpoint costs in proportion to the file (it writes the indexes anew), so at a
        fixed WAL size the cost per write grows with the slot: at 500k objects, 68-77 µs
        of CPU per new object with a checkpoint every 20k objects against 49-53 µs every
        100k (measured). A WAL of 1/16 of the file keeps that cost flat, and a replay at
        open in proportion too: 1.1 s for the 54 MiB WAL of a 750 MiB file."""
        try:
            size = os.path.getsize(self.duck.path)
        except OSError:
            size = 0
        return max(self._ckpt_bytes, size >> 4 if size >= 128 << 20 else 0)

    def _maybe_checkpoint(self, *, force: bool = False) -> None:
        if not force and not self._checkpoint_due(time.monotonic()):
            return
        applied = self.applied_seq
        wal = self.duck.wal_bytes()
        need = 2 * wal + (8 << 20)  # new blocks in the main file before the WAL goes
        free = self._free_bytes(self.directory)
        if free < need:
            self._set_duck_full(OSError(errno.ENOSPC, f"a checkpoint of the {wal / 2**20:.1f} MiB "
                                        f"DuckDB WAL needs ~{need / 2**20:.0f} MiB free, "
                                        f"{free / 2**20:.1f} MiB are"))
            raise _Retry()
        try:
            self.duck.checkpoint()
        except duckdb.TransactionException as e:
            if "Cannot CHECKPOINT" not in str(e):
                self._duck_write_failed(e)
            self._checkpoint_refused(e)
            return
        except duckdb.Error as e:
            self._duck_write_failed(e)
        except OSError as e:  # (its pre-image: the disk filled since the check above)
            if not is_disk_full(e):
                raise
            self._set_duck_full(e)
            raise _Retry() from e
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        self._ckpt_backoff = 0.0
        self._ckpt_retry_at = 0.0
        self._ckpt_refused_since = None
        self._ckpt_warned = False
        self.checkpointed_seq = applied
        self.log.drop_through(applied)
        self._clear_duck_full()

    def _checkpoint_refused(self, exc: BaseException) -> None:
        """DuckDB refused the checkpoint because another transaction holds its lock: try
        again soon (backing off to 5 s). Nothing is lost meanwhile: segments go only behind a
        checkpoint. Seen when a read that began before the applier's last commit is still
        running (that commit cannot be cleaned up yet: 2 of 300 checkpoints beside a thread of
        point reads, measured), and for as long as a query's snapshot stays open."""
        now = time.monotonic()
        self.checkpoints_refused += 1
        self._ckpt_backoff = min(5.0, max(0.05, self._ckpt_backoff * 2))
        self._ckpt_retry_at = now + self._ckpt_backoff
        if self._ckpt_refused_since is None:
            self._ckpt_refused_since = now
        elif now - self._ckpt_refused_since >= 60 and not self._ckpt_warned:
            self._ckpt_warned = True
            log.warning("slot %d: DuckDB has refused checkpoints for %.0f s (%s); the WAL and "
                        "the log grow until one succeeds (a long query holds a snapshot?)",
                        self.slot, now - self._ckpt_refused_since, exc)

    def _duck_write_failed(self, e: duckdb.Error) -> None:
        """A DuckDB write failed: reopen after a fatal one; a full disk is retried; out of
        memory at the ceiling refuses writes; else raise."""
        at_ceiling = self.duck.at_ceiling  # (read before a reopen makes a new DuckStore)
        if isinstance(e, duckdb.FatalException):
            self._reopen(e)
        if is_out_of_memory(e):
            if at_ceiling:  # (below it, the limit grew: the retry has the room it lacked)
                self._refuse_for_memory(e)
            raise _Retry() from e
        if is_disk_full(e) or isinstance(e, duckdb.FatalException):
            self._set_duck_full(e)
            raise _Retry() from e
        raise e

    def _refuse_for_memory(self, exc: BaseException) -> None:
        """A commit or checkpoint ran out of memory at DuckDB's ceiling, before the estimate
        of :meth:`_check_memory_room` refused writes (it is rough right after an open, and a
        commit pins more than the indexes). Writes are refused until the daemon restarts
        (with more memory, the limit is then higher): the estimate proved short, so it cannot
        say when there is room again. Nothing is lost: the batch stays durable in the log and
        is applied again (after a reopen, DuckDB holds less of its indexes in memory)."""
        if self._memory_oom is None:
            log.error("slot %d: DuckDB ran out of memory at its ceiling of %d MiB (%s); writes "
                      "are refused until a restart: raise memory_limit_mb or add slots, and "
                      "restart (docs/operating.md, \"Memory\"). Every acknowledged write is kept",
                      self.slot, self.duck.memory_ceiling >> 20, str(exc).splitlines()[0])
        self._memory_oom = MemoryError(
            f"DuckDB ran out of memory at the {self.duck.memory_ceiling >> 20} MiB its memory "
            "may grow to (its indexes cannot be evicted: ~650 bytes per stored object)")
        self._memory_full = self._memory_oom

    def _set_duck_full(self, exc: BaseException) -> None:
        if self._duck_full is None:
            log.error("slot %d: DuckDB cannot write (%s); refusing writes until it can (the "
                      "commit log keeps every acknowledged write)", self.slot, exc)
        self._duck_full = exc

    def _clear_duck_full(self) -> None:
        if self._duck_full is not None:
            self._duck_full = None
            log.warning("slot %d: DuckDB writes again; accepting writes", self.slot)

    def _reopen(self, exc: BaseException) -> None:
        """After a fatal DuckDB error (a failed checkpoint), reopen the file on the loop thread.

        The reader belongs to the loop thread, so the swap happens there; the
        file and its WAL are intact (a checkpoint that fails changes neither).
        """
        done = threading.Event()
        box: list[BaseException] = []

        def swap() -> None:
            try:
                with contextlib.suppress(duckdb.Error):
                    self.duck.close()
                # (the limit as grown: the indexes that needed it are still there)
                self.duck = DuckStore(self.duck.path, memory_limit=f"{self.duck.memory_limit}B",
                                      memory_ceiling=self.duck.memory_ceiling)
                self.checkpoints_put_back += self.duck.recovered is not None
            except BaseException as e:  # noqa: BLE001  (reported to the applier)
                box.append(e)
            finally:
                done.set()

        log.warning("slot %d: DuckDB needs reopening after: %s", self.slot, exc)
        self.loop.call_soon_threadsafe(swap)
        while not done.wait(1.0):
            if self._stopping or self.loop.is_closed():
                raise RuntimeError("stopped while reopening DuckDB")
        if box:
            raise box[0]

    def _hold_pin(self) -> None:
        """Backup: apply nothing (and delete no segment) until unpinned.

        No checkpoint: with nothing committing (and DuckDB's own checkpoints
        off) the main file and its WAL are a consistent pair as they stand, and
        a checkpoint would stall every read of the slot while it ran (a read
        that starts during one waits for it: ~11 ms per MB of WAL, measured).
        """
        fut = self._pin
        with self._apply_cond:
            if self._pin is not fut:
                return  # unpinned meanwhile
            self._pinned = True
            self.loop.call_soon_threadsafe(_settle, fut, self.applied_seq, None)
            while self._pinned and not self._stopping:
                self._apply_cond.wait()

    def _ready_count(self) -> int:
        u = self._unapplied
        if not u or u[0].seq > self.log.durable_seq:
            return 0
        return max(1, min(len(u), self.log.durable_seq - u[0].seq + 1))

    def _forget(self, batch: list[_Record]) -> None:
        """Drop overlay entries that DuckDB now has (unless a later write took them)."""
        overlay = self._overlay
        for rec in batch:
            if rec.ws.name is not None:
                twin = name_twin(rec.ws.obj)
                pending = overlay.get(twin)
                if pending is not None and pending.entries.get(NAME_KEY) is rec:
                    del pending.entries[NAME_KEY]
                    if not pending.entries and pending.clear is None and pending.alarm is None:
                        del overlay[twin]
            pending = overlay.get(rec.ws.obj)
            if pending is None:
                continue
            if pending.clear is rec:
                pending.clear = None
            if pending.alarm is rec:
                pending.alarm = None
            entries = pending.entries
            for key in rec.ws.entries:
                if entries.get(key) is rec:
                    del entries[key]
            if not entries and pending.clear is None and pending.alarm is None:
                del overlay[rec.ws.obj]
        applied = batch[-1].seq if batch else self.applied_seq
        w = self._apply_waiters
        while w and w[0][0] <= applied:
            _, fut = w.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- lifecycle ----------------------------------------------------------------
    async def flush(self) -> None:
        """Wait until everything submitted is durable and applied to DuckDB."""
        target = self.log.last_seq
        await self.wait_durable(target)
        if self.applied_seq >= target:
            return
        fut = self.loop.create_future()
        self._apply_waiters.append((target, fut))
        with self._apply_cond:
            self._urgent += 1
            self._apply_cond.notify()
        try:
            await fut
        finally:
            with self._apply_cond:
                self._urgent -= 1

    def capture(self, cursor: duckdb.DuckDBPyConnection) -> tuple[list[WriteSet], int, int]:
        """Begin a read-only snapshot of the slot on ``cursor`` (a cursor of ``self.duck``).

        Returns the write sets DuckDB's snapshot may lack, oldest first, and the
        snapshot's ``(applied_seq, cut_seq)``. Folding those write sets over the
        snapshot's rows gives the slot as of record ``cut_seq``: every write
        acknowledged before this call, and no write that is not durable. (Write
        sets the snapshot already holds may be among them: folding a record again
        changes nothing, as long as every later one is folded after it.)
        """
        self.check_usable()
        with self._apply_cond:  # the applier takes batches and sets _in_flight under it
            cut = self.log.durable_seq
            records = [r.ws for r in self._in_flight]
            for rec in list(self._unapplied):  # (list(): atomic against the loop's appends)
                if rec.seq > cut:
                    break
                records.append(rec.ws)
            cursor.execute("BEGIN TRANSACTION")
            # (DuckDB starts a transaction's snapshot at its first read: read now, under the lock)
            applied = cursor.execute("SELECT v FROM meta WHERE k = 'applied_seq'").fetchall()[0][0]
        return records, applied, cut

    def statistics(self) -> dict[str, Any]:
        """Figures for `durable status` (cheap: a few stat calls)."""
        log_bytes = 0
        for seg in self.log.segments():
            with contextlib.suppress(OSError):
                log_bytes += seg.path.stat().st_size
        return {"durable_seq": self.durable_seq, "applied_seq": self.applied_seq,
                "checkpointed_seq": self.checkpointed_seq, "checkpoints": self.checkpoints,
                "checkpoints_refused": self.checkpoints_refused,
                "checkpoints_put_back": self.checkpoints_put_back,
                "wal_bytes": self.duck.wal_bytes(), "log_bytes": log_bytes,
                "duckdb_memory_limit": self.duck.memory_limit,
                "duckdb_index_bytes": self.duck.index_bytes_seen,
                "storage_full": self.full is not None,
                "storage_full_why": None if self.full is None else
                "memory" if self.full is self._memory_full else "disk",
                "reads": {"on_loop": self.loop_reads, "warmed_objects": self.warmed}}

    async def pin(self, timeout: float = 300.0) -> dict[str, Any]:
        """Hold the slot's files still for a backup: nothing applied, no segment deleted.

        Returns the DuckDB file (copy its WAL with it: together they are DuckDB
        as of ``applied_seq``), the segments holding the records after it, and
        ``cut_seq``: every write acknowledged before this call is at or below it
        (acknowledged means durable in the log). Writes go on meanwhile, into
        the log. Released by :meth:`unpin`, or after ``timeout`` seconds.
        """
        self.check_usable()
        if self._pin is not None:
            raise StorageCommitError(f"slot {self.slot} is already pinned by another backup",
                                     outcome="discarded")
        fut = self.loop.create_future()
        with self._apply_cond:
            self._pin = fut
            self._apply_cond.notify()
        applied = await fut
        self._pin_timer = self.loop.call_later(timeout, self.unpin)
        return {"slot": self.slot, "applied_seq": applied, "cut_seq": self.log.durable_seq,
                "duckdb": str(self.duck.path),
                "segments": [str(seg.path) for seg in self.log.segments()],
                "segment_bytes": self._segment_bytes}

    def unpin(self) -> bool:
        """Release a backup's pin; ``False`` if none was held (it timed out: the copy is void)."""
        if self._pin_timer is not None:
            self._pin_timer.cancel()
            self._pin_timer = None
        with self._apply_cond:
            held = self._pinned
            self._pin = None
            self._pinned = False
            self._apply_cond.notify()
        return held

    async def close(self) -> None:
        """Make everything durable and applied, checkpoint, stop the threads, close the files."""
        if self._closed:
            return
        self.unpin()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self.failed is None:
            with contextlib.suppress(StorageCommitError):
                await self.wait_durable(self.log.last_seq)
        self.log.close()
        with self._apply_cond:
            self._stopping = True
            self._apply_cond.notify()
        await asyncio.to_thread(self._applier.join)
        if self._reader_pool is not None:
            with contextlib.suppress(Exception):
                await self.loop.run_in_executor(self._reader_pool, self._close_reader)
            self._reader_pool.shutdown(wait=False)
        self._forget(list(self._unapplied))
        self._closed = True
        if self.failed is None and self._duck_full is None and self.applied_seq == self.log.last_seq:
            try:
                self.duck.checkpoint()
            except (duckdb.Error, OSError) as e:  # the records stay in the log: recovery replays them
                log.warning("slot %d: checkpoint at close failed: %s", self.slot, e)
            else:
                self.log.drop_through(self.applied_seq)
        with contextlib.suppress(duckdb.Error):
            self.duck.close()

    def abandon(self) -> None:
        """Stop without flushing or applying (tests and benchmarks: a crash in-process)."""
        self._closed = True
        self.failed = self.failed or RuntimeError("abandoned")
        with self._apply_cond:
            self._stopping = True
            self._unapplied.clear()
            self._apply_cond.notify()
        self._applier.join()
        self.log.close()
        self.duck.close()
