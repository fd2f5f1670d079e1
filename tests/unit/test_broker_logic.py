"""Broker routing with no sockets: a fake clock, sends captured (h11-style: events in, events out)."""

import pytest

from durable.broker.core import BrokerConfig, RouterCore
from durable.broker.ring import Ring
from durable.ids import IdFactory, namespace_key
from durable.protocol import messages as m

KEY = namespace_key(b"k" * 32, "NS")
IDS = IdFactory("NS", KEY)


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


class FakeBroker:
    """The routing core with a fake clock, its outbox read back as typed messages.

    Peers in ``unreachable`` fail their sends, as a ROUTER_MANDATORY socket does when
    the peer is gone; the core hears of it exactly as the socket loop tells it.
    """

    def __init__(self, slots=2, **kw):
        self.clock_ = Clock()
        self.core = RouterCore(BrokerConfig("inproc://f", "inproc://b", slots, {"NS": KEY},
                                            heartbeat=1.0, misses=3, **kw), clock=self.clock_)
        self.unreachable: set[bytes] = set()

    def __getattr__(self, name):  # counters, slots, clients, tick, statistics, ...
        return getattr(self.core, name)

    def on_client(self, frames, user=None):
        self.core.client_message(frames[0], frames[1:], user)

    def on_worker(self, frames):
        self.core.worker_message(frames[0], frames[1:])

    def on_control(self, frames):
        self.core.control_message(frames[1:])

    def take(self):
        out, box, i = [], self.core.outbox, 0
        while i < len(box):
            to_worker, ident, frames = box[i]
            i += 1
            if ident in self.unreachable:
                if to_worker:
                    self.core.worker_unreachable(ident)
                continue
            parse = m.parse_from_broker_to_worker if to_worker else m.parse_from_broker_to_client
            out.append(("worker" if to_worker else "client", ident, parse(frames)))
        box.clear()
        return out


def oid_on_slot(slot, slots=2):
    ring = Ring(slots)
    for i in range(1000):
        o = str(IDS.from_name(f"n{i}"))
        if ring.slot_for(o) == slot:
            return o
    raise AssertionError


def call(call_id, stub_id, oid, ns="NS", timeout_ms=30_000):
    return [b"Fcli", *m.Call(call_id, stub_id, ns, oid, timeout_ms, b"[]", b"").encode()]


def hello(b, ident=b"Fcli"):
    b.on_client([ident, *m.Hello(1, "t").encode()])
    assert isinstance(b.take()[-1][2], m.Welcome)


def ready(b, slot, ident=None, inc=7):
    b.on_worker([ident or f"w{slot}".encode(), *m.Ready(slot, 100 + slot, inc).encode()])


def test_traffic_before_hello_gets_disconnect():
    b = FakeBroker()
    b.on_client(call(1, 1, oid_on_slot(0)))
    (what, ident, msg), = b.take()
    assert isinstance(msg, m.Disconnect)
    assert b.counters["unknown_client_messages"] == 1


def test_worker_traffic_before_ready_gets_disconnect():
    b = FakeBroker()
    b.on_worker([b"w", *m.WorkerHeartbeat({}).encode()])
    assert isinstance(b.take()[0][2], m.WorkerDisconnect)
    b.on_worker([b"w", *m.Ready(5, 1, 1).encode()])  # a slot that does not exist
    assert isinstance(b.take()[0][2], m.WorkerDisconnect)


def test_call_is_routed_to_its_slot_and_reply_comes_back():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    ready(b, 1)
    oid = oid_on_slot(1)
    b.on_client(call(1, 1, oid))
    (what, ident, msg), = b.take()
    assert (what, ident, type(msg), msg.object_id) == ("worker", b"w1", m.WorkerCall, oid)
    b.on_worker([b"w1", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"ok").encode()])
    (what, ident, msg), = b.take()
    assert (what, ident, msg) == ("client", b"Fcli", m.Reply(1, b"[200,[]]", b"ok"))


