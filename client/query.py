"""See and query every object: ``list_objects``, read-only SQL, export (docs/query.md).

Each slot streams a consistent snapshot of its rows (``objectproc/query.py``)
to the process that asked; that process runs the SQL in a DuckDB of its own,
in memory, over these views:

* ``kv(namespace, object_id, object_name, key, value JSON, updated_at)``
* ``objects(namespace, object_id, object_name, keys, bytes, updated_at, alarm)``
* ``alarms(namespace, object_id, object_name, scheduled_at)``

So a query never touches the daemon's files, costs the daemon only the
streaming of rows (a thread per slot, at most two at once), and its own CPU
and memory are bounded here (``threads``, ``memory_limit``, ``timeout``).
What a query may do is checked twice: one statement, of type SELECT (which
covers WITH, DESCRIBE, SHOW, SUMMARIZE, FROM and VALUES), and a DuckDB with
external access and extension loading off and its settings locked, so no
function can reach a file (``read_csv``, ``COPY``, ``ATTACH``, ``INSTALL``).

Only the daemon's operator endpoint (``ipc://RUN_DIR/admin.sock``, 0700)
accepts these requests: connect with ``durable.connect(config.admin())``,
which only the daemon's user can open.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import zmq

from . import pushdown
from .errors import CallTimeoutError, QueryError

__all__ = ["QueryResult", "ObjectInfo", "check_query", "needs_names", "sql", "list_objects", "snapshot",
           "Snapshot", "views", "NAME_PREFIX"]

QUERY_METHOD = "QUERY"
QUERY_URL = "durable:query"
NAME_PREFIX = "_durable_name_"  # (objectproc/query.py: where object names are stored)

KV_SCHEMA = pa.schema([("pk", pa.binary()), ("v", pa.binary()), ("t", pa.int64())])
ALARMS_SCHEMA = pa.schema([("obj", pa.binary()), ("due", pa.int64())])
# What the views read: the same columns as text (a zero-copy view of the bytes, which are
# UTF-8 as written: keys by Python, values by orjson).
_RAW_KV = pa.schema([("pk", pa.string()), ("value", pa.json_()), ("t", pa.int64())])
_RAW_ALARMS = pa.schema([("obj", pa.string()), ("due", pa.int64())])

# The views over the raw rows: ``pk`` is NAMESPACE/OBJECT_ID/KEY (neither of the first two
# holds "/", both are ASCII, so character and byte positions agree); names are stored as
# rows of namespace _durable_name_NAMESPACE. durable_names is grouped, and the join is on
# columns of subqueries (not on expressions), so that DuckDB knows the join cannot change
# the row count and drops it from a query that does not read object_name (a count(*) over
# 3M rows: 40 ms against 1.1 s, measured). DuckDB cannot drop it from every such query (not
# from one with count(DISTINCT ...): 3 s of a 4.4 s GROUP BY over 3M rows, measured), so a
# query that never names object_name gets views without it (``needs_names``). Times are UTC.
_NAMES_VIEW = f"""
CREATE VIEW durable_names AS
  SELECT split_part(pk, '/', 1)[{len(NAME_PREFIX) + 1}:] AS namespace,
         split_part(pk, '/', 2) AS object_id,
         any_value(json_extract_string(value, '$')) AS name
  FROM durable_kv_raw
  WHERE starts_with(pk, '{NAME_PREFIX}') AND ends_with(pk, '/name')
  GROUP BY ALL;
"""
_VIEWS_TEMPLATE = f"""
CREATE VIEW kv AS
  SELECT r.namespace, r.object_id, {{kv_name}}
         r.pk[strlen(r.namespace) + strlen(r.object_id) + 3:] AS key, r.value,
         make_timestamp(r.t * 1000) AS updated_at
  FROM (SELECT split_part(pk, '/', 1) AS namespace, split_part(pk, '/', 2) AS object_id,
               pk, value, t
        FROM durable_kv_raw WHERE NOT starts_with(pk, '{NAME_PREFIX}')) r
  {{kv_join}};
CREATE VIEW alarms AS
  SELECT a.namespace, a.object_id, {{alarm_name}}
         make_timestamp(a.due * 1000) AS scheduled_at
  FROM (SELECT split_part(obj, '/', 1) AS namespace, split_part(obj, '/', 2) AS object_id, due
        FROM durable_alarms_raw) a
  {{alarm_join}};
