"""The storage contract, pinned against workerd's behaviour; run on the engine and the model."""

import datetime as dt
import decimal
import uuid

import pytest

from durable.errors import (
    StorageError,
    StorageLimitError,
    TransactionClosedError,
)

# Code point order == UTF-8 byte order: what workerd's on-disk storage returns.
ORDERED_KEYS = ["", "\x00", "A", "Z", "a", "é", "\ue000", "\uffff", "😀", "\U0010ffff"]


async def test_missing_key_is_none(storage):
    assert await storage.get("nope") is None


async def test_put_get_roundtrip_exact_types(storage):
    value = {
        "t": (1, 2), "l": [1, (2,)], "s": {1, 2}, "fs": frozenset({"a"}), 1: "int key",
        (1, "x"): "tuple key", "big": 2**80, "neg": -(2**70), "b": b"\x00\xff",
        "ba": bytearray(b"ab"), "dec": decimal.Decimal("1.50"), "u": uuid.UUID(int=7),
        "naive": dt.datetime(2024, 2, 29, 12, 0), "aware": dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        "date": dt.date(2000, 1, 1), "time": dt.time(23, 59, 59, 999999), "td": dt.timedelta(-3),
        "f": 0.1, "none": None, "bool": True,
    }
    await storage.put("v", value)
    got = await storage.get("v")
    assert got == value
    assert type(got["t"]) is tuple and type(got["s"]) is set and type(got["fs"]) is frozenset
    assert str(got["dec"]) == "1.50"


async def test_empty_key_is_valid(storage):
    await storage.put("", "empty")
    assert await storage.get("") == "empty"
    assert await storage.list() == {"": "empty"}
    assert await storage.delete("") is True


async def test_list_and_multiget_order_by_utf8_bytes(storage):
    for i, k in enumerate(reversed(ORDERED_KEYS)):
        await storage.put(k, i)
    assert list(await storage.list()) == ORDERED_KEYS
    assert list(await storage.get(list(reversed(ORDERED_KEYS)))) == ORDERED_KEYS
    await storage.put({"\uff3a": 1, "\U0001d655": 2})
    keys = list(await storage.list(start="Z", end="a"))
    assert keys == ["Z"]
    allkeys = list(await storage.list())
    assert allkeys.index("Z") < allkeys.index("\uff3a") < allkeys.index("\U0001d655")


async def test_multiget_omits_missing_and_merges_duplicates(storage):
    await storage.put({"b": 2, "a": 1})
    assert await storage.get(["b", "zz", "a", "b"]) == {"a": 1, "b": 2}
    assert list(await storage.get(["b", "a"])) == ["a", "b"]


async def test_delete_single_and_multi_counts(storage):
    await storage.put({"a": 1, "b": 2, "c": 3})
    assert await storage.delete("a") is True
    assert await storage.delete("a") is False
    assert await storage.delete(["b", "b", "c", "missing"]) == 2
    assert await storage.list() == {}


async def test_list_start_inclusive_end_exclusive(storage):
    await storage.put({k: k for k in "abcde"})
    assert list(await storage.list(start="b", end="d")) == ["b", "c"]
    assert await storage.list(start="d", end="b") == {}
    assert await storage.list(start="c", end="c") == {}


async def test_list_prefix_reverse_limit(storage):
    await storage.put({"a1": 1, "a2": 2, "a3": 3, "b1": 4, "a": 0})
    assert list(await storage.list(prefix="a")) == ["a", "a1", "a2", "a3"]
    assert list(await storage.list(prefix="a", reverse=True, limit=2)) == ["a3", "a2"]
    assert list(await storage.list(reverse=True, limit=2)) == ["b1", "a3"]
    assert list(await storage.list(limit=2)) == ["a", "a1"]
    assert list(await storage.list(prefix="a", start="a2")) == ["a2", "a3"]
    assert list(await storage.list(prefix="b", end="b1")) == []


