"""The object process: one slot's objects, one DEALER to the broker, one asyncio loop.

The DEALER is a ``LoopSocket`` (``durable.transport``): its ZMQ_FD is watched
by the loop, and each wake-up drains every message waiting. Each call goes to
its object's activation; replies are sent as they are ready. The process
registers (READY) before anything else, heartbeats when idle (and from a
thread with a socket of its own, so that a long call does not look like a
death), re-registers when the broker says it does not know this process, and
opens a fresh socket when the broker falls silent. Idle activations whose
writes are durable, and whose own tasks have ended (or were cancelled after
``wait_until_limit``), are evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import os
import secrets
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import zmq

from durable import codec, pushdown
from durable.broker.ring import Ring
from durable.client import Client, LocalRoute
from durable.errors import (
    ObjectError,
    OverloadedError,
    ProtocolError,
    StorageCorruptError,
    StubBrokenError,
    UnknownNamespaceError,
)
from durable.exitcodes import EXIT_LEASE_LOST
from durable.http import Response
from durable.ids import MAX_OBJECT_NAME, IdFactory, load_or_create_secret, namespace_key
from durable.objects import Env, load_class
from durable.osthread import name_os_thread
from durable.peers import PeerRoutes, peer_endpoint
from durable.protocol.heartbeat import HEARTBEAT, MISSES, Liveness
from durable.protocol.messages import (
    BATCH,
    EV_CANCEL,
    EV_CLOSE,
    EV_CREDIT,
    EVENT,
    LOCAL,
    MAX_FRAME_BYTES,
    METHOD,
    PEER,
    AskAlive,
    Beat,
    BrokerHeartbeat,
    ClientGone,
    PeerBatches,
    Ready,
    StillAlive,
    WorkerCall,
    WorkerDisconnect,
    WorkerError,
    WorkerHeartbeat,
    WorkerReply,
    WorkerStopping,
    decode_event,
    decode_method_call,
    decode_request,
    encode_response,
    encode_result,
    frame_too_big,
    parse_from_broker_to_worker,
    to_client,
    unpack_batch,
)
from durable.supervisor.config import Config as _SETTINGS
from durable.supervisor.lifeline import tick_forever
from durable.transport import LoopSocket, has_input, pending_events, recv_frames

from .activation import CURRENT, MAX_PENDING, Activation, Phase, refused
from .alarms import AlarmCall, AlarmScheduler
from .collector import Collector
from .cpulimit import CpuWatch
from .metrics import LOOP_LAG_BUCKETS, CallMetrics, GcPauses, Histogram
from .peers import PeerServer
from .query import MAX_SNAPSHOTS, NAME_PREFIX, QUERY_METHOD, QUERY_URL, Overlay, SnapshotStream
from .query import list_objects as _list_objects
from .storage import ObjectStorage, SlotStore, StorageLimits
from .storage.duck import NAME_KEY
from .storage.log import ALARM_DELETE
from .storage.slot import object_key
from .websockets import Outbox, SocketEvent, Sockets, event_close

__all__ = ["ObjectProcess", "ObjectProcessConfig"]

log = logging.getLogger("durable.objectproc")

#: `durable inspect` asks for an object's storage with this method and URL prefix.
INSPECT_METHOD = "INSPECT"
INSPECT_URL = "durable:inspect"
#: `durable backup` pins and unpins a slot's files (sent to any object the slot hosts).
BACKUP_METHOD = "BACKUP"
BACKUP_URL = "durable:backup"
_OPERATOR_METHODS = (INSPECT_METHOD, BACKUP_METHOD, QUERY_METHOD)
#: How long a query waits for one of the slot's MAX_SNAPSHOTS before it is refused.
QUERY_QUEUE_SECONDS = 30.0
#: The most broker messages read ahead of a call (``ObjectProcess._handle_batch``).
_READ_AHEAD = 256
#: The longest a backup may hold a slot's files still (the log grows meanwhile).
MAX_PIN_SECONDS = 3600.0
#: The timer task's longest sleep while calls come (each tick is a sample of the loop's lag,
#: ``durable_loop_lag_seconds``, and the mark of a turning loop for the lifeline and the CPU
#: limit), and on a slot that had no call for IDLE_AFTER seconds: an idle daemon's object
#: process then wakes ~6 times a second, not ~18 (measured; ``scripts/bench.py idle``).
#: The first call after a quiet spell brings the next tick forward (``_busy``).
TICK_BUSY = 0.1
TICK_IDLE = 0.5
IDLE_AFTER = 1.0
#: objects one step of an eviction scan evicts at most (~0.6 ms of the loop, ~6 µs an object);
#: a scan that stops there goes on at the loop's next turn, after the calls that came meanwhile
#: (``_evict_step``). Evicting a quarter of an idle_timeout's new objects at once stalled every
#: object of the slot (30–54 ms at a 5-s timeout, 214–281 ms at 40 s); chunks of 1,000 a timer
#: tick still stalled it ~6 ms ten times a second, which lifted the p99 of other objects' calls
#: (docs/messaging.md, "Eviction in steps")
EVICT_CHUNK = 100


def name_key(namespace: str, object_id: str) -> bytes:
    """Where an object's name is stored: beside it, under a namespace no config may use."""
    return object_key(f"{NAME_PREFIX}{namespace}", object_id)


#: Names of objects are stored under ``_durable_name_<NAMESPACE>/<id>`` (NAME_PREFIX: slot moves
#: keep them with their object, as they go by id; on disk, in the object's row of ``objects``:
#: storage/duck.py); configured namespaces may not start with "_durable".


#: a stored name not read yet
_UNREAD: Any = object()


class _Warming:
    """An existing object's calls while its rows are read off the loop (ObjectProcess._target):
    its input gate, in the order they came."""

    __slots__ = ("key", "name", "parked", "task")

    def __init__(self, key: tuple[str, str], name: str | None) -> None:
        self.key = key
        self.name = name
        self.parked: list[tuple[Any, Any]] = []
        self.task: asyncio.Task[None] | None = None

    def deliver(self, request: Any, reply: Any) -> None:
        if not refused(request, reply, len(self.parked), MAX_PENDING, *self.key):
            self.parked.append((request, reply))


class ConstructorError(Exception):
    """The object's constructor raised (``error`` is what the caller gets)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    """Every task started in an object's context belongs to its activation (one instance)."""
    context = kwargs.get("context")
    task = asyncio.Task(coro, loop=loop, **kwargs)
    act = context.get(CURRENT) if context is not None else CURRENT.get()
    if act is not None and act.phase in (Phase.ACTIVE, Phase.BLOCKED):
        act.adopt(task)
    return task


@dataclass
class ObjectProcessConfig:
    slot: int
    backend: str
    frontend: str
    data_dir: str
    namespaces: dict[str, str]  # name -> "module:Class"
    # Defaults come from the daemon's settings (supervisor/config.py), the one place for them.
    vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    idle_timeout: float = _SETTINGS.idle_timeout
    heartbeat: float = HEARTBEAT
    misses: int = MISSES
    limits: StorageLimits = field(default_factory=StorageLimits)
    duckdb_memory_mb: int = _SETTINGS.duckdb_memory_mb
    #: how far DuckDB's limit may grow for its indexes (0: half the machine's memory)
    duckdb_memory_ceiling_mb: int = 0
    data_dir_id: str | None = None
    checkpoint_wal_bytes: int = _SETTINGS.checkpoint_wal_mb << 20
    checkpoint_interval: float = _SETTINGS.checkpoint_interval
    #: call bodies held at once; past it, calls fail with OverloadedError (one always fits)
    max_inflight_bytes: int = _SETTINGS.max_inflight_mb << 20
    #: seconds a call may run without yielding (per namespace; default for the others)
    cpu_limits: dict[str, float] = field(default_factory=dict)
    cpu_limit: float = _SETTINGS.cpu_limit_ms / 1000
    #: seconds an idle object's own tasks (wait_until, create_task) may run before eviction
    wait_until_limit: float = _SETTINGS.wait_until_limit
    #: send object tracebacks to callers (ObjectError.remote_traceback)
    debug: bool = False
    #: alarms: start at most this many a second, run at most alarm_concurrency at once
    alarm_rate: float = _SETTINGS.alarm_rate
    alarm_concurrency: int = _SETTINGS.alarm_concurrency
    #: a raising alarm() is retried alarm_retries times, after alarm_retry_base * 2**n s
    alarm_retries: int = _SETTINGS.alarm_retries
    alarm_retry_base: float = _SETTINGS.alarm_retry_base
    #: the largest WebSocket message an object may send
    websocket_max_message: int = _SETTINGS.websocket_max_message_kb << 10
    #: count calls by namespace, kind and outcome, with latency histograms ([metrics] on)
    metrics: bool = False
    #: the daemon's 0700 run dir: query snapshots bind their sockets there ("": the data dir)
    run_dir: str = ""
    #: calls to the host's other slots go straight to their processes ([broker] peer_calls)
    peer_calls: bool = True
    #: cluster mode (docs/cluster.md): the NATS servers (empty: one host), the JetStream
    #: replicas, this host's broker endpoint for the others, and the daemon's slot count
    cluster_servers: list[str] = field(default_factory=list)
    cluster_replicas: int = 3
    cluster_endpoint: str = ""
    slots: int = 1
    #: the cluster's CurveZMQ key pair file: every backend connection presents it
    cluster_key_file: str = ""
    #: [http] front = "slots": the supervisor's listening socket, served here too, and the
    #: daemon's settings for it
    http_fd: int | None = None
    daemon: Any = None


