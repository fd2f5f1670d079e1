"""The async client: ``durable.connect()``, namespaces, stubs.

One DEALER socket per client carries every call; replies are matched to
calls by id. Calls on one stub leave in the order they were made on that one
socket, and the broker and the object process keep that order (E-order).

The client keeps the connection alive by itself: it pings when it has been
quiet, and if the broker stops answering, says DISCONNECT, or comes back
with a new incarnation (a restart), every stub made before breaks
(``StubBrokenError`` for calls in flight and later calls), a fresh socket
says HELLO again, and new stubs work as soon as the broker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import zmq

from .errors import (
    CallTimeoutError,
    DurableError,
    OverloadedError,
    ProtocolError,
    StubBrokenError,
    UnknownNamespaceError,
    error_from_wire,
)
from .gate import OUTPUT_GATE
from .http import Request, Response
from .ids import IdFactory, ObjectId
from .peers import PEER_INFLIGHT, PeerLink, PeerRoutes
from .protocol.heartbeat import HEARTBEAT, MISSES, Liveness
from .protocol.messages import (
    MAX_FRAME_BYTES,
    MAX_NAME,
    MAX_TIMEOUT_MS,
    METHOD,
    STREAMED,
    UPGRADED,
    Broken,
    Call,
    ChannelSend,
    Disconnect,
    Drop,
    Error,
    Hello,
    PeerBatches,
    PeerCall,
    Ping,
    Pong,
    Reply,
    Stats,
    StatsReply,
    Welcome,
    decode_response,
    decode_result,
    encode_event,
    encode_method_call,
    encode_request,
    frame_too_big,
    parse_from_broker_to_client,
)
from .streams import StreamBody
from .transport import LoopSocket
from .websocket import MAX_MESSAGE, OPEN, Channel, WebSocketConnect

if TYPE_CHECKING:
    from .query import ObjectInfo, QueryResult

__all__ = ["Client", "Namespace", "TypedNamespace", "Stub", "connect", "default_endpoint"]

log = logging.getLogger("durable.client")
DEFAULT_TIMEOUT = 30.0


def call_timeout(v: Any) -> float:
    """A call's timeout in seconds, checked before the call is sent. (NaN and infinity failed
    with bare conversion errors and left the call registered; over ~24.8 days the broker
    dropped the call as malformed and it waited out the whole timeout.)"""
    if type(v) not in (int, float):
        raise TypeError(f"timeout must be a number of seconds, not {type(v).__name__}")
    if not 0 < v <= MAX_TIMEOUT_MS / 1000:  # (False for NaN too)
        raise ValueError(f"timeout must be more than 0 and at most {MAX_TIMEOUT_MS // 1000:,} "
                         f"seconds (~24.8 days), got {v!r}")
    return float(v)


def default_endpoint() -> str:
    """``$DURABLE_ENDPOINT``, else the broker socket of ``durable serve``'s defaults."""
    env = os.environ.get("DURABLE_ENDPOINT")
    if env:
        return env
    return "ipc://" + os.path.abspath(os.path.join("durable-data", "run", "broker.sock"))


def diagnose(endpoint: str, curve: tuple[bytes, bytes, bytes] | None, waited: float) -> str:
    """Why no WELCOME came: nothing listening, another user's socket, keys refused, or a hang.

    Each cause needs a different fix, so each gets its own message (a raw
    connect tells the first three apart; a ZeroMQ monitor sees the CurveZMQ
    handshake fail).
    """
    hung = (f"the daemon at {endpoint} accepted the connection but did not answer within "
            f"{waited:g} s: it is hung or overloaded. See `durable status` (the supervisor "
            "replaces a hung broker after hang_timeout)")
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        try:
            os.stat(path)
        except FileNotFoundError:
            return (f"nothing is listening at {endpoint}: there is no socket file. Start the "
                    "daemon (`durable serve`), or check the endpoint (and the data dir)")
        except PermissionError:
            pass  # the connect below says so
        family, address = socket.AF_UNIX, path
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        family, address = socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"),
                                                                               int(port))
    else:
        return f"no durable daemon answered at {endpoint} within {waited:g} s"
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(address)
    except PermissionError:
        return (f"{endpoint} belongs to another user: only the user the daemon runs as may "
                "connect (its run directory is 0700). Run as that user, or connect over the "
                "daemon's CurveZMQ endpoint")
    except ConnectionRefusedError:
        return (f"nothing is listening at {endpoint}" + (
            ": the socket file is left from a daemon that is gone" if family == socket.AF_UNIX
            else "") + ". Start the daemon (`durable serve`), or check the endpoint")
    except OSError as e:
        return f"cannot reach {endpoint}: {e}"
    finally:
        probe.close()
    if family == socket.AF_UNIX:
        return hung
    return _handshake(endpoint, curve) or hung