CREATE VIEW objects AS
  WITH k AS (SELECT namespace, object_id, {{k_name}}
                    count(*) AS keys,
                    sum(strlen(key) + strlen(value::VARCHAR)) AS bytes,
                    max(updated_at) AS updated_at
             FROM kv GROUP BY namespace, object_id)
  SELECT coalesce(k.namespace, a.namespace) AS namespace,
         coalesce(k.object_id, a.object_id) AS object_id,
         {{objects_name}}
         coalesce(k.keys, 0) AS keys, coalesce(k.bytes, 0)::BIGINT AS bytes, k.updated_at,
         a.scheduled_at AS alarm
  FROM k FULL OUTER JOIN alarms a ON k.namespace = a.namespace AND k.object_id = a.object_id;
"""
_JOIN = "LEFT JOIN durable_names n ON {0}.namespace = n.namespace AND {0}.object_id = n.object_id"
_VIEWS = _NAMES_VIEW + _VIEWS_TEMPLATE.format(
    kv_name="n.name AS object_name,", kv_join=_JOIN.format("r"),
    alarm_name="n.name AS object_name,", alarm_join=_JOIN.format("a"),
    k_name="any_value(object_name) AS object_name,",
    objects_name="coalesce(k.object_name, a.object_name) AS object_name,")
_VIEWS_NO_NAMES = _NAMES_VIEW + _VIEWS_TEMPLATE.format(
    kv_name="", kv_join="", alarm_name="", alarm_join="", k_name="", objects_name="")
# Columns of the views other than object_name: a query whose every column reference ends in
# one of these (or in an alias of its own) does not need the names.
_PLAIN_COLUMNS = {"namespace", "object_id", "key", "value", "updated_at", "keys", "bytes",
                  "alarm", "scheduled_at"}
_NEEDS = {"kv": {"kv"}, "objects": {"kv", "alarms"}, "alarms": {"alarms", "names"}}


@dataclass(frozen=True)
class QueryResult:
    """A query's answer: column names and rows (tuples of Python values)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    #: per slot, the log record the snapshot stands at (every write acknowledged before is in)
    cut: dict[int, int]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):  # noqa: ANN204
        return iter(self.rows)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


@dataclass(frozen=True)
class ObjectInfo:
    """One object as ``list_objects`` sees it (``keys``/``bytes``: its stored keys and their
    key + value bytes; ``updated_at``: its last write still stored, UTC)."""

    namespace: str
    id: str
    name: str | None
    keys: int
    bytes: int
    updated_at: dt.datetime | None
    alarm: dt.datetime | None


