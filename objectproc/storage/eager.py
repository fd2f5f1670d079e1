"""What a storage write returns: the write is made when it is called.

In workerd, ``storage.put()`` without ``await`` still writes (the output gate holds
the response until the write is durable). A Python ``async def`` that is never awaited
never runs, so the writes (``put``, ``delete``, ``delete_all``, ``set_alarm``,
``delete_alarm``, and a transaction's) are plain methods that do their work at once and
return :class:`Done`: awaitable as a coroutine is (``await``, ``gather``,
``create_task``), with nothing left to run and no "never awaited" warning when it is
dropped.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Done", "NONE"]

T = TypeVar("T")


class Done(Coroutine[Any, Any, T], Generic[T]):
    """A finished coroutine whose value is ``result``."""

    __slots__ = ("_result",)

    def __init__(self, result: T) -> None:
        self._result = result

    def __await__(self) -> Generator[Any, None, T]:
        if self._result is None:  # (an empty iterator ends with None, in C: ~3x cheaper)
            return iter(())  # type: ignore[return-value]
        return self  # type: ignore[return-value]  # (its own iterator: __next__ ends at once)

    def __next__(self) -> Any:
        raise StopIteration(self._result)

    def send(self, value: Any) -> Any:
        raise StopIteration(self._result)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        raise typ if val is None else val

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<Done {self._result!r}>"


#: the value of ``put`` and the other writes that return None: one object, reused
NONE: Done[None] = Done(None)
