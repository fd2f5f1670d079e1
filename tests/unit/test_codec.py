"""Value codec: exact-type round trips, clear errors, decoding never runs code."""

import datetime as dt
import decimal
import enum
import os
import zoneinfo
from collections import OrderedDict, namedtuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable import codec
from durable.codec import MAX_DEPTH, MalformedValueError, decode, encode
from tests.budget import examples

timezones = st.one_of(
    st.none(),
    st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23)).map(dt.timezone),
    st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]).map(zoneinfo.ZoneInfo),
)
hashable_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 5, max_value=2**200),
    st.floats(allow_nan=False), st.text(), st.binary(max_size=50),
    st.decimals(allow_nan=False), st.uuids(), st.dates(),
    st.datetimes(timezones=timezones), st.times(timezones=timezones), st.timedeltas(),
)
scalars = st.one_of(hashable_scalars, st.binary(max_size=20).map(bytearray))
hashables = st.recursive(
    hashable_scalars,
    lambda c: st.one_of(st.tuples(c, c), st.frozensets(hashable_scalars, max_size=3)),
    max_leaves=8,
)
values = st.recursive(
    scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=5), st.lists(c, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5), c, max_size=4),
        st.dictionaries(hashables, c, max_size=4),
        st.sets(hashable_scalars, max_size=4), st.frozensets(hashable_scalars, max_size=4),
    ),
    max_leaves=30,
)


def same(a, b):
    """Equal, with the same exact types all the way down (NaN-free values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and \
            all(type(k1) is type(k2) for k1, k2 in zip(a, b, strict=True))
    if isinstance(a, decimal.Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.fold == b.fold and a.tzinfo == b.tzinfo
    return a == b


@settings(max_examples=examples(400))
@given(values)
def test_roundtrip_keeps_exact_types(v):
    assert same(decode(encode(v)), v)


@given(st.decimals(allow_nan=True, allow_infinity=True))
def test_decimal_keeps_exponent_and_specials(d):
    assert str(decode(encode(d))) == str(d)


@pytest.mark.parametrize("f", [float("inf"), float("-inf"), -0.0, 5e-324, 1e308])
def test_special_floats(f):
    got = decode(encode(f))
    assert got == f and str(got) == str(f)


def test_nan():
    got = decode(encode(float("nan")))
    assert got != got


@pytest.mark.parametrize("n", [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**100, -(10**100)])
def test_big_ints(n):
    assert decode(encode(n)) == n and type(decode(encode(n))) is int


def test_datetime_tz_and_fold():
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    for v in [dt.datetime(2021, 10, 31, 2, 30, tzinfo=paris, fold=1),
              dt.datetime(2021, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")),
              dt.datetime(2021, 1, 1), dt.time(1, 2, 3, tzinfo=dt.UTC)]:
        got = decode(encode(v))
        assert got == v and got.fold == v.fold and got.tzinfo == v.tzinfo
        assert got.tzname() == v.tzname()


def test_shared_references_round_trip_as_shared():
    inner = [1]
    d = {"x": 1}
    s = {1}
    got = decode(encode({"a": inner, "b": inner, "c": (d, d), "s": [s, s]}))
    assert got["a"] is got["b"]
    assert got["c"][0] is got["c"][1]
    assert got["s"][0] is got["s"][1]
    got["a"].append(2)
    assert got["b"] == [1, 2]


@pytest.mark.parametrize("make", [
    lambda: (lambda x: (x.append(x), x)[1])([]),
    lambda: (lambda d: (d.__setitem__("me", d), d)[1])({}),
    lambda: (lambda x: (x.append((x,)), x)[1])([]),
])
def test_cycles_raise_type_error(make):
    with pytest.raises(TypeError, match="contains itself"):
        encode(make())


Point = namedtuple("Point", "x y")


class Color(enum.IntEnum):
    RED = 1


class Thing:
    pass


@pytest.mark.parametrize("value, type_name, where", [
    ({"a": [1, Thing()]}, "Thing", "value['a'][1]"),
    ([Point(1, 2)], "Point", "value[0]"),
    ({"c": Color.RED}, "Color", "value['c']"),
    (OrderedDict(a=1), "OrderedDict", "value"),
    ({1: {2: (3, lambda: 0)}}, "function", "value[1][2][1]"),
    ({Thing(): 1}, "Thing", "value<key"),
    (dt.datetime(2020, 1, 1, tzinfo=dt.tzinfo()), "tzinfo", "value"),
])
def test_unsupported_values_name_type_and_place(value, type_name, where):
    with pytest.raises(TypeError) as e:
        encode(value)
    assert type_name in str(e.value) and where in str(e.value)


def test_lone_surrogate_raises_type_error():
    with pytest.raises(TypeError):
        encode("\ud800")
    with pytest.raises(TypeError):
        encode(["ok", "\udfff"])


def test_depth_limit():
    v = []
    for _ in range(MAX_DEPTH - 1):
        v = [v]
    assert decode(encode(v)) == v
    with pytest.raises(TypeError, match="nests more than"):
        encode([v])


@pytest.mark.parametrize("data", [
    b"", b"[", b'["zz", 1]', b"[1]", b"[]", b'["r", 0]', b'["r", "x"]', b'["d", 1]',
    b'["d", ["l"], 1]', b'["dt", 1]', b'["dt", 2020, 13, 1, 0, 0, 0, 0, 0, null]',
    b'["b", "!!"]', b'["u", "nothex"]', b'["D", "x"]', b'["F", "1.0"]', b'["i", 5]',
    b'["z"]', b'["tm", 1, 2, 3, 4, 0, ["q"]]', b'["td", "a", 0, 0]',
    b'["dt", 2020, 1, 1, 0, 0, 0, 0, 0, ["z", "No/Such_Zone"]]', b'{"a": ["s", ["l"]]}',
])
def test_malformed_input_raises_malformed_value_error(data):
    with pytest.raises(MalformedValueError):
        decode(data)


@pytest.mark.slow  # (2,000 examples, ~5 s; the full suite runs it)
@settings(max_examples=int(os.environ.get("DURABLE_FUZZ_EXAMPLES", examples(2000))))
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=5),
              st.sampled_from(["l", "t", "d", "s", "f", "b", "B", "i", "F", "D", "u", "dt", "da", "tm", "td", "r"])),
    lambda c: st.one_of(st.lists(c, max_size=6), st.dictionaries(st.text(max_size=3), c, max_size=3)),
    max_leaves=20))
def test_decoder_never_fails_other_than_malformed(tree):
    try:
        decode(orjson.dumps(tree))
    except MalformedValueError:
        pass


@given(st.binary(max_size=64))
def test_decoder_on_random_bytes(data):
    try:
        decode(data)
    except MalformedValueError:
        pass


def test_decoding_is_data_only():
    """Nothing in the format names code: the tags are a closed set of data types."""
    assert "pickle" not in open(codec.__file__).read().replace("no pickle", "")
