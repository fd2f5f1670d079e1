"""Recovery of one slot at start: check its DuckDB file's identity, verify and replay its log.

Rules this file keeps (docs/storage.md, "Faults on disk"):

* **Nothing changes until every segment has been read.** Damage that costs a
  record DuckDB does not hold (a gap after ``applied_seq``, damage whose
  first lost record is past it, a truncated last segment) raises
  :class:`StorageCorruptError` naming files, offsets and records, and leaves
  every file as it was.
* Damage among records DuckDB already holds loses nothing: it is logged, and
  its segment moves to ``quarantine/`` instead of being deleted.
* A torn tail (see ``log.scan_segment``) is dropped and said in the log.
* The replayed records are checkpointed into DuckDB's main file before any
  segment is deleted. If that checkpoint cannot run (out of memory at the
  slot's ceiling), every segment stays: the records are in DuckDB's WAL and in
  the log, and the next open that checkpoints deletes them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from durable.errors import StorageCorruptError, StorageError
from durable.fsutil import fsync_dir, write_durably

from .duck import DuckStore
from .log import Damage, WriteSet, cut_segment, decode_writeset, list_segments, scan_segment

__all__ = ["DataDirMismatchError", "check_identity", "replay_log", "Recovered"]

log = logging.getLogger("durable.objectproc")


class DataDirMismatchError(StorageError):
    """A slot's files carry another data dir's identity (files of two dirs were mixed)."""


def check_identity(duck: DuckStore, data_dir_id: str) -> None:
    """Refuse a DuckDB file that belongs to another data dir (files moved or mixed up)."""
    have = duck.meta_text("data_dir_id")
    if have is None:
        duck.set_meta_text("data_dir_id", data_dir_id)
    elif have != data_dir_id:
        raise DataDirMismatchError(
            f"{duck.path} belongs to data dir {have}, but this data dir's identity is "
            f"{data_dir_id}: the files of two data dirs were mixed. Put the right files back "
            "or restore the data dir from a backup (`durable restore`).")


@dataclass
class Recovered:
    next_seq: int
    replayed: int
    torn: Damage | None


def _verify(segments: list, applied: int, slot: int) -> tuple[list[tuple[Path, Damage]], Damage | None]:
    """Read every segment; raise if damage costs a record; return harmless damage and the tear."""
    expect = applied + 1
    problems: list[str] = []
    damaged: list[tuple[Path, Damage]] = []
    torn: Damage | None = None
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        scan = scan_segment(seg.path.read_bytes(), last=last, where=str(seg.path))
        for seq, payload in [*scan.records, *scan.resumed]:
            if seq < expect:
                continue
            if seq != expect:
                problems.append(f"{seg.path}: the log jumps from record {expect - 1} to "
                                f"{seq}; records {expect}..{seq - 1} are missing")
            try:
                decode_writeset(payload)
            except ValueError as e:
                problems.append(f"record {seq} in {seg.path}: {e}")
            expect = seq + 1
        if scan.damage is not None:
            damaged.append((seg.path, scan.damage))
            d = scan.damage
            # The first record the damage cost: after the last good one, or the segment's
            # first (its name). Past DuckDB's position, or at an unknowable end: fatal.
            lost_first = d.after_seq + 1 if d.after_seq is not None else seg.first_seq
            if lost_first > applied or (last and not scan.resumed):
                problems.append(d.describe())
        torn = scan.torn or torn
    if problems:
        raise StorageCorruptError(
            f"slot {slot}: the commit log is damaged and no file was changed: "
            + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5
                                          else "")
            + f". Run `durable verify --slot {slot}` for the full report, then "
            f"`durable repair --slot {slot} --yes` to keep every valid record, or restore "
            "the data dir from a backup.")
    return damaged, torn


def replay_log(duck: DuckStore, log_dir: Path, *, slot: int,
               apply: Callable[[list[WriteSet], int], None], batch: int,
               quarantine: Path, checkpoint: bool = True) -> Recovered:
    """Verify the log tail after DuckDB's position, replay it, checkpoint, then delete it.

    ``checkpoint=False``: the slot's checkpoint at open ran out of memory at its ceiling;
    the replayed records stay in DuckDB's WAL and every segment stays too."""
    applied = duck.applied_seq()
    segments = list_segments(log_dir)
    damaged, torn = _verify(segments, applied, slot)
    for _path, damage in damaged:
        log.warning("slot %d: the commit log is damaged (%s), but only among records DuckDB "
                    "already holds: nothing is lost; the segment is kept in quarantine/",
                    slot, damage.describe())
    if torn is not None:
        log.warning("slot %d: the commit log ends in a torn write (%s): a crash during a "
                    "write; its records were never acknowledged and are dropped",
                    slot, torn.describe())
    expect = applied + 1
    pending: list[WriteSet] = []
    replayed = 0
    for i, seg in enumerate(segments):
        scan = scan_segment(seg.path.read_bytes(), last=i == len(segments) - 1,
                            where=str(seg.path))
        for seq, payload in [*scan.records, *scan.resumed]:
            if seq < expect:
                continue
            pending.append(decode_writeset(payload))
            expect = seq + 1
            if len(pending) >= batch:
                apply(pending, expect - 1)
                replayed += len(pending)
                pending = []
    if pending or expect - 1 != applied:
        apply(pending, expect - 1)
        replayed += len(pending)
    if not checkpoint:
        if torn is not None:  # (cut off: the segments written after it must not make it damage)
            _cut_torn_tail(segments[-1].path, expect - 1)
        return Recovered(expect, replayed, torn)
    duck.checkpoint()  # the records are in the main file: now, and only now, delete them
    if damaged:
        where = quarantine / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                              + f"-slot-{slot}-log")
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, _ in damaged:
            os.replace(path, where / path.name)
    for seg in segments:
        seg.path.unlink(missing_ok=True)
    return Recovered(expect, replayed, torn)


def _cut_torn_tail(path: Path, last_seq: int) -> None:
    """The last segment without its torn tail, for a log that keeps it and writes on in a
    new segment: only the last segment may end in a tear, any other such end is damage."""
    cut = cut_segment(path.read_bytes(), last_seq)
    if cut is None:  # (nothing in it before the tear: nothing acknowledged)
        path.unlink()
        fsync_dir(path.parent)
    else:
        write_durably(path, cut)
