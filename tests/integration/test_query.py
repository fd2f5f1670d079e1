"""`durable sql`, `objects`, `export` and `import` against a real daemon: every codec type,
names, deleted objects, consistency under a write burst, refusals, timeouts, round trips."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import math
import shutil
import time
import uuid
import zoneinfo
from pathlib import Path

import duckdb
import orjson
import pytest

import durable
from durable.broker.ring import Ring
from durable.errors import CallTimeoutError, QueryError
from durable.ids import IdFactory, namespace_key
from durable.objectproc.storage.duck import KV_ROWS
from tests.integration.daemon import serving
from tests.integration.test_storage_faults import cli

pytestmark = pytest.mark.slow  # real processes: the full suite runs them

CONFIG = """
slots = 2
[broker]
heartbeat = 0.5
[namespaces.Store]
class = "tests.integration.objects:Store"
[namespaces.Other]
class = "tests.integration.objects:Store"
"""

EVERY_TYPE = {
    "none": None, "true": True, "int": -(2**63), "big": 2**80, "float": 1.0, "nan": math.nan,
    "inf": -math.inf, "str": "héllo \u2028 😀", "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
    "list": [1, [2, "x"]], "tuple": (1, "a"), "dict": {"count": 3, "nested": {"a": [1]}},
    "intdict": {1: "one", (2, 3): "pair"}, "set": {1, 2}, "frozenset": frozenset({"a"}),
    "datetime": dt.datetime(2024, 2, 29, 12, 0, 1, 5, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    "naive": dt.datetime(2020, 1, 1, 0, 0), "date": dt.date(1999, 12, 31),
    "time": dt.time(23, 59, 59, 999999), "delta": dt.timedelta(days=-1, microseconds=3),
    "decimal": decimal.Decimal("1.50"), "uuid": uuid.UUID(int=12345),
}


def same(a, b) -> bool:
    """Equal, with the exact type, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def admin(d) -> str:
    return f"ipc://{d.root / 'durable-data' / 'run' / 'admin.sock'}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the module: objects of every value type, named and not, one deleted."""
    root = tmp_path_factory.mktemp("query")
    with serving(root, CONFIG) as d:
        d.wait_ready()

        async def fill() -> dict[str, str]:
            async with durable.connect(d.frontend) as c:
                ns = c.namespace("Store")
                for i in range(30):
                    await ns.get_by_name(f"obj-{i:02d}").put({"n": i, "every": EVERY_TYPE} if i == 0
                                                             else {"n": i, "half": i % 2 == 0})
                await ns.get_by_name("obj-00").put(dict(EVERY_TYPE))
                await ns.get_by_name("gone").put({"n": -1})
                await ns.get_by_name("gone").delete_all()
                unnamed = ns.new_unique_id()
                await ns.get(unnamed).put({"anon": True})
                await ns.get_by_name("obj-05").arm(time.time() * 1000 + 3_600_000)
                await c.namespace("Other").get_by_name("elsewhere").put({"n": 1000})
                return {"unnamed": str(unnamed)}

        info = asyncio.run(fill())
        yield d, info


async def _sql(d, query: str, **kw):
    async with durable.connect(admin(d)) as c:
        return await c.sql(query, **kw)


