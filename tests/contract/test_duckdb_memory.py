"""DuckDB's memory limit against indexes that cannot be evicted (tests/integration/
test_duckdb_memory.py runs the same through a real daemon)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import duckdb
import pytest

from durable.errors import StorageFullError
from durable.objectproc.storage.duck import (
    NAME_PREFIX,
    DuckStore,
    art_entry_bytes,
    is_out_of_memory,
    parse_bytes,
)


def batch(first: int, n: int) -> tuple[dict, set, set]:
    """``n`` new named objects with one key each, as the applier hands them over."""
    rows, new, stats = {}, set(), set()
    for i in range(first, first + n):
        obj = f"NS/{hashlib.sha256(str(i).encode()).hexdigest()}".encode()
        rows[obj + b"/n"] = (obj, b"\x01", 1)
        rows[NAME_PREFIX + obj + b"/name"] = (NAME_PREFIX + obj, f'"o{i}"'.encode(), 1)
        new.update((obj, NAME_PREFIX + obj))
        stats.add(obj)
    return rows, new, stats


def fill(duck: DuckStore, objects: int, start: int = 0) -> int:
    """Apply ``objects`` new objects in batches of 500; returns the last batch's seq."""
    seq = 0
    for first in range(start, start + objects, 500):
        rows, new, stats = batch(first, 500)
        seq = (first + 500) * 2
        duck.apply(rows, set(), seq, new_objects=new, new_stats=stats)
    return seq


#: a slot at a ceiling of 16 MB that applies each record at once
AT_16MB = {"memory_limit": "16MB", "memory_ceiling": 16 * 10**6,
           "apply_min_records": 1, "apply_max_delay": 0.0}


def count(duck: DuckStore) -> int:
    """Rows stored: keys, and names (kept in ``objects``, not as rows of ``kv``)."""
    return duck._reader.execute("SELECT (SELECT count(*) FROM kv) + "
                                "(SELECT count(name) FROM objects)").fetchall()[0][0]


def test_sizes_parse_as_duckdb_reads_them():
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1GiB") == 2**30
    assert parse_bytes("1000B") == 1000
    with pytest.raises(ValueError, match="'lots'"):
        parse_bytes("lots")


def test_every_form_of_duckdbs_memory_error_is_known():
    """Each was seen failing a commit (the last one failed a slot in a CI-like run, before
    it was known: a commit out of memory must grow the limit, not fail the slot)."""
    for text in ("Out of Memory Error: failed to pin block of size 256.0 KiB (15.0 MiB/15.2 MiB used)",
                 "TransactionContext Error: Failed to commit: failed to pin block of size 256.0 "
                 "KiB (15.0 MiB/15.2 MiB used)",
                 "TransactionContext Error: Failed to commit: failed to allocate data of size "
                 "128.0 KiB (15.2 MiB/15.2 MiB used)",
                 "TransactionContext Error: Failed to commit: something new (19.9 GiB/20.0 GiB used)"):
        assert is_out_of_memory(duckdb.TransactionException(text)), text
    assert not is_out_of_memory(duckdb.TransactionException("Failed to commit: disk I/O error"))
    assert not is_out_of_memory(ValueError("(1.0 MiB/2.0 MiB used)"))


def test_an_index_entry_costs_by_its_key_length_as_measured():
    assert art_entry_bytes(8) == art_entry_bytes(16) == 48.5  # (the smallest entry)
    assert art_entry_bytes(64) == 121.9 and art_entry_bytes(200) == 357.8
    assert art_entry_bytes(82) == pytest.approx((121.9 + 194.0) / 2)
    assert art_entry_bytes(300) == pytest.approx(357.8 + 163.8)  # (on by the last slope)


def test_the_indexes_need_is_estimated_from_the_rows_even_after_a_checkpoint(tmp_path):
    """DuckDB's own figure drops to ~0 once a checkpoint writes the indexes out; the need
    (what a refusal of writes at the ceiling goes by) does not."""
    duck = DuckStore(tmp_path / "slot-0.duckdb", memory_limit="1GB")
    try:
        fill(duck, 20_000)
        loaded = duck.index_bytes()
        assert duck.index_need() >= loaded > 0
        duck.checkpoint()
        assert duck.index_bytes() < loaded / 4  # (DuckDB's figure, after the checkpoint)
        assert duck.index_need() >= loaded * 0.8, (duck.index_need(), loaded)
    finally:
        duck.close()