def test_unknown_namespace_and_bad_id_are_errors():
    b = FakeBroker()
    hello(b)
    b.on_client(call(1, 1, oid_on_slot(0), ns="NOPE"))
    b.on_client(call(2, 1, "0" * 64))
    errs = [x[2] for x in b.take()]
    assert [e.code for e in errs] == ["unknown_namespace", "invalid_id"]
    assert "NS" in errs[0].message


def test_checked_ids_are_remembered_but_never_vouch_for_other_ids(monkeypatch):
    import durable.broker.core as core

    monkeypatch.setattr(core, "_PLACED_MAX", 3)
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    ready(b, 1)
    oids = [oid_on_slot(i % 2) for i in range(2)] + [str(IDS.from_name(f"x{i}")) for i in range(5)]
    checks = []
    real = IdFactory.from_string
    monkeypatch.setattr(IdFactory, "from_string", lambda self, s: checks.append(s) or real(self, s))
    for rnd in range(2):
        for i, oid in enumerate(oids):
            b.on_client(call(100 * rnd + i, 1000 * rnd + i, oid))
    sent = b.take()
    assert all(type(x[2]) is m.WorkerCall for x in sent)
    ring = Ring(2)  # every call went to its object's slot, remembered or not
    assert [x[1] for x in sent] == [f"w{ring.slot_for(o)}".encode() for o in oids * 2]
    assert len(checks) > len(oids)  # the table is bounded (3 here), so ids were checked again
    checks.clear()
    for i in range(5):
        b.on_client(call(500 + i, 500, oids[0]))
    assert checks == [oids[0]] and len(b.take()) == 5  # checked once, then remembered
    tampered = oids[0][:-1] + ("0" if oids[0][-1] != "0" else "1")
    b.on_client(call(999, 999, tampered))
    (_, _, err), = b.take()
    assert err.code == "invalid_id"
    b.on_client(call(998, 998, oids[-1], ns="NOPE"))  # a known id under another namespace
    (_, _, err), = b.take()
    assert err.code == "unknown_namespace"


def test_calls_queue_while_slot_down_then_go_in_order():
    b = FakeBroker()
    hello(b)
    oid = oid_on_slot(0)
    for i in range(1, 4):
        b.on_client(call(i, 1, oid))
    assert b.take() == []
    ready(b, 0)
    assert [x[2].call_id for x in b.take()] == [1, 2, 3]


def test_queue_deadline_and_limit():
    b = FakeBroker(queue_limit=2, queue_deadline=5.0)
    hello(b)
    oid = oid_on_slot(0)
    for i in range(1, 4):
        b.on_client(call(i, i, oid))
    assert [x[2].code for x in b.take()] == ["overloaded"]
    b.clock_.now += 5.1
    b.tick()
    assert [(x[2].call_id, x[2].code) for x in b.take()] == [(1, "timeout"), (2, "timeout")]


def test_incarnation_end_breaks_inflight_and_later_calls_of_bound_stubs():
    b = FakeBroker()
    hello(b)
    ready(b, 0, inc=7)
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid))
    b.take()
    ready(b, 0, ident=b"w0-new", inc=8)  # a new process took the slot: incarnation 7 ended
    out = b.take()
    assert [(x[2].call_id, x[2].code) for x in out[:1]] == [(1, "stub_broken")]
    assert [x[2] for x in out[1:]] == [m.Broken([1])]  # (its WebSockets close at once)
    b.on_client(call(2, 1, oid))  # the old stub, even though the slot is up again
    assert [(x[2].call_id, x[2].code) for x in b.take()] == [(2, "stub_broken")]
    b.on_client(call(3, 2, oid))  # a new stub works
    assert [type(x[2]) for x in b.take()] == [m.WorkerCall]


def test_missed_heartbeats_end_the_incarnation():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.on_client(call(1, 1, oid_on_slot(0)))
    b.take()
    b.clock_.now += 1.0
    b.tick()
    assert [type(x[2]) for x in b.take()] == [m.BrokerHeartbeat]
    b.clock_.now += 2.1
    b.tick()
    assert [(x[2].call_id, x[2].code) for x in b.take() if type(x[2]) is not m.Broken] == [
        (1, "stub_broken")]
    assert b.statistics()["slots"][0]["up"] is False


