"""Batches on the broker's links (PBATCH): a real broker and object processes, raw clients.

A client that says PBATCHES after HELLO, and an object process after READY, hear it back;
from then on the broker sends each of them what one drain made as batches. Anyone's batches
are read; a malformed one is dropped whole and counted.
"""

from __future__ import annotations

import asyncio
import contextlib

import zmq

import durable
from durable.http import Request
from durable.protocol.messages import (
    BATCH,
    TO_CLIENT,
    Call,
    Hello,
    PeerBatches,
    Ping,
    Pong,
    Welcome,
    encode_request,
    pack_batch,
    parse,
    unpack_batch,
)
from tests.integration.procs import async_wait_for
from tests.integration.test_peer_calls import name_on, recorded


def _receive(sock: zmq.Socket) -> tuple[list, bool]:
    """One ZeroMQ message's messages, parsed, and whether it was a batch."""
    frames = sock.recv_multipart()
    if frames[0] == BATCH:
        return [parse(m, TO_CLIENT) for m in unpack_batch(frames)], True
    return [parse(frames, TO_CLIENT)], False


def _raw_client(endpoint: str, batches: bool) -> zmq.Socket:
    """A DEALER that said HELLO (and PBATCHES), welcomed (and answered: the answers may come
    as one batch, the client having said it reads them)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    sock.send_multipart(Hello(1, "raw").encode())
    if batches:
        sock.send_multipart(PeerBatches().encode())
    heard: list = []
    while len(heard) < 1 + batches:
        heard += [type(m) for m in _receive(sock)[0]]
    assert heard == [Welcome, PeerBatches][:1 + batches]
    return sock


def _pings(sock: zmq.Socket, n: int) -> tuple[int, int]:
    """Send ``n`` PINGs as one batch: (messages, of them batches) until ``n`` PONGs came."""
    sock.send_multipart(pack_batch([Ping().encode() for _ in range(n)]))
    pongs = messages = batches = 0
    while pongs < n:
        msgs, batch = _receive(sock)
        messages += 1
        batches += batch
        assert all(type(m) is Pong for m in msgs)
        pongs += len(msgs)
    return messages, batches


async def test_a_client_gets_batches_only_once_it_said_it_reads_them(cluster):
    """The broker reads a batch of 50 PINGs from either client; the 50 PONGs go back as one
    batch to the client that said PBATCHES, one by one to the one that did not (an older
    release: it could not read them)."""
    def run() -> tuple[tuple[int, int], tuple[int, int]]:
        with contextlib.closing(_raw_client(cluster.frontend, True)) as new, \
                contextlib.closing(_raw_client(cluster.frontend, False)) as old:
            return _pings(new, 50), _pings(old, 50)

    batched, alone = await asyncio.to_thread(run)
    assert batched == (1, 1)
    assert alone == (50, 0)


async def test_a_malformed_batch_is_dropped_and_counted(client, cluster):
    def send() -> None:
        with contextlib.closing(_raw_client(cluster.frontend, True)) as sock:
            sock.send_multipart([BATCH, bytes([2]), b"\x01\x00\x00\x00", b"a"])  # (counts lie)
            assert _pings(sock, 3) == (1, 1)  # (and the client's next batch is read)

    await asyncio.to_thread(send)
    counters = (await client.statistics())["broker"]["counters"]
    assert counters["malformed_batches"] == 1
    assert counters["batches_received"] >= 1 and cluster.broker.poll() is None


async def test_calls_through_the_broker_go_as_batches_both_ways(client, cluster):
    """With every slot's process reading batches, 400 calls in flight through the broker
    (not the peer path) each run once, in each stub's order, and cross it as batches."""
    async def batching() -> bool:
        return all(s["batches"] for s in (await client.statistics())["slots"])
    await async_wait_for(batching, 10, "both slots to say they read batches")
    async with durable.connect(cluster.frontend, timeout=20, direct=False) as via_broker:
        assert via_broker.peers is None
        await async_wait_for(lambda: via_broker._sock.batches is True, 10,
                             "the broker to say it reads batches")
        stubs = [via_broker.namespace("COUNTER").get_by_name(f"batched-{i}") for i in range(40)]
        calls = [s.fetch("http://do/inc", method="POST") for _ in range(10) for s in stubs]
        answers = await asyncio.gather(*calls)
    texts = [await r.text() for r in answers]
    for i in range(40):  # (each stub's calls in its order: 1..10)
        assert [int(t) for t in texts[i::40]] == list(range(1, 11))
    counters = (await client.statistics())["broker"]["counters"]
    assert counters["batches_received"] >= 2, counters  # (from the client, from the slots)
    assert counters["batched_messages_sent"] >= counters["batches_sent"] * 2 > 0, counters


async def test_a_call_whose_client_is_gone_later_in_its_batch_never_runs(client, cluster):
    """A client's call and its HELLO again (it started over: its calls are given up) reach
    the broker as one batch, so the object process gets the call and the client's WGONE as
    one batch: the call is dropped, as when the WGONE is read ahead from the socket. Before
    the object process looked at a batch whole, the call ran."""
    name = name_on(client, "RECORDER", 1, "gone-in-batch-")
    recorder = client.namespace("RECORDER").get_by_name(name)
    await recorder.fetch("http://r/?n=1", method="POST")

    async def batching() -> bool:
        return all(s["batches"] for s in (await client.statistics())["slots"])
    await async_wait_for(batching, 10, "both slots to say they read batches")
    head, body = encode_request(Request("http://r/?n=2", method="POST"))

    def send() -> None:
        with contextlib.closing(_raw_client(cluster.frontend, True)) as sock:
            call = Call(1, 1, "RECORDER", str(recorder.id), 30_000, head, body)
            sock.send_multipart(pack_batch([call.encode(), Hello(1, "raw").encode()]))
            assert [type(m) for m in _receive(sock)[0]] == [Welcome]  # (the HELLO's)

    await asyncio.to_thread(send)

    async def dropped() -> bool:
        slot = (await client.statistics())["slots"][1]
        return slot["reported"].get("calls_of_gone_clients", 0) >= 1
    await async_wait_for(dropped, 10, "slot 1 to drop the gone client's call")
    await recorder.fetch("http://r/?n=3", method="POST")
    assert await recorded(client, name) == [1, 3]