def test_indexes_past_the_limit_raise_it_and_every_batch_commits(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "durable.objectproc")
    duck = DuckStore(tmp_path / "slot-0.duckdb", memory_limit="16MB", memory_ceiling=1 << 30)
    try:
        seq = fill(duck, 40_000)  # ~26 MB of indexes
        assert count(duck) == 80_000 and duck.applied_seq() == seq
        assert duck.memory_limit >= 32 * 10**6
        setting = duck._reader.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        assert not setting.startswith("15.")  # DuckDB's own limit moved, not only ours
        assert "set duckdb_memory_mb = " in caplog.text
        duck.checkpoint()
    finally:
        duck.close()
    # Opened again on the configured limit: room is made before the indexes load.
    caplog.clear()
    duck = DuckStore(tmp_path / "slot-0.duckdb", memory_limit="16MB", memory_ceiling=1 << 30)
    try:
        assert duck.memory_limit >= 32 * 10**6 and "opening the file" in caplog.text
        fill(duck, 2_000, start=40_000)
        assert count(duck) == 84_000
    finally:
        duck.close()


def test_at_the_ceiling_a_batch_fails_whole_and_the_log_says_what_to_do(tmp_path, caplog):
    duck = DuckStore(tmp_path / "slot-0.duckdb", memory_limit="16MB", memory_ceiling=16 * 10**6)
    try:
        with pytest.raises(duckdb.Error) as e:
            fill(duck, 40_000)
        assert is_out_of_memory(e.value)
        assert "ceiling" in caplog.text and "more memory" in caplog.text
        # nothing half-written: whole batches only, and applied_seq is the last of them
        rows = count(duck)
        assert rows % 1000 == 0 and duck.applied_seq() == rows
    finally:
        duck.close()


