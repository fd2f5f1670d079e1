"""Changing the slot count: move each object whose ring slot changed, before serving.

``layout.json`` in the data dir records how many slots the files are laid out
for. When the configured count differs, :func:`migrate`:

1. writes ``migration.json`` (from, to) and fsyncs it: from here on, every
   start finishes this migration before anything else;
2. opens and closes every slot through ``SlotStore``, so each commit log is
   replayed into its DuckDB file and nothing lives outside DuckDB;
3. for each source slot, copies the rows of objects now owned by another
   slot into that slot's file (an upsert, committed), *then* deletes them
   from the source (committed). A crash between the two leaves copies that
   the resumed run overwrites with the same rows, then deletes. Nothing is
   served meanwhile, so no object is ever readable in two slots;
4. removes the files of slots that no longer exist, writes ``layout.json``,
   removes the marker.

Objects move in batches of whole objects, so each object moves atomically.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson

from durable.broker.ring import Ring
from durable.fsutil import write_durably
from durable.objectproc.storage import SlotStore
from durable.objectproc.storage.duck import DuckStore

__all__ = ["migrate", "current_layout"]

BATCH = int(os.environ.get("DURABLE_MIGRATION_BATCH", "500"))


def _write_json(path: Path, data: dict) -> None:
    write_durably(path, orjson.dumps(data), mode=0o644)


def _slot_files(data: Path) -> list[int]:
    out = []
    for p in data.glob("slot-*.duckdb"):
        try:
            out.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(out)


def current_layout(data: Path) -> int | None:
    try:
        return int(orjson.loads((data / "layout.json").read_bytes())["slots"])
    except FileNotFoundError:
        files = _slot_files(data)
        return max(files) + 1 if files else None


class _Progress:
    def __init__(self, total: int, out=sys.stderr) -> None:
        self.total, self.done, self.out = total, 0, out
        self.start = time.monotonic()
        self.last = 0.0

    def step(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start < 1.0 or now - self.last < 0.5:
            return  # a quick move prints nothing
        self.last = now
        width = 30
        filled = int(width * self.done / max(1, self.total))
        line = (f"moving objects to their new slots [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total}")
        if self.out.isatty():
            self.out.write("\r" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if time.monotonic() - self.start >= 1.0:
            self.out.write(f"\nmoved {self.done} objects in {time.monotonic() - self.start:.1f} s\n")


def _flush_logs(data: Path, slots: list[int]) -> None:
    async def run() -> None:
        for s in slots:
            store = SlotStore(data, s)
            await store.flush()
            await store.close()

    asyncio.run(run())


def migrate(data: Path, slots: int, log=print) -> int:
    """Bring the files in ``data`` to ``slots`` slots; return how many objects moved."""
    marker = data / "migration.json"
    moved = 0
    if marker.exists():
        pending = orjson.loads(marker.read_bytes())
        log(f"resuming an interrupted move from {pending['from']} to {pending['to']} slots")
        moved += _run(data, pending["from"], pending["to"], marker)
    old = current_layout(data)
    if old is None:
        _write_json(data / "layout.json", {"slots": slots})
        return moved
    if old != slots:
        log(f"the slot count changed from {old} to {slots}: moving the objects whose slot changed")
        _write_json(marker, {"from": old, "to": slots})
        moved += _run(data, old, slots, marker)
    return moved


def _run(data: Path, old: int, new: int, marker: Path) -> int:
    existing = _slot_files(data)
    _flush_logs(data, existing)
    ring = Ring(new)
    for j in range(new):  # every target file exists with the schema
        DuckStore(data / f"slot-{j}.duckdb", objects=False).close()
    plans: dict[int, dict[int, list[bytes]]] = {}
    total = 0
    for i in sorted(set(existing) | set(range(new))):
        path = data / f"slot-{i}.duckdb"
        if not path.exists():
            continue
        store = DuckStore(path, objects=False)
        try:
            objs = store.object_keys()
        finally:
            store.close()
        moves: dict[int, list[bytes]] = defaultdict(list)
        for obj in objs:
            j = ring.slot_for(obj.split(b"/", 1)[1].decode())
            if j != i:
                moves[j].append(obj)
        plans[i] = moves
        total += sum(len(v) for v in moves.values())
    progress = _Progress(total)
    for i, moves in plans.items():
        store = DuckStore(data / f"slot-{i}.duckdb", objects=False)
        try:
            for j, objs in sorted(moves.items()):
                store.move_objects(data / f"slot-{j}.duckdb", objs, batch=BATCH, moved=progress.step)
        finally:
            store.close()
    progress.finish()
    for i in existing:
        if i >= new:  # its objects all moved out
            for suffix in ("", ".wal", ".before-checkpoint", ".before-checkpoint.tmp", ".torn",
                           ".torn.tmp"):
                (data / f"slot-{i}.duckdb{suffix}").unlink(missing_ok=True)
            shutil.rmtree(data / f"slot-{i}.log", ignore_errors=True)
    _write_json(data / "layout.json", {"slots": new})
    marker.unlink(missing_ok=True)
    return total
