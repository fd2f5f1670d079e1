"""One object loaded in an object process: its instance, storage and delivery order.

Lifecycle (a table, so that every step is deliberate)::

    ACTIVE --deliver--> ACTIVE          calls start in arrival order (E-order)
    ACTIVE --block_concurrency_while--> BLOCKED    new calls wait in order
    BLOCKED --set-up done--> ACTIVE     waiting calls start, in order
    ACTIVE --idle, writes durable--> EVICTED       the catalog forgets it
    ACTIVE/BLOCKED --storage failed--> BROKEN      every call gets an error; never reused
    ACTIVE/BLOCKED --reset--> RESET     set-up failed or the CPU limit hit: the catalog
                                        constructs the object anew on its next call

**One instance.** Every task started in the object's context (its calls,
``asyncio.create_task`` in its code, ``state.wait_until``) is known to its
activation (``CURRENT``, a context variable read by the object process's task
factory). Eviction waits for those tasks up to ``wait_until_limit``, then
cancels them; from then on the old ``state.storage`` raises
``ObjectEvictedError`` and writes nothing, and so does an outgoing call from
that instance: the next activation is the only one that can act.

**Output gate, for calls too.** In the object's context ``OUTPUT_GATE`` is
the storage's ``sync``: a call through ``env.NS`` leaves once every write made
before it is durable (it joins the group commit already under way).

Each call runs as its own task, started in arrival order, so a call that
awaits (another object, a sleep) lets the next one start, as in workerd. A
response leaves only after every write made before it is durable (output
gate: ``storage.sync()``); the input gate holds because storage reads never
suspend (see ``storage/object.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from durable.client import OUTPUT_GATE
from durable.errors import (
    CpuLimitError,
    ObjectError,
    ObjectEvictedError,
    OverloadedError,
    StorageCommitError,
    StorageCorruptError,
)
from durable.fsm import Transitions
from durable.http import Request, Response
from durable.ids import ObjectId
from durable.objects import DurableObject
from durable.protocol.messages import (
    EV_BINARY,
    EV_CLOSE,
    EV_ERROR,
    EV_TEXT,
    MethodCall,
    builtin_ancestor,
)

from .alarms import AlarmCall, AlarmInfo
from .context import CURRENT
from .storage import ObjectStorage, SlotStore
from .websockets import UPGRADE, ObjectSockets, SocketEvent, Sockets

__all__ = ["Activation", "State", "Phase", "CURRENT", "CpuLimitExceeded", "InObject"]



class CpuLimitExceeded(BaseException):
    """Raised into object code that ran past its CPU limit without yielding.

    A BaseException, so that an object's ``except Exception`` does not swallow it.
    """

log = logging.getLogger("durable.objectproc")


class Phase(enum.Enum):
    ACTIVE = "active"
    BLOCKED = "blocked"
    EVICTED = "evicted"
    BROKEN = "broken"
    RESET = "reset"


#: Shared empty stand-ins for an activation's rarely used containers, made on first use: a new
#: object is ~10 tracked containers, each traversed by the young collections it survives
#: (~1 µs of CPU each, docs/messaging.md), and most objects never queue a call, start a task
#: of their own or log an error.
_NO_WAITING: tuple[()] = ()
_NO_TASKS: frozenset[Any] = frozenset()

_TRANSITIONS = Transitions({
    (Phase.ACTIVE, "block"): Phase.BLOCKED,
    (Phase.BLOCKED, "unblock"): Phase.ACTIVE,
    (Phase.ACTIVE, "evict"): Phase.EVICTED,
    (Phase.ACTIVE, "fail"): Phase.BROKEN,
    (Phase.BLOCKED, "fail"): Phase.BROKEN,
    (Phase.BROKEN, "fail"): Phase.BROKEN,
    (Phase.ACTIVE, "reset"): Phase.RESET,
    (Phase.BLOCKED, "reset"): Phase.RESET,
})


class State:
    """``state`` as the object sees it: ``id``, ``storage``, ``block_concurrency_while``,
    ``wait_until``, and the WebSocket calls (``accept_websocket``, ``get_websockets``...)."""

    __slots__ = ("id", "storage", "_activation")

    def __init__(self, oid: ObjectId, storage: ObjectStorage, activation: Activation) -> None:
        self.id = oid
        self.storage = storage
        self._activation = activation

    def block_concurrency_while(self, fn: Callable[[], Awaitable[Any]] | Awaitable[Any]) -> asyncio.Task[Any]:
        """Run async set-up with no other call delivered to this object until it ends.

        If it raises, the call waiting for it fails with that error and the object is
        reset: its next call constructs it anew.
        """
        return self._live().block_while(fn)

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Work to finish before the object may be evicted (Cloudflare's ``ctx.waitUntil``).

        Eviction waits for it at most ``wait_until_limit`` seconds after the object went
        idle, then cancels it.
        """
        self._live().wait_until(awaitable)

    def accept_websocket(self, ws: Any, tags: list[str] | None = None) -> None:
        """Take the server end of a ``WebSocketPair`` for this object (hibernatable: it
        stays open while the object is evicted). Only while ``fetch`` handles an upgrade
        request; return ``Response(status=101, websocket=client)`` after it. ``tags``: at
        most 10 str, for ``get_websockets(tag)``."""
        self._live().sockets().accept(ws, tags)

    def get_websockets(self, tag: str | None = None) -> list[Any]:
        """The object's open WebSockets (those with ``tag``), also after an eviction."""
        return self._live().sockets().get(tag)

    def get_tags(self, ws: Any) -> list[str]:
        return list(ws.tags)

    def set_websocket_auto_response(self, request: str | None = None,
                                    response: str | None = None) -> None:
        """A text message equal to ``request`` is answered with ``response`` where the
        socket is (the gateway), without waking the object (heartbeats). No arguments:
        remove it."""
        self._live().sockets().set_auto(request, response)

    def get_websocket_auto_response(self) -> tuple[str, str] | None:
        return self._live().sockets().auto

    def _live(self) -> Activation:
        act = self._activation
        if act is None or act.phase in (Phase.EVICTED, Phase.RESET):
            raise ObjectEvictedError(f"{self.id}: this object was evicted or reset; its "
                                     "`state` can no longer be used")
        return act