def test_sql_sees_every_value_type_names_and_no_deleted_object(shared):
    d, info = shared
    r = asyncio.run(_sql(d, "SELECT key, value, object_name FROM kv WHERE object_name = 'obj-00' "
                             "ORDER BY key"))
    assert r.columns == ["key", "value", "object_name"]
    stored = {k: codec_value(v) for k, v, _ in r.rows}
    for key, value in EVERY_TYPE.items():
        assert same(stored[key], value), key
    r = asyncio.run(_sql(d, "SELECT count(*), sum(CAST(value AS INTEGER)) FROM kv "
                             "WHERE namespace = 'Store' AND key = 'n'"))
    assert r.rows == [(30, sum(range(30)))]  # "gone" (-1) was deleted
    r = asyncio.run(_sql(d, "SELECT count(*) FROM kv WHERE value->>'$.count' = '3'"))
    assert r.rows == [(1,)]  # the dict {"count": 3} of obj-00, by JSON path
    unnamed = info["unnamed"]
    r = asyncio.run(_sql(d, f"SELECT object_id, object_name, keys FROM objects "
                            f"WHERE object_id = '{unnamed}'"))
    assert r.rows == [(info["unnamed"], None, 1)]
    r = asyncio.run(_sql(d, "SELECT object_name FROM alarms"))
    assert r.rows == [("obj-05",)]
    r = asyncio.run(_sql(d, "SELECT namespace, count(*) FROM objects GROUP BY ALL ORDER BY 1"))
    assert r.rows == [("Other", 1), ("Store", 31)]
    r = asyncio.run(_sql(d, "SELECT count(*) FROM kv", namespace="Other"))
    assert r.rows == [(1,)]


def test_queries_without_names_fetch_none_and_a_missed_name_is_fetched(shared, monkeypatch):
    """A query that reads no names gets rows without the name rows (the same answer, fewer
    rows sent); were needs_names ever wrong, the names are fetched and the answer is right."""
    d, _info = shared
    import durable.query as q
    counted = ("SELECT namespace, count(*), count(DISTINCT object_id), count(DISTINCT key) "
               "FROM kv {} GROUP BY ALL ORDER BY 1")  # (a distinct key count: not split)
    r = asyncio.run(_sql(d, counted.format("")))
    assert [row[0] for row in r.rows] == ["Other", "Store"] and r.rows[1][2] == 31
    forced = asyncio.run(_sql(d, counted.format("WHERE object_name IS NULL OR object_name <> ''")))
    assert r.rows == forced.rows  # (the same rows, read through the names join)
    named = "SELECT count(*) FROM kv WHERE object_name = 'obj-00'"
    want = asyncio.run(_sql(d, named)).rows
    assert want[0][0] >= len(EVERY_TYPE)
    asked: list[set[str]] = []
    real = q.snapshot

    async def spy(client, what, **kw):  # noqa: ANN001, ANN003, ANN202
        asked.append(set(what))
        return await real(client, what, **kw)

    monkeypatch.setattr(q, "snapshot", spy)
    assert asyncio.run(_sql(d, counted.format(""))).rows == r.rows
    assert asked == [{"data"}]  # no name rows sent
    asked.clear()
    monkeypatch.setattr(q, "needs_names", lambda _query: False)  # wrong on purpose
    assert asyncio.run(_sql(d, "SELECT object_name FROM alarms")).rows == [("obj-05",)]
    assert asked == [{"alarms"}, {"alarms", "names"}]
    asked.clear()
    assert asyncio.run(_sql(d, named)).rows == want
    assert asked == [{"data"}, {"kv"}]


def codec_value(text: str):
    return durable.codec.decode(text.encode())


def test_list_objects_pages_names_and_deleted(shared):
    d, info = shared

    async def main():
        async with durable.connect(admin(d)) as c:
            ns = c.namespace("Store")
            every = [o async for o in ns.list_objects()]
            paged = [o async for o in ns.list_objects(page=4)]
            named = [o.name async for o in ns.list_objects(prefix="obj-1")]
            after = [o.id async for o in ns.list_objects(start_after=every[9].id, limit=5)]
            return every, paged, named, after

    every, paged, named, after = asyncio.run(main())
    assert len(every) == 31 and [o.id for o in every] == sorted(o.id for o in every)
    assert [o.id for o in paged] == [o.id for o in every]
    assert sorted(named) == [f"obj-{i}" for i in range(10, 20)]
    assert after == [o.id for o in every[10:15]]
    by_name = {o.name: o for o in every}
    assert "gone" not in by_name
    assert by_name[None].id == info["unnamed"] and by_name[None].keys == 1
    assert by_name["obj-05"].alarm is not None and by_name["obj-06"].alarm is None
    assert by_name["obj-03"].keys == 2 and by_name["obj-03"].bytes == len("n3half") + len("false")
    age = dt.datetime.now(dt.UTC) - by_name["obj-03"].updated_at
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=10)


