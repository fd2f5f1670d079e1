"""The peer path: an object process's calls to the other slots of its host, without the broker.

A call from an object (or the slots front) to an object of another slot used to cross the
broker twice (out and back), and each crossing is a wake-up of the broker's loop. On one host
the callee's process is reachable directly: each object process binds a ROUTER at
``ipc://RUN_DIR/peer-<slot>.sock`` (the run dir is 0700) and every other object process of the
host connects one DEALER to it (a :class:`PeerLink`). The broker stays the authority on which
process serves a slot; the link learns it from the callee itself:

- the caller says PHELLO and the callee answers PWELCOME with the incarnation it registered
  with the broker (and again to every peer whenever it registers anew);
- a stub's path is fixed when it is made (E-order): in-process, else this link if it has an
  incarnation, else the broker. A peer stub is bound to that incarnation: the caller refuses to
  send once the link's incarnation changed, and the callee refuses (``StubBrokenError``) a
  PCALL bound to another one, so a stale stub never reaches a new process;
- a callee that stops gracefully (SIGTERM, a reload) says PBYE first: new stubs go by the
  broker (which queues their calls until the next process registers), the calls in flight
  are answered, and stubs bound to it break at their next call;
- the link's socket monitor sees the callee's connection drop (at once on ipc when it dies):
  the link has no incarnation until a new PWELCOME, the calls in flight on it fail with
  ``StubBrokenError`` and the WebSockets and streams of its stubs end (1012), as the broker
  does for stubs of a process that went away;
- answers come back as the broker would send them (REPLY, ERROR, CHANNEL) and go to the
  client's own handler. At most ``PEER_INFLIGHT`` calls wait on a link (the broker's bound
  per client), then ``OverloadedError``.

Cluster mode keeps the broker path (the lease decides there who serves a slot).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .errors import StubBrokenError
from .protocol.messages import TO_PEER, Cmd, PeerBatches, PeerHello, header, parse
from .transport import LoopSocket, configure

if TYPE_CHECKING:
    from .client import Client

__all__ = ["PeerLink", "PeerRoutes", "PEER_INFLIGHT", "peer_endpoint"]

log = logging.getLogger("durable.client")

#: calls in flight on one link at most (as the broker bounds one client's)
PEER_INFLIGHT = 10_000
_WELCOME = header(Cmd.PWELCOME)
_BYE = header(Cmd.PBYE)
_BATCHES = header(Cmd.PBATCHES)
#: what a callee may send a caller besides PWELCOME: the client's own answers
_ANSWERS = frozenset((header(Cmd.REPLY), header(Cmd.ERROR), header(Cmd.CHANNEL)))
_EVENT = struct.Struct("=HI")


def peer_endpoint(run_dir: str, slot: int | str) -> str:
    return f"ipc://{run_dir}/peer-{slot}.sock"


class PeerLink:
    """This process's DEALER to one other slot's process, and what it knows of it."""

    __slots__ = ("slot", "endpoint", "sock", "monitor", "incarnation", "stopping", "inflight",
                 "dropped")

    def __init__(self, slot: int, endpoint: str) -> None:
        self.slot = slot
        self.endpoint = endpoint
        self.sock: LoopSocket | None = None
        self.monitor: LoopSocket | None = None
        #: the callee's incarnation as it last said (0: no answer yet, or its connection dropped)
        self.incarnation = 0
        self.stopping = 0  # the incarnation that said PBYE: its calls in flight are answered
        self.inflight = 0
        self.dropped = 0  # messages from the callee that were not answers (never expected)


class PeerRoutes:
    """The links of one object process's client to the other slots' processes."""

    def __init__(self, client: Client, slot_for: Callable[[str], int], own_slot: int,
                 endpoints: dict[int, str], context: zmq.Context[Any] | None = None) -> None:
        self.client = client
        self.slot_for = slot_for
        self.own_slot = own_slot
        self._ctx = context or zmq.Context.instance()
        self.links = {s: PeerLink(s, e) for s, e in endpoints.items() if s != own_slot}
        self.counters = {"peer_calls": 0, "peer_links_lost": 0}

    def start(self) -> None:
        for link in self.links.values():
            sock = configure(self._ctx.socket(zmq.DEALER))
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(link.endpoint)
            link.sock = LoopSocket(sock, lambda f, link=link: self._message(link, f))
            link.monitor = LoopSocket(mon, lambda f, link=link: self._event(link, f))
            self._hello(link)  # (queued until the callee is there)

    @staticmethod
    def _hello(link: PeerLink) -> None:
        """PHELLO, and that this side reads batches: the callee's own PBATCHES answer lets
        this side send them (a callee of an older release never answers it)."""
        link.sock.batches = False
        link.sock.send(PeerHello().encode())
        link.sock.send(PeerBatches().encode())

    def close(self, linger: int = 0) -> None:
        for link in self.links.values():
            if link.sock is not None:
                link.sock.sock.disable_monitor()
                link.monitor.close()
                link.sock.close(linger=linger)
                link.sock = link.monitor = None
            link.incarnation = 0

    def link_for(self, object_id: str) -> PeerLink | None:
        """The live link to the process serving this object's slot, if there is one."""
        return self.link_at(self.slot_for(object_id))

    def link_at(self, slot: int) -> PeerLink | None:
        link = self.links.get(slot)
        return link if link is not None and link.incarnation else None

    # -- from the callee ------------------------------------------------------------------
    def _message(self, link: PeerLink, frames: list[bytes]) -> None:
        if frames[0] in _ANSWERS:
            self.client._handle_answer(frames)
            return
        if frames[0] == _BATCHES and len(frames) == 1:
            link.sock.batches = True
            return
        if frames[0] == _WELCOME or frames[0] == _BYE:
            try:
                msg = parse(frames, TO_PEER)
            except Exception as e:
                link.dropped += 1
                log.warning("dropped a malformed message from slot %d: %s", link.slot, e)
                return
            if msg.slot != link.slot:
                link.dropped += 1
                log.warning("the process at %s says it serves slot %d, not %d: ignored",
                            link.endpoint, msg.slot, link.slot)
                return
            if frames[0] == _BYE:
                if msg.incarnation == link.incarnation:
                    link.stopping, link.incarnation = link.incarnation, 0
                return
            if link.incarnation and msg.incarnation != link.incarnation:
                # the same process registered again (a new broker): what was bound ends, but
                # its calls in flight are answered by it (run, or refused if they came late)
                self._lost(link, link.incarnation,
                           "the object's process registered again with the broker", calls=False)
            link.incarnation = msg.incarnation
            return
        link.dropped += 1

    def _event(self, link: PeerLink, frames: list[bytes]) -> None:
        if len(frames) < 1 or len(frames[0]) != 6:
            return
        event, _value = _EVENT.unpack(frames[0])
        if event == zmq.EVENT_DISCONNECTED:
            if link.sock is not None:  # answers sent before it went are answers
                link.sock.drain()
            self.counters["peer_links_lost"] += 1
            # (Should this loop have stalled long enough for a new process's PWELCOME to be
            # read first, the stubs made since then break too: a spurious StubBrokenError,
            # never a call served by the wrong incarnation, which the callee refuses.)
            # (every call on the link: those of an incarnation it replaced are unanswered too)
            self._lost(link, None, f"its process (slot {link.slot}) went away")
            link.incarnation = link.stopping = 0
            if link.sock is not None:  # ask whoever serves the slot next
                self._hello(link)

    def _lost(self, link: PeerLink, old: int | None, why: str, calls: bool = True) -> None:
        """The stubs bound to the link's incarnation ``old`` (None: any) break: their calls in
        flight fail now (``calls``: the process is gone), their WebSockets and streams end
        with 1012."""
        err = StubBrokenError(f"stub lost its object ({why}); get a new stub with "
                              "namespace.get(id) and retry if the call is safe to repeat")
        client = self.client
        for fut, stub in list(client._pending.values()) if calls else ():
            if stub is not None and stub._peer is link and old in (None, stub._peer_inc):
                if stub._broken is None:
                    stub._broken = err
                if not fut.done():
                    fut.set_exception(err)
        for ch in list(client._channels.values()):
            stub = ch.stub
            if stub is not None and stub._peer is link and old in (None, stub._peer_inc):
                if stub._broken is None:
                    stub._broken = err
                ch.lost(1012, "the object's process restarted")

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "peer_links_up": sum(1 for k in self.links.values() if k.incarnation),
                "peer_inflight": sum(k.inflight for k in self.links.values())}