class InObject:
    """``durable.testing``'s ``run_in_object``: ``fn(instance, state)`` as one call of the
    object (in order with its other calls, inside its gates)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any, State], Any]) -> None:
        self.fn = fn


Reply = Callable[[Any, BaseException | None], None]  # (a Response, a method's result, None)
Delivery = Request | MethodCall | AlarmCall | SocketEvent | InObject


#: calls an object may have waiting or running before more are refused (503)
MAX_PENDING = 1000


def refused(request: Delivery, reply: Reply, pending: int, limit: int, namespace: str,
            object_id: str) -> bool:
    """Refuse a call past an object's bound of calls in flight (OverloadedError); True if so.

    A socket's close or error always goes in: it is not a request that can be retried,
    sockets per object are bounded, and a thousand sockets may close at once."""
    if pending < limit or (type(request) is SocketEvent and request.event.kind != EV_TEXT
                           and request.event.kind != EV_BINARY):
        return False
    reply(None, OverloadedError(f"{namespace} {object_id} has {pending} calls waiting or "
                                f"running (the limit is {limit}); retry later"))
    return True


#: class -> (_class_facts): read once per class, not at each activation (~2 µs of a new
#: object's ~130 in its object process, measured with py-spy)
_FACTS: dict[type, tuple[bool, bool]] = {}


def _class_facts(cls: type) -> tuple[bool, bool]:
    """Whether ``cls`` has an ``alarm`` handler, and whether constructing it runs none of its
    own code (``DurableObject.__init__``, no ``__new__``, ``__setattr__``, metaclass or
    ``state``/``env`` descriptor of its own): then no task can start in the constructor, and it
    needs no activation context."""
    facts = _FACTS.get(cls)
    if facts is None:
        plain = (type(cls) is type and cls.__init__ is DurableObject.__init__
                 and cls.__new__ is object.__new__ and cls.__setattr__ is object.__setattr__
                 and not any(hasattr(type(getattr(cls, n, None)), "__set__")
                             for n in ("state", "env")))
        facts = (callable(getattr(cls, "alarm", None)), plain)
        if len(_FACTS) >= 256:  # (classes reloaded many times: bounded)
            _FACTS.clear()
        _FACTS[cls] = facts
    return facts


class Activation:
    def __init__(self, store: SlotStore, namespace: str, object_id: str, cls: type,
                 env: Any, clock: Callable[[], float] = time.monotonic,
                 max_pending: int = MAX_PENDING, name: str | None = None,
                 cpu_limit: float = 30.0, debug: bool = False,
                 sockets: Sockets | None = None,
                 warm: tuple[dict[str, bytes | None], bool] | None = None) -> None:
        self.namespace = namespace
        self.object_id = object_id
        self.phase = Phase.ACTIVE
        self.clock = clock
        self.cpu_limit = cpu_limit
        self.debug = debug
        self.storage = ObjectStorage(store, namespace, object_id)
        if warm is not None:  # (its rows, read off the loop before this first call)
            self.storage.warm(*warm)
        alarm_handler, plain = _class_facts(cls)
        self.storage.alarm_handler = alarm_handler
        self.state = State(ObjectId(object_id, name), self.storage, self)
        self._waiting: deque[tuple[Delivery, Reply]] | tuple[()] = _NO_WAITING
        self._tasks: set[asyncio.Task[None]] | frozenset[Any] = _NO_TASKS  # its calls running
        #: tasks the object's code started (create_task, wait_until): eviction waits for them
        self.owned: set[asyncio.Task[Any]] | frozenset[Any] = _NO_TASKS
        self.retiring_since: float | None = None  # idle, waiting for owned tasks to end
        self.cancelled_tasks = False  # retire() cancelled them: evict at the next check
        self.last_used = clock()
        #: when the object process last put it at its catalog's end (≤ ``last_used``)
        self.placed = self.last_used
        self.max_pending = max_pending
        #: when object errors were logged (rate)
        self.errors_logged: deque[float] | tuple[()] = _NO_WAITING
        self._registry = sockets
        self._sockets: ObjectSockets | None = None
        if sockets is not None:
            existing = sockets.objects.get((namespace, object_id))
            if existing is not None:  # woken from hibernation: the same sockets
                existing.owner = self
                self._sockets = existing
        self._out_gate: asyncio.Future[Any] | None = None
        self._out_gate_seq = 0
        if plain:  # (no code of the object's runs: no task or call can start here)
            self.instance = cls(self.state, env)
            return
        token, gate = CURRENT.set(self), OUTPUT_GATE.set(self._gate)
        try:  # tasks the constructor starts belong to this activation too
            self.instance = cls(self.state, env)  # may raise: the catalog reports it
        finally:
            CURRENT.reset(token)
            OUTPUT_GATE.reset(gate)

    @property
    def name(self) -> str | None:
        return self.state.id.name

    def learn_name(self, name: str) -> None:
        """The name this object's id was made from (checked by the caller)."""
        if self.state.id.name is None:
            self.state.id.name = name

    async def _gate(self) -> None:
        """Before a call leaves this object: its earlier writes are durable."""
        if self.storage.broken is not None:
            raise self.storage.broken  # an evicted or reset instance sends nothing
        if self.storage.unsynced():
            await self.storage.sync()

    gate = _gate

    def outbound_gate(self) -> asyncio.Future[Any] | None:
        """For a WebSocket send now: None if every write so far is durable, else a future
        of their durability (one per commit point, shared by a broadcast's sends)."""
        st = self.storage
        if st.broken is not None:
            raise st.broken
        if not st.unsynced():
            return None
        if st._flush_scheduled or st._pending_turn():
            st._flush()
            if st.broken is not None:
                raise st.broken
        seq = st._last_seq
        if self._out_gate is None or self._out_gate_seq != seq:
            # (an empty context: the gate is the machinery's task, not the object's own)
            self._out_gate = asyncio.get_running_loop().create_task(
                st._slot.wait_durable(seq), context=contextvars.Context())
            self._out_gate.add_done_callback(_retrieve)
            self._out_gate_seq = seq
        return self._out_gate

    def sockets(self) -> ObjectSockets:
        if self._sockets is None:
            if self._registry is None:
                raise RuntimeError("this object process does not host WebSockets")
            self._sockets = self._registry.of((self.namespace, self.object_id))
            self._sockets.owner = self
        return self._sockets

    def own_task(self, coro: Any) -> asyncio.Task[Any]:
        return self._own(coro)

    def __str__(self) -> str:
        return f"activation {self.namespace}/{self.object_id}"

    def _step(self, event: str) -> None:
        self.phase = _TRANSITIONS.step(self, self.phase, event)

    @property
    def live(self) -> bool:
        """Whether this instance may still act (not evicted, reset or broken)."""
        return self.phase is Phase.ACTIVE or self.phase is Phase.BLOCKED

    @property
    def busy(self) -> bool:
        return bool(self._tasks) or bool(self._waiting) or self.phase is Phase.BLOCKED

    def deliver(self, request: Delivery, reply: Reply) -> None:
        self.last_used = self.clock()
        self.retiring_since, self.cancelled_tasks = None, False
        if refused(request, reply, len(self._tasks) + len(self._waiting), self.max_pending,
                   self.namespace, self.object_id):
            return
        if self.phase is Phase.BLOCKED or self._waiting:
            if type(self._waiting) is tuple:
                self._waiting = deque()
            self._waiting.append((request, reply))
            return
        self._start(request, reply)

    def _own(self, coro: Any) -> asyncio.Task[Any]:
        """A task of this activation's machinery (not counted as the object's own)."""
        task = asyncio.create_task(coro)
        if self.owned:
            self.owned.discard(task)
        if type(self._tasks) is frozenset:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks:
            self._tasks.discard(task)
        if not self._tasks:  # (an idle object holds no empty set)
            self._tasks = _NO_TASKS

    def _start(self, request: Delivery, reply: Reply) -> None:
        self._own(self._run(request, reply))

    async def _run(self, request: Delivery, reply: Reply) -> None:
        CURRENT.set(self)  # this task's own context: tasks it starts inherit both
        OUTPUT_GATE.set(self._gate)
        if self.phase in (Phase.BROKEN, Phase.RESET):
            reply(None, StorageCommitError("the object's storage failed; it was reset",
                                           outcome="discarded")
                  if self.phase is Phase.BROKEN else ObjectEvictedError(
                      "the object was reset while this call waited; retry it"))
            return
        if type(request) is MethodCall and callable_method(type(self.instance), request.name) is None:
            cls = type(self.instance)  # the caller's mistake, not the object's: not logged
            reply(None, ObjectError(
                f"{self.namespace}: {cls.__name__} has no method {request.name!r} that may be "
                f"called on a stub (callable: {', '.join(callable_methods(cls)) or 'none'})",
                "AttributeError", None, "AttributeError"))
            return
        resp: Any = None
        error: BaseException | None = None
        reset: str | None = None
        upgrade = None
        try:
            if type(request) is MethodCall:
                resp = await self._invoke(request)
            elif type(request) is AlarmCall:
                await self._alarm(request)
            elif type(request) is SocketEvent:
                await self._socket_event(request)
            elif type(request) is InObject:
                resp = request.fn(self.instance, self.state)
                if inspect.isawaitable(resp):
                    resp = await resp
            else:
                upgrade = request._upgrade
                if upgrade is not None:
                    UPGRADE.set(upgrade)
                resp = await self.instance.fetch(request)
                if not isinstance(resp, Response):
                    raise TypeError(f"{type(self.instance).__name__}.fetch returned "
                                    f"{type(resp).__name__}, not a durable.Response")
                if resp.websocket is not None and upgrade is None:
                    raise TypeError("fetch returned a 101 with a websocket, but the request "
                                    "was not a WebSocket upgrade (Upgrade: websocket) from a "
                                    "caller that can hold one")
        except CpuLimitExceeded as e:
            reset = str(e)
            error = CpuLimitError(str(e))
            self.report(error, request, e)
        except Exception as e:  # the object's own error: reported to the caller, stub stays usable
            error = self.report(e, request, e)
        try:
            await self.storage.sync()  # output gate: no response before its writes are durable
        except ObjectEvictedError as e:
            resp, error = None, error or e  # reset or evicted under this call
        except StorageCommitError as e:  # (a full disk too): reset, the cache may be wrong
            if self.phase is not Phase.BROKEN:
                self.fail(e)
            resp, error = None, e
        if upgrade is not None and (self._sockets is not None or resp is not None
                                    and resp.websocket is not None):
            settled = self.sockets().settle(upgrade, resp, error)
            if settled is not error:  # a 101 whose socket was not accepted: the object's bug
                error = self.report(settled, request, settled)
            if error is not None:
                resp = None
        if reset is not None and self.phase in (Phase.ACTIVE, Phase.BLOCKED):
            self.reset(reset)
        self.last_used = self.clock()
        reply(resp, error)

    async def _alarm(self, call: AlarmCall) -> None:
        """The object's ``alarm(info)``; once it returns, the alarm is deleted, unless the
        handler set another (it commits with the handler's writes)."""
        if self.storage._read_alarm() != call.due:
            # Replaced or deleted since the scheduler took it (a change not durable yet when
            # it fired): this alarm no longer exists; a new one fires at its own time.
            return
        handler = getattr(self.instance, "alarm", None)
        if handler is None:
            raise TypeError(f"{type(self.instance).__name__} has no alarm() handler; the alarm "
                            "set for it cannot run (define `async def alarm(self, info)`)")
        result = handler(AlarmInfo(call.retry_count))
        if inspect.isawaitable(result):
            await result
        if self.storage.broken is None and self.storage._read_alarm() == call.due:
            self.storage._write_alarm(None)

    async def _socket_event(self, call: SocketEvent) -> None:
        """``websocket_message(ws, message)``, ``websocket_close(ws, code, reason,
        was_clean)`` or ``websocket_error(ws, error)``: one call of the object each."""
        ev, ws, inst = call.event, call.ws, self.instance
        if ev.kind == EV_CLOSE:
            handler = getattr(inst, "websocket_close", None)
            args: tuple[Any, ...] = (ws, ev.code, ev.reason, ev.was_clean)
        elif ev.kind == EV_ERROR:
            handler = getattr(inst, "websocket_error", None)
            args = (ws, ev.data)
        else:
            handler = getattr(inst, "websocket_message", None)
            if handler is None:
                raise TypeError(f"{type(inst).__name__} accepted a WebSocket but has no "
                                "websocket_message(ws, message) handler")
            args = (ws, ev.data)
        if handler is None:
            return
        result = handler(*args)
        if inspect.isawaitable(result):
            await result

    async def _invoke(self, call: MethodCall) -> Any:
        """``stub.name(*args, **kwargs)``: the user's method (``_run`` checked it exists)."""
        fn = callable_method(type(self.instance), call.name)
        result = fn(self.instance, *call.args, **call.kwargs)
        if result is not None and inspect.isawaitable(result):
            result = await result
        return result

    def report(self, e: BaseException, request: Delivery | None, cause: BaseException,
               where: str = "fetch") -> BaseException:
        """Log an exception from object code (rate-limited per object); the caller's error.

        An error about a write's fate (``StorageCommitError``: a full disk, a failed commit;
        ``StorageCorruptError``) is not the object's bug and tells the caller whether the
        write may be stored (HTTP 507 / 503): it goes to the caller as itself, and the slot
        has logged its cause. Any other exception becomes an ``ObjectError``.
        """
        if isinstance(e, (StorageCommitError, StorageCorruptError)):
            return e
        now = self.clock()
        while self.errors_logged and now - self.errors_logged[0] > 60:
            self.errors_logged.popleft()
        tb = "".join(traceback.format_exception(cause))
        if len(self.errors_logged) < 5:
            if type(self.errors_logged) is tuple:
                self.errors_logged = deque()
            self.errors_logged.append(now)
            what = ("set-up" if request is None else f"{request.name}()"
                    if type(request) is MethodCall else f"alarm() (retry {request.retry_count})"
                    if type(request) is AlarmCall else "a WebSocket event"
                    if type(request) is SocketEvent else "run_in_object()"
                    if type(request) is InObject else f"{request.method} {request.url}")
            log.error("%s %s%s: %s raised %s during %s (%s)\n%s", self.namespace, self.object_id,
                      f" (name {self.name!r})" if self.name is not None else "",
                      type(self.instance).__name__ if self.instance is not None else "object",
                      type(cause).__name__, where, what, tb.rstrip())
        if isinstance(e, ObjectError):
            if self.debug and e.remote_traceback is None:
                e.remote_traceback = tb
            return e
        return ObjectError(str(e), type(e).__name__, tb if self.debug else None,
                           builtin_ancestor(type(e)))

    def block_while(self, fn: Callable[[], Awaitable[Any]] | Awaitable[Any]) -> asyncio.Task[Any]:
        self._step("block")
        coro = fn() if callable(fn) else fn

        async def run() -> Any:
            try:
                return await coro
            except BaseException as e:
                if self.phase is Phase.BLOCKED and not isinstance(e, asyncio.CancelledError):
                    error = (CpuLimitError(str(e)) if isinstance(e, CpuLimitExceeded)
                             else self.report(e, None, e, "block_concurrency_while"))
                    self.reset(f"block_concurrency_while raised {type(e).__name__}", error)
                raise
            finally:
                if self.phase is Phase.BLOCKED:
                    self._step("unblock")
                while self._waiting and self.phase is Phase.ACTIVE:
                    self._start(*self._waiting.popleft())

        task = self._own(run())
        task.add_done_callback(_retrieve)  # its error went to the waiting calls
        return task

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        token, gate = CURRENT.set(self), OUTPUT_GATE.set(self._gate)
        try:
            task = asyncio.ensure_future(awaitable)  # a coroutine: adopted by the task factory
        finally:
            CURRENT.reset(token)
            OUTPUT_GATE.reset(gate)
        if task not in self.owned:  # a future made elsewhere
            self.adopt(task)

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """A task started in this object's context (the process's task factory calls this)."""
        if type(self.owned) is frozenset:
            self.owned = set()
        self.owned.add(task)
        task.add_done_callback(self._owned_done)

    def _owned_done(self, task: asyncio.Task[Any]) -> None:
        if task not in self.owned:  # one of the activation's own (a call, a set-up)
            return
        self.owned.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        if isinstance(e, ObjectEvictedError):
            log.warning("%s %s: a task it started used its storage after the object was evicted "
                        "or reset; nothing was written (%s)", self.namespace, self.object_id, e)
            return
        self.report(e, None, e, "a task it started")
        if isinstance(e, CpuLimitExceeded) and self.phase in (Phase.ACTIVE, Phase.BLOCKED):
            self.reset(str(e))

    def evictable(self, idle_for: float) -> bool:
        return (self.phase is Phase.ACTIVE and not self.busy
                and self.clock() - self.last_used >= idle_for and not self.storage.unsynced())

    def retire(self, limit: float) -> bool:
        """An idle object's tasks get ``limit`` seconds to end, then are cancelled.

        Returns whether the activation may be evicted now (no task of its own left).
        """
        if not self.owned:
            return True
        self.owned = {t for t in self.owned if not t.done()}
        if not self.owned:
            return True
        now = self.clock()
        if self.retiring_since is None:
            self.retiring_since = now
        elif self.cancelled_tasks:
            return True  # they had their CancelledError; one that ignores it is fenced off
        elif now - self.retiring_since >= limit:
            log.warning("%s %s: %d task(s) it started still ran %g s after it went idle "
                        "(wait_until_limit): cancelled before eviction", self.namespace,
                        self.object_id, len(self.owned), limit)
            self.cancelled_tasks = True
            for t in self.owned:
                t.cancel()
        return False

    def evict(self) -> None:
        self._step("evict")
        self._fence(ObjectEvictedError(
            f"{self.namespace} {self.object_id} was evicted (idle); this instance's `state` "
            "can no longer be used, and nothing was written"))
        self.storage.evict()
        if self._sockets is not None and self._registry is not None and self._sockets.owner is self:
            self._registry.released(self._sockets)  # the records stay while sockets are open
            self._sockets = None
        # Break the cycles (instance -> state -> activation -> instance) so that refcounting
        # frees an evicted object at once: full collections are rare (objectproc/collector.py),
        # and a million evicted objects waiting for one grew an object process by hundreds of
        # MiB. (An instance that outlives this anyway is counted there: ObjectProcess.evict_idle.)
        self.state._activation = None
        self.instance = None

    def _fence(self, error: ObjectEvictedError) -> None:
        self.storage.fence(error)
        for t in list(self.owned):  # (they leave ``owned`` as they end)
            t.cancel()

    def reset(self, why: str, error: BaseException | None = None) -> None:
        """Discard the instance (its durable writes stay): the next call constructs it anew."""
        log.warning("%s %s: reset (%s); its next call constructs it anew", self.namespace,
                    self.object_id, why)
        self._step("reset")
        self._fence(ObjectEvictedError(
            f"{self.namespace} {self.object_id} was reset ({why}); this instance's `state` "
            "can no longer be used, and nothing was written"))
        error = error or ObjectEvictedError(f"the object was reset ({why}); retry the call")
        while self._waiting:
            _, reply = self._waiting.popleft()
            reply(None, error)

    def fail(self, error: StorageCommitError | None = None) -> None:
        """Storage failed under this activation: it is never used again (the object is reset)."""
        self._step("fail")
        error = error or StorageCommitError("the object's storage failed; its process restarts",
                                            outcome="discarded")
        while self._waiting:
            _, reply = self._waiting.popleft()
            reply(None, error)

    async def drain(self) -> None:
        """Wait for every running call of this activation (shutdown).

        A task leaves ``_tasks`` in its done callback, which runs a loop turn after it ends.
        So this waits for the tasks not yet done, then yields for those callbacks: on Python
        3.12+ ``gather`` of tasks that are all done returns without yielding, and a loop that
        only gathered them again spun forever."""
        while self._tasks:
            running = [t for t in self._tasks if not t.done()]
            if running:
                await asyncio.wait(running)
            else:
                await asyncio.sleep(0)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # asyncio would log "exception was never retrieved"


