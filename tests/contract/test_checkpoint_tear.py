"""A checkpoint cut short (SIGKILL or power loss) never loses the state before it.

DuckDB 2.0 rewrites its metadata blocks *in place* at every checkpoint (256 KiB at
``12288 + id * 262144``; ``strace`` shows the ``pwrite64``). Those blocks also hold the
previous checkpoint's metadata, which the header on disk still names. A write cut short
leaves such a block with a checksum that matches neither version, and DuckDB then refuses
the whole file: every row of the slot, not just the checkpoint's, becomes unreadable
(seen once in CI, kept in ``docs/evidence/duckdb-checksum-2026-12-04.tgz``). SIGKILL does
cut large writes short on Linux (``generic_perform_write`` stops at a fatal signal between
pages), and a power cut can leave any mix of a block's pages on disk.

These tests build the file exactly as a cut-short checkpoint leaves it, from the bytes
before and after a real checkpoint: the headers as before (DuckDB writes them last, after
an fsync), every block the checkpoint changed either as before, as after, or torn at a
page boundary (after up to the cut, before beyond it), and the WAL as before.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable.errors import StorageCorruptError
from durable.objectproc.storage.duck import DuckStore
from durable.objectproc.storage.preimage import recover
from tests.budget import examples

HEADERS = 3 * 4096  # DuckDB's file header and its two database headers
BLOCK = 256 * 1024
PAGE = 4096


@dataclass(repr=False)
class Checkpointed:
    """A slot file's bytes just before and just after one checkpoint, and what it held."""
    directory: Path
    before: bytes
    after: bytes
    wal_before: bytes
    rows: dict[bytes, bytes]
    changed: list[int]  # blocks the checkpoint wrote (offsets past the headers)

    def __repr__(self) -> str:
        return f"Checkpointed({self.directory.name}, {len(self.changed)} blocks changed)"


