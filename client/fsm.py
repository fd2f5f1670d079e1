"""A transition table, shared by the supervisor's watchers and the object activations.

Each lifecycle is written down as ``{(state, event): next state}``; a step the
table does not hold is a bug in durable, raised as ``IllegalTransition``
naming the owner, the event and the state, rather than silently ignored.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

from .errors import IllegalTransition

__all__ = ["Transitions", "IllegalTransition"]

S = TypeVar("S", bound=enum.Enum)


class Transitions(Generic[S]):
    __slots__ = ("table",)

    def __init__(self, table: dict[tuple[S, str], S]) -> None:
        self.table = table

    def step(self, owner: object, state: S, event: str) -> S:
        """The state after ``event``; IllegalTransition if the table does not allow it.

        ``owner`` names the machine in the error (``str(owner)``), made only then: an object
        activation steps at least once per object, and its label cost more than the step."""
        nxt = self.table.get((state, event))
        if nxt is None:
            raise IllegalTransition(f"{owner}: {event!r} is not allowed in state {state.value}")
        return nxt