def _handshake(endpoint: str, curve: tuple[bytes, bytes, bytes] | None) -> str | None:
    """Watch a ZeroMQ handshake with the broker; a message if it failed, else None."""
    import zmq.utils.monitor

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                  | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        if not mon.poll(2000):
            return None
        event = zmq.utils.monitor.recv_monitor_message(mon)["event"]
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return None
    if curve is None:
        return (f"{endpoint} requires CurveZMQ: connect with server_key (the broker's .key) and "
                "client_key (this client's .key_secret)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"CurveZMQ authentication failed at {endpoint}: the broker does not accept this "
                "client's key. Copy its .key into the broker's authorized-keys dir")
    return (f"the CurveZMQ handshake with {endpoint} failed: server_key is not this broker's "
            "public key, or the endpoint is not a CurveZMQ endpoint")


def _curve_keys(server_key: str | None, client_key: str | None) -> tuple[bytes, bytes, bytes] | None:
    """CurveZMQ keys from `durable keygen` files: the broker's .key and our .key_secret."""
    if server_key is None and client_key is None:
        return None
    if not (server_key and client_key):
        raise ValueError("CurveZMQ needs both server_key (the broker's .key file) and "
                         "client_key (this client's .key_secret file)")
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_key)
    public, secret = zmq.auth.load_certificate(client_key)
    if secret is None:
        raise ValueError(f"{client_key} holds no secret key; pass the .key_secret file")
    return server_public, public, secret


class Stub:
    """A handle on one object. Calls are delivered in the order made; see ``StubBrokenError``.

    ``await stub.fetch(...)`` sends a request; ``await stub.name(*args, **kwargs)`` calls
    the object's method ``name`` (any name not starting with ``_``; getting it does no I/O,
    and a method the object does not have fails at call time). Both kinds share one order.
    """

    __slots__ = ("_client", "namespace", "id", "_stub_id", "_generation", "_broken", "_local",
                 "_peer", "_peer_inc", "__weakref__")

    def __init__(self, client: Client, namespace: str, oid: ObjectId) -> None:
        self._client = client
        self.namespace = namespace
        self.id = oid
        self._stub_id = next(client._stub_ids)
        self._generation = client._generation
        self._broken: StubBrokenError | None = None
        local, peers = client.local, client.peers
        #: else the link to another slot's process of this host and the incarnation it
        #: served when the stub was made (the peer path, ``durable.peers``), or None
        self._peer: PeerLink | None = None
        self._peer_inc = 0
        link = None
        if local is not None and local.incarnation and peers is not None and peers.own_slot >= 0:
            # an object process's own client: one placement on the ring decides both paths
            slot = peers.slot_for(str(oid))
            self._local = local.incarnation if slot == peers.own_slot else 0
            link = None if self._local else peers.link_at(slot)
        else:
            #: the incarnation of this process's own slot that serves the object in-process,
            #: or 0. Fixed for the stub's life, so its calls keep one path (E-order).
            self._local = (local.incarnation if local is not None and local.incarnation
                           and local.owns(oid) else 0)
            if not self._local and peers is not None:
                link = peers.link_for(str(oid))
        if not self._local:
            if link is not None:
                self._peer, self._peer_inc = link, link.incarnation
            else:  # (the broker binds only the stubs it carries)
                weakref.finalize(self, client._dropped.append, self._stub_id)

    async def fetch(self, url_or_request: str | Request, *, method: str = "GET",
                    headers: Any = None, body: bytes | str | None = None,
                    timeout: float | None = None) -> Response:
        """Send a request to the object and return its response."""
        if isinstance(url_or_request, Request):
            req = url_or_request
        else:
            req = Request(url_or_request, method=method, headers=headers, body=body)
        channel = req._upgrade
        if channel is not None and (type(channel) is not Channel or channel.client is not
                                    self._client or channel.stub is not None):
            channel = None  # another client's socket: this callee sees a plain request
        head, data = encode_request(req, None if channel is None else channel.id)
        resp = await self._client._call(self, head, data, timeout)
        if resp.websocket is UPGRADED:
            if channel is None:
                raise ProtocolError(f"{self.namespace} {self.id} answered 101 to a request that "
                                    "was not a WebSocket upgrade")
            channel.bind(self)
            resp.websocket = channel
        return resp

    def websocket(self, url: str, *, headers: Any = None,
                  max_buffered: int = 16 << 20) -> WebSocketConnect:
        """Open a WebSocket to the object: ``async with stub.websocket("/room") as ws``.

        Its fetch sees a GET with ``Upgrade: websocket`` (relative URLs get the
        ``http://durable`` origin); messages go over this client's own connection.
        """
        if url.startswith("/"):
            url = "http://durable" + url
        req = Request(url, headers=headers)
        for name, value in (("Upgrade", "websocket"), ("Connection", "Upgrade")):
            if not req.headers.has(name):
                req.headers.set(name, value)
        return WebSocketConnect(self, req, max_buffered)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):  # (copy, pickle and friends probe for dunders)
            raise AttributeError(name)
        return _Method(self, name)

    def __repr__(self) -> str:
        return f"<Stub {self.namespace} {self.id}{' broken' if self._broken else ''}>"