def oid(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()  # (as long as a real id)


async def fill_slot(slot, start: int, limit: int) -> int:
    """New objects of one key each until the slot refuses writes (or ``limit`` of them);
    returns how many it took."""
    n = start
    while n < limit:
        try:
            for _ in range(1000):
                seq = slot.submit(f"NS/{oid(n)}".encode(), False, {"k": b"1"})
                n += 1
        except StorageFullError:
            return n
        await slot.wait_durable(seq)
        await asyncio.sleep(0.02)  # (the applier, and its check of memory)
    return n


async def test_at_the_ceiling_a_slot_refuses_writes_before_duckdb_fails(tmp_path, caplog):
    """Before, the indexes filled the ceiling, a commit failed for memory, DuckDB invalidated
    the file and the slot failed, and could not open again. Now writes are refused first
    (reads go on), also after a reopen, and accepted again with a higher ceiling."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    opts = {"memory_limit": "16MB", "memory_ceiling": 16 * 10**6,
            "apply_min_records": 500, "apply_max_delay": 0.01}
    slot = SlotStore(tmp_path, **opts)
    try:
        taken = await fill_slot(slot, 0, 80_000)
        assert taken < 80_000, "writes were never refused"
        assert slot.failed is None and slot.full is not None  # refused, not failed
        assert slot.statistics()["storage_full"] is True
        with pytest.raises(StorageFullError, match="memory_limit_mb"):
            await ObjectStorage(slot, "NS", "late").put("k", 1)
        assert await ObjectStorage(slot, "NS", oid(42)).get("k") == 1  # reads work
        await slot.wait_durable(slot.log.last_seq)
        with pytest.raises(StorageFullError):  # deletes too (they need memory as well)
            await ObjectStorage(slot, "NS", oid(41)).delete("k")
    finally:
        await slot.close()
    assert "writes refused" in caplog.text
    slot = SlotStore(tmp_path, **opts)  # opens: every acknowledged write is there
    try:
        assert await ObjectStorage(slot, "NS", oid(taken - 1)).get("k") == 1
        # and refuses writes again before DuckDB fails (at once, or once the indexes load:
        # right after an open DuckDB's figure is 0, and the estimate from the rows is rough)
        more = await fill_slot(slot, taken, taken + 40_000)
        assert more < taken + 40_000 and slot.failed is None and slot.full is not None
        await slot.wait_durable(slot.log.last_seq)
    finally:
        await slot.close()
    slot = SlotStore(tmp_path, **{**opts, "memory_ceiling": 64 * 10**6})
    try:
        assert slot.full is None
        s = ObjectStorage(slot, "NS", "late")
        await s.put("k", 1)
        assert await s.get("k") == 1
    finally:
        await slot.close()


async def test_a_failed_memory_check_never_fails_the_slot(tmp_path, monkeypatch, caplog):
    """The check's queries may fail too (at the ceiling, for memory): a figure is never a
    reason to fail the slot; out of memory even to count, writes are refused."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    slot = SlotStore(tmp_path, memory_limit="16MB", memory_ceiling=16 * 10**6)
    try:
        def broken() -> int:
            raise duckdb.IOException("IO Error: something else")
        monkeypatch.setattr(slot.duck, "index_need", broken)
        slot._check_memory_room()
        assert slot.full is None and "could not size" in caplog.text
        s = ObjectStorage(slot, "NS", "o")
        await s.put("k", 1)

        def no_memory() -> int:
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to pin block")
        monkeypatch.setattr(slot.duck, "index_need", no_memory)
        slot._check_memory_room()
        assert slot.full is not None and slot.failed is None
        assert await s.get("k") == 1
    finally:
        monkeypatch.undo()
        await slot.close()




async def takes_writes_with_more_memory(tmp_path, opts: dict) -> None:
    """The slot opened again with a ceiling of 64 MB: "a" and "b" read back, and writes go."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    slot = SlotStore(tmp_path, **{**opts, "memory_ceiling": 64 * 10**6})
    try:
        assert slot.full is None
        s = ObjectStorage(slot, "NS", "o")
        assert await s.get("a") == 1 and await s.get("b") == 2
        await s.put("c", 3)
    finally:
        await slot.close()


@pytest.mark.parametrize("fatal", [False, True], ids=["commit-failed", "file-invalidated"])
async def test_a_commit_out_of_memory_at_the_ceiling_refuses_writes_and_loses_nothing(
        tmp_path, monkeypatch, caplog, fatal):
    """The refusal's estimate can be short (right after an open it is rough): a commit may
    still run out of memory at the ceiling. Before, that failed the slot (a commit error) or
    reopened DuckDB and refused writes as if the disk were full. Now the slot refuses writes
    for memory, says so, keeps the failed batch (durable in the log) and applies it later."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    opts = AT_16MB
    slot = SlotStore(tmp_path, **opts)
    try:
        s = ObjectStorage(slot, "NS", "o")
        await s.put("a", 1)
        failed: list[int] = []
        real = DuckStore._apply
        error = duckdb.FatalException if fatal else duckdb.OutOfMemoryException

        def out_of_memory(self, *a, **kw):
            if not failed:
                failed.append(1)
                raise error("TransactionContext Error: Failed to commit: failed to allocate "
                            "data of size 128.0 KiB (15.2 MiB/15.2 MiB used)")
            return real(self, *a, **kw)
        monkeypatch.setattr(DuckStore, "_apply", out_of_memory)
        await s.put("b", 2)  # acknowledged: durable in the log, whatever DuckDB says
        seq = slot.log.last_seq
        for _ in range(200):
            if failed and slot.full is not None:
                break
            await asyncio.sleep(0.01)
        assert failed and slot.failed is None and slot.full is not None
        assert slot.statistics()["storage_full_why"] == "memory"
        with pytest.raises(StorageFullError, match="memory_limit_mb"):
            await ObjectStorage(slot, "NS", "p").put("k", 1)
        assert await s.get("b") == 2 and await s.get("a") == 1  # reads go on
        for _ in range(500):  # the batch is applied again (a second later)
            if slot.applied_seq >= seq:
                break
            await asyncio.sleep(0.01)
        assert slot.applied_seq >= seq and slot.failed is None
        assert slot.full is not None  # (until a restart with more memory)
    finally:
        monkeypatch.undo()
        await slot.close()
    assert "ran out of memory" in caplog.text and "memory_limit_mb" in caplog.text
    await takes_writes_with_more_memory(tmp_path, opts)


async def test_a_checkpoint_out_of_memory_below_the_ceiling_grows_the_limit_and_refuses_nothing(
        tmp_path, monkeypatch):
    """A checkpoint that runs out of memory below the ceiling raises the limit and fails
    fatally (DuckDB invalidates the file); the slot reopens with the higher limit and tries
    again. That is no reason to refuse writes: only at the ceiling are they refused."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    slot = SlotStore(tmp_path, memory_limit="16MB", memory_ceiling=64 * 10**6,
                     apply_min_records=1, apply_max_delay=0.0, checkpoint_interval=0.0)
    try:
        failed: list[int] = []
        real = DuckStore.checkpoint

        def out_of_memory(self):
            if not failed:
                failed.append(1)
                e = duckdb.FatalException("Out of Memory Error: failed to pin block of size "
                                          "256.0 KiB (15.0 MiB/15.2 MiB used)")
                self._raise_limit(e, "checkpointing")  # (as DuckStore.checkpoint does)
                raise e
            return real(self)
        monkeypatch.setattr(DuckStore, "checkpoint", out_of_memory)
        s = ObjectStorage(slot, "NS", "o")
        await s.put("a", 1)
        for _ in range(300):
            if failed and slot.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert failed and slot.checkpoints and slot.failed is None
        assert slot.full is None and slot.duck.memory_limit > 16 * 10**6
        await s.put("b", 2)  # writes were never refused
        assert await s.get("a") == 1 and await s.get("b") == 2
    finally:
        monkeypatch.undo()
        await slot.close()


def checkpoints_run_out_of_memory(monkeypatch, after: int = 0) -> list[int]:
    """Every checkpoint after the first ``after`` fails as DuckDB's did at its ceiling in CI;
    returns the tries that failed."""
    tried: list[int] = []
    real = DuckStore.checkpoint
    passed = [0]

    def out_of_memory(self):
        if passed[0] < after:
            passed[0] += 1
            return real(self)
        tried.append(1)
        e = duckdb.FatalException("FATAL Error: Failed to create checkpoint because of error: "
                                  "failed to allocate data of size 3.0 MiB (15.0 MiB/15.2 MiB used)")
        self._raise_limit(e, "checkpointing")  # (as DuckStore.checkpoint does: at the ceiling)
        raise e
    monkeypatch.setattr(DuckStore, "checkpoint", out_of_memory)
    return tried


async def test_a_checkpoint_at_open_out_of_memory_at_the_ceiling_opens_with_writes_refused(
        tmp_path, monkeypatch, caplog):
    """Found by CI (tests/integration/test_duckdb_memory.py, at its ceiling): a daemon killed
    at its memory ceiling left rows in DuckDB's WAL, and the next open's checkpoint ran out of
    memory at the same ceiling. The slot exited "its storage cannot be opened; restarting
    will not help" and served nothing. Now it opens on DuckDB's WAL, keeps its log (the
    checkpoint that would let it go never happened), serves reads and refuses writes for
    memory; a start with more memory checkpoints and takes writes again."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    opts = AT_16MB
    slot = SlotStore(tmp_path, **opts)
    try:
        s = ObjectStorage(slot, "NS", "o")
        await s.put("a", 1)
        await s.put("b", 2)
        await s.sync()
        for _ in range(300):
            if slot.applied_seq >= slot.log.last_seq:
                break
            await asyncio.sleep(0.01)
        assert slot.applied_seq == slot.log.last_seq
    finally:
        slot.abandon()  # (killed: the rows are in DuckDB's WAL and in the log)
    segments = sorted(p.name for p in (tmp_path / "slot-0.log").iterdir())
    tried = checkpoints_run_out_of_memory(monkeypatch)
    slot = SlotStore(tmp_path, **opts)
    try:
        assert tried and slot.failed is None
        assert slot.statistics()["storage_full_why"] == "memory"
        s = ObjectStorage(slot, "NS", "o")
        assert await s.get("a") == 1 and await s.get("b") == 2
        with pytest.raises(StorageFullError, match="memory_limit_mb"):
            await s.put("c", 3)
        await asyncio.sleep(0.3)
        assert len(tried) == 1  # (no checkpoint again: each would fail and reopen DuckDB)
    finally:
        await slot.close()
    assert "memory_limit_mb" in caplog.text
    assert set(segments) <= {p.name for p in (tmp_path / "slot-0.log").iterdir()}  # kept
    monkeypatch.undo()
    await takes_writes_with_more_memory(tmp_path, opts)
    assert not set(segments) & {p.name for p in (tmp_path / "slot-0.log").iterdir()}