def test_unreachable_worker_ends_incarnation_at_once():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.unreachable.add(b"w0")
    b.on_client(call(1, 1, oid_on_slot(0)))
    assert [(x[2].call_id, x[2].code) for x in b.take() if type(x[2]) is not m.Broken] == [
        (1, "stub_broken")]
    assert b.counters["incarnations_ended"] == 1


def test_stray_replies_and_malformed_messages_are_counted():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 99, b"[200,[]]", b"").encode()])
    b.on_worker([b"w0", b"junk"])
    b.on_client([b"Fcli", b"junk"])
    assert b.take() == []
    assert (b.counters["stray_replies"], b.counters["dropped_worker_messages"],
            b.counters["dropped_client_messages"]) == (1, 1, 1)


def test_silent_clients_are_forgotten_and_stub_drops_are_honoured():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.on_client(call(1, 5, oid_on_slot(0)))
    assert 5 in b.clients[b"Fcli"].stubs
    b.on_client([b"Fcli", *m.Drop([5]).encode()])
    assert 5 not in b.clients[b"Fcli"].stubs
    b.clock_.now += 31
    b.tick()
    assert b"Fcli" not in b.clients


@pytest.mark.parametrize("msg", [m.Ping(), m.Stats(4)])
def test_ping_and_stats(msg):
    b = FakeBroker()
    hello(b)
    b.on_client([b"Fcli", *msg.encode()])
    (_, _, reply), = b.take()
    assert isinstance(reply, (m.Pong, m.StatsReply))


def test_control_slot_down_ends_the_incarnation_at_once():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.on_client(call(1, 1, oid_on_slot(0)))
    b.take()
    b.on_control([b"", *m.Control("slot_down", 0, 999).encode()])  # not its pid: ignored
    assert b.take() == [] and b.slots[0].identity is not None
    b.on_control([b"", *m.Control("slot_down", 0, 100).encode()])
    assert [(x[2].call_id, x[2].code) for x in b.take() if type(x[2]) is not m.Broken] == [
        (1, "stub_broken")]


def test_control_drain_refuses_new_calls_but_lets_replies_through():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid))
    b.take()
    b.on_control([b"", *m.Control("drain").encode()])
    b.on_client(call(2, 1, oid))
    assert [(x[2].call_id, x[2].code) for x in b.take()] == [(2, "overloaded")]
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"ok").encode()])
    assert [type(x[2]) for x in b.take()] == [m.Reply]


H = m.header


@pytest.mark.parametrize("frames", [[H(m.Cmd.CONTROL), b"{}"], [H(m.Cmd.CONTROL), b'{"op": "slot_down"}'],
                                    [H(m.Cmd.CONTROL), b'{"op": "boom"}'], [H(m.Cmd.CALL), b"{}"]])
def test_malformed_control_messages_are_dropped(frames):
    b = FakeBroker()
    b.on_control([b"", *frames])
    assert b.counters["dropped_control_messages"] == 1 and not b.draining


def test_per_client_inflight_limit_gives_overloaded_then_recovers():
    b = FakeBroker(client_inflight_limit=2)
    hello(b)
    ready(b, 0)
    oid = oid_on_slot(0)
    for i in range(1, 4):
        b.on_client(call(i, 1, oid))
    out = [(type(x[2]).__name__, getattr(x[2], "code", None)) for x in b.take()]
    assert out == [("WorkerCall", None), ("WorkerCall", None), ("Error", "overloaded")]
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"").encode()])
    b.take()
    b.on_client(call(4, 1, oid))
    assert [type(x[2]) for x in b.take()] == [m.WorkerCall]
    assert b.clients[b"Fcli"].inflight == 2


