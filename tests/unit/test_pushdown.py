"""Aggregates computed in each slot (durable.pushdown): which queries split, that nothing but
checked parts reaches a slot's DuckDB, and that split answers equal the general way's, over
two slots' DuckDB files with any overlay (no sockets, no daemon)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable import pushdown
from durable.objectproc.query import Overlay, objects_sql, snapshot_sql
from durable.objectproc.storage.duck import DuckStore
from durable.objectproc.storage.log import ALARM_KEEP, WriteSet
from durable.objectproc.storage.slot import fold
from durable.query import KV_SCHEMA, fold_partials, fold_sql, locked_engine, views
from tests.budget import examples

GROUPED = ("SELECT namespace, count(*) AS rows, count(DISTINCT object_id) AS objects, "
           "sum(CAST(value->>'$.score' AS BIGINT)) AS score FROM kv "
           "GROUP BY namespace ORDER BY namespace")

SPLITS = [
    "SELECT count(*) FROM kv",
    "SELECT count(*), max(updated_at) FROM kv",
    GROUPED,
    "SELECT namespace, min(key), max(key), count(value) FROM kv GROUP BY ALL ORDER BY 1",
    "SELECT namespace AS ns, sum(CASE WHEN json_type(value) = 'BIGINT' THEN 1 ELSE 0 END) AS n "
    "FROM kv k WHERE k.key LIKE 'k%' GROUP BY namespace ORDER BY ns DESC LIMIT 1",
    "SELECT count(DISTINCT object_id), sum(length(key)) FROM kv WHERE namespace = 'NS'",
    "SELECT max(json_extract_string(value, '$')), min(value::VARCHAR) FROM kv",
    "SELECT namespace, max(json_extract(value, '$[0]')) FROM kv WHERE value IS NOT NULL AND "
    "updated_at > TIMESTAMP '2000-01-01' GROUP BY namespace ORDER BY namespace",
]

GENERAL = [  # (these run the general way: not of the shape, or not provably exact split)
    "SELECT count(DISTINCT key) FROM kv",
    "SELECT key, count(*) FROM kv GROUP BY key",
    "SELECT object_id, count(*) FROM kv GROUP BY object_id",
    "SELECT avg(length(key)) FROM kv",
    "SELECT object_name, count(*) FROM kv GROUP BY 1",
    "SELECT count(*) FROM objects",
    "SELECT count(*) FROM kv, kv AS b",
    "SELECT count(*) FROM kv WHERE key IN (SELECT key FROM kv)",
    "WITH x AS (SELECT * FROM kv) SELECT count(*) FROM x",
    "SELECT count(*) FROM kv HAVING count(*) > 1",
    "SELECT DISTINCT namespace FROM kv",
    "SELECT namespace FROM kv GROUP BY namespace",
    "SELECT count(*) FILTER (WHERE key = 'a') FROM kv",
    "SELECT count(*) FROM kv LIMIT 1 OFFSET 1",
    "SELECT count(*) + 1 FROM kv",
    "SELECT sum(row_number() OVER ()) FROM kv",
    "SELECT count(*) FROM kv WHERE getenv('HOME') IS NOT NULL",
    "SELECT count(*) FROM kv WHERE length(read_text('/etc/hostname')) > 0",
    "SELECT max(content) FROM read_text('/etc/hostname')",
    "SELECT count(*) FROM kv WHERE current_setting('threads') > 0",
    "SELECT count(*) FROM kv WHERE key = $1",
    "SELECT count(*) FROM main.kv",
    "SELECT count(*) FROM kv ORDER BY count(*)",
    "not sql at all",
]


@pytest.mark.parametrize("sql", SPLITS)
def test_aggregates_of_the_shape_split(sql):
    split = pushdown.plan(sql)
    assert split is not None
    assert pushdown.SLOT_VIEW in split.slot_sql and " kv " not in split.slot_sql.replace(
        "AS kv", "")


@pytest.mark.parametrize("sql", GENERAL)
def test_everything_else_runs_the_general_way(sql):
    assert pushdown.plan(sql) is None


def test_the_slot_runs_only_names_it_was_allowed():
    """The slot's SQL is DuckDB's printing of a checked tree: its function names are the
    query's allowed ones plus the partials' own."""
    split = pushdown.plan(GROUPED)
    tree = pushdown.syntax_tree(split.slot_sql)
    seen: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class") == "FUNCTION":
                seen.add(node["function_name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert seen == {"count_star", "count", "sum", "->>"}
    # a distinct count grouped by namespace counts stored keys; JSON functions read the text
    assert "count(DISTINCT durable_obj)" in split.slot_sql
    assert "durable_text ->> '$.score'" in split.slot_sql


# -- split answers equal the general way's -------------------------------------------------

IDS = ["a", "b", "c", "d"]
KEYS = ["k", "k/2", "", "é", "score"]
VALUES = [b"1", b'"x"', b'["l",1]', b"null", b'{"score":7}', b'{"score":-2,"t":[1]}', b"2.5"]


def _slot_of(oid: str) -> int:  # (the broker places by id alone: one id, one slot)
    return IDS.index(oid) % 2


writesets = st.builds(
    lambda ns, oid, clear, entries, t: WriteSet(f"{ns}/{oid}".encode(), clear, entries,
                                                ALARM_KEEP, t),
    st.sampled_from(["NS", "OTHER"]), st.sampled_from(IDS), st.booleans(),
    st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from(VALUES)),
                    max_size=3),
    st.sampled_from([1_700_000_000_000, 1_700_000_500_000, None]))

_STORES: list[DuckStore] = []
_FOLDING: dict[str, tuple[str, list[str]] | None] = {}  # (fold_sql depends on the query only)


def _stores() -> list[DuckStore]:
    if not _STORES:
        shm = Path("/dev/shm")
        d = Path(tempfile.mkdtemp(prefix="durable-pushdown-", dir=shm if shm.is_dir() else None))
        atexit.register(shutil.rmtree, d, True)
        _STORES.extend(DuckStore(d / f"s{i}.duckdb") for i in range(2))
    for store in _STORES:
        store._writer.execute("DELETE FROM kv; DELETE FROM alarms; DELETE FROM objects")
    return _STORES


def _apply(store: DuckStore, records: list[WriteSet]) -> None:
    rows: dict = {}
    clears: set = set()
    alarms: dict = {}
    fold(records, rows, clears, alarms)
    store.apply(rows, clears, len(records), alarms, purge_over=20_000)


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(writesets, max_size=30), st.data())
def test_split_answers_equal_the_general_way(records, data):
    """Two slots, each DuckDB plus an overlay of later records: queries of SPLITS (up to
    three an example) give the same columns and rows split as from the rows shipped whole."""
    stores = _stores()
    cut = data.draw(st.integers(0, len(records)))
    per_slot = [[(n, r) for n, r in enumerate(records)
                 if _slot_of(r.obj.decode().split("/")[1]) == i] for i in range(2)]
    curs, overlays = [], []
    for store, recs in zip(stores, per_slot, strict=True):
        _apply(store, [r for n, r in recs if n < cut])
        cur = store._con.cursor()
        ov = Overlay.of([r for n, r in recs if n >= cut])
        ov.register(cur)
        curs.append(cur)
        overlays.append(ov)
    try:
        shipped = []
        for cur, ov in zip(curs, overlays, strict=True):
            sql, params = snapshot_sql("data", ov, None)
            shipped.append(cur.sql(sql, params=params).to_arrow_table().cast(KV_SCHEMA))
        rows = pa.concat_tables(shipped)
        deadline = time.monotonic() + 60
        general = locked_engine(memory_limit="256MB", threads=1)
        views(general, rows, None, names=False)  # (as run_over lays them)
        for query in data.draw(st.lists(st.sampled_from(SPLITS), min_size=1, max_size=3,
                                        unique=True)):  # (every query: ~1.5 s an example)
            cur_ = general.execute(query)
            want = ([d[0] for d in cur_.description], cur_.fetchall())
            split = pushdown.plan(query)
            partials = []
            for cur, ov in zip(curs, overlays, strict=True):
                sql, params = snapshot_sql("agg", ov, None, split)
                partials.extend(cur.sql(sql, params=params).to_arrow_table().to_batches())
            if query not in _FOLDING:
                _FOLDING[query] = fold_sql(query, split, memory_limit="256MB")
            assert _FOLDING[query] is not None, query
            got = fold_partials(split, _FOLDING[query], partials, deadline=deadline,
                                memory_limit="256MB")
            assert got == want, query
        general.close()
        # the export's count of objects holding a key, per slot, adds up to the rows' own
        counted = 0
        for cur, ov in zip(curs, overlays, strict=True):
            sql, params = objects_sql(ov, None)
            counted += cur.execute(sql, params).fetchone()[0]
        assert counted == len({b"/".join(pk.split(b"/")[:2])
                               for pk in rows.column("pk").to_pylist()})
    finally:
        for cur in curs:
            cur.close()


def test_a_slot_aggregates_only_what_it_planned():
    ov = Overlay.of([])
    with pytest.raises(ValueError, match="a query that a slot aggregates"):
        snapshot_sql("agg", ov, None, pushdown.plan("SELECT key, count(*) FROM kv GROUP BY key"))
    with pytest.raises(ValueError, match="a query that a slot aggregates"):
        snapshot_sql("agg", ov, None, None)
