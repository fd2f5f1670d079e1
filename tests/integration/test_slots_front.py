"""HTTP in the object processes (``[http] front = "slots"``) over the real daemon: each
connection is served by the process owning its first request's object, requests for that
slot are served in-process, the rest go straight to their slot's process (the peer path;
neither crosses the broker), and a killed slot loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import pytest

import durable
from durable.broker.ring import Ring
from tests.integration.cluster import broker_calls
from tests.integration.daemon import serving
from tests.integration.procs import free_port

CONFIG = """
slots = 2
grace_period = 5
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
front = "slots"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.CALLER]
class = "tests.integration.objects:Caller"
[namespaces.ROOM]
class = "tests.integration.objects:Room"
"""
RING = Ring(2)


@pytest.fixture
def daemon(tmp_path):
    """The daemon with the slots front, ready: (its handle, its HTTP base URL)."""
    port = free_port()
    with serving(tmp_path, CONFIG.format(port=port)) as d:
        d.wait_ready()
        yield d, f"http://127.0.0.1:{port}"


async def _handoffs(c: durable.Client, timeout: float = 5.0) -> tuple[int, int]:
    """Connections handed off and taken over, summed over the slots, once both counts (which
    the processes report with their heartbeats) agree and are not zero."""
    deadline = time.monotonic() + timeout
    while True:
        slots = (await c.statistics())["slots"]
        conns = [(s.get("reported") or {}).get("http_connections", {}) for s in slots]
        out = (sum(x.get("handed_off", 0) for x in conns),
               sum(x.get("taken_over", 0) for x in conns))
        if (out[0] and out[0] == out[1]) or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.1)


def _names(c: durable.Client, ns: str, slot: int, n: int, prefix: str) -> list[str]:
    """``n`` names whose objects live in ``slot``."""
    space = c.namespace(ns)
    out = [f"{prefix}{i}" for i in range(200)]
    return [x for x in out if RING.slot_for(str(space.id_from_name(x))) == slot][:n]


def test_connections_are_served_by_their_objects_process(daemon):
    d, base = daemon
    cmds = [" ".join(k.cmdline()) for k in d.children()]
    assert not any("durable.broker.gateway" in x for x in cmds)
    assert sum("durable.objectproc" in x and "--http-fd" in x for x in cmds) == 2

    async def main() -> None:
        async with durable.connect(d.frontend) as c:
            fresh = aiohttp.TCPConnector(force_close=True)  # a connection per request
            async with aiohttp.ClientSession(connector=fresh) as s:
                before = await broker_calls(c)
                for i in range(30):
                    async with s.post(f"{base}/COUNTER/n{i}/inc") as r:
                        assert (r.status, await r.text()) == (200, "1")
                # every request reached its object in the process that accepted it or
                # was handed its connection: none crossed the broker
                assert await broker_calls(c) == before
                moved, taken = await _handoffs(c)
                assert moved >= 1 and taken == moved, (moved, taken)

                # an object calling one of its own slot's objects: in-process too
                slot = RING.slot_for(str(c.namespace("CALLER").id_from_name("c")))
                same = _names(c, "COUNTER", slot, 1, "same")[0]
                other = _names(c, "COUNTER", 1 - slot, 1, "other")[0]
                before = await broker_calls(c)
                async with s.get(f"{base}/CALLER/c/?name={same}") as r:
                    assert (r.status, await r.text()) == (200, "via env: 1 None")
                assert await broker_calls(c) == before
                # and one of the other slot's: straight to that slot's process (the peer path)
                async with s.get(f"{base}/CALLER/c/?name={other}") as r:
                    assert (r.status, await r.text()) == (200, "via env: 1 None")
                assert await broker_calls(c) == before

                # routing errors as the gateway answers them
                async with s.get(f"{base}/NOPE/x/") as r:
                    assert r.status == 404 and "COUNTER" in await r.text()
                async with s.get(f"{base}/COUNTER/id/{'0' * 64}/") as r:
                    assert r.status == 400

            # one keep-alive connection naming objects of both slots, alternately: its
            # process serves its first object's slot, the other's requests go straight to the
            # other slot's process (the peer path), not by the broker
            a = _names(c, "COUNTER", 0, 1, "ka")[0]
            b = _names(c, "COUNTER", 1, 1, "kb")[0]
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                before = await broker_calls(c)
                for i in range(1, 6):
                    for name in (a, b):
                        async with s.post(f"{base}/COUNTER/{name}/inc") as r:
                            assert (r.status, await r.text()) == (200, str(i))
                assert await broker_calls(c) == before

            # WebSockets: the upgrade places the socket with its object; messages and
            # broadcasts flow in-process
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"{base}/ROOM/r1/?name=a") as w1, \
                        s.ws_connect(f"{base}/ROOM/r1/?name=b") as w2:
                    assert await w1.receive_str(timeout=5) == "welcome a"
                    assert await w2.receive_str(timeout=5) == "welcome b"
                    await w1.send_str("hi")
                    assert await w1.receive_str(timeout=5) == "echo:hi"
                    await w2.send_str("all:both")
                    assert await w1.receive_str(timeout=5) == "both"
                    assert await w2.receive_str(timeout=5) == "both"

    asyncio.run(main())


def _long_names(c: durable.Client, length: int) -> dict[int, str]:
    """A name of ``length`` characters whose object lives in each slot."""
    space, out = c.namespace("COUNTER"), {}
    for i in range(100):
        name = f"{i:03d}" + "L" * (length - 3)
        if len(name) <= 4096:
            out.setdefault(RING.slot_for(str(space.id_from_name(name))), name)
    return out


def test_names_at_the_wires_limit_reach_their_objects_from_either_slot(daemon):
    """A name of 4096 characters (the wire's limit) reaches its object whichever process
    reads the request; a longer one is refused at once, with 400 and the limit, by whichever
    process reads it (it used to reach its object when the reader owned it, and time out
    after 30 s, with no word in the log, when the call had to cross to the other slot)."""
    d, base = daemon

    async def main() -> None:
        async with durable.connect(d.frontend) as c:
            with pytest.raises(durable.InvalidIdError, match="at most 4096 characters"):
                c.namespace("COUNTER").id_from_name("x" * 4097)
            at_limit = _long_names(c, 4096)
            assert sorted(at_limit) == [0, 1]
            for reader in (0, 1):
                first = _names(c, "COUNTER", reader, 1, f"r{reader}-")[0]
                # one keep-alive connection, placed by its first request in `reader`'s process
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                    async with s.post(f"{base}/COUNTER/{first}/inc") as r:
                        assert (r.status, await r.text()) == (200, "1")
                    for owner, name in sorted(at_limit.items()):
                        async with s.post(f"{base}/COUNTER/{name}/inc") as r:
                            assert (r.status, await r.text()) == (200, str(reader + 1)), owner
                        t = time.monotonic()
                        async with s.post(f"{base}/COUNTER/{name}x/inc",
                                          timeout=aiohttp.ClientTimeout(total=10)) as r:
                            text = await r.text()
                        assert r.status == 400 and "at most 4096 characters" in text, text
                        assert time.monotonic() - t < 5

    asyncio.run(main())


def test_malformed_requests_get_400_and_an_info_line_not_an_error(daemon):
    """A request aiohttp cannot parse gets its 400 and one INFO line in the log: no ERROR and
    no traceback per bad request (a port scanner would fill ``journalctl -p err``)."""
    d, base = daemon
    port = int(base.rsplit(":", 1)[1])
    bad = [b"POST /COUNTER/a/inc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"zz\r\nabc\r\n0\r\n\r\n",
           b"GET /COUNTER/a\x00b/ HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET /COUNTER/a/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
           b"GET /COUNTER/a/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"]
    for i in range(8):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(bad[i % len(bad)])
            assert sock.recv(100).startswith(b"HTTP/1.0 400 Bad Request")
    deadline = time.monotonic() + 5
    while d.log_text().count("could not be parsed (answered 400)") < 4 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    text = d.log_text()
    assert text.count("could not be parsed (answered 400)") >= 4, text[-3000:]
    assert " ERROR " not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_a_killed_slot_loses_nothing_and_the_other_keeps_serving(daemon):
    d, base = daemon

    async def main() -> None:
        async with durable.connect(d.frontend) as c:
            names = {s: _names(c, "COUNTER", s, 4, f"k{s}-") for s in (0, 1)}
        acked = {n: 0 for ns in names.values() for n in ns}
        errors = []

        async def hammer(name: str, until: float) -> None:
            conn = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=conn) as s:
                while time.monotonic() < until:
                    try:
                        async with s.post(f"{base}/COUNTER/{name}/inc",
                                          timeout=aiohttp.ClientTimeout(total=10)) as r:
                            if r.status == 200:
                                acked[name] = int(await r.text())
                            else:
                                errors.append(r.status)
                    except aiohttp.ClientError as e:  # its connection died with slot 0
                        errors.append(type(e).__name__)
                    await asyncio.sleep(0.01)

        until = time.monotonic() + 4.0
        load = [asyncio.ensure_future(hammer(n, until)) for n in acked]
        await asyncio.sleep(1.0)
        os.kill(d.child("objectproc", 0).pid, signal.SIGKILL)
        survivor_before = {n: acked[n] for n in names[1]}
        await asyncio.gather(*load)
        assert all(acked[n] > survivor_before[n] for n in names[1]), (acked, errors)
        # slot 0 serves again, and no acknowledged increment was lost anywhere
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            for name, seen in acked.items():
                while True:
                    async with s.get(f"{base}/COUNTER/{name}/") as r:
                        if r.status == 200:
                            assert int(await r.text()) >= seen > 0, (name, seen)
                            break
                    assert time.monotonic() < deadline, f"{name} not served again"
                    await asyncio.sleep(0.2)

    asyncio.run(main())


@pytest.mark.slow
def test_a_process_that_registers_again_breaks_its_in_process_stubs(daemon):
    """SIGSTOP an object process past its heartbeats (not past hang_timeout): the broker ends
    its incarnation, the process registers again on SIGCONT, and what was bound in-process to
    the old incarnation ends as it would through the broker: its WebSockets close with 1012,
    and a cached stub's next call is refused undelivered (503) before a new stub serves."""
    d, base = daemon

    async def main() -> None:
        async with durable.connect(d.frontend) as c:
            counter = "x"
            slot = RING.slot_for(str(c.namespace("COUNTER").id_from_name(counter)))
            room = _names(c, "ROOM", slot, 1, "room")[0]
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                async with s.post(f"{base}/COUNTER/{counter}/inc") as r:
                    assert (r.status, await r.text()) == (200, "1")
                ws = await s.ws_connect(f"{base}/ROOM/{room}/?name=a")
                assert await ws.receive_str(timeout=5) == "welcome a"
                victim = d.child("objectproc", slot)
                expired = (await c.statistics())["broker"]["counters"].get(
                    "clients_expired", 0)
                victim.suspend()
                await asyncio.sleep(2.0)  # > 5 heartbeats of 0.2 s, < hang_timeout
                victim.resume()
                deadline = time.monotonic() + 10
                while (await c.statistics())["slots"][slot]["registrations"] < 2:
                    assert time.monotonic() < deadline, "the process did not register again"
                    await asyncio.sleep(0.1)
                # (its client kept its broker connection: only the incarnation changed)
                stats = await c.statistics()
                assert stats["broker"]["counters"].get("clients_expired", 0) == expired
                msg = await ws.receive(timeout=10)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1012, msg
                async with s.post(f"{base}/COUNTER/{counter}/inc") as r:
                    assert r.status == 503, await r.text()
                async with s.post(f"{base}/COUNTER/{counter}/inc") as r:
                    assert (r.status, await r.text()) == (200, "2")  # the 503 never ran

    asyncio.run(main())
