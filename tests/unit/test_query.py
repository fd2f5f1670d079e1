"""The query feature's pure parts: what a query may do, the snapshot's overlay against a
model of storage, one slot's object listing, and the views (no sockets, no daemon)."""

from __future__ import annotations

import atexit
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable import QueryError, codec
from durable.objectproc.query import Overlay, list_objects, snapshot_sql
from durable.objectproc.storage.duck import DuckStore
from durable.objectproc.storage.log import ALARM_DELETE, ALARM_KEEP, WriteSet
from durable.objectproc.storage.slot import fold
from durable.query import ALARMS_SCHEMA, KV_SCHEMA, check_query, locked_engine, views
from tests.budget import examples

# -- what a query may do ------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "DESCRIBE kv", "SHOW TABLES",
    "SUMMARIZE kv", "FROM kv", "VALUES (1)", "select * from objects; ", "(SELECT 1) UNION (SELECT 2)"])
def test_read_only_statements_pass(sql):
    check_query(sql)


@pytest.mark.parametrize("sql, says", [
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
    ("ATTACH '/tmp/x.db'", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("CREATE TABLE x (a INT)", "CREATE"),
    ("INSERT INTO kv VALUES (1)", "INSERT"),
    ("DELETE FROM kv", "DELETE"),
    ("SET threads = 8", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("SELECT 1; DROP TABLE kv", "2 statements"),
    ("", "empty"),
    ("SELEC 1", "does not parse"),
])
def test_everything_else_is_refused_by_name(sql, says):
    with pytest.raises(QueryError, match=says):
        check_query(sql)


def test_views_needed_are_found_from_the_query():
    assert check_query("SELECT count(*) FROM kv") == {"kv"}
    assert check_query("SELECT * FROM alarms") == {"alarms", "names"}
    assert check_query("SELECT * FROM objects") == {"kv", "alarms"}
    assert check_query("SELECT 1") == set()
    assert check_query("WITH x AS (SELECT * FROM KV) SELECT * FROM x") == {"kv"}


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv_auto('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')", "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "COPY (SELECT 1) TO '/tmp/durable-should-not-exist.csv'", "ATTACH '/tmp/durable-x.db' AS x",
    "INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
    "SET lock_configuration = false"])
def test_the_engine_itself_reaches_no_file_and_changes_no_setting(sql, tmp_path):
    con = locked_engine(memory_limit="256MB", threads=1)
    with pytest.raises(duckdb.Error):
        con.execute(sql).fetchall()


# -- the snapshot: DuckDB's rows with the overlay laid over them, against a model --------

OBJS = [b"NS/a", b"NS/b", b"NS/c", b"OTHER/a", b"_durable_name_NS/a"]
KEYS = ["k", "k/2", "", "é"]
writesets = st.builds(
    lambda obj, clear, entries, alarm: WriteSet(obj, clear, entries, alarm, 1_700_000_000_000),
    st.sampled_from(OBJS), st.booleans(),
    st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from(
        [b"1", b'"x"', b'["l",1]', b"null"])), max_size=3),
    st.sampled_from([ALARM_KEEP, ALARM_KEEP, ALARM_DELETE, 5_000, 9_000]))


_SHARED: list[DuckStore] = []


def _reused(records: list[WriteSet]) -> DuckStore:
    """One DuckDB file for every example, emptied each time (opening a new file per example
    cost ~40 ms, most of these tests' time); in /dev/shm where there is one."""
    if not _SHARED:
        shm = Path("/dev/shm")
        d = Path(tempfile.mkdtemp(prefix="durable-query-", dir=shm if shm.is_dir() else None))
        atexit.register(shutil.rmtree, d, True)
        _SHARED.append(DuckStore(d / "s.duckdb"))
    store = _SHARED[0]
    store._writer.execute("DELETE FROM kv; DELETE FROM alarms; DELETE FROM objects")
    return _apply(store, records)


def _apply(store: DuckStore, records: list[WriteSet], purge_over: int = 20_000) -> DuckStore:
    rows: dict = {}
    clears: set = set()
    alarms: dict = {}
    fold(records, rows, clears, alarms)
    store.apply(rows, clears, len(records), alarms, purge_over=purge_over)
    return store