async def test_a_log_kept_for_want_of_memory_loses_its_torn_tail_and_reads_cleanly(
        tmp_path, monkeypatch):
    """The kept log's last segment ends in a torn write; the log writes on in a new segment,
    and a torn end anywhere but in the last segment is damage: without cutting it off, the
    next open called the log damaged ("record 3 ... lost") and refused to serve."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    from tests.contract.test_engine import log_dir, rec, write_segment
    write_segment(log_dir(tmp_path), 1, [rec(1, "a"), rec(2, "b"), rec(3, "c")[:-3]])
    opts = {"memory_limit": "16MB", "memory_ceiling": 16 * 10**6}
    tried = checkpoints_run_out_of_memory(monkeypatch)
    slot = SlotStore(tmp_path, **opts)
    try:
        assert tried and slot.replayed == 2 and slot.torn is not None
        assert await ObjectStorage(slot, "NS", "o").list() == {"a": 1, "b": 1}
    finally:
        await slot.close()
    monkeypatch.undo()
    slot = SlotStore(tmp_path, **{**opts, "memory_ceiling": 64 * 10**6})
    try:
        assert slot.torn is None and slot.full is None
        s = ObjectStorage(slot, "NS", "o")
        assert await s.list() == {"a": 1, "b": 1}
        await s.put("d", 2)
        await s.sync()
        assert slot.durable_seq == 3
    finally:
        await slot.close()


class _Replicated:
    """A cluster slot's replicated log (objectproc/replication.py) as the slot uses it at
    open: records this host's files lack, handed over in order."""

    def __init__(self, records: list[tuple[int, bytes]]) -> None:
        self.records = records

    def catch_up(self, next_seq: int):  # noqa: ANN201
        return iter([r for r in self.records if r[0] >= next_seq])

    def append_group(self, group: list[bytes]) -> None:
        pass


