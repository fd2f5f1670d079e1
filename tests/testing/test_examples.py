"""The bundled examples' object logic, in-process with durable.testing (#16).

tests/integration/test_examples.py keeps what needs the real daemon: HTTP through
the gateway, the Worker, alarms across processes.
"""

from __future__ import annotations

import asyncio

import orjson

from durable.examples.chat import HISTORY, ChatRoom
from durable.examples.counter import Counter
from durable.examples.longpoll import ChatRoom as LongPollRoom
from durable.examples.ratelimit import RateLimiter
from durable.examples.session import Session


async def test_counter_by_method_and_by_http(durable_runtime):
    rt = await durable_runtime({"COUNTER": Counter})
    c = rt.namespace("COUNTER").get_by_name("c")
    assert await c.increment(by=2) == 2
    assert await (await c.fetch("http://do/inc?by=3", method="POST")).text() == "5"
    bad = await c.fetch("http://do/inc?by=abc", method="POST")
    assert bad.status == 400 and "by must be an integer" in await bad.text()
    assert await c.value() == 5


async def test_rate_limiter_window(durable_runtime):
    rt = await durable_runtime({"RATELIMIT": RateLimiter},
                               vars={"ratelimit_limit": 3, "ratelimit_window": 60})
    key = rt.namespace("RATELIMIT").get_by_name("10.0.0.1")
    verdicts = [(await key.hit())["allowed"] for _ in range(5)]
    assert verdicts == [True, True, True, False, False]
    assert (await key.hit(limit=10))["allowed"] is True  # a per-call limit
    other = rt.namespace("RATELIMIT").get_by_name("10.0.0.2")
    assert (await other.hit())["remaining"] == 2


async def test_session_ends_when_its_alarm_fires(durable_runtime):
    rt = await durable_runtime({"SESSION": Session})
    s = rt.namespace("SESSION").get_by_name("s")
    await s.touch({"user": "ann"}, ttl=30)
    assert await rt.advance(20) == 0
    await s.touch(ttl=60)  # used again: the end moves back (the object's own clock is real)
    assert await rt.advance(35) == 0 and (await s.get())["user"] == "ann"
    assert await rt.advance(10) == 1
    assert await s.get() is None


async def test_chat_room_keeps_the_last_100_messages(durable_runtime):
    rt = await durable_runtime({"CHAT": ChatRoom})
    room = rt.namespace("CHAT").get_by_name("lobby")
    async with room.websocket("/?name=ann") as ann:
        assert orjson.loads(await ann.receive(timeout=2)) == {"type": "history", "messages": []}
        await ann.receive(timeout=2)  # ann joined
        for i in range(HISTORY + 5):
            await ann.send(f"m{i}")
        last = [orjson.loads(await ann.receive(timeout=2)) for _ in range(HISTORY + 5)][-1]
        assert (last["seq"], last["text"]) == (HISTORY + 5, f"m{HISTORY + 4}")
        async with room.websocket("/?name=bob") as bob:
            history = orjson.loads(await bob.receive(timeout=2))["messages"]
            assert [m["seq"] for m in history] == list(range(6, HISTORY + 6))
            assert orjson.loads(await ann.receive(timeout=2)) == {"type": "join", "name": "bob"}
        assert orjson.loads(await ann.receive(timeout=2)) == {"type": "leave", "name": "bob"}
        await ann.send("ping")  # the auto-response answers it
        assert await ann.receive(timeout=2) == "pong"
    stored = await rt.storage_of(room)
    assert len([k for k in stored if k.startswith("msg:")]) == HISTORY


async def test_long_poll_room_answers_a_waiting_poll(durable_runtime):
    rt = await durable_runtime({"CHAT": LongPollRoom})
    room = rt.namespace("CHAT").get_by_name("r")
    poll = asyncio.ensure_future(room.fetch("http://do/messages?after=0&wait=10"))
    await asyncio.sleep(0.05)
    assert not poll.done()
    await room.fetch("http://do/messages", method="POST", body=b'{"user":"a","text":"hi"}')
    resp = await asyncio.wait_for(poll, 5)
    assert [m["text"] for m in (await resp.json())["messages"]] == ["hi"]