def model(records: list[WriteSet]) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
    kv: dict[bytes, bytes] = {}
    alarms: dict[bytes, int] = {}
    for ws in records:
        if ws.clear:
            for pk in [pk for pk in kv if pk.startswith(ws.obj + b"/")]:
                del kv[pk]
        for key, value in ws.entries.items():
            pk = ws.obj + b"/" + key.encode()
            if value is None:
                kv.pop(pk, None)
            else:
                kv[pk] = value
        if ws.alarm == ALARM_DELETE:
            alarms.pop(ws.obj, None)
        elif ws.alarm != ALARM_KEEP:
            alarms[ws.obj] = ws.alarm
    return kv, alarms


def applied_store(path, records: list[WriteSet]) -> DuckStore:
    return _apply(DuckStore(path), records)


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(writesets, max_size=25), st.data())
def test_snapshot_is_duckdb_plus_overlay_replayed(records, data):
    """DuckDB holds records 1..A, the overlay A0+1..D with A0 <= A (records applied while the
    snapshot was captured are folded again): the stream is the state after record D."""
    d = len(records)
    a = data.draw(st.integers(0, d))
    a0 = data.draw(st.integers(0, a))
    store = _reused(records[:a])
    cur = store._con.cursor()
    try:
        ov = Overlay.of(records[a0:d])
        ov.register(cur)
        sql, params = snapshot_sql("kv", ov, None)
        got = {bytes(pk): bytes(v) for pk, v, _t in cur.execute(sql, params).fetchall()}
        sql, params = snapshot_sql("alarms", ov, None)
        got_alarms = {bytes(o): due for o, due in cur.execute(sql, params).fetchall()}
        want, want_alarms = model(records[:d])
        assert got == want
        assert got_alarms == want_alarms
        sql, params = snapshot_sql("kv", ov, "NS")  # a namespace's rows, and its names
        assert {bytes(r[0]) for r in cur.execute(sql, params).fetchall()} == {
            pk for pk in want if pk.startswith((b"NS/", b"_durable_name_NS/"))}
        sql, params = snapshot_sql("data", ov, None)  # every row but the names
        assert {bytes(r[0]): bytes(r[1]) for r in cur.execute(sql, params).fetchall()} == {
            pk: v for pk, v in want.items() if not pk.startswith(b"_durable_name_")}
        sql, params = snapshot_sql("data", ov, "NS")
        assert {bytes(r[0]) for r in cur.execute(sql, params).fetchall()} == {
            pk for pk in want if pk.startswith(b"NS/")}
    finally:
        cur.close()


# -- one slot's page of objects ------------------------------------------------------------

def _name(ns: str, oid: str, name: str, t: int = 1) -> WriteSet:
    return WriteSet(f"_durable_name_{ns}/{oid}".encode(), False, {"name": codec.encode(name)},
                    ALARM_KEEP, t)


def test_list_objects_counts_keys_bytes_names_alarms_and_skips_deleted(tmp_path):
    recs = [WriteSet(b"NS/o1", False, {"a": b"1", "bb": b'"xy"'}, ALARM_KEEP, 10),
            WriteSet(b"NS/o2", False, {"a": b"1"}, ALARM_KEEP, 20),
            WriteSet(b"NS/o3", False, {}, 7_000, 30),  # an alarm only
            WriteSet(b"NS/o4", False, {"a": b"1"}, ALARM_KEEP, 40),
            WriteSet(b"NS/o4", True, {}, ALARM_KEEP, 41),  # deleted: not listed
            WriteSet(b"NS0/x", False, {"a": b"1"}, ALARM_KEEP, 50),  # another namespace
            _name("NS", "o1", "first"), _name("NS", "o4", "gone")]
    store = applied_store(tmp_path / "s.duckdb", recs[:3])
    try:
        cur = store._con.cursor()
        page = list_objects(cur, Overlay.of(recs[3:]), "NS", start_after=None, limit=10,
                            prefix=None)
        assert page == [["o1", "first", 2, 1 + 1 + 2 + 4, 10, None],
                        ["o2", None, 1, 2, 20, None],
                        ["o3", None, 0, 0, None, 7_000]]
        assert [r[0] for r in list_objects(cur, Overlay.of(recs[3:]), "NS", start_after="o1",
                                           limit=1, prefix=None)] == ["o2"]
        assert [r[0] for r in list_objects(cur, Overlay.of(recs[3:]), "NS", start_after=None,
                                           limit=10, prefix="fi")] == ["o1"]
        assert list_objects(cur, Overlay.of(recs[3:]), "NS", start_after=None, limit=10,
                            prefix="gone") == []  # named, but deleted
    finally:
        store.close()


