"""durable.testing: run object classes in-process, with the daemon's semantics.

    async with durable.testing.Runtime({"COUNTER": Counter}) as rt:
        stub = rt.namespace("COUNTER").get_by_name("a")
        assert await stub.increment() == 1

The runtime is the object process's own code without its sockets: the same
catalog, activations, gates, E-order, storage (``ObjectStorage`` over an
in-memory slot, or the real engine with ``storage="disk"``), limits, alarms
and WebSocket records. Calls cross the same wire encoding as in the daemon
(``durable.protocol``): every argument, result, request and stored value goes
through the codec, so what cannot be sent or stored fails here as it would
there. What the harness adds is control: a fake clock for alarms
(``advance``), ``run_alarm``, ``evict``, ``crash``, ``run_in_object``,
``list_objects`` and ``storage_of``.

No sockets, threads or processes (``storage="disk"`` runs the real engine's
writer threads, and joins them on exit): everything ends with the ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, TypeVar

from durable import codec
from durable.client import Client, Stub
from durable.errors import (
    InvalidIdError,
    ObjectEvictedError,
    UnknownNamespaceError,
)
from durable.http import Request, Response
from durable.ids import IdFactory, ObjectId, namespace_key
from durable.objectproc.activation import Activation, InObject, Phase
from durable.objectproc.loop import ObjectProcess, ObjectProcessConfig, _task_factory
from durable.objectproc.storage import SlotStore, StorageLimits
from durable.objectproc.storage.limits import DEFAULT_LIMITS
from durable.objectproc.storage.memory import MemorySlot
from durable.objectproc.storage.slot import object_key
from durable.objectproc.websockets import Outbox, Sockets
from durable.objects import Env, load_class, load_function
from durable.protocol.heartbeat import Liveness
from durable.protocol.messages import (
    Call,
    ChannelSend,
    Error,
    Reply,
    WorkerCall,
    WorkerError,
    WorkerReply,
    WorkerSend,
    parse_from_client,
    parse_from_worker,
)

__all__ = ["Runtime", "FakeClock"]

T = TypeVar("T")
_CLIENT = b"Ttesting"  # the runtime's one caller, as the object process sees it


class FakeClock:
    """The runtime's time for alarms (epoch ms); starts at the real time, moves only when
    told (``Runtime.advance``). Object code's own ``time.time()`` is not faked."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now_ms = int(time.time() * 1000) if start_ms is None else start_ms

    def __call__(self) -> int:
        return self.now_ms

    @property
    def now(self) -> float:
        """Seconds since the epoch."""
        return self.now_ms / 1000


