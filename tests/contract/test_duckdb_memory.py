"""DuckDB's memory limit against indexes that cannot be evicted (tests/integration/
test_duckdb_memory.py runs the same through a real daemon)."""

from __future__ import annotations

import hashlib
import logging

import duckdb
import pytest

from durable.objectproc.storage.duck import NAME_PREFIX, DuckStore, is_out_of_memory, parse_bytes


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


def count(duck: DuckStore) -> int:
    return duck._reader.execute("SELECT count(*) FROM kv").fetchall()[0][0]


def test_sizes_parse_as_duckdb_reads_them():
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1GiB") == 2**30
    assert parse_bytes("1000B") == 1000
    with pytest.raises(ValueError, match="'lots'"):
        parse_bytes("lots")


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
