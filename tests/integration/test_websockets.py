"""WebSockets with hibernation and streamed bodies, through the Python client (#15).

Real broker and object processes; the gateway's side (browsers, aiohttp
clients, SSE, a gateway SIGKILL) is in test_websockets_http.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import durable
from durable.broker.ring import Ring
from tests.integration.cluster import all_slots_up, running_cluster, slot_seen_down
from tests.integration.conftest import connected
from tests.integration.procs import async_wait_for


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cluster for the tests that neither kill nor restart anything (each uses objects
    of its own): starting one per test was most of this file's time."""
    with running_cluster(tmp_path_factory.mktemp("ws"), slots=2) as c:
        yield c


@pytest.fixture
async def wclient(shared):
    async with connected(shared) as c:
        yield c


@pytest.fixture
def evicting(tmp_path):
    """Objects are evicted 0.4 s after their last call (hibernation shows quickly)."""
    with running_cluster(tmp_path, slots=2, idle_timeout=0.4) as c:
        yield c


@pytest.fixture
async def eclient(evicting):
    async with connected(evicting) as c:
        yield c


async def reported(client, figure: str) -> int:
    """A figure the object processes report (once a second), summed over the slots."""
    return sum(s["reported"].get(figure, 0) for s in (await client.statistics())["slots"])


async def evicted(client, before: int = 0) -> None:
    async def more() -> bool:
        return await reported(client, "evicted") > before and await reported(client, "active") == 0
    await async_wait_for(more, 10, "the room was evicted", interval=0.2)


