"""One object loaded in an object process: its instance, storage and delivery order.

Lifecycle (a table, so that every step is deliberate)::

    ACTIVE --deliver--> ACTIVE          calls start in arrival order (E-order)
    ACTIVE --block_concurrency_while--> BLOCKED    new calls wait in order
    BLOCKED --set-up done--> ACTIVE     waiting calls start, in order
    ACTIVE --idle, writes durable--> EVICTED       the catalog forgets it
    ACTIVE/BLOCKED --storage failed--> BROKEN      every call gets an error; never reused

Each call runs as its own task, started in arrival order, so a call that
awaits (another object, a sleep) lets the next one start, as in workerd. A
response leaves only after every write made before it is durable (output
gate: ``storage.sync()``); the input gate holds because storage reads never
suspend (see ``storage/object.py``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from durable.errors import OverloadedError, StorageCommitError
from durable.http import Request, Response
from durable.ids import ObjectId

from .storage import ObjectStorage, SlotStore

__all__ = ["Activation", "State", "Phase"]

log = logging.getLogger("durable.objectproc")


class Phase(enum.Enum):
    ACTIVE = "active"
    BLOCKED = "blocked"
    EVICTED = "evicted"
    BROKEN = "broken"


class IllegalTransition(RuntimeError):
    pass


_TRANSITIONS = {
    (Phase.ACTIVE, "block"): Phase.BLOCKED,
    (Phase.BLOCKED, "unblock"): Phase.ACTIVE,
    (Phase.ACTIVE, "evict"): Phase.EVICTED,
    (Phase.ACTIVE, "fail"): Phase.BROKEN,
    (Phase.BLOCKED, "fail"): Phase.BROKEN,
    (Phase.BROKEN, "fail"): Phase.BROKEN,
}


class State:
    """``state`` as the object sees it: ``id``, ``storage``, ``block_concurrency_while``."""

    __slots__ = ("id", "storage", "_activation")

    def __init__(self, oid: ObjectId, storage: ObjectStorage, activation: Activation) -> None:
        self.id = oid
        self.storage = storage
        self._activation = activation

    def block_concurrency_while(self, fn: Callable[[], Awaitable[Any]] | Awaitable[Any]) -> asyncio.Task[Any]:
        """Run async set-up with no other call delivered to this object until it ends."""
        return self._activation.block_while(fn)


Reply = Callable[[Response | None, BaseException | None], None]


class Activation:
    def __init__(self, store: SlotStore, namespace: str, object_id: str, cls: type,
                 env: Any, clock: Callable[[], float] = time.monotonic,
                 max_pending: int = 1000) -> None:
        self.namespace = namespace
        self.object_id = object_id
        self.phase = Phase.ACTIVE
        self.clock = clock
        self.storage = ObjectStorage(store, namespace, object_id)
        self.state = State(ObjectId(object_id), self.storage, self)
        self._waiting: deque[tuple[Request, Reply]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_used = clock()
        self.max_pending = max_pending
        self.instance = cls(self.state, env)  # may raise: the catalog reports it to the caller

    def _step(self, event: str) -> None:
        nxt = _TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise IllegalTransition(f"activation {self.namespace}/{self.object_id}: "
                                    f"{event!r} is not allowed in phase {self.phase.value}")
        self.phase = nxt

    @property
    def busy(self) -> bool:
        return bool(self._tasks) or bool(self._waiting) or self.phase is Phase.BLOCKED

    def deliver(self, request: Request, reply: Reply) -> None:
        self.last_used = self.clock()
        if len(self._tasks) + len(self._waiting) >= self.max_pending:
            reply(None, OverloadedError(
                f"{self.namespace} {self.object_id} has {len(self._tasks) + len(self._waiting)} "
                f"calls waiting or running (the limit is {self.max_pending}); retry later"))
            return
        if self.phase is Phase.BLOCKED or self._waiting:
            self._waiting.append((request, reply))
            return
        self._start(request, reply)

    def _start(self, request: Request, reply: Reply) -> None:
        task = asyncio.create_task(self._run(request, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: Request, reply: Reply) -> None:
        if self.phase is Phase.BROKEN:
            reply(None, StorageCommitError("the object's storage failed; it was reset",
                                           outcome="discarded"))
            return
        resp: Response | None = None
        error: BaseException | None = None
        try:
            resp = await self.instance.fetch(request)
            if not isinstance(resp, Response):
                raise TypeError(f"{type(self.instance).__name__}.fetch returned "
                                f"{type(resp).__name__}, not a durable.Response")
        except Exception as e:  # the object's own error: reported to the caller, stub stays usable
            error = e
        try:
            await self.storage.sync()  # output gate: no response before its writes are durable
        except StorageCommitError as e:  # (a full disk too): reset, the cache may be wrong
            if self.phase is not Phase.BROKEN:
                self.fail(e)
            resp, error = None, e
        self.last_used = self.clock()
        reply(resp, error)

    def block_while(self, fn: Callable[[], Awaitable[Any]] | Awaitable[Any]) -> asyncio.Task[Any]:
        self._step("block")
        coro = fn() if callable(fn) else fn

        async def run() -> Any:
            try:
                return await coro
            finally:
                if self.phase is Phase.BLOCKED:
                    self._step("unblock")
                while self._waiting and self.phase is Phase.ACTIVE:
                    self._start(*self._waiting.popleft())

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def evictable(self, idle_for: float) -> bool:
        return (self.phase is Phase.ACTIVE and not self.busy
                and self.clock() - self.last_used >= idle_for and not self.storage.unsynced())

    def evict(self) -> None:
        self._step("evict")
        self.storage.evict()
        # Break the cycles (instance -> state -> activation -> instance) so that refcounting
        # frees an evicted object at once: tune_gc() makes full collections rare, and a
        # million evicted objects waiting for one grew an object process by hundreds of MiB.
        self.state._activation = None
        self.instance = None

    def fail(self, error: StorageCommitError | None = None) -> None:
        """Storage failed under this activation: it is never used again (the object is reset)."""
        self._step("fail")
        error = error or StorageCommitError("the object's storage failed; its process restarts",
                                            outcome="discarded")
        while self._waiting:
            _, reply = self._waiting.popleft()
            reply(None, error)

    async def drain(self) -> None:
        """Wait for every running call of this activation (shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
