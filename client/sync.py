"""The blocking client: ``with durable.connect_sync() as client``.

It runs the async client on an event loop in a background thread, so a
blocking program gets the same ordering, errors and reconnection behaviour.
Responses are :class:`SyncResponse`: ``text()``, ``json()`` and ``bytes()``
are plain methods.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import orjson

from .client import Client, Namespace, Stub
from .http import Headers, Request
from .ids import ObjectId

__all__ = ["SyncClient", "SyncNamespace", "SyncStub", "SyncResponse", "connect_sync"]

T = TypeVar("T")


class SyncResponse:
    """A response with blocking body accessors."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def ok(self) -> bool:
        return 200 <= self.status <= 299

    def bytes(self) -> bytes:
        return self.body

    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<SyncResponse {self.status} {len(self.body)} bytes>"


class SyncStub:
    __slots__ = ("_client", "_stub")

    def __init__(self, client: SyncClient, stub: Stub) -> None:
        self._client = client
        self._stub = stub

    @property
    def id(self) -> ObjectId:
        return self._stub.id

    def fetch(self, url_or_request: str | Request, *, method: str = "GET", headers: Any = None,
              body: bytes | str | None = None, timeout: float | None = None) -> SyncResponse:
        async def fetch() -> SyncResponse:
            resp = await self._stub.fetch(url_or_request, method=method, headers=headers,
                                          body=body, timeout=timeout)
            return SyncResponse(resp.status, resp.headers, await resp.bytes())  # (streams whole)

        return self._client._run(fetch())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """``stub.increment(5)``: the object's method, called; blocks and returns its value."""
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._client._run(method(*args, **kwargs))  # (arguments checked here)

        return call

    def __repr__(self) -> str:
        return f"<SyncStub {self._stub.namespace} {self._stub.id}>"


class SyncNamespace:
    __slots__ = ("_client", "_ns")

    def __init__(self, client: SyncClient, ns: Namespace) -> None:
        self._client = client
        self._ns = ns

    @property
    def name(self) -> str:
        return self._ns.name

    def id_from_name(self, name: str) -> ObjectId:
        return self._ns.id_from_name(name)

    def new_unique_id(self) -> ObjectId:
        return self._ns.new_unique_id()

    def id_from_string(self, hex_id: str) -> ObjectId:
        return self._ns.id_from_string(hex_id)

    def get(self, oid: ObjectId) -> SyncStub:
        return SyncStub(self._client, self._client._run_sync(lambda: self._ns.get(oid)))

    def get_by_name(self, name: str) -> SyncStub:
        """``get(id_from_name(name))``, as Cloudflare's ``getByName``."""
        return self.get(self._ns.id_from_name(name))

    def list_objects(self, **kwargs: Any) -> Iterator[Any]:
        """This namespace's objects (``Namespace.list_objects``), fetched a page at a time."""
        pages = self._ns.list_objects(**kwargs)
        while True:
            try:
                yield self._client._run(pages.__anext__())
            except StopAsyncIteration:
                return


class SyncClient:
    def __init__(self, endpoint: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="durable-client",
                                        daemon=True)
        self._thread.start()
        self._client = Client(endpoint, **kwargs)
        try:
            self._run(self._client.start())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _run_sync(self, fn: Any) -> Any:
        async def call() -> Any:
            return fn()
        return self._run(call())

    def namespace(self, name: str) -> SyncNamespace:
        return SyncNamespace(self, self._client.namespace(name))

    @property
    def namespaces(self) -> list[str]:
        return self._client.namespaces

    def statistics(self) -> dict[str, Any]:
        return self._run(self._client.statistics())

    def sql(self, query: str, **kwargs: Any) -> Any:
        """``Client.sql``: one read-only query over every object's storage (docs/query.md)."""
        return self._run(self._client.sql(query, **kwargs))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_sync(endpoint: str | None = None, **kwargs: Any) -> SyncClient:
    """``with durable.connect_sync(endpoint) as client``: a connected blocking client."""
    return SyncClient(endpoint, **kwargs)