def test_curve_clients_get_and_call_only_their_keys_namespaces():
    b = FakeBroker()
    b.core.config.curve_secret_key_file = "broker.key_secret"
    b.core.permissions = {"keyA": frozenset({"NS"}), "keyB": frozenset()}
    ready(b, 0)
    b.take()
    welcomes = {}
    for ident, user in ((b"Pa", "keyA"), (b"Pb", "keyB"), (b"Pz", "unknown"), (b"Fl", None)):
        b.on_client([ident, *m.Hello(1, "t").encode()], user)
        welcomes[ident] = b.take()[-1][2].namespaces
    assert {k: sorted(v) for k, v in welcomes.items()} == {
        b"Pa": ["NS"], b"Pb": [], b"Pz": [], b"Fl": ["NS"]}
    oid = oid_on_slot(0)
    for ident, allowed in ((b"Pa", True), (b"Pb", False), (b"Pz", False), (b"Fl", True)):
        b.on_client([ident, *m.Call(1, 1, "NS", oid, 1000, b"[]", b"").encode()])
        (what, _, msg), = b.take()
        if allowed:
            assert isinstance(msg, m.WorkerCall) and msg.client == ident
        else:
            assert isinstance(msg, m.Error) and msg.code == "unknown_namespace"
            assert "may not call" in msg.message
    b.on_client([b"Pa", *m.Stats(9).encode()])  # pids and counters stay on this machine
    assert b.take()[-1][2].code == "protocol"
    b.on_client([b"Fl", *m.Stats(9).encode()])
    assert isinstance(b.take()[-1][2], m.StatsReply)


def test_calls_past_their_deadline_leave_the_broker_and_free_the_clients_budget():
    b = FakeBroker(client_inflight_limit=2)
    hello(b)
    ready(b, 0)
    b.take()
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid, timeout_ms=500))  # a long-poll that will outlive its caller
    b.on_client(call(2, 1, oid, timeout_ms=60_000))
    b.on_client(call(3, 1, oid))
    assert [x[2].code for x in b.take() if isinstance(x[2], m.Error)] == ["overloaded"]
    b.clock_.now += 0.6
    b.tick()
    errors = [(x[2].call_id, x[2].code) for x in b.take() if isinstance(x[2], m.Error)]
    assert errors == [(1, "timeout")] and b.counters["expired"] == 1
    b.on_client(call(4, 1, oid))  # the expired call no longer counts: room for this one
    assert isinstance(b.take()[-1][2], m.WorkerCall)
    # Its late reply is a stray, never delivered twice.
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"").encode()])
    assert b.take() == [] and b.counters["stray_replies"] == 1
    # A call waiting for a down slot fails at its own deadline when that is sooner.
    b.end_incarnation(0, "test")
    b.take()
    b.on_client(call(5, 2, oid, timeout_ms=200))
    b.clock_.now += 0.3
    b.tick()
    assert [(x[2].call_id, x[2].code) for x in b.take() if isinstance(x[2], m.Error)] == [(5, "timeout")]


def test_beats_from_the_heartbeat_thread_keep_a_busy_slot_alive():
    b = FakeBroker()
    hello(b)
    ready(b, 0, inc=7)
    b.on_client([b"Fcli", *m.Call(1, 1, "NS", oid_on_slot(0), 30_000, b"[]", b"", "alice").encode()])
    (_, _, wcall), = [x for x in b.take() if isinstance(x[2], m.WorkerCall)]
    assert wcall.name == "alice"  # the name travels to the object process
    for _ in range(10):  # the loop is busy: only the thread's beats (its own socket) arrive
        b.clock_.now += 1.0
        b.on_worker([b"beat-socket", *m.Beat(0, 7).encode()])
        b.tick()
    assert b.statistics()["slots"][0]["up"] is True
    assert [x for x in b.take() if isinstance(x[2], m.Error)] == []
    b.on_worker([b"beat-socket", *m.Beat(0, 8).encode()])  # another incarnation's: ignored
    b.clock_.now += 3.1
    b.tick()
    assert b.statistics()["slots"][0]["up"] is False


