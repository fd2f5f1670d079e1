"""Aggregates computed in each slot: the plan for ``durable sql`` queries that allow it.

Most queries run in the caller's DuckDB over every slot's rows (``durable.query``). A query
of this one shape is split instead, as a distributed engine splits an aggregate:

    SELECT <namespace | aggregate>, ... FROM kv [WHERE <expr>]
    [GROUP BY namespace | GROUP BY ALL] [ORDER BY <output column or position>, ...] [LIMIT n]

with aggregates ``count(*)``, ``count(x)``, ``sum(x)``, ``min(x)``, ``max(x)`` and
``count(DISTINCT object_id)``. Each slot runs the *partial* query over its own live rows
(``slot_sql``) and sends a row per group; the caller adds the slots' partials up
(``combine_sql``). Why this is exact:

* counts and sums add, minima and maxima take the least or greatest;
* a distinct count of ``object_id`` adds because an id lives in exactly one slot (the
  broker places by id alone), so no id is counted in two slots;
* groups are namespaces, so a slot's partial is a handful of rows, whatever the data.

Why so narrow: the partial query runs in the object process, on its storage's DuckDB,
which can reach files. So its SQL is not the user's text but DuckDB's own syntax tree of
it, checked node by node against a short list (columns of ``kv``, constants, casts,
comparisons, ``AND``/``OR``/``NOT``, ``CASE``, and scalar functions named below) and
turned back into SQL by DuckDB (``json_deserialize_sql``). Anything else, and every
query that reads ``object_name``, runs the general way. Grouping only by namespace keeps a
slot's memory for a query to one row per namespace (plus, for a distinct count, the set
of its own ids).

Pure logic: no sockets. The caller and the object process both call :func:`plan` on
the query text; the object process never runs anything it did not plan itself.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

__all__ = ["Plan", "plan", "parser", "syntax_tree", "SLOT_VIEW", "PARTIALS"]

#: The name the partial query reads (the slot lays it over its live rows) and the name of
#: the table of every slot's partial rows that the combining query reads.
SLOT_VIEW = "durable_slot_kv"
PARTIALS = "durable_partials"
_FINAL = "durable_final"

_COLUMNS = {"namespace", "object_id", "key", "value", "updated_at"}
_AGGREGATES = {"count_star", "count", "sum", "min", "max"}
# Scalar functions a filter or an aggregate's argument may use: pure, and none reads a file.
_FUNCTIONS = {
    "+", "-", "*", "/", "//", "%", "||", "->>", "~~", "!~~", "~~*", "!~~*",
    "json_extract", "json_extract_string", "json_extract_path", "json_extract_path_text",
    "json_type", "json_array_length", "json_exists", "json_value", "json_valid",
    "lower", "upper", "length", "strlen", "octet_length", "starts_with", "ends_with",
    "contains", "prefix", "suffix", "substring", "substr", "left", "right", "split_part",
    "concat", "replace", "trim", "ltrim", "rtrim", "regexp_matches", "regexp_extract",
    "abs", "round", "floor", "ceil", "greatest", "least", "nullif", "ifnull",
    "date_trunc", "date_part", "datepart", "extract", "epoch", "epoch_ms", "year", "month",
    "day", "hour", "minute", "second", "to_timestamp", "make_timestamp",
}
# JSON functions that read their first argument as JSON text: given ``value``, the slot
# hands them the stored text as it is (``durable_text``), which they parse anyway, and so
# skips the cast's own parse (the codec only writes valid JSON). Same answers, same types.
_JSON_READERS = {"->>", "json_extract", "json_extract_string", "json_extract_path",
                 "json_extract_path_text", "json_type", "json_array_length", "json_exists",
                 "json_value"}
_OPERATOR_TYPES = {"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN",
                   "COMPARE_NOT_IN", "OPERATOR_COALESCE"}


@dataclass(frozen=True)
class Plan:
    """``slot_sql`` reads :data:`SLOT_VIEW` and yields a row per group: ``g`` (the
    namespace, if grouped) then ``p0``, ``p1``, ...; ``combine`` says, per output column,
    how to fold those: ``("key", None)`` or ``(fold, "pN")`` with fold ``sum``/``min``/
    ``max``; ``final_sql`` orders and limits the folded rows (table ``durable_final``)."""

    slot_sql: str
    combine: list[tuple[str, str | None]]
    grouped: bool
    final_sql: str

    def combine_sql(self, names: list[str], types: list[str]) -> str:
        """The query over :data:`PARTIALS` that folds the slots' rows into the answer's
        columns, each named and typed as the query run the general way would give them."""
        items = []
        for (fold, part), name, typ in zip(self.combine, names, types, strict=True):
            expr = "g" if fold == "key" else f"{fold}({part})"
            items.append(f"CAST({expr} AS {typ}) AS {_quote(name)}")
        return (f"SELECT {', '.join(items)} FROM {PARTIALS}"
                + (" GROUP BY g" if self.grouped else ""))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_local = threading.local()


def parser() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB for parsing (opening one costs ~50 ms; it holds no
    data, and only parses and prints syntax trees)."""
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect()
    return con


