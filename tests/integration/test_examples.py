"""Every example, through the real daemon and its HTTP gateway."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.integration.daemon import serving
from tests.integration.procs import free_port
from tests.integration.test_gateway import request


def config(port, worker=False):
    return f"""
slots = 2
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
{'worker = "durable.examples.worker:fetch"' if worker else ""}
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.CHAT]
class = "durable.examples.chat:ChatRoom"
[namespaces.RATELIMIT]
class = "durable.examples.ratelimit:RateLimiter"
[namespaces.SESSION]
class = "durable.examples.session:Session"
[vars]
ratelimit_limit = 3
ratelimit_window = 60
"""


def test_counter_chat_and_rate_limiter_by_path(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port)) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                assert (await request(s, "POST", f"{base}/COUNTER/c/inc?by=5"))[:2] == (200, "5")
                # chat: a long poll returns as soon as a message is posted
                poll = asyncio.ensure_future(s.get(f"{base}/CHAT/lobby/messages?after=0&wait=10"))
                await asyncio.sleep(0.3)
                assert not poll.done()
                for i in range(5):
                    st, text, _ = await request(s, "POST", f"{base}/CHAT/lobby/messages",
                                                json={"user": "ann", "text": f"hello {i}"})
                    assert st == 200, text
                async with await poll as r:
                    first = await r.json()
                assert first["messages"][0]["text"] == "hello 0"
                async with s.get(f"{base}/CHAT/lobby/messages?after=0") as r:
                    everything = await r.json()
                assert [m["text"] for m in everything["messages"]] == [f"hello {i}" for i in range(5)]
                assert [m["seq"] for m in everything["messages"]] == [1, 2, 3, 4, 5]
                async with s.get(f"{base}/CHAT/lobby/messages?after=3") as r:
                    assert [m["seq"] for m in (await r.json())["messages"]] == [4, 5]
                # rate limiter: 3 per window (env.vars), one object per key
                codes = [(await request(s, "POST", f"{base}/RATELIMIT/10.0.0.1/hit"))[0] for _ in range(5)]
                assert codes == [200, 200, 200, 429, 429]
                assert (await request(s, "POST", f"{base}/RATELIMIT/10.0.0.2/hit"))[0] == 200

        asyncio.run(main())


def test_worker_routes_to_the_examples(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port, worker=True)) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                assert (await request(s, "POST", f"{base}/counter/w"))[:2] == (200, "1")
                assert (await request(s, "GET", f"{base}/counter/w"))[:2] == (200, "1")
                hdr = {"X-Client": "bob"}
                codes = []
                for i in range(5):
                    codes.append((await request(s, "POST", f"{base}/chat/room", headers=hdr,
                                                json={"user": "bob", "text": f"m{i}"}))[0])
                assert codes == [200, 200, 200, 429, 429]
                async with s.get(f"{base}/chat/room?after=1") as r:
                    assert [m["text"] for m in (await r.json())["messages"]] == ["m1", "m2"]
                assert (await request(s, "GET", f"{base}/nowhere"))[0] == 404

        asyncio.run(main())


@pytest.mark.slow
def test_a_session_ends_by_itself_when_its_alarm_fires(tmp_path):
    import time

    import durable

    with serving(tmp_path, config(free_port())) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("SESSION")
            kept, ending = ns.get_by_name("kept"), ns.get_by_name("ending")
            kept.touch({"user": "ann"}, ttl=60)
            started = time.time()
            assert ending.touch({"user": "bob"}, ttl=0.6)["user"] == "bob"
            assert ending.get()["user"] == "bob"
            assert abs(ending.expires_at() - (started + 0.6)) < 0.5
            deadline = time.monotonic() + 10
            while ending.get() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ending.get() is None and ending.expires_at() is None
            assert time.time() - started >= 0.6  # not before its time
            assert kept.get()["user"] == "ann"  # the other session is untouched
