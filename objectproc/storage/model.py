"""The in-memory model of object storage: the reference the engine is tested against.

Deliberately naive (a dict per object, sort on every list, copy the object
for a transaction) so that it is obviously right; the contract suite runs
against it and the DuckDB engine alike, and the property tests compare the
two. It shares only the argument checks (``limits.py``) with the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from durable.codec import decode
from durable.errors import StorageError, TransactionClosedError

from .eager import NONE, Done
from .limits import (
    DEFAULT_LIMITS,
    StorageLimits,
    alarm_time,
    check_key,
    check_keys,
    encode_entries,
    encode_value,
    list_range,
)

__all__ = ["ModelWorld", "ModelStorage"]

T = TypeVar("T")
_NO_VALUE: Any = object()


class ModelWorld:
    """Every object's data; outlives the storages made from it (a 'reopen' is free)."""

    def __init__(self, limits: StorageLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.objects: dict[tuple[str, str], dict[str, bytes]] = {}
        self.alarms: dict[tuple[str, str], int] = {}  # object -> due (epoch ms)

    def object(self, namespace: str, object_id: str) -> ModelStorage:
        return ModelStorage(self, namespace, object_id)


class _Ops:
    """get/put/delete/list over a plain dict of encoded values."""

    def __init__(self, data: dict[str, bytes], limits: StorageLimits) -> None:
        self._d = data
        self._limits = limits

    def _check(self) -> None:
        pass

    async def get(self, key: Any) -> Any:
        self._check()
        if type(key) is str:
            check_key(key, self._limits)
            return decode(self._d[key]) if key in self._d else None
        keys = check_keys(key, self._limits, "get")
        return {k: decode(self._d[k]) for k in sorted(set(keys)) if k in self._d}

    def put(self, key: Any, value: Any = _NO_VALUE) -> Done[None]:
        self._check()
        if type(key) is str:
            if value is _NO_VALUE:
                raise TypeError("put(key, value) needs a value")
            check_key(key, self._limits)
            self._d[key] = encode_value(key, value, self._limits)
            return NONE
        if value is not _NO_VALUE:
            raise TypeError("put(entries) takes a dict and no second argument")
        self._d.update(encode_entries(key, self._limits))
        return NONE

    def delete(self, key: Any) -> Done[bool | int]:
        self._check()
        if type(key) is str:
            check_key(key, self._limits)
            return Done(self._d.pop(key, None) is not None)
        keys = check_keys(key, self._limits, "delete")
        return Done(sum(self._d.pop(k, None) is not None for k in set(keys)))

    async def list(self, *, start: Any = None, end: Any = None, prefix: Any = None,
                   reverse: Any = False, limit: Any = None) -> dict[str, Any]:
        self._check()
        r = list_range(start, end, prefix, reverse, limit)
        keys = [k for k in sorted(self._d) if r.matches(k)]
        if reverse:
            keys.reverse()
        if limit is not None:
            keys = keys[:limit]
        return {k: decode(self._d[k]) for k in keys}


class ModelStorage(_Ops):
    def __init__(self, world: ModelWorld, namespace: str, object_id: str) -> None:
        super().__init__(world.objects.setdefault((namespace, object_id), {}), world.limits)
        self._world = world
        self._id = (namespace, object_id)

    def delete_all(self) -> Done[None]:
        self._d.clear()
        self._world.alarms.pop(self._id, None)
        return NONE

    async def get_alarm(self) -> int | None:
        return self._world.alarms.get(self._id)

    def set_alarm(self, when: Any) -> Done[None]:
        self._world.alarms[self._id] = alarm_time(when)
        return NONE

    def delete_alarm(self) -> Done[None]:
        self._world.alarms.pop(self._id, None)
        return NONE

    async def transaction(self, fn: Callable[[ModelTransaction], Awaitable[T]]) -> T:
        txn = ModelTransaction(dict(self._d), self._limits, self._world.alarms.get(self._id))
        try:
            result = await fn(txn)
        finally:
            txn.closed = True
        if not txn.rolled_back:
            self._d.clear()
            self._d.update(txn._d)
            if txn.alarm is None:
                self._world.alarms.pop(self._id, None)
            else:
                self._world.alarms[self._id] = txn.alarm
        return result

    async def sync(self) -> None:
        return None


class ModelTransaction(_Ops):
    def __init__(self, data: dict[str, bytes], limits: StorageLimits,
                 alarm: int | None = None) -> None:
        super().__init__(data, limits)
        self.alarm = alarm
        self.closed = False
        self.rolled_back = False

    async def get_alarm(self) -> int | None:
        self._check()
        return self.alarm

    def set_alarm(self, when: Any) -> Done[None]:
        self._check()
        self.alarm = alarm_time(when)
        return NONE

    def delete_alarm(self) -> Done[None]:
        self._check()
        self.alarm = None
        return NONE

    def _check(self) -> None:
        if self.closed:
            raise TransactionClosedError("transaction is closed")

    def rollback(self) -> None:
        self._check()
        self.rolled_back = True
        self.closed = True

    def delete_all(self) -> Done[None]:
        raise StorageError("delete_all() cannot run inside a transaction")