@pytest.mark.parametrize("after", [0, 1], ids=["replay-failed-first", "catch-up-failed"])
async def test_a_catch_up_whose_checkpoint_runs_out_of_memory_at_the_ceiling_still_opens(
        tmp_path, monkeypatch, after):
    """Cluster mode: the records a host's files lacked, applied from the replicated log at
    open, are checkpointed before the slot serves. At the ceiling that checkpoint failed as
    the replay's did, and the slot exited "restarting will not help"; now the records stay in
    DuckDB's WAL (and the replicated log), reads are served and writes refused for memory."""
    from durable.objectproc.storage import ObjectStorage, SlotStore
    from durable.objectproc.storage.log import encode_writeset
    opts = {"memory_limit": "16MB", "memory_ceiling": 16 * 10**6}
    records = [(seq, encode_writeset(b"NS/o", False, {k: b"1"}))
               for seq, k in ((1, "a"), (2, "b"), (3, "c"))]
    tried = checkpoints_run_out_of_memory(monkeypatch, after)  # (1: the replay's passes)
    slot = SlotStore(tmp_path, replication=_Replicated(records), **opts)
    try:
        assert tried and slot.caught_up == 3 and slot.failed is None
        assert slot.statistics()["storage_full_why"] == "memory"
        s = ObjectStorage(slot, "NS", "o")
        assert await s.list() == {"a": 1, "b": 1, "c": 1}
        with pytest.raises(StorageFullError, match="memory_limit_mb"):
            await s.put("d", 2)
    finally:
        await slot.close()
    monkeypatch.undo()
    slot = SlotStore(tmp_path, replication=_Replicated(records),
                     **{**opts, "memory_ceiling": 64 * 10**6})
    try:
        assert slot.caught_up == 0 and slot.full is None  # (DuckDB kept what it caught up)
        assert await ObjectStorage(slot, "NS", "o").list() == {"a": 1, "b": 1, "c": 1}
    finally:
        await slot.close()


def test_a_table_of_objects_made_anew_at_the_ceiling_opens_without_its_checkpoint(
        tmp_path, monkeypatch):
    """An open that makes the table of objects anew (after `durable import` or a migration)
    checkpoints it. At the ceiling that checkpoint's failure stopped the open ("restarting
    will not help"); the table is committed by then, so the open is tried once more, and
    finds it made."""
    duck = DuckStore(tmp_path / "s.duckdb", memory_limit="16MB", memory_ceiling=16 * 10**6)
    fill(duck, 1000)
    duck.objects_stale()  # (as a bulk write leaves it)
    duck.close()
    tried = checkpoints_run_out_of_memory(monkeypatch)
    duck = DuckStore(tmp_path / "s.duckdb", memory_limit="16MB", memory_ceiling=16 * 10**6)
    try:
        assert tried == [1] and duck._objects_current()
        assert count(duck) == 2000
    finally:
        duck.close()