def _batch(prefix: str, n: int, size: int, t: int = 1) -> dict[bytes, tuple[bytes, bytes, int]]:
    out = {}
    for i in range(n):
        obj = f"NS/{prefix}{i % 7}".encode()
        out[obj + f"/k{i}".encode()] = (obj, f"{prefix}{i}:".encode() * (size // 8 + 1), t)
    return out


def _checkpointed(directory: Path, workload: str) -> Checkpointed:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "slot-0.duckdb"
    store = DuckStore(path)
    first = {"small": _batch("a", 40, 16), "wide": _batch("a", 3000, 200),
             "churn": _batch("a", 2000, 64)}[workload]
    store.apply(first, set(), 1)
    store.checkpoint()
    second = {"small": _batch("b", 30, 16), "wide": _batch("b", 2500, 300),
              "churn": {**_batch("b", 500, 64),
                        **{pk: (obj, None, 2) for pk, (obj, _v, _t) in list(first.items())[:900]}}
              }[workload]
    store.apply(second, set(), 2)
    before, wal_before = path.read_bytes(), Path(f"{path}.wal").read_bytes()
    store.checkpoint()
    after = path.read_bytes()
    store.close()
    rows = {pk: v for pk, (_o, v, _t) in {**first, **second}.items() if v is not None}
    changed = [off for off in range(HEADERS, len(after), BLOCK)
               if before[off:off + BLOCK] != after[off:off + BLOCK]]
    assert changed, "the checkpoint wrote no block"
    return Checkpointed(directory, before, after, wal_before, rows, changed)


@pytest.fixture(scope="module", params=["small", "wide", "churn"])
def checkpointed(request, tmp_path_factory) -> Checkpointed:
    return _checkpointed(tmp_path_factory.mktemp(request.param), request.param)


def _torn(c: Checkpointed, cuts: dict[int, int | None]) -> bytearray:
    """The file as a checkpoint cut short leaves it: ``cuts[off]`` pages of the new block
    at ``off`` reached the file (None: all of it), the old bytes beyond."""
    out = bytearray(c.after)
    out[:HEADERS] = c.before[:HEADERS]
    for off in c.changed:
        cut = cuts.get(off)
        if cut is None or off >= len(c.before):
            continue
        new, old = c.after[off:off + BLOCK], c.before[off:off + BLOCK]
        out[off:off + BLOCK] = new[:cut * PAGE] + old[cut * PAGE:]
    return out


def _left(c: Checkpointed, data: bytes) -> Path:
    """A copy of the slot's directory with the main file as ``data`` and the WAL as before."""
    where = Path(tempfile.mkdtemp(dir=c.directory.parent))
    shutil.copytree(c.directory, where, dirs_exist_ok=True)
    (where / "slot-0.duckdb").write_bytes(data)
    (where / "slot-0.duckdb.wal").write_bytes(c.wal_before)
    return where


def _open_as_left(c: Checkpointed, data: bytes) -> DuckStore:
    return DuckStore(_left(c, data) / "slot-0.duckdb")


def _rows(store: DuckStore) -> dict[bytes, bytes]:
    out = {}
    for obj in store.object_keys():
        out.update({pk: v for pk, v in store.read_object(obj) if v is not None})
    return out


def test_a_metadata_block_torn_at_any_page_loses_nothing(checkpointed):
    """Each page boundary of the first in-place block (the CI failure's), the rest as before."""
    c = checkpointed
    first = c.changed[0]
    assert first < len(c.before), "the checkpoint wrote no block in place"
    for cut in (1, 2, 7, 31, 63):
        store = _open_as_left(c, _torn(c, {off: 0 for off in c.changed} | {first: cut}))
        try:
            assert store.applied_seq() == 2 and _rows(store) == c.rows, f"torn at page {cut}"
        finally:
            store.close()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_mix_of_old_new_and_torn_blocks_loses_nothing(checkpointed, data):
    """A power cut writes back the checkpoint's pages in any order: any block may be old,
    new, or torn; the headers are old (DuckDB fsyncs the blocks before writing them)."""
    c = checkpointed
    cuts = {off: data.draw(st.one_of(st.none(), st.integers(0, BLOCK // PAGE - 1)), label=str(off))
            for off in c.changed}
    store = _open_as_left(c, _torn(c, cuts))
    try:
        assert store.applied_seq() == 2 and _rows(store) == c.rows
    finally:
        store.close()


def test_a_finished_checkpoint_is_never_rolled_back(checkpointed):
    """Once the new header is written the pre-image no longer applies: damage found after
    that is reported as damage, not papered over with older bytes."""
    c = checkpointed
    data = bytearray(c.after)
    data[c.changed[0] + 100] ^= 0xFF  # a flipped byte in the block the new header names
    with pytest.raises(StorageCorruptError):
        _open_as_left(c, bytes(data)).close()


def test_a_flipped_byte_in_a_block_no_checkpoint_touched_stays_damage(tmp_path):
    """Only blocks a checkpoint rewrote in place are put back (a data block's flipped byte
    is real damage: the pre-image holds no copy of it)."""
    c = _checkpointed(tmp_path / "d", "wide")
    data = bytearray(_torn(c, {off: 0 for off in c.changed}))
    untouched = next(off for off in range(HEADERS, len(c.before), BLOCK) if off not in c.changed)
    data[untouched + 100] ^= 0xFF
    store = None
    with pytest.raises((StorageCorruptError, duckdb.Error)):
        store = _open_as_left(c, bytes(data))
        _rows(store)
    if store is not None:
        store.close()


def test_verify_names_the_cut_short_checkpoint_and_repair_puts_it_back(checkpointed):
    """Offline, with the daemon stopped: ``durable verify`` says what happened and changes
    nothing; ``durable repair`` puts the blocks back rather than salvaging rows."""
    from durable.supervisor.storage_tools import repair_slot, verify_slot
    c = checkpointed
    where = _left(c, bytes(_torn(c, {off: 0 for off in c.changed} | {c.changed[0]: 2})))
    (where / "slot-0.log").mkdir(exist_ok=True)
    torn = (where / "slot-0.duckdb").read_bytes()
    report = verify_slot(where, 0)
    assert not report.ok and "a checkpoint was cut short" in report.duckdb_error, report
    assert (where / "slot-0.duckdb").read_bytes() == torn  # verify changes nothing
    result = repair_slot(where, 0, identity=None)
    assert result["repaired"] and result["put_back"], result
    assert verify_slot(where, 0).ok
    store = DuckStore(where / "slot-0.duckdb")
    try:
        assert store.recovered is None and _rows(store) == c.rows
    finally:
        store.close()


def test_a_file_another_process_holds_is_left_alone(checkpointed):
    """A second opener (a second daemon, a repair while serving) runs into DuckDB's lock. It
    must not put anything back first: the holder may be mid-checkpoint, and old bytes under
    its new header would be the damage this guards against."""
    c = checkpointed
    where = _left(c, bytes(_torn(c, {off: 0 for off in c.changed} | {c.changed[0]: 2})))
    path = where / "slot-0.duckdb"
    found = path.read_bytes()
    holder = subprocess.Popen(  # takes the lock DuckDB takes (fcntl, whole file, exclusive)
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.Error, match="lock"):
            DuckStore(path).close()
        assert recover(path) is None  # (as `durable repair` calls it)
        assert path.read_bytes() == found, "a block was put back under another process's lock"
    finally:
        holder.kill()
        holder.wait()
    store = DuckStore(path)  # the holder gone, the next open puts it right
    try:
        assert store.recovered is not None and _rows(store) == c.rows
    finally:
        store.close()