def _utc(ms: int | None) -> dt.datetime | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def check_query(query: str) -> set[str]:
    """Refuse anything but one read-only statement; return the views it reads."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError("the query is empty; give one SELECT statement")
    try:
        statements = pushdown.parser().extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(f"the query does not parse: {e}") from None
    if len(statements) != 1:
        raise QueryError(f"the query holds {len(statements)} statements; give exactly one "
                         "read-only statement (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"only read-only statements may run (SELECT, WITH, DESCRIBE, SHOW, "
                         f"SUMMARIZE); this one is {kind.name}")
    try:
        names = {n.lower() for n in pushdown.parser().get_table_names(query)}
    except duckdb.Error:
        names = set()
    words = {w.lower() for w in re.findall(r"[A-Za-z_]+", query)}
    needed: set[str] = set()
    for view, raw in _NEEDS.items():
        if view in names or view in words:
            needed |= raw
    return needed


def needs_names(query: str) -> bool:
    """Whether ``query`` may read ``object_name``; True unless its syntax tree shows it cannot.

    It can only through a column reference, a ``*`` (``SELECT *``, ``COLUMNS(...)``, ``FROM
    kv``, ``DESCRIBE``), a row used as a value (``SELECT k FROM kv k``) or a join that matches
    columns by name (``NATURAL``, ``USING``). Anything not understood counts as "may"; a
    reference missed would fail to bind (the views then lack the column), not answer wrong."""
    tree = pushdown.syntax_tree(query)
    if tree is None or tree.get("error", True):
        return True
    refs: list[list[str]] = []
    aliases: set[str] = set()
    tables: set[str] = set()
    stack: list[Any] = [tree["statements"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "STAR" or node.get("class") == "STAR":
            return True
        if kind == "JOIN" and (node.get("ref_type") == "NATURAL" or node.get("using_columns")):
            return True
        if kind in ("BASE_TABLE", "SUBQUERY", "TABLE_FUNCTION", "EXPRESSION_LIST"):
            tables.add(str(node.get("table_name", "")).lower())
            tables.add(str(node.get("alias", "")).lower())
        elif node.get("alias"):
            aliases.add(str(node["alias"]).lower())
        if kind == "COLUMN_REF":
            refs.append([str(n).lower() for n in node.get("column_names", [])])
        stack.extend(v for v in node.values() if isinstance(v, dict | list))
    aliases -= tables
    for names in refs:
        if not names or "object_name" in names:
            return True
        if names[-1] not in _PLAIN_COLUMNS and not (len(names) == 1 and names[0] in aliases):
            return True
    return False


def _as_text(table: pa.Table | None, schema: pa.Schema) -> pa.Table:
    if table is None:
        return schema.empty_table()
    return pa.Table.from_arrays(
        [pa.chunked_array([_view(c, field.type) for c in col.chunks], field.type)
         if col.type != field.type else col
         for col, field in zip(table.columns, schema, strict=True)], schema=schema)


def _view(chunk: pa.Array, to: pa.DataType) -> pa.Array:
    if isinstance(to, pa.ExtensionType):  # (JSON: DuckDB takes it as its JSON type, unparsed)
        return pa.ExtensionArray.from_storage(to, chunk.view(to.storage_type))
    return chunk.view(to)


def views(con: duckdb.DuckDBPyConnection, kv: pa.Table | None, alarms: pa.Table | None,
          *, names: bool = True) -> None:
    """Lay the views over raw rows (None: none of that kind) on ``con``; without ``names``,
    they have no ``object_name`` column (and cost no join)."""
    con.register("durable_kv_raw", _as_text(kv, _RAW_KV))
    con.register("durable_alarms_raw", _as_text(alarms, _RAW_ALARMS))
    con.execute(_VIEWS if names else _VIEWS_NO_NAMES)


def locked_engine(*, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can reach no file and load nothing, its settings locked."""
    return duckdb.connect(config={
        "threads": threads, "memory_limit": memory_limit,
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False, "allow_community_extensions": False,
        "lock_configuration": True})


# -- talking to the slots ---------------------------------------------------------------
async def _slot_stubs(client: Any, namespace: str | None) -> list[Any]:
    """A stub per slot: operator requests for a slot go to its process through any object
    it hosts. The ring is the broker's (this package does not import it), so stubs are
    probed (``op=ping`` answers with its slot) until every slot has one: ~3 cheap requests
    for 2 slots, and no object is activated by them."""
    slots = len((await client.statistics())["slots"])
    names = [namespace] if namespace else client.namespaces
    if not names:
        raise QueryError("the daemon serves no namespace")
    ns = client.namespace(names[0])
    found: dict[int, Any] = {}
    i = 0
    while len(found) < slots:
        if i > 64 * slots + 1000:  # (cannot happen with a working ring)
            raise QueryError(f"no object of {ns.name} reached slots {sorted(set(range(slots)) - set(found))}")
        stubs = [ns.get_by_name(f"durable-query-{i + k}") for k in range(slots)]
        i += slots
        for stub, reply in zip(stubs, await asyncio.gather(
                *(_ask(s, f"{QUERY_URL}?op=ping", 30.0) for s in stubs)), strict=True):
            found.setdefault(reply["slot"], stub)
    return [found[s] for s in range(slots)]


async def _ask(stub: Any, url: str, timeout: float) -> dict[str, Any]:
    from .errors import DurableError
    try:
        resp = await stub.fetch(url, method=QUERY_METHOD, timeout=timeout)
    except PermissionError as e:
        raise QueryError(f"{e}. Queries are for local operators: connect to the daemon's "
                         "operator endpoint (durable.connect(config.admin()))") from None
    except DurableError as e:
        if "operator request" in str(e):
            raise QueryError(f"{e}. Queries are for local operators: connect to the daemon's "
                             "operator endpoint (durable.connect(config.admin()))") from None
        raise
    if resp.status != 200:
        raise QueryError(f"slot refused the query: {resp.status} {await resp.text()}")
    return await resp.json()