def test_the_sync_client_lists_and_queries(shared):
    d, _ = shared
    with durable.connect_sync(admin(d)) as op:
        ids = [o.id for o in op.namespace("Store").list_objects(prefix="obj-0", page=3)]
        r = op.sql("SELECT object_id FROM kv WHERE key = 'n' AND object_name LIKE 'obj-0%' "
                   "ORDER BY 1")
    assert len(ids) == 10 and ids == [row[0] for row in r.rows]


def test_cli_objects_sql_csv_json(shared):
    d, _ = shared
    out = orjson.loads(cli(d.root, "objects", "Store", "--prefix", "obj-2", "--json").stdout)
    assert sorted(o["name"] for o in out) == [f"obj-{i}" for i in range(20, 30)]
    rows = orjson.loads(cli(d.root, "sql", "--json", "SELECT object_name AS name, "
                            "CAST(value AS INTEGER) AS n FROM kv WHERE key = 'n' "
                            "AND object_name IN ('obj-00', 'obj-01') ORDER BY 1").stdout)
    assert rows == [{"name": "obj-00", "n": 0}, {"name": "obj-01", "n": 1}]
    csv = cli(d.root, "sql", "--csv", "SELECT 1 AS a, 'x,y' AS b").stdout
    assert csv.splitlines() == ["a,b", '1,"x,y"']
    table = cli(d.root, "sql", "SELECT count(*) AS n FROM objects WHERE namespace = 'Other'").stdout
    assert [line.strip() for line in table.splitlines()] == ["n", "-", "1"]
    bad = cli(d.root, "sql", "DROP TABLE kv", check=False)
    assert bad.returncode == 1 and "only read-only statements" in bad.stderr