#: handlers the runtime calls itself: never reachable as stub methods
RESERVED = frozenset({"fetch", "alarm", "websocket_message", "websocket_close",
                      "websocket_error"})
_METHODS: dict[tuple[type, str], Callable[..., Any] | None] = {}


def callable_method(cls: type, name: str) -> Callable[..., Any] | None:
    """The function ``stub.name(...)`` runs on an instance of ``cls``, or None.

    Callable: a plain function (``def`` or ``async def``) that the user's class (or a
    base of its own) defines, whose name does not start with ``_`` and is not one of the
    runtime's handlers. Not: anything ``DurableObject`` or ``object`` define, properties,
    static or class methods, or class attributes that are not functions.
    """
    key = (cls, name)
    try:
        return _METHODS[key]
    except KeyError:
        pass
    fn = None
    if not name.startswith("_") and name not in RESERVED:
        for base in cls.__mro__:
            if base is object or base is DurableObject:
                break
            if name in base.__dict__:
                attr = base.__dict__[name]
                fn = attr if inspect.isfunction(attr) else None
                break
    if len(_METHODS) > 100_000:  # (classes are few; names are the caller's)
        _METHODS.clear()
    _METHODS[key] = fn
    return fn


def callable_methods(cls: type) -> list[str]:
    """The names ``callable_method`` allows on ``cls``, sorted (for error messages)."""
    names = {n for base in cls.__mro__ if base not in (object, DurableObject) for n in vars(base)}
    return sorted(n for n in names if callable_method(cls, n) is not None)