class _Socket:
    """Where the client's frames go: straight to the runtime (no ZeroMQ)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def send(self, frames: list[bytes]) -> None:
        self._runtime._from_client(frames)

    def close(self, linger: int = 0) -> None:
        pass

    def drain(self) -> None:
        pass


class _LocalClient(Client):
    """The client API (namespaces, stubs, methods, WebSockets) wired to the runtime."""

    def __init__(self, runtime: Runtime, keys: dict[str, bytes], timeout: float) -> None:
        super().__init__("inproc://durable-testing", namespaces=keys, name="testing",
                         timeout=timeout)
        self._runtime = runtime

    async def start(self, *, wait: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = _Socket(self._runtime)  # type: ignore[assignment]
        self._liveness = Liveness(self._heartbeat, self._misses)
        self._broker = 1
        self._welcomed.set()

    def _send(self, frames: list[bytes]) -> None:
        self._runtime._from_client(frames)


class _Process(ObjectProcess):
    """The object process, without its sockets: what it sends goes back to the client as
    the broker would forward it."""

    runtime: Runtime

    def _send(self, frames: list[bytes]) -> None:
        self.runtime._from_process(frames)


class Runtime:
    """Object classes hosted in this process, as the daemon hosts them (see the module).

    ``classes``: namespace name -> class, or ``"module:Class"``. ``vars``: ``env.vars``;
    ``secrets``: ``env.secrets``.
    ``worker``: an ``async def fetch(request, env)`` (or ``"module:fetch"``) that
    ``rt.fetch`` goes through; without one, ``rt.fetch`` routes by path as the gateway
    does (``/<NAMESPACE>/<name>/...``). ``storage``: ``"memory"`` (default) or ``"disk"``
    (the real engine on a temporary data dir).
    """

    def __init__(self, classes: dict[str, type | str], *, vars: dict[str, Any] | None = None,
                 secrets: dict[str, str] | None = None,
                 worker: Callable[..., Any] | str | None = None, storage: str = "memory",
                 limits: StorageLimits = DEFAULT_LIMITS, timeout: float = 30.0,
                 debug: bool = True, alarm_retries: int = 6,
                 alarm_retry_base: float = 2.0) -> None:
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage is 'memory' or 'disk', not {storage!r}")
        if not classes:
            raise ValueError("a Runtime needs at least one namespace: {'COUNTER': Counter}")
        self.classes: dict[str, type] = {}
        for name, cls in classes.items():
            if not name.isidentifier() or name.startswith("_durable"):
                raise ValueError(f"namespace {name!r} must be an identifier not starting with "
                                 "_durable")
            self.classes[name] = load_class(cls) if isinstance(cls, str) else cls
            if not isinstance(self.classes[name], type):
                raise TypeError(f"namespace {name}: {cls!r} is not a class")
        self.worker = load_function(worker) if isinstance(worker, str) else worker
        self.vars = dict(vars or {})
        self.secrets = dict(secrets or {})
        self.storage_kind = storage
        self.limits = limits
        self.timeout = timeout
        self.debug = debug
        self.alarm_retries = alarm_retries
        self.alarm_retry_base = alarm_retry_base
        self.clock = FakeClock()
        self.client: _LocalClient | None = None
        self.env: Env | None = None
        self._proc: _Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ids: dict[str, IdFactory] = {}
        self._retry: dict[bytes, tuple[int, int, int]] = {}  # obj -> (at, due, retry count)
        self._old_factory: Any = None
        self._gateway: Any = None
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        secret = secrets.token_bytes(32)
        keys = {n: namespace_key(secret, n) for n in self.classes}
        self._ids = {n: IdFactory(n, k) for n, k in keys.items()}
        self.client = _LocalClient(self, keys, self.timeout)
        await self.client.start()
        self.env = Env({n: self.client.namespace(n) for n in self.classes}, self.vars,
                       self.secrets)
        cfg = ObjectProcessConfig(slot=0, backend="inproc://none", frontend="inproc://none",
                                  data_dir="", namespaces={}, vars=self.vars, debug=self.debug,
                                  limits=self.limits, alarm_retries=self.alarm_retries,
                                  alarm_retry_base=self.alarm_retry_base)
        proc = self._proc = _Process(cfg)
        proc.runtime = self
        proc.classes = dict(self.classes)
        proc.ids = dict(self._ids)
        proc.client = self.client
        proc.env = self.env
        if self.storage_kind == "memory":
            proc.store = MemorySlot(self.limits)  # type: ignore[assignment]
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="durable-testing-")
            proc.store = SlotStore(self._tmp.name, 0, limits=self.limits,
                                   memory_limit="64MB")
        proc.sockets = Sockets(Outbox(proc._send), cfg.websocket_max_message)
        self._old_factory = loop.get_task_factory()
        loop.set_task_factory(_task_factory)  # tasks objects start belong to them
        self._started = True

    async def close(self) -> None:
        """End every object's calls and tasks; nothing is left running."""
        if not self._started:
            return
        self._started = False
        proc = self._proc
        for act in list(proc.catalog.values()):
            for t in list(act.owned):
                t.cancel()
            await act.drain()
            await _settle(act.owned)
        await self.client.close()
        await proc.store.close()
        asyncio.get_running_loop().set_task_factory(self._old_factory)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- calling -------------------------------------------------------------------------
    def namespace(self, name: str, cls: type[T] | None = None) -> Any:
        """The namespace as a client sees it (``get``, ``get_by_name``, ids)."""
        self._check()
        return self.client.namespace(name, cls) if cls is not None else self.client.namespace(name)

    async def fetch(self, request: Request | str, **kwargs: Any) -> Response:
        """A request as the gateway makes it: through the Worker if one was given, else
        routed by path (``/<NAMESPACE>/<name>/...``)."""
        self._check()
        req = request if isinstance(request, Request) else Request(request, **kwargs)
        if self.worker is not None:
            resp = await self.worker(req, self.env)
            if not isinstance(resp, Response):
                raise TypeError(f"the worker returned {type(resp).__name__}, not a Response")
            return resp
        if self._gateway is None:
            from durable.broker.gateway import Gateway

            self._gateway = Gateway(self.client, self.env)
        return await self._gateway.route(req, req.path)

    # -- the broker's part, in-process -----------------------------------------------------
    def _from_client(self, frames: list[bytes]) -> None:
        msg = parse_from_client(frames)
        if type(msg) is not Call:
            return  # (pings, drops: nothing to do here)
        ids = self._ids.get(msg.namespace)
        try:
            if ids is None:
                raise UnknownNamespaceError(f"namespace {msg.namespace!r} is not configured "
                                            f"(known: {', '.join(sorted(self._ids))})")
            ids.from_string(msg.object_id)
        except (UnknownNamespaceError, InvalidIdError) as e:
            self._to_client(Error(msg.call_id, e.code, str(e)).encode())
            return
        self._proc._call(WorkerCall(_CLIENT, msg.call_id, msg.namespace, msg.object_id,
                                    msg.head, msg.body, msg.name))

    def _from_process(self, frames: list[bytes]) -> None:
        msg = parse_from_worker(frames)
        t = type(msg)
        if t is WorkerReply:
            self._to_client(Reply(msg.call_id, msg.head, msg.body).encode())
        elif t is WorkerError:
            self._to_client(msg.to_client().encode())
        elif t is WorkerSend:
            self._to_client(ChannelSend(msg.channels, msg.kind, msg.payload).encode())

    def _to_client(self, frames: list[bytes]) -> None:
        if self.client is not None and not self.client._closed:
            self.client._handle(frames)

    # -- time and alarms ------------------------------------------------------------------
    async def advance(self, seconds: float) -> int:
        """Move the clock ``seconds`` on, running every alarm that comes due on the way, in
        due order (each to its end, retries included). Returns how many handlers ran."""
        self._check()
        if seconds < 0:
            raise ValueError("time moves forward only")
        target = self.clock.now_ms + int(seconds * 1000)
        ran = 0
        while True:
            await _settle_turn()
            nxt = self._next_alarm(target)
            if nxt is None:
                break
            at, obj, due, retry = nxt
            self.clock.now_ms = max(self.clock.now_ms, at)
            await self._fire(obj, due, retry)
            ran += 1
        self.clock.now_ms = target
        return ran

    def _next_alarm(self, until: int) -> tuple[int, bytes, int, int] | None:
        best: tuple[int, bytes, int, int] | None = None
        for obj, due in self._alarms().items():
            at, retry = due, 0
            pending = self._retry.get(obj)
            if pending is not None and pending[1] == due:
                at, retry = pending[0], pending[2]
            if at <= until and (best is None or (at, obj) < (best[0], best[1])):
                best = (at, obj, due, retry)
        return best

    def _alarms(self) -> dict[bytes, int]:
        store = self._proc.store
        if isinstance(store, MemorySlot):
            store.commit()  # (what an answered call set is durable; this is the rest)
            return dict(store.alarms)
        return dict(store.duck.due_alarms(0, 2**62, 1_000_000)) | {
            o: d for o, d in store.pending_alarms().items() if d is not None}

    async def _fire(self, obj: bytes, due: int, retry: int) -> BaseException | None:
        fut = asyncio.get_running_loop().create_future()
        self._proc._fire_alarm(obj, due, retry, lambda e: fut.done() or fut.set_result(e))
        error = await fut
        if error is None:
            self._retry.pop(obj, None)
        elif retry < self.alarm_retries:
            at = self.clock.now_ms + int(self.alarm_retry_base * 2 ** retry * 1000)
            self._retry[obj] = (at, due, retry + 1)
        else:
            self._retry.pop(obj, None)
            self._proc._alarm_given_up(obj, due, error)
        await _settle_turn()
        return error

    async def run_alarm(self, stub: Stub) -> None:
        """Run the object's alarm now, whatever its due time; raise what the handler raised.
        ``LookupError`` if it has none."""
        self._check()
        obj = self._obj(stub)
        await _settle_turn()
        due = self._proc.store.read_alarm(obj)
        if due is None:
            raise LookupError(f"{stub.namespace} {stub.id} has no alarm set")
        error = await self._fire(obj, due, 0)
        if error is not None:
            raise error

    # -- eviction and failure -------------------------------------------------------------
    async def evict(self, stub: Stub) -> bool:
        """Evict the object as idleness would (its writes made durable first, its own tasks
        cancelled); False if it was not active. Its sockets stay open (hibernation)."""
        self._check()
        key = (stub.namespace, str(stub.id))
        act = self._proc.catalog.get(key)
        if act is None:
            return False
        await act.drain()  # (its calls in flight end first, as the daemon waits for them)
        if act.phase is Phase.ACTIVE:
            with contextlib.suppress(Exception):
                await act.storage.sync()
            for t in list(act.owned):
                t.cancel()
            await _settle(act.owned)
            if self._proc.catalog.get(key) is act:
                del self._proc.catalog[key]
                act.evict()
        else:
            self._proc.catalog.pop(key, None)
        self._proc.counters["evicted"] += 1
        return True

    async def evict_all(self) -> int:
        n = 0
        for ns, oid in list(self._proc.catalog):
            n += await self.evict(self.namespace(ns).get(self._ids[ns].from_string(oid)))
        return n

    async def crash(self) -> int:
        """As if every process were SIGKILLed and restarted: writes not yet durable are
        lost (returned: how many write sets), every activation and its tasks are gone, every
        stub made before breaks (``StubBrokenError``), every WebSocket closes with 1012.
        What answered calls wrote is kept. Memory storage only."""
        self._check()
        proc = self._proc
        if not isinstance(proc.store, MemorySlot):
            raise NotImplementedError("crash() needs storage='memory'; disk crashes are the "
                                      "daemon's tests (SIGKILL real processes)")
        lost = proc.store.crash()
        acts = list(proc.catalog.values())
        proc.catalog.clear()
        for act in acts:
            act._fence(ObjectEvictedError(f"{act.namespace} {act.object_id}: the runtime "
                                          "crashed; this instance can no longer act"))
            for t in list(act._tasks):
                t.cancel()
        await _settle({t for a in acts for t in (*a._tasks, *a.owned)})
        proc.sockets = Sockets(Outbox(proc._send), proc.config.websocket_max_message)
        self._retry.clear()
        self.client._broken_generation("the runtime crashed")
        return lost

    # -- looking inside -------------------------------------------------------------------
    async def run_in_object(self, stub: Stub, fn: Callable[[Any, Any], Any]) -> Any:
        """``fn(instance, state)`` inside the object (activating it), as one of its calls
        (Cloudflare's ``runInDurableObject``); returns what ``fn`` returns (awaited)."""
        self._check()
        act = self._activation(stub)
        fut = asyncio.get_running_loop().create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        act.deliver(InObject(fn), done)
        return await fut

    def list_objects(self, namespace: str) -> list[ObjectId]:
        """Ids of the namespace's objects that have storage, an alarm, or are active."""
        self._check()
        ids = self._ids[namespace]
        prefix = f"{namespace}/".encode()
        found = {oid for ns, oid in self._proc.catalog if ns == namespace}
        store = self._proc.store
        objs = store.objects() if isinstance(store, MemorySlot) else store.duck.object_keys()
        found.update(o[len(prefix):].decode() for o in objs if o.startswith(prefix))
        out = []
        for oid in sorted(found):
            name = self._proc._known_name(namespace, oid, None)
            out.append(ObjectId(str(ids.from_string(oid)), name))
        return out

    async def storage_of(self, stub: Stub) -> MappingProxyType[str, Any]:
        """A read-only snapshot of the object's storage (decoded values; writes not yet
        durable included, as the object itself would read them)."""
        self._check()
        await _settle_turn()
        rows = self._proc.store.read_all(self._obj(stub))
        return MappingProxyType({k: codec.decode(v) for k, v in sorted(rows.items())})

    @property
    def active(self) -> list[tuple[str, str]]:
        """(namespace, id) of the objects active now."""
        return sorted(self._proc.catalog)

    # -- helpers --------------------------------------------------------------------------
    def _check(self) -> None:
        if not self._started:
            raise RuntimeError("the Runtime is not running: use `async with Runtime(...) as rt`")

    def _obj(self, stub: Stub) -> bytes:
        if not isinstance(stub, Stub):
            raise TypeError(f"expected a stub (rt.namespace(NS).get(...)), got {type(stub).__name__}")
        return object_key(stub.namespace, str(stub.id))

    def _activation(self, stub: Stub) -> Activation:
        self._obj(stub)
        return self._proc._activation(stub.namespace, str(stub.id), stub.id.name)


async def _settle_turn() -> None:
    """Let scheduled callbacks run (turn flushes, commits) before looking at storage."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _settle(tasks: Any) -> None:
    tasks = [t for t in tasks if not t.done()]
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)