def syntax_tree(query: str) -> dict[str, Any] | None:
    """DuckDB's syntax tree of ``query`` (``json_serialize_sql``), or None if it cannot say."""
    try:
        return orjson.loads(parser().execute(
            "SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchone()[0])
    except (duckdb.Error, orjson.JSONDecodeError, TypeError):
        return None


def _tree(query: str) -> dict[str, Any] | None:
    tree = syntax_tree(query)
    if tree is None or tree.get("error", True) or len(tree.get("statements", [])) != 1:
        return None
    return tree


def _sql(tree: dict[str, Any]) -> str | None:
    try:
        return parser().execute("SELECT json_deserialize_sql(?::JSON)",
                                [orjson.dumps(tree).decode()]).fetchone()[0]
    except duckdb.Error:
        return None


class _No(Exception):
    """Not of the shape that splits."""


def _column(node: dict[str, Any], table: set[str]) -> str:
    names = [str(n).lower() for n in node.get("column_names", [])]
    if len(names) == 2 and names[0] in table:
        names = names[1:]
    if len(names) != 1 or names[0] not in _COLUMNS:
        raise _No()
    return names[0]


def _scalar(node: Any, table: set[str]) -> None:
    """Raise unless ``node`` is an expression made only of allowed parts (no aggregate)."""
    if not isinstance(node, dict):
        raise _No()
    cls, kind = node.get("class"), node.get("type")
    if cls == "COLUMN_REF":
        _column(node, table)
        return
    if cls == "CONSTANT":
        return
    if cls == "CAST":
        if node.get("type_expr", {}).get("class") not in (None, "TYPE"):
            raise _No()
        _scalar(node["child"], table)
        return
    if cls == "COMPARISON":
        _scalar(node["left"], table)
        _scalar(node["right"], table)
        return
    if cls == "BETWEEN":
        for part in ("input", "lower", "upper"):
            _scalar(node[part], table)
        return
    if cls == "CONJUNCTION":
        for child in node["children"]:
            _scalar(child, table)
        return
    if cls == "OPERATOR" and kind in _OPERATOR_TYPES:
        for child in node["children"]:
            _scalar(child, table)
        return
    if cls == "CASE":
        for check in node["case_checks"]:
            _scalar(check["when_expr"], table)
            _scalar(check["then_expr"], table)
        _scalar(node["else_expr"], table)
        return
    if cls == "FUNCTION":
        if (node.get("function_name") not in _FUNCTIONS or node.get("schema")
                or node.get("catalog") or node.get("filter") is not None or node.get("distinct")
                or node.get("order_bys", {}).get("orders") or node.get("export_state")):
            raise _No()
        for arg in node.get("arguments", []):
            if arg.get("name"):
                raise _No()
            _scalar(arg["expression"], table)
        return
    raise _No()


def _aggregate(node: dict[str, Any], table: set[str], grouped_by_ns: bool
               ) -> tuple[dict[str, Any], str]:
    """The partial aggregate a slot runs for ``node``, and how the caller folds it."""
    name = node.get("function_name")
    if (name not in _AGGREGATES or node.get("schema") or node.get("catalog")
            or node.get("filter") is not None or node.get("order_bys", {}).get("orders")
            or node.get("export_state")):
        raise _No()
    args = [a["expression"] for a in node.get("arguments", []) if not a.get("name")]
    if len(args) != len(node.get("arguments", [])):
        raise _No()
    part = copy.deepcopy(node)
    if node.get("distinct"):
        # Only count(DISTINCT object_id): an id is in one slot only, so the counts add.
        if name != "count" or len(args) != 1 or args[0].get("class") != "COLUMN_REF" \
                or _column(args[0], table) != "object_id":
            raise _No()
        if grouped_by_ns:  # (within a namespace, an id is its stored object key: cheaper)
            part["arguments"][0]["expression"] = {
                "class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "",
                "column_names": ["durable_obj"]}
        return part, "sum"
    if name == "count_star":
        if args:
            raise _No()
        return part, "sum"
    if len(args) != 1:
        raise _No()
    _scalar(args[0], table)
    return part, "sum" if name in ("count", "sum") else name


def _text_values(node: Any, table: set[str]) -> None:
    """In the slot's copy: ``value`` read by a JSON function becomes ``durable_text``."""
    if isinstance(node, list):
        for child in node:
            _text_values(child, table)
        return
    if not isinstance(node, dict):
        return
    if node.get("class") == "FUNCTION" and node.get("function_name") in _JSON_READERS \
            and node.get("arguments"):
        first = node["arguments"][0]["expression"]
        if first.get("class") == "COLUMN_REF" and _column(first, table) == "value":
            node["arguments"][0]["expression"] = {
                "class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "",
                "column_names": ["durable_text"]}
    for child in node.values():
        if isinstance(child, dict | list):
            _text_values(child, table)


def _is_namespace(node: dict[str, Any], table: set[str]) -> bool:
    try:
        return node.get("class") == "COLUMN_REF" and _column(node, table) == "namespace"
    except _No:
        return False


def plan(query: str) -> Plan | None:
    """The split of ``query`` into per-slot partials and their fold, or None: it runs the
    general way (see the module doc for the shape that splits)."""
    tree = _tree(query)
    if tree is None:
        return None
    try:
        return _plan(tree)
    except (_No, KeyError, TypeError, AttributeError):
        return None


def _plan(tree: dict[str, Any]) -> Plan | None:
    node = tree["statements"][0]["node"]
    if node.get("type") != "SELECT_NODE" or node["cte_map"]["map"]:
        raise _No()
    if node.get("having") is not None or node.get("qualify") is not None \
            or node.get("sample") is not None:
        raise _No()
    src = node["from_table"]
    if (src.get("type") != "BASE_TABLE" or str(src.get("table_name")).lower() != "kv"
            or src.get("schema_name") or src.get("catalog_name") or src.get("sample")
            or src.get("at_clause") or src.get("column_name_alias")):
        raise _No()
    table = {"kv", str(src.get("alias") or "").lower()} - {""}
    mods = node["modifiers"]
    if any(m.get("type") not in ("ORDER_MODIFIER", "LIMIT_MODIFIER") for m in mods):
        raise _No()
    handling = node.get("aggregate_handling")
    groups = node["group_expressions"]
    if handling == "FORCE_AGGREGATES":  # GROUP BY ALL: the select's non-aggregates
        if groups:
            raise _No()
        grouped = any(_is_namespace(item, table) for item in node["select_list"])
    elif handling == "STANDARD_HANDLING":
        if len(groups) > 1 or any(not _is_namespace(g, table) for g in groups):
            raise _No()
        if groups and node["group_sets"] != [[0]]:
            raise _No()
        grouped = bool(groups)
    else:
        raise _No()
    if node.get("where_clause") is not None:
        _scalar(node["where_clause"], table)
    combine: list[tuple[str, str | None]] = []
    partial: list[dict[str, Any]] = []
    any_aggregate = False
    for item in node["select_list"]:
        if _is_namespace(item, table):
            if not grouped:
                raise _No()
            combine.append(("key", None))
            continue
        if item.get("class") != "FUNCTION":
            raise _No()
        part, fold = _aggregate(item, table, grouped)
        part["alias"] = f"p{len(partial)}"
        combine.append((fold, part["alias"]))
        partial.append(part)
        any_aggregate = True
    if not any_aggregate:
        raise _No()
    for mod in mods:
        if mod["type"] == "LIMIT_MODIFIER":
            if mod.get("offset") is not None or mod.get("limit_type") != "ROW_COUNT" \
                    or (mod.get("limit") or {}).get("class") != "CONSTANT":
                raise _No()
        else:
            for order in mod["orders"]:
                e = order["expression"]
                if e.get("class") == "COLUMN_REF" and len(e.get("column_names", [])) == 1:
                    continue  # (an output column by name: checked when the final query binds)
                if e.get("class") != "CONSTANT":
                    raise _No()
    slot = copy.deepcopy(tree)
    sn = slot["statements"][0]["node"]
    keys = ([{"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "g",
              "column_names": ["namespace"]}] if grouped else [])
    sn["select_list"] = keys + partial
    _text_values(sn["select_list"], table)
    _text_values(sn.get("where_clause"), table)
    sn["modifiers"] = []
    sn["from_table"]["table_name"] = SLOT_VIEW
    sn["from_table"]["qualified_name"] = {"path": [SLOT_VIEW]}
    if not sn["from_table"].get("alias"):
        sn["from_table"]["alias"] = "kv"
    if grouped:
        sn["aggregate_handling"] = "STANDARD_HANDLING"
        sn["group_expressions"] = [{"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "",
                                    "column_names": ["namespace"]}]
        sn["group_sets"] = [[0]]
    final = copy.deepcopy(tree)
    fn = final["statements"][0]["node"]
    fn["select_list"] = [{"class": "STAR", "type": "STAR", "alias": "", "relation_name": "",
                          "exclude_list": [], "replace_list": [], "columns": False,
                          "expr": None}]
    fn["from_table"] = {"type": "BASE_TABLE", "alias": "", "sample": None, "schema_name": "",
                        "table_name": _FINAL, "column_name_alias": [], "catalog_name": "",
                        "at_clause": None, "qualified_name": {"path": [_FINAL]}}
    fn["where_clause"] = None
    fn["group_expressions"], fn["group_sets"] = [], []
    fn["aggregate_handling"] = "STANDARD_HANDLING"
    slot_sql, final_sql = _sql(slot), _sql(final)
    if slot_sql is None or final_sql is None:
        raise _No()
    return Plan(slot_sql, combine, grouped, final_sql)