@settings(max_examples=examples(25), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 4)), max_size=60),
       st.integers(1, 7))
def test_pages_of_any_size_list_every_object_once_in_id_order(writes, page):
    """Objects with many keys and few, whole pages and cut ones: paging gives each once."""
    recs = [WriteSet(f"NS/o{n:02d}".encode(), False, {f"k{k}": b"1"}, ALARM_KEEP, 1)
            for n, k in writes]
    store = _reused(recs)
    cur = store._con.cursor()
    try:
        seen, after = [], None
        while True:
            rows = list_objects(cur, Overlay.of([]), "NS", start_after=after, limit=page,
                                prefix=None)
            seen += rows
            if len(rows) < page:
                break
            after = rows[-1][0]
        want = sorted({f"o{n:02d}" for n, _ in writes})
        assert [r[0] for r in seen] == want
        keys = {f"o{n:02d}": set() for n, _ in writes}
        for n, k in writes:
            keys[f"o{n:02d}"].add(k)
        assert {r[0]: r[2] for r in seen} == {o: len(ks) for o, ks in keys.items()}
    finally:
        cur.close()


def test_pages_through_ids_alike_in_their_first_bytes():
    """The listing's order key holds an id's first 7 bytes: ids alike in those still come
    once each, in order, whatever the page size and wherever a page ends."""
    ids = sorted([f"abcdefg{n:02d}" for n in range(12)] + ["abcdef", "abcdeg0", "b", "a"])
    store = _reused([WriteSet(f"NS/{i}".encode(), False, {"k": b"1"}, ALARM_KEEP, 1)
                     for i in ids])
    cur = store._con.cursor()
    try:
        for page in (1, 2, 3, 5, 16):
            seen, after = [], None
            while True:
                rows = list_objects(cur, Overlay.of([]), "NS", start_after=after, limit=page,
                                    prefix=None)
                seen += [r[0] for r in rows]
                if len(rows) < page:
                    break
                after = rows[-1][0]
            assert seen == ids, page
    finally:
        cur.close()


def test_objects_table_is_rebuilt_after_writes_that_did_not_keep_it(tmp_path):
    """A version without the table (rows and applied_seq moved, objects not), and a slot
    migration (rows moved between files): the next open counts the rows again."""
    path = tmp_path / "slot-0.duckdb"
    store = applied_store(path, [WriteSet(b"NS/a", False, {"k": b"1"}, ALARM_KEEP, 5)])
    store._writer.execute("INSERT INTO kv VALUES ('NS/b/k', 'NS/b', '22', 6); "
                          "UPDATE meta SET v = v + 1 WHERE k = 'applied_seq'")
    store.close()
    store = DuckStore(path)
    assert [r[0] for r in _objects_rows(store)] == [b"NS/a", b"NS/b"]
    other = DuckStore(tmp_path / "slot-1.duckdb")
    other.close()
    store.move_objects(tmp_path / "slot-1.duckdb", [b"NS/b"], batch=10)
    store.close()
    store, other = DuckStore(path), DuckStore(tmp_path / "slot-1.duckdb")
    try:
        assert [r[:5] for r in _objects_rows(store)] == [(b"NS/a", "NS", 0x61 << 48, 1, 2)]
        assert [r[0] for r in _objects_rows(other)] == [b"NS/b"]
    finally:
        store.close()
        other.close()


def _objects_rows(store: DuckStore) -> list[tuple]:
    return store._reader.execute("SELECT * FROM objects ORDER BY obj").fetchall()


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.one_of(writesets, writesets, st.builds(
           lambda obj, name: WriteSet(b"_durable_name_" + obj, False, {"name": codec.encode(name)},
                                      ALARM_KEEP, 0),
           st.sampled_from(OBJS), st.sampled_from(["n1", "n2é"]))), max_size=25),
       st.lists(st.integers(0, 25), max_size=3), st.integers(0, 25), st.booleans())
