"""WebSockets and streamed bodies through the HTTP gateway, with the real daemon (#15)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time

import aiohttp
import pytest

import durable
from durable.broker.ring import Ring
from tests.integration.cluster import all_slots_up
from tests.integration.daemon import serving
from tests.integration.procs import async_wait_for, free_port, wait_for


def config(port, extra_http="", extra=""):
    return f"""
slots = 2
grace_period = 5
idle_timeout = 0.5
{extra}
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
front = "gateways"  # (WebSockets with front = "slots": test_slots_front.py)
{extra_http}
[namespaces.ROOM]
class = "tests.integration.objects:Room"
[namespaces.STREAMER]
class = "tests.integration.objects:Streamer"
"""


async def closes(d, name):
    async with durable.connect(d.frontend, timeout=10) as c:
        return await c.namespace("ROOM").get_by_name(name).closes()


@pytest.mark.slow
def test_websockets_through_the_gateway(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port, extra_http="max_websockets = 4")) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                ann = await s.ws_connect(f"{base}/ROOM/g1/join?name=ann&tag=x")
                assert (await ann.receive_str(timeout=5)) == "welcome ann"
                await ann.send_str("hello")
                assert (await ann.receive_str(timeout=5)) == "echo:hello"
                await ann.send_bytes(b"xyz")
                assert (await ann.receive_bytes(timeout=5)) == b"zyx"
                bob = await s.ws_connect(f"{base}/ROOM/g1/join?name=bob")
                await bob.receive_str(timeout=5)
                await bob.send_str("all:hi")
                assert [await ann.receive_str(timeout=5), await bob.receive_str(timeout=5)] == ["hi"] * 2
                # the object closes one, with its code and reason
                await bob.send_str("close:4002")
                msg = await bob.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.CLOSE and (msg.data, msg.extra) == (4002, "bye")
                # the client closes the other: the object hears its code and reason
                await ann.close(code=4001, message=b"see you")
                await async_wait_for(lambda: closes(d, "g1"), 5, "the object heard the close")
                assert await closes(d, "g1") == [["ann", 4001, "see you", True]]
                # a message over 1 MiB: the gateway closes with 1009, the object hears why
                big = await s.ws_connect(f"{base}/ROOM/g2/join?name=big")
                await big.receive_str(timeout=5)
                await big.send_str("x" * ((1 << 20) + 10))
                msg = await big.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009
                await async_wait_for(lambda: closes(d, "g2"), 5, "the object heard it")
                assert (await closes(d, "g2"))[0][:2] == ["big", 1009]
                # auto-response: answered by the gateway
                r = await s.get(f"{base}/ROOM/g3/auto?req=hb&resp=ok")
                assert await r.text() == "set"
                hb = await s.ws_connect(f"{base}/ROOM/g3/join?name=hb")
                await hb.receive_str(timeout=5)
                await hb.send_str("hb")
                assert (await hb.receive_str(timeout=5)) == "ok"
                # refusals: not upgraded, a 101 to a plain GET, the per-process bound
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(f"{base}/ROOM/g4/refuse")
                assert e.value.status == 403
                r = await s.get(f"{base}/ROOM/g4/no-accept")
                assert r.status == 500
                socks = [await s.ws_connect(f"{base}/ROOM/g5/join?name=n{i}") for i in range(3)]
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:  # hb and 3 more: 4 open
                    await s.ws_connect(f"{base}/ROOM/g5/join?name=over")
                assert e.value.status == 503
                for ws in [hb, big, *socks]:
                    await ws.close()

        asyncio.run(main())


def _handshake(port: int, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect: a small window)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _masked_text(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@pytest.mark.slow
def test_a_browser_that_does_not_read_is_closed_with_1008(tmp_path):
    port = free_port()
    with serving(tmp_path, config(port, extra_http="websocket_max_buffer_kb = 256")) as d:
        d.wait_ready()
        sock = _handshake(port, "/ROOM/slow/join?name=slow")
        try:
            sock.sendall(_masked_text("flood:40000"))  # 40 MB to a reader that never reads
            found = wait_for(lambda: asyncio.run(closes(d, "slow")), 30, "the object heard the close")
            assert found[0][:2] == ["slow", 1008]
            assert "does not keep up" in d.log_text()
        finally:
            sock.close()


@pytest.mark.slow
def test_killing_processes_closes_sockets_as_documented(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port)) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                # SIGKILL of the object process: its sockets close with 1012
                ws = await s.ws_connect(f"{base}/ROOM/k1/join?name=ann")
                await ws.receive_str(timeout=5)
                async with durable.connect(d.frontend, timeout=10) as c:
                    oid = str(c.namespace("ROOM").id_from_name("k1"))
                proc = d.child("objectproc", Ring(2).slot_for(oid))
                started = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                msg = await ws.receive(timeout=10)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1012
                print(f"1012 after {time.monotonic() - started:.2f} s")
                async with durable.connect(d.frontend, timeout=10) as c:
                    await all_slots_up(c)  # the supervisor restarted it
                # SIGKILL of the gateway process: the browser's connection drops (1006), and
                # the object hears websocket_close(1006) once the supervisor sees the exit
                # (the gateway may not have heard of the restarted slot yet: 503, retry)
                ws = await _retry(lambda: s.ws_connect(f"{base}/ROOM/k2/join?name=bob"))
                await ws.receive_str(timeout=5)
                gateway = d.child("broker.gateway")
                os.kill(gateway.pid, signal.SIGKILL)
                msg = await ws.receive(timeout=10)
                assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR,
                                    aiohttp.WSMsgType.CLOSE)
                assert ws.close_code in (None, 1006)
                await async_wait_for(lambda: closes(d, "k2"), 10, "the object heard 1006")
                assert (await closes(d, "k2"))[0][:3] == ["bob", 1006, "the connection was lost"]
                ws = await _retry(lambda: s.ws_connect(f"{base}/ROOM/k2/join?name=carl"))
                assert (await ws.receive_str(timeout=5)) == "welcome carl"
                await ws.close()

        asyncio.run(main())


async def _retry(connect, timeout: float = 20.0):
    """Connect once the supervisor has restarted the gateway (or the slot: a 503 says to
    retry, seen in a CI-like run right after the slot's restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect()
        except aiohttp.WSServerHandshakeError as e:
            if e.status != 503 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.slow
def test_streamed_bodies_through_the_gateway(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port)) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                # Server-Sent Events, read as they come
                started = time.monotonic()
                async with s.get(f"{base}/STREAMER/s1/sse?n=4&delay=0.3") as r:
                    assert r.headers["content-type"] == "text/event-stream"
                    assert r.headers.get("transfer-encoding") == "chunked"
                    events, first = [], None
                    async for line in r.content:
                        if line.startswith(b"data: "):
                            first = first or time.monotonic() - started
                            events.append(line[6:].strip().decode())
                assert events == [f"event {i}" for i in range(4)]
                # the first event long before the last (0.9 s of sleeps between them)
                assert time.monotonic() - started - first > 0.7, first
                # a client that goes away cancels the producer
                async with s.get(f"{base}/STREAMER/s2/count?n=1000&delay=0.05") as r:
                    assert (await r.content.readline()) == b"chunk 0\n"
                async with durable.connect(d.frontend, timeout=10) as c:
                    stub = c.namespace("STREAMER").get_by_name("s2")

                    async def cancelled():
                        return await stub.cancellations() >= 1
                    await async_wait_for(cancelled, 10, "the producer was cancelled")
                # a producer that fails: the body is cut short
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with s.get(f"{base}/STREAMER/s3/fail?n=5") as r:
                        await r.read()

        asyncio.run(main())


@pytest.mark.slow
def test_a_stop_closes_sockets_with_1001_and_the_objects_hear_it(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, config(port)) as d:
        d.wait_ready()

        async def main():
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(f"{base}/ROOM/stop/join?name=ann")
                await ws.receive_str(timeout=5)
                d.proc.send_signal(signal.SIGTERM)
                msg = await ws.receive(timeout=15)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001

        asyncio.run(main())
        assert d.proc.wait(timeout=30) == 0
    with serving(tmp_path, config(port)) as d:  # the same data dir: what the room stored
        d.wait_ready()
        assert asyncio.run(closes(d, "stop")) == [["ann", 1001, "the gateway is going away", True]]
