"""The slot's commit log: the point at which a write becomes durable.

Theory of operation
-------------------
Each *record* is one atomic write set of one object (one ``put``, one
multi-key call, one transaction, or everything an object wrote in one turn)::

    record  = header payload
    header  = u32 payload length | u32 crc32(seq ‖ payload) | u64 seq      (little endian)
    payload = u16 len(obj) obj | u8 flags (1 = delete_all first) | u32 n |
              n × ( u32 len(key) key | i32 len(value), -1 = delete | value )

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
once a batch's DuckDB transaction, which also stores the last sequence number
it covers, has committed, the segments it covered are deleted.

Recovery reads the segments in order, skips what DuckDB already has, and
stops at a torn or corrupt record at the end of the *last* segment (a crash
during its write). Damage anywhere else cannot come from a crash and is
reported as :class:`~durable.errors.StorageCorruptError` rather than guessed
around.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from durable.errors import StorageCorruptError

__all__ = ["CommitLog", "Segment", "encode_record", "scan_segment", "list_segments",
           "encode_writeset", "decode_writeset", "WriteSet"]

_HEADER = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ENTRY_HEAD = struct.Struct("<I")
_VLEN = struct.Struct("<i")
MAX_PAYLOAD = 1 << 30


@dataclass(slots=True)
class WriteSet:
    """One record's content: an object's atomic set of writes (``None`` value = delete)."""

    obj: bytes
    clear: bool
    entries: dict[str, bytes | None]


def encode_writeset(obj: bytes, clear: bool, entries: dict[str, bytes | None]) -> bytes:
    parts = [_U16.pack(len(obj)), obj, b"\x01" if clear else b"\x00", _U32.pack(len(entries))]
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
        (n,) = _U32.unpack_from(mv, pos + 1)
        pos += 5
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
    if pos != len(mv) or len(obj) != olen or flags > 1:
        raise ValueError("malformed write set: trailing bytes or bad flags")
    return WriteSet(obj, flags == 1, entries)


def encode_record(seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _HEADER.pack(len(payload), crc, seq) + payload


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


def scan_segment(data: bytes, *, last: bool, where: str) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(seq, payload)`` records; a bad record ends the last segment, else raises."""
    mv = memoryview(data)
    pos = 0
    end = len(mv)
    while pos < end:
        bad = None
        if end - pos < _HEADER.size:
            bad = "truncated header"
        else:
            length, crc, seq = _HEADER.unpack_from(mv, pos)
            body = pos + _HEADER.size
            if length > MAX_PAYLOAD or body + length > end:
                bad = "truncated record"
            else:
                payload = mv[body:body + length]
                if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
                    bad = "checksum mismatch"
        if bad is not None:
            if last:
                return  # a torn tail: the crash happened while this group was written
            raise StorageCorruptError(
                f"commit log {where} is damaged at byte {pos} ({bad}) although later segments "
                "exist; this is not a crash artefact. Restore the slot from a backup or move the "
                "segment away to accept losing its writes."
            )
        yield seq, payload
        pos = body + length


class CommitLog:
    """Append-only segments with one group-committing writer thread.

    ``append``, ``kick`` and ``commit_inline`` are called from the event loop
    thread; ``on_durable(seq)`` and ``on_error(exc)`` from the writer thread
    (``on_error`` also from ``commit_inline``).
    """

    def __init__(self, directory: Path, next_seq: int, *,
                 on_durable: Callable[[int], None], on_error: Callable[[BaseException], None],
                 segment_bytes: int = 4 << 20, fsync: Callable[[int], None] = os.fdatasync,
                 trace: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._trace = trace
        self._on_durable = on_durable
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: list[bytes] = []
        self._next_seq = next_seq
        self._stopping = False
        self._writing = False  # a group is being written (by the thread or commit_inline)
        self.failed: BaseException | None = None
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
        """Queue a record; ``kick=False`` leaves starting the write to ``kick``/``commit_inline``."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._pending.append(encode_record(seq, payload))
            if kick:
                self._cond.notify()
        return seq

    def kick(self) -> None:
        """Have the writer thread start on whatever is queued."""
        with self._cond:
            if self._pending:
                self._cond.notify()

    def commit_inline(self) -> int | None:
        """Write and sync the queued records on this thread if the writer is idle.

        Returns the last durable sequence number, or ``None`` if the writer
        thread is busy (it takes the queue when it is done), nothing is
        queued, or the log failed (``on_error`` has been called).
        """
        with self._cond:
            if self._writing or not self._pending or self._stopping or self.failed is not None:
                return None
            group, last = self._take()
        return last if self._write_taken(group, last) else None

    def drop_through(self, applied_seq: int) -> None:
        """Delete segments whose every record is at or below ``applied_seq``."""
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
        if self._fd >= 0:
            # Only the last segment may end in anything but a whole record: cut the unused
            # preallocated tail (and make the cut durable) before the next segment exists.
            os.ftruncate(self._fd, self._size)
            self._fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        path = self.directory / f"{first_seq:020d}.seg"
        # Recovery replays and deletes every segment, so a file of this name can only be an
        # empty one left by a crash right after its creation.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with contextlib.suppress(OSError):  # a filesystem without it: plain appends
                os.posix_fallocate(fd, 0, self._segment_bytes)
            os.fsync(fd)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new name must survive a crash too
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = 0
        with self._cond:  # drop_through (applier thread) replaces the list under this lock
            self._segments.append(Segment(first_seq, path))

    def _write_group(self, group: list[bytes], last: int) -> bool:
        """Write and sync one group; on an I/O error fail the log and return False."""
        if self.failed is not None:
            return False  # everything after a failure is failed too; the slot must restart
        size_before = -1
        try:
            if self._size >= self._segment_bytes:
                self._open_segment(last - len(group) + 1)
            size_before = self._size
            data = b"".join(group)
            view = memoryview(data)
            pos = size_before
            while view:
                n = os.pwrite(self._fd, view, pos)
                view = view[n:]
                pos += n
            if self._trace:
                self._trace("fsync")
            self._fsync(self._fd)
            self._size = size_before + len(data)
        except BaseException as e:  # an I/O error: the group's fate on disk is unknown
            self.failed = e
            if size_before >= 0 and self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size_before)
            self._on_error(e)
            return False
        self.durable_seq = last
        return True

    def _run(self) -> None:
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
