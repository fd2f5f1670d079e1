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
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from durable.errors import StorageCommitError, StorageCorruptError

from .duck import DuckStore
from .limits import DEFAULT_LIMITS, StorageLimits
from .log import CommitLog, WriteSet, decode_writeset, encode_writeset, list_segments, scan_segment

__all__ = ["SlotStore", "tune_gc"]

_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OBJECT_ID = re.compile(r"[A-Za-z0-9_\-]+\Z")
_REPLAY_BATCH = 50_000
# Live batches stay small while DuckDB keeps up: converting a batch's parameters
# holds the GIL (measured ~1 ms per 1,000 rows, stalling every object of the
# slot), so a 2,048-record cap bounds that stall. When a backlog builds, batches
# grow to _REPLAY_BATCH: bigger batches cost far less CPU per row at 1M rows
# (~6 µs vs ~35 µs), so DuckDB catches up instead of falling further behind.
_LIVE_BATCH = 2048
_BACKLOG = 16_384


def tune_gc() -> None:
    """Garbage-collector settings for a process that hosts a slot (call once, at start).

    With the default gen-0 threshold (700) a slot under 100 concurrent writers
    collects so often that GC pauses alone add ~3 ms to the p99 write wait
    (measured in scripts/bench.py). Objects live long here (caches, overlay),
    so: freeze what start-up made, and collect the young generation less often.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class _Record:
    """A submitted write set; its identity marks which overlay entries it still owns."""

    __slots__ = ("seq", "ws")

    def __init__(self, seq: int, ws: WriteSet) -> None:
        self.seq = seq
        self.ws = ws


class _Pending:
    """One object's not-yet-applied writes: key -> record that wrote it last."""

    __slots__ = ("entries", "clear")

    def __init__(self) -> None:
        self.entries: dict[str, _Record] = {}
        self.clear: _Record | None = None


