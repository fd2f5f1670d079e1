"""`durable verify` and `durable repair`: check a slot's files offline, salvage what is valid.

verify reads every commit-log segment of a slot (classifying its end as
``log.scan_segment`` does for recovery) and scans every row of its DuckDB
file, which makes DuckDB check each block's checksum. It changes nothing.

repair works on one slot that is not being served (a slot shown as
``corrupt``, or any slot of a stopped daemon). It never deletes: the damaged
files move to ``DATA_DIR/quarantine/<time>-slot-N/``. It keeps every row that
can still be read from DuckDB and every valid log record (also those after a
damaged stretch), writes a new DuckDB file, and reports exactly which record
numbers were lost. A running supervisor notices the new file and starts the
slot again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from durable.errors import StorageCorruptError
from durable.fsutil import fsync_dir
from durable.objectproc.storage import preimage
from durable.objectproc.storage.duck import NAME_ROWS, DuckStore
from durable.objectproc.storage.log import decode_writeset, list_segments, scan_segment
from durable.objectproc.storage.slot import fold

__all__ = ["SlotReport", "verify_slot", "slots_in", "repair_slot", "RepairError"]

_SALVAGE_CHUNK = 2048


class RepairError(Exception):
    """The repair cannot run (the slot is in use, nothing to repair...); the message says why."""


@dataclass
class SlotReport:
    slot: int
    ok: bool = True
    duckdb_ok: bool | None = None  # None: not checked (in use by a running daemon)
    duckdb_error: str | None = None
    rows: int | None = None
    applied_seq: int | None = None
    segments: int = 0
    records: int = 0  # valid records after applied_seq
    last_seq: int | None = None
    torn: str | None = None  # a torn tail (normal after a crash; never acknowledged)
    damage: list[str] = field(default_factory=list)
    missing: list[list[int]] = field(default_factory=list)  # [first, last] record ranges

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slots_in(data: Path) -> list[int]:
    out = set()
    for p in data.glob("slot-*"):
        stem = p.name.split(".", 1)[0][len("slot-"):]
        if stem.isdigit():
            out.add(int(stem))
    return sorted(out)


def _duck_path(data: Path, slot: int) -> Path:
    return data / f"slot-{slot}.duckdb"


def _log_dir(data: Path, slot: int) -> Path:
    return data / f"slot-{slot}.log"


def _in_use(e: BaseException) -> bool:
    """DuckDB could not take its file lock (not just any message with "lock" in it: a damaged
    block's error names the "block", and was once reported as "in use")."""
    text = str(e).lower()
    return "could not set lock" in text or "conflicting lock" in text


def _check_duckdb(path: Path, report: SlotReport) -> None:
    if not path.exists():
        report.duckdb_ok, report.applied_seq, report.rows = True, 0, 0
        return
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        if _in_use(e):
            report.duckdb_error = "in use by a running daemon (that slot is serving)"
            return
        report.duckdb_ok, report.duckdb_error = False, str(e)
        return
    try:
        report.applied_seq = con.execute("SELECT v FROM meta WHERE k = 'applied_seq'").fetchall()[0][0]
        # Reading every byte of every row makes DuckDB verify every block's checksum.
        rows, _size = con.execute("SELECT count(*), sum(octet_length(pk)) + sum(coalesce(octet_length(v), 0)) "
                                  "FROM kv WHERE v IS NOT NULL").fetchall()[0]
        con.execute("SELECT count(*), sum(octet_length(obj)) FROM kv").fetchall()
        with contextlib.suppress(duckdb.CatalogException, duckdb.BinderException):  # (older)
            con.execute("SELECT count(*), sum(octet_length(obj) + coalesce(octet_length(name), 0))"
                        " FROM objects").fetchall()  # (names are kept there: duck.NAME_PREFIX)
        report.rows, report.duckdb_ok = rows, True
    except duckdb.Error as e:
        report.duckdb_ok, report.duckdb_error = False, str(e)
    finally:
        con.close()


def _scan_log(data: Path, slot: int, applied: int, report: SlotReport,
              keep: Callable[[int, bytes], None] | None = None) -> None:
    segments = list_segments(_log_dir(data, slot))
    report.segments = len(segments)
    expect = applied + 1
    for i, seg in enumerate(segments):
        scan = scan_segment(seg.path.read_bytes(), last=i == len(segments) - 1, where=str(seg.path))
        if scan.damage is not None:
            report.damage.append(scan.damage.describe())
        if scan.torn is not None:
            report.torn = scan.torn.describe()
        for seq, payload in [*scan.records, *scan.resumed]:
            if seq < expect:
                continue
            if seq > expect:
                report.missing.append([expect, seq - 1])
            try:
                decode_writeset(payload)
            except ValueError as e:
                report.damage.append(f"record {seq} in {seg.path} does not decode: {e}")
                report.missing.append([seq, seq])
            else:
                report.records += 1
                if keep is not None:
                    keep(seq, bytes(payload))
            expect = seq + 1
            report.last_seq = seq


def verify_slot(data: Path, slot: int) -> SlotReport:
    """Check one slot's DuckDB file and commit log; change nothing."""
    report = SlotReport(slot)
    _check_duckdb(_duck_path(data, slot), report)
    if report.duckdb_ok is False:
        cut = preimage.recover(_duck_path(data, slot), dry_run=True)
        if cut is not None:
            report.duckdb_error = (
                f"{report.duckdb_error} (a checkpoint was cut short here: `durable repair --slot "
                f"{slot} --yes`, or the daemon's next start, puts back the {len(cut.blocks)} "
                f"block(s) it left half written from "
                f"{preimage.image_path(_duck_path(data, slot)).name}, losing nothing)")
    _scan_log(data, slot, report.applied_seq or 0, report)
    report.ok = (report.duckdb_ok is not False and not report.damage and not report.missing)
    return report


def _salvage_rows(path: Path, progress: Callable[[str], None]) -> tuple[list[tuple], int, int, str]:
    """Every row still readable from a damaged DuckDB file, names included (kept in
    ``objects``, not ``kv``: duck.NAME_PREFIX, as the name rows :meth:`DuckStore.apply`
    takes): (rows, applied_seq, lost, data_dir_id)."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        progress(f"the DuckDB file cannot be opened at all ({e}); rebuilding from the log only")
        return [], 0, -1, ""
    applied, ident = 0, ""
    try:
        with contextlib.suppress(duckdb.Error):
            applied = con.execute("SELECT v FROM meta WHERE k = 'applied_seq'").fetchall()[0][0]
        with contextlib.suppress(duckdb.Error, IndexError):
            ident = con.execute("SELECT v FROM meta_text WHERE k = 'data_dir_id'").fetchall()[0][0]
        rows, lost = _salvage(con, "kv", f"SELECT pk, obj, v, {_t(con)} FROM kv WHERE TRUE",
                              "rows", progress)
        try:
            con.execute("SELECT name FROM objects LIMIT 0").fetchall()
        except duckdb.Error:  # (a file from before names were kept there, or its table lost)
            return rows, applied, lost, ident
        names, _ = _salvage(con, "objects", NAME_ROWS, "names", progress)
        return rows + names, applied, lost, ident
    finally:
        con.close()


def _salvage(con: duckdb.DuckDBPyConnection, table: str, sql: str, what: str,
             progress: Callable[[str], None]) -> tuple[list[tuple], int]:
    """``sql``'s rows (it ends in a WHERE clause on ``table``): whole, or else a chunk of
    rowids at a time, skipping the chunks that fail; with at most how many rows were lost."""
    try:
        return con.execute(sql).fetchall(), 0
    except duckdb.Error:
        pass
    try:
        top = con.execute(f"SELECT max(rowid) FROM {table}").fetchall()[0][0] or 0
    except duckdb.Error:
        top = 1 << 24
    rows: list[tuple] = []
    lost = 0
    for lo in range(0, top + 1, _SALVAGE_CHUNK):
        try:
            rows += con.execute(f"{sql} AND rowid >= $1 AND rowid < $2",
                                [lo, lo + _SALVAGE_CHUNK]).fetchall()
        except duckdb.Error:
            lost += 1
    progress(f"read {len(rows)} {what} from the damaged DuckDB file; {lost} chunks of up to "
             f"{_SALVAGE_CHUNK} rows were unreadable")
    return rows, lost * _SALVAGE_CHUNK


def _t(con: duckdb.DuckDBPyConnection) -> str:
    """The write-time column, or NULL for a file from before durable 0.7 (which has none)."""
    try:
        con.execute("SELECT t FROM kv LIMIT 0").fetchall()
        return "t"
    except duckdb.Error:
        return "NULL"


def repair_slot(data: Path, slot: int, *, identity: str | None,
                progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Salvage a slot; move the damaged files to quarantine; return what was kept and lost."""
    duck_path, log_dir = _duck_path(data, slot), _log_dir(data, slot)
    before = verify_slot(data, slot)
    if before.duckdb_ok is None:
        raise RepairError(f"slot {slot} is being served by a running daemon; repair only a slot "
                          "that `durable status` shows as corrupt, or stop the daemon first")
    if before.ok:
        return {"slot": slot, "repaired": False, "report": before.as_dict(),
                "message": f"slot {slot} is sound; nothing to repair"}
    put_back = preimage.recover(duck_path)  # (a checkpoint cut short: nothing need be lost)
    if put_back is not None:
        after = verify_slot(data, slot)
        if after.ok:
            return {"slot": slot, "repaired": True, "put_back": put_back.blocks,
                    "kept": str(put_back.kept), "rows": after.rows, "report": before.as_dict(),
                    "message": put_back.describe(duck_path)}
        progress(f"{put_back.describe(duck_path)}; the file still fails verification")
        before = after
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    quarantine = data / "quarantine" / f"{stamp}-slot-{slot}"
    quarantine.mkdir(parents=True, mode=0o700)
    new_path = data / f"slot-{slot}.duckdb.repair"
    for leftover in (new_path, Path(f"{new_path}.wal")):
        leftover.unlink(missing_ok=True)

    rows_lost = 0
    if before.duckdb_ok:
        progress("the DuckDB file is sound; copying it")
        shutil.copyfile(duck_path, new_path)
        wal = Path(f"{duck_path}.wal")
        if wal.exists():
            shutil.copyfile(wal, Path(f"{new_path}.wal"))
        store = DuckStore(new_path)
        applied = store.applied_seq()
    else:
        progress("the DuckDB file is damaged; reading every row that can still be read")
        rows, applied, rows_lost, ident = _salvage_rows(duck_path, progress)
        store = DuckStore(new_path)
        if rows:
            batch = {pk: (obj, v, t) for pk, obj, v, t in rows}
            store.apply(batch, set(), applied)
        else:
            store.apply({}, set(), applied)
        identity = identity or ident or None
    if identity:
        store.set_meta_text("data_dir_id", identity)

    kept: list[tuple[int, bytes]] = []
    report = SlotReport(slot)
    _scan_log(data, slot, applied, report, keep=lambda seq, p: kept.append((seq, p)))
    progress(f"replaying {len(kept)} valid log records after record {applied}")
    for i in range(0, len(kept), 50_000):
        part = kept[i:i + 50_000]
        out: dict[bytes, tuple[bytes, bytes | None]] = {}
        clears: set[bytes] = set()
        alarms: dict[bytes, int] = {}
        fold([decode_writeset(p) for _, p in part], out, clears, alarms)
        store.apply(out, clears, part[-1][0], alarms)
    store.checkpoint()
    store.close()

    moved = []
    for src in (duck_path, Path(f"{duck_path}.wal"), preimage.image_path(duck_path),
                preimage.kept_path(duck_path), log_dir):
        if src.exists():
            os.replace(src, quarantine / src.name)
            moved.append(src.name)
    os.replace(new_path, duck_path)
    Path(f"{new_path}.wal").unlink(missing_ok=True)
    log_dir.mkdir(mode=0o700)
    fsync_dir(data)
    after = verify_slot(data, slot)
    if not after.ok:
        raise StorageCorruptError(f"slot {slot} still fails verification after repair: {after}")
    return {"slot": slot, "repaired": True, "quarantine": str(quarantine), "moved": moved,
            "records_kept": len(kept), "records_lost": report.missing,
            "unknown_loss": [f"{d}: the records after it are lost, how many is unknown"
                             for d in report.damage if "truncated" in d],
            "duckdb_rows_lost_at_most": rows_lost if rows_lost >= 0 else None,
            "rows": after.rows, "report": before.as_dict()}
