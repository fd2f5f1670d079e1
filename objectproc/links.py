"""Cluster mode: this slot registered with the other hosts' brokers (docs/cluster.md).

Each host's broker routes by the same ring; the object process of a slot registers with
its own host's broker (as on one host) and, through :class:`RemoteLinks`, with every other
live host's broker too (``cluster-hosts.json``, written by the supervisor), over TCP. So a
call made on any host reaches the slot in one hop from that host's broker, and each broker
keeps its own registration, incarnations, stub fencing and heartbeats for the slot as it
does for a local one.

A client id is unique only within its broker, so a call that came through link ``t`` is
seen here with the client ``b"R" + t + id`` (``R`` is no prefix a broker gives; it is not
``A``, so such a caller is never an operator), and what is sent to that client goes back
on link ``t`` with the prefix removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import zmq

from durable.errors import ProtocolError
from durable.protocol.heartbeat import Liveness
from durable.protocol.messages import (
    BrokerHeartbeat,
    ClientGone,
    PeerBatches,
    Ready,
    WorkerCall,
    WorkerDisconnect,
    WorkerError,
    WorkerHeartbeat,
    WorkerReply,
    WorkerSend,
    parse_from_broker_to_worker,
)
from durable.transport import LoopSocket

__all__ = ["RemoteLinks", "REMOTE"]

log = logging.getLogger("durable.objectproc")

REMOTE = b"R"
#: the first frame of each message that names a client in its second frame
_TO_CLIENT = {WorkerReply(b"", 0, b"", b"").encode()[0], WorkerError(b"", 0, "", "").encode()[0],
              WorkerSend(b"", [], b"t", b"").encode()[0]}


class _Link:
    __slots__ = ("host", "endpoint", "tag", "sock", "liveness", "incarnation")

    def __init__(self, host: str, endpoint: str, tag: bytes) -> None:
        self.host, self.endpoint, self.tag = host, endpoint, tag
        self.sock: LoopSocket | None = None
        self.liveness: Liveness | None = None
        self.incarnation = 0


class RemoteLinks:
    def __init__(self, slot: int, hosts_file: Path, own_endpoint: str, *, heartbeat: float,
                 misses: int, on_call: Callable[[WorkerCall], None],
                 on_client_gone: Callable[[bytes], None], stats: Callable[[], dict[str, Any]],
                 context: zmq.Context, curve: tuple[bytes, bytes, bytes] | None) -> None:
        self.slot = slot
        self.hosts_file = hosts_file
        self.own = own_endpoint
        self.heartbeat, self.misses = heartbeat, misses
        self.on_call, self.on_client_gone, self.stats = on_call, on_client_gone, stats
        self.ctx = context
        self.curve = curve  # the cluster's key: the other brokers admit only it
        self.links: dict[bytes, _Link] = {}  # tag -> link
        self._by_endpoint: dict[str, _Link] = {}
        self._mtime = 0
        self._next_tag = 1
        self.dropped = 0

    # -- which hosts ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Follow the supervisor's list of live hosts: a link for each other host's broker."""
        try:
            st = os.stat(self.hosts_file)
        except FileNotFoundError:
            return
        if st.st_mtime_ns == self._mtime:
            return
        self._mtime = st.st_mtime_ns
        try:
            hosts = orjson.loads(self.hosts_file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as e:
            log.warning("slot %d: cannot read %s: %s", self.slot, self.hosts_file, e)
            return
        want = {ep: h for h, ep in hosts.items() if isinstance(ep, str) and ep != self.own}
        log.info("slot %d: live hosts %s", self.slot, ", ".join(sorted(hosts)) or "none")
        for ep in [ep for ep in self._by_endpoint if ep not in want]:
            link = self._by_endpoint.pop(ep)
            self.links.pop(link.tag, None)
            if link.sock is not None:
                link.sock.close()
            log.info("slot %d: host %s left; no longer registered with its broker", self.slot,
                     link.host)
        for ep, host in want.items():
            if ep not in self._by_endpoint:
                tag = bytes([self._next_tag])
                self._next_tag = self._next_tag % 255 + 1
                link = _Link(host, ep, tag)
                self._by_endpoint[ep] = self.links[tag] = link
                self._register(link)

    def _register(self, link: _Link) -> None:
        if link.sock is not None:
            link.sock.close()
        link.sock = LoopSocket.dealer(link.endpoint, lambda f, lk=link: self._handle(lk, f),
                                      self.ctx, curve=self.curve)
        link.liveness = Liveness(self.heartbeat, self.misses)
        link.incarnation = secrets.randbits(62) | 1
        self._send_on(link, Ready(self.slot, os.getpid(), link.incarnation).encode())
        self._send_on(link, PeerBatches().encode())  # (its broker answers if it reads them)
        log.info("slot %d: registering with host %s's broker at %s", self.slot, link.host,
                 link.endpoint)

    # -- messages -------------------------------------------------------------------------
    def _handle(self, link: _Link, frames: list[bytes]) -> None:
        link.liveness.heard()
        try:
            msg = parse_from_broker_to_worker(frames)
        except ProtocolError as e:
            self.dropped += 1
            log.debug("dropped a malformed message from host %s's broker: %s", link.host, e)
            return
        if type(msg) is WorkerCall:
            msg.client = REMOTE + link.tag + msg.client
            self.on_call(msg)
        elif type(msg) is ClientGone:
            self.on_client_gone(REMOTE + link.tag + msg.client)
        elif type(msg) is WorkerDisconnect:
            log.warning("slot %d: host %s's broker asked to register again (%s)", self.slot,
                        link.host, msg.reason)
            self._register(link)
        elif type(msg) is BrokerHeartbeat:
            pass
        elif type(msg) is PeerBatches:  # a turn's answers to that host go as one
            link.sock.batches = True

    def route(self, frames: list[bytes]) -> bool:
        """Send ``frames`` on its link if it is addressed to a remote client (True), else
        leave it to the local broker (False). A message for a host gone is dropped."""
        if len(frames) < 2 or frames[0] not in _TO_CLIENT or frames[1][:1] != REMOTE:
            return False
        link = self.links.get(bytes(frames[1][1:2]))
        if link is not None:
            self._send_on(link, [frames[0], frames[1][2:], *frames[2:]])
        return True

    def _send_on(self, link: _Link, frames: list[bytes]) -> None:
        try:
            link.sock.send(frames)
        except zmq.ZMQError as e:
            log.warning("slot %d: could not send to host %s's broker: %s", self.slot,
                        link.host, e)
        link.liveness.sent()

    # -- timers ---------------------------------------------------------------------------
    def tick(self, stats_due: bool) -> None:
        """Heartbeats, and registering again with a broker fallen silent."""
        self.refresh()
        for link in list(self.links.values()):
            if not link.liveness.alive():
                link.sock.drain()
            if not link.liveness.alive():
                log.warning("slot %d: host %s's broker is silent; registering again",
                            self.slot, link.host)
                self._register(link)
            elif link.liveness.send_due() or stats_due:
                self._send_on(link, WorkerHeartbeat(self.stats()).encode())

    def beats(self) -> list[tuple[str, int]]:
        """(endpoint, incarnation) of each link, for the beat thread."""
        return [(lk.endpoint, lk.incarnation) for lk in list(self.links.values())]

    def close(self) -> None:
        for link in self.links.values():
            if link.sock is not None:
                with contextlib.suppress(Exception):
                    link.sock.close()
        self.links.clear()
        self._by_endpoint.clear()
