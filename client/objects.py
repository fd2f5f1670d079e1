"""What object code sees: the optional ``DurableObject`` base, ``state`` and ``env``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .http import Request, Response

__all__ = ["DurableObject", "Env", "load_spec", "load_class", "load_function"]


class DurableObject:
    """Optional base class for objects: keeps ``state`` and ``env``; override ``fetch``."""

    def __init__(self, state: Any, env: Any) -> None:
        self.state = state
        self.env = env

    async def fetch(self, request: Request) -> Response:
        return Response(f"{type(self).__name__} does not implement fetch()", status=501)


class Env:
    """The bindings an object (or a Worker) sees: one attribute per namespace, ``vars``, and
    ``secrets`` (read-only; from ``[secrets]``: environment variables or files, never in the
    config file, ``ps``, ``durable status`` or the logs)."""

    def __init__(self, namespaces: dict[str, Any], vars: dict[str, Any] | None = None,
                 secrets: dict[str, str] | None = None) -> None:
        self._namespaces = dict(namespaces)
        self.vars: dict[str, Any] = dict(vars or {})
        self.secrets: Mapping[str, str] = MappingProxyType(dict(secrets or {}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_namespaces"][name]
        except KeyError:
            known = ", ".join(sorted(self.__dict__.get("_namespaces", {}))) or "none"
            raise AttributeError(f"env has no namespace {name!r} (bound: {known})") from None

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._namespaces]


def load_spec(spec: str, what: str, example: str) -> Any:
    """Import ``module:attr`` (a namespace's class, a Worker's fetch).

    Raise ``ValueError`` saying what is wrong and how to fix it.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like {example!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"cannot import module {module_name!r} for {what} {spec!r}: "
                         f"{type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {spec!r})") from None


def load_class(spec: str) -> type:
    """Import ``module:Class`` (a namespace's class); ``ValueError`` says what is wrong."""
    obj = load_spec(spec, "class", "package.module:ClassName")
    if not isinstance(obj, type):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a class")
    return obj


def load_function(spec: str) -> Any:
    """Import ``module:fetch`` (the gateway's Worker); ``ValueError`` says what is wrong."""
    fn = load_spec(spec, "worker", "package.module:fetch")
    if not callable(fn):
        raise ValueError(f"worker {spec!r} is a {type(fn).__name__}, not a function")
    return fn
