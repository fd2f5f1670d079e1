"""The broker's socket loop: clients on one ROUTER, object processes on another.

All routing state and decisions live in ``core.py`` (sans I/O). This file
binds the sockets, feeds each message to the core with its identity
prefixed by the socket it came from (``F`` the local ipc endpoint, ``A`` the
operator endpoint, ``P`` the CurveZMQ endpoints: ZMQ identities are per
socket, so without the prefix two clients could collide), and sends what
the core's outbox holds.

* **Unroutable sends raise** (``ROUTER_MANDATORY``): a send to an object
  process that fails tells the core at once (``worker_unreachable``) rather
  than waiting for its heartbeats to lapse.
* **Thin loop.** Poll, drain each socket until it is empty (at most ``burst``
  messages a turn, so neither side starves), run the timers, flush.
* **Batches.** What a socket's drain made leaves when the drain ends (or every
  ``_FLUSH_AT`` messages), each peer's messages in their order; to a peer that
  said PBATCHES, several at a time as one PBATCH. Each message that finds
  ZeroMQ's I/O thread asleep wakes it, then the peer's I/O thread and loop: a
  batch shares those wake-ups (docs/messaging.md). A received batch is handled
  message by message, as if they had come one by one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from durable.errors import ProtocolError
from durable.protocol.messages import BATCH, batch_runs, pack_batch, unpack_batch
from durable.transport import has_input, recv_frames, send_frames

from .core import BrokerConfig, RouterCore

#: the ZAP domain of a cluster-mode backend (its own list of keys: the cluster's one)
CLUSTER_DOMAIN = "durable-cluster"

__all__ = ["Broker", "BrokerConfig", "load_permissions"]

log = logging.getLogger("durable.broker")

#: a drain flushes what it made so far once this many messages wait (else at its end):
#: the first answers of a long burst do not wait for its last message
_FLUSH_AT = 64


def load_permissions(keys_dir: str) -> dict[str, frozenset[str] | None]:
    """Client public key (z85) -> the namespaces it may call, from the authorized-keys dir.

    ``permissions.toml`` there maps a key file's name (``app1`` for
    ``app1.key``) to ``namespaces = [...]``; a key it does not list may call
    every namespace. Raises ``ValueError`` naming the file and key on bad input.
    """
    import tomllib

    from zmq.auth import load_certificate

    folder = Path(keys_dir)
    names: dict[str, str] = {}
    for f in sorted(folder.glob("*.key")):
        public, _ = load_certificate(str(f))
        names[f.stem] = public.decode()
    rules: dict[str, frozenset[str] | None] = dict.fromkeys(names.values())
    perm = folder / "permissions.toml"
    if perm.exists():
        raw = tomllib.loads(perm.read_text())
        for name, table in raw.items():
            if name not in names:
                raise ValueError(f"{perm}: [{name}]: there is no {name}.key in {folder}")
            spaces = table.get("namespaces") if isinstance(table, dict) else None
            if not isinstance(spaces, list) or not all(isinstance(n, str) for n in spaces):
                raise ValueError(f"{perm}: [{name}]: write namespaces = [\"NAME\", ...]")
            rules[names[name]] = frozenset(spaces)
    return rules


class Broker:
    def __init__(self, config: BrokerConfig, *, clock: Callable[[], float] = time.monotonic,
                 context: zmq.Context | None = None) -> None:
        self.config = config
        self.core = RouterCore(config, clock=clock)
        self._ctx = context or zmq.Context.instance()
        self.front: zmq.Socket | None = None
        self.back: zmq.Socket | None = None
        self.ctl: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.adm: zmq.Socket | None = None
        self._auth: Any = None
        self._stopping = False
        self.last_turn = time.monotonic()  # the supervisor's lifeline reports its age
        #: a gap this long between two messages or turns is a stall (RouterCore.stood_still):
        #: half the window after which clients of the same heartbeat give the broker up
        self.stall_after = max(0.25, config.heartbeat * config.misses / 2)
        self._alive_at = time.monotonic()

    # -- sockets ----------------------------------------------------------------------
    def _router(self) -> zmq.Socket:
        """A ROUTER with the options every broker socket uses (unroutable sends raise)."""
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        return s

    def bind(self) -> None:
        for endpoint in (self.config.frontend, self.config.backend, self.config.control,
                         self.config.admin):
            if endpoint and endpoint.startswith("ipc://"):  # (the supervisor made them, if any)
                Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True,
                                                           mode=0o700)
        for attr, endpoint in (("front", self.config.frontend), ("back", self.config.backend)):
            s = self._router()
            if attr == "back" and self.config.cluster_key_file:
                self._cluster_curve(s)
            s.bind(endpoint)
            setattr(self, attr, s)
        for endpoint in self.config.backend_extra:
            self.back.bind(endpoint)
        if self.config.public:
            self.pub = self._public_socket()
        if self.config.admin:
            self.adm = self._router()
            self.adm.bind(self.config.admin)
        if self.config.control:
            self.ctl = self._ctx.socket(zmq.PULL)
            self.ctl.setsockopt(zmq.LINGER, 0)
            self.ctl.setsockopt(zmq.MAXMSGSIZE, 4096)
            self.ctl.bind(self.config.control)
        self._socket_modes()

    def _socket_modes(self) -> None:
        """Only the owner may connect to the ipc sockets (the run dir is 0700 too), except
        the client socket for ``socket_group``'s members (0660, that group)."""
        group = self.config.socket_group
        for endpoint in (self.config.frontend, self.config.backend, self.config.control,
                         self.config.admin):
            if not endpoint or not endpoint.startswith("ipc://"):
                continue
            path = endpoint[len("ipc://"):]
            if group and endpoint == self.config.frontend:
                import grp

                os.chown(path, -1, grp.getgrnam(group).gr_gid)
                os.chmod(path, 0o660)
            else:
                os.chmod(path, 0o600)

    def _authenticator(self) -> Any:
        if self._auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
        return self._auth

    def _cluster_curve(self, s: zmq.Socket) -> None:
        """Cluster mode: the backend (ipc and TCP alike) is a CurveZMQ server that admits only
        peers presenting the cluster's own key (every host's object processes have it)."""
        from zmq.auth import load_certificate

        public, secret = load_certificate(self.config.cluster_key_file)
        keys = Path(self.config.cluster_keys_dir)
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        (keys / "cluster.key").write_text(  # (the ZAP handler's list: this key only)
            f'metadata\ncurve\n    public-key = "{public.decode()}"\n')
        self._authenticator().configure_curve(domain=CLUSTER_DOMAIN, location=str(keys))
        s.curve_secretkey = secret
        s.curve_publickey = public
        s.curve_server = True
        s.zap_domain = CLUSTER_DOMAIN.encode()

    def _public_socket(self) -> zmq.Socket:
        """The endpoint for other machines: CurveZMQ, only clients whose key is authorized."""
        s = self._router()
        if self.config.curve_secret_key_file:
            from zmq.auth import load_certificate

            self.core.permissions = load_permissions(self.config.authorized_keys_dir)
            public, secret = load_certificate(self.config.curve_secret_key_file)
            self._authenticator().configure_curve(domain="*",
                                                  location=self.config.authorized_keys_dir)
            s.curve_secretkey = secret
            s.curve_publickey = public
            s.curve_server = True
        for endpoint in self.config.public:
            s.bind(endpoint)
        return s

    def close(self) -> None:
        for s in (self.front, self.back, self.ctl, self.pub, self.adm):
            if s is not None:
                s.close(linger=0)
        self.front = self.back = self.ctl = self.pub = self.adm = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler: it only sets a flag)."""
        self._stopping = True

    def flush(self) -> None:
        """Send what the core wants sent: each peer's messages in their order, several at a
        time as one batch to a peer that reads them. A send that fails is counted (a peer
        gone, or not reading); an object process that cannot be reached is ended, and the
        errors that makes go out in this same flush."""
        core = self.core
        out = core.outbox
        while out:
            if len(out) == 1:  # (the usual case when not busy)
                to_worker, ident, frames = out.pop()
                self._send(to_worker, ident, frames, 1)
                continue
            groups: dict[tuple[bool, bytes], list[list[bytes]]] = {}
            for to_worker, ident, frames in out:
                groups.setdefault((to_worker, ident), []).append(frames)
            out.clear()
            for (to_worker, ident), msgs in groups.items():
                runs = batch_runs(msgs) if len(msgs) > 1 and core.reads_batches(
                    to_worker, ident) else [[m] for m in msgs]
                for i, run in enumerate(runs):
                    if len(run) > 1:
                        core.counters["batches_sent"] += 1
                        core.counters["batched_messages_sent"] += len(run)
                    if not self._send(to_worker, ident,
                                      run[0] if len(run) == 1 else pack_batch(run), len(run)):
                        # (the rest would fail as well: counted, not tried)
                        left = sum(len(r) for r in runs[i + 1:])
                        if left:
                            core.counters["undeliverable_worker" if to_worker
                                          else "undeliverable_client"] += left
                        break

    def _send(self, to_worker: bool, ident: bytes, frames: list[bytes], count: int) -> bool:
        """Send one message (``count``: the messages it carries); False if it failed."""
        if to_worker:
            sock, dest = self.back, ident
        else:
            kind = ident[:1]
            sock = self.front if kind == b"F" else self.pub if kind == b"P" else self.adm
            dest = ident[1:]
        try:
            send_frames(sock, [dest, *frames])
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (peer not reading)
            self.core.counters["undeliverable_worker" if to_worker
                               else "undeliverable_client"] += count
            log.debug("could not send to %r: %s", ident, e)
            if to_worker:
                self.core.worker_unreachable(ident)
            return False

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        handlers: dict[zmq.Socket, Callable[[int], None]] = {
            self.front: lambda n: self._drain(self.front, b"F", n),
            self.back: self._drain_workers,
        }
        if self.ctl is not None:
            handlers[self.ctl] = self._drain_control
        if self.pub is not None:
            handlers[self.pub] = self._drain_public
        if self.adm is not None:
            handlers[self.adm] = lambda n: self._drain(self.adm, b"A", n)
        order = [s for s in (self.ctl, self.back, self.front, self.pub, self.adm) if s is not None]
        for s in order:
            poller.register(s, zmq.POLLIN)
        burst = self.config.burst
        self._alive_at = time.monotonic()  # (binding and start-up are no stall)
        while not self._stopping:
            self.last_turn = time.monotonic()
            self._awake()
            events = dict(poller.poll(math.ceil(self.core.next_tick() * 1000)))
            self._awake()
            for s in order:
                if s in events:
                    handlers[s](burst)
            self._guarded("in the broker's timers", self.core.tick)

    def _awake(self) -> None:
        """Before a message or a turn: if the loop stood still (the process was stopped),
        the core forgets its clients before it reads anything they sent before the stop."""
        now = time.monotonic()
        if now - self._alive_at > self.stall_after:
            self._guarded("after a stall", self.core.stood_still, now - self._alive_at)
        self._alive_at = now

    def _guarded(self, where: str, step: Callable[..., None], *args: Any) -> None:
        """Run one core step and send its outbox: a bug costs one message, never the broker."""
        self._step(where, step, *args)
        self.flush()

    def _step(self, where: str, step: Callable[..., None], *args: Any) -> None:
        """Run one core step (its sends wait in the outbox for the drain's flush)."""
        try:
            step(*args)
        except Exception:
            self.core.counters["internal_errors"] += 1
            log.exception("internal error %s; the message was dropped", where)

    def _messages(self, frames: list[bytes]) -> list[list[bytes]]:
        """What a ROUTER received: one message, or each message of a batch (each with the
        sender's identity first). A malformed batch is dropped whole and counted."""
        if len(frames) < 2 or frames[1] != BATCH:
            return [frames]
        try:
            msgs = unpack_batch(frames[1:])
        except ProtocolError as e:
            self.core.counters["malformed_batches"] += 1
            log.debug("dropped a malformed batch: %s", e)
            return []
        self.core.counters["batches_received"] += 1
        rid = frames[0]
        return [[rid, *m] for m in msgs]

    def _drain(self, sock: zmq.Socket, prefix: bytes, burst: int) -> None:
        client, out = self.core.client_message, self.core.outbox
        for _ in range(burst):
            if not has_input(sock):
                break
            frames = recv_frames(sock)
            self._awake()
            for m in self._messages(frames):
                self._step("handling a client message", client, prefix + m[0], m[1:])
            if len(out) >= _FLUSH_AT:
                self.flush()
        self.flush()

    def _drain_workers(self, burst: int) -> None:
        worker, out = self.core.worker_message, self.core.outbox
        for _ in range(burst):
            if not has_input(self.back):
                break
            frames = recv_frames(self.back)
            self._awake()
            for m in self._messages(frames):
                self._step("handling a worker message", worker, m[0], m[1:])
            if len(out) >= _FLUSH_AT:
                self.flush()
        self.flush()

    def _drain_control(self, burst: int) -> None:
        for _ in range(burst):
            if not has_input(self.ctl):
                return
            frames = recv_frames(self.ctl)
            self._awake()
            self._guarded("handling a control message", self.core.control_message, frames)

    def _drain_public(self, burst: int) -> None:
        """Like ``_drain``, keeping each message's CurveZMQ key (ZAP's User-Id) for HELLO."""
        out = self.core.outbox
        for _ in range(burst):
            if not has_input(self.pub):
                break
            frame = self.pub.recv(zmq.NOBLOCK, copy=False)
            self._awake()
            frames, user = [frame.bytes], None
            while frame.more:
                frame = self.pub.recv(zmq.NOBLOCK, copy=False)
                frames.append(frame.bytes)
                if user is None:
                    with contextlib.suppress(zmq.ZMQError, KeyError):
                        user = frame.get("User-Id")
            for m in self._messages(frames):
                self._step("handling a client message", self.core.client_message,
                           b"P" + m[0], m[1:], user)
            if len(out) >= _FLUSH_AT:
                self.flush()
        self.flush()