def test_objects_table_matches_the_rows_after_any_batches_and_lists_with_any_overlay(
        records, cuts, applied, purge):
    """The applier keeps ``objects`` as a rebuild from the rows would make it, batch after
    batch; a listing from it, with any overlay of records not applied yet, matches a model."""
    records = [WriteSet(r.obj, r.clear, r.entries, r.alarm, 1000 + i)  # (times go forward)
               for i, r in enumerate(records)]
    applied = min(applied, len(records))
    points = sorted({min(c, applied) for c in cuts} | {applied})
    store = _reused([])
    prev = 0
    for p in points:
        _apply(store, records[prev:p], purge_over=0 if purge else 20_000)  # (tombstones purged)
        prev = p
        kept = _objects_rows(store)
        store.rebuild_objects()
        if purge:  # (a purged delete's write time is kept; a rebuild cannot find it)
            assert [r[:5] + r[6:] for r in kept] == [r[:5] + r[6:] for r in _objects_rows(store)]
        else:
            assert kept == _objects_rows(store)
    kv, alarms = model(records)
    last: dict[bytes, int | None] = {}  # the last write of a key (a delete too) since a clear
    for r in records:
        if r.clear:
            last[r.obj] = None
        if r.entries:
            last[r.obj] = r.time
    want = []
    for oid in ("a", "b", "c"):
        obj = f"NS/{oid}".encode()
        live = {pk: v for pk, v in kv.items() if pk.startswith(obj + b"/")}
        if live or obj in alarms:
            name = kv.get(b"_durable_name_" + obj + b"/name")
            want.append([oid, None if name is None else codec.decode(name), len(live),
                         sum(len(pk) - len(obj) - 1 + len(v) for pk, v in live.items()),
                         last.get(obj), alarms.get(obj)])
    cur = store._con.cursor()
    try:
        got = list_objects(cur, Overlay.of(records[points[0]:]), "NS", start_after=None,
                           limit=10, prefix=None)
    finally:
        cur.close()
    if purge:
        got, want = [r[:4] + r[5:] for r in got], [r[:4] + r[5:] for r in want]
    assert got == want


# -- the views ---------------------------------------------------------------------------

def test_views_split_ids_keep_slashes_in_keys_and_join_names():
    kv = pa.table({"pk": [b"NS/o1/a/b", b"NS/o1/", b"NS/o2/x", b"_durable_name_NS/o1/name"],
                   "v": [b"1", b'{"count": 3}', b'"s"', b'"Alice"'],
                   "t": pa.array([1_700_000_000_000, None, 5, 1], pa.int64())}, schema=KV_SCHEMA)
    alarms = pa.table({"obj": [b"NS/o3"], "due": pa.array([1_800_000_000_000], pa.int64())},
                      schema=ALARMS_SCHEMA)
    con = locked_engine(memory_limit="256MB", threads=1)
    views(con, kv, alarms)
    rows = con.execute("SELECT namespace, object_id, object_name, key, value->>'$.count', "
                       "CAST(value AS VARCHAR), updated_at FROM kv ORDER BY object_id, key").fetchall()
    assert rows == [("NS", "o1", "Alice", "", "3", '{"count": 3}', None),
                    ("NS", "o1", "Alice", "a/b", None, "1",
                     dt.datetime(2023, 11, 14, 22, 13, 20)),
                    ("NS", "o2", None, "x", None, '"s"', dt.datetime(1970, 1, 1, 0, 0, 0, 5000))]
    assert con.execute("SELECT CAST(value AS INTEGER) FROM kv WHERE key = 'a/b'").fetchall() == [(1,)]
    objects = con.execute("SELECT object_id, object_name, keys, bytes, alarm IS NOT NULL "
                          "FROM objects ORDER BY object_id").fetchall()
    assert objects == [("o1", "Alice", 2, len("a/b1") + len('{"count": 3}'), False),
                       ("o2", None, 1, 4, False), ("o3", None, 0, 0, True)]
    assert con.execute("SELECT object_id, scheduled_at FROM alarms").fetchall() == [
        ("o3", dt.datetime(2027, 1, 15, 8, 0))]


@pytest.mark.parametrize("pks, objects", [
    ([f"NS/{'a' * 64}/k", f"NS/{'a' * 64}/j", f"NS/{'b' * 64}/k", f"OT/{'a' * 64}/k",
      f"_durable_name_NS/{'a' * 64}/name"], 3),
    (["NS/a/k", "NS/a/j", "NS/b/k", "OT/a/k"], 3),  # ids of another length: the long way
    ([f"NS/{'a' * 64}/k", "NS/short/k"], 2),
    ([], 0)])