class _Method:
    """``stub.name``: calling it sends the call (the arguments are encoded first, so one
    that cannot be sent raises ``TypeError`` here and nothing leaves)."""

    __slots__ = ("_stub", "_name")

    def __init__(self, stub: Stub, name: str) -> None:
        self._stub = stub
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        head, body = encode_method_call(self._name, args, kwargs)
        return self._stub._client._call(self._stub, head, body, None)

    def __repr__(self) -> str:
        return f"<method {self._name} of {self._stub!r}>"


T = TypeVar("T")


class Namespace:
    """A namespace binding: makes ids and stubs (``get`` does no I/O)."""

    __slots__ = ("name", "_ids", "_client")

    def __init__(self, client: Client, name: str, ids: IdFactory) -> None:
        self._client = client
        self.name = name
        self._ids = ids

    def id_from_name(self, name: str) -> ObjectId:
        return self._ids.from_name(name)

    def new_unique_id(self) -> ObjectId:
        return self._ids.new_unique()

    def id_from_string(self, hex_id: str) -> ObjectId:
        return self._ids.from_string(hex_id)

    def get(self, oid: ObjectId) -> Stub:
        if not isinstance(oid, ObjectId):
            raise TypeError(f"get() takes an ObjectId (from id_from_name, new_unique_id or "
                            f"id_from_string), not {type(oid).__name__}")
        return Stub(self._client, self.name, oid)

    def get_by_name(self, name: str) -> Stub:
        """``get(id_from_name(name))``, as Cloudflare's ``getByName``."""
        return self.get(self._ids.from_name(name))


    def list_objects(self, *, prefix: str | None = None, limit: int | None = None,
                     start_after: str | None = None, page: int = 1000,
                     timeout: float = 60.0) -> AsyncIterator[ObjectInfo]:
        """This namespace's objects that hold a key or an alarm, by id (``async for``).

        ``prefix`` filters by name; ``start_after`` resumes after an id. Needs a
        client of the operator endpoint (docs/query.md).
        """
        from .query import list_objects
        return list_objects(self._client, self.name, prefix=prefix, limit=limit,
                            start_after=start_after, page=page, timeout=timeout)


class TypedNamespace(Namespace, Generic[T]):
    """``client.namespace(name, Counter)``: the same namespace, whose stubs a type checker
    sees as ``Counter`` (so ``await stub.increment(5)`` is checked against
    ``Counter.increment``; write methods as ``async def`` for exact types)."""

    __slots__ = ()

    if TYPE_CHECKING:
        def get(self, oid: ObjectId) -> T: ...

        def get_by_name(self, name: str) -> T: ...