async def test_messages_both_ways_tags_and_attachments(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r1")
    async with room.websocket("/join?name=ann&tag=a&tag=b") as ann, \
            room.websocket("/join?name=bob&tag=b") as bob:
        assert await ann.receive(timeout=5) == "welcome ann"  # sent before the 101: first
        assert await bob.receive(timeout=5) == "welcome bob"
        await ann.send("hello")
        assert await ann.receive(timeout=5) == "echo:hello"
        await ann.send(b"\x00\x01\x02")
        assert await ann.receive(timeout=5) == b"\x02\x01\x00"
        await bob.send("who")
        assert await bob.receive(timeout=5) == "bob"
        await ann.send("tags")
        assert await ann.receive(timeout=5) == "a,b"
        counts = [await (await room.fetch(f"http://x/count{q}")).text()
                  for q in ("", "?tag=a", "?tag=b", "?tag=c")]
        assert counts == ["2", "1", "2", "0"]
        await bob.send("all:hi everyone")
        assert [await ann.receive(timeout=5), await bob.receive(timeout=5)] == ["hi everyone"] * 2
        # many messages keep their order both ways
        for i in range(200):
            await ann.send(f"m{i}")
        assert [await ann.receive(timeout=5) for _ in range(200)] == [f"echo:m{i}" for i in range(200)]
    assert await room.stored("joined") == 2


async def test_close_from_either_side_with_codes_and_reasons(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r-close")
    ws = await room.websocket("/join?name=ann")
    assert await ws.receive(timeout=5) == "welcome ann"
    await ws.close(4001, "done here")
    await async_wait_for(room.closes, 5, "the object heard the close")
    assert await room.closes() == [["ann", 4001, "done here", True]]
    assert await (await room.fetch("http://x/count")).text() == "0"

    ws = await room.websocket("/join?name=bob")
    assert await ws.receive(timeout=5) == "welcome bob"
    await ws.send("close:4002")  # the object closes it
    assert [m async for m in ws] == []
    assert (ws.close_code, ws.close_reason) == (4002, "bye")
    assert await (await room.fetch("http://x/count")).text() == "0"
    assert len(await room.closes()) == 1  # no websocket_close for a close the object made
    with pytest.raises(durable.WebSocketError):
        await ws.send("after close")


async def test_an_object_opens_a_websocket_to_another(wclient):
    client = wclient
    caller = client.namespace("WSCALLER").get_by_name("c1")
    assert await caller.talk("r-obj") == ["welcome obj", "echo:from an object"]
    room = client.namespace("ROOM").get_by_name("r-obj")
    await async_wait_for(room.closes, 5, "the room heard the object's socket close")
    assert await room.closes() == [["obj", 1000, "", True]]


async def test_refused_and_wrong_upgrades(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r-refuse")
    with pytest.raises(durable.WebSocketError) as e:
        await room.websocket("/refuse")
    assert e.value.status == 403 and e.value.body == b"no"
    with pytest.raises(durable.ObjectError, match="not accepted"):
        await room.websocket("/no-accept")
    # a 101 to a plain request is the object's error, reported as such
    with pytest.raises(durable.ObjectError, match="not a WebSocket upgrade"):
        await room.fetch("http://x/no-accept")
    assert client._channels == {}  # nothing left behind


async def test_sends_wait_behind_the_output_gate(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r-gate")
    async with room.websocket("/join?name=ann") as ws:
        await ws.receive(timeout=5)
        await ws.send("put:v1")
        assert await ws.receive(timeout=5) == "stored"  # sent after the put was durable
        assert await room.stored("last") == "v1"


async def test_oversize_messages_are_refused_both_ways(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r-big")
    async with room.websocket("/join?name=ann") as ws:
        await ws.receive(timeout=5)
        with pytest.raises(ValueError, match="at most 1048576 bytes"):
            await ws.send("x" * ((1 << 20) + 1))
        await ws.send("big")  # the object's send of 2 MiB raises in the object: logged
        await ws.send("still here")
        assert await ws.receive(timeout=5) == "echo:still here"


async def test_a_reader_that_does_not_read_is_closed_with_1008(wclient):
    client = wclient
    room = client.namespace("ROOM").get_by_name("r-slow")
    ws = await room.websocket("/join?name=slow", max_buffered=256 << 10)
    await ws.send("flood:2000")  # 2,000 messages of 1 KiB, none read
    await async_wait_for(lambda: ws.closed, 10, "the socket closed")
    assert ws.close_code == 1008
    await async_wait_for(room.closes, 5, "the object heard the close")
    assert (await room.closes())[0][:2] == ["slow", 1008]


@pytest.mark.slow
async def test_hibernation_sockets_and_attachments_survive_eviction(eclient):
    room = eclient.namespace("ROOM").get_by_name("r-hib")
    async with room.websocket("/join?name=ann&tag=t") as ann, \
            room.websocket("/join?name=bob") as bob:
        await ann.receive(timeout=5)
        await bob.receive(timeout=5)
        await ann.send("constructed")
        assert await ann.receive(timeout=5) == "1"
        await evicted(eclient)
        await ann.send("constructed")  # the message activates it again: a new instance
        assert await ann.receive(timeout=5) == "2"
        await bob.send("who")  # the attachment outlived the instance
        assert await bob.receive(timeout=5) == "bob"
        assert await (await room.fetch("http://x/count?tag=t")).text() == "1"
        await bob.send("all:still together")
        assert [await ann.receive(timeout=5), await bob.receive(timeout=5)] == ["still together"] * 2


@pytest.mark.slow
async def test_auto_response_does_not_activate_the_object(eclient):
    room = eclient.namespace("ROOM").get_by_name("r-auto")
    async with room.websocket("/join?name=ann") as ws:
        await ws.receive(timeout=5)
        assert await (await room.fetch("http://x/auto?req=ping&resp=pong")).text() == "set"
        await evicted(eclient)
        await asyncio.sleep(1.2)  # (each process reports its figures once a second)
        calls = await reported(eclient, "calls")
        for _ in range(20):
            await ws.send("ping")
            assert await ws.receive(timeout=5) == "pong"
        await asyncio.sleep(1.2)
        assert await reported(eclient, "calls") == calls  # answered without reaching it
        assert await reported(eclient, "active") == 0
        await ws.send("pong?")
        assert await ws.receive(timeout=5) == "echo:pong?"


@pytest.mark.slow
async def test_sigkill_of_the_object_process_closes_its_sockets_with_1012(cluster, client):
    room = client.namespace("ROOM").get_by_name("r-kill")
    ws = await room.websocket("/join?name=ann")
    await ws.receive(timeout=5)
    slot = Ring(cluster.slots).slot_for(str(room.id))
    started = time.monotonic()
    os.kill(cluster.workers[slot].pid, signal.SIGKILL)
    await async_wait_for(lambda: ws.closed, 10, "the socket closed")
    assert ws.close_code == 1012
    print(f"closed {time.monotonic() - started:.2f} s after the SIGKILL")
    cluster.workers[slot].wait(timeout=10)
    await slot_seen_down(client, slot)
    cluster.start_worker(slot)
    await all_slots_up(client)
    room = client.namespace("ROOM").get_by_name("r-kill")  # a new stub, a new socket
    async with room.websocket("/join?name=bob") as ws2:
        assert await ws2.receive(timeout=5) == "welcome bob"


@pytest.mark.slow
async def test_a_broker_restart_closes_sockets_with_1012_and_tells_the_objects(cluster, client):
    room = client.namespace("ROOM").get_by_name("r-broker")
    ws = await room.websocket("/join?name=ann")
    await ws.receive(timeout=5)
    cluster.kill(cluster.broker)
    cluster.start_broker()
    await async_wait_for(lambda: ws.closed, 15, "the socket closed")
    assert ws.close_code == 1012
    await all_slots_up(client)

    async def closes() -> list:  # a new stub each try: the old ones broke with the broker, and
        # one made before this client has said HELLO to the new broker breaks when it does
        return await client.namespace("ROOM").get_by_name("r-broker").closes()

    heard = await async_wait_for(closes, 10, "the object heard it",
                                 ignore=(durable.StubBrokenError,))
    assert heard[0][:2] == ["ann", 1012]


async def test_closing_the_client_closes_its_sockets_in_the_objects(shared, wclient):
    client = wclient
    async with durable.connect(shared.frontend, timeout=10) as other:
        room = other.namespace("ROOM").get_by_name("r-leave")
        ws = await room.websocket("/join?name=ann")
        await ws.receive(timeout=5)
    observer = client.namespace("ROOM").get_by_name("r-leave")
    await async_wait_for(observer.closes, 5, "the object heard the client leave")
    assert (await observer.closes())[0][:2] == ["ann", 1001]


@pytest.mark.slow
async def test_a_thousand_sockets_join_broadcast_and_leave(wclient):
    client = wclient
    client.timeout = 60  # (200 joins at once on a CPU shared with other tests: > 10 s seen)
    room = client.namespace("ROOM").get_by_name("r-1000")
    sockets = []
    for start in range(0, 1000, 200):  # (1,000 at once would pass an object's 1,000-call bound)
        sockets += await asyncio.gather(*[room.websocket(f"/join?name=u{i}")
                                          for i in range(start, start + 200)])
    assert sorted([await ws.receive(timeout=60) for ws in sockets]) == sorted(
        f"welcome u{i}" for i in range(1000))
    assert await (await room.fetch("http://x/count")).text() == "1000"
    resp = await room.fetch("http://x/broadcast", method="POST", body="to all")
    assert await resp.text() == "sent"
    assert [await ws.receive(timeout=60) for ws in sockets] == ["to all"] * 1000
    await asyncio.gather(*[ws.close() for ws in sockets])
    # (while 1,000 closes wait their turn, a request may be told the object is busy)
    await async_wait_for(lambda: _count_is(room, "0"), 20, "every socket left",
                         ignore=(durable.OverloadedError,))
    await async_wait_for(lambda: _closes_are(room, 1000), 20, "every close was heard",
                         ignore=(durable.OverloadedError,))


async def _closes_are(room, n: int) -> bool:
    return len(await room.closes()) == n


async def _count_is(room, n: str) -> bool:
    return await (await room.fetch("http://x/count")).text() == n


# -- streamed bodies ------------------------------------------------------------------------
async def test_the_first_chunk_arrives_before_the_producer_finishes(wclient):
    client = wclient
    s = client.namespace("STREAMER").get_by_name("s1")
    started = time.monotonic()
    resp = await s.fetch("http://x/count?n=5&delay=0.3")
    assert resp.streaming and resp.status == 200
    times, chunks = [], []
    async for chunk in resp.iter_chunks():
        times.append(time.monotonic() - started)
        chunks.append(chunk)
    assert chunks == [f"chunk {i}\n".encode() for i in range(5)]
    # each chunk as it was made: the first came long before the last (1.2 s of sleeps between)
    assert times[-1] - times[0] > 0.9 and times[-1] > 1.1, times


async def test_a_large_stream_arrives_whole_and_in_order(wclient):
    client = wclient
    s = client.namespace("STREAMER").get_by_name("s2")
    resp = await s.fetch("http://x/big?n=40&size=300000")  # 12 MB: credit flows many times
    body = await resp.bytes()
    assert body == b"".join(bytes([i]) * 300000 for i in range(40))


async def test_a_failing_producer_fails_the_reader(wclient):
    client = wclient
    s = client.namespace("STREAMER").get_by_name("s3")
    resp = await s.fetch("http://x/fail?n=5")
    got = []
    with pytest.raises(durable.ObjectError, match="the producer broke"):
        async for chunk in resp.iter_chunks():
            got.append(chunk)
    assert got == [b"chunk 0\n", b"chunk 1\n"]


async def test_a_reader_that_stops_cancels_the_producer(wclient):
    client = wclient
    s = client.namespace("STREAMER").get_by_name("s4")
    resp = await s.fetch("http://x/count?n=1000&delay=0.05")
    chunks = resp.iter_chunks()
    assert await chunks.__anext__() == b"chunk 0\n"
    await chunks.aclose()
    await async_wait_for(lambda: _cancelled(s), 5, "the producer was cancelled")


async def _cancelled(s) -> bool:
    return await s.cancellations() >= 1


def test_sync_client_reads_a_streamed_body_whole(shared):
    with durable.connect_sync(shared.frontend, timeout=10) as c:
        resp = c.namespace("STREAMER").get_by_name("s5").fetch("http://x/count?n=3")
        assert resp.text() == "chunk 0\nchunk 1\nchunk 2\n"