def test_an_object_process_asking_after_a_pause_hears_whether_its_incarnation_serves():
    """Its answer comes on the socket its calls come by, behind them: still served (and
    heard from now), or ended ("send READY"), whichever the broker holds when it reads."""
    b = FakeBroker()
    hello(b)
    ready(b, 0, inc=7)
    b.clock_.now += 2.9  # (its window is 3 s: not ended yet)
    b.on_worker([b"w0", *m.AskAlive(7).encode()])
    assert [x[2] for x in b.take()] == [m.StillAlive(7)]
    b.clock_.now += 2.9  # (the question counts as hearing from it)
    b.tick()
    assert b.statistics()["slots"][0]["up"] is True
    b.take()
    b.on_worker([b"w0", *m.AskAlive(8).encode()])  # not the incarnation it registered
    assert [type(x[2]) for x in b.take()] == [m.WorkerDisconnect]
    b.clock_.now += 3.1
    b.tick()  # ended: its socket is unknown now
    assert b.statistics()["slots"][0]["up"] is False
    b.take()
    b.on_worker([b"w0", *m.AskAlive(7).encode()])
    (_, ident, msg), = b.take()
    assert (ident, type(msg)) == (b"w0", m.WorkerDisconnect)
    assert b.counters["asked_alive"] == 2


def test_channel_messages_reach_their_client_once_per_batch():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    b.take()
    b.on_worker([b"w0", *m.WorkerSend(b"Fcli", [3, 4, 5], m.EV_TEXT, b"hi").encode()])
    assert b.take() == [("client", b"Fcli", m.ChannelSend([3, 4, 5], m.EV_TEXT, b"hi"))]
    # to a client that left: the object process hears it is gone, nothing is sent
    b.on_worker([b"w0", *m.WorkerSend(b"Fgone", [1], m.EV_TEXT, b"hi").encode()])
    assert b.take() == [("worker", b"w0", m.ClientGone(b"Fgone"))]


def test_clients_that_leave_are_told_to_every_object_process():
    b = FakeBroker(slots=2)
    hello(b)
    hello(b, b"Fgw")  # a gateway process, pid 1 (see hello)
    ready(b, 0)
    ready(b, 1)
    b.take()
    b.on_control([b"", *m.Control("client_exit", pid=1).encode()])
    gone = sorted((x[1], x[2].client) for x in b.take())
    assert gone == [(b"w0", b"Fcli"), (b"w0", b"Fgw"), (b"w1", b"Fcli"), (b"w1", b"Fgw")]
    assert b.core.clients == {}
    hello(b)
    b.take()
    for _ in range(40):  # the client says nothing for 40 s (30 heartbeats); the slots beat
        b.clock_.now += 1.0
        for slot in (0, 1):
            b.on_worker([f"w{slot}".encode(), *m.Beat(slot, 7).encode()])
        b.tick()
    gone = sorted((x[1], x[2].client) for x in b.take() if type(x[2]) is m.ClientGone)
    assert gone == [(b"w0", b"Fcli"), (b"w1", b"Fcli")]


def test_a_draining_broker_still_lets_channel_events_in():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid))
    b.take()
    b.on_control([b"", *m.Control("drain").encode()])
    head, body = m.encode_event(m.EV_CLOSE, 5, code=1001, reason="going away", was_clean=True)
    b.on_client([b"Fcli", *m.Call(2, 1, "NS", oid, 30_000, head, body).encode()])
    b.on_client(call(3, 1, oid))  # a new call: refused
    out = b.take()
    assert [type(x[2]) for x in out] == [m.WorkerCall, m.Error]
    assert out[0][2].head == head and out[1][2].code == "overloaded"


def test_local_clients_are_told_the_peer_sockets_remote_ones_are_not():
    b = FakeBroker(peer_endpoint="ipc:///run/durable/peer-{slot}.sock")
    b.on_client([b"Fcli", *m.Hello(1, "t").encode()])
    b.on_client([b"Pabcde", *m.Hello(1, "t").encode()])
    b.on_client([b"Aabcde", *m.Hello(1, "t").encode()])
    (_, _, local), (_, _, remote), (_, _, operator) = b.take()
    assert local.peers == (2, "ipc:///run/durable/peer-{slot}.sock")
    assert remote.peers is None  # (another machine: ipc is not for it)
    assert operator.peers is None  # (operator requests are accepted only from its socket)
    b = FakeBroker()  # cluster mode, or [broker] peer_calls = false
    b.on_client([b"Fcli", *m.Hello(1, "t").encode()])
    assert b.take()[0][2].peers is None


