"""The callee's side of the peer path (``durable.peers`` has the caller's, and why).

One ROUTER at ``ipc://RUN_DIR/peer-<slot>.sock``, bound once the slot's storage is open (so
only the process that serves the slot holds it). It answers PHELLO with the incarnation this
process registered with the broker, and takes PCALLs: one bound to another incarnation is
refused with ``StubBrokenError``; for one whose object id is not this namespace's or not
placed on this slot, the caller hears why, as the broker would tell it. The rest become the
``WorkerCall`` the broker would have delivered, with the client ``PEER + routing id``, and
their answers go back on the ROUTER (``send``).

A caller that went away is noticed as the broker notices one: a send to it fails
(``ROUTER_MANDATORY``), or, when a peer's connection drops (the socket monitor), each peer
that said PHELLO is asked again; one that is gone ends its WebSockets and streams here
(``on_gone``).

What a caller sent before its connection closed is not run once this process knows of the
close (the monitor's DISCONNECTED, asked before each message, against the connection each
message came by): the caller heard its link break ("may have run") and went on, perhaps by
another path (a gateway's client by a link of its own, after the HTTP front that relayed
its request died). Read late, by a loop held meanwhile, such a call ran after the next one
(the chaos soak saw a writer's tokens out of order). A message read before the close is
known still runs; so may one whose connection's descriptor a new connection took already.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable
from typing import Any

import zmq

from durable.broker.ring import Ring
from durable.errors import InvalidIdError, StubBrokenError, UnknownNamespaceError
from durable.ids import IdFactory
from durable.peers import peer_endpoint
from durable.protocol.messages import (
    FROM_PEER,
    PEER,
    Error,
    PeerBatches,
    PeerBye,
    PeerCall,
    PeerHello,
    PeerWelcome,
    WorkerCall,
    parse,
    to_client,
)
from durable.transport import LoopSocket, configure, monitor_event, pending_events

__all__ = ["PeerServer"]

log = logging.getLogger("durable.objectproc")

#: ids already checked (MAC and ring): cleared when full, as the broker's
_CHECKED_MAX = 65_536


class PeerServer:
    def __init__(self, run_dir: str, slot: int, ring: Ring, ids: dict[str, IdFactory],
                 incarnation: Callable[[], int], deliver: Callable[[WorkerCall], None],
                 on_gone: Callable[[bytes], None], context: zmq.Context[Any]) -> None:
        self.slot = slot
        self.ring = ring
        self.ids = ids
        self.incarnation = incarnation
        self.deliver = deliver
        self.on_gone = on_gone
        self.endpoint = peer_endpoint(run_dir, slot)
        self.peers: set[bytes] = set()  # routing ids of the callers that said PHELLO
        self.batched: set[bytes] = set()  # ...and of those that read batches (PBATCHES)
        self.stopping = False  # said PBYE: no more PWELCOMEs
        self._checked: set[tuple[str, str]] = set()
        self.counters = {"peer_calls_served": 0, "peer_calls_refused": 0,
                         "dropped_peer_messages": 0, "peer_callers_gone": 0,
                         "peer_calls_of_closed_links": 0}
        #: descriptors of this socket's connections that closed (until a new one takes one)
        self._closed_fds: set[int] = set()
        sock = configure(context.socket(zmq.ROUTER))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self.endpoint)
            # only this user's processes: with broker.socket_group the run dir is the group's
            os.chmod(self.endpoint[len("ipc://"):], 0o600)
        except (zmq.ZMQError, OSError):
            sock.close(linger=0)
            raise
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self.sock = LoopSocket(sock, self._message, on_unreachable=self._unreachable,
                               note_source=True)
        self.sock.batches = self.batched  # (a turn's answers to one of them leave as one)
        self.monitor = LoopSocket(mon, self._event)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.sock.disable_monitor()
        self.monitor.close()
        self.sock.close(linger=200)  # (answers already sent leave)

    # -- out ------------------------------------------------------------------------------
    def send(self, frames: list[bytes]) -> None:
        """An answer for a peer caller (frames as for the broker: WREPLY, WERROR, WSEND)."""
        out = to_client(frames)
        if out is not None:
            self._to(frames[1], out)

    def _to(self, client: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send([client[1:], *frames])
        except zmq.ZMQError as e:  # (the socket closed under us: shutting down)
            log.warning("slot %d: could not answer a peer: %s", self.slot, e)

    def _unreachable(self, frames: list[bytes]) -> None:
        """A send to a caller that is gone (``ROUTER_MANDATORY``): it went away."""
        rid = frames[0]
        self.batched.discard(rid)
        if rid in self.peers:
            self.peers.discard(rid)
            self.counters["peer_callers_gone"] += 1
        # (later, not inside the send that found it: its sockets' closes send too)
        self.sock.loop.call_soon(self.on_gone, PEER + rid, context=contextvars.Context())

    def bye(self) -> None:
        """This process is stopping: callers make no new stubs on their links to it (their
        new calls wait in the broker for the next process); calls already sent are served."""
        self.stopping = True
        if self.incarnation():
            bye = PeerBye(self.slot, self.incarnation()).encode()
            for rid in list(self.peers):
                self._to(PEER + rid, bye)

    def welcome_all(self) -> None:
        """Each caller hears the incarnation again: after this process registered anew, and
        as the probe that finds callers that went away."""
        if self.sock._closed or not self.incarnation() or self.stopping:
            return
        welcome = PeerWelcome(self.slot, self.incarnation()).encode()
        for rid in list(self.peers):
            self._to(PEER + rid, welcome)

    # -- in -------------------------------------------------------------------------------
    def _message(self, frames: list[bytes]) -> None:
        if not self.sock.in_batch:  # (a batch's messages came together: asked at its first)
            for event, fd in pending_events(self.monitor.sock):  # (closes the loop has not seen)
                self._on_event(event, fd)
        if self._closed_fds and self.sock.source is not None \
                and self.sock.source[0] in self._closed_fds:
            self.counters["peer_calls_of_closed_links"] += 1
            log.debug("dropped a message of a peer connection that closed before it was read")
            return
        rid = frames[0]
        try:
            msg = parse(frames[1:], FROM_PEER)
        except Exception as e:  # (ProtocolError; or no frames after the routing id)
            self.counters["dropped_peer_messages"] += 1
            log.debug("dropped a malformed peer message: %s", e)
            return
        if type(msg) is PeerBatches:
            if rid in self.peers:  # (after its PHELLO: pruned with it when it goes away)
                self.batched.add(rid)
                self._to(PEER + rid, PeerBatches().encode())
            return
        if type(msg) is PeerHello:
            self.peers.add(rid)
            if self.incarnation() and not self.stopping:  # (else: once it has registered)
                self._to(PEER + rid, PeerWelcome(self.slot, self.incarnation()).encode())
            return
        self._call(rid, msg)

    def _call(self, rid: bytes, msg: PeerCall) -> None:
        client = PEER + rid
        why = self._refusal(msg)
        if why is not None:
            self.counters["peer_calls_refused"] += 1
            cls, text = why
            self._to(client, Error(msg.call_id, cls.code, text).encode())
            return
        self.counters["peer_calls_served"] += 1
        self.deliver(WorkerCall(client, msg.call_id, msg.namespace, msg.object_id, msg.head,
                                msg.body, msg.name))

    def _refusal(self, msg: PeerCall) -> tuple[type, str] | None:
        if msg.incarnation != self.incarnation():
            return StubBrokenError, (
                f"stub lost its object (slot {self.slot}: its process registered anew or "
                "restarted since this stub's first call); get a new stub with "
                "namespace.get(id) and retry if the call is safe to repeat")
        key = (msg.namespace, msg.object_id)
        if key in self._checked:
            return None
        ids = self.ids.get(msg.namespace)
        if ids is None:
            return UnknownNamespaceError, f"namespace {msg.namespace!r} is not configured"
        # (a name that makes the id proves the id too; its id is then remembered for the
        # object process's own check of the name, `_name_matches`: two HMACs instead of three)
        if msg.name is None or ids.hex_from_name(msg.name) != msg.object_id:
            try:
                ids.from_string(msg.object_id)
            except InvalidIdError as e:
                return InvalidIdError, str(e)
        if self.ring.slot_for(msg.object_id) != self.slot:
            return StubBrokenError, (f"{msg.object_id} is not placed on slot {self.slot}; "
                                     "get a new stub with namespace.get(id)")
        if len(self._checked) >= _CHECKED_MAX:
            self._checked.clear()
        self._checked.add(key)
        return None

    def _event(self, frames: list[bytes]) -> None:
        event = monitor_event(frames)
        if event is not None:
            self._on_event(*event)

    def _on_event(self, event: int, fd: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self._closed_fds.discard(fd)  # (a new connection has that descriptor now)
        elif event == zmq.EVENT_DISCONNECTED:  # whose? ask each caller: a gone one fails
            self._closed_fds.add(fd)
            self.welcome_all()
            # (the socket may learn of the lost pipe a moment after its monitor does)
            self.sock.loop.call_later(0.2, self.welcome_all)