@pytest.mark.parametrize("limit", [0, -1, 1.5, "3", True])
async def test_list_limit_must_be_positive_int(storage, limit):
    with pytest.raises((TypeError, ValueError)):
        await storage.list(limit=limit)


@pytest.mark.parametrize("kwargs", [{"start": 1}, {"end": b"x"}, {"prefix": 3}, {"reverse": 1}])
async def test_list_rejects_bad_option_types(storage, kwargs):
    with pytest.raises(TypeError):
        await storage.list(**kwargs)


async def test_key_limit_names_sizes(storage):
    await storage.put("k" * 2048, 1)
    with pytest.raises(StorageLimitError, match="key is 2049 bytes; keys are limited to 2048 bytes"):
        await storage.put("k" * 2049, 1)
    with pytest.raises(StorageLimitError):
        await storage.get("é" * 1025)  # 2050 bytes of UTF-8
    assert isinstance(StorageLimitError("x"), ValueError)


async def test_value_limit_counts_the_value_not_its_encoding(storage):
    # Issue #12: 32,752 raw bytes used to be refused as "43680 bytes encoded" (base64).
    await storage.put("bytes", b"x" * 32768)
    await storage.put("str", "x" * 32768)  # its JSON quotes do not count either
    await storage.put("utf8", "é" * 16384)  # 32,768 bytes of UTF-8
    await storage.put("nested", {"blob": b"\0" * 30000, "n": 1})  # base64 growth discounted
    await storage.put("shared", [bytearray(16000)] * 2)  # stored once, counted once
    assert await storage.get("bytes") == b"x" * 32768
    assert (await storage.get("nested"))["blob"] == b"\0" * 30000
    for key, value, size in (("b2", b"x" * 32769, 32769), ("s2", "x" * 32769, 32769),
                             ("u2", "é" * 16385, 32770)):
        with pytest.raises(StorageLimitError, match=f"is {size} bytes; values are limited to "
                                                    "32768 bytes"):
            await storage.put(key, value)
        assert await storage.get(key) is None
    with pytest.raises(StorageLimitError):  # two different blobs: both count
        await storage.put("two", [b"\0" * 20000, b"\1" * 20000])


async def test_failing_multi_key_put_writes_nothing(storage):
    with pytest.raises(StorageLimitError):
        await storage.put({"a": 1, "b": "x" * 40000})
    with pytest.raises(TypeError):
        await storage.put({"a": 1, "b": object()})
    with pytest.raises(StorageLimitError, match="128"):
        await storage.put({f"k{i}": i for i in range(129)})
    assert await storage.list() == {}


async def test_multi_key_count_limits(storage):
    with pytest.raises(StorageLimitError):
        await storage.get([f"k{i}" for i in range(129)])
    with pytest.raises(StorageLimitError):
        await storage.delete([f"k{i}" for i in range(129)])
    assert await storage.get([f"k{i}" for i in range(128)]) == {}


async def test_bad_keys_and_values_raise_type_errors(storage):
    with pytest.raises(TypeError):
        await storage.put(1, "x")
    with pytest.raises(TypeError, match="cannot be stored"):
        await storage.put("k", object())
    with pytest.raises(TypeError):
        await storage.put("k")
    with pytest.raises(ValueError):
        await storage.put("\ud800", 1)


async def test_returned_values_are_copies(storage):
    await storage.put("l", [1])
    got = await storage.get("l")
    got.append(2)
    assert await storage.get("l") == [1]


async def test_transaction_reads_its_own_writes_and_commits(storage):
    await storage.put("n", 1)

    async def fn(txn):
        n = await txn.get("n")
        await txn.put("n", n + 1)
        assert await txn.get("n") == 2
        assert await txn.list() == {"n": 2}
        await txn.delete("n")
        assert await txn.get("n") is None
        await txn.put({"n": 10, "m": 20})
        return "result"

    assert await storage.transaction(fn) == "result"
    assert await storage.list() == {"m": 20, "n": 10}