def test_export_counts_objects_by_namespace_and_id(pks, objects):
    from durable.query import _manifest_objects
    con = duckdb.connect()
    n = len(pks)
    views(con, pa.table({"pk": pa.array([p.encode() for p in pks], pa.binary()),
                         "v": pa.array([b"1"] * n, pa.binary()),
                         "t": pa.array([1] * n, pa.int64())}), None)
    assert _manifest_objects(con) == objects


# -- views without names: for queries that cannot read object_name ---------------------------

@pytest.mark.parametrize("sql", [
    "SELECT namespace, count(*) AS rows, count(DISTINCT object_id) FROM kv GROUP BY namespace",
    "SELECT count(*) AS n FROM kv ORDER BY n",
    "SELECT k.key, k.value FROM kv k WHERE k.namespace = 'NS'",
    "WITH x AS (SELECT namespace ns FROM kv) SELECT ns FROM x",
    "SELECT namespace, sum(keys) FROM objects GROUP BY ALL",
    "SELECT count(*) FILTER (WHERE key = 'a') FROM kv",
])
def test_needs_names_false_only_when_no_column_can_be_object_name(sql):
    from durable.query import needs_names
    assert needs_names(sql) is False


@pytest.mark.parametrize("sql", [
    "SELECT object_name FROM kv", "SELECT \"Object_Name\" FROM kv", "SELECT kv.object_name FROM kv",
    "SELECT * FROM kv", "FROM kv", "SELECT kv.* FROM kv", "SELECT * EXCLUDE (value) FROM kv",
    "SELECT COLUMNS('name') FROM kv", "DESCRIBE kv", "SUMMARIZE kv", "SHOW kv",
    "SELECT k FROM kv k", "SELECT to_json(kv) FROM kv", "SELECT x FROM (SELECT k AS x FROM kv k)",
    "SELECT namespace AS k FROM kv k ORDER BY k",  # an alias that is also a row
    "SELECT a.key FROM kv a NATURAL JOIN objects b",
    "SELECT a.key FROM kv a JOIN alarms b USING (object_id)",
    "SELECT (SELECT object_name FROM alarms LIMIT 1)",
    "SELECT list_transform([1], x -> x + 1)",  # a name it does not know: assume the worst
    "this does not parse",
])
def test_needs_names_true_whenever_object_name_may_be_read(sql):
    from durable.query import needs_names
    assert needs_names(sql) is True


def _names_fixture() -> tuple[pa.Table, pa.Table]:
    kv = pa.table({"pk": [b"NS/o1/a", b"NS/o1/b", b"NS/o2/a", b"_durable_name_NS/o1/name",
                          b"_durable_name_NS/o3/name"],
                   "v": [b"1", b"2", b"3", b'"Alice"', b'"Carol"'],
                   "t": pa.array([1, 2, 3, 1, 1], pa.int64())}, schema=KV_SCHEMA)
    alarms = pa.table({"obj": [b"NS/o3"], "due": pa.array([5], pa.int64())}, schema=ALARMS_SCHEMA)
    return kv, alarms


@pytest.mark.parametrize("sql", [
    "SELECT namespace, count(*), count(DISTINCT object_id), sum(CAST(value AS INTEGER)) "
    "FROM kv GROUP BY ALL",
    "SELECT object_id, keys, bytes, alarm FROM objects ORDER BY object_id",
    "SELECT namespace, object_id, scheduled_at FROM alarms",
])
def test_views_without_names_answer_as_the_views_with_them(sql):
    from durable.query import run_over
    kv, alarms = _names_fixture()
    answers = [run_over(kv, alarms, sql, deadline=time.monotonic() + 30, memory_limit="256MB",
                        threads=1, names=names) for names in (True, False)]
    assert answers[0] == answers[1] and answers[0][1]


def test_a_name_reference_missed_is_mended_not_answered_wrong():
    """Were needs_names ever wrong about a reference, the views without the column fail to
    bind and the query runs again with names: the answer is the same."""
    from durable.query import run_over
    kv, alarms = _names_fixture()
    sql = "SELECT object_id, object_name FROM objects ORDER BY object_id"
    got = run_over(kv, alarms, sql, deadline=time.monotonic() + 30, memory_limit="256MB",
                   threads=1, names=False)
    assert got == (["object_id", "object_name"], [("o1", "Alice"), ("o2", None), ("o3", "Carol")])