@dataclass
class Snapshot:
    """Every slot's rows as of one point per slot (``cut``: slot -> log record)."""

    kv: pa.Table | None
    alarms: pa.Table | None
    cut: dict[int, int]
    bytes: int
    #: objects holding a key, counted by the slots (only when asked: ``count_objects``)
    objects: int | None = None


async def snapshot(client: Any, what: set[str], *, namespace: str | None = None,
                   timeout: float = 60.0, max_bytes: int = 4 << 30,
                   progress: Callable[[int, int], None] | None = None,
                   count_objects: bool = False) -> Snapshot:
    """Fetch ``what`` (``kv``, ``data``: kv without the name rows, ``names``: the name rows
    only, ``alarms``) from every slot; ``progress(rows, bytes)``; ``count_objects``: each
    slot also counts its objects holding a key (with ``kv``)."""
    deadline = time.monotonic() + timeout
    stubs = await _slot_stubs(client, namespace)
    opened: list[tuple[str, dict[str, Any]]] = []
    q = f"&ns={namespace}" if namespace else ""
    if "kv" in what:
        what = what - {"names"}  # (kv holds the name rows too)
    for kind in sorted(what):
        count = "&count=objects" if count_objects and kind == "kv" else ""
        replies = await asyncio.gather(*(
            _ask(s, f"{QUERY_URL}?op=snapshot&what={kind}&timeout={timeout:g}{q}{count}",
                 timeout) for s in stubs))
        opened.extend((kind, r) for r in replies)
    ends: list[dict[str, Any]] = []
    batches, cut, size = await asyncio.to_thread(_receive, opened, deadline, max_bytes, progress,
                                                 ends)
    tables: dict[str, pa.Table | None] = {"kv": None, "alarms": None}
    for kind in what:
        schema = ALARMS_SCHEMA if kind == "alarms" else KV_SCHEMA
        got = [b.cast(schema) if b.schema != schema else b for b in batches[kind]]
        tables["alarms" if kind == "alarms" else "kv"] = pa.Table.from_batches(got, schema=schema)
    counted = [e["objects"] for e in ends if "objects" in e]
    objects = sum(counted) if count_objects and "kv" in what and len(counted) == len(stubs) \
        else None
    return Snapshot(tables["kv"], tables["alarms"], cut, size, objects)


def _receive(opened: list[tuple[str, dict[str, Any]]], deadline: float, max_bytes: int,
             progress: Callable[[int, int], None] | None, ends: list[dict[str, Any]] | None = None
             ) -> tuple[dict[str, list[pa.RecordBatch]], dict[int, int], int]:
    ctx = zmq.Context.instance()
    socks: dict[zmq.Socket[Any], tuple[str, dict[str, Any]]] = {}
    poller = zmq.Poller()
    out: dict[str, list[pa.RecordBatch]] = {"kv": [], "data": [], "names": [], "alarms": [],
                                            "agg": []}
    cut: dict[int, int] = {}
    size = rows = 0
    try:
        for kind, reply in opened:
            s = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 8)
            s.connect(reply["endpoint"])
            socks[s] = (kind, reply)
            poller.register(s, zmq.POLLIN)
            cut[reply["slot"]] = reply["cut_seq"]
        last = 0.0
        while socks:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallTimeoutError("the query's time ran out while the slots sent their rows; "
                                       "give it a longer timeout or narrow it to a namespace")
            for s, _ in poller.poll(min(left, 1.0) * 1000):
                tag, data = s.recv_multipart(copy=False)
                kind, reply = socks[s]
                if tag.bytes == b"D":
                    buf = data.buffer
                    size += len(buf)
                    if size > max_bytes:
                        raise QueryError(
                            f"the rows to query passed {max_bytes / 2**20:.0f} MiB; narrow the "
                            "query to a namespace or allow more memory")
                    for batch in pa.ipc.open_stream(pa.py_buffer(buf)):
                        out[kind].append(batch)
                        rows += batch.num_rows
                elif tag.bytes == b"E":
                    if ends is not None:
                        ends.append(orjson.loads(data.bytes))
                    poller.unregister(s)
                    s.close()
                    del socks[s]
                else:
                    raise QueryError(f"slot {reply['slot']} could not send its rows: "
                                     f"{data.bytes.decode(errors='replace')}")
            if progress is not None and time.monotonic() - last >= 0.5:
                last = time.monotonic()
                progress(rows, size)
        if progress is not None:
            progress(rows, size)
    finally:
        for s in socks:
            s.close()
    return out, cut, size


