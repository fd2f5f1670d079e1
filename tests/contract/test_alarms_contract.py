"""Alarm storage semantics, on the engine and the model: set, replace, delete, transactions."""

import datetime as dt

import pytest

from durable.errors import StorageError

T = 1_900_000_000_000  # epoch ms, 2030


async def test_no_alarm_at_first(storage):
    assert await storage.get_alarm() is None


async def test_set_replace_delete(storage):
    await storage.set_alarm(T)
    assert await storage.get_alarm() == T
    await storage.set_alarm(T + 5)  # one alarm per object: replaced
    assert await storage.get_alarm() == T + 5
    await storage.delete_alarm()
    assert await storage.get_alarm() is None
    await storage.delete_alarm()  # deleting none is fine
    assert await storage.get_alarm() is None


async def test_times_as_aware_datetimes_and_float_milliseconds(storage):
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    await storage.set_alarm(when)
    assert await storage.get_alarm() == round(when.timestamp() * 1000)
    await storage.set_alarm(T + 0.6)  # Cloudflare takes milliseconds as a number
    assert await storage.get_alarm() == T + 1


async def test_a_time_in_the_past_is_kept_as_given(storage):
    await storage.set_alarm(1000)
    assert await storage.get_alarm() == 1000


@pytest.mark.parametrize("when, error", [
    (dt.datetime(2030, 1, 1), TypeError),  # naive: its zone would be a guess
    ("2030-01-01", TypeError), (True, TypeError), (None, TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (-1, ValueError), (10**14, ValueError),
])
async def test_bad_times_are_refused_and_change_nothing(storage, when, error):
    await storage.set_alarm(T)
    with pytest.raises(error):
        await storage.set_alarm(when)
    assert await storage.get_alarm() == T


async def test_delete_all_deletes_the_alarm_too(storage):
    # workerd from compatibility date 2026-02-24: deleteAll() deletes the alarm as well
    await storage.put("k", 1)
    await storage.set_alarm(T)
    await storage.delete_all()
    assert await storage.get_alarm() is None and await storage.get("k") is None


async def test_alarm_commits_or_rolls_back_with_a_transaction(storage):
    async def commit(txn):
        await txn.put("a", 1)
        await txn.set_alarm(T)
        assert await txn.get_alarm() == T  # reads see the transaction's own writes

    await storage.transaction(commit)
    assert await storage.get_alarm() == T

    async def rollback(txn):
        await txn.delete_alarm()
        assert await txn.get_alarm() is None
        txn.rollback()

    await storage.transaction(rollback)
    assert await storage.get_alarm() == T

    class Boom(Exception):
        pass

    async def raising(txn):
        await txn.set_alarm(T + 1)
        raise Boom()

    with pytest.raises(Boom):
        await storage.transaction(raising)
    assert await storage.get_alarm() == T


async def test_the_alarm_survives_a_reopen(backend):
    s = backend.object("persist")
    await s.set_alarm(T)
    await s.sync()
    await backend.reopen()
    assert await backend.object("persist").get_alarm() == T


async def test_alarms_are_per_object(backend):
    a, b = backend.object("a"), backend.object("b")
    await a.set_alarm(T)
    assert await b.get_alarm() is None
    await b.set_alarm(T + 1)
    assert (await a.get_alarm(), await b.get_alarm()) == (T, T + 1)


async def test_delete_all_inside_a_transaction_is_still_refused(storage):
    async def fn(txn):
        await txn.delete_all()

    with pytest.raises(StorageError):
        await storage.transaction(fn)