class Client:
    """A connection to the broker. Use ``async with durable.connect(...) as client``."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 heartbeat: float = HEARTBEAT, misses: int = MISSES, name: str = "client",
                 namespaces: dict[str, bytes] | None = None,
                 connect_timeout: float = 5.0, server_key: str | None = None,
                 client_key: str | None = None, direct: bool = True) -> None:
        if type(name) is not str or not name or len(name) > MAX_NAME:
            # (the broker drops a HELLO whose name breaks this, and the connection spun in
            # resets until connect_timeout)
            raise ValueError(f"name= must be a non-empty str of at most {MAX_NAME} characters, "
                             f"got {name!r:.60}")
        call_timeout(timeout)
        self.endpoint = endpoint or default_endpoint()
        #: on the daemon's machine, call the object processes straight (the peer path, as
        #: the broker's WELCOME offers it) rather than through the broker
        self._direct = direct
        self.timeout = timeout
        self._heartbeat = heartbeat
        self._misses = misses
        self._name = name
        self._connect_timeout = connect_timeout
        self._curve = _curve_keys(server_key, client_key)
        self._ctx = zmq.Context.instance()
        self._sock: LoopSocket | None = None
        self._pending: dict[int, tuple[asyncio.Future[Any], Stub | None]] = {}
        #: call id -> (when it times out, its timeout), for calls whose deadline is no earlier
        #: than any sent before it (the client's own timeout): in deadline order as sent, so
        #: one timer serves them all (see :meth:`_time_call`)
        self._deadlines: dict[int, tuple[float, float]] = {}
        self._last_deadline = 0.0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0  # (when that timer fires)
        self._call_ids = itertools.count(1)
        self._stub_ids = itertools.count(1)
        self._generation = 0
        self._broker: int | None = None
        self._welcomed = asyncio.Event()
        self._keys: dict[str, bytes] = dict(namespaces or {})
        self._namespaces: dict[str, Namespace] = {}
        self._dropped: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._liveness: Liveness | None = None
        self._closed = False
        #: the event loop the client was started on: its socket and futures live there
        self._loop: asyncio.AbstractEventLoop | None = None
        #: WebSockets and streamed bodies this client reads, by channel id
        self._channels: dict[int, Any] = {}
        #: set by an object process for its own client: calls to objects of its own slot
        #: are served in-process (``LocalRoute``), not through the broker, and calls to
        #: the other slots of its host go straight to their processes (``PeerRoutes``)
        self.local: LocalRoute | None = None
        self.peers: PeerRoutes | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait: bool = True) -> None:
        """Connect and say HELLO; with ``wait``, until the broker answers (else ConnectionError)."""
        self._loop = asyncio.get_running_loop()
        self._open_socket()
        task = asyncio.create_task(self._heartbeat_loop())
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)
        if wait:
            try:
                await asyncio.wait_for(self._welcomed.wait(), self._connect_timeout)
            except TimeoutError:
                await self.close()
                why = await asyncio.to_thread(diagnose, self.endpoint, self._curve,
                                              self._connect_timeout)
                raise ConnectionError(why) from None

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            log.error("client task %s failed: %r", task.get_coro().__name__, task.exception(),
                      exc_info=task.exception())

    def _open_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = LoopSocket.dealer(self.endpoint, self._handle, self._ctx, self._curve)
        self._liveness = Liveness(self._heartbeat, self._misses)
        self._welcomed.clear()
        self._send(Hello(os.getpid(), self._name).encode())
        # (it reads batches; once the broker says it does too, so does this socket)
        self._send(PeerBatches().encode())

    async def close(self) -> None:
        if self._closed:
            return
        told = False
        heard: list[asyncio.Future[Any]] = []
        for ch in list(self._channels.values()):  # the objects hear that we left
            if type(ch) is Channel and ch.stub is not None and ch.state == OPEN:
                fut = ch.close_from_here(1001, "the client closed", clean=False)
                if fut is not None:
                    heard.append(fut)
                told = True
            ch.lost(1001, "the client closed")
        if heard:
            # (until they have heard it, a second at most: an object process drops what a
            # connection sent once it knows the connection closed, so a close it reads after
            # that is lost and the object hears 1006 instead; seen in a loaded test run)
            await asyncio.wait(heard, timeout=1.0)
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(StubBrokenError("the client was closed"))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._sock is not None:
            self._sock.close(linger=500 if told else 0)  # (the closes leave first)
            self._sock = None
        if self.peers is not None:
            self.peers.close(linger=500 if told else 0)

    # -- namespaces ---------------------------------------------------------------------
    @overload
    def namespace(self, name: str) -> Namespace: ...

    @overload
    def namespace(self, name: str, cls: type[T]) -> TypedNamespace[T]: ...

    def namespace(self, name: str, cls: type[Any] | None = None) -> Namespace:
        """The namespace ``name``; with ``cls`` (the object's class), typed stubs."""
        ns = self._namespaces.get(name)
        if ns is None:
            key = self._keys.get(name)
            if key is None:
                known = ", ".join(sorted(self._keys)) or "none (not connected yet?)"
                raise UnknownNamespaceError(f"namespace {name!r} is not configured; known: {known}")
            ns = self._namespaces[name] = TypedNamespace(self, name, IdFactory(name, key))
        return ns

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._keys)

    async def sql(self, query: str, *, namespace: str | None = None, timeout: float = 60.0,
                  memory_limit: str = "2GB", threads: int = 2,
                  max_bytes: int = 4 << 30) -> QueryResult:
        """Run one read-only SQL statement over every object's storage (views ``kv``,
        ``objects``, ``alarms``; docs/query.md). Needs a client of the operator endpoint.
        The query runs in this process, bounded by ``timeout``, ``memory_limit`` and
        ``threads``; ``namespace`` narrows the rows fetched to one namespace."""
        from .query import sql
        return await sql(self, query, namespace=namespace, timeout=timeout,
                         memory_limit=memory_limit, threads=threads, max_bytes=max_bytes)

    async def statistics(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's counters and per-slot state."""
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (fut, None)
        self._send(Stats(call_id).encode())
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(call_id, None)

    # -- calls ----------------------------------------------------------------------------
    def _send(self, frames: list[bytes]) -> None:
        self._sock.send(frames)
        self._liveness.sent()

    async def _call(self, stub: Stub, head: bytes, body: bytes, timeout: float | None) -> Any:
        if self._closed:
            raise StubBrokenError("the client is closed")
        if stub._generation != self._generation and stub._broken is None:
            stub._broken = StubBrokenError(
                "the connection to the broker was lost after this stub was made; get a new "
                "stub with namespace.get(id)")
        if stub._broken is not None:
            raise StubBrokenError(str(stub._broken))
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # (its answer would be read on the other loop: it hung)
            raise RuntimeError(
                "this durable client was started on another event loop (or not started); "
                "connect a client in the loop that uses it: `async with durable.connect(...)` "
                "inside the coroutine that asyncio.run() runs, or one per test")
        if len(body) > MAX_FRAME_BYTES or len(head) > MAX_FRAME_BYTES:  # (else the socket
            # it crossed would be cut, with every other call on it)
            raise ValueError(frame_too_big("this call (a fetch's body or head, or a method's "
                                           "arguments)", head, body))
        timeout = self.timeout if timeout is None else call_timeout(timeout)
        gate = OUTPUT_GATE.get()
        if gate is not None:  # inside an object: its earlier writes become durable first
            await gate()
        call_id = next(self._call_ids)
        fut = loop.create_future()
        self._pending[call_id] = (fut, stub)
        peer = stub._peer
        try:
            if stub._local:
                self._local_call(stub, call_id, head, body)
            elif peer is not None:
                self._peer_call(stub, peer, call_id, head, body)
            else:
                self._send(Call(call_id, stub._stub_id, stub.namespace, str(stub.id),
                                int(timeout * 1000), head, body, stub.id.name).encode())
        except zmq.ZMQError as e:
            self._pending.pop(call_id, None)
            raise StubBrokenError(f"could not send to the broker: {e}") from None
        except BaseException:  # (nothing was sent: nothing is left waiting for an answer)
            self._pending.pop(call_id, None)
            raise
        timer = self._time_call(loop, call_id, fut, stub, timeout)
        try:
            return await fut
        finally:
            if timer is None:
                self._untime_call(call_id)
            else:
                timer.cancel()
            self._pending.pop(call_id, None)
            if peer is not None:
                peer.inflight -= 1

    def _time_call(self, loop: asyncio.AbstractEventLoop, call_id: int,
                   fut: asyncio.Future[Any], stub: Stub, timeout: float
                   ) -> asyncio.TimerHandle | None:
        """Have the call time out after ``timeout``: by the one timer of the calls whose
        deadlines come in the order they were sent (None is returned), else by a timer of
        its own.

        Why: a timer per call (``call_later``, then its cancel and the heap's cleanup) cost
        ~2.4 µs of CPU, and every call pays it, an HTTP front's for each request; a deadline
        kept in order costs a dict insert and delete. Calls with the client's timeout are
        always in order; one with a shorter timeout than a call before it gets its own.
        """
        due = loop.time() + timeout
        if due < self._last_deadline:
            return loop.call_later(timeout, self._expire, fut, stub, timeout)
        self._last_deadline = due
        self._deadlines[call_id] = (due, timeout)
        timer = self._deadline_timer
        if timer is None or due < self._deadline_at:  # (the timer of a call that ended, later)
            if timer is not None:
                timer.cancel()
            self._deadline_timer = loop.call_at(due, self._expire_due)
            self._deadline_at = due
        return None

    def _untime_call(self, call_id: int) -> None:
        deadlines = self._deadlines
        deadlines.pop(call_id, None)
        if not deadlines:  # (a long timeout once must not send later calls the slow way)
            self._last_deadline = 0.0

    def _expire_due(self) -> None:
        """The timer of the ordered deadlines: expire the calls that are due, then wait for
        the first that is not (a call that ended meanwhile was taken out of the order)."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines, pending = self._deadlines, self._pending
        while deadlines:
            call_id = next(iter(deadlines))
            due, timeout = deadlines[call_id]
            if due > now:
                self._deadline_timer = loop.call_at(due, self._expire_due)
                self._deadline_at = due
                return
            del deadlines[call_id]
            entry = pending.get(call_id)
            if entry is not None:
                self._expire(entry[0], entry[1], timeout)
        self._last_deadline = 0.0

    def open_channel(self, max_message: int = MAX_MESSAGE) -> Channel:
        """A channel for a WebSocket upgrade (set as ``request._upgrade`` before the fetch)."""
        ch = Channel(self, next(self._call_ids), max_message)
        self._channels[ch.id] = ch
        return ch

    def _event(self, channel: Any, kind: bytes, data: bytes = b"", **kw: Any) -> asyncio.Future[Any] | None:
        """Tell the object of an event on one of its channels (a call, answered empty)."""
        stub = channel.stub
        if self._closed or stub is None or stub._broken is not None or self._sock is None:
            return None
        head, body = encode_event(kind, channel.id, data, **kw)
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[call_id] = (fut, stub)
        peer, sent = stub._peer, False
        try:
            if stub._local:
                self._local_call(stub, call_id, head, body)
            elif peer is not None:
                self._peer_call(stub, peer, call_id, head, body)
                sent = True
            else:
                self._send(Call(call_id, stub._stub_id, stub.namespace, str(stub.id),
                                int(self.timeout * 1000), head, body, stub.id.name).encode())
        except (StubBrokenError, OverloadedError) as e:
            self._pending.pop(call_id, None)
            fut.set_exception(e)
        except zmq.ZMQError as e:
            self._pending.pop(call_id, None)
            fut.set_exception(StubBrokenError(f"could not send to the broker: {e}"))
        timer = self._time_call(loop, call_id, fut, stub, self.timeout)

        def done(f: asyncio.Future[Any]) -> None:
            if timer is None:
                self._untime_call(call_id)
            else:
                timer.cancel()
            self._pending.pop(call_id, None)
            if sent:
                peer.inflight -= 1
            if not f.cancelled():
                f.exception()  # (its outcome is the channel's business)

        fut.add_done_callback(done)
        return fut

    def _local_call(self, stub: Stub, call_id: int, head: bytes, body: bytes) -> None:
        local = self.local
        if local is None or stub._local != local.incarnation:
            stub._broken = StubBrokenError(
                "stub lost its object: this process registered again with the broker after "
                "this stub was made; get a new stub with namespace.get(id)")
            raise stub._broken
        local.call(call_id, stub.namespace, str(stub.id), head, body, stub.id.name)

    def _peer_call(self, stub: Stub, link: PeerLink, call_id: int, head: bytes,
                   body: bytes) -> None:
        """Send on the stub's link (counted in ``link.inflight`` once sent)."""
        if link.incarnation != stub._peer_inc or link.sock is None:
            if stub._broken is None:
                stub._broken = StubBrokenError(
                    f"stub lost its object: the process of slot {link.slot} stopped, went away "
                    "or registered again after this stub was made; get a new stub with "
                    "namespace.get(id)")
            raise stub._broken
        if link.inflight >= PEER_INFLIGHT:
            raise OverloadedError(f"{link.inflight} calls wait on slot {link.slot}'s process "
                                  f"(the limit is {PEER_INFLIGHT}); wait for some to finish")
        link.sock.send(PeerCall(stub._peer_inc, call_id, stub.namespace, str(stub.id), head,
                                body, stub.id.name).encode())
        link.inflight += 1
        self.peers.counters["peer_calls"] += 1

    def _local_lost(self) -> None:
        """This process's slot has a new incarnation: its in-process stubs and their
        channels end as the broker's do for callers elsewhere (1012)."""
        err = StubBrokenError("stub lost its object: this process registered again with the "
                              "broker; get a new stub with namespace.get(id)")
        for ch in list(self._channels.values()):
            if ch.stub is not None and ch.stub._local:
                if ch.stub._broken is None:
                    ch.stub._broken = err
                ch.lost(1012, "the object's process registered again")

    @staticmethod
    def _expire(fut: asyncio.Future[Any], stub: Stub, timeout: float) -> None:
        if not fut.done():
            fut.set_exception(CallTimeoutError(
                f"{stub.namespace} {stub.id} did not answer within {timeout:g} s; the call may "
                "or may not have run"))

    # -- incoming (called by the LoopSocket for each message) --------------------------
    def _handle(self, frames: list[bytes]) -> None:
        self._liveness.heard()
        try:
            msg = parse_from_broker_to_client(frames)
        except ProtocolError as e:
            log.warning("dropped a malformed message from the broker: %s", e)
            return
        self._dispatch(msg)

    def _handle_answer(self, frames: list[bytes]) -> None:
        """A reply, error or channel message that came on a peer link (``durable.peers``)."""
        try:
            msg = parse_from_broker_to_client(frames)
        except ProtocolError as e:
            log.warning("dropped a malformed message from a peer object process: %s", e)
            return
        if type(msg) in (Reply, Error, ChannelSend):
            self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        t = type(msg)
        if t is ChannelSend:
            channels = self._channels
            for cid in msg.channels:
                ch = channels.get(cid)
                if ch is not None:
                    ch.deliver(msg.kind, msg.payload)
        elif t is Reply:
            entry = self._pending.get(msg.call_id)
            if entry is not None and not entry[0].done():
                try:
                    if msg.head == METHOD:
                        entry[0].set_result(decode_result(msg.body))
                    else:
                        resp = decode_response(msg.head, msg.body)
                        if resp._stream is STREAMED:  # its chunks may follow at once
                            resp._stream = self._channels[msg.call_id] = StreamBody(
                                self, msg.call_id, entry[1])
                        entry[0].set_result(resp)
                except ProtocolError as e:
                    entry[0].set_exception(e)
        elif t is Error:
            entry = self._pending.get(msg.call_id)
            if entry is not None and not entry[0].done():
                err = error_from_wire(msg.code, msg.message, msg.remote_type, msg.traceback,
                                      msg.builtin)
                if isinstance(err, StubBrokenError) and entry[1] is not None:
                    entry[1]._broken = err
                entry[0].set_exception(err)
        elif t is Pong:
            if self._broker is not None and msg.broker != self._broker:
                self._reset("the broker restarted")
        elif t is Welcome:
            if self._broker is not None and msg.broker != self._broker:
                self._broken_generation("the broker restarted")
            self._broker = msg.broker
            self._keys.update({n: bytes.fromhex(k) for n, k in msg.namespaces.items()})
            if msg.peers is not None and self.peers is None and self._direct:
                self._start_peers(*msg.peers)
            self._welcomed.set()
        elif t is Disconnect:
            self._reset(f"the broker did not know this client ({msg.reason})")
        elif t is StatsReply:
            entry = self._pending.get(msg.call_id)
            if entry is not None and not entry[0].done():
                entry[0].set_result(msg.stats)
        elif t is Broken:
            self._stubs_broken(set(msg.stub_ids))
        elif t is PeerBatches:  # the broker reads batches: a turn's calls to it go as one
            self._sock.batches = True

    def _start_peers(self, slots: int, endpoint: str) -> None:
        """Links to every slot's process, if this process may reach their sockets (another
        user's may not: its calls keep going through the broker)."""
        run_dir = os.path.dirname(endpoint[len("ipc://"):])
        if not os.access(run_dir, os.X_OK):
            return
        from .ring import Ring
        self.peers = PeerRoutes(self, Ring(slots).slot_for, -1, {
            s: endpoint.replace("{slot}", str(s)) for s in range(slots)}, self._ctx)
        self.peers.start()

    def _stubs_broken(self, ids: set[int]) -> None:
        """The broker says these stubs' process is gone: their channels end now (1012)."""
        err = StubBrokenError("stub lost its object: its process restarted; get a new stub "
                              "with namespace.get(id)")
        for ch in list(self._channels.values()):
            if ch.stub is not None and ch.stub._stub_id in ids:
                if ch.stub._broken is None:
                    ch.stub._broken = err
                ch.lost(1012, "the object's process restarted")

    def _broken_generation(self, why: str) -> None:
        self._generation += 1
        for ch in list(self._channels.values()):
            ch.lost(1012, f"the connection to the daemon was lost ({why})")
        self._fail_all(StubBrokenError(f"stub lost its object: {why}; get a new stub with "
                                       "namespace.get(id)"), keep_linked=True)

    def _reset(self, why: str) -> None:
        """Break every stub and start over on a fresh socket (the broker lost our state)."""
        log.warning("reconnecting to %s: %s", self.endpoint, why)
        self._broken_generation(why)
        self._broker = None
        self._open_socket()

    def _fail_all(self, err: DurableError, keep_linked: bool = False) -> None:
        """``keep_linked``: calls sent on a peer link that is still up stay pending. The broker
        went away, not their process: it answers them (or refuses them, if it registered anew
        meanwhile), and failing them here would let a retry by another path overtake a call
        that still runs (the chaos soak saw exactly that)."""
        for fut, stub in list(self._pending.values()):
            if stub is not None and stub._broken is None and isinstance(err, StubBrokenError):
                stub._broken = err
            if keep_linked and stub is not None and stub._peer is not None \
                    and (stub._peer.incarnation or stub._peer.stopping):  # (still connected)
                continue
            if not fut.done():
                fut.set_exception(err)

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self._heartbeat / 2
        woke = loop.time()
        grace_until = 0.0
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if now - woke > period + self._heartbeat:
                # Our own loop did not run for a while (a flood of connections in a gateway,
                # a long callback): the silence is ours, not the broker's. Ask it, and give
                # it time to answer before judging (measured: a gateway under 10,500
                # long-polls stalled 2.5 s and broke every stub it held).
                self._sock.drain()
                self._send(Ping().encode())
                grace_until = now + 2 * self._heartbeat
            woke = now
            if not self._liveness.alive():
                self._sock.drain()  # our own loop may have stalled with the answers waiting
            if not self._liveness.alive() and now >= grace_until:
                self._reset(f"no answer from the broker for {self._heartbeat * self._misses:g} s")
                continue
            if self._dropped:
                ids, self._dropped[:] = list(self._dropped), []
                for frames in Drop.messages(ids):
                    self._send(frames)
            if self._liveness.send_due():
                self._send(Ping().encode())


class LocalRoute:
    """How an object process serves its own client's calls to its own slot in-process.

    The object process sets ``client.local``. ``owns(oid)`` places the id on the ring;
    ``call(...)`` hands the call to the process as if the broker had delivered it, and the
    process answers through ``client._handle`` with the frames the broker would have sent.
    ``incarnation`` is the slot incarnation the process registered (0: not yet).
    """

    def __init__(self, owns: Callable[[ObjectId], bool],
                 call: Callable[[int, str, str, bytes, bytes, str | None], None]) -> None:
        self.owns = owns
        self.call = call
        self.incarnation = 0


def connect(endpoint: str | None = None, **kwargs: Any) -> Client:
    """``async with durable.connect(endpoint) as client``: a connected client."""
    return Client(endpoint, **kwargs)