def object_key(namespace: str, object_id: str) -> bytes:
    """The ``obj`` column value; raise ``ValueError`` for names that would break the layout."""
    if type(namespace) is not str or not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace {namespace!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
    if type(object_id) is not str or not _OBJECT_ID.match(object_id):
        raise ValueError(f"object id {object_id!r} must be letters, digits, '_' or '-'")
    return f"{namespace}/{object_id}".encode()


def fold(records: list[WriteSet], rows: dict[bytes, tuple[bytes, bytes | None]],
         clears: set[bytes]) -> None:
    """Fold write sets, in order, into last-write-wins rows plus objects to clear first."""
    by_obj: dict[bytes, list[bytes]] = {}
    for ws in records:
        if ws.clear:
            for pk in by_obj.pop(ws.obj, ()):
                rows.pop(pk, None)
            clears.add(ws.obj)
        prefix = ws.obj + b"/"
        pks = by_obj.setdefault(ws.obj, [])
        for key, value in ws.entries.items():
            pk = prefix + key.encode("utf-8")
            rows[pk] = (ws.obj, value)
            pks.append(pk)


class SlotStore:
    """Storage for every object of one slot. Create it inside the running event loop."""

    def __init__(self, directory: str | os.PathLike[str], slot: int = 0, *,
                 limits: StorageLimits = DEFAULT_LIMITS, segment_bytes: int = 4 << 20,
                 apply_min_records: int = 512, apply_max_delay: float = 0.1,
                 fsync: Callable[[int], None] = os.fdatasync,
                 trace: Callable[[str], None] | None = None,
                 memory_limit: str = "512MB") -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.slot = slot
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._trace = trace
        self._apply_min = apply_min_records
        self._apply_delay = apply_max_delay
        self.duck = DuckStore(self.directory / f"slot-{slot}.duckdb", memory_limit=memory_limit)
        log_dir = self.directory / f"slot-{slot}.log"
        log_dir.mkdir(exist_ok=True, mode=0o700)
        self.replayed = 0
        started = time.perf_counter()
        next_seq = self._recover(log_dir)
        self.recovery_seconds = time.perf_counter() - started
        self._overlay: dict[bytes, _Pending] = {}
        self._unapplied: deque[_Record] = deque()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.failed: BaseException | None = None
        self.applied_seq = next_seq - 1
        self._apply_cond = threading.Condition()
        self._stopping = False
        self._urgent = 0
        self._applier_idle = False
        self._apply_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.log = CommitLog(log_dir, next_seq, on_durable=self._durable_from_thread,
                             on_error=self._error_from_thread, segment_bytes=segment_bytes,
                             fsync=fsync, trace=trace)
        self._applier = threading.Thread(target=self._apply_loop, name="durable-applier",
                                         daemon=True)
        self._applier.start()
        self._closed = False
        #: Set by the object process: whether a lone ``wait_durable`` may write and sync
        #: on the loop thread (nothing else would wait behind that ~0.1 ms block).
        self.commit_inline_when: Callable[[], bool] | None = None
        self.inline_commits = 0  # syncs that wrote and synced on the loop thread

    # -- recovery -----------------------------------------------------------------
    def _recover(self, log_dir: Path) -> int:
        """Replay the log tail after DuckDB's position; return the next sequence number."""
        applied = self.duck.applied_seq()
        segments = list_segments(log_dir)
        expect = applied + 1
        batch: list[WriteSet] = []
        for i, seg in enumerate(segments):
            data = seg.path.read_bytes()
            for seq, payload in scan_segment(data, last=i == len(segments) - 1, where=str(seg.path)):
                if seq < expect:
                    continue
                if seq != expect:
                    raise StorageCorruptError(
                        f"commit log {seg.path} jumps from record {expect - 1} to {seq}; "
                        "records are missing")
                try:
                    batch.append(decode_writeset(payload))
                except ValueError as e:
                    raise StorageCorruptError(f"record {seq} in {seg.path}: {e}") from None
                expect += 1
                if len(batch) >= _REPLAY_BATCH:
                    self._apply_writesets(batch, expect - 1)
                    self.replayed += len(batch)
                    batch = []
        if batch or expect - 1 != applied:
            self._apply_writesets(batch, expect - 1)
            self.replayed += len(batch)
        for seg in segments:
            seg.path.unlink()
        return expect

    def _apply_writesets(self, batch: list[WriteSet], last_seq: int) -> None:
        rows: dict[bytes, tuple[bytes, bytes | None]] = {}
        clears: set[bytes] = set()
        fold(batch, rows, clears)
        if self._trace:
            self._trace("apply_begin")
        self.duck.apply(rows, clears, last_seq)
        if self._trace:
            self._trace("apply_commit")

    # -- writes (loop thread) -----------------------------------------------------
    def submit(self, obj: bytes, clear: bool, entries: dict[str, bytes | None], *,
               kick: bool = True) -> int:
        """Log one atomic write set; return its sequence number (durable later).

        ``kick=False`` is for a caller that calls :meth:`wait_durable` at once,
        which then decides whether to commit on this thread.
        """
        self.check_usable()
        ws = WriteSet(obj, clear, entries)
        seq = self.log.append(encode_writeset(obj, clear, entries), kick=kick)
        rec = _Record(seq, ws)
        pending = self._overlay.get(obj)
        if pending is None:
            pending = self._overlay[obj] = _Pending()
        if clear:
            pending.entries.clear()
            pending.clear = rec
        for key in entries:
            pending.entries[key] = rec
        self._unapplied.append(rec)
        return seq

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
                self._wake_applier()
            if seq <= self.log.durable_seq and not self._waiters:
                return
        self.log.kick()
        fut = self.loop.create_future()
        self._waiters.append((seq, fut))
        await fut

    def check_usable(self) -> None:
        if self.failed is not None:
            raise StorageCommitError(
                f"slot {self.slot} storage failed ({type(self.failed).__name__}: {self.failed}); "
                "unsaved writes were discarded and the slot's process must restart to recover"
            )
        if self._closed:
            raise StorageCommitError(f"slot {self.slot} storage is closed")

    def _durable_from_thread(self, seq: int) -> None:
        self.loop.call_soon_threadsafe(self._resolve, seq)
        self._wake_applier()

    def _wake_applier(self) -> None:
        # Wake the applier only when it has something to decide: it sleeps without a
        # deadline when idle, and a wake-up per fsync would take the GIL from the loop.
        if self._applier_idle or len(self._unapplied) >= self._apply_min:
            with self._apply_cond:
                self._apply_cond.notify()

    def _resolve(self, seq: int) -> None:
        w = self._waiters
        while w and w[0][0] <= seq:
            _, fut = w.popleft()
            if not fut.done():
                fut.set_result(None)

    def _error_from_thread(self, exc: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._fail, exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        err = StorageCommitError(
            f"slot {self.slot} could not make writes durable ({type(exc).__name__}: {exc}); "
            "the object's unsaved state was discarded")
        for waiters in (self._waiters, self._apply_waiters):
            while waiters:
                _, fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(err)

    # -- reads (loop thread) ------------------------------------------------------
    def read(self, obj: bytes, key: str) -> bytes | None:
        pending = self._overlay.get(obj)
        if pending is not None:
            rec = pending.entries.get(key)
            if rec is not None:
                return rec.ws.entries[key]
            if pending.clear is not None:
                return None
        return self.duck.read_key(obj + b"/" + key.encode("utf-8"))

    def read_all(self, obj: bytes) -> dict[str, bytes]:
        """Every stored key of an object, unapplied writes included."""
        pending = self._overlay.get(obj)
        out: dict[str, bytes] = {}
        if pending is None or pending.clear is None:
            cut = len(obj) + 1
            for pk, v in self.duck.read_object(obj):
                if v is not None:
                    out[pk[cut:].decode("utf-8")] = v
        if pending is not None:
            for key, rec in pending.entries.items():
                v = rec.ws.entries[key]
                if v is None:
                    out.pop(key, None)
                else:
                    out[key] = v
        return out

    # -- applier (its own thread) -----------------------------------------------
    def _apply_loop(self) -> None:
        while True:
            deadline = None
            with self._apply_cond:
                while True:
                    ready = self._ready_count()
                    if ready and (self._stopping or self._urgent or ready >= self._apply_min):
                        break
                    if self._stopping:
                        return
                    if ready:
                        now = time.monotonic()
                        if deadline is None:
                            deadline = now + self._apply_delay
                        if now >= deadline:
                            break
                        self._apply_cond.wait(deadline - now)
                    else:
                        deadline = None
                        self._applier_idle = True
                        self._apply_cond.wait()
                        self._applier_idle = False
            batch: list[_Record] = []
            durable = self.log.durable_seq
            cap = _LIVE_BATCH if len(self._unapplied) < _BACKLOG else _REPLAY_BATCH
            while self._unapplied and self._unapplied[0].seq <= durable and len(batch) < cap:
                batch.append(self._unapplied.popleft())
            if not batch:
                continue
            try:
                self._apply_writesets([r.ws for r in batch], batch[-1].seq)
            except BaseException as e:  # the DuckDB file is unusable: fail the slot
                self.loop.call_soon_threadsafe(self._fail, e)
                return
            self.applied_seq = batch[-1].seq
            self.log.drop_through(self.applied_seq)
            self.loop.call_soon_threadsafe(self._forget, batch)

    def _ready_count(self) -> int:
        u = self._unapplied
        if not u or u[0].seq > self.log.durable_seq:
            return 0
        return max(1, min(len(u), self.log.durable_seq - u[0].seq + 1))

    def _forget(self, batch: list[_Record]) -> None:
        """Drop overlay entries that DuckDB now has (unless a later write took them)."""
        overlay = self._overlay
        for rec in batch:
            pending = overlay.get(rec.ws.obj)
            if pending is None:
                continue
            if pending.clear is rec:
                pending.clear = None
            entries = pending.entries
            for key in rec.ws.entries:
                if entries.get(key) is rec:
                    del entries[key]
            if not entries and pending.clear is None:
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

    async def close(self) -> None:
        """Make everything durable and applied, stop the threads, close the files."""
        if self._closed:
            return
        if self.failed is None:
            with contextlib.suppress(StorageCommitError):
                await self.wait_durable(self.log.last_seq)
        self.log.close()
        with self._apply_cond:
            self._stopping = True
            self._apply_cond.notify()
        await asyncio.to_thread(self._applier.join)
        self._forget(list(self._unapplied))
        self._closed = True
        if self.failed is None and self.applied_seq == self.log.last_seq:
            self.log.drop_through(self.applied_seq)
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
