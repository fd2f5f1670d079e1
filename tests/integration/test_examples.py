"""Every example, through the real daemon and its HTTP gateway."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.integration.daemon import serving
from tests.integration.procs import free_port
from tests.integration.test_gateway import request


def config(port, worker=False, top="", http=""):
    return f"""
slots = 2
{top}
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
{'worker = "durable.examples.worker:fetch"' if worker else ""}
{http}
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.CHAT]
class = "durable.examples.chat:ChatRoom"
[namespaces.LONGPOLL]
class = "durable.examples.longpoll:ChatRoom"
[namespaces.RATELIMIT]
class = "durable.examples.ratelimit:RateLimiter"
[namespaces.SESSION]
class = "durable.examples.session:Session"
[vars]
ratelimit_limit = 3
ratelimit_window = 60
"""


async def websocket_chat(s, url):
    """The WebSocket room: join, history, broadcast, leave, the page itself."""
    async with s.get(url) as r:
        assert r.status == 200 and "new WebSocket" in await r.text()
    ann = await s.ws_connect(url + "?name=ann")
    assert (await ann.receive_json(timeout=5)) == {"type": "history", "messages": []}
    assert (await ann.receive_json(timeout=5)) == {"type": "join", "name": "ann"}
    bob = await s.ws_connect(url + "?name=bob")
    assert (await bob.receive_json(timeout=5))["type"] == "history"
    assert (await ann.receive_json(timeout=5)) == {"type": "join", "name": "bob"}
    assert (await bob.receive_json(timeout=5)) == {"type": "join", "name": "bob"}
    await ann.send_str("hi bob")
    for ws in (ann, bob):
        m = await ws.receive_json(timeout=5)
        assert (m["type"], m["seq"], m["name"], m["text"]) == ("message", 1, "ann", "hi bob")
    await ann.send_str("ping")  # the gateway answers it
    assert (await ann.receive_str(timeout=5)) == "pong"
    await bob.close()
    assert (await ann.receive_json(timeout=5)) == {"type": "leave", "name": "bob"}
    carl = await s.ws_connect(url + "?name=carl")
    history = (await carl.receive_json(timeout=5))["messages"]
    assert [(m["name"], m["text"]) for m in history] == [("ann", "hi bob")]
    assert (await ann.receive_json(timeout=5)) == {"type": "join", "name": "carl"}
    await ann.close()
    await carl.close()


def test_counter_chat_and_rate_limiter_by_path(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port, top='log_format = "json"', http="access_log = true")) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                assert (await request(s, "POST", f"{base}/COUNTER/c/inc?by=5"))[:2] == (200, "5")
                await websocket_chat(s, f"{base}/CHAT/lobby/")
                # long-poll chat: a poll returns as soon as a message is posted
                poll = asyncio.ensure_future(s.get(f"{base}/LONGPOLL/lobby/messages?after=0&wait=10"))
                await asyncio.sleep(0.3)
                assert not poll.done()
                for i in range(5):
                    st, text, _ = await request(s, "POST", f"{base}/LONGPOLL/lobby/messages",
                                                json={"user": "ann", "text": f"hello {i}"})
                    assert st == 200, text
                async with await poll as r:
                    first = await r.json()
                assert first["messages"][0]["text"] == "hello 0"
                async with s.get(f"{base}/LONGPOLL/lobby/messages?after=0") as r:
                    everything = await r.json()
                assert [m["text"] for m in everything["messages"]] == [f"hello {i}" for i in range(5)]
                assert [m["seq"] for m in everything["messages"]] == [1, 2, 3, 4, 5]
                async with s.get(f"{base}/LONGPOLL/lobby/messages?after=3") as r:
                    assert [m["seq"] for m in (await r.json())["messages"]] == [4, 5]
                # rate limiter: 3 per window (env.vars), one object per key
                codes = [(await request(s, "POST", f"{base}/RATELIMIT/10.0.0.1/hit"))[0] for _ in range(5)]
                assert codes == [200, 200, 200, 429, 429]
                assert (await request(s, "POST", f"{base}/RATELIMIT/10.0.0.2/hit"))[0] == 200

        asyncio.run(main())
        # log_format = "json": every log line is one JSON object; the access log has each request
        records = [orjson.loads(line) for line in d.log_text().splitlines() if line.startswith("{")]
        assert {r["who"].split()[0] for r in records} >= {"supervisor", "broker", "objectproc"}
        assert any(r["logger"] == "durable.gateway.access" and
                   r["message"].startswith("POST /COUNTER/c/inc?by=5 200 1 ") and
                   " COUNTER/c " in r["message"] for r in records), records[-5:]
        assert not [line for line in d.log_text().splitlines()
                    if line.startswith(("INFO", "WARNING", "ERROR"))]  # nothing in text shape


def test_worker_routes_to_the_examples(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port, worker=True)) as d:
        d.wait_ready()
        # the banner's sample works with a Worker (its routes are its own)
        assert f"(try: curl http://127.0.0.1:{port}/)" in d.log_text()

        async def main():
            async with aiohttp.ClientSession() as s:
                assert (await request(s, "POST", f"{base}/counter/w"))[:2] == (200, "1")
                assert (await request(s, "GET", f"{base}/counter/w"))[:2] == (200, "1")
                async with s.get(f"{base}/chat/room") as r:  # the page
                    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
                hdr = {"X-Client": "bob"}  # joins are rate limited per client: 3 per window
                joined = [await s.ws_connect(f"{base}/chat/room?name=b{i}", headers=hdr)
                          for i in range(3)]
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(f"{base}/chat/room?name=b3", headers=hdr)
                assert e.value.status == 429
                await joined[0].receive_json(timeout=5)  # history
                await joined[0].send_str("through the worker")
                seen = [m async for m in _until(joined[2], "message")]
                assert seen[-1]["text"] == "through the worker"
                for ws in joined:
                    await ws.close()
                assert (await request(s, "GET", f"{base}/nowhere"))[0] == 404

        asyncio.run(main())


async def _until(ws, kind):
    while True:
        m = await ws.receive_json(timeout=5)
        yield m
        if m["type"] == kind:
            return


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