class ObjectProcess:
    def __init__(self, config: ObjectProcessConfig) -> None:
        self.config = config
        self.classes = {name: load_class(spec) for name, spec in config.namespaces.items()}
        #: the live activations, in order of their ``placed`` time (``_activation``), so that
        #: eviction reads the oldest entries only
        self.catalog: dict[tuple[str, str], Activation] = {}
        #: existing objects whose rows are being read for their first call (``_target``)
        self._warming: dict[tuple[str, str], _Warming] = {}
        self._name_kick = False  # a kick of the log for the names stored lately is due
        #: storages given a name lately: what no write carried is logged by ``_kick_names``
        self._names: list[Any] = []
        self.counters: dict[str, int] = {"calls": 0, "errors": 0, "evicted": 0,
                                         "dropped_broker_messages": 0}
        self._in_flight = 0  # calls received and not yet answered
        self._inflight_bytes = 0  # their bodies' bytes
        self._ctx: zmq.Context[Any] | None = None  # (made when it registers: the testing
        #                                             harness runs this class without one)
        self._sock: LoopSocket | None = None
        #: the broker socket's monitor (DISCONNECTED): see _broker_dropped
        self._monitor: zmq.Socket[Any] | None = None
        self._liveness: Liveness | None = None
        self._stopping = asyncio.Event()
        self._closing = False  # shutting down: the activations have drained
        self.front: Any = None  # [http] front = "slots": this process's HTTP server
        self.store: SlotStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._snapshots: asyncio.Semaphore | None = None  # (made in the loop: MAX_SNAPSHOTS)
        self._streams: set[SnapshotStream] = set()
        self.client: Client | None = None
        self.env: Env | None = None
        self.lifeline: Any = None  # the supervisor's (lifeline.Lifeline); ready once registered
        #: when the loop last turned, and the main thread's CPU time then (its timer task's)
        self.loop_mark: list[float] = [time.monotonic(), time.thread_time()]
        self.ids: dict[str, IdFactory] = {}
        self._incarnation = 0
        self._beat_stop = threading.Event()
        #: when the beat thread last beat (monotonic; inf while it does not run); when the
        #: pause it found began, if the whole process stood still; and when this process last
        #: registered: see :meth:`_after_stall`
        self._beat_at = math.inf
        self._stall_from: float | None = None
        self._registered_at = -math.inf
        #: a pause of the whole process this long may have outlasted the broker's window
        #: (heartbeat x misses): the broker then ended this incarnation
        self._stall_after = config.heartbeat * config.misses * 0.75
        #: the calls that came while the broker is asked whether it still counts this
        #: incarnation (None when it is not asked: :meth:`_ask_broker`), and when it was asked
        self._held: list[WorkerCall] | None = None
        self._asked_at = 0.0
        self._ask_timer: asyncio.TimerHandle | None = None
        self.alarms: AlarmScheduler | None = None
        self._orphan_namespaces: set[str] = set()  # alarms of namespaces no longer configured
        self.sockets: Sockets | None = None  # WebSocket records and streams (hibernation)
        self.metrics = CallMetrics()
        self.gc_pauses = GcPauses()  # (installed while run() runs)
        self.collector = Collector()
        #: how late the timer task ran, each tick: how long any call of the slot waits for
        #: the loop (a long turn, a collection, object code that blocks it, a starved CPU)
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS)
        #: the timer task's next wake-up (loop time), its handle and what it awaits; and
        #: whether the slot is idle (no call for IDLE_AFTER s: it ticks at TICK_IDLE)
        self._tick_due = math.inf
        self._tick_handle: asyncio.TimerHandle | None = None
        #: the next step of an eviction scan that stopped at its chunk (``_evict_step``)
        self._evict_handle: asyncio.Handle | None = None
        self._evict_kept = 0  # (the entries its last step read and kept: ``evict_idle``)
        self._tick_wake: asyncio.Future[None] | None = None
        self._idle = False
        self._storage_figures: dict[str, Any] = {}  # bytes and keys, refreshed every minute
        self._storage_figures_at = 0.0
        self.replicator: Any = None  # cluster mode: replication.Replicator
        self.links: Any = None  # cluster mode: links.RemoteLinks
        self.peer_server: PeerServer | None = None  # calls from the host's other slots
        self._lease: Any = None  # cluster mode: host.LeaseFile (until when it may serve)
        #: cluster mode: (server public, our public, our secret) for every backend socket
        self.curve: tuple[bytes, bytes, bytes] | None = None
        if config.cluster_key_file:
            from zmq.auth import load_certificate

            public, secret = load_certificate(config.cluster_key_file)
            self.curve = (public, public, secret)

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.config
        started = time.monotonic()
        secret = load_or_create_secret(cfg.data_dir, create=False)  # before any file is made
        if cfg.cluster_servers:
            await self._join_cluster()
        self.store = SlotStore(cfg.data_dir, cfg.slot, limits=cfg.limits,
                               memory_limit=f"{cfg.duckdb_memory_mb}MB",
                               memory_ceiling=cfg.duckdb_memory_ceiling_mb << 20 or None,
                               data_dir_id=cfg.data_dir_id,
                               checkpoint_wal_bytes=cfg.checkpoint_wal_bytes,
                               checkpoint_interval=cfg.checkpoint_interval,
                               replication=self.replicator)
        if self.replicator is not None:
            log.info("slot %d: %d records of the cluster's log replayed (read from message %d "
                     "on)", cfg.slot, self.store.caught_up, self.replicator.read_from + 1)
        log.info("slot %d: storage open in %.3f s (%d log records replayed in %.3f s; the filter "
                 "of stored objects built in %.3f s)", cfg.slot, time.monotonic() - started,
                 self.store.replayed, self.store.recovery_seconds, self.store.stored_seconds)
        if self.replicator is None:  # (cluster mode: a commit waits on the network, never inline)
            self.store.commit_inline_when = self._quiet
        self.collector.start()
        self.gc_pauses.install()
        keys = {n: namespace_key(secret, n) for n in cfg.namespaces}
        self.ids = {n: IdFactory(n, k) for n, k in keys.items()}
        loop = asyncio.get_running_loop()
        loop.set_task_factory(_task_factory)
        watch = CpuWatch(self.loop_mark, min([cfg.cpu_limit, *cfg.cpu_limits.values()]))
        self.client = Client(cfg.frontend, namespaces=keys, name=f"objectproc-{cfg.slot}",
                             heartbeat=cfg.heartbeat, misses=cfg.misses, direct=False)
        await self.client.start(wait=False)
        if not cfg.cluster_servers:  # (cluster mode: every call goes by the broker and lease)
            ring = Ring(cfg.slots)
            self.client.local = LocalRoute(lambda oid: ring.slot_for(str(oid)) == cfg.slot,
                                           self._local_call)
            if cfg.run_dir and cfg.peer_calls:  # (docs/messaging.md)
                self._ctx = self._ctx or zmq.Context.instance()
                try:
                    self.peer_server = PeerServer(cfg.run_dir, cfg.slot, ring, self.ids,
                                                  lambda: self._incarnation, self._peer_deliver,
                                                  self._client_gone, self._ctx)
                except (zmq.ZMQError, OSError) as e:  # (no run dir: the broker's path)
                    log.warning("slot %d: calls from the other slots go through the broker: "
                                "could not bind %s: %s", cfg.slot, peer_endpoint(cfg.run_dir,
                                                                                 cfg.slot), e)
            if self.peer_server is not None and cfg.slots > 1:
                self.client.peers = PeerRoutes(
                    self.client, ring.slot_for, cfg.slot,
                    {s: peer_endpoint(cfg.run_dir, s) for s in range(cfg.slots)}, self._ctx)
                self.client.peers.start()
        self.env = Env({n: self.client.namespace(n) for n in cfg.namespaces}, cfg.vars,
                       cfg.secrets)
        self.sockets = Sockets(Outbox(self._send), cfg.websocket_max_message)
        self._register()
        if cfg.cluster_servers:
            from durable.supervisor.host import HOSTS

            from .links import RemoteLinks
            self.links = RemoteLinks(cfg.slot, Path(cfg.run_dir) / HOSTS, cfg.cluster_endpoint,
                                     heartbeat=cfg.heartbeat, misses=cfg.misses,
                                     on_call=self._call, on_client_gone=self._client_gone,
                                     stats=self.stats, context=self._ctx, curve=self.curve)
            self.links.refresh()
        self.alarms = AlarmScheduler(
            loop, self._load_alarms, self.store.pending_alarms, self._fire_alarm,
            self._alarm_given_up, rate=cfg.alarm_rate, concurrency=cfg.alarm_concurrency,
            retries=cfg.alarm_retries, retry_base=cfg.alarm_retry_base)
        self.store.on_alarm = self.alarms.on_alarm
        self.store.after_durable = self._send_replies
        self.alarms.start()
        if self.lifeline is not None:
            # (the loop has not turned since run() began: opening storage may have taken
            # longer than hang_timeout, which is no hang; the loop turns from here on)
            self.loop_mark[0], self.loop_mark[1] = time.monotonic(), time.thread_time()
        watch.start()
        beats = threading.Thread(target=self._beat_thread, name="durable-beat", daemon=True)
        beats.start()
        if cfg.http_fd is not None:  # (before it counts as ready: READY=1 means served)
            self.front = await self._start_front(cfg)
        if self.lifeline is not None:
            self.lifeline.mark_ready()  # from here, a loop that stops turning is a hang
        try:
            async with asyncio.TaskGroup() as tg:
                timers = tg.create_task(self._timer_loop())
                await self._stopping.wait()
                timers.cancel()
        finally:
            watch.stop()
            if self.alarms is not None:
                self.alarms.close()
            # (the timer task kept the loop's mark; draining may outlast hang_timeout)
            ticker = asyncio.create_task(tick_forever(self.loop_mark))
            try:
                await self._shutdown()
            finally:
                ticker.cancel()
                self._beat_stop.set()
                self.gc_pauses.uninstall()
        if isinstance(self.store.failed, StorageCorruptError):
            raise self.store.failed  # the slot stays down as corrupt (exit status 65)

    async def _start_front(self, cfg: ObjectProcessConfig) -> Any:
        """[http] front = "slots": serve HTTP here; each connection goes to the process that
        owns its first request's object (objectproc/httpfront.py)."""
        import socket

        from durable.broker.gateway import Front

        from .httpfront import SlotFront, slot_of_request
        front = await Front.start(cfg.daemon, self.client, self.env, None, accept=False)
        ring = Ring(cfg.slots)
        ids = self.ids

        def place(head: bytes) -> int | None:
            return None if cfg.daemon.http.worker else slot_of_request(head, ids, ring.slot_for)
        front.acceptor = SlotFront(socket.socket(fileno=cfg.http_fd), cfg.slot, cfg.slots,
                                   cfg.run_dir or cfg.data_dir, place, front.adopt)
        log.info("slot %d: serving HTTP on %s", cfg.slot, cfg.daemon.http.listen)
        return front

    def stop(self) -> None:
        """Finish the calls in flight, make every write durable, exit (signal-safe via loop)."""
        self._stopping.set()

    async def _join_cluster(self) -> None:
        """Cluster mode: the lease this host holds on the slot, and the slot's log."""
        from durable.supervisor.host import LEASES, LeaseFile

        from .replication import Replicator
        cfg = self.config
        self._lease = LeaseFile(Path(cfg.run_dir) / LEASES, cfg.slots)
        self._check_lease()
        self.replicator = Replicator(cfg.cluster_servers, cfg.slot,
                                     replicas=cfg.cluster_replicas,
                                     hint=Path(cfg.data_dir) / f"slot-{cfg.slot}.stream")
        await asyncio.to_thread(self.replicator.connect, 30.0)
        self._check_lease()  # (replaying the log takes time too: checked again on each send)

    def _check_lease(self) -> None:
        """Cluster mode: past this host's lease on the slot, another host may serve it now:
        this process exits at once, without a reply or a write more (docs/cluster.md)."""
        if self._lease is not None and self._lease.get(self.config.slot) <= time.monotonic():
            log.error("slot %d: this host's lease on the slot ended; exiting without serving "
                      "anything more", self.config.slot)
            logging.shutdown()
            os._exit(EXIT_LEASE_LOST)

    async def _shutdown(self) -> None:
        if self.peer_server is not None:  # other processes' new calls wait in the broker
            self.peer_server.bye()
        if self._sock is not None:  # and so do the broker's (it hears this process still
            # beats while it drains, and must not send it more: a call to an object not
            # drained here would be cut off by the close)
            self._send(WorkerStopping().encode())
        if self.front is not None:  # first: no new requests; those in flight finish
            await self.front.close()
        while self._warming:  # (their calls go in, and are drained with the rest)
            await asyncio.gather(*[w.task for w in self._warming.values() if w.task],
                                 return_exceptions=True)
        while busy := [a for a in self.catalog.values() if a._tasks]:
            for act in busy:  # (again: calls sent before the callers heard may come late)
                await act.drain()
            await asyncio.sleep(0)  # (what arrived meanwhile is delivered first)
        if self._tasks:  # inspect requests in flight: nothing runs unowned
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for stream in list(self._streams):  # queries' snapshots: ended before the files close
            stream.cancel()
            if stream.thread is not None:
                await asyncio.to_thread(stream.thread.join, 10.0)
        # The beat thread told the broker this process lives all through the drain: a drain
        # longer than the broker's window (heartbeat x misses, 5 s) no longer fails the calls
        # being answered. The supervisor's grace period bounds the drain.
        self._beat_stop.set()
        self._closing = True
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            await self.store.close()
        if self.replicator is not None:
            await asyncio.to_thread(self.replicator.close)
        if self.links is not None:
            self.links.close()
        if self.peer_server is not None:
            self.peer_server.close()
        if self._sock is not None:
            self._close_broker_socket()

    def _close_broker_socket(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close()

    def _broker_dropped(self) -> bool:
        """Whether the connection to the broker closed (it died or stopped) since the last
        look. Asked before each message from it is handled: what is still queued came from
        the broker that is gone, and its callers may have heard StubBrokenError ("may have
        run") already and gone on by a peer link. That happens when this loop was held by a
        long call meanwhile (the beat thread kept the process registered): the call must then
        not run after what they did since (``test_peer_calls.py``, a blocked callee)."""
        return self._monitor is not None and any(
            event == zmq.EVENT_DISCONNECTED for event, _ in pending_events(self._monitor))

    def _register(self) -> None:
        held = self._take_held()
        if self._sock is not None:
            self._close_broker_socket()
            if self.sockets is not None:  # a new incarnation: callers saw its sockets close
                self._forget_sockets()
        if self._ctx is None:
            self._ctx = zmq.Context.instance()
        self._sock = LoopSocket.dealer(self.config.backend, self._handle, self._ctx,
                                       curve=self.curve)
        self._sock.on_batch = self._handle_received_batch
        if not self.config.cluster_servers:  # (cluster mode has no peer path to overtake by)
            self._monitor = self._sock.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._liveness = Liveness(self.config.heartbeat, self.config.misses)
        incarnation = secrets.randbits(62) | 1
        self._incarnation = incarnation
        self._registered_at = time.monotonic()
        local = self.client.local if self.client is not None else None
        if local is not None:  # in-process stubs of the old incarnation break as others do
            if local.incarnation:
                self.client._local_lost()
            local.incarnation = incarnation
        self._send(Ready(self.config.slot, os.getpid(), incarnation).encode())
        self._send(PeerBatches().encode())  # (it reads batches: the broker answers if it does)
        if self.peer_server is not None:  # its callers' stubs of the old one break too
            self.peer_server.welcome_all()
        log.info("slot %d: registering with the broker (incarnation %x)", self.config.slot, incarnation)
        for call in held:  # (sent to the incarnation that ended: refused)
            self._refuse_stale(call)

    def _beat_thread(self) -> None:
        """Tell the broker this incarnation lives, from a thread with a socket of its own.

        The loop's own heartbeats stop while a call runs without yielding; these do not,
        so a long call does not break the stubs of every other object of the slot. A loop
        blocked for good is the supervisor's to find (``hang_timeout``).
        """
        name_os_thread()

        def dealer(endpoint: str) -> zmq.Socket[Any]:
            s = self._ctx.socket(zmq.DEALER)
            if self.curve is not None:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self.curve
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 4)
            s.connect(endpoint)
            return s

        sock = dealer(self.config.backend)
        remote: dict[str, zmq.Socket[Any]] = {}  # cluster mode: the other hosts' brokers
        stall_after = self._stall_after
        self._beat_at = time.monotonic()
        try:
            while not self._beat_stop.wait(self.config.heartbeat / 2):
                now = time.monotonic()
                if now - self._beat_at > stall_after:  # (this thread stood still too)
                    self._stall_from = self._beat_at
                self._beat_at = now
                # (while the loop turns, its own heartbeats reach the broker: a beat is due
                # once one of them is late, which halves an idle daemon's messages)
                liveness = self._liveness
                if liveness is None or now - liveness.last_sent >= self.config.heartbeat:
                    with contextlib.suppress(zmq.ZMQError):
                        sock.send_multipart(Beat(self.config.slot, self._incarnation).encode(),
                                            zmq.NOBLOCK)
                links = self.links.beats() if self.links is not None else []
                for endpoint in [e for e in remote if e not in dict(links)]:
                    remote.pop(endpoint).close(linger=0)
                for endpoint, incarnation in links:
                    s = remote.get(endpoint)
                    if s is None:
                        s = remote[endpoint] = dealer(endpoint)
                    with contextlib.suppress(zmq.ZMQError):
                        s.send_multipart(Beat(self.config.slot, incarnation).encode(),
                                         zmq.NOBLOCK)
        finally:
            self._beat_at = math.inf  # (stopped on purpose: a drain is no stall)
            sock.close(linger=0)
            for s in remote.values():
                s.close(linger=0)

    def _stood_still(self) -> bool:
        """Whether the beat thread saw the process stand still, or has not beaten for that long
        (the loop got here first): asked before a call runs, when the broker falls silent and
        when it asks this process to register again (whichever the loop finds first)."""
        return (self._stall_from is not None
                or time.monotonic() - self._beat_at > self._stall_after) and not self._closing

    def _register_anew(self, why: str) -> None:
        """Register again, logged as a stall if this process stood still (the broker's silence
        or its request is then the stall's doing, whichever the loop found first)."""
        if self._stood_still() and self._after_stall():
            return
        log.warning("slot %d: %s", self.config.slot, why)
        self._register()

    def _after_stall(self) -> bool:
        """Whether calls sent before now went to an incarnation the broker has ended: the
        whole process stood still (SIGSTOP, a paused VM, a starved machine) long enough for
        the broker to end it and tell the callers of its calls in flight that their stubs
        broke ("may have run"), and it has not registered since. Those callers may have gone
        on with new stubs, so what was sent to it meanwhile (queued by the broker, over peer
        links, by this process's own stubs) must not run now, after their later calls: it
        registers anew first (the broker's socket and what it queued go; peer and local
        stubs of the old incarnation break). A call that blocks the loop is no stall: the
        beat thread beats on beside it."""
        began = self._stall_from
        if began is None:  # (the loop got here before the beat thread ran again)
            began = self._beat_at
        self._stall_from = None
        if self._registered_at >= began + self._stall_after:
            return False  # (registered again since, when the broker said so: nothing stale)
        self.counters["stalls"] = self.counters.get("stalls", 0) + 1
        log.warning("slot %d: this process stood still for %.1f s (stopped or starved) past "
                    "the broker's window; registering anew, so that nothing sent to it "
                    "meanwhile runs after what its callers did since (their stubs broke)",
                    self.config.slot, time.monotonic() - began)
        self._register()
        return True

    def _ask_broker(self) -> bool:
        """Whether the broker is now asked if this incarnation still serves (its calls are
        then held in ``_held`` until it answers).

        The beat thread needs the GIL to beat: a call holding it (one long call into C code,
        an overloaded machine) starves the thread as a stopped process would, so the
        process's own clocks cannot tell whether the broker's window passed. The broker can:
        its answer (``StillAlive``, or ``WorkerDisconnect`` if it ended this incarnation)
        comes behind every call it sent before, so what came meanwhile is known to be
        current (it runs) or stale (refused, as ``_after_stall`` does). Before, a pause past
        three quarters of the window broke every stub of the slot though the broker had kept
        it. Cluster mode, whose calls come from several brokers, registers anew as before.
        """
        if self.links is not None or self._sock is None:
            return False
        began = self._stall_from if self._stall_from is not None else self._beat_at
        if self._registered_at >= began + self._stall_after:
            return False  # (registered again since: nothing stale; _after_stall agrees)
        self._held = []
        self._asked_at = time.monotonic()
        self.counters["stall_asks"] = self.counters.get("stall_asks", 0) + 1
        log.warning("slot %d: this process could not beat for %.1f s (stopped, starved, or the "
                    "GIL held); asking the broker whether this incarnation still serves before "
                    "anything sent to it runs", self.config.slot, self._asked_at - began)
        self._send(AskAlive(self._incarnation).encode())
        wait = self.config.heartbeat * self.config.misses / 2
        self._ask_timer = asyncio.get_running_loop().call_later(wait, self._no_answer, wait)
        return True

    def _still_alive(self, incarnation: int) -> None:
        """The broker's answer: it has not ended this incarnation, so the held calls run."""
        if self._held is None or incarnation != self._incarnation:
            return  # (an answer to an incarnation since replaced)
        held = self._take_held()
        # (the broker heard this incarnation when asked: a pause is measured from then)
        self._stall_from = None
        self._beat_at = max(self._beat_at, self._asked_at)
        self.counters["stall_asks_alive"] = self.counters.get("stall_asks_alive", 0) + 1
        log.warning("slot %d: the broker still serves this incarnation (asked %.0f ms ago): the "
                    "%d calls held meanwhile run now", self.config.slot,
                    (time.monotonic() - self._asked_at) * 1000, len(held))
        for call in held:
            if self._closing:
                self._refuse_stale(call)
            else:
                self._call(call)  # (held again, in order, if a pause is found again)

    def _take_held(self) -> list[WorkerCall]:
        """The calls held while the broker was asked (none if it was not); asking ends."""
        held, self._held = self._held, None
        if self._ask_timer is not None:
            self._ask_timer.cancel()
            self._ask_timer = None
        return held or []

    def _no_answer(self, wait: float) -> None:
        self._ask_timer = None
        if self._held is None:
            return
        log.warning("slot %d: the broker did not answer within %.1f s whether this incarnation "
                    "still serves", self.config.slot, wait)
        if not self._after_stall():
            self._register()  # (the held calls are refused)

    def _refuse_stale(self, call: WorkerCall) -> None:
        self._send(WorkerError.of(call.client, call.call_id, StubBrokenError(
            f"stub lost its object (slot {self.config.slot}: its process stood still past "
            "the broker's window and registered anew); get a new stub with "
            "namespace.get(id) and retry if the call is safe to repeat")).encode())

    def _send_replies(self) -> None:
        """The replies that calls woken by a durable group queued: sent now (SlotStore.
        after_durable; LoopSocket.send_queued says why)."""
        if self.peer_server is not None:
            self.peer_server.sock.send_queued()
        self._sock.send_queued()

    def _send(self, frames: list[bytes]) -> None:
        if len(frames) > 1:
            to = frames[1][:1]
            if to == LOCAL:  # to this process's own client
                out = to_client(frames)
                if out is not None and self.client is not None:
                    asyncio.get_running_loop().call_soon(self.client._handle, out,
                                                         context=contextvars.Context())
                return
            if to == PEER:  # to a caller in another slot's process, on the peer path
                if self.peer_server is not None:
                    self.peer_server.send(frames)
                return
        if self._lease is not None:
            self._check_lease()
            if self.links is not None and self.links.route(frames):
                return
        try:
            self._sock.send(frames)
        except zmq.ZMQError as e:
            log.warning("slot %d: could not send to the broker: %s", self.config.slot, e)
        self._liveness.sent()

    def _local_call(self, call_id: int, namespace: str, object_id: str, head: bytes,
                    body: bytes, name: str | None) -> None:
        """A call of this process's own client to an object of its slot: served here, as if
        the broker had delivered it, in a context of its own (never the caller's object's)."""
        call = WorkerCall(LOCAL, call_id, namespace, object_id, head, body, name)
        asyncio.get_running_loop().call_soon(self._local_deliver, call,
                                             context=contextvars.Context())

    def _peer_deliver(self, call: WorkerCall) -> None:
        if self._closing:  # (sent before the caller heard PBYE: its stub ends with it)
            self._send(WorkerError.of(call.client, call.call_id, StubBrokenError(
                f"stub lost its object (slot {self.config.slot}: its process is stopping); get "
                "a new stub with namespace.get(id) and retry if the call is safe to repeat"
            )).encode())
            return
        self._call(call)

    def _local_deliver(self, call: WorkerCall) -> None:
        self.counters["local_calls"] = self.counters.get("local_calls", 0) + 1
        if self._closing:  # (storage closes next: as if the process had gone)
            self._send(WorkerError.of(LOCAL, call.call_id, OverloadedError(
                f"slot {self.config.slot} is stopping; retry shortly")).encode())
            return
        self._call(call)

    # -- incoming (called by the LoopSocket for each message) --------------------------
    def _handle(self, frames: list[bytes]) -> None:
        if self._monitor is not None and self._broker_dropped():
            self._broker_closed()
            return
        self._liveness.heard()
        msg = self._parse_broker(frames)
        if type(msg) is WorkerCall and msg.head[:1] != EVENT and has_input(self._sock.sock):
            self._handle_batch([msg])
        elif msg is not None:
            self._dispatch(msg)

    def _handle_received_batch(self, received: list[list[bytes]]) -> None:
        """The messages of a batch from the broker (``LoopSocket.on_batch``), together: a
        ClientGone behind a call in it must be seen before the call runs."""
        if self._monitor is not None and self._broker_dropped():
            self._broker_closed()
            return
        self._liveness.heard()
        self._handle_batch([m for m in map(self._parse_broker, received) if m is not None])

    def _broker_closed(self) -> None:
        log.warning("slot %d: the connection to the broker closed; registering again "
                    "(what the old broker sent and this process had not read is dropped: "
                    "its callers heard StubBrokenError)", self.config.slot)
        self._register()

    def _parse_broker(self, frames: list[bytes]) -> Any:
        try:
            return parse_from_broker_to_worker(frames)
        except ProtocolError as e:
            self.counters["dropped_broker_messages"] += 1
            log.debug("dropped a malformed broker message: %s", e)
            return None

    def _handle_batch(self, batch: list[Any]) -> None:
        """Messages from the broker (a call, or a batch's), and what the broker sent after
        them (read now, batches unpacked): a call whose client the broker says is gone further
        on is dropped. Its client was a relay (an HTTP front,
        a gateway) that died after the broker forwarded the call; the relay's caller heard
        its connection close ("may have run") and may have gone on by a link of its own,
        whose call this loop, held meanwhile, may have run already. Nobody waits for the
        dropped call's answer."""
        sock = self._sock.sock
        read = 0
        while read < _READ_AHEAD and has_input(sock):
            try:
                frames = recv_frames(sock)
            except zmq.ZMQError:
                break
            more = [frames]
            if frames[0] == BATCH:
                try:
                    more = unpack_batch(frames)
                except ProtocolError as e:
                    self._sock.malformed_batches += 1
                    log.debug("dropped a malformed batch from the broker: %s", e)
                    continue
            read += len(more)
            batch.extend(m for m in map(self._parse_broker, more) if m is not None)
        if self._monitor is not None and self._broker_dropped():
            self._broker_closed()
            return
        gone: set[bytes] = set()  # (clients whose ClientGone comes later in the batch)
        keep = []
        for msg in reversed(batch):
            if type(msg) is ClientGone:
                gone.add(msg.client)
            elif type(msg) is WorkerCall and msg.client in gone and msg.head[:1] != EVENT:
                self.counters["calls_of_gone_clients"] = \
                    self.counters.get("calls_of_gone_clients", 0) + 1
                continue
            keep.append(msg)
        current = self._sock
        for msg in reversed(keep):
            if self._sock is not current:
                return  # (registered anew meanwhile: the rest came by the socket it closed)
            self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        if type(msg) is WorkerCall:
            self._call(msg)
        elif type(msg) is ClientGone:
            self._client_gone(msg.client)
        elif type(msg) is WorkerDisconnect:
            self._register_anew(f"broker asked to register again ({msg.reason})")
        elif type(msg) is BrokerHeartbeat:
            pass
        elif type(msg) is StillAlive:
            self._still_alive(msg.incarnation)
        elif type(msg) is PeerBatches:  # the broker reads batches: a turn's sends go as one
            self._sock.batches = True

    def _quiet(self) -> bool:
        """Whether a call's sync may block the loop for one fsync: no other call would wait.

        Under concurrency the writer thread's group commit is the better deal.
        """
        return self._in_flight <= 1

    def _call(self, call: WorkerCall) -> None:
        held = self._held
        if held is None and self._stood_still():  # (one check a call, as before)
            if self._ask_broker():
                held = self._held
            elif self._after_stall():
                self._refuse_stale(call)  # (sent to the incarnation that just ended)
                return
        if held is not None:
            held.append(call)  # (until the broker says whether it still serves)
            return
        self.counters["calls"] += 1
        if self._idle:
            self._busy()
        client, call_id, size = call.client, call.call_id, len(call.body)
        if size and self._in_flight and self._inflight_bytes + size > self.config.max_inflight_bytes:
            self.counters["overloaded"] = self.counters.get("overloaded", 0) + 1
            self._send(WorkerError.of(client, call_id, OverloadedError(
                f"slot {self.config.slot} holds {self._inflight_bytes >> 20} MiB of call bodies "
                f"(max_inflight_mb = {self.config.max_inflight_bytes >> 20}); retry shortly"
            )).encode())
            return
        self._in_flight += 1
        self._inflight_bytes += size

        first = call.head[:1]
        method = first == METHOD
        event = first == EVENT
        act: Activation | None = None
        started = time.perf_counter()

        def reply(resp: Any, error: BaseException | None) -> None:
            self._in_flight -= 1
            self._inflight_bytes -= size
            if self.config.metrics:
                self.metrics.record(call.namespace, "method" if method else "websocket" if event
                                    else "fetch", "ok" if error is None else str(getattr(
                                        error, "code", "object_error")),
                                    time.perf_counter() - started)
            if error is None:
                try:
                    frames = WorkerReply(client, call_id, *(
                        encode_result(resp) if method else (EVENT, b"") if event
                        else encode_response(resp))).encode()
                except Exception as e:  # a result that cannot be sent: the caller hears why
                    error = ObjectError(
                        f"{call.namespace} {request.name}() returned a value that cannot be "
                        f"sent: {e}" if method else f"the object's Response could not be "
                        f"encoded ({type(e).__name__}: {e})", "TypeError", None, "TypeError")
                else:
                    if len(frames[4]) > MAX_FRAME_BYTES or len(frames[3]) > MAX_FRAME_BYTES:
                        # (the socket it would cross is cut past it, with every call on it)
                        error = ObjectError(frame_too_big(
                            f"{call.namespace} {request.name}()'s result" if method else
                            "the object's Response", *frames[3:]) + (
                            ": return it in parts, or stream it from fetch" if method else
                            ": send a larger body as a stream") + " (docs/objects.md, "
                            "\"Streamed responses\")", "ValueError", None, "ValueError")
                        self.counters["answers_too_big"] = \
                            self.counters.get("answers_too_big", 0) + 1
                    else:
                        self._send(frames)
                        if not method and not event and resp._stream is not None \
                                and act is not None:
                            self.sockets.stream(act, client, call_id, resp._stream)
                        return
            self.counters["errors"] += 1
            self._send(WorkerError.of(client, call_id, error,
                                      getattr(error, "remote_traceback", None)).encode())

        request: Any = None
        try:
            if event:
                self._event(call, reply)
                return
            if method:
                request = decode_method_call(call.head, call.body)
                act = self._target(call.namespace, call.object_id, call.name)
                act.deliver(request, reply)
                return
            request = decode_request(call.head, call.body)
            if request.method in _OPERATOR_METHODS and request.url.startswith("durable:"):
                if client[:1] != b"A":  # the broker's operator socket, never the data plane
                    raise PermissionError(
                        f"{request.method} {request.url.split('?')[0]} is an operator request: "
                        "it is accepted only through the daemon's operator endpoint "
                        "(`durable inspect` / `durable backup` on the daemon's machine)")
                if request.method == INSPECT_METHOD and request.url.startswith(INSPECT_URL):
                    self._inspect(call.namespace, call.object_id, request, reply)
                    return
                if request.method == BACKUP_METHOD and request.url.startswith(BACKUP_URL):
                    self._backup(request, reply)
                    return
                if request.method == QUERY_METHOD and request.url.startswith(QUERY_URL):
                    self._query(request, reply)
                    return
            act = self._target(call.namespace, call.object_id, call.name)
            if request._upgrade is not None:  # the caller's id for the socket, and who it is
                request._upgrade = (client, request._upgrade)
        except ConstructorError as e:  # logged with its traceback; the next call tries again
            reply(None, e.error)
            return
        except Exception as e:  # bad request head, unknown namespace
            reply(None, e)
            return
        act.deliver(request, reply)

    # -- WebSockets and streams -----------------------------------------------------------
    def _event(self, call: WorkerCall, reply: Any) -> None:
        """An event on a channel: a stream's credit or cancel (handled here), or a message,
        close or error on a socket (a call of its object, which is activated if evicted)."""
        ev = decode_event(call.head, call.body)
        if ev.kind == EV_CREDIT:
            self.sockets.credit(call.client, ev.channel, ev.credit)
            reply(None, None)
            return
        if ev.kind == EV_CANCEL:
            self.sockets.cancel_stream((call.client, ev.channel))
            reply(None, None)
            return
        key = (call.namespace, call.object_id)
        ws = self.sockets.find(key, call.client, ev.channel)
        if ws is None:  # the object closed it meanwhile: nothing to deliver
            reply(None, None)
            return
        if ev.kind == EV_CLOSE:  # gone from get_websockets() at once
            self.sockets.of(key).drop(ws)
        try:
            act = self._target(call.namespace, call.object_id, call.name)
        except ConstructorError as e:
            reply(None, e.error)
            return
        act.deliver(SocketEvent(ev, ws), reply)

    def _forget_sockets(self) -> None:
        """This process registers again (the broker lost it): its callers' sockets were
        closed with 1012 (BROKEN) and its streams failed; each object hears of its sockets."""
        for key, ws in self.sockets.forget_all():
            try:
                act = self._target(*key)
            except ConstructorError:
                continue
            act.deliver(SocketEvent(event_close(1012, "the object process reconnected"), ws),
                        _ignore)

    def _client_gone(self, client: bytes) -> None:
        """A caller left without closing its sockets (a gateway process died): each object
        hears ``websocket_close(ws, 1006, "", False)``."""
        for key, ws in self.sockets.client_gone(client):
            self.sockets.of(key).drop(ws)
            try:
                act = self._target(*key)
            except ConstructorError:
                continue
            act.deliver(SocketEvent(event_close(1006, "the connection was lost"), ws), _ignore)

    # -- alarms -------------------------------------------------------------------------
    def _load_alarms(self, lo: int, hi: int, limit: int) -> list[tuple[bytes, int]]:
        try:
            return self.store.duck.due_alarms(lo, hi, limit)
        except Exception as e:  # a damaged file fails the slot through its next read
            log.error("slot %d: reading alarms failed: %s", self.config.slot, e)
            return []

    def _fire_alarm(self, obj: bytes, due: int, retry: int, done: Any) -> None:
        """Run ``obj``'s alarm handler through its activation (activating it if evicted)."""
        namespace, _, object_id = obj.decode().partition("/")
        if namespace not in self.classes:
            if namespace not in self._orphan_namespaces:
                self._orphan_namespaces.add(namespace)
                log.warning("slot %d: alarms of namespace %r are due, but it is not configured; "
                            "they are kept and fire once it is", self.config.slot, namespace)
            done(None)  # kept in storage: it fires after a restart with the namespace back
            return
        if self._idle:  # (before the constructor, as in _call: it may hold the loop too)
            self._busy()
        try:
            act = self._target(namespace, object_id)
        except ConstructorError as e:
            done(e.error)
            return
        self._in_flight += 1  # (so that concurrent handlers share group commits: _quiet)
        started = time.perf_counter()

        def ended(_resp: Any, error: BaseException | None) -> None:
            self._in_flight -= 1
            if self.config.metrics:
                self.metrics.record(namespace, "alarm", "ok" if error is None else str(getattr(
                    error, "code", "object_error")), time.perf_counter() - started)
            done(error)

        act.deliver(AlarmCall(due, retry), ended)

    def _alarm_given_up(self, obj: bytes, due: int, error: BaseException) -> None:
        """Retries are spent: log it, and delete the alarm (unless a newer one replaced it)."""
        namespace, _, object_id = obj.decode().partition("/")
        log.error("%s %s: alarm() failed %d times in a row; the alarm due at %s is dropped. "
                  "Last error: %s", namespace, object_id, self.config.alarm_retries + 1,
                  _iso(due), error)
        act = self.catalog.get((namespace, object_id))
        try:
            if act is not None and act.phase in (Phase.ACTIVE, Phase.BLOCKED):
                if act.storage._read_alarm() == due:
                    act.storage._write_alarm(None)
            elif self.store.read_alarm(obj) == due:
                self.store.submit(obj, False, {}, alarm=ALARM_DELETE)
        except Exception as e:  # (a full disk): it fires again after a restart; at least once
            log.warning("%s %s: could not delete the dropped alarm: %s", namespace, object_id, e)

    def _inspect(self, namespace: str, object_id: str, request: Any, reply: Any) -> None:
        """`durable inspect`: the object's stored keys and values, without running its code."""
        if namespace not in self.classes:
            raise UnknownNamespaceError(f"this object process does not host namespace {namespace!r}")
        act = self.catalog.get((namespace, object_id))
        storage = act.storage if act is not None else ObjectStorage(self.store, namespace, object_id)
        prefix = parse_qs(urlsplit(request.url).query).get("prefix", [None])[0]

        async def run() -> None:
            try:
                rows = await storage.list(prefix=prefix)
                out = [[k, repr(v)] for k, v in rows.items()]
                due = await storage.get_alarm()
                reply(Response.json(out, headers={"x-durable-alarm": str(due)} if due is not None
                                    else None), None)
            except Exception as e:
                reply(None, e)

        self._spawn(run())

    def _spawn(self, coro: Any) -> None:
        """Run an operator request's work as a task this process owns (awaited at shutdown)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _query(self, request: Any, reply: Any) -> None:
        """`durable sql` / `export` / `objects`: a snapshot of this slot, streamed from a thread
        (``op=snapshot``), or one page of its objects (``op=objects``). See objectproc/query.py."""
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        op = q.get("op", "")
        namespace = q.get("ns") or None
        if namespace is not None and namespace not in self.classes:
            raise UnknownNamespaceError(f"namespace {namespace!r} is not configured")
        if op == "ping":  # (a query that reads no rows still proves the caller is an operator)
            reply(Response.json({"slot": self.config.slot}), None)
        elif op == "objects":
            if namespace is None:
                raise ValueError("op=objects needs ns=NAMESPACE")
            limit = int(q.get("limit", "1000"))
            if not 1 <= limit <= 10_000:
                raise ValueError(f"limit must be between 1 and 10000, got {limit}")
            self._spawn(self._objects_page(namespace, q.get("after") or None, limit,
                                           q.get("prefix") or None, reply))
        elif op == "snapshot":
            what = q.get("what", "kv")
            if what not in ("kv", "data", "names", "alarms", "agg"):
                raise ValueError(f"what must be kv, data, names, alarms or agg, got {what!r}")
            split = None  # (planned here, once: a query that does not split costs no snapshot)
            if what == "agg" and (split := pushdown.plan(q.get("q") or "")) is None:
                raise ValueError("what=agg needs q=QUERY, a query that a slot aggregates "
                                 "(docs/query.md)")
            timeout = min(float(q.get("timeout", "60")), 900.0)  # (checkpoints wait for it)
            count = q.get("count") == "objects"  # (the E message says how many hold a key)
            self._spawn(self._snapshot(what, namespace, timeout, reply, split, count))
        else:
            raise ValueError(f"op must be snapshot, objects or ping, got {op!r}")

    async def _snapshot_turn(self) -> None:
        """Wait for one of this process's MAX_SNAPSHOTS (queued queries wait here)."""
        if self._snapshots is None:
            self._snapshots = asyncio.Semaphore(MAX_SNAPSHOTS)
        try:
            await asyncio.wait_for(self._snapshots.acquire(), QUERY_QUEUE_SECONDS)
        except TimeoutError:
            raise OverloadedError(
                f"slot {self.config.slot} is busy with {MAX_SNAPSHOTS} queries and this one "
                f"waited {QUERY_QUEUE_SECONDS:g} s for its turn; try again later") from None

    async def _snapshot(self, what: str, namespace: str | None, timeout: float,
                        reply: Any, split: pushdown.Plan | None = None,
                        count: bool = False) -> None:
        try:
            await self._snapshot_turn()
        except Exception as e:
            reply(None, e)
            return
        loop = asyncio.get_running_loop()

        def ended(stream: SnapshotStream) -> None:
            self._snapshots.release()
            self._streams.discard(stream)

        def done(stream: SnapshotStream, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # (a loop already closed: nothing waits)
                loop.call_soon_threadsafe(ended, stream)
            if error is not None:
                log.warning("slot %d: a query's snapshot ended early after %d rows: %s",
                            self.config.slot, stream.rows, error)

        try:
            run_dir = Path(self.config.run_dir or self.config.data_dir)
            stream = SnapshotStream(self.store, self._ctx or zmq.Context.instance(), run_dir,
                                    what, namespace, timeout=timeout, split=split,
                                    count_objects=count)
        except Exception as e:
            self._snapshots.release()
            reply(None, e)
            return
        self._streams.add(stream)
        stream.start(done)
        reply(Response.json({"endpoint": stream.endpoint, "slot": self.config.slot,
                             "applied_seq": stream.applied_seq, "cut_seq": stream.cut_seq}), None)

    async def _objects_page(self, namespace: str, after: str | None, limit: int,
                            prefix: str | None, reply: Any) -> None:
        try:
            await self._snapshot_turn()
        except Exception as e:
            reply(None, e)
            return
        try:
            cur = self.store.duck._con.cursor()
            try:
                overlay = Overlay.of(self.store.capture(cur)[0])
                rows = await asyncio.to_thread(_list_objects, cur, overlay, namespace,
                                               start_after=after, limit=limit, prefix=prefix)
            finally:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                cur.close()
            reply(Response.json({"objects": rows}), None)
        except Exception as e:
            reply(None, e)
        finally:
            self._snapshots.release()

    def _backup(self, request: Any, reply: Any) -> None:
        """`durable backup`: pin the slot's files (nothing applied, none deleted) or release them."""
        query = parse_qs(urlsplit(request.url).query)
        op = query.get("op", [""])[0]

        async def run() -> None:
            try:
                if op == "pin":
                    timeout = min(float(query.get("timeout", ["600"])[0]), MAX_PIN_SECONDS)
                    reply(Response.json(await self.store.pin(timeout)), None)
                elif op == "unpin":
                    reply(Response.json({"held": self.store.unpin()}), None)
                else:
                    raise ValueError(f"backup op must be pin or unpin, got {op!r}")
            except Exception as e:
                reply(None, e)

        self._spawn(run())

    def _target(self, namespace: str, object_id: str, name: str | None = None
                ) -> Activation | _Warming:
        """Where a call for this object goes: its activation, made now; or, for an existing
        object that has none, a waiting room while its rows are read off the loop (then the
        activation starts with them, and the calls go in, in their order)."""
        key = (namespace, object_id)
        warming = self._warming.get(key)
        if warming is not None:
            if warming.name is None:
                warming.name = name
            return warming
        filter_ = getattr(self.store, "stored", None)  # (durable.testing's memory has none)
        if key not in self.catalog and namespace in self.classes and filter_ is not None \
                and self.store.failed is None:
            try:
                stored = object_key(namespace, object_id) in filter_
            except ValueError:
                stored = False
            if stored:
                warming = self._warming[key] = _Warming(key, name)
                warming.task = asyncio.create_task(self._warm(key, warming),
                                                   context=contextvars.Context())
                return warming
        return self._activation(namespace, object_id, name)

    async def _warm(self, key: tuple[str, str], warming: _Warming) -> None:
        namespace, object_id = key
        try:
            try:
                rows = await self.store.warm([object_key(namespace, object_id),
                                              name_key(namespace, object_id)])
            finally:
                del self._warming[key]
            act = self._activation(namespace, object_id, warming.name, rows)
        except Exception as e:  # (a damaged file, a constructor that raised): the calls get
            error = e.error if isinstance(e, ConstructorError) else e  # what theirs would have
            for _, reply in warming.parked:
                reply(None, error)
            return
        for request, reply in warming.parked:
            act.deliver(request, reply)

    def _activation(self, namespace: str, object_id: str, name: str | None = None,
                    warm: dict[bytes, tuple[dict[str, bytes | None], bool]] | None = None
                    ) -> Activation:
        """The object's activation, made now if it has none (``warm``: what
        ``SlotStore.warm`` read of it and its name)."""
        key = (namespace, object_id)
        act = self.catalog.get(key)
        if act is None or act.phase is Phase.RESET or (
                act.phase is Phase.BROKEN and self.store.failed is None):
            # (a broken activation on a healthy slot lost writes to a full disk: reset it)
            cls = self.classes.get(namespace)
            if cls is None:
                raise UnknownNamespaceError(f"this object process does not host namespace {namespace!r}")
            cfg = self.config
            stored_name: Any = _UNREAD
            if warm is not None:
                stored_name = warm[name_key(namespace, object_id)][0].get(NAME_KEY)
            known = self._known_name(namespace, object_id, name, stored_name)
            try:
                act = Activation(self.store, namespace, object_id, cls, self.env, name=known,
                                 cpu_limit=cfg.cpu_limits.get(namespace, cfg.cpu_limit),
                                 debug=cfg.debug, sockets=self.sockets,
                                 warm=warm[object_key(namespace, object_id)] if warm else None)
            except Exception as e:
                raise ConstructorError(self._constructor_failed(namespace, object_id, known, cls, e)) from e
            self.catalog.pop(key, None)  # (a reset one's successor goes to the end, as new)
            self.catalog[key] = act
            if known is not None and known == name:  # (this call's name, checked)
                self._store_name(act, name, stored_name)
        else:
            now = time.monotonic()
            if now - act.placed >= self.config.idle_timeout / 8:
                # (back to the catalog's end, at most 8 times per idle_timeout: see evict_idle)
                del self.catalog[key]
                self.catalog[key] = act
                act.placed = now
            if name is not None and act.name is None and \
                    self._name_matches(namespace, object_id, name):
                act.learn_name(name)
                self._store_name(act, name)
        return act

    def _name_matches(self, namespace: str, object_id: str, name: str) -> bool:
        """Whether ``name`` is really the one ``object_id`` was made from (callers could lie)."""
        ids = self.ids.get(namespace)
        return ids is not None and len(name) <= MAX_OBJECT_NAME \
            and ids.hex_from_name(name) == object_id

    def _known_name(self, namespace: str, object_id: str, name: str | None,
                    stored: Any = _UNREAD) -> str | None:
        """The object's name: from this call (checked), else as stored by an earlier one
        (``stored``: as read already)."""
        if name is not None and self._name_matches(namespace, object_id, name):
            return name
        try:
            data = self.store.read(name_key(namespace, object_id), NAME_KEY) \
                if stored is _UNREAD else stored
            return None if data is None else codec.decode(data)
        except Exception:  # a name is a nicety: never fail a call for it
            return None

    def _store_name(self, act: Activation, name: str, stored: Any = _UNREAD) -> None:
        """Store the name the object's id was made from, unless it is stored already
        (``stored``: as read already).

        It rides in the object's next write set (a new object's first call usually writes:
        one record instead of two: ~10% of a new object's CPU, docs/storage.md). A call that
        writes nothing leaves it to a timer: 20 ms later it is logged alone and the log is
        kicked, so a name learnt by such a call is durable within moments too (without the
        kick it waited for the next write of anyone: a restart after SIGKILL lost it, seen
        once in CI). One timer serves every name of those 20 ms.
        """
        try:
            obj = name_key(act.namespace, act.object_id)
            if (self.store.read(obj, NAME_KEY) if stored is _UNREAD else stored) is None:
                act.storage.store_name(codec.encode(name))
                self._names.append(act.storage)
                if not self._name_kick:
                    self._name_kick = True
                    asyncio.get_running_loop().call_later(0.02, self._kick_names)
        except Exception as e:  # (a damaged file): learnt again from the next named call
            log.debug("could not store the name of %s %s: %s", act.namespace, act.object_id, e)

    def _kick_names(self) -> None:
        self._name_kick = False
        storages, self._names = self._names, []
        logged = False
        for storage in storages:
            try:
                logged = storage.flush_name() or logged
            except Exception as e:  # (a full disk): learnt again from the next named call
                log.debug("could not store the name of %s %s: %s", storage.namespace,
                          storage.object_id, e)
        # Kicked only for a name logged alone: under new objects that write, every name rode
        # its object's write, and a kick every 20 ms woke the log's writer thread for nothing
        # the turn's own commit would not have written (py-spy: ~2 us of the loop a request).
        if logged:
            self.store.log.kick()

    def _constructor_failed(self, namespace: str, object_id: str, name: str | None, cls: type,
                            e: Exception) -> BaseException:
        tb = "".join(traceback.format_exception(e))
        log.error("%s %s%s: %s() raised %s in its constructor; the next call tries again\n%s",
                  namespace, object_id, f" (name {name!r})" if name is not None else "",
                  cls.__name__, type(e).__name__, tb.rstrip())
        if isinstance(e, ObjectError):
            return e
        return ObjectError(str(e), type(e).__name__, tb if self.config.debug else None)

    # -- timers -------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        next_evict = time.monotonic() + self.config.idle_timeout / 4
        next_stats = time.monotonic()
        loop = asyncio.get_running_loop()
        mark, counters = self.loop_mark, self.counters
        calls_seen, quiet_since = -1, 0.0
        while True:
            now = loop.time()
            if counters["calls"] != calls_seen:
                calls_seen, quiet_since = counters["calls"], now
            self._idle = now - quiet_since >= IDLE_AFTER
            delay = min(self.config.heartbeat / 2, self._liveness.next_deadline() or 0.05,
                        TICK_IDLE if self._idle else TICK_BUSY)
            self._tick_due = now + delay
            self._tick_wake = wake = loop.create_future()
            self._tick_handle = loop.call_at(self._tick_due, _wake_up, wake)
            await wake
            self.loop_lag.observe(max(0.0, loop.time() - self._tick_due))
            mark[0], mark[1] = time.monotonic(), time.thread_time()  # (lifeline, CPU limit)
            if self.store.failed is not None:
                log.error("slot %d: storage failed (%s); exiting so that the slot restarts and "
                          "recovers", self.config.slot, self.store.failed)
                for act in self.catalog.values():
                    with contextlib.suppress(Exception):
                        act.fail()
                self.stop()
                return
            if not self._liveness.alive():
                self._sock.drain()  # a long call may have stalled the loop with messages waiting
            if not self._liveness.alive():
                self._register_anew("the broker is silent; registering again")
            elif self._liveness.send_due() or time.monotonic() >= next_stats:
                # at least once a second even when busy: `durable status` shows these figures
                next_stats = time.monotonic() + 1.0
                self._send(WorkerHeartbeat(self.stats()).encode())
                if self.links is not None:
                    self.links.tick(True)
            elif self.links is not None:
                self.links.tick(False)
            if self._lease is not None:
                self._check_lease()
            if time.monotonic() >= next_evict and self._evict_handle is None:
                self._evict_step()  # (its later steps at the loop's next turns)
                next_evict = time.monotonic() + self.config.idle_timeout / 4
            self.collector.tick()

    def _busy(self) -> None:
        """A call (or an alarm) on an idle slot: the timer ticks at TICK_BUSY again from now,
        so that object code that blocks the loop from here is measured (``loop_lag``), and
        the loop's mark is fresh (the CPU limit counts from it: the loop is turning now)."""
        self._idle = False
        self.loop_mark[0], self.loop_mark[1] = time.monotonic(), time.thread_time()
        handle, wake = self._tick_handle, self._tick_wake
        if handle is None or wake is None or wake.done():
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + TICK_BUSY
        if due < self._tick_due:
            handle.cancel()
            self._tick_due = due
            self._tick_handle = loop.call_at(due, _wake_up, wake)

    def _evict_step(self) -> None:
        """One step of an eviction scan; a step that stopped at its chunk has the next one run
        at the loop's next turn (``call_soon``: after the I/O and calls ready by then), so a
        scan of thousands of idle objects holds the loop ~0.6 ms at a time, not for all of
        them, and still keeps up with any rate of new objects (a chunk a turn)."""
        going_on, self._evict_handle = self._evict_handle is not None, None
        if self._stopping.is_set():
            return
        # (a later step starts past the entries the earlier ones kept: objects that cannot go
        # yet, e.g. with a call or a WebSocket open, are read once a scan, not once a step)
        if self.evict_idle(skip=self._evict_kept if going_on else 0) >= EVICT_CHUNK:
            self._evict_handle = asyncio.get_running_loop().call_soon(self._evict_step)

    def evict_idle(self, chunk: int = EVICT_CHUNK, skip: int = 0) -> int:
        """Evict idle objects; one whose own tasks still run gets ``wait_until_limit`` first.

        The catalog is in order of ``placed``, which no entry's ``last_used`` precedes (an
        activation is placed when it is made, and again, at most 8 times per timeout, just
        before a call is delivered to it), so no entry after the first one placed since the
        cutoff can be idle: the scan stops there. A slot taking new
        objects holds ``idle_timeout``'s worth of them, and reading each of them at each of
        the four scans per timeout cost ~5 µs of the loop per new object (py-spy; the entries
        are out of the CPU's caches).

        A scan evicts at most ``chunk`` objects, the oldest first (``_evict_step`` goes on at
        the loop's next turn): evicting costs ~6 µs an object, and a slot taking 4,000 new
        objects a second evicted a quarter of an ``idle_timeout``'s worth at once, a stall of
        every object of the slot (214–281 ms at a 40-s timeout, measured; docs/messaging.md).
        It starts past the first ``skip`` entries (those an earlier step of the scan kept;
        should some of them have left the catalog's front since, the entries that took their
        places wait for the next scan) and leaves in ``_evict_kept`` how many it has kept.
        """
        idle, limit = self.config.idle_timeout, self.config.wait_until_limit
        cutoff = time.monotonic() - idle
        gone = []
        held = skip
        for k, a in itertools.islice(self.catalog.items(), skip, None):
            if a.placed > cutoff:
                break
            if a.last_used <= cutoff and a.evictable(idle) and a.retire(limit):
                gone.append(k)
                if len(gone) >= chunk:
                    break
            else:
                held += 1
        self._evict_kept = held
        # An instance still alive once evicted is in a reference cycle of its own, or held
        # elsewhere: the collector's full collection comes sooner when many are (collector.py).
        kept: list[weakref.ref[Any]] = []
        for k in gone:
            act = self.catalog.pop(k)
            with contextlib.suppress(TypeError):  # (None, or a class without __weakref__)
                kept.append(weakref.ref(act.instance))
            act.evict()
        self.collector.suspects += sum(r() is not None for r in kept)
        self.counters["evicted"] += len(gone)
        return len(gone)

    def _storage(self) -> dict[str, Any]:
        """The slot's files' bytes, and its live keys (a count: at most every 10 s, and only
        with [metrics] on: a million rows take a few ms of the loop)."""
        now = time.monotonic()
        if self.config.metrics and self.store is not None and \
                now - self._storage_figures_at >= 10:
            self._storage_figures_at = now
            try:
                size = sum(os.path.getsize(p) for p in (str(self.store.duck.path),
                                                        f"{self.store.duck.path}.wal")
                           if os.path.exists(p))
                self._storage_figures = {"storage_keys": self.store.duck.row_count(),
                                         "storage_file_bytes": size}
            except Exception as e:  # a figure, never a failure
                log.debug("storage figures: %s", e)
        return self._storage_figures

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.catalog), "pid": os.getpid(), **self.counters,
                "metrics": self.metrics.snapshot(), **self._storage(),
                "fsync": self.store.log.fsync_seconds.snapshot() if self.store else None,
                "gc_pauses": self.gc_pauses.snapshot(),
                "gc": {"full_collections": self.collector.full_collections,
                       "last_full_seconds": self.collector.last_full_seconds,
                       "suspects": self.collector.suspects,
                       "young_collections": self.collector.young_collections,
                       "frozen_garbage": self.collector.frozen_garbage,
                       "growth": self.collector.growth},
                "loop_lag": self.loop_lag.snapshot(),
                "inline_commits": self.store.inline_commits if self.store else 0,
                **(self.store.statistics() if self.store else {}),
                **(self.alarms.stats() if self.alarms else {}),
                "alarms": self.store.alarm_counts if self.store else {},
                "websockets": self.sockets.count if self.sockets else 0,
                **(self.peer_server.counters if self.peer_server else {}),
                "malformed_peer_batches": self.peer_server.sock.malformed_batches
                if self.peer_server else 0,
                "malformed_broker_batches": self._sock.malformed_batches if self._sock else 0,
                **(self.client.peers.statistics() if self.client and self.client.peers else {}),
                "websocket_messages_sent": self.sockets.outbox.sent if self.sockets else 0,
                **({"http_connections": dict(self.front.acceptor.counters)}
                   if self.front is not None else {})}


def _ignore(_resp: Any, _error: BaseException | None) -> None:
    pass


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def _iso(ms: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
