"""Value codec: Python values <-> bytes, exact types kept, no code ever run.

This is the Python counterpart of the structured clone algorithm that the
original Durable Objects storage uses. orjson carries the JSON-shaped part;
everything JSON cannot say is written as a *tagged array*:

========================  ==========================================
Python value              encoded as (JSON)
========================  ==========================================
None, bool, str, float    themselves (non-finite float: ``["F", "nan"]``)
int                       itself within signed 64 bits, else ``["i", "123..."]``
dict with only str keys   a JSON object ``{"k": v}``
other dict                ``["d", k1, v1, k2, v2, ...]``
list / tuple              ``["l", ...]`` / ``["t", ...]``
set / frozenset           ``["s", ...]`` / ``["f", ...]``
bytes / bytearray         ``["b", base64]`` / ``["B", base64]``
Decimal                   ``["D", str(d)]`` (keeps the exponent: ``1.50`` stays ``1.50``)
UUID                      ``["u", hex]``
datetime                  ``["dt", y, mo, d, h, mi, s, us, fold, tz]``
date / time / timedelta   ``["da", y, m, d]`` / ``["tm", h, mi, s, us, fold, tz]`` / ``["td", d, s, us]``
a container seen before   ``["r", n]``: the n-th list, dict, set or bytearray
========================  ==========================================

Method calls on stubs (``encode_call`` and ``encode(value, rpc=True)``) also
carry what only makes sense in a call, never in storage:

========================  ==========================================
ObjectId                  ``["I", hex, name]``
Request                   ``["Rq", method, url, [[name, value], ...], base64 body]``
Response                  ``["Rs", status, [[name, value], ...], base64 body]``
========================  ==========================================

A JSON array is therefore always tagged, and a JSON object is always a dict
with str keys, so decoding is unambiguous. ``tz`` is ``null`` (naive),
``["o", days, seconds, microseconds, name]`` for a fixed offset
(``datetime.timezone``) or ``["z", key]`` for a ``zoneinfo.ZoneInfo``.

Only these exact types are accepted: a subclass (an ``IntEnum``, an
``OrderedDict``, a namedtuple) would come back as its base type, so it is
refused with a ``TypeError`` that names the type and where it sits, rather
than silently changed.

Shared references round-trip: a list, dict, set or bytearray that occurs
twice in one value is one object again after decoding (as with structured
clone). Cycles raise ``TypeError``: a value that contains itself cannot be
stored. Values may nest at most :data:`MAX_DEPTH` containers deep.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import math
import uuid
import zoneinfo
from typing import Any

import orjson

from .http import Request, Response
from .ids import ObjectId

__all__ = ["encode", "decode", "encode_call", "decode_call", "MAX_DEPTH", "MalformedValueError"]

#: How many containers deep a value may nest (orjson itself stops at 254 levels).
MAX_DEPTH = 200

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1


class MalformedValueError(ValueError):
    """Stored bytes are not something :func:`encode` produced."""


class _Unsupported(Exception):
    """Internal: carries the path to the offending part outwards."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _describe(path: list[str]) -> str:
    return "value" + "".join(reversed(path))


def encode(value: Any, *, rpc: bool = False) -> bytes:
    """Encode ``value``; raise ``TypeError`` naming the type and its place if unsupported.

    ``rpc``: also ObjectId, Request and Response (a method call's result).
    """
    t = type(value)
    # Fast paths for the scalars objects store most.
    if t is str or t is bool or value is None:
        try:
            return _exact(orjson.dumps(value))
        except orjson.JSONEncodeError:
            raise TypeError(
                "value is a str that is not valid Unicode (it holds a lone surrogate); "
                "storage keeps only text that can be written as UTF-8"
            ) from None
    if t is int and _I64_MIN <= value <= _I64_MAX:
        return _exact(orjson.dumps(value))
    enc = _RpcEncoder() if rpc else _Encoder()
    try:
        tree = enc.walk(value, 0)
    except _Unsupported as e:
        message = f"{e.message} at {_describe(e.path)}"
        raise TypeError(_rpc_message(message) if rpc else message) from None
    try:
        return _exact(orjson.dumps(tree))
    except orjson.JSONEncodeError as e:  # a str with a lone surrogate somewhere inside
        raise TypeError(f"value cannot be stored: {e}") from None


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """A method call's arguments as ``[["t", arg, ...], {name: arg}]``, references shared
    across them; ``TypeError`` names the argument (``argument 2``, ``argument 'by'``)."""
    if not args and not kwargs:
        return _NO_ARGUMENTS
    enc = _RpcEncoder()
    pos: list[Any] = ["t"]
    for i, arg in enumerate(args):
        pos.append(_argument(enc, arg, f"argument {i}"))
    named = {k: _argument(enc, v, f"argument {k!r}") for k, v in kwargs.items()}
    try:
        return orjson.dumps([pos, named])
    except orjson.JSONEncodeError as e:
        raise TypeError(f"the arguments cannot be sent: {e}") from None


