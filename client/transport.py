"""A zmq socket driven by the asyncio loop's reader callback: the thin zmq adapter.

zmq.asyncio turns every message into a future and a task wake-up; measured
here, that was ~250 µs of a 540 µs round trip. Instead the socket's ZMQ_FD is
registered with ``loop.add_reader``; when it fires, the callback drains the
socket until a receive finds nothing and hands each message to ``on_message``
directly.

ZMQ_FD is edge-triggered and any operation on the socket, a send included,
may consume the edge. So every drain reads until a receive finds nothing (which reads
ZeroMQ's pending commands, as ``ZMQ_EVENTS`` would), and after every send
``ZMQ_EVENTS`` is checked and a drain scheduled if input is waiting;
otherwise replies could sit unread while the loop sleeps.

The module's ``send_frames`` / ``recv_frames`` / ``has_input`` are the hot
path for every durable socket (the broker's too): pyzmq's multipart helpers
spend more time in IntFlag arithmetic than in libzmq.

Sends never block, and the order on the wire is kept: a message waits in a backlog
while other work is ready on the loop (the turn's messages then leave together, see
``LoopSocket.send``), or past the high-water mark (retried every millisecond by one
timer, and on the next drain or ``flush()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from .errors import ProtocolError
from .protocol.messages import BATCH, MAX_FRAME_BYTES, batch_runs, pack_batch, unpack_batch

__all__ = ["LoopSocket", "MAX_MESSAGE_BYTES", "configure", "send_frames", "recv_frames",
           "has_input"]

#: the largest message any durable socket accepts (a 32 MiB body plus headroom)
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES

_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_ZERO_COPY_FROM = zmq.COPY_THRESHOLD  # 64 KiB: below it pyzmq copies even with copy=False
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SRCFD = int(getattr(zmq, "SRCFD", 2))
#: the Cython socket's own ``send``: pyzmq's ``zmq.Socket.send`` is a Python method around it
#: that adds DRAFT options (``routing_id``, ``group``) and a keyword call, ~0.6 µs a frame
#: (a 6-frame message 3.2-4.0 µs against 6.9-7.8, measured)
_send = zmq.backend.Socket.send
#: the Cython socket's ``recv``, called with positional arguments: the keyword ``copy=False``
#: costs ~0.1 µs a frame to parse (a 7-frame message 6.2-6.4 µs against 7.0-7.2, measured)
_recv = zmq.backend.Socket.recv
#: the longest one drain of a socket holds the event loop before letting the rest run
DRAIN_SLICE = 0.05

log = logging.getLogger("durable.transport")


def configure(sock: zmq.Socket) -> zmq.Socket:
    """The options every durable peer socket uses: no linger, deep queues, bounded messages."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK)``, ~6 µs cheaper per message.

    pyzmq's ``send_multipart`` computes ``SNDMORE | flags`` on IntFlag enums
    for every frame, which costs more than the send itself (11.6 → 4.6 µs for
    a 5-frame message, measured here). libzmq checks the high-water mark and
    the peer on the first frame only, so a message still goes out whole or
    not at all (``zmq.Again`` / ``EHOSTUNREACH`` from the first ``send``).
    Frames of 64 KiB or more (request and response bodies) go zero-copy.
    """
    send = _send
    last = len(frames) - 1
    for i in range(last):
        f = frames[i]
        send(sock, f, _MORE_NOBLOCK, len(f) < _ZERO_COPY_FROM)
    f = frames[last]
    send(sock, f, _NOBLOCK, len(f) < _ZERO_COPY_FROM)


def recv_frames(sock: zmq.Socket, source: list[int] | None = None) -> list[bytes]:
    """``sock.recv_multipart(zmq.NOBLOCK)``, ~1.5 µs cheaper per message.

    pyzmq's version asks ``getsockopt(RCVMORE)`` after each frame, which maps
    the option through an IntFlag enum; a received ``Frame`` says ``more``
    itself. Raises ``zmq.Again`` if nothing is waiting (check
    :func:`has_input` first: an exception per empty drain costs ~2.6 µs).
    ``source``: its first item is set to the file descriptor of the connection the
    message came by (``ZMQ_SRCFD``; -1 if the library does not tell).
    """
    recv = _recv
    frame = recv(sock, _NOBLOCK, False)
    if source is not None:
        try:
            source[0] = frame.get(_SRCFD)
        except zmq.ZMQError:
            source[0] = -1
    parts = [frame.bytes]
    while frame.more:
        frame = recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


def has_input(sock: zmq.Socket) -> bool:
    """Whether a whole message can be received now (``ZMQ_EVENTS`` has ``POLLIN``)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


_MONITOR_EVENT = struct.Struct("=HI")