@pytest.mark.parametrize("query, says", [
    ("COPY (SELECT * FROM kv) TO '/tmp/durable-leak.csv'", "COPY"),
    ("ATTACH '/tmp/durable-x.duckdb' AS x", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", "files"),
    ("CREATE TABLE t AS SELECT * FROM kv", "CREATE"),
    ("SELECT 1; DELETE FROM kv", "statements"),
])
def test_writes_and_file_access_are_refused(shared, query, says):
    d, _ = shared
    with pytest.raises(QueryError, match=says):
        asyncio.run(_sql(d, query))
    assert not Path("/tmp/durable-leak.csv").exists()


def test_only_the_operator_endpoint_may_query(shared):
    d, _ = shared

    async def main():
        async with durable.connect(d.frontend) as c:  # the data plane
            with pytest.raises(QueryError, match="operator endpoint"):
                await c.sql("SELECT 1")
            with pytest.raises(QueryError, match="operator endpoint"):
                [o async for o in c.namespace("Store").list_objects()]
    asyncio.run(main())


def test_a_query_past_its_timeout_is_stopped_and_calls_go_on(shared):
    d, _ = shared

    async def main():
        async with durable.connect(admin(d)) as op, durable.connect(d.frontend) as c:
            stub = c.namespace("Store").get_by_name("obj-07")
            t = time.monotonic()
            query = asyncio.ensure_future(op.sql(
                "SELECT count(*) FROM range(100000000000) a, kv b", timeout=1.5))
            waits = []
            while not query.done():  # calls go on while it runs
                s = time.monotonic()
                assert await stub.get("n") == 7
                waits.append(time.monotonic() - s)
                await asyncio.sleep(0.02)
            with pytest.raises(CallTimeoutError, match="timeout"):
                await query
            assert time.monotonic() - t < 10
            assert waits and max(waits) < 1.0, max(waits)
            r = await op.sql("SELECT count(*) FROM kv WHERE key = 'n'")  # and so do queries
            assert r.rows[0][0] == 31
    asyncio.run(main())


def test_queries_beyond_the_slots_limit_wait_their_turn(shared):
    """Each object process streams at most two snapshots at once; six queries at once all
    finish (the others were queued), with the same answer."""
    d, _ = shared

    async def main():
        async with durable.connect(admin(d)) as op:
            return await asyncio.gather(*(op.sql("SELECT count(*) FROM kv WHERE key = 'n'")
                                          for _ in range(6)))
    results = asyncio.run(main())
    assert len({r.rows[0][0] for r in results}) == 1 and results[0].rows[0][0] >= 31


def _names_on(ns, slot: int, n: int) -> list[str]:
    ring, out, i = Ring(2), [], 0
    while len(out) < n:
        if ring.slot_for(str(ns.id_from_name(f"burst-{i}"))) == slot:
            out.append(f"burst-{i}")
        i += 1
    return out


def test_a_query_during_a_write_burst_sees_a_prefix_of_each_slot(shared):
    """Per slot, one sequential writer puts write i into object i % 4 as {"a": i, "b": i}
    (one write set). A snapshot of a prefix 1..m shows, for each object, exactly the last
    write to it at or below m, with a == b; and it holds every write acknowledged before
    the query started."""
    d, _ = shared

    async def main():
        async with durable.connect(admin(d)) as op, durable.connect(d.frontend) as c:
            ns = c.namespace("Store")
            names = {slot: _names_on(ns, slot, 4) for slot in (0, 1)}
            acked = {0: 0, 1: 0}
            stop = asyncio.Event()

            async def writer(slot: int) -> None:
                stubs = [ns.get_by_name(n) for n in names[slot]]
                i = 0
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    i += 1
                    await stubs[i % 4].put({"a": i, "b": i})
                    acked[slot] = i

            writers = [asyncio.ensure_future(writer(s)) for s in (0, 1)]
            await asyncio.sleep(0.3)
            checks = 0
            try:
                for _ in range(6):
                    before = dict(acked)
                    r = await op.sql("SELECT object_name, key, CAST(value AS BIGINT) FROM kv "
                                     "WHERE starts_with(object_name, 'burst-')", namespace="Store")
                    seen: dict[str, dict[str, int]] = {}
                    for name, key, v in r.rows:
                        seen.setdefault(name, {})[key] = v
                    for slot in (0, 1):
                        vals = {n: seen.get(n, {}) for n in names[slot]}
                        for n, kv in vals.items():
                            assert kv.get("a") == kv.get("b"), (n, kv)  # nothing partial
                        m = max(kv.get("a", 0) for kv in vals.values())
                        assert m >= before[slot]  # every write acknowledged before the query
                        for j, n in enumerate(names[slot]):
                            last = max((i for i in range(1, m + 1) if i % 4 == j), default=None)
                            assert vals[n].get("a") == last, (slot, n, m, vals)  # a prefix
                        checks += 1
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.gather(*writers)
            assert checks == 12 and min(acked.values()) > 20
    asyncio.run(main())


SPLIT_QUERIES = [
    "SELECT count(*) FROM kv",
    "SELECT namespace, count(*) AS rows, count(DISTINCT object_id) AS objects, "
    "sum(CAST(value->>'$.count' AS BIGINT)) AS counts, min(key), max(updated_at) "
    "FROM kv GROUP BY namespace ORDER BY namespace",
    "SELECT count(value), max(value::VARCHAR) FROM kv WHERE key = 'n'",
    "SELECT namespace, count(*) FROM kv WHERE key = 'nope' GROUP BY ALL",  # (no group at all)
]


@pytest.mark.parametrize("query", SPLIT_QUERIES)
def test_aggregates_computed_in_each_slot_answer_as_shipped_rows(shared, query, monkeypatch):
    """The same query, split across the slots and run the general way: the same answer; and
    the split one really was split (the slots sent partial rows, not rows)."""
    d, _ = shared
    import durable.query as dq
    asked: list[str] = []
    real = dq._receive

    def spy(opened, *a, **kw):
        asked.extend(kind for kind, _ in opened)
        return real(opened, *a, **kw)
    monkeypatch.setattr(dq, "_receive", spy)

    async def main():
        async with durable.connect(admin(d)) as op:
            split = await dq.sql(op, query)
            kinds = set(asked)
            whole = await dq.sql(op, query, split=False)
            return split, kinds, whole
    split, kinds, whole = asyncio.run(main())
    assert kinds == {"agg"}
    assert split.columns == whole.columns
    assert split.rows == whole.rows
    assert set(split.cut) == {0, 1}


def test_a_slot_refuses_to_aggregate_a_query_that_does_not_split(shared):
    d, _ = shared
    from urllib.parse import quote

    from durable.query import QUERY_METHOD, QUERY_URL

    async def main():
        async with durable.connect(admin(d)) as op:
            stub = op.namespace("Store").get_by_name("obj-01")
            q = quote("SELECT count(*) FROM kv WHERE length(read_text('/etc/hostname')) > 0")
            with pytest.raises(durable.ObjectError, match="a query that a slot aggregates"):
                await stub.fetch(f"{QUERY_URL}?op=snapshot&what=agg&q={q}",
                                 method=QUERY_METHOD, timeout=10)
            assert (await op.sql("SELECT count(*) FROM kv WHERE key = 'n'")).rows[0][0] >= 31
    asyncio.run(main())


def test_an_aggregate_during_a_write_burst_holds_every_acknowledged_write(shared):
    """One writer per slot puts keys x{i} and y{i} in one write set; a split count during the
    burst sees as many x as y (nothing partial) and at least every write acknowledged before."""
    d, _ = shared

    async def main():
        async with durable.connect(admin(d)) as op, durable.connect(d.frontend) as c:
            ns = c.namespace("Other")
            acked = [0, 0]
            stop = asyncio.Event()

            async def writer(k: int) -> None:
                stub = ns.get_by_name(f"agg-burst-{k}")
                i = 0
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    i += 1
                    await stub.put({f"x{i}": i, f"y{i}": i})
                    acked[k] = i

            writers = [asyncio.ensure_future(writer(k)) for k in (0, 1)]
            await asyncio.sleep(0.3)
            try:
                for _ in range(5):
                    before = sum(acked)
                    r = await op.sql(
                        "SELECT count(*) FILTER (WHERE 1 = 1) IS NULL, "  # (general way)
                        "1 FROM kv LIMIT 0")  # a general query between, as users mix them
                    assert r.rows == []
                    r = await op.sql(
                        "SELECT sum(CASE WHEN starts_with(key, 'x') THEN 1 ELSE 0 END), "
                        "sum(CASE WHEN starts_with(key, 'y') THEN 1 ELSE 0 END) FROM kv "
                        "WHERE namespace = 'Other' AND starts_with(key, 'x') OR "
                        "namespace = 'Other' AND starts_with(key, 'y')")
                    xs, ys = r.rows[0]
                    assert xs == ys and xs >= before, (xs, ys, before)
                    assert xs <= sum(acked) + 2  # (at most the writes in flight besides)
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.gather(*writers)
            assert min(acked) > 10
    asyncio.run(main())


def test_export_then_import_round_trips_every_type_names_and_alarms(shared, tmp_path):
    """Parquet: imported and served, every value comes back with its type. JSON lines: the
    import stores the very same rows (read from both sets of slot files)."""
    d, _ = shared
    objects = asyncio.run(_sql(d, "SELECT count(*) FROM objects")).rows[0][0]  # (other tests add some)
    targets = {}
    for fmt in ("parquet", "jsonl"):
        dest = tmp_path / f"export-{fmt}"
        manifest = orjson.loads(cli(d.root, "export", str(dest), "--format", fmt, "--json").stdout)
        assert manifest["objects"] == objects and manifest["alarms"] == 1
        assert (dest / "secret").stat().st_mode & 0o777 == 0o600
        target = targets[fmt] = tmp_path / f"i{fmt[0]}"  # (short: ipc paths are limited to 107 bytes)
        target.mkdir()
        shutil.copy(d.root / "durable.toml", target / "durable.toml")
        summary = orjson.loads(cli(target, "import", str(dest), "--json").stdout)
        assert summary["objects"] == objects and summary["alarms"] == 1
    # The same rows in reverse order: a name row's write time must not depend on which of its
    # object's rows comes first (it is the object's earliest), so these files are the same.
    src = tmp_path / "export-jsonl"
    lines = (src / "kv.jsonl").read_bytes().rstrip(b"\n").split(b"\n")
    times: dict[str, set] = {}
    for line in lines:
        row = orjson.loads(line)
        if row["object_name"] is not None:
            times.setdefault(row["object_id"], set()).add(row["updated_at"])
    assert max(map(len, times.values())) > 1  # (some named object was written at two times)
    rev = tmp_path / "export-rev"
    shutil.copytree(src, rev)
    (rev / "kv.jsonl").write_bytes(b"\n".join(reversed(lines)) + b"\n")
    targets["rev"] = tmp_path / "ir"
    targets["rev"].mkdir()
    shutil.copy(d.root / "durable.toml", targets["rev"] / "durable.toml")
    cli(targets["rev"], "import", str(rev))
    for slot in (0, 1):
        rows = []
        for fmt in ("parquet", "jsonl", "rev"):
            con = duckdb.connect(str(targets[fmt] / "durable-data" / f"slot-{slot}.duckdb"),
                                 read_only=True)
            rows.append((con.execute("SELECT pk, v, t FROM kv ORDER BY pk").fetchall(),
                         con.execute("SELECT obj, due FROM alarms ORDER BY obj").fetchall()))
            con.close()
        assert rows[0] == rows[1] == rows[2] and rows[0][0]
    target = targets["parquet"]
    with serving(target, None, args=["--config", str(target / "durable.toml")]) as d2:
        d2.wait_ready()

        async def read() -> tuple:
            async with durable.connect(d2.frontend) as c:
                got = await c.namespace("Store").get_by_name("obj-00").everything()
                n5 = await c.namespace("Store").get_by_name("obj-05").get("n")
            async with durable.connect(admin(d2)) as op:
                names = await op.sql("SELECT object_name FROM alarms")
            return got, n5, names.rows

        got, n5, alarm_names = asyncio.run(read())
    for key, value in EVERY_TYPE.items():
        assert same(got[key], value), key
    assert n5 == 5 and alarm_names == [("obj-05",)]


def test_import_refuses_a_bad_export_and_leaves_the_data_dir_empty(shared, tmp_path):
    d, _ = shared
    dest = tmp_path / "export"
    cli(d.root, "export", str(dest), "--format", "jsonl")
    lines = (dest / "kv.jsonl").read_bytes().rstrip(b"\n").split(b"\n")  # (values hold U+2028)
    row = orjson.loads(lines[0])
    row["value"] = ["x", 1]  # not a value the codec wrote
    (dest / "kv.jsonl").write_bytes(b"\n".join([*lines, orjson.dumps(row)]) + b"\n")
    target = tmp_path / "t"  # (short: its run/workers.sock must fit an ipc path under xdist)
    target.mkdir()
    shutil.copy(d.root / "durable.toml", target / "durable.toml")
    r = cli(target, "import", str(dest), check=False)
    assert r.returncode == 1
    assert f"kv.jsonl row {len(lines) + 1}" in r.stderr and "left empty" in r.stderr
    data = target / "durable-data"
    assert sorted(p.name for p in data.iterdir()) in ([], ["lock"])
    r = cli(d.root, "import", str(dest), check=False)  # the running daemon's own data dir
    assert r.returncode == 1 and "not empty" in r.stderr
    assert "left empty" not in r.stderr  # (it was not touched; it used to say it was emptied)


def test_export_import_round_trip_of_100k_objects(tmp_path):
    """100,000 objects (imported, then written to live), exported while serving, imported
    into a new data dir: its slot files hold exactly the rows of the first one's."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench import make_export

    seed = tmp_path / "seed"
    make_export(seed, 100_000)
    config = CONFIG.replace("[namespaces.Store]", "[namespaces.KV]\nclass = "
                            "\"tests.integration.objects:Store\"\n[namespaces.Store]")
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "durable.toml").write_text(config)
    cli(a, "import", str(seed))
    with serving(a, None, args=["--config", str(a / "durable.toml")]) as d:
        d.wait_ready()

        async def live() -> None:
            async with durable.connect(d.frontend) as c:
                await c.namespace("KV").get_by_name("object-1").put(dict(EVERY_TYPE))
                await c.namespace("Other").get_by_name("object-2").delete_all()
                await c.namespace("KV").get_by_name("object-3").arm(time.time() * 1000 + 3.6e6)
        asyncio.run(live())
        manifest = orjson.loads(cli(d.root, "export", str(tmp_path / "ex"), "--json").stdout)
        d.proc.send_signal(2)  # a clean stop: everything applied to the slot files
        assert d.proc.wait(timeout=60) == 0
    assert manifest["objects"] == 100_000 - 1 and manifest["alarms"] == 1
    assert manifest["rows"] == 300_000 - 3 + len(EVERY_TYPE)
    cli(b, "import", str(tmp_path / "ex"))
    secret = (seed / "secret").read_bytes()
    deleted = IdFactory("Other", namespace_key(secret, "Other")).from_name("object-2")
    deleted_slot = Ring(2).slot_for(str(deleted))
    for slot in (0, 1):
        rows = []
        for root in (a, b):
            con = duckdb.connect(str(root / "durable-data" / f"slot-{slot}.duckdb"), read_only=True)
            rows.append((
                # (as readers see them: the names, kept in `objects`, as rows)
                con.execute(f"SELECT pk, v, t FROM {KV_ROWS} WHERE v IS NOT NULL ORDER BY pk"
                            ).fetchall(),
                con.execute("SELECT obj, due FROM alarms ORDER BY obj").fetchall()))
            con.close()
        # (a deleted object's name stays stored beside it, but an export has no row to carry it)
        live = {pk.rsplit(b"/", 1)[0] for pk, _, _ in rows[0][0] if not pk.startswith(b"_durable")}
        kept = [r for r in rows[0][0] if not r[0].startswith(b"_durable_name_")
                or r[0][len(b"_durable_name_"):].rsplit(b"/", 1)[0] in live]
        assert len(rows[0][0]) - len(kept) == (1 if slot == deleted_slot else 0)
        # Every row whole, times included. (A name has no write time of its own now, where its
        # row once took its object's earliest: session 9 saw object-1's name differ once in
        # five, by the order the rows came in.)
        assert len(kept) > 100_000
        assert (kept, rows[0][1]) == (rows[1][0], rows[1][1])


def test_the_daemon_stops_cleanly_while_a_reader_holds_a_snapshot(tmp_path):
    """A reader that asked for rows and never reads them: SIGTERM still ends every process
    (the snapshot thread is cancelled before the slot's files close), with exit 0."""
    import signal

    from durable.query import QUERY_METHOD, QUERY_URL, _slot_stubs
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()

        async def hold() -> list:
            async with durable.connect(d.frontend) as c:
                await c.namespace("Store").get_by_name("x").put({f"k{i}": "v" * 1000 for i in range(100)})
            async with durable.connect(admin(d)) as op:
                stubs = await _slot_stubs(op, None)
                replies = []
                for s in stubs:
                    r = await s.fetch(f"{QUERY_URL}?op=snapshot&what=kv", method=QUERY_METHOD)
                    replies.append(await r.json())
                return replies

        replies = asyncio.run(hold())
        assert all(r["endpoint"].startswith("ipc://") for r in replies)
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0, d.log_text()[-3000:]
        assert time.monotonic() - started < 15
        assert "Traceback" not in d.log_text()
