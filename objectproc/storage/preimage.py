"""The blocks a DuckDB checkpoint rewrites in place, kept as they were before it.

DuckDB copies data on write, except its metadata: a checkpoint writes new metadata into
the free 4 KiB parts of the metadata blocks the last checkpoint used, then rewrites each
such 256 KiB block whole, in place (``strace``: ``pwrite64(fd, ..., 262144, 12288)``),
before it writes the new header. The block's checksum covers all of it. A write cut short
there (SIGKILL stops a write between the page-cache folios it spans, and a DuckDB block
starts 12 KiB past a 256 KiB boundary, so it spans several; a power cut keeps any subset
of its pages) leaves a block whose checksum matches neither version. The header on disk
still names the old metadata in it, so DuckDB refuses the whole file: every row the slot
ever checkpointed, not only the checkpoint's new ones. (Seen once in CI, kept in
``docs/evidence/duckdb-checksum-2026-12-04.tgz``; ``tests/contract/test_checkpoint_tear.py``
builds such files.)

So before each checkpoint the store writes those blocks, with the file's headers, to
``<file>.before-checkpoint`` and fsyncs it. At the next writable open, if the file's
headers are still the saved ones (no checkpoint finished since) and a saved block differs
from the file, that checkpoint was cut short: the saved bytes go back. They are exactly what
the old header names, and DuckDB's WAL (which that checkpoint had not yet removed) and the
commit log still hold every write since. Once a checkpoint finishes, the headers differ and
the image is never used: it cannot roll back a finished checkpoint or mask later damage.

The file layout (three 4 KiB headers, then block ``n`` at ``12288 + n * block_size``) is
DuckDB's storage format, which ``pyproject.toml`` pins (2.0.x).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from durable.fsutil import write_durably

__all__ = ["HEADERS", "Image", "Recovered", "image_path", "kept_path", "load", "lock", "recover",
           "save"]

HEADERS = 3 * 4096  # DuckDB's main header and its two database headers
_MAGIC = b"DURABLE-PREIMAGE"
_HEAD = struct.Struct("<16sIII")  # magic, version, block size, block count
_VERSION = 1
_DIGEST = 32


def image_path(db: Path) -> Path:
    return db.with_name(db.name + ".before-checkpoint")


def kept_path(db: Path) -> Path:
    """Where the bytes found in place of a put-back image are kept (the latest only)."""
    return db.with_name(db.name + ".torn")


@dataclass(frozen=True)
class Image:
    headers: bytes
    block_size: int
    blocks: dict[int, bytes]  # block id -> its bytes

    def offset(self, block: int) -> int:
        return HEADERS + block * self.block_size

    def encode(self) -> bytes:
        ids = sorted(self.blocks)
        body = b"".join([_HEAD.pack(_MAGIC, _VERSION, self.block_size, len(ids)),
                         struct.pack(f"<{len(ids)}q", *ids), self.headers,
                         *(self.blocks[i] for i in ids)])
        return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()

    @classmethod
    def decode(cls, data: bytes) -> Image | None:
        """None for anything but a whole, intact image (the digest: a damaged one is no guide)."""
        if len(data) < _HEAD.size + HEADERS + _DIGEST:
            return None
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
            return None
        magic, version, size, count = _HEAD.unpack_from(body)
        if magic != _MAGIC or version != _VERSION or len(body) != (
                _HEAD.size + 8 * count + HEADERS + count * size):
            return None
        ids = struct.unpack_from(f"<{count}q", body, _HEAD.size)
        at = _HEAD.size + 8 * count
        headers = body[at:at + HEADERS]
        at += HEADERS
        return cls(headers, size, {b: body[at + i * size:at + (i + 1) * size]
                                   for i, b in enumerate(ids)})


def _read(fd: int, size: int, offset: int) -> bytes:
    out = os.pread(fd, size, offset)
    return out + bytes(size - len(out))  # (past the end: DuckDB's file grows as it writes)


def save(db: Path, fd: int, blocks: list[int], block_size: int) -> None:
    """Keep ``blocks`` of the DuckDB file open as ``fd`` (and its headers) before a checkpoint.

    ``fd`` must stay open as long as DuckDB's connection: DuckDB locks its file with
    ``fcntl``, and closing *any* descriptor of the file in this process drops that lock.
    """
    image = Image(_read(fd, HEADERS, 0), block_size,
                  {b: _read(fd, block_size, HEADERS + b * block_size) for b in blocks})
    write_durably(image_path(db), image.encode())  # (the old image or the new, never torn)


def load(db: Path) -> Image | None:
    try:
        return Image.decode(image_path(db).read_bytes())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Recovered:
    blocks: list[int]  # the blocks put back
    kept: Path  # what was found in their place

    def describe(self, db: Path) -> str:
        return (f"{db.name}: its last checkpoint was cut short while DuckDB rewrote "
                f"{len(self.blocks)} metadata block(s) in place; put back as they were before "
                f"it from {image_path(db).name} (what was found is kept in {self.kept.name}). "
                "Nothing is lost: the writes since are in DuckDB's WAL and the commit log")


def lock(fd: int) -> bool:
    """Take the lock DuckDB takes (``fcntl``, the whole file, exclusive) without waiting;
    False if another process holds it (DuckDB there may be mid-checkpoint: hands off).
    Within this process it merges with DuckDB's own, so DuckDB may open the file after."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def recover(db: Path, fd: int | None = None, *, dry_run: bool = False) -> Recovered | None:
    """Put back the blocks a cut-short checkpoint left half rewritten; None if none was.

    ``fd``: the file, open for writing and :func:`lock`-ed by the caller, who keeps it open
    as long as its DuckDB connection. Without one, the file is opened and locked here, and
    nothing is done if another process holds it. ``dry_run``: say, change nothing.
    """
    image = load(db)
    if image is None or not image.blocks:
        return None
    own = fd is None
    if own:
        try:
            fd = os.open(db, os.O_RDONLY if dry_run else os.O_RDWR)
        except FileNotFoundError:
            return None
        if not dry_run and not lock(fd):
            os.close(fd)
            return None
    try:
        if _read(fd, HEADERS, 0) != image.headers:
            return None  # a checkpoint finished after the image: it no longer applies
        found = {b: _read(fd, image.block_size, image.offset(b)) for b in image.blocks}
        differ = sorted(b for b, now in found.items() if now != image.blocks[b])
        if not differ or dry_run:
            return Recovered(differ, kept_path(db)) if differ else None
        kept = kept_path(db)
        write_durably(kept, Image(image.headers, image.block_size,
                                  {b: found[b] for b in differ}).encode())
        for b in differ:  # (cut short in turn, the next open puts them back again)
            view, at = memoryview(image.blocks[b]), image.offset(b)
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
        os.fsync(fd)
        return Recovered(differ, kept)
    finally:
        if own:
            os.close(fd)
