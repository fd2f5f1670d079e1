"""What the peer path's callee refuses, and what its checks cost: pure logic, no socket."""

from __future__ import annotations

import pytest

import durable.ids
from durable.broker.ring import Ring
from durable.errors import InvalidIdError, StubBrokenError, UnknownNamespaceError
from durable.ids import IdFactory, namespace_key
from durable.objectproc.peers import PeerServer
from durable.protocol.messages import PeerCall

SLOT, SLOTS = 1, 2


def _server() -> PeerServer:
    server = object.__new__(PeerServer)  # (its checks only: no socket)
    server.slot = SLOT
    server.ring = Ring(SLOTS)
    server.ids = {"C": IdFactory("C", namespace_key(b"s" * 32, "C"))}
    server.incarnation = lambda: 7
    server._checked = set()
    return server


def _call(object_id: str, name: str | None = None, incarnation: int = 7) -> PeerCall:
    return PeerCall(incarnation, 1, "C", object_id, b"[]", b"", name)


def _named_here(ids: IdFactory, ring: Ring, on_slot: bool = True) -> tuple[str, str]:
    for i in range(1000):
        oid = str(ids.from_name(f"n{i}-{on_slot}"))
        if (ring.slot_for(oid) == SLOT) == on_slot:
            return f"n{i}-{on_slot}", oid
    raise AssertionError("no name placed as asked")


@pytest.fixture
def macs(monkeypatch):
    """How many HMACs durable.ids computes."""
    count = [0]
    real = IdFactory._hmac

    def counting(self, msg):  # noqa: ANN001, ANN202
        count[0] += 1
        return real(self, msg)

    monkeypatch.setattr(IdFactory, "_hmac", counting)
    return count


def test_a_named_call_costs_two_macs_with_the_object_processes_own_check_of_the_name(macs):
    server = _server()
    ids = server.ids["C"]
    name, oid = _named_here(ids, server.ring)
    durable.ids._NAMED.clear()
    macs[0] = 0
    assert server._refusal(_call(oid, name)) is None
    # (the object process then checks the name, as `ObjectProcess._name_matches` does)
    assert str(ids.from_name(name)) == oid
    assert macs[0] == 2  # (three before: the id's MAC, then the name's two)


def test_a_forged_id_is_refused_whatever_name_comes_with_it():
    server = _server()
    name, oid = _named_here(server.ids["C"], server.ring)
    forged = oid[:-1] + ("0" if oid[-1] != "0" else "1")
    kind, text = server._refusal(_call(forged, name))
    assert kind is InvalidIdError and "was not issued" in text
    kind, _ = server._refusal(_call(forged))
    assert kind is InvalidIdError
    kind, text = server._refusal(_call("zz"))
    assert kind is InvalidIdError and "64 lowercase hex" in text


def test_a_real_id_with_a_name_that_does_not_make_it_is_served_without_the_name():
    """The id is valid, so the call is served; the name is a lie, which the object process's
    own check (``_name_matches``) finds, so the object never takes it."""
    server = _server()
    ids = server.ids["C"]
    _, oid = _named_here(ids, server.ring)
    assert server._refusal(_call(oid, "another name")) is None
    assert str(ids.from_name("another name")) != oid


def test_refusals_of_the_incarnation_the_slot_and_the_namespace():
    server = _server()
    ids = server.ids["C"]
    name, oid = _named_here(ids, server.ring)
    kind, _ = server._refusal(_call(oid, name, incarnation=6))
    assert kind is StubBrokenError
    elsewhere_name, elsewhere = _named_here(ids, server.ring, on_slot=False)
    kind, text = server._refusal(_call(elsewhere, elsewhere_name))
    assert kind is StubBrokenError and f"slot {SLOT}" in text
    call = PeerCall(7, 1, "D", oid, b"[]", b"", None)
    kind, _ = server._refusal(call)
    assert kind is UnknownNamespaceError
