"""Paired endpoints without sockets: clients ↔ routing core ↔ object processes (h11-style).

Each end keeps the protocol state its real counterpart keeps (a client: its
call ids and stubs; an object process: its slot, incarnation, and the calls
it holds), speaks only through ``encode``/``parse``, and is wired to a
``RouterCore`` by ``Wire.pump``, which moves frames the way the socket loop
does, including the failed send to a peer that is gone. Nothing sleeps: the
clock is a number the test moves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from durable.broker.core import BrokerConfig, RouterCore
from durable.ids import IdFactory, namespace_key
from durable.protocol import messages as m

KEY = namespace_key(b"k" * 32, "NS")
IDS = IdFactory("NS", KEY)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ClientEnd:
    """What a client process keeps: its pending calls, and what came back for each."""

    ident: bytes  # as the broker sees it (socket prefix included)
    outcomes: dict[int, list[m.Reply | m.Error]] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)  # call id -> stub id
    welcomed: bool = False
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def hello(self) -> list[bytes]:
        return m.Hello(1, self.ident.decode()).encode()

    def call(self, stub_id: int, object_id: str, body: bytes = b"", timeout_ms: int = 30_000,
             ) -> tuple[int, list[bytes]]:
        call_id = next(self._ids)
        self.pending[call_id] = stub_id
        return call_id, m.Call(call_id, stub_id, "NS", object_id, timeout_ms, b"[]", body).encode()

    def receive(self, frames: list[bytes]) -> list[bytes] | None:
        """Take one message; what to send back, if anything (HELLO after a DISCONNECT)."""
        msg = m.parse_from_broker_to_client(frames)
        if type(msg) is m.Welcome:
            self.welcomed = True
        elif type(msg) in (m.Reply, m.Error):
            self.outcomes.setdefault(msg.call_id, []).append(msg)
            self.pending.pop(msg.call_id, None)
        elif type(msg) is m.Disconnect:  # as the real client: every call fails, HELLO again
            for call_id in list(self.pending):
                self.outcomes.setdefault(call_id, []).append(
                    m.Error(call_id, "stub_broken", "the broker forgot this client (local)"))
            self.pending.clear()
            self.welcomed = False
            return self.hello()
        return None


@dataclass
class WorkerEnd:
    """What an object process keeps: its registration, and the calls it has not answered."""

    slot: int
    incarnation: int
    ident: bytes
    alive: bool = True
    held: list[m.WorkerCall] = field(default_factory=list)
    seen: list[m.WorkerCall] = field(default_factory=list)

    def ready(self) -> list[bytes]:
        return m.Ready(self.slot, 100 + self.slot, self.incarnation).encode()

    def receive(self, frames: list[bytes]) -> None:
        msg = m.parse_from_broker_to_worker(frames)
        if type(msg) is m.WorkerCall:
            self.held.append(msg)
            self.seen.append(msg)

    def answer_oldest(self) -> list[bytes] | None:
        if not self.held:
            return None
        call = self.held.pop(0)
        return m.WorkerReply(call.client, call.call_id, b"[200,[]]", call.body).encode()


class Wire:
    """A routing core and the ends wired to it."""

    def __init__(self, slots: int = 2, **config: object) -> None:
        self.clock = Clock()
        self.core = RouterCore(BrokerConfig("inproc://f", "inproc://b", slots, {"NS": KEY},
                                            heartbeat=1.0, misses=3, **config), clock=self.clock)
        self.clients: dict[bytes, ClientEnd] = {}
        self.workers: dict[bytes, WorkerEnd] = {}
        self._incarnations = itertools.count(1)

    def client(self, name: bytes = b"Fc") -> ClientEnd:
        end = self.clients[name] = ClientEnd(name)
        self.core.client_message(name, end.hello())
        self.pump()
        assert end.welcomed
        return end

    def start_worker(self, slot: int) -> WorkerEnd:
        inc = next(self._incarnations)
        end = WorkerEnd(slot, inc, f"w{slot}.{inc}".encode())
        self.workers[end.ident] = end
        self.core.worker_message(end.ident, end.ready())
        self.pump()
        return end

    def send(self, client: ClientEnd, frames: list[bytes]) -> None:
        self.core.client_message(client.ident, frames)
        self.pump()

    def answer(self, worker: WorkerEnd) -> bool:
        frames = worker.answer_oldest()
        if frames is None or not worker.alive:
            return False
        self.core.worker_message(worker.ident, frames)
        self.pump()
        return True

    def advance(self, seconds: float) -> None:
        """Time passes; live object processes' heartbeat threads beat, and clients ping,
        every half second (as the real ones do when they have sent nothing)."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + 0.5)
            for w in self.workers.values():
                if w.alive:
                    self.core.worker_message(b"beat", m.Beat(w.slot, w.incarnation).encode())
            for c in self.clients.values():
                self.core.client_message(c.ident, m.Ping().encode())
            self.core.tick()
            self.pump()

    def pump(self) -> None:
        """Deliver the core's outbox; a send to a dead object process fails, as it does on a
        ROUTER_MANDATORY socket, and the core is told."""
        box, i = self.core.outbox, 0
        while i < len(box):
            to_worker, ident, frames = box[i]
            i += 1
            if to_worker:
                w = self.workers.get(ident)
                if w is None or not w.alive:
                    self.core.worker_unreachable(ident)
                else:
                    w.receive(frames)
            elif ident in self.clients:
                answer = self.clients[ident].receive(frames)
                if answer is not None:
                    self.core.client_message(ident, answer)
        box.clear()
