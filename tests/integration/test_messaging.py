"""End to end over real processes and sockets: broker + object processes + client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time

import pytest
import zmq

import durable
from durable.broker.ring import Ring
from durable.errors import InvalidIdError, ObjectError, StubBrokenError, UnknownNamespaceError
from durable.ids import ObjectId
from durable.protocol.messages import VERSION, Cmd, header, pack_u64
from tests.integration.cluster import all_slots_up
from tests.integration.procs import async_wait_for, wait_for


def stub(client, ns, name):
    n = client.namespace(ns)
    return n.get(n.id_from_name(name))


async def test_300_unawaited_calls_on_one_stub_arrive_and_complete_in_order(client):
    s = stub(client, "RECORDER", "order")
    done: list[int] = []

    async def call(i):
        await s.fetch(f"http://do/?n={i}", method="POST")
        done.append(i)

    await asyncio.gather(*[asyncio.ensure_future(call(i)) for i in range(300)])
    assert await (await s.fetch("http://do/")).json() == list(range(300))  # arrival order
    assert done == list(range(300))  # completion order at the caller


async def test_interleaving_calls_still_arrive_in_order(client):
    """Handlers that suspend may finish out of order (as in workerd), but start in order."""
    s = stub(client, "RECORDER", "interleave")
    await asyncio.gather(*[s.fetch(f"http://do/?n={i}&yield=1", method="POST") for i in range(300)])
    assert await (await s.fetch("http://do/")).json() == list(range(300))


async def test_50_objects_x_10_concurrent_increments(client):
    stubs = [stub(client, "COUNTER", f"c{i}") for i in range(50)]
    await asyncio.gather(*[s.fetch("http://do/inc", method="POST") for s in stubs for _ in range(10)])
    values = await asyncio.gather(*[s.fetch("http://do/") for s in stubs])
    assert [await v.text() for v in values] == ["10"] * 50


async def test_a_timeout_the_wire_cannot_carry_is_refused_before_the_call_is_sent(client):
    """NaN and infinity failed with bare conversion errors (a str with "Integer exceeds 64-bit
    range") and left the call registered; 3,000,000 s (over the CALL's 2**31 ms) made the
    broker drop the call as malformed, so it waited out its whole timeout."""
    s = stub(client, "COUNTER", "timeouts")
    for bad, error, match in [(float("nan"), ValueError, "more than 0"),
                              (float("inf"), ValueError, "at most 2,147,483 seconds"),
                              (3e6, ValueError, "at most 2,147,483 seconds"),
                              (0, ValueError, "more than 0"), (-1, ValueError, "more than 0"),
                              ("10", TypeError, "number of seconds, not str"),
                              (True, TypeError, "not bool")]:
        with pytest.raises(error, match=match):
            await s.fetch("http://do/inc", method="POST", timeout=bad)
    assert client._pending == {}
    # a call that fails while it is being sent leaves nothing waiting (a name no message can
    # carry, given to an ObjectId by hand: id_from_name refuses it)
    forged = client.namespace("COUNTER").get(ObjectId(str(s.id), "\udcff"))
    with pytest.raises(TypeError, match="UTF-8"):
        await forged.fetch("http://do/inc", method="POST", timeout=5)
    assert client._pending == {}
    for ok in (2_147_483, 0.5, 30):  # the longest the wire carries, and ordinary ones
        assert await (await s.fetch("http://do/inc", method="POST", timeout=ok)).text() in "123"
    with pytest.raises(ValueError, match="at most 2,147,483"):
        durable.Client("ipc:///nowhere", timeout=1e7)


async def test_exception_in_fetch_reaches_caller_and_stub_stays_usable(client):
    s = stub(client, "FAILING", "f")
    with pytest.raises(ObjectError) as e:
        await s.fetch("http://do/?v=first", method="POST")
    assert e.value.remote_type == "ValueError"
    assert "boom: first" in str(e.value)
    resp = await s.fetch("http://do/")  # same stub, still usable
    assert await resp.json() == "first"  # the write before the raise persisted


async def test_bodies_small_and_large_cross_both_hops_intact(client):
    s = stub(client, "NOOP", "echo")
    sizes = [0, 1, 65535, 65536, 65537, 3 << 20]  # around pyzmq's zero-copy threshold, and big
    bodies = [os.urandom(n) for n in sizes]
    resps = await asyncio.gather(*[s.fetch("http://do/", method="PUT", body=b) for b in bodies])
    for body, resp in zip(bodies, resps, strict=True):
        assert resp.headers.get("x-len") == str(len(body))
        assert await resp.bytes() == body


async def test_a_call_or_an_answer_too_big_for_a_socket_fails_alone(client):
    """Every socket cuts a peer that sends a frame over 64 MiB. A Response or a method's result
    that big made the broker cut the object process (every stub of its slot broke, its calls
    in flight failed, it registered again), and a body that big from a client cut the
    client. Now each fails alone, with a message that names the limit."""
    big = stub(client, "NOOP", "big")
    bystanders = [stub(client, "COUNTER", f"bystander{i}") for i in range(8)]  # (both slots)
    for b in bystanders:
        assert (await b.fetch("http://do/inc", method="POST")).ok
    with pytest.raises(ObjectError, match=r"the object's Response is 65\.0 MiB; a call or its "
                                          r"answer carries at most 64 MiB: send a larger body "
                                          r"as a stream") as e:
        await big.fetch(f"http://do/?bytes={65 << 20}", timeout=20)
    assert e.value.remote_type == "ValueError"
    with pytest.raises(ObjectError, match=r"ACCOUNT blob\(\)'s result is [\d.]+ MiB; .* "
                                          r"return it in parts"):
        await client.namespace("ACCOUNT").get_by_name("big").blob(65 << 20)
    with pytest.raises(ValueError, match=r"this call \(a fetch's body or head, or a method's "
                                         r"arguments\) is 65\.0 MiB; a call or its answer "
                                         r"carries at most 64 MiB"):
        await big.fetch("http://do/", method="PUT", body=b"x" * (65 << 20))
    assert client._pending == {}
    resp = await big.fetch(f"http://do/?bytes={64 << 20}", timeout=20)  # the limit itself
    assert len(await resp.bytes()) == 64 << 20
    # nothing was cut: the same stubs go on
    for b in bystanders:
        assert await (await b.fetch("http://do/inc", method="POST")).text() == "2"
    assert await (await big.fetch("http://do/")).text() == "ok"
    await worker_totals(client, lambda w: w.get("answers_too_big", 0) >= 2)  # (counted)


async def test_a_response_that_cannot_be_encoded_is_answered_with_an_error(client):
    s = stub(client, "FAILING", "spoilt")
    with pytest.raises(ObjectError, match="could not be encoded") as e:
        await s.fetch("http://do/", method="PUT", timeout=5)  # not a CallTimeoutError
    assert e.value.remote_type == "TypeError"
    assert (await s.fetch("http://do/")).ok  # the stub and the object stay usable


async def test_object_calls_another_through_env(client):
    s = stub(client, "CALLER", "caller")
    assert await (await s.fetch("http://do/?name=target")).text() == "via env: 1 hello"
    assert await (await s.fetch("http://do/?name=target")).text() == "via env: 2 hello"
    direct = stub(client, "COUNTER", "target")
    assert await (await direct.fetch("http://do/")).text() == "2"


async def test_block_concurrency_while_holds_calls_until_setup_ends(client):
    s = stub(client, "SETUP", "s")
    answers = await asyncio.gather(*[s.fetch("http://do/") for _ in range(20)])
    assert [await a.text() for a in answers] == ["ready"] * 20


async def test_unknown_namespace_and_invalid_ids(client):
    with pytest.raises(UnknownNamespaceError, match="COUNTER"):
        client.namespace("NOPE")
    ns = client.namespace("COUNTER")
    other = client.namespace("NOOP")
    foreign = str(other.id_from_name("x"))
    with pytest.raises(InvalidIdError):
        ns.id_from_string(foreign)
    with pytest.raises(ValueError):
        ns.id_from_string("0" * 64)
    unique = ns.new_unique_id()
    assert ns.id_from_string(str(unique)) == unique


async def test_statistics_report_slots_and_counters(client, shared_cluster):
    # (a local client's calls take the peer path by default: this one's go by the broker)
    async with durable.connect(shared_cluster.frontend, timeout=10, direct=False) as c:
        await stub(c, "NOOP", "x").fetch("http://do/")
    stats = await client.statistics()
    assert [s["up"] for s in stats["slots"]] == [True, True]
    assert stats["broker"]["counters"]["calls"] >= 1


async def test_lone_calls_commit_inline_and_concurrent_ones_through_the_writer(client):
    s = stub(client, "COUNTER", "inline")
    for _ in range(20):
        await s.fetch("http://do/inc", method="POST")
    slot = await worker_totals(client, lambda w: w.get("inline_commits", 0) >= 20)
    assert slot["inline_commits"] >= 20  # one call in flight: its sync wrote on the loop thread
    before = slot["inline_commits"]
    stubs = [stub(client, "COUNTER", f"many{i}") for i in range(50)]
    resps = await asyncio.gather(*[x.fetch("http://do/inc", method="POST") for x in stubs * 4])
    assert all(r.ok for r in resps)
    slot = await worker_totals(client, lambda w: w.get("calls", 0) >= 220)
    # 200 concurrent calls, but few of them found the process otherwise idle
    assert slot["inline_commits"] - before < 100, slot


async def worker_totals(client, ready, timeout=5.0):
    """The object processes' heartbeat counters, summed, once ``ready`` (sent every second)."""
    seen = {}

    async def totals():
        total = {}
        for sl in (await client.statistics())["slots"]:
            for k, v in (sl.get("reported") or {}).items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        seen.update(total)
        return total if ready(total) else False

    try:
        return await async_wait_for(totals, timeout, "the object processes' counters",
                                    interval=0.1)
    except AssertionError as e:  # (say what the counters were)
        raise AssertionError(f"{e}: {dict(sorted(seen.items()))}") from None


def slot_of(client, cluster, ns, name):
    from durable.broker.ring import Ring
    return Ring(cluster.slots).slot_for(str(client.namespace(ns).id_from_name(name)))


async def test_sigkill_of_objectproc_breaks_stub_and_new_stub_works(client, cluster):
    name = "victim"
    slot = slot_of(client, cluster, "COUNTER", name)
    s = stub(client, "COUNTER", name)
    acked = attempted = 0
    broken = 0
    killed_at = random.Random(7).randint(50, 150)

    async def inc():
        nonlocal acked
        await s.fetch("http://do/inc", method="POST")
        acked += 1

    pending = []
    for i in range(300):
        if i == killed_at:
            os.kill(cluster.workers[slot].pid, signal.SIGKILL)
        attempted += 1
        pending.append(asyncio.ensure_future(inc()))
        if i % 10 == 0:
            await asyncio.sleep(0.002)
    results = await asyncio.gather(*pending, return_exceptions=True)
    broken = sum(isinstance(r, StubBrokenError) for r in results)
    assert broken > 0, "no call saw the crash"
    assert all(r is None or isinstance(r, StubBrokenError) for r in results), results
    # every later call on the old stub fails at once
    with pytest.raises(StubBrokenError):
        await s.fetch("http://do/inc", method="POST")
    cluster.workers[slot].wait(timeout=10)
    cluster.start_worker(slot)

    # A fresh stub each try: the calls took the peer path, so the broker may not have seen
    # the death yet when the first one is made (its call then fails as the old stub's did).
    async def read() -> int:
        return int(await (await stub(client, "COUNTER", name).fetch("http://do/")).text())

    value = await async_wait_for(read, 15, "a fresh stub's answer", ignore=(StubBrokenError,))
    assert acked <= value <= attempted, (acked, value, attempted)
    assert acked < attempted


async def test_writes_without_await_are_durable_when_the_answer_arrives(client, cluster):
    """``storage.put()`` without ``await`` (workerd allows it) used to make no write at all: the
    coroutine never ran. Now it writes, and the output gate holds the answer until the write
    is durable: SIGKILL right after the answer loses nothing."""
    name = "unawaited"
    slot = slot_of(client, cluster, "ACCOUNT", name)
    acct = client.namespace("ACCOUNT").get_by_name(name)
    assert await acct.unawaited(5) == 5
    os.kill(cluster.workers[slot].pid, signal.SIGKILL)
    cluster.workers[slot].wait(timeout=10)
    cluster.start_worker(slot)

    async def stored():
        fresh = client.namespace("ACCOUNT").get_by_name(name)
        return [await fresh.get(k) for k in ("u", "u0", "u1", "u4")]

    assert await async_wait_for(stored, 15, "the object after its process's restart",
                                ignore=(StubBrokenError,)) == [5, None, 1, 4]


@pytest.mark.slow
async def test_calls_wait_for_a_down_slot_and_are_delivered_in_order(client, cluster):
    slot = slot_of(client, cluster, "RECORDER", "waiter")
    cluster.kill(cluster.workers[slot])

    async def down():  # the broker notices the silence
        return not (await client.statistics())["slots"][slot]["up"]

    await async_wait_for(down, cluster.heartbeat * 15, f"the broker to see slot {slot} down")
    s = stub(client, "RECORDER", "waiter")
    calls = [asyncio.ensure_future(s.fetch(f"http://do/?n={i}", method="POST")) for i in range(20)]
    await asyncio.sleep(0.3)
    assert not any(c.done() for c in calls)
    cluster.start_worker(slot)
    await asyncio.gather(*calls)
    assert await (await s.fetch("http://do/")).json() == list(range(20))


async def test_broker_restart_breaks_stubs_and_client_reconnects(client, cluster):
    s = stub(client, "COUNTER", "survivor")
    await s.fetch("http://do/inc", method="POST")
    cluster.kill(cluster.broker)
    cluster.start_broker()
    with pytest.raises(StubBrokenError):
        for _ in range(50):  # until the client notices (heartbeat or DISCONNECT)
            await s.fetch("http://do/inc", method="POST", timeout=1)
            await asyncio.sleep(0.05)

    async def fresh_works():
        r = await stub(client, "COUNTER", "survivor").fetch("http://do/", timeout=1)
        return await r.text()

    value = await async_wait_for(fresh_works, 15, "a fresh stub to work",
                                 ignore=(StubBrokenError, durable.CallTimeoutError))
    assert int(value) >= 1, cluster.log_tail()


def test_sync_client(cluster):
    with durable.connect_sync(cluster.frontend) as c:
        ns = c.namespace("COUNTER")
        s = ns.get(ns.id_from_name("sync"))
        assert s.fetch("http://do/inc", method="POST").text() == "1"
        assert s.fetch("http://do/").text() == "1"
        slots = c.statistics()["slots"]  # (the other slot may still be registering)
        assert len(slots) == 2 and slots[Ring(2).slot_for(str(s.id))]["up"]


def test_connect_to_nothing_says_so(tmp_path):
    with pytest.raises(ConnectionError, match="durable serve"):
        durable.connect_sync(f"ipc://{tmp_path}/nothing.sock", connect_timeout=0.3)


def test_a_client_name_the_broker_would_drop_is_refused_at_once(tmp_path):
    """The broker drops a HELLO whose name is empty or over 256 characters; such a client
    used to spin in resets (thousands of "reconnecting" warnings a second) until its connect
    timeout said the daemon was hung."""
    from durable.protocol.messages import FROM_CLIENT, MAX_NAME, Hello, parse
    for bad in ("", "x" * (MAX_NAME + 1), 5):
        with pytest.raises(ValueError, match="name= must be a non-empty str of at most 256"):
            durable.Client(f"ipc://{tmp_path}/b.sock", name=bad)
    assert durable.Client(f"ipc://{tmp_path}/b.sock", name="x" * MAX_NAME)._name == "x" * MAX_NAME
    assert parse(Hello(1, "x" * MAX_NAME).encode(), FROM_CLIENT).name == "x" * MAX_NAME


def test_a_client_used_from_another_event_loop_says_so_at_once(tmp_path):
    """A client started in one event loop and called from another (a module-level client
    under pytest-asyncio's loop per test, say) sent the call and read nothing: it waited out
    its timeout and said the call "may or may not have run"."""
    keys = {"COUNTER": b"k" * 32}
    unstarted = durable.Client(f"ipc://{tmp_path}/b.sock", namespaces=keys)
    loop = asyncio.new_event_loop()
    started = durable.Client(f"ipc://{tmp_path}/b.sock", namespaces=keys)
    loop.run_until_complete(started.start(wait=False))
    try:
        for c in (started, unstarted):
            stub = c.namespace("COUNTER").get_by_name("a")

            async def call(stub=stub):
                t = time.monotonic()
                with pytest.raises(RuntimeError, match="started on another event loop"):
                    await stub.fetch("http://do/", timeout=5)
                assert time.monotonic() - t < 1

            asyncio.run(call())
        assert started._pending == {}
    finally:
        loop.run_until_complete(started.close())
        loop.close()


HOSTILE = [
    [b""], [b"\x00"], [os.urandom(3)], [b"D\x01\x02"], [b"D\x09\x02", b"x"],
    [b"D\x01\x02", b"[1,2,3]", b"", b""], [b"D\x01\x02", b'["a", 1, "NS", "x", 5]', b"h", b"b"],
    [b"D\x01\x02", b"[1, 1, 1, 1, 1]", b"[]", b""], [b"D\x01\x21", b"{}"],
    [b"D\x01\x22", b"who", b"12345678", b"[200, []]", b""], [b"D\x01\x01", b"not json"],
    [b"D\x01\x04", b"[-1]"], [b"D\x01\x05", b"short"], [b"D\x01\x21", b'{"protocol": 1, "slot": 99, "pid": 1, "incarnation": 1}'],
]
# the same at this release's protocol version (and so parsed past the header), plus its own layouts
HOSTILE += [[bytes((0x44, VERSION, f[0][2])), *f[1:]] for f in HOSTILE if f[0][:2] == b"D\x01" and len(f[0]) == 3]
HOSTILE += [[header(Cmd.CALL), pack_u64(1), b'["a", "NS", "x", 5]', b"h", b"b"],
            [header(Cmd.CALL), b"short", b'[1, "NS", "x", 5]', b"h", b"b"],
            [header(Cmd.READY), b'{"protocol": %d, "slot": 99, "pid": 1, "incarnation": 1}' % VERSION]]


async def test_hostile_input_on_both_broker_sockets(client, cluster):
    ctx = zmq.Context.instance()
    socks = []
    stack = contextlib.AsyncExitStack()
    try:
        for endpoint in (cluster.frontend, cluster.backend):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            socks.append(s)
        rng = random.Random(3)
        # through the broker (not the peer path): each answer comes after the junk before it
        via_broker = await stack.enter_async_context(
            durable.connect(cluster.frontend, timeout=10, direct=False))
        good = stub(via_broker, "COUNTER", "steady")
        for round_ in range(10):
            for s in socks:
                for frames in HOSTILE:
                    s.send_multipart(frames)
                for _ in range(500):  # tiny frames
                    s.send_multipart([os.urandom(rng.randint(0, 4))])
                s.send_multipart([os.urandom(rng.randint(1, 64)) for _ in range(rng.randint(1, 8))])
            r = await good.fetch("http://do/inc", method="POST")
            assert await r.text() == str(round_ + 1)
        stats = await client.statistics()
        counters = stats["broker"]["counters"]
        assert counters.get("dropped_client_messages", 0) >= 5000
        assert counters.get("dropped_worker_messages", 0) >= 5000
        assert cluster.broker.poll() is None
        assert all(w.poll() is None for w in cluster.workers.values())
        assert [s["up"] for s in stats["slots"]] == [True, True]
    finally:
        await stack.aclose()
        for s in socks:
            s.close(linger=0)


async def test_hostile_input_reaching_an_object_process(client, cluster):
    """A malformed request head that passes the broker gets an error reply, nothing crashes."""
    ns = client.namespace("NOOP")
    oid = str(ns.id_from_name("target"))
    from durable.protocol.messages import Call, parse_from_broker_to_client
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster.frontend)
    try:
        from durable.protocol.messages import Hello
        s.send_multipart(Hello(1, "fuzzer").encode())
        heads = [b"not json", b"[1,2]", b'["GET", 5, []]', b'["G E T", "u", []]',
                 b'["GET", "u", [["bad name", "v"]]]']
        for call_id, head in enumerate(heads, 1):
            s.send_multipart(Call(call_id, 1, "NOOP", oid, 1000, head, b"").encode())
        replies = []
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + 5
        while len(replies) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # keep the test client's loop (and heartbeats) running
            while poller.poll(0):
                replies.append(parse_from_broker_to_client(s.recv_multipart()))
        errors = [r for r in replies if type(r).__name__ == "Error"]
        assert len(errors) == 5, replies
        assert all(e.code == "protocol" for e in errors), errors
    finally:
        s.close(linger=0)
    assert await (await stub(client, "NOOP", "target").fetch("http://do/")).text() == "ok"
    wait_for(lambda: all(w.poll() is None for w in cluster.workers.values()), 1, "workers alive")


@pytest.mark.slow
async def test_a_stall_of_the_clients_own_loop_does_not_break_its_stubs(cluster):
    """Silence caused by our own blocked loop is not the broker's death (a gateway under a
    flood of connections stalled 2.5 s and broke every stub it held)."""
    async with durable.connect(cluster.frontend, heartbeat=cluster.heartbeat) as c:
        await all_slots_up(c)
        s = stub(c, "COUNTER", "stall")
        await s.fetch("http://do/inc", method="POST")
        time.sleep(cluster.heartbeat * 5 * 3)  # noqa: ASYNC251 (the point: our loop blocks, 3 windows)
        await asyncio.sleep(cluster.heartbeat)  # the heartbeat task runs first, and judges
        assert await (await s.fetch("http://do/")).text() == "1"
