"""The broker's routing state, without sockets: messages in, sends out (h11-style).

``RouterCore`` is fed each message's frames (``client_message``,
``worker_message``, ``control_message``) and the clock (``tick``); what it
wants sent accumulates in ``outbox`` as ``(to_worker, identity, frames)``,
in order. The socket loop in ``router.py`` sends them, and reports a peer
it could not reach (``worker_unreachable``). Unit tests drive it directly.

Rules this file keeps:

* **Registration before traffic.** An object process sends READY (slot, pid,
  incarnation) before anything else; anything else from an unknown peer gets
  WDISCONNECT, which makes it register again. A client sends HELLO first;
  anything else from an unknown client gets DISCONNECT. Each READY starts a
  new incarnation of its slot, and ends the previous one.
* **Placement.** ``Ring.slot_for(object id)``; ids are checked against the
  namespace's key before anything is routed.
* **Stubs.** A stub is bound to ``(slot, incarnation)`` by its first call that
  is dispatched. A call on a stub whose binding is not the slot's current
  incarnation fails with ``stub_broken``, and so does every call in flight
  when an incarnation ends (crash, restart, missed heartbeats). Since the
  binding lives here, pipelined calls sent after the failure also fail: the
  new incarnation never sees them out of order.
* **Down slots.** Calls for a slot with no process wait in a bounded FIFO
  queue (``overloaded`` when full) until it registers, or until their
  deadline (``timeout``), and are dispatched in order.
* **Deadlines.** A dispatched call leaves the broker at its ``timeout_ms``
  (``timeout``); its late reply is dropped as a stray.
* **Channels.** An object process's WSEND goes to its client as CHANNEL (one
  message for many WebSockets of that client). When an incarnation ends, each
  client hears which of its stubs were bound to it (BROKEN: their sockets
  close with 1012); when a client leaves (expired, HELLO again, or the
  supervisor saw its process exit), every object process hears it (WGONE).
* **Who may do what.** Identities carry the socket they came from as a
  prefix: ``F`` the local ipc endpoint, ``A`` the operator endpoint, ``P``
  the CurveZMQ endpoints. A ``P`` client gets the id keys of, and may call,
  only the namespaces its key is allowed, and gets no statistics.
* **Batches.** A client that says PBATCHES after HELLO, and an object process
  that says it after READY, hear PBATCHES back; the socket loop may then send
  it several messages as one (``reads_batches``). The mark goes with the
  client's or the incarnation's state: a HELLO or READY again starts without it.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from durable.errors import (
    CallTimeoutError,
    DurableError,
    InvalidIdError,
    OverloadedError,
    ProtocolError,
    StorageCorruptError,
    StubBrokenError,
    UnknownNamespaceError,
)
from durable.ids import IdFactory
from durable.protocol.heartbeat import MISSES, Liveness
from durable.protocol.messages import (
    CONTROL,
    EVENT,
    FROM_CLIENT,
    FROM_WORKER,
    MAX_FRAME_BYTES,
    AskAlive,
    Beat,
    Broken,
    BrokerHeartbeat,
    Call,
    ClientGone,
    Direction,
    Disconnect,
    Drop,
    Error,
    Hello,
    PeerBatches,
    Ping,
    Pong,
    Ready,
    Stats,
    StatsReply,
    StillAlive,
    Welcome,
    WorkerCall,
    WorkerDisconnect,
    WorkerError,
    WorkerHeartbeat,
    WorkerReply,
    WorkerSend,
    WorkerStopping,
    parse,
    to_client,
)
from durable.supervisor.config import BrokerSettings as _SETTINGS

from .ring import Ring

__all__ = ["RouterCore", "BrokerConfig", "Send"]

_PLACED_MAX = 16_384  # ~5 MiB of broker memory at most
_DEADLINE_SWEEP = 0.25  # seconds between sweeps for calls past their deadline
_BUSY_TICK = 0.1  # the longest wait for a message while calls are queued or in flight
_LEAST_TICK = 0.01  # the shortest (a heartbeat due now is sent by the tick that follows)
_CLIENTS_SHOWN = 50  # statistics list at most this many clients (the busiest)

log = logging.getLogger("durable.broker")

#: (to_worker, identity, frames): one message the socket loop is to send
Send = tuple[bool, bytes, list[bytes]]


@dataclass
class BrokerConfig:
    frontend: str
    backend: str
    slots: int
    namespaces: dict[str, bytes]  # name -> id key
    # Defaults come from the daemon's settings (supervisor/config.py), the one place for them.
    queue_limit: int = _SETTINGS.queue_limit
    queue_deadline: float = _SETTINGS.queue_deadline
    client_inflight_limit: int = _SETTINGS.client_inflight_limit
    heartbeat: float = _SETTINGS.heartbeat
    misses: int = MISSES
    client_misses: int = 30
    max_message_bytes: int = MAX_FRAME_BYTES
    burst: int = 1000
    control: str | None = None  # the supervisor's PUSH endpoint (ipc in the 0700 run dir)
    admin: str | None = None  # the operator endpoint (ipc in the 0700 run dir)
    #: TCP client endpoints, with CurveZMQ (the supervisor refuses them without keys)
    public: list[str] = field(default_factory=list)
    curve_secret_key_file: str | None = None  # the broker's key pair (durable keygen)
    authorized_keys_dir: str | None = None  # public keys of the clients allowed in
    #: the group that may connect to the (ipc) client socket; every other socket stays 0600
    socket_group: str | None = None
    #: cluster mode: where the other hosts' object processes register (docs/cluster.md)
    backend_extra: list[str] = field(default_factory=list)
    #: cluster mode: the cluster's key pair; the backend then takes only object processes
    #: that present it (CurveZMQ, checked by ZAP), and keeps a copy of its public key here
    cluster_key_file: str | None = None
    cluster_keys_dir: str | None = None
    #: the object processes' peer sockets, told to local clients (``{slot}`` in it), or ""
    #: (cluster mode, ``[broker] peer_calls = false``): their calls come through here
    peer_endpoint: str = ""


class _Slot:
    __slots__ = ("number", "identity", "incarnation", "pid", "liveness", "queue", "inflight",
                 "registrations", "up_since", "reported", "failed", "stopping")

    def __init__(self, number: int) -> None:
        self.number = number
        self.identity: bytes | None = None
        self.incarnation: int | None = None
        self.pid: int | None = None
        self.liveness: Liveness | None = None
        self.queue: deque[tuple[float, bytes, Call]] = deque()
        #: (client, call id) -> the call's deadline (its timeout_ms from dispatch)
        self.inflight: dict[tuple[bytes, int], float] = {}
        self.registrations = 0
        self.up_since: float | None = None
        self.reported: dict[str, Any] = {}
        self.failed: str | None = None  # why the slot stays down until an operator acts
        #: its process drains to stop (a stop, a reload): new calls wait for the next one
        self.stopping = False


@dataclass
class _Client:
    last_heard: float
    pid: int = 0
    name: str = ""
    stubs: dict[int, tuple[int, int]] = field(default_factory=dict)
    inflight: int = 0
    allowed: frozenset[str] | None = None  # namespaces a CurveZMQ client may call (None: all)
    batches: bool = False  # it said PBATCHES: it reads batches


class RouterCore:
    def __init__(self, config: BrokerConfig, *, clock: Callable[[], float],
                 permissions: dict[str, frozenset[str] | None] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.ring = Ring(config.slots)
        #: (namespace, object id) -> slot for ids already checked: the HMAC check and the
        #: ring lookup cost ~2.8 µs a call, a dict hit ~0.1 µs. Cleared when full (65,536
        #: entries took ~21 MiB in the million-object run; 16,384 hot objects are plenty).
        self._placed: dict[tuple[str, str], int] = {}
        self.ids = {name: IdFactory(name, key) for name, key in config.namespaces.items()}
        self.incarnation = secrets.randbits(63) | 1
        self.slots = [_Slot(i) for i in range(config.slots)]
        self.workers: dict[bytes, int] = {}
        #: registered object processes that said PBATCHES (they read batches)
        self.batch_workers: set[bytes] = set()
        self.clients: dict[bytes, _Client] = {}
        self.counters: Counter[str] = Counter()
        #: CurveZMQ client key (z85) -> allowed namespaces (None: all)
        self.permissions = permissions or {}
        self.draining = False
        self.outbox: list[Send] = []
        self._next_client_sweep = clock()
        self._next_deadline_sweep = clock()

    # -- what goes out ------------------------------------------------------------------
    def _to_client(self, ident: bytes, frames: list[bytes]) -> None:
        self.outbox.append((False, ident, frames))

    def _to_worker(self, ident: bytes, frames: list[bytes]) -> None:
        self.outbox.append((True, ident, frames))

    def _error(self, ident: bytes, call_id: int, cls: type[DurableError], message: str) -> None:
        self.counters[f"error_{cls.code}"] += 1
        self._to_client(ident, Error(call_id, cls.code, message).encode())

    def _parse(self, frames: list[bytes], direction: Direction, kind: str) -> Any:
        """A typed message, or None after counting the drop: bad input never raises here."""
        try:
            return parse(frames, direction)
        except ProtocolError as e:
            self.counters[f"dropped_{kind}_messages"] += 1
            log.debug("dropped a malformed %s message: %s", kind, e)
            return None

    def worker_unreachable(self, ident: bytes) -> None:
        """A send to this object process failed: its connection is gone (it died). Do not
        wait for its heartbeats to lapse before failing its calls."""
        number = self.workers.get(ident)
        if number is not None:
            self.end_incarnation(number, "its connection closed")

    def reads_batches(self, to_worker: bool, ident: bytes) -> bool:
        """Whether that peer said it reads batches (PBATCHES) since it said HELLO or READY."""
        if to_worker:
            return ident in self.batch_workers
        client = self.clients.get(ident)
        return client is not None and client.batches

    # -- clients --------------------------------------------------------------------------
    def client_message(self, ident: bytes, frames: list[bytes], user: str | None = None) -> None:
        """``ident`` carries its socket's prefix; ``user`` is a CurveZMQ client's key."""
        msg = self._parse(frames, FROM_CLIENT, "client")
        if msg is None:
            return
        client = self.clients.get(ident)
        if type(msg) is Hello:
            if client is not None:  # it started over: its channels are gone
                self._client_gone(ident)
            allowed = self._allowed(ident, user)
            self.clients[ident] = _Client(self.clock(), msg.pid, msg.name, allowed=allowed)
            self.counters["hellos"] += 1
            names = {n: key.hex() for n, key in self.config.namespaces.items()
                     if allowed is None or n in allowed}
            # (not for other machines, nor for the operator socket: its calls must arrive here)
            peers = (self.config.slots, self.config.peer_endpoint) \
                if self.config.peer_endpoint and ident[:1] not in (b"P", b"A") else None
            self._to_client(ident, Welcome(self.incarnation, names, peers).encode())
            return
        if client is None:
            self.counters["unknown_client_messages"] += 1
            self._to_client(ident, Disconnect("unknown client: send HELLO first").encode())
            return
        client.last_heard = self.clock()
        if type(msg) is Call:
            self.route(ident, client, msg)
        elif type(msg) is Ping:
            self._to_client(ident, Pong(self.incarnation).encode())
        elif type(msg) is Drop:
            for stub_id in msg.stub_ids:
                client.stubs.pop(stub_id, None)
        elif type(msg) is PeerBatches:
            if not client.batches:
                client.batches = True
                self._to_client(ident, PeerBatches().encode())
        elif type(msg) is Stats:
            if ident[:1] == b"P":  # pids, counters, other clients' load: for this machine only
                self._error(ident, msg.call_id, ProtocolError, "statistics are for local "
                            "clients (`durable status` on the daemon's machine)")
            else:
                self._to_client(ident, StatsReply(msg.call_id, self.statistics()).encode())

    def _allowed(self, ident: bytes, user: str | None) -> frozenset[str] | None:
        """The namespaces a client may call: all for local ones, its key's for CurveZMQ ones."""
        if ident[:1] != b"P":
            return None
        if user is None or user not in self.permissions:
            # no ZAP (keys not configured: refused by config) or an unknown key: nothing
            return frozenset() if self.config.curve_secret_key_file else None
        return self.permissions[user]

    def control_message(self, frames: list[bytes]) -> None:
        msg = self._parse(frames, CONTROL, "control")
        if msg is None:
            return
        if msg.op == "drain":
            self.draining = True
            log.info("draining: new calls are refused, calls in flight finish")
        elif msg.op == "client_exit":  # a gateway process died: its WebSockets are gone now
            self._forget_clients_of(msg.pid)
        elif msg.slot < len(self.slots) and msg.op == "slot_failed":
            slot = self.slots[msg.slot]
            if slot.pid == msg.pid:
                self.end_incarnation(msg.slot, f"the supervisor saw its process (pid {msg.pid}) fail")
            slot.failed = msg.reason
            log.error("slot %d is out of service: %s", msg.slot, msg.reason)
            while slot.queue:  # nothing will come back for them
                _, ident, call = slot.queue.popleft()
                self._done(ident)
                self._error(ident, call.call_id, StorageCorruptError, f"slot {msg.slot}: {msg.reason}")
            self._forget_clients_of(msg.pid)
        elif msg.slot < len(self.slots):  # slot_down: an object process exited
            if self.slots[msg.slot].pid == msg.pid:
                self.end_incarnation(msg.slot, f"the supervisor saw its process (pid {msg.pid}) exit")
            self._forget_clients_of(msg.pid)

    def _forget_clients_of(self, pid: int) -> None:
        """A process of this machine exited: its clients (a gateway's; an object process's, for
        its HTTP front's and its objects' calls) are gone. Their calls still queued for a
        slot that is down are dropped when it comes back (``_drain_queue``): their callers
        heard the process go ("may have run") and may have gone on by another path, which
        such a call must not follow (the chaos soak saw a writer's tokens out of order)."""
        for ident in [i for i, c in self.clients.items() if c.pid == pid and i[:1] != b"P"]:
            del self.clients[ident]
            self._client_gone(ident)

    def route(self, ident: bytes, client: _Client, call: Call) -> None:
        self.counters["calls"] += 1
        if self.draining and call.head[:1] != EVENT:  # (a socket's close, say, still goes in)
            self._error(ident, call.call_id, OverloadedError,
                        "the daemon is stopping; the call was not delivered (retry after restart)")
            return
        if client.allowed is not None and call.namespace not in client.allowed:
            self._error(ident, call.call_id, UnknownNamespaceError,
                        f"this client's key may not call namespace {call.namespace!r} "
                        "(permissions.toml in the broker's authorized-keys dir)")
            return
        placed = (call.namespace, call.object_id)
        number = self._placed.get(placed)
        if number is None:  # not seen lately: check the id's MAC, then place it on the ring
            ids = self.ids.get(call.namespace)
            if ids is None:
                known = ", ".join(sorted(self.ids)) or "none"
                self._error(ident, call.call_id, UnknownNamespaceError,
                            f"namespace {call.namespace!r} is not configured (known: {known})")
                return
            try:
                ids.from_string(call.object_id)
            except InvalidIdError as e:
                self._error(ident, call.call_id, InvalidIdError, str(e))
                return
            number = self.ring.slot_for(call.object_id)
            if len(self._placed) >= _PLACED_MAX:
                self._placed.clear()
            self._placed[placed] = number
        if client.inflight >= self.config.client_inflight_limit:
            self._error(ident, call.call_id, OverloadedError,
                        f"this client has {client.inflight} calls in flight (the limit is "
                        f"{self.config.client_inflight_limit}); wait for some to finish")
            return
        slot = self.slots[number]
        bound = client.stubs.get(call.stub_id)
        if bound is not None and bound != (number, slot.incarnation):
            self._broken(ident, call.call_id, number, "the object's process has restarted since "
                         "this stub's first call")
            return
        if slot.stopping and bound is not None:  # (bound to the incarnation that drains)
            self._broken(ident, call.call_id, number, "its process is stopping (a stop or a "
                         "reload) and answers only the calls it already has")
            return
        if slot.identity is None or slot.queue or slot.stopping:
            if slot.failed is not None and slot.identity is None:
                self._error(ident, call.call_id, StorageCorruptError, f"slot {number}: {slot.failed}")
                return
            if len(slot.queue) >= self.config.queue_limit:
                self._error(ident, call.call_id, OverloadedError,
                            f"slot {number} is down and {len(slot.queue)} calls already wait for "
                            "it; retry later")
                return
            self.counters["queued"] += 1
            client.inflight += 1
            slot.queue.append((self.clock() + min(self.config.queue_deadline,
                                                  call.timeout_ms / 1000), ident, call))
            return
        client.inflight += 1
        self._dispatch(slot, ident, client, call)

    def _dispatch(self, slot: _Slot, ident: bytes, client: _Client, call: Call) -> None:
        if call.stub_id not in client.stubs:
            client.stubs[call.stub_id] = (slot.number, slot.incarnation)
        slot.inflight[(ident, call.call_id)] = self.clock() + call.timeout_ms / 1000
        self._to_worker(slot.identity, WorkerCall(ident, call.call_id, call.namespace,
                                                  call.object_id, call.head, call.body,
                                                  call.name).encode())

    def _done(self, ident: bytes) -> None:
        client = self.clients.get(ident)
        if client is not None and client.inflight > 0:
            client.inflight -= 1

    def _broken(self, ident: bytes, call_id: int, number: int, why: str) -> None:
        self._error(ident, call_id, StubBrokenError,
                    f"stub lost its object (slot {number}: {why}); get a new stub with "
                    "namespace.get(id) and retry if the call is safe to repeat")

    # -- object processes ---------------------------------------------------------------
    def _forward(self, client: bytes, frames: list[bytes]) -> None:
        """A parsed reply, error or channel send, as the client gets it (its frames as they
        came, less the client's: nothing decoded is encoded again)."""
        out = to_client(frames)
        if out is not None:
            self._to_client(client, out)

    def worker_message(self, ident: bytes, frames: list[bytes]) -> None:
        msg = self._parse(frames, FROM_WORKER, "worker")
        if msg is None:
            return
        if type(msg) is Ready:
            self.register(ident, msg)
            return
        if type(msg) is Beat:  # from the process's heartbeat thread, on a socket of its own
            if msg.slot < len(self.slots):
                slot = self.slots[msg.slot]
                if slot.incarnation == msg.incarnation and slot.liveness is not None:
                    slot.liveness.heard()
            return
        number = self.workers.get(ident)
        if number is None:
            self.counters["unknown_worker_messages"] += 1
            self._to_worker(ident, WorkerDisconnect("unknown object process: send READY").encode())
            return
        slot = self.slots[number]
        slot.liveness.heard()
        if type(msg) is AskAlive:  # (an incarnation ended here is unknown: answered above)
            self.counters["asked_alive"] += 1
            if msg.incarnation == slot.incarnation:
                self._to_worker(ident, StillAlive(msg.incarnation).encode())
            else:
                self._to_worker(ident, WorkerDisconnect(
                    f"incarnation {msg.incarnation:x} is not slot {number}'s: send READY").encode())
            return
        if type(msg) is PeerBatches:
            if ident not in self.batch_workers:
                self.batch_workers.add(ident)
                self._to_worker(ident, PeerBatches().encode())
            return
        if type(msg) is WorkerReply:
            if slot.inflight.pop((msg.client, msg.call_id), None) is not None:
                self.counters["replies"] += 1
                self._done(msg.client)
                self._forward(msg.client, frames)
            else:
                self.counters["stray_replies"] += 1
        elif type(msg) is WorkerError:
            if slot.inflight.pop((msg.client, msg.call_id), None) is not None:
                self.counters["object_errors"] += 1
                self._done(msg.client)
                self._forward(msg.client, frames)
            else:
                self.counters["stray_replies"] += 1
        elif type(msg) is WorkerSend:
            if msg.client in self.clients:
                self.counters["channel_messages"] += 1
                self._forward(msg.client, frames)
            else:  # it left before the process heard: tell it (once per message is cheap)
                self.counters["channel_messages_dropped"] += 1
                self._to_worker(ident, ClientGone(msg.client).encode())
        elif type(msg) is WorkerHeartbeat:
            slot.reported = msg.stats
        elif type(msg) is WorkerStopping:
            if not slot.stopping:
                slot.stopping = True  # (until the next process registers)
                log.info("slot %d (pid %s) is stopping: new calls wait for the next process",
                         slot.number, slot.pid)

    def register(self, ident: bytes, ready: Ready) -> None:
        if ready.slot >= len(self.slots):
            self.counters["bad_registrations"] += 1
            self._to_worker(ident, WorkerDisconnect(
                f"slot {ready.slot} does not exist (this broker has {len(self.slots)})").encode())
            return
        old = self.workers.pop(ident, None)
        self.batch_workers.discard(ident)  # (it says PBATCHES again after this READY)
        if old is not None and old != ready.slot:
            self.end_incarnation(old, "its process registered for another slot")
        slot = self.slots[ready.slot]
        if slot.identity is not None:
            self.end_incarnation(ready.slot, "a new process registered for it")
        slot.identity = ident
        slot.failed = None  # repaired: it serves again
        slot.stopping = False
        slot.incarnation = ready.incarnation
        slot.pid = ready.pid
        slot.liveness = Liveness(self.config.heartbeat, self.config.misses, self.clock)
        slot.registrations += 1
        slot.up_since = self.clock()
        self.workers[ident] = ready.slot
        self.counters["registrations"] += 1
        log.info("slot %d registered (pid %d, incarnation %x)", ready.slot, ready.pid, ready.incarnation)
        self._drain_queue(slot)

    def _drain_queue(self, slot: _Slot) -> None:
        while slot.queue and slot.identity is not None:
            _, ident, call = slot.queue.popleft()
            client = self.clients.get(ident)
            if client is None:
                continue
            bound = client.stubs.get(call.stub_id)
            if bound is not None and bound != (slot.number, slot.incarnation):
                self._done(ident)
                self._broken(ident, call.call_id, slot.number, "restarted while the call waited")
                continue
            self._dispatch(slot, ident, client, call)

    def end_incarnation(self, number: int, reason: str) -> None:
        """The slot's process is gone: fail its calls in flight; its stubs are now broken."""
        slot = self.slots[number]
        if slot.identity is None:
            return
        log.warning("slot %d (pid %s) is gone: %s; %d calls in flight fail", number, slot.pid,
                    reason, len(slot.inflight))
        self.workers.pop(slot.identity, None)
        self.batch_workers.discard(slot.identity)
        for ident, call_id in slot.inflight:
            self._done(ident)
            self._broken(ident, call_id, number, f"its process (pid {slot.pid}) went away: {reason}")
        slot.inflight.clear()
        ended = (number, slot.incarnation)
        for ident, client in self.clients.items():  # their WebSockets close (1012) at once
            stubs = [s for s, bound in client.stubs.items() if bound == ended]
            if stubs:
                self._to_client(ident, Broken(stubs).encode())
        slot.identity = slot.incarnation = slot.liveness = slot.up_since = None
        slot.stopping = False
        self.counters["incarnations_ended"] += 1

    # -- timers -------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.liveness is not None:
                if not slot.liveness.alive():
                    self.end_incarnation(slot.number, "it missed its heartbeats")
                elif slot.liveness.send_due():
                    slot.liveness.sent()
                    self._to_worker(slot.identity, BrokerHeartbeat().encode())
            q = slot.queue
            while q and q[0][0] <= now:
                _, ident, call = q.popleft()
                self._done(ident)
                self._error(ident, call.call_id, CallTimeoutError,
                            f"slot {slot.number} had no running process within the call's "
                            f"deadline (at most broker.queue_deadline = "
                            f"{self.config.queue_deadline:g} s); the call was not delivered")
        if now >= self._next_deadline_sweep:
            self._next_deadline_sweep = now + _DEADLINE_SWEEP
            self._expire_calls(now)
        if now >= self._next_client_sweep:
            self._next_client_sweep = now + self.config.heartbeat
            limit = self.config.heartbeat * self.config.client_misses
            for ident in [i for i, c in self.clients.items() if now - c.last_heard > limit]:
                del self.clients[ident]
                self.counters["clients_expired"] += 1
                self._client_gone(ident)

    def next_tick(self) -> float:
        """How long the socket loop may wait for a message before ``tick`` has work: 0.1 s
        while calls are queued or in flight (their deadlines are swept every 0.25 s), else
        until the next heartbeat, expiry or client sweep is due (at most heartbeat / 2).

        Why: an idle broker polled ten times a second, the largest share of an idle daemon's
        wake-ups after the object processes' (measured: ``scripts/bench.py idle``)."""
        if any(slot.queue or slot.inflight for slot in self.slots):
            return _BUSY_TICK
        wait = min(self.config.heartbeat / 2, self._next_client_sweep - self.clock())
        for slot in self.slots:
            if slot.liveness is not None:
                wait = min(wait, slot.liveness.next_deadline())
        return max(_LEAST_TICK, wait)

    def stood_still(self, seconds: float) -> None:
        """The broker's loop did not run for ``seconds`` (SIGSTOP, a paused VM): long enough
        for clients to have given it up, heard StubBrokenError ("may have run") and gone on
        by another path (a peer link needs no broker). What they sent before must not run
        after that: forget every client (its next message gets DISCONNECT and it says HELLO
        again) and drop the calls still queued for a down slot. Calls already dispatched
        left before the stop; their replies go on as before."""
        dropped = sum(len(slot.queue) for slot in self.slots)
        log.warning("the broker stood still for %.1f s (stopped or starved); forgetting its "
                    "%d clients, so that no call they may have given up on runs late; "
                    "%d queued calls dropped. The clients reconnect by themselves; if this "
                    "recurs with no pause or SIGSTOP, the machine is starved (check its load, "
                    "swap and `durable status`)", seconds, len(self.clients), dropped)
        self.counters["stood_still"] += 1
        for ident in list(self.clients):
            self._client_gone(ident)
        self.clients.clear()
        for slot in self.slots:
            slot.queue.clear()

    def _client_gone(self, ident: bytes) -> None:
        """Object processes close the channels (WebSockets, streams) of a client that left."""
        for slot in self.slots:
            if slot.identity is not None:
                self._to_worker(slot.identity, ClientGone(ident).encode())

    def _expire_calls(self, now: float) -> None:
        """Calls past their deadline leave the broker: the caller has given up on them.

        Their replies, if they ever come, are dropped as strays; meanwhile they no
        longer count against the client's in-flight bound, so a flood of long
        calls cannot hold a client (a gateway: every namespace) past its deadline.
        """
        for slot in self.slots:
            late = [key for key, deadline in slot.inflight.items() if deadline <= now]
            for key in late:
                del slot.inflight[key]
                ident, call_id = key
                self._done(ident)
                self.counters["expired"] += 1
                self._error(ident, call_id, CallTimeoutError,
                            f"no answer from slot {slot.number} within the call's timeout; "
                            "the call may or may not have run")

    def statistics(self) -> dict[str, Any]:
        now = self.clock()
        busiest = sorted(self.clients.values(), key=lambda c: -c.inflight)[:_CLIENTS_SHOWN]
        return {
            "broker": {"incarnation": self.incarnation, "clients": len(self.clients),
                       "counters": dict(self.counters),
                       "busiest_clients": [{"name": c.name, "pid": c.pid, "inflight": c.inflight,
                                            "stubs": len(c.stubs)} for c in busiest]},
            "slots": [{
                "slot": s.number, "up": s.identity is not None, "pid": s.pid,
                "incarnation": s.incarnation, "queued": len(s.queue), "inflight": len(s.inflight),
                "registrations": s.registrations,
                "batches": s.identity is not None and s.identity in self.batch_workers,
                "uptime": None if s.up_since is None else round(now - s.up_since, 3),
                "reported": s.reported,
            } for s in self.slots],
        }