def _run(con: duckdb.DuckDBPyConnection, query: str, timeout: float) -> tuple[list[str], list[tuple]]:
    """Run ``query``, interrupted once ``timeout`` seconds pass."""
    timer = threading.Timer(max(timeout, 0.001), con.interrupt)
    timer.start()
    try:
        cur = con.execute(query)
        rows = cur.fetchall()
        columns = [d[0] for d in cur.description or []]
    except duckdb.InterruptException:
        raise CallTimeoutError(f"the query ran past its timeout ({timeout:.1f} s left) and was "
                               "stopped; give it a longer timeout or narrow it") from None
    except duckdb.PermissionException as e:
        raise QueryError(f"queries may not reach files or extensions: {e}") from None
    except duckdb.OutOfMemoryException as e:
        raise QueryError(f"the query needs more memory than its limit: {e}") from None
    except duckdb.Error as e:
        raise QueryError(f"{type(e).__name__}: {e}") from None
    finally:
        timer.cancel()
    return columns, rows


class _NamesMissed(Exception):
    """The query read object_name after all; its rows were fetched without the names."""


def run_over(kv: pa.Table | None, alarms: pa.Table | None, query: str, *, deadline: float,
             memory_limit: str, threads: int, names: bool | None = None,
             mend: bool = True) -> tuple[list[str], list[tuple]]:
    """Run ``query`` over raw rows in a locked engine of its own; the views carry
    ``object_name`` if the query may read it (``needs_names``, unless ``names`` says). A
    reference to it that ``needs_names`` missed fails to bind; with ``mend`` the query runs
    again with names (the rows hold them), else ``_NamesMissed`` says to fetch them."""
    if names is None:
        names = needs_names(query)
    while True:
        con = locked_engine(memory_limit=memory_limit, threads=threads)
        try:
            views(con, kv, alarms, names=names)
            return _run(con, query, deadline - time.monotonic())
        except QueryError as e:
            if names or "object_name" not in str(e):
                raise
            if not mend:
                raise _NamesMissed() from None
            names = True  # (a reference needs_names missed: none known, but cheap to mend)
        finally:
            con.close()


def _kinds(needed: set[str], names: bool) -> set[str]:
    """What to fetch: without names, neither the name rows nor kv's share of them."""
    if names:
        return needed
    return {"data" if k == "kv" else k for k in needed if k != "names"}


def fold_sql(query: str, split: pushdown.Plan, *, memory_limit: str
              ) -> tuple[str, list[str]] | None:
    """The SQL that folds the slots' partial rows into ``query``'s answer, and its column
    names; None if the folded form would not bind (an ORDER BY naming no output column,
    say): the query then runs as any other. Each column is named and typed as the query
    gives it when run over no rows."""
    con = locked_engine(memory_limit=memory_limit, threads=1)
    try:
        views(con, None, None, names=False)
        cur = con.execute(query)
        names = [d[0] for d in cur.description]
        combine = split.combine_sql(names, [str(d[1]) for d in cur.description])
        con.execute(f"CREATE TABLE durable_final AS SELECT * FROM ({query}) LIMIT 0")
        con.execute(split.final_sql).fetchall()
    except (duckdb.Error, ValueError):
        return None
    finally:
        con.close()
    return combine, names


async def _aggregate(client: Any, query: str, split: pushdown.Plan, *,
                     namespace: str | None, deadline: float, memory_limit: str
                     ) -> QueryResult | None:
    """Ask each slot for its partial rows of ``query`` and fold them (None: they cannot be
    folded after all; run it the general way)."""
    from urllib.parse import quote
    folding_task = asyncio.ensure_future(asyncio.to_thread(  # (while the slots work)
        fold_sql, query, split, memory_limit=memory_limit))
    try:
        stubs = await _slot_stubs(client, namespace)
        left = deadline - time.monotonic()
        q = f"&ns={namespace}" if namespace else ""
        replies = await asyncio.gather(*(
            _ask(s, f"{QUERY_URL}?op=snapshot&what=agg&timeout={left:g}{q}&q={quote(query)}",
                 left) for s in stubs))
        batches, cut, _size = await asyncio.to_thread(
            _receive, [("agg", r) for r in replies], deadline, 64 << 20, None)
    finally:
        folding = await folding_task
    if folding is None:
        return None
    columns, rows = await asyncio.to_thread(fold_partials, split, folding, batches["agg"],
                                            deadline=deadline, memory_limit=memory_limit)
    return QueryResult(columns, rows, cut)


