"""Call timeouts kept in deadline order, one timer for them all: every call still times out
at its own deadline, and only one that has not ended. Pure: a client that never connects,
its futures on a real event loop, short timeouts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from durable.client import Client
from durable.errors import CallTimeoutError


def _client(timeout: float) -> Client:
    return Client("ipc:///nonexistent/durable.sock", timeout=timeout)  # (never started)


def _stub(i: int) -> SimpleNamespace:
    return SimpleNamespace(namespace="C", id=f"object-{i}", _broken=None, _peer=None)


def _call(c: Client, timeout: float) -> tuple[int, asyncio.Future, asyncio.TimerHandle | None]:
    """What ``Client._call`` does around a call's timeout (sent, never answered)."""
    loop = asyncio.get_running_loop()
    call_id = next(c._call_ids)
    fut = loop.create_future()
    stub = _stub(call_id)
    c._pending[call_id] = (fut, stub)
    return call_id, fut, c._time_call(loop, call_id, fut, stub, timeout)


def _end(c: Client, call_id: int, timer: asyncio.TimerHandle | None) -> None:
    """What ``Client._call`` does when the call ended (answered, or timed out)."""
    if timer is None:
        c._untime_call(call_id)
    else:
        timer.cancel()
    c._pending.pop(call_id, None)


async def _expired_at(fut: asyncio.Future, started: float) -> float:
    with pytest.raises(CallTimeoutError, match="did not answer within"):
        await fut
    return asyncio.get_running_loop().time() - started


async def test_calls_with_the_clients_timeout_share_one_timer_and_each_expires_on_time():
    c = _client(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    calls = []
    for _ in range(50):
        calls.append(_call(c, c.timeout))
        await asyncio.sleep(0.002)
    assert all(timer is None for _, _, timer in calls)  # (no timer of their own)
    answered = calls[::2]  # every other call is answered before its deadline
    for call_id, fut, timer in answered:
        fut.set_result("ok")
        _end(c, call_id, timer)
    times = await asyncio.gather(*(_expired_at(fut, started) for _, fut, _ in calls[1::2]))
    for (call_id, _, timer), took, k in zip(calls[1::2], times, range(1, 50, 2), strict=True):
        _end(c, call_id, timer)
        sent_at = k * 0.002
        assert sent_at + 0.3 - 0.01 <= took <= sent_at + 0.3 + 0.15, (k, took)
    assert all(f.result() == "ok" for _, f, _ in answered)  # (never expired after they ended)
    assert c._deadlines == {}


async def test_a_shorter_timeout_after_a_longer_one_gets_its_own_timer():
    c = _client(5.0)
    loop = asyncio.get_running_loop()
    long_id, long_fut, long_timer = _call(c, 5.0)
    started = loop.time()
    short_id, short_fut, short_timer = _call(c, 0.1)
    assert long_timer is None and short_timer is not None
    took = await _expired_at(short_fut, started)
    assert 0.09 <= took <= 0.3
    assert not long_fut.done()
    _end(c, short_id, short_timer)
    long_fut.cancel()
    _end(c, long_id, long_timer)
    await c.close()


async def test_after_a_long_call_ended_a_shorter_one_is_not_held_to_its_timer():
    """The one timer waits for the long call's deadline; once that call ended, a later call
    with a nearer deadline must move the timer, not wait behind it."""
    c = _client(0.1)
    loop = asyncio.get_running_loop()
    long_id, long_fut, long_timer = _call(c, 30.0)
    assert long_timer is None
    long_fut.set_result("ok")
    _end(c, long_id, long_timer)
    started = loop.time()
    call_id, fut, timer = _call(c, 0.1)
    assert timer is None  # (in order again: the long one is gone)
    took = await _expired_at(fut, started)
    assert 0.09 <= took <= 0.3
    _end(c, call_id, timer)


async def test_close_leaves_no_timer_behind():
    c = _client(30.0)
    call_id, fut, timer = _call(c, 30.0)
    assert c._deadline_timer is not None
    await c.close()
    assert c._deadline_timer is None
    with pytest.raises(Exception, match="closed"):
        await fut
    _end(c, call_id, timer)
