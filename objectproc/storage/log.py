"""The slot's commit log: the point at which a write becomes durable.

Theory of operation
-------------------
Each *record* is one atomic write set of one object (one ``put``, one
multi-key call, one transaction, or everything an object wrote in one turn)::

    record  = header payload
    header  = u32 payload length | u32 crc32(seq ‖ payload) | u64 seq      (little endian)
    payload = u16 len(obj) obj | u8 flags | [i64 alarm] | [i64 time] | u32 n |
              n × ( u32 len(key) key | i32 len(value), -1 = delete | value )
    flags   = 1: delete_all first | 2: an alarm change follows | 4: the write's time follows
              (epoch ms; records of durable < 0.7 have none)

Records are appended to *segments* (``<first seq, 20 digits>.seg`` in the
slot's log directory) by one writer thread that does *natural group commit*:
whatever was appended while the previous ``write + fdatasync`` ran is
written and synced as one group as soon as it ends; there is no timer. When
the writer is idle and the caller knows nothing else is waiting,
:meth:`CommitLog.commit_inline` writes and syncs on the calling thread
instead, which saves two thread hand-offs on a lone write.

Segments are preallocated (``posix_fallocate``) and written in place, so an
``fdatasync`` flushes data only; an append would also have to journal the
file's new size, which costs ~45 µs per sync on ext4 (0.14 → 0.09 ms, measured
with ``scripts/bench.py storage``). The unused tail of a full segment is cut
off before the next one starts, so only the last segment ever ends in
anything but a whole record.

DuckDB is fed from the records after they are durable (see ``slot.py``);
once DuckDB has *checkpointed* past a segment's records (its batch committed
with the last sequence number it covers, then folded into the main file), the
segment is deleted.

Each segment starts with a header (magic, the size it was preallocated to),
and the first record of every write group carries a flag in its length field.
Recovery (``scan_segment``) tells the two kinds of bad record apart:

* a **torn tail**: a bad record at the end of the *last* segment with nothing
  valid from a *later write group* after it. A crash during the last group's
  write explains it (its pages may even reach the disk out of order), and
  that group was never acknowledged: it is dropped;
* **damage**: a bad record followed by a valid record of a later group (that
  group was written only after the bad one's was synced, so the bad bytes had
  been durable), any bad record in a sealed segment, a segment shorter than
  its preallocation (truncated), a gap in the sequence. The slot refuses to
  start and every file is kept for ``durable verify`` and ``durable repair``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from durable.osthread import name_os_thread

from ..metrics import FSYNC_BUCKETS, Histogram

__all__ = ["ALARM_KEEP", "ALARM_DELETE", "CommitLog", "Segment", "SegmentScan", "Damage", "LogFullError", "encode_record",
           "cut_segment",
           "scan_segment", "list_segments", "encode_writeset", "decode_writeset", "WriteSet",
           "is_disk_full", "iter_records", "first_record_seq"]

_HEADER = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ENTRY_HEAD = struct.Struct("<I")
_VLEN = struct.Struct("<i")
MAX_PAYLOAD = 1 << 30
GROUP_START = 1 << 31  # in a record's length field: the first record of a write group
SEGMENT_MAGIC = b"DURSEG2\n"
SEGMENT_HEADER_SIZE = len(SEGMENT_MAGIC) + 8  # magic, u64 preallocated size (0: none)
_NONZERO = re.compile(rb"[^\x00]")


#: ``WriteSet.alarm``: the record leaves the object's alarm as it was
ALARM_KEEP = -2
#: ``WriteSet.alarm``: the record deletes the object's alarm
ALARM_DELETE = -1
_FLAG_CLEAR = 0x01
_FLAG_ALARM = 0x02  # an i64 follows the flags: the alarm's due time (epoch ms) or ALARM_DELETE
_FLAG_TIME = 0x04  # an i64 follows (after the alarm's): when the write was made, epoch ms
#: a u32 length and the object's name record's value follow (after the time): the name rides in
#: the object's write set instead of a record of its own (older versions refuse it: docs/storage.md)
_FLAG_NAME = 0x08
_FLAGS = _FLAG_CLEAR | _FLAG_ALARM | _FLAG_TIME | _FLAG_NAME
_I64 = struct.Struct("<q")


@dataclass(slots=True)
class WriteSet:
    """One record's content: an object's atomic set of writes (``None`` value = delete).

    ``alarm`` is ``ALARM_KEEP``, ``ALARM_DELETE`` or the due time in epoch
    milliseconds: the alarm changes atomically with the entries. ``time``: when
    the write was made (epoch ms; 0 = not recorded), shown as ``updated_at`` by
    ``durable sql`` and ``list_objects``. ``name``: the value of the object's name record
    (its ``name_twin``'s key ``name``), written with these entries; None: no name.
    """

    obj: bytes
    clear: bool
    entries: dict[str, bytes | None]
    alarm: int = ALARM_KEEP
    time: int = 0
    name: bytes | None = None


def encode_writeset(obj: bytes, clear: bool, entries: dict[str, bytes | None],
                    alarm: int = ALARM_KEEP, time: int = 0, name: bytes | None = None) -> bytes:
    flags = ((_FLAG_CLEAR if clear else 0) | (_FLAG_ALARM if alarm != ALARM_KEEP else 0)
             | (_FLAG_TIME if time else 0) | (_FLAG_NAME if name is not None else 0))
    parts = [_U16.pack(len(obj)), obj, bytes((flags,))]
    if alarm != ALARM_KEEP:
        parts.append(_I64.pack(alarm))
    if time:
        parts.append(_I64.pack(time))
    if name is not None:
        parts.append(_U32.pack(len(name)))
        parts.append(name)
    parts.append(_U32.pack(len(entries)))
    for key, value in entries.items():
        kb = key.encode("utf-8")
        parts.append(_U32.pack(len(kb)))
        parts.append(kb)
        if value is None:
            parts.append(_VLEN.pack(-1))
        else:
            parts.append(_VLEN.pack(len(value)))
            parts.append(value)
    return b"".join(parts)


def decode_writeset(payload: bytes | memoryview) -> WriteSet:
    """Parse a payload; raise ``ValueError`` if it is not one :func:`encode_writeset` made."""
    mv = memoryview(payload)
    try:
        (olen,) = _U16.unpack_from(mv, 0)
        pos = 2
        obj = bytes(mv[pos:pos + olen])
        pos += olen
        flags = mv[pos]
        pos += 1
        alarm = ALARM_KEEP
        if flags & _FLAG_ALARM:
            (alarm,) = _I64.unpack_from(mv, pos)
            pos += 8
        when = 0
        if flags & _FLAG_TIME:
            (when,) = _I64.unpack_from(mv, pos)
            pos += 8
        name = None
        if flags & _FLAG_NAME:
            (nlen,) = _U32.unpack_from(mv, pos)
            pos += 4
            if pos + nlen > len(mv):
                raise ValueError("name runs past the record")
            name = bytes(mv[pos:pos + nlen])
            pos += nlen
        (n,) = _U32.unpack_from(mv, pos)
        pos += 4
        entries: dict[str, bytes | None] = {}
        for _ in range(n):
            (klen,) = _ENTRY_HEAD.unpack_from(mv, pos)
            pos += 4
            key = str(mv[pos:pos + klen], "utf-8")
            pos += klen
            (vlen,) = _VLEN.unpack_from(mv, pos)
            pos += 4
            if vlen < 0:
                entries[key] = None
            else:
                if pos + vlen > len(mv):
                    raise ValueError("value runs past the record")
                entries[key] = bytes(mv[pos:pos + vlen])
                pos += vlen
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed write set: {e}") from None
    if pos != len(mv) or len(obj) != olen or flags & ~_FLAGS or alarm < ALARM_KEEP or (
            flags & _FLAG_ALARM and alarm == ALARM_KEEP) or (flags & _FLAG_TIME and when <= 0):
        raise ValueError("malformed write set: trailing bytes or bad flags")
    return WriteSet(obj, bool(flags & _FLAG_CLEAR), entries, alarm, when, name)


def encode_record(seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _HEADER.pack(len(payload), crc, seq) + payload


def iter_records(data: bytes | memoryview | None, where: str) -> list[tuple[int, memoryview]]:
    """``(seq, payload)`` of each record of a group as written (cluster mode's log messages);
    ValueError naming ``where`` if any record is damaged."""
    mv = memoryview(data or b"")
    pos, out = 0, []
    while pos < len(mv):
        got = _record_at(mv, pos, len(mv))
        if isinstance(got, str):
            raise ValueError(f"{where}: {got} at offset {pos}")
        seq, pos, _start, payload = got
        out.append((seq, payload))
    return out


def first_record_seq(data: bytes | memoryview) -> int:
    """The sequence number of the first record of a group as written (0: no record)."""
    return _HEADER.unpack_from(data, 0)[2] if len(data) >= _HEADER.size else 0


def mark_group_start(record: bytes) -> bytes:
    """The same record flagged as the first of a write group (the flag is outside the CRC)."""
    (length,) = _U32.unpack_from(record, 0)
    return _U32.pack(length | GROUP_START) + record[4:]


def segment_header(prealloc: int) -> bytes:
    return SEGMENT_MAGIC + _U64.pack(prealloc)


@dataclass(frozen=True, slots=True)
class Segment:
    first_seq: int
    path: Path


def list_segments(directory: Path) -> list[Segment]:
    segs = []
    for p in directory.glob("*.seg"):
        try:
            segs.append(Segment(int(p.stem), p))
        except ValueError:
            continue
    segs.sort(key=lambda s: s.first_seq)
    return segs


@dataclass(slots=True)
class Damage:
    """Where a segment stops making sense, and what that costs."""

    path: str
    offset: int
    reason: str
    after_seq: int | None  # the last good record before the damage (None: none in this file)
    resumes_seq: int | None = None  # the first valid record after it, if any

    def describe(self) -> str:
        where = f"{self.path} at byte {self.offset}: {self.reason}"
        if self.after_seq is not None:
            where += f", after record {self.after_seq}"
        if self.resumes_seq is not None:
            where += f"; valid records resume at record {self.resumes_seq}"
        return where


@dataclass(slots=True)
class SegmentScan:
    """Every valid record of one segment, and how it ends.

    ``torn`` is a damaged end that a crash during the last write explains
    (nothing valid from a later write group after it, in the last segment);
    ``damage`` is anything else. ``resumed`` holds the valid records found
    after the damage (what ``durable repair`` can salvage).
    """

    records: list[tuple[int, memoryview]]
    torn: Damage | None = None
    damage: Damage | None = None
    resumed: list[tuple[int, memoryview]] = field(default_factory=list)


def _record_at(mv: memoryview, pos: int, end: int) -> tuple[int, int, bool, memoryview] | str:
    """``(seq, next_pos, group_start, payload)`` of a valid record at ``pos``, else why not."""
    if end - pos < _HEADER.size:
        return "truncated header"
    length, crc, seq = _HEADER.unpack_from(mv, pos)
    group_start = bool(length & GROUP_START)
    length &= ~GROUP_START
    body = pos + _HEADER.size
    if length > MAX_PAYLOAD or body + length > end:
        return "truncated record"
    payload = mv[body:body + length]
    if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
        return "checksum mismatch"
    return seq, body + length, group_start, payload


def _resume_after(mv: memoryview, pos: int, end: int) -> tuple[int, list[tuple[int, memoryview]], bool]:
    """Find valid records after damage at ``pos``: ``(offset, records, any_group_start)``.

    Only bytes that are not zero can start a record (its length field is
    never zero), so the zero-filled preallocated tail is skipped at C speed.
    """
    data = mv.obj if isinstance(mv.obj, bytes) else bytes(mv)
    q = pos + 1
    while q < end:
        m = _NONZERO.search(data, q, end)
        if m is None:
            break
        nz = m.start()
        for start in range(max(q, nz - 3), nz + 1):  # the first non-zero byte is in the length
            got = _record_at(mv, start, end)
            if isinstance(got, str):
                continue
            found, group, at = [], False, start
            while not isinstance(got, str):
                seq, at, flag, payload = got
                found.append((seq, payload))
                group = group or flag
                got = _record_at(mv, at, end)
            return start, found, group
        q = nz + 1
    return -1, [], False


def scan_segment(data: bytes, *, last: bool, where: str) -> SegmentScan:
    """Read one segment's records and classify how it ends.

    A bad record ends the *last* segment as a torn write only if nothing valid
    from a later write group follows it: a group is written only after the
    previous one was synced, so such a record proves the damaged bytes had been
    durable. Any damage in an earlier (sealed) segment, and a preallocated
    segment shorter than its allocation (a truncated file), are damage too.
    """
    mv = memoryview(data)
    end = len(mv)
    pos = 0
    prealloc = 0
    if data[:len(SEGMENT_MAGIC)] == SEGMENT_MAGIC:
        if end < SEGMENT_HEADER_SIZE:
            return SegmentScan([], damage=Damage(where, 0, "truncated segment header", None))
        (prealloc,) = _U64.unpack_from(mv, len(SEGMENT_MAGIC))
        pos = SEGMENT_HEADER_SIZE
    elif not data.strip(b"\0"):
        return SegmentScan([])  # created, not yet written: a crash right after its creation
    records: list[tuple[int, memoryview]] = []
    while pos < end:
        got = _record_at(mv, pos, end)
        if isinstance(got, str):
            break
        seq, pos, _group, payload = got
        records.append((seq, payload))
    after = records[-1][0] if records else None
    scan = SegmentScan(records)
    if prealloc and end < prealloc:
        scan.damage = Damage(where, end, f"the file is {end} bytes but was preallocated to "
                                         f"{prealloc}: it was truncated", after)
        return scan
    if pos >= end or _NONZERO.search(data, pos, end) is None:
        return scan  # the end, or the preallocated zeros after the last write
    reason = got  # type: ignore[assignment]  # the loop broke on a bad record
    at, resumed, later_group = _resume_after(mv, pos, end)
    bad = Damage(where, pos, str(reason), after, resumed[0][0] if resumed else None)
    if last and not later_group:
        scan.torn = bad
    else:
        scan.damage = bad
        scan.resumed = resumed
    return scan


def cut_segment(data: bytes, cut_seq: int) -> bytes | None:
    """A copy of a segment that ends after its last record at or below ``cut_seq``.

    For backups of a live segment: what follows the cut may be half written.
    The copy keeps its preallocated length (zeros after the cut), so recovery
    reads it as a clean end. ``None`` if the segment has no record that old.
    """
    mv = memoryview(data)
    pos = SEGMENT_HEADER_SIZE if data[:len(SEGMENT_MAGIC)] == SEGMENT_MAGIC else 0
    prealloc = _U64.unpack_from(mv, len(SEGMENT_MAGIC))[0] if pos else 0
    end, kept = pos, False
    while True:
        got = _record_at(mv, end, len(mv))
        if isinstance(got, str) or got[0] > cut_seq:
            break
        end, kept = got[1], True
    if not kept:
        return None
    return bytes(mv[:end]) + bytes(max(0, prealloc - end))


class LogFullError(OSError):
    """The disk is full: the group was not written (its records are discarded, certainly)."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, from the OS or wrapped in a DuckDB error's message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


class CommitLog:
    """Append-only segments with one group-committing writer thread.

    ``append``, ``kick`` and ``commit_inline`` are called from the event loop
    thread; ``on_durable(seq)``, ``on_error(exc)`` and ``on_discard(exc,
    first, last)`` from the writer thread (or from ``commit_inline``).

    Failures come in two kinds. If the disk is full when a new segment must
    be allocated, nothing of the group reached the file: its records and every
    record queued after them are *discarded* (``on_discard``), sequence numbers
    restart after the last durable record, and :attr:`full` refuses appends
    until :meth:`resume`. Any other I/O error (a failed ``fdatasync`` above all)
    leaves the group's fate on disk *unknown*: the log fails for good
    (``on_error``) and the slot must restart to learn what recovery finds.
    """

    def __init__(self, directory: Path, next_seq: int, *,
                 on_durable: Callable[[int], None], on_error: Callable[[BaseException], None],
                 on_discard: Callable[[BaseException, int, int], None] | None = None,
                 segment_bytes: int = 4 << 20, fsync: Callable[[int], None] = os.fdatasync,
                 trace: Callable[[str], None] | None = None,
                 fallocate: Callable[[int, int, int], None] = os.posix_fallocate,
                 replicate: Callable[[list[bytes]], None] | None = None) -> None:
        self.directory = directory
        #: cluster mode: stores a group in the slot's replicated log before it is written
        #: here, and raises if it was not stored there (docs/cluster.md)
        self._replicate = replicate
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self.fsync_seconds = Histogram(FSYNC_BUCKETS)  # ([metrics]; written by this thread only)
        self._fallocate = fallocate
        self._trace = trace
        self._on_durable = on_durable
        self._on_error = on_error
        self._on_discard = on_discard
        self._cond = threading.Condition()
        self._pending: list[bytes] = []
        self._next_seq = next_seq
        self._stopping = False
        self._writing = False  # a group is being written (by the thread or commit_inline)
        self.failed: BaseException | None = None
        #: Set while the disk is full: appends raise it until :meth:`resume`.
        self.full: BaseException | None = None
        self.durable_seq = next_seq - 1
        self._segments: list[Segment] = []
        self._fd = -1
        self._size = 0
        self._open_segment(next_seq)
        self._thread = threading.Thread(target=self._run, name="durable-commit-log", daemon=True)
        self._thread.start()

    @property
    def last_seq(self) -> int:
        """Sequence number of the last appended record (durable or not)."""
        return self._next_seq - 1

    def append(self, payload: bytes, *, kick: bool = True) -> int:
        """Queue a record; ``kick=False`` leaves starting the write to ``kick``/``commit_inline``.

        Raises :class:`LogFullError` while the disk is full (nothing queued).
        """
        with self._cond:
            if self.full is not None:
                raise LogFullError(errno.ENOSPC, f"the commit log cannot grow: {self.full}")
            seq = self._next_seq
            self._next_seq += 1
            self._pending.append(encode_record(seq, payload))
            if kick:
                self._cond.notify()
        return seq

    def resume(self) -> None:
        """Accept appends again after a full disk (the next group tries to allocate anew)."""
        with self._cond:
            self.full = None

    def kick(self) -> None:
        """Have the writer thread start on whatever is queued."""
        with self._cond:
            if self._pending:
                self._cond.notify()

    def commit_inline(self) -> int | None:
        """Write and sync the queued records on this thread if the writer is idle.

        Returns the last durable sequence number, or ``None`` if the writer
        thread is busy (it takes the queue when it is done), nothing is
        queued, or the write failed (``on_error``/``on_discard`` was called).
        """
        with self._cond:
            if self._writing or not self._pending or self._stopping or self.failed is not None:
                return None
            group, last = self._take()
        return last if self._write_taken(group, last) else None

    def segments(self) -> list[Segment]:
        with self._cond:
            return list(self._segments)

    def drop_through(self, applied_seq: int) -> None:
        """Delete segments whose every record is at or below ``applied_seq``.

        The caller promises that those records are in a *checkpointed* DuckDB
        file, not just in DuckDB's own write-ahead log.
        """
        with self._cond:
            segs = self._segments
            keep_from = 0
            while keep_from + 1 < len(segs) and segs[keep_from + 1].first_seq <= applied_seq + 1:
                keep_from += 1
            doomed, self._segments = segs[:keep_from], segs[keep_from:]
        for s in doomed:
            if self._trace:
                self._trace("truncate")
            s.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Write and sync everything appended, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open_segment(self, first_seq: int) -> None:
        """Create, preallocate and sync the next segment, then seal the current one.

        In that order, so that a full disk leaves the current segment open and
        untouched (the caller's group is discarded, certainly), and only the
        last segment ever ends in anything but whole records.
        """
        path = self.directory / f"{first_seq:020d}.seg"
        # Recovery replays and deletes every segment, so a file of this name can only be an
        # empty one left by a crash right after its creation, or one a full disk left behind.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            prealloc = self._segment_bytes
            try:
                self._fallocate(fd, 0, prealloc)
            except OSError as e:
                if is_disk_full(e):
                    raise
                prealloc = 0  # a filesystem without it: plain appends
            header = segment_header(prealloc)
            if os.pwrite(fd, header, 0) != len(header):
                raise OSError(errno.ENOSPC, "short write of a segment header")
            os.fsync(fd)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new name must survive a crash too
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._fd >= 0:
            # Cut the unused preallocated tail (and make the cut durable) before the new
            # segment takes records; the file stays at least as long as its allocation.
            os.ftruncate(self._fd, self._size)
            self._fsync(self._fd)
            os.close(self._fd)
        self._fd = fd
        self._size = SEGMENT_HEADER_SIZE
        with self._cond:  # drop_through (applier thread) replaces the list under this lock
            self._segments.append(Segment(first_seq, path))

    def _write_group(self, group: list[bytes], last: int) -> bool:
        """Write and sync one group; on failure discard it or fail the log; return success."""
        if self.failed is not None:
            return False  # everything after a failure is failed too; the slot must restart
        size_before = -1
        written = 0
        replicated = False
        try:
            if self._size >= self._segment_bytes or self._fd < 0:
                self._open_segment(last - len(group) + 1)
            size_before = self._size
            group[0] = mark_group_start(group[0])
            if self._replicate is not None:
                # The replicated log first: a record is here only if it is there too, so a
                # host's files are always a prefix of the slot's log (docs/cluster.md).
                try:
                    self._replicate(group)
                except BaseException as e:  # refused (deposed) or unknown: the slot restarts
                    self._give_up(e)
                    return False
                replicated = True
            data = b"".join(group)
            view = memoryview(data)
            pos = size_before
            while view:
                n = os.pwrite(self._fd, view, pos)
                view = view[n:]
                pos += n
                written += n
            if self._trace:
                self._trace("fsync")
        except BaseException as e:  # nothing of the group was synced: undo what was written
            if replicated:  # stored in the cluster's log: not discarded, whatever happens here
                self._give_up(e)
            elif self._undo(size_before, written) and is_disk_full(e):
                self._discard(e)
            else:
                self._give_up(e)
            return False
        started = time.perf_counter()
        try:
            self._fsync(self._fd)
        except BaseException as e:  # the group's fate on disk is unknown
            self._give_up(e)
            return False
        self.fsync_seconds.observe(time.perf_counter() - started)
        self._size = size_before + len(data)
        self.durable_seq = last
        return True

    def _undo(self, size_before: int, written: int) -> bool:
        """Zero what a failed group wrote (the file keeps its length); False if that failed."""
        if written == 0:
            return True
        try:
            os.pwrite(self._fd, bytes(written), size_before)
            self._fsync(self._fd)
        except OSError:
            return False
        return True

    def _discard(self, exc: BaseException) -> None:
        with self._cond:
            first, last = self.durable_seq + 1, self._next_seq - 1
            self._pending = []
            self._next_seq = self.durable_seq + 1
            self.full = exc
        if self._on_discard is None:
            self._give_up(exc)
        else:
            self._on_discard(exc, first, last)

    def _give_up(self, exc: BaseException) -> None:
        self.failed = exc
        self._on_error(exc)

    def _run(self) -> None:
        name_os_thread()
        try:
            self._loop()
        except BaseException as e:  # a bug here must fail the slot loudly, never hang its waiters
            if self.failed is None:
                with contextlib.suppress(BaseException):
                    self._give_up(RuntimeError(
                        f"the commit-log writer thread failed ({type(e).__name__}: {e})"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._pending or self._writing) and not self._stopping:
                    self._cond.wait()
                while self._writing:  # stopping: let commit_inline finish first
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                group, last = self._take()
            if self._write_taken(group, last):
                self._on_durable(last)

    def _take(self) -> tuple[list[bytes], int]:
        """Claim everything queued for one writer (the caller holds ``_cond``)."""
        group, self._pending = self._pending, []
        self._writing = True
        return group, self._next_seq - 1

    def _write_taken(self, group: list[bytes], last: int) -> bool:
        """Write a claimed group, then release the claim for the other writer."""
        try:
            return self._write_group(group, last)
        finally:
            with self._cond:
                self._writing = False
                if self._pending or self._stopping:  # appended meanwhile, or close() waits
                    self._cond.notify()