def fold_partials(split: pushdown.Plan, folding: tuple[str, list[str]],
                  partials: list[pa.RecordBatch], *, deadline: float, memory_limit: str
                  ) -> tuple[list[str], list[tuple]]:
    """The answer from every slot's partial rows (``folding``: from :func:`fold_sql`)."""
    combine, names = folding
    if not partials:  # (no slot has a group: only a grouped query gets no row)
        return names, []
    con = locked_engine(memory_limit=memory_limit, threads=1)
    try:
        con.register(pushdown.PARTIALS, pa.Table.from_batches(partials))
        con.execute(f"CREATE VIEW durable_final AS {combine}")
        return _run(con, split.final_sql, deadline - time.monotonic())
    finally:
        con.close()


async def sql(client: Any, query: str, *, namespace: str | None = None, timeout: float = 60.0,
              memory_limit: str = "2GB", threads: int = 2,
              max_bytes: int = 4 << 30, split: bool = True) -> QueryResult:
    """Run one read-only SQL statement over every object's storage (see the module doc).

    An aggregate of the shape ``durable.pushdown`` describes is computed in each slot and
    folded here (``split=False``: never; the answer is the same, only slower)."""
    needed = check_query(query)
    names = needs_names(query)
    deadline = time.monotonic() + timeout
    plan = pushdown.plan(query) if split and not names else None
    if plan is not None:
        done = await _aggregate(client, query, plan, namespace=namespace, deadline=deadline,
                                memory_limit=memory_limit)
        if done is not None:
            return done
    while True:
        snap = await snapshot(client, _kinds(needed, names), namespace=namespace,
                              timeout=deadline - time.monotonic(), max_bytes=max_bytes)
        try:
            columns, rows = await asyncio.to_thread(
                run_over, snap.kv, snap.alarms, query, deadline=deadline,
                memory_limit=memory_limit, threads=threads, names=names, mend=False)
            break
        except _NamesMissed:
            names = True
    return QueryResult(columns, rows, snap.cut)


async def list_objects(client: Any, namespace: str, *, prefix: str | None = None,
                       limit: int | None = None, start_after: str | None = None,
                       page: int = 1000, timeout: float = 60.0) -> AsyncIterator[ObjectInfo]:
    """Objects of ``namespace`` holding a key or an alarm, by id; names filtered by ``prefix``.

    Fetched ``page`` at a time from every slot (each page is consistent per
    slot; pages are taken at successive points, as a paginated listing is).
    """
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if type(page) is not int or not 1 <= page <= 10_000:
        raise ValueError(f"page must be between 1 and 10000, got {page!r}")
    client.namespace(namespace)  # (an unknown namespace raises here, with the known ones)
    stubs = await _slot_stubs(client, namespace)
    after = start_after
    given = 0
    from urllib.parse import quote
    while True:
        want = page if limit is None else min(page, limit - given)
        url = (f"{QUERY_URL}?op=objects&ns={namespace}&limit={want}"
               + (f"&after={quote(after)}" if after else "")
               + (f"&prefix={quote(prefix)}" if prefix else ""))
        replies = await asyncio.gather(*(_ask(s, url, timeout) for s in stubs))
        merged = sorted((row for r in replies for row in r["objects"]), key=lambda row: row[0])
        for oid, name, keys, nbytes, t, due in merged[:want]:
            yield ObjectInfo(namespace, oid, name, keys, nbytes, _utc(t), _utc(due))
            given += 1
        more = len(merged) > want or any(len(r["objects"]) == want for r in replies)
        if not merged or not more or (limit is not None and given >= limit):
            return
        after = merged[min(want, len(merged)) - 1][0]  # the last one given


def to_json_rows(result: QueryResult) -> bytes:
    """The rows as a JSON array of objects (datetimes ISO 8601, decimals and the rest as text)."""
    return orjson.dumps(result.dicts(), default=str, option=orjson.OPT_NON_STR_KEYS)