def test_a_stopping_slot_finishes_its_calls_while_new_ones_wait_for_the_next_process():
    b = FakeBroker()
    hello(b)
    ready(b, 0, inc=7)
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid))  # in flight when the stop begins
    b.take()
    b.on_worker([b"w0", *m.WorkerStopping().encode()])
    for _ in range(10):  # a drain past the liveness window: the beat thread goes on
        b.clock_.now += 1.0
        b.on_worker([b"beat-socket", *m.Beat(0, 7).encode()])
        b.tick()
    b.on_client(call(2, 1, oid))  # a stub bound to the stopping process: broken at once
    b.on_client(call(3, 2, oid))  # a new stub: waits for the next process
    out = b.take()
    assert [(x[2].call_id, x[2].code) for x in out if isinstance(x[2], m.Error)] == [
        (2, "stub_broken")], out
    assert not [x for x in out if isinstance(x[2], m.WorkerCall)]
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"ok").encode()])
    assert [x[2] for x in b.take()] == [m.Reply(1, b"[200,[]]", b"ok")]  # answered, not failed
    b.on_control([b"", *m.Control("slot_down", 0, 100).encode()])
    ready(b, 0, ident=b"w0-new", inc=8)
    (what, ident, msg), = [x for x in b.take() if isinstance(x[2], m.WorkerCall)]
    assert (ident, msg.call_id) == (b"w0-new", 3)
    b.on_client(call(4, 3, oid))  # the next process is not stopping
    assert [(x[1], x[2].call_id) for x in b.take()] == [(b"w0-new", 4)]


def test_a_broker_that_stood_still_forgets_its_clients_and_their_queued_calls():
    """Its clients may have given it up and gone on by a peer link: a call they sent before
    must not run after that (tests/integration/test_peer_calls.py shows the whole case)."""
    b = FakeBroker()
    hello(b)
    ready(b, 1)
    b.take()
    queued = oid_on_slot(0)
    b.on_client(call(1, 1, queued))  # (slot 0 is down: the call waits in its queue)
    assert b.take() == []
    b.core.stood_still(2.0)
    gone = b.take()
    assert [(to, type(msg)) for to, _, msg in gone] == [("worker", m.ClientGone)]
    assert b.clients == {} and b.counters["stood_still"] == 1
    b.on_client(call(2, 2, oid_on_slot(1)))  # held in the socket through the stop
    [(to, ident, msg)] = b.take()
    assert (to, ident, type(msg)) == ("client", b"Fcli", m.Disconnect)
    ready(b, 0)
    assert b.take() == []  # the queued call is not dispatched either
    hello(b)  # the client says HELLO again and goes on
    b.on_client(call(3, 3, queued))
    assert [type(x[2]) for x in b.take()] == [m.WorkerCall]


def test_calls_queued_by_an_object_process_that_exits_are_not_delivered_later():
    """An object process's own client (its HTTP front's relays, its objects' calls) queued a
    call for a slot that is down, then the process died: the HTTP client heard its connection
    close ("may have run") and may go on by another path. The call must not run when the
    slot comes back (the chaos soak saw it run after the writer's next write)."""
    b = FakeBroker()
    ready(b, 1)
    b.on_client([b"Fslot1", *m.Hello(101, "objectproc-1").encode()])  # slot 1's process, pid 101
    hello(b)  # another client, pid 1
    b.take()
    queued = oid_on_slot(0)
    b.on_client([b"Fslot1", *m.Call(1, 1, "NS", queued, 30_000, b"[]", b"").encode()])
    b.on_client(call(2, 2, queued))
    assert b.take() == []  # (slot 0 is down: both wait in its queue)
    b.on_control([b"", *m.Control("slot_down", 1, 101).encode()])
    assert b"Fslot1" not in b.clients and b"Fcli" in b.clients
    b.take()
    ready(b, 0)
    assert [(x[1], x[2].client, x[2].call_id) for x in b.take()
            if type(x[2]) is m.WorkerCall] == [(b"w0", b"Fcli", 2)]