def _argument(enc: _Encoder, value: Any, name: str) -> Any:
    try:
        return enc.walk(value, 0)
    except _Unsupported as e:
        where = "".join(reversed(e.path))
        raise TypeError(f"{name}{' ' + where if where else ''}: {_rpc_message(e.message)}") from None


def _rpc_message(message: str) -> str:
    return message.replace("cannot be stored", "cannot be sent").replace(
        "storage keeps exact types only", "calls keep exact types only").replace(
        "(storable: ", "(sendable: ObjectId, Request, Response, ")


_NO_ARGUMENTS = b'[["t"],{}]'


def decode_call(data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` that :func:`encode_call` wrote; MalformedValueError otherwise."""
    if data == _NO_ARGUMENTS:
        return (), {}
    try:
        tree = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedValueError(f"call arguments are not valid: {e}") from None
    if type(tree) is not list or len(tree) != 2 or type(tree[1]) is not dict or \
            type(tree[0]) is not list or tree[0][:1] != ["t"]:
        raise MalformedValueError("call arguments must be [[\"t\", ...], {...}]")
    dec = _RpcDecoder()
    try:
        args = tuple(dec.walk(a) for a in tree[0][1:])
        kwargs = {k: dec.walk(v) for k, v in tree[1].items()}
    except MalformedValueError:
        raise
    except _DECODE_ERRORS as e:
        raise MalformedValueError(f"call arguments are not valid: {type(e).__name__}: {e}") from None
    return args, kwargs


def _exact(data: bytes) -> bytes:
    """Copy a small orjson result into an exact-size object.

    orjson's result keeps its ~4 KiB working allocation (measured: 4.1 KB of
    RSS per ``dumps(1)``), and caches hold encoded values for as long as an
    activation lives, so a 3-byte value would cost 4 KiB.
    """
    return bytes(memoryview(data)) if len(data) < 2048 else data


def _tz(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is dt.timezone:
        off = tz.utcoffset(None)
        name = tz.tzname(None)
        # timezone(offset) without a name reports a generated name; keep only explicit names.
        default = dt.timezone(off).tzname(None)
        return ["o", off.days, off.seconds, off.microseconds, None if name == default else name]
    if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        return ["z", tz.key]
    raise _Unsupported(
        f"tzinfo of type {type(tz).__module__}.{type(tz).__qualname__} is not supported "
        "(use datetime.timezone or zoneinfo.ZoneInfo)"
    )


class _Encoder:
    __slots__ = ("seen", "active")

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.active: set[int] = set()

    def _ref(self, value: Any) -> list | None:
        """Number a mutable container; return a back-reference if it was seen."""
        i = id(value)
        n = self.seen.get(i)
        if n is None:
            self.seen[i] = len(self.seen)
            self.active.add(i)
            return None
        if i in self.active:
            raise _Unsupported(f"value contains itself (a cycle through a {type(value).__name__})")
        return ["r", n]

    def _items(self, tag: str, items: Any, depth: int) -> list:
        out: list[Any] = [tag]
        for i, item in enumerate(items):
            try:
                out.append(self.walk(item, depth))
            except _Unsupported as e:
                e.path.append(f"[{i}]")
                raise
        return out

    def walk(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is str or t is bool or v is None:
            return v
        if t is int:
            return v if _I64_MIN <= v <= _I64_MAX else ["i", str(v)]
        if t is float:
            if math.isfinite(v):
                return v
            return ["F", "nan" if v != v else ("inf" if v > 0 else "-inf")]
        if t in _CONTAINERS:
            depth += 1
            if depth > MAX_DEPTH:
                raise _Unsupported(f"value nests more than {MAX_DEPTH} containers deep")
            if t is tuple or t is frozenset:
                return self._items("t" if t is tuple else "f", v, depth)
            ref = self._ref(v)
            if ref is not None:
                return ref
            try:
                if t is list:
                    return self._items("l", v, depth)
                if t is dict:
                    return self._dict(v, depth)
                if t is set:
                    return self._items("s", v, depth)
                return ["B", base64.b64encode(v).decode("ascii")]  # bytearray
            finally:
                self.active.discard(id(v))
        if t is bytes:
            return ["b", base64.b64encode(v).decode("ascii")]
        if t is decimal.Decimal:
            return ["D", str(v)]
        if t is uuid.UUID:
            return ["u", v.hex]
        if t is dt.datetime:
            return ["dt", v.year, v.month, v.day, v.hour, v.minute, v.second,
                    v.microsecond, v.fold, _tz(v.tzinfo)]
        if t is dt.date:
            return ["da", v.year, v.month, v.day]
        if t is dt.time:
            return ["tm", v.hour, v.minute, v.second, v.microsecond, v.fold, _tz(v.tzinfo)]
        if t is dt.timedelta:
            return ["td", v.days, v.seconds, v.microseconds]
        raise _Unsupported(_unsupported_message(t))

    def _dict(self, v: dict, depth: int) -> Any:
        if all(type(k) is str for k in v):
            for item in v.values():  # flat and JSON-plain (the common case): orjson takes it as is
                t = type(item)
                if t is str or t is bool or item is None or (
                        t is int and _I64_MIN <= item <= _I64_MAX) or (
                        t is float and math.isfinite(item)):
                    continue
                break
            else:
                return v
            out: dict[str, Any] = {}
            for k, item in v.items():
                try:
                    out[k] = self.walk(item, depth)
                except _Unsupported as e:
                    e.path.append(f"[{k!r}]")
                    raise
            return out
        flat: list[Any] = ["d"]
        for k, item in v.items():
            try:
                flat.append(self.walk(k, depth))
            except _Unsupported as e:
                e.path.append(f"<key {k!r}>")
                raise
            try:
                flat.append(self.walk(item, depth))
            except _Unsupported as e:
                e.path.append(f"[{k!r}]")
                raise
        return flat


_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, bytearray})

_BASES = (bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset,
          dt.datetime, dt.date, dt.time, dt.timedelta, decimal.Decimal, uuid.UUID)


def _unsupported_message(t: type) -> str:
    name = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
    for base in _BASES:
        if issubclass(t, base):
            return (f"type {name} is a subclass of {base.__name__}; storage keeps exact types only, "
                    f"so convert it to a plain {base.__name__} first")
    return (f"type {name} cannot be stored (storable: None, bool, int, float, str, bytes, "
            "bytearray, list, tuple, dict, set, frozenset, datetime, date, time, timedelta, "
            "Decimal, UUID)")


_DECODE_ERRORS = (TypeError, ValueError, IndexError, KeyError, OverflowError, AttributeError,
                  RecursionError, binascii.Error, decimal.InvalidOperation,
                  zoneinfo.ZoneInfoNotFoundError)


def decode(data: bytes | bytearray | memoryview, *, rpc: bool = False) -> Any:
    """Decode bytes that :func:`encode` produced; raise :class:`MalformedValueError` otherwise."""
    try:
        tree = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedValueError(f"stored value is not valid: {e}") from None
    t = type(tree)
    if t is not list and t is not dict:
        return tree
    try:
        return (_RpcDecoder() if rpc else _Decoder()).walk(tree)
    except MalformedValueError:
        raise
    except _DECODE_ERRORS as e:
        raise MalformedValueError(f"stored value is not valid: {type(e).__name__}: {e}") from None


_STR_TAGS = frozenset({"b", "B", "i", "F", "D", "u"})


def _int_fields(fields: list, n: int) -> list[int]:
    if len(fields) != n or any(type(f) is not int for f in fields):
        raise MalformedValueError(f"expected {n} integers, got {fields!r}")
    return fields


def _untz(spec: Any) -> dt.tzinfo | None:
    if spec is None:
        return None
    if type(spec) is list and spec and spec[0] == "o" and len(spec) == 5:
        off = dt.timedelta(*_int_fields(spec[1:4], 3))
        return dt.timezone(off) if spec[4] is None else dt.timezone(off, spec[4])
    if type(spec) is list and len(spec) == 2 and spec[0] == "z" and type(spec[1]) is str:
        return zoneinfo.ZoneInfo(spec[1])
    raise MalformedValueError(f"bad tzinfo {spec!r}")


class _Decoder:
    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: list[Any] = []

    def walk(self, x: Any) -> Any:
        t = type(x)
        if t is dict:
            for v in x.values():  # flat: orjson's fresh dict is the value itself
                if type(v) is list or type(v) is dict:
                    break
            else:
                self.refs.append(x)
                return x
            out: dict[str, Any] = {}
            self.refs.append(out)
            for k, v in x.items():
                out[k] = self.walk(v)
            return out
        if t is not list:
            return x
        if not x or type(x[0]) is not str:
            raise MalformedValueError("array without a tag")
        tag = x[0]
        if tag == "l":
            lst: list[Any] = []
            self.refs.append(lst)
            lst.extend(self.walk(v) for v in x[1:])
            return lst
        if tag == "t":
            return tuple(self.walk(v) for v in x[1:])
        if tag == "d":
            d: dict[Any, Any] = {}
            self.refs.append(d)
            if len(x) % 2 != 1:
                raise MalformedValueError("dict with an odd number of items")
            for i in range(1, len(x), 2):
                d[self.walk(x[i])] = self.walk(x[i + 1])
            return d
        if tag == "s":
            s: set[Any] = set()
            self.refs.append(s)
            s.update(self.walk(v) for v in x[1:])
            return s
        if tag == "f":
            return frozenset(self.walk(v) for v in x[1:])
        if tag == "r":
            n = x[1]
            if len(x) != 2 or type(n) is not int or not 0 <= n < len(self.refs) or self.refs[n] is None:
                raise MalformedValueError(f"bad reference {x!r}")
            return self.refs[n]
        if tag in _STR_TAGS and (len(x) != 2 or type(x[1]) is not str):
            raise MalformedValueError(f"tag {tag!r} needs one string payload")
        if tag == "b":
            return base64.b64decode(x[1], validate=True)
        if tag == "B":
            ba = bytearray(base64.b64decode(x[1], validate=True))
            self.refs.append(ba)
            return ba
        if tag == "i":
            return int(x[1])
        if tag == "F":
            if x[1] not in ("nan", "inf", "-inf"):
                raise MalformedValueError(f"bad float {x[1]!r}")
            return float(x[1])
        if tag == "D":
            return decimal.Decimal(x[1])
        if tag == "u":
            return uuid.UUID(hex=x[1])
        if tag == "dt":
            if len(x) != 10:
                raise MalformedValueError("datetime needs 9 fields")
            f = _int_fields(x[1:9], 8)
            return dt.datetime(*f[:7], tzinfo=_untz(x[9]), fold=f[7])
        if tag == "da":
            return dt.date(*_int_fields(x[1:], 3))
        if tag == "td":
            return dt.timedelta(*_int_fields(x[1:], 3))
        if tag == "tm":
            if len(x) != 7:
                raise MalformedValueError("time needs 6 fields")
            f = _int_fields(x[1:6], 5)
            return dt.time(*f[:4], tzinfo=_untz(x[6]), fold=f[4])
        raise MalformedValueError(f"unknown tag {tag!r}")


# -- what a method call carries besides storable values ------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _RpcEncoder(_Encoder):
    __slots__ = ()

    def walk(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is ObjectId:
            return ["I", str(v), v.name]
        if t is Request:
            return ["Rq", v.method, v.url, v.headers.items(), _b64(v.body)]
        if t is Response:
            return ["Rs", v.status, v.headers.items(), _b64(v.body)]
        return super().walk(v, depth)


class _RpcDecoder(_Decoder):
    __slots__ = ()

    def walk(self, x: Any) -> Any:
        if type(x) is list and x and x[0] in ("I", "Rq", "Rs"):
            tag = x[0]
            if tag == "I" and len(x) == 3 and type(x[1]) is str and len(x[1]) == 64 and \
                    (x[2] is None or type(x[2]) is str):
                return ObjectId(x[1], x[2])
            if tag == "Rq" and len(x) == 5 and type(x[3]) is list and type(x[4]) is str:
                return Request(x[2], method=x[1], headers=[tuple(p) for p in x[3]],
                               body=base64.b64decode(x[4], validate=True))
            if tag == "Rs" and len(x) == 4 and type(x[2]) is list and type(x[3]) is str:
                return Response(base64.b64decode(x[3], validate=True), status=x[1],
                                headers=[tuple(p) for p in x[2]])
            raise MalformedValueError(f"bad {tag!r} value")
        return super().walk(x)
