"""send_frames / recv_frames / has_input over real zmq sockets (the hand-rolled fast paths)."""

import time

import pytest
import zmq

from durable.transport import has_input, recv_frames, send_frames


@pytest.fixture
def pair(tmp_path):
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(f"ipc://{tmp_path}/t.sock")
    dealer.setsockopt(zmq.IDENTITY, b"D")
    dealer.connect(f"ipc://{tmp_path}/t.sock")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


def wait_input(sock, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not has_input(sock):
        assert time.monotonic() < deadline, "no message arrived"
        time.sleep(0.001)


def test_messages_keep_their_frames_and_boundaries(pair):
    router, dealer = pair
    messages = [[b"one"], [b"", b"", b""], [b"a", b"x" * 70_000, b"z"], [bytes(range(256))] * 7]
    for m in messages:
        send_frames(dealer, m)
    got = []
    for _ in messages:
        wait_input(router)
        got.append(recv_frames(router))
    assert got == [[b"D", *m] for m in messages]
    assert not has_input(router)
    with pytest.raises(zmq.Again):
        recv_frames(router)


def test_router_send_to_an_unknown_peer_fails_whole(pair):
    router, dealer = pair
    with pytest.raises(zmq.ZMQError) as e:
        send_frames(router, [b"nobody", b"payload", b"more"])
    assert e.value.errno == zmq.EHOSTUNREACH
    send_frames(dealer, [b"hello"])  # the router learns the dealer's identity
    wait_input(router)
    assert recv_frames(router) == [b"D", b"hello"]
    send_frames(router, [b"D", b"reply", b"x" * 100_000])
    wait_input(dealer)
    assert recv_frames(dealer) == [b"reply", b"x" * 100_000]  # nothing of the failed send


def test_a_flood_of_input_does_not_hold_the_event_loop(pair):
    """100,000 replies took > 15 s to handle on a slow VM in one drain: the client's other
    connections sent no heartbeat meanwhile and the broker forgot them. Now the rest of the
    loop runs between slices of the drain (counted, not timed: the CPU may be shared)."""
    import asyncio

    from durable.transport import LoopSocket

    router, dealer = pair
    send_frames(dealer, [b"hello"])  # the router learns the dealer (else EHOSTUNREACH while
    wait_input(router)               # the connection is still being made: seen once)
    assert recv_frames(router) == [b"D", b"hello"]
    n = 900  # (under the pipe's high-water mark)
    for i in range(n):
        send_frames(router, [b"D", b"%d" % i])

    async def main() -> tuple[int, int]:
        handled = []

        def on_message(frames: list[bytes]) -> None:  # ~3 ms each: 2.7 s in all
            until = time.perf_counter() + 0.003
            while time.perf_counter() < until:
                pass
            handled.append(frames[0])

        loop = asyncio.get_running_loop()
        wait_input(dealer)
        sock = LoopSocket(dealer, on_message, loop)
        sock._check_input()
        turns_meanwhile = 0  # turns of another task while part of the backlog was handled
        while len(handled) < n:
            await asyncio.sleep(0)
            turns_meanwhile += 0 < len(handled) < n
        sock.loop.remove_reader(sock._fd)
        return len(handled), turns_meanwhile

    handled, turns = asyncio.run(main())
    assert handled == n
    assert turns >= 10, f"the loop turned {turns} times in a 2.7 s drain"  # (~54 slices)


def test_sends_wait_for_the_loops_other_ready_work_then_leave_together_in_order(pair):
    """LoopSocket.send: with nothing else ready on the loop, a message leaves at once (a
    lone call pays no extra turn); with other work ready, it queues and the turn's messages
    leave back to back after it, in order (they share ZMQ's wake-ups). A close in the same
    turn still sends what is queued."""
    import asyncio

    from durable.transport import LoopSocket

    router, dealer = pair

    async def main() -> list[list[bytes]]:
        ls = LoopSocket(dealer, lambda f: None)
        await asyncio.sleep(0)  # (the constructor's own input check has run)
        ls.send([b"alone"])
        assert ls.backlog == 0  # sent, not queued
        got = []
        wait_input(router)
        got.append(recv_frames(router))
        asyncio.get_running_loop().call_soon(lambda: None)  # other work is ready
        for i in range(3):
            ls.send([b"m%d" % i, b"x" * i])
        assert ls.backlog == 3 and not has_input(router)  # nothing left yet
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ls.backlog == 0
        for _ in range(3):
            wait_input(router)
            got.append(recv_frames(router))
        asyncio.get_running_loop().call_soon(lambda: None)
        ls.send([b"last"])
        assert ls.backlog == 1
        ls.close(linger=1000)  # (the queued message leaves before the socket closes)
        wait_input(router)
        got.append(recv_frames(router))
        with pytest.raises(zmq.ZMQError):
            ls.send([b"after close"])
        return got

    assert asyncio.run(main()) == [[b"D", b"alone"], [b"D", b"m0", b""], [b"D", b"m1", b"x"],
                                   [b"D", b"m2", b"xx"], [b"D", b"last"]]


def test_a_queued_send_to_a_gone_peer_goes_to_on_unreachable_and_the_rest_leave(pair):
    import asyncio

    from durable.transport import LoopSocket

    router, dealer = pair
    send_frames(dealer, [b"hello"])
    wait_input(router)
    recv_frames(router)

    async def main() -> list[list[bytes]]:
        gone: list[list[bytes]] = []
        ls = LoopSocket(router, lambda f: None, on_unreachable=gone.append)
        asyncio.get_running_loop().call_soon(lambda: None)  # (so that the sends queue)
        ls.send([b"D", b"one"])
        ls.send([b"nobody", b"lost"])
        ls.send([b"D", b"two"])
        assert ls.backlog == 3
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        got = []
        for _ in range(2):
            wait_input(dealer)
            got.append(recv_frames(dealer))
        assert gone == [[b"nobody", b"lost"]]
        return got

    assert asyncio.run(main()) == [[b"one"], [b"two"]]


def _hwm_pair(path, hwm: int) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    """A ROUTER and a DEALER over ipc whose queues hold ``hwm`` messages each way."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s, opt in ((router, zmq.RCVHWM), (dealer, zmq.SNDHWM)):
        s.setsockopt(opt, hwm)
    router.bind(f"ipc://{path}")
    dealer.connect(f"ipc://{path}")
    return ctx, router, dealer


def test_sends_the_peer_refuses_for_now_wait_and_leave_in_order(tmp_path):
    """Past the high-water mark ZMQ refuses a send (zmq.Again): the message and every later
    one wait in the backlog, retried by one timer, and reach a slow reader whole and in order."""
    import asyncio

    from durable.transport import LoopSocket

    ctx, router, dealer = _hwm_pair(tmp_path / "hwm.sock", 4)
    n, body = 300, b"x" * 65_536

    async def main() -> list[bytes]:
        ls = LoopSocket(dealer, lambda f: None)
        for i in range(n):
            ls.send([b"%d" % i, body])
        await asyncio.sleep(0.05)
        assert ls.backlog > 0  # (the reader has not read: the peer refused some)
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < n:
            assert time.monotonic() < deadline, f"{len(got)} of {n} arrived"
            while has_input(router):
                frames = recv_frames(router)
                assert frames[2] == body
                got.append(frames[1])
            await asyncio.sleep(0.002)
        assert ls.backlog == 0 and not ls._retry_due
        ls.close()
        return got

    try:
        assert asyncio.run(main()) == [b"%d" % i for i in range(n)]
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_a_turns_messages_to_a_peer_that_reads_batches_leave_as_one_and_arrive_as_each(pair):
    """A ROUTER's turn of answers: to a peer in ``batches``, one ZeroMQ message (one wake-up
    of each side's I/O thread instead of one per answer), to another one by one; a LoopSocket
    reading a batch hands on each message in order, and drops a malformed batch whole."""
    import asyncio
    import contextlib

    from durable.protocol.messages import BATCH, pack_batch
    from durable.transport import LoopSocket

    router, dealer = pair
    ctx = zmq.Context.instance()
    other = ctx.socket(zmq.DEALER)
    other.setsockopt(zmq.IDENTITY, b"O")
    other.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    for s in (dealer, other):
        send_frames(s, [b"hello"])
    for _ in range(2):
        wait_input(router)
        recv_frames(router)

    async def main() -> tuple[list[list[bytes]], list[list[bytes]], list[list[bytes]], int]:
        ls = LoopSocket(router, lambda f: None)
        ls.batches = {b"D"}
        asyncio.get_running_loop().call_soon(lambda: None)  # (so that the sends queue)
        for i in range(3):
            ls.send([b"D", b"a%d" % i, b"x" * i])
            ls.send([b"O", b"b%d" % i])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        raw_d, raw_o = [], []
        wait_input(dealer)
        while has_input(dealer):
            raw_d.append(recv_frames(dealer))
        for _ in range(3):
            wait_input(other)
            raw_o.append(recv_frames(other))
        # what a reading LoopSocket makes of a batch, and of a malformed one
        got: list[list[bytes]] = []
        places: list[int] = []  # (each message's place in its batch, as the reader tells it)
        three = asyncio.Event()

        def on_message(frames: list[bytes]) -> None:
            got.append(frames)
            places.append(reader.in_batch)
            if len(got) == 3:
                three.set()

        reader = LoopSocket(dealer, on_message)
        send_frames(router, [b"D", *pack_batch([[b"p"], [b"q", b"r"]])])
        send_frames(router, [b"D", BATCH, bytes([2, 2]), b"only", b"three", b"frames"])
        send_frames(router, [b"D", b"after"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(three.wait(), 5)
        assert places == [0, 1, 0] and reader.in_batch == 0
        return raw_d, raw_o, got, reader.malformed_batches

    try:
        raw_d, raw_o, got, malformed = asyncio.run(main())
    finally:
        other.close(0)
    assert raw_d == [pack_batch([[b"a0", b""], [b"a1", b"x"], [b"a2", b"xx"]])]
    assert raw_d[0][0] == BATCH and len(raw_d[0]) == 4
    assert raw_o == [[b"b0"], [b"b1"], [b"b2"]]
    assert got == [[b"p"], [b"q", b"r"], [b"after"]] and malformed == 1


def test_batches_the_peer_refuses_for_now_wait_and_arrive_whole_and_in_order(tmp_path):
    """Past the high-water mark with batches on: what ZeroMQ refused goes back to the
    backlog's front as it was, and every message reaches a slow reader once, in order."""
    import asyncio

    from durable.protocol.messages import BATCH, unpack_batch
    from durable.transport import LoopSocket

    ctx, router, dealer = _hwm_pair(tmp_path / "hwm-batch.sock", 2)
    n, body, big = 2000, b"x" * 60_000, b"y" * 70_000  # (a frame of 64 KiB leaves alone)

    async def main() -> tuple[list[bytes], int]:
        ls = LoopSocket(dealer, lambda f: None)
        ls.batches = True
        for turn in range(n // 50):  # (a turn's sends leave as batches; nobody reads yet)
            asyncio.get_running_loop().call_soon(lambda: None)
            for i in range(50):
                ls.send([b"%d" % (turn * 50 + i), big if i % 10 == 3 else body])
            await asyncio.sleep(0.001)
        assert ls.backlog > 0  # (the peer refused some: they wait, batched again later)
        batches = 0
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < n:
            assert time.monotonic() < deadline, f"{len(got)} of {n} arrived"
            while has_input(router):
                frames = recv_frames(router)[1:]
                batches += frames[0] == BATCH
                for m in unpack_batch(frames) if frames[0] == BATCH else [frames]:
                    assert m[1] == (big if int(m[0]) % 10 == 3 else body)
                    assert frames[0] != BATCH or m[1] != big  # (never in a batch)
                    got.append(m[0])
            await asyncio.sleep(0.002)
        assert ls.backlog == 0
        ls.close()
        return got, batches

    try:
        got, batches = asyncio.run(main())
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()
    assert got == [b"%d" % i for i in range(n)] and batches >= 1


def test_send_queued_sends_the_queue_at_once_and_the_turns_flush_finds_it_empty(pair):
    """LoopSocket.send_queued: what send queued leaves now, in order, not after the rest of
    the turn's ready work (the object process's replies, once a durable group woke their
    calls); the turn's flush then sends nothing twice."""
    import asyncio

    from durable.transport import LoopSocket

    router, dealer = pair

    async def main() -> list[list[bytes]]:
        ls = LoopSocket(dealer, lambda f: None)
        await asyncio.sleep(0)
        ls.send_queued()  # (nothing queued: nothing sent)
        asyncio.get_running_loop().call_soon(lambda: None)  # other work is ready
        ls.send([b"r1"])
        ls.send([b"r2"])
        assert ls.backlog == 2
        ls.send_queued()
        assert ls.backlog == 0
        got = []
        for _ in range(2):
            wait_input(router)
            got.append(recv_frames(router))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # (the turn's own flush has run)
        await asyncio.sleep(0.05)
        assert not has_input(router)
        ls.close(linger=0)
        return got

    assert asyncio.run(main()) == [[b"D", b"r1"], [b"D", b"r2"]]