def test_a_client_reads_batches_once_it_says_so_after_each_hello():
    """PBATCHES after HELLO is answered once; a HELLO again starts without it; before HELLO
    it is traffic from an unknown client."""
    b = FakeBroker()
    b.on_client([b"Fcli", *m.PeerBatches().encode()])
    assert [type(x[2]) for x in b.take()] == [m.Disconnect]
    hello(b)
    assert not b.reads_batches(False, b"Fcli")
    b.on_client([b"Fcli", *m.PeerBatches().encode()])
    b.on_client([b"Fcli", *m.PeerBatches().encode()])
    assert b.take() == [("client", b"Fcli", m.PeerBatches())]
    assert b.reads_batches(False, b"Fcli") and not b.reads_batches(False, b"Fother")
    hello(b)
    assert not b.reads_batches(False, b"Fcli")


def test_an_object_process_reads_batches_until_its_incarnation_ends():
    b = FakeBroker()
    b.on_worker([b"w0", *m.PeerBatches().encode()])  # (before READY: unknown)
    assert [type(x[2]) for x in b.take()] == [m.WorkerDisconnect]
    ready(b, 0)
    b.take()
    b.on_worker([b"w0", *m.PeerBatches().encode()])
    assert b.take() == [("worker", b"w0", m.PeerBatches())]
    assert b.reads_batches(True, b"w0") and b.statistics()["slots"][0]["batches"]
    ready(b, 0, inc=9)  # (registered anew: it says PBATCHES again after READY)
    assert not b.reads_batches(True, b"w0")
    b.on_worker([b"w0", *m.PeerBatches().encode()])
    assert b.reads_batches(True, b"w0")
    b.core.end_incarnation(0, "test")
    assert not b.reads_batches(True, b"w0") and not b.statistics()["slots"][0]["batches"]


def test_an_idle_broker_waits_for_its_next_heartbeat_and_a_busy_one_for_its_deadlines():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    ready(b, 1)
    b.tick()
    b.take()
    assert b.next_tick() == 0.5  # heartbeat / 2: nothing is due sooner
    b.clock_.now += 0.7
    assert b.next_tick() == pytest.approx(0.3)  # the slots' heartbeats are due then
    oid = oid_on_slot(0)
    b.on_client(call(1, 1, oid))
    assert b.next_tick() == 0.1  # a call in flight: its deadline is swept
    b.on_worker([b"w0", *m.WorkerReply(b"Fcli", 1, b"[200,[]]", b"ok").encode()])
    assert b.next_tick() == pytest.approx(0.3)
    b.core.end_incarnation(1, "test")
    b.on_client(call(2, 2, oid_on_slot(1)))  # queued for a slot that is down
    assert b.next_tick() == 0.1


def test_waiting_as_long_as_next_tick_says_never_makes_a_heartbeat_late():
    b = FakeBroker()
    hello(b)
    ready(b, 0)
    ready(b, 1, inc=9)
    sent: dict[bytes, list[float]] = {b"w0": [], b"w1": []}
    turns = 0
    start = b.clock_.now
    while b.clock_.now < start + 10:
        b.clock_.now += b.next_tick()
        turns += 1
        b.on_worker([b"w0", *m.WorkerHeartbeat({}).encode()])  # (each slot is heard)
        b.on_worker([b"w1", *m.WorkerHeartbeat({}).encode()])
        b.tick()
        for _what, ident, msg in b.take():
            if type(msg) is m.BrokerHeartbeat:
                sent[ident].append(b.clock_.now)
    for times in sent.values():
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert len(times) >= 9 and max(gaps) <= 1.0 + 1e-9
    assert turns <= 35  # ~3 a second, where a fixed 0.1-s poll turned 100 times
    assert all(s.liveness is not None for s in b.slots)  # nobody was given up