def _manifest_objects(con: duckdb.DuckDBPyConnection) -> int:
    """Objects holding a key, for the manifest. Ids are 64 characters, so an object is its
    row's first ``len(namespace) + 65`` characters: counting those costs half what the view's
    split does (1.2 s against 2.4 s for 3M rows, measured); checked, else counted the long way."""
    n, uniform = con.execute(
        "SELECT count(DISTINCT pk[:strpos(pk, '/') + 64]), "
        "coalesce(bool_and(pk[strpos(pk, '/') + 65] = '/'), true) FROM durable_kv_raw "
        f"WHERE NOT starts_with(pk, '{NAME_PREFIX}')").fetchall()[0]
    if uniform:
        return n
    return con.execute("SELECT count(*) FROM (SELECT DISTINCT namespace, object_id FROM kv)"
                       ).fetchall()[0][0]


EXPORT_FORMAT = "durable export v1"


def _new_dir(dest: Any) -> Any:
    dest = dest.absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise QueryError(f"export destination {dest} is not a new or empty directory")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    return dest
EXPORT_MANIFEST = "manifest.json"


async def export(client: Any, dest: Any, *, namespace: str | None = None,
                 file_format: str = "parquet", secret: bytes | None = None,
                 timeout: float = 3600.0, max_bytes: int = 16 << 30,
                 say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Write every object's rows (as the ``kv`` view has them) and alarms into the new or
    empty directory ``dest``, from one snapshot per slot; return the manifest.

    ``secret``: the daemon's id secret, kept beside the rows (0600) so that an import
    gives every object its old id. The rows are held in memory on the way (~100 bytes
    each); for data larger than memory, use ``durable backup``.
    """
    import os
    from pathlib import Path

    from . import __version__
    from .fsutil import write_durably
    if file_format not in ("parquet", "jsonl"):
        raise ValueError(f"format must be parquet or jsonl, got {file_format!r}")
    dest = await asyncio.to_thread(_new_dir, Path(dest))
    started = time.time()
    last = [0.0]

    def progress(rows: int, size: int) -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            say(f"received {rows:,} rows ({size / 2**20:.0f} MiB)")

    snap = await snapshot(client, {"kv", "alarms"}, namespace=namespace, timeout=timeout,
                          max_bytes=max_bytes, progress=progress, count_objects=True)
    say(f"received every slot's rows ({snap.bytes / 2**20:.0f} MiB); writing {file_format}")
    ext = "parquet" if file_format == "parquet" else "jsonl"
    # (zstd at level 1: files ~5% larger than at its default 3, written ~1 s sooner per 3M rows)
    options = ("FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1" if ext == "parquet"
               else "FORMAT json")

    def write() -> dict[str, int]:
        con = duckdb.connect(config={"threads": 2, "autoinstall_known_extensions": False,
                                     "autoload_known_extensions": False})
        try:
            views(con, snap.kv, snap.alarms)
            counts = {}
            for name, sql_text in (
                    ("kv", "SELECT namespace, object_id, object_name, key, value, updated_at "
                           "FROM kv"),
                    ("alarms", "SELECT namespace, object_id, object_name, scheduled_at "
                               "FROM alarms")):
                path = str(dest / f"{name}.{ext}").replace("'", "''")
                con.execute(f"COPY ({sql_text}) TO '{path}' ({options})")
                os.chmod(dest / f"{name}.{ext}", 0o600)
                counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
            counts["objects"] = (snap.objects if snap.objects is not None
                                 else _manifest_objects(con))
            return counts
        finally:
            con.close()

    counts = await asyncio.to_thread(write)
    if secret is not None:
        write_durably(dest / "secret", secret)
        os.chmod(dest / "secret", 0o600)
    manifest = {"format": EXPORT_FORMAT, "durable": __version__, "file_format": file_format,
                "created": started, "finished": time.time(), "namespace": namespace,
                "rows": counts["kv"], "objects": counts["objects"], "alarms": counts["alarms"],
                "files": [f"kv.{ext}", f"alarms.{ext}"] + (["secret"] if secret else []),
                "cut": {str(k): v for k, v in sorted(snap.cut.items())}}
    write_durably(dest / EXPORT_MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest
