"""Clients, routing core and object processes, paired without sockets (tests/unit/wire.py).

A hypothesis state machine sends calls on stubs, answers them, kills and
restarts object processes, drops control messages in, and moves the clock;
after every step it checks the promises the runtime makes about delivery:

* a call gets at most one outcome, and a reply is the answer to that very call;
* a stub reaches one incarnation of its object's process, ever (a stub that
  outlived its process fails, it is never re-routed);
* the calls of a stub arrive in the order they were sent;
* in the end, once every slot is up and has answered and deadlines have
  passed, every call has exactly one outcome.
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from durable.broker.ring import Ring
from durable.protocol import messages as m
from tests.budget import examples
from tests.unit.wire import IDS, Wire

SLOTS = 2
OBJECTS = [str(IDS.from_name(f"obj{i}")) for i in range(4)]
EXAMPLES = int(os.environ.get("DURABLE_FUZZ_EXAMPLES", examples(150)))


class Delivery(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.wire = Wire(SLOTS, queue_deadline=5.0)
        self.ring = Ring(SLOTS)
        self.clients = [self.wire.client(b"Fa"), self.wire.client(b"Fb")]
        self.live: dict[int, object] = {s: self.wire.start_worker(s) for s in range(SLOTS)}
        #: (client ident, stub id) -> the object it calls; call ids sent, in order
        self.stub_object: dict[tuple[bytes, int], str] = {}
        self.sent: dict[tuple[bytes, int], list[int]] = {}
        self.bodies: dict[tuple[bytes, int], bytes] = {}

    @rule(c=st.integers(0, 1), stub=st.integers(1, 6), timeout_ms=st.sampled_from([800, 30_000]))
    def call(self, c: int, stub: int, timeout_ms: int) -> None:
        client = self.clients[c]
        obj = self.stub_object.setdefault((client.ident, stub), OBJECTS[stub % len(OBJECTS)])
        body = os.urandom(4)
        call_id, frames = client.call(stub, obj, body, timeout_ms)
        self.sent.setdefault((client.ident, stub), []).append(call_id)
        self.bodies[(client.ident, call_id)] = body
        self.wire.send(client, frames)

    @rule(slot=st.integers(0, SLOTS - 1))
    def answer(self, slot: int) -> None:
        w = self.live.get(slot)
        if w is not None:
            self.wire.answer(w)

    @rule(slot=st.integers(0, SLOTS - 1), tell=st.booleans())
    def kill(self, slot: int, tell: bool) -> None:
        w = self.live.pop(slot, None)
        if w is None:
            return
        w.alive = False  # its calls are lost with it; sends to it fail from now on
        if tell:  # the supervisor saw it exit (otherwise: a failed send, or missed beats)
            self.wire.core.control_message(m.Control("slot_down", slot, 100 + slot).encode())
            self.wire.pump()

    @precondition(lambda self: len(self.live) < SLOTS)
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from([s for s in range(SLOTS) if s not in self.live]))
        self.live[slot] = self.wire.start_worker(slot)

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0]))
    def advance(self, seconds: float) -> None:
        self.wire.advance(seconds)

    @invariant()
    def at_most_one_outcome_and_replies_match(self) -> None:
        for client in self.clients:
            for call_id, outcomes in client.outcomes.items():
                assert len(outcomes) == 1, (call_id, outcomes)
                if type(outcomes[0]) is m.Reply:
                    assert outcomes[0].body == self.bodies[(client.ident, call_id)]

    @invariant()
    def a_stub_reaches_one_incarnation_in_order(self) -> None:
        reached: dict[tuple[bytes, int], set[int]] = {}
        order: dict[tuple[bytes, int], list[int]] = {}
        for w in self.wire.workers.values():
            for call in w.seen:
                stub = next(s for (ident, s), ids in self.sent.items()
                            if ident == call.client and call.call_id in ids)
                key = (call.client, stub)
                reached.setdefault(key, set()).add(w.incarnation)
                order.setdefault(key, []).append(call.call_id)
                assert call.object_id == self.stub_object[key]
                assert self.ring.slot_for(call.object_id) == w.slot
        for key, incarnations in reached.items():
            assert len(incarnations) == 1, (key, incarnations)
            assert order[key] == sorted(order[key]), (key, order[key])

    def teardown(self) -> None:
        for slot in range(SLOTS):
            if slot not in self.live:
                self.live[slot] = self.wire.start_worker(slot)
        for w in self.live.values():
            while self.wire.answer(w):
                pass
        self.wire.advance(35.0)  # past every deadline (30 s at most)
        for client in self.clients:
            sent = {i for (ident, _), ids in self.sent.items() if ident == client.ident for i in ids}
            assert set(client.outcomes) == sent, sent - set(client.outcomes)
            assert all(len(v) == 1 for v in client.outcomes.values())


Delivery.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestDelivery = Delivery.TestCase


def test_calls_wait_for_a_down_slot_and_arrive_in_order_once_it_registers():
    wire = Wire(SLOTS)
    client = wire.client()
    obj = next(o for o in OBJECTS if Ring(SLOTS).slot_for(o) == 0)
    ids = []
    for _ in range(3):
        call_id, frames = client.call(1, obj)
        ids.append(call_id)
        wire.send(client, frames)
    assert client.outcomes == {}
    w = wire.start_worker(0)
    assert [c.call_id for c in w.held] == ids
    while wire.answer(w):
        pass
    assert sorted(client.outcomes) == ids and all(type(v[0]) is m.Reply for v in client.outcomes.values())