def monitor_event(frames: list[bytes]) -> tuple[int, int] | None:
    """A socket monitor's message as ``(event, value)`` (the value of ``DISCONNECTED`` and
    ``ACCEPTED`` is the connection's file descriptor); None if it is not one.

    (Not ``zmq.utils.monitor.parse_monitor_message``: pyzmq 27 returns the value as a
    ``zmq.Event`` flag, a descriptor of 7 reading as ``CONNECTED|CONNECT_DELAYED|...``, and
    it raises RuntimeError for a malformed message, where one frame is all this needs.)"""
    if not frames or len(frames[0]) != _MONITOR_EVENT.size:
        return None
    return _MONITOR_EVENT.unpack(frames[0])


def pending_events(mon: zmq.Socket) -> list[tuple[int, int]]:
    """The monitor's events waiting now: asked before a message is handled, so that the
    loop knows of a connection that closed even when its own reader has not run yet."""
    out = []
    while has_input(mon):
        try:
            event = monitor_event(mon.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError:
            break
        if event is not None:
            out.append(event)
    return out


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None],
                 loop: asyncio.AbstractEventLoop | None = None,
                 on_unreachable: Callable[[list[bytes]], None] | None = None,
                 note_source: bool = False) -> None:
        self.sock = sock
        #: with ``note_source``: ``[fd]`` of the connection the message being handled came by
        self.source: list[int] | None = [-1] if note_source else None
        self.on_message = on_message
        #: if set, a received batch's messages are handed over together, as a list (a
        #: reader that looks at what came after a message: the object process's ClientGone)
        self.on_batch: Callable[[list[list[bytes]]], None] | None = None
        #: a ROUTER_MANDATORY socket's: a message for a peer that is gone is dropped and
        #: handed here (queued or not), instead of raising EHOSTUNREACH
        self.on_unreachable = on_unreachable
        self.loop = loop or asyncio.get_running_loop()
        #: To whom a turn's messages leave as one batch (``PBATCH``): for a DEALER, True once
        #: its peer said it reads them; for a ROUTER, the routing ids of the peers that did.
        #: Received batches are read whatever this says.
        self.batches: bool | set[bytes] = False
        self._router = sock.getsockopt(zmq.TYPE) == zmq.ROUTER
        #: batches received whose counts did not match their frames (dropped whole)
        self.malformed_batches = 0
        #: while ``on_message`` runs: the message's place in its batch (0: the first, or a
        #: message alone). The rest of a batch came with the first, by the same connection.
        self.in_batch = 0
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._backlog: deque[list[bytes]] = deque()
        self._closed = False
        self._flush_due = False  # (a flush of the backlog is scheduled this turn)
        self._retry_due = False  # (a flush is scheduled after the peer refused one: zmq.Again)
        #: the loop's callbacks still to run this turn (CPython's asyncio keeps them in a deque)
        self._ready: Any = getattr(self.loop, "_ready", ())
        self.loop.add_reader(self._fd, self._drain)
        # Ask ZMQ_EVENTS once now: until a socket's input is first checked, its pipes do not
        # signal new messages (a socket that never sends, like a monitor's, never heard one).
        self._check_input()

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._backlog:
            self.flush()
        sock = self.sock
        n = 0
        until = time.monotonic() + DRAIN_SLICE
        while not self._closed:
            # Received until the socket has none: a receive that finds none has read ZeroMQ's
            # commands (its descriptor's edge is consumed, as by ZMQ_EVENTS). Asking
            # ZMQ_EVENTS before each message instead costs a poll() system call per message
            # (~2.7 µs here), where a receive from the queue makes none.
            try:
                frames = recv_frames(sock, self.source)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                if not self._closed:
                    log.warning("receive failed: %s", e)
                return
            try:
                if frames[0] == BATCH or (self._router and len(frames) > 1 and frames[1] == BATCH):
                    self._unbatch(frames)
                else:
                    self.on_message(frames)
            except Exception:  # a bug must cost one message, never the receive path
                log.exception("internal error while handling a message; it was dropped")
            n += 1
            if not n & 7 and time.monotonic() > until:
                # A flood (100,000 replies on a slow CPU: > 15 s) must not hold the loop:
                # the rest of it (heartbeats, other sockets, timers) runs, then we go on.
                self._scheduled = True
                self.loop.call_soon(self._drain)
                return

    def _unbatch(self, frames: list[bytes]) -> None:
        """Each message of a received batch, in its order (a ROUTER's with the sender's id)."""
        try:
            msgs = unpack_batch(frames[1:] if frames[0] != BATCH else frames)
        except ProtocolError as e:
            self.malformed_batches += 1
            log.debug("dropped a malformed batch: %s", e)
            return
        rid = frames[0] if frames[0] != BATCH else None
        if self.on_batch is not None:
            try:
                self.on_batch(msgs if rid is None else [[rid, *m] for m in msgs])
            except Exception:
                log.exception("internal error while handling a batch; it was dropped")
            return
        try:
            for i, m in enumerate(msgs):
                if self._closed:
                    return
                self.in_batch = i
                try:
                    self.on_message(m if rid is None else [rid, *m])
                except Exception:
                    log.exception("internal error while handling a message; it was dropped")
        finally:
            self.in_batch = 0

    def drain(self) -> None:
        """Handle whatever is waiting now (e.g. before concluding that the peer fell silent)."""
        self._drain()

    def _check_input(self) -> None:
        if not self._scheduled and not self._closed and self.sock.getsockopt(_EVENTS) & _POLLIN:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def send(self, frames: list[bytes]) -> None:
        """Send now if nothing else is ready on the loop; else queue it, and the turn's
        messages leave back to back once that work has run, in order.

        Why: each message that finds ZMQ's I/O thread asleep wakes it, and then the peer's
        I/O thread and event loop. Sent back to back (~4 at a time under load, measured),
        messages share those wake-ups: calls with 64 in flight 3-11% faster, ~5% less CPU per
        HTTP counter request. A lone call's message still leaves at once (docs/messaging.md).
        """
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
        if not self._backlog and not self._ready:  # (the turn's last work: no one to wait for)
            try:
                send_frames(self.sock, frames)
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or self.on_unreachable is None:
                    raise
                self.on_unreachable(frames)
                self._check_input()
                return
            else:
                self._check_input()
                return
        self._backlog.append(frames)
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush_soon)

    def send_queued(self) -> None:
        """Send what :meth:`send` queued now, not after the rest of the turn's ready work.

        Why: the object process calls it once the calls woken by a durable group have
        queued their replies (``SlotStore.after_durable``). The turn's flush would run only
        after that turn's new input had been read and handled, ~1 ms later on this VM, while
        the replies' callers wait: with 64 calls in flight, new objects 1-13% faster in 4
        pairs (docs/messaging.md, "Replies leave before the next calls are read")."""
        if self._backlog:
            self._flush_soon()

    def _retry(self) -> None:
        self._retry_due = False
        self._flush_soon()

    def _flush_soon(self) -> None:
        self._flush_due = False
        try:
            self.flush()
        except zmq.ZMQError as e:  # (not Again, nor a gone peer: the socket itself failed)
            if not self._closed:
                log.warning("send failed, %d message(s) dropped: %s", len(self._backlog), e)
            self._backlog.clear()

    def flush(self) -> None:
        if self.batches and len(self._backlog) > 1 and not self._closed:
            self._flush_batches()
        while self._backlog and not self._closed:
            try:
                send_frames(self.sock, self._backlog[0])
            except zmq.Again:  # (the peer is not keeping up: try again in a millisecond,
                if not self._retry_due:  # one timer however many sends wait)
                    self._retry_due = True
                    self.loop.call_later(0.001, self._retry)
                break
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or self.on_unreachable is None:
                    raise
                self.on_unreachable(self._backlog.popleft())
                continue
            self._backlog.popleft()
        self._check_input()

    def _flush_batches(self) -> None:
        """Send the backlog with each peer's messages as batches (its order kept; the order
        between peers is no one's to see). A message with a frame of 64 KiB or more leaves
        alone (zero-copy), and a batch closes at 255 messages or 1 MiB. What ZeroMQ refuses
        (``zmq.Again``) goes back to the backlog's front as it was, for the retry."""
        msgs, router, to = list(self._backlog), self._router, self.batches
        self._backlog.clear()
        groups: dict[bytes | None, list[list[bytes]]] = {}
        for m in msgs:
            groups.setdefault(m[0] if router else None, []).append(m)
        parts: list[list[list[bytes]]] = []  # (each sent as one message)
        skip = 1 if router else 0
        for rid, group in groups.items():
            if len(group) == 1 or (router and rid not in to):  # type: ignore[operator]
                parts.extend([m] for m in group)
            else:
                parts += batch_runs(group)
        for i, part in enumerate(parts):
            if len(part) == 1:
                frames = part[0]
            elif skip:
                frames = [part[0][0], *pack_batch([m[1:] for m in part])]
            else:
                frames = pack_batch(part)
            try:
                send_frames(self.sock, frames)
            except zmq.Again:
                self._backlog.extendleft(reversed([m for p in parts[i:] for m in p]))
                return
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or self.on_unreachable is None:
                    self._backlog.extendleft(reversed([m for p in parts[i + 1:] for m in p]))
                    raise
                for m in part:
                    self.on_unreachable(m)

    @classmethod
    def dealer(cls, endpoint: str, on_message: Callable[[list[bytes]], None],
               context: zmq.Context | None = None,
               curve: tuple[bytes, bytes, bytes] | None = None) -> LoopSocket:
        """A DEALER connected to ``endpoint``, with the options every durable peer uses.

        ``curve`` is (server public key, our public key, our secret key) for CurveZMQ.
        """
        sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        if curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
        configure(sock)
        sock.connect(endpoint)
        return cls(sock, on_message)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def close(self, linger: int = 0) -> None:
        """``linger``: ms that messages still queued may take to leave (else dropped)."""
        if self._closed:
            return
        with contextlib.suppress(zmq.ZMQError):  # (what this turn sent leaves, as it would
            self.flush()                          # have before sends waited for the turn's end)
        self._closed = True
        self.loop.remove_reader(self._fd)
        self.sock.close(linger=linger)