async def test_transaction_exception_rolls_back_and_propagates(storage):
    await storage.put("a", 1)

    async def fn(txn):
        await txn.put("a", 2)
        await txn.put("b", 3)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await storage.transaction(fn)
    assert await storage.list() == {"a": 1}


async def test_transaction_caught_exception_still_commits(storage):
    async def fn(txn):
        await txn.put("a", 1)
        try:
            await txn.put("b", object())
        except TypeError:
            pass
        return 7

    assert await storage.transaction(fn) == 7
    assert await storage.list() == {"a": 1}


async def test_transaction_rollback_discards_and_closes(storage):
    kept = {}

    async def fn(txn):
        await txn.put("a", 1)
        txn.rollback()
        kept["txn"] = txn
        for op in (lambda: txn.get("a"), lambda: txn.put("a", 2), lambda: txn.delete("a"),
                   lambda: txn.list()):
            with pytest.raises(TransactionClosedError):  # (a write raises at the call)
                await op()
        with pytest.raises(TransactionClosedError):
            txn.rollback()
        return "rolled"

    assert await storage.transaction(fn) == "rolled"
    assert await storage.get("a") is None
    with pytest.raises(TransactionClosedError):
        await kept["txn"].get("a")


async def test_delete_all_inside_transaction_raises(storage):
    async def fn(txn):
        await txn.delete_all()

    with pytest.raises(StorageError):
        await storage.transaction(fn)


async def test_delete_all(storage, backend):
    await storage.put({"a": 1, "b": 2})
    await storage.delete_all()
    assert await storage.list() == {}
    await storage.put("c", 3)
    await storage.sync()
    await backend.reopen()
    fresh = backend.object()
    assert await fresh.list() == {"c": 3}
    assert await fresh.get("a") is None


async def test_objects_are_isolated(backend):
    a, b = backend.object("a"), backend.object("b")
    other_ns = backend.object("a", namespace="OTHER")
    await a.put("k", "a")
    await b.put("k", "b")
    await other_ns.put("k", "other")
    await a.delete_all()
    assert await a.get("k") is None
    assert await b.get("k") == "b"
    assert await other_ns.list() == {"k": "other"}


async def test_data_survives_reopen(backend):
    s = backend.object()
    await s.put({"x": (1, 2), "y": {"z": 3}})
    await s.delete("y")
    await s.sync()
    await backend.reopen()
    s2 = backend.object()
    assert await s2.list() == {"x": (1, 2)}


async def test_writes_made_without_await_are_made(backend):
    """As in workerd, where ``put()`` without ``await`` still writes (the output gate makes it
    durable before anything leaves). A Python coroutine that is never awaited never runs, so
    such writes were silently lost (with only a RuntimeWarning)."""
    import asyncio
    import warnings

    s = backend.object()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "coroutine ... was never awaited" either)
        s.put("a", 1)
        s.put({"b": 2, "c": 3})
        s.delete("c")
        s.set_alarm(1_900_000_000_000)
        assert await s.get(["a", "b", "c"]) == {"a": 1, "b": 2}
        assert await s.get_alarm() == 1_900_000_000_000
        with pytest.raises(StorageLimitError):  # bad input raises at the call
            s.put("k" * 3000, 1)
        # what each returns is awaitable as before, in a task or a gather too
        assert await s.delete("b") is True and await s.put("b", 5) is None
        assert await asyncio.gather(s.delete("b"), s.delete(["a", "zz"])) == [True, 1]
        assert await asyncio.create_task(s.delete("a")) is False

        async def fn(txn):
            txn.put("t", 1)
            txn.delete("zz")
            txn.set_alarm(1_900_000_000_001)
            return await txn.get("t")

        assert await s.transaction(fn) == 1
        s.delete_alarm()
        s.put("last", "x")
        await s.sync()
    await backend.reopen()
    s2 = backend.object()
    assert await s2.list() == {"last": "x", "t": 1}
    assert await s2.get_alarm() is None
