"""What object code sees: the optional ``DurableObject`` base, ``state`` and ``env``."""

from __future__ import annotations

from typing import Any

from .http import Request, Response

__all__ = ["DurableObject", "Env"]


class DurableObject:
    """Optional base class for objects: keeps ``state`` and ``env``; override ``fetch``."""

    def __init__(self, state: Any, env: Any) -> None:
        self.state = state
        self.env = env

    async def fetch(self, request: Request) -> Response:
        return Response(f"{type(self).__name__} does not implement fetch()", status=501)


class Env:
    """The bindings an object (or a Worker) sees: one attribute per namespace, and ``vars``."""

    def __init__(self, namespaces: dict[str, Any], vars: dict[str, Any] | None = None) -> None:
        self._namespaces = dict(namespaces)
        self.vars: dict[str, Any] = dict(vars or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_namespaces"][name]
        except KeyError:
            known = ", ".join(sorted(self.__dict__.get("_namespaces", {}))) or "none"
            raise AttributeError(f"env has no namespace {name!r} (bound: {known})") from None

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._namespaces]
