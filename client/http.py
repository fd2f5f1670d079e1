"""Request, Response and Headers, shaped like the Fetch API that Durable Objects use.

Request bodies are bytes, held whole (a call's body crosses the wire as one
frame). A response body is bytes too, or an async iterable of bytes/str
chunks that streams (``iter_chunks()``). ``text()``, ``json()`` and
``bytes()`` are async, as in Fetch, so object code written against the seed
API reads the same. ``Response(status=101, websocket=client)`` accepts a
WebSocket upgrade (``durable.websocket``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

__all__ = ["Headers", "Request", "Response"]

#: what a header name may not hold (a regex: the gateway checks every request's headers)
_BAD_NAME = re.compile(r"[ \t\r\n:]")



class Headers:
    """Case-insensitive, multi-valued header list that keeps the order given."""

    __slots__ = ("_items",)

    def __init__(self, init: Any = None) -> None:
        self._items: list[tuple[str, str]] = []
        if init is None:
            return
        if isinstance(init, Headers):
            self._items = list(init._items)
            return
        pairs = init.items() if isinstance(init, Mapping) else init
        items, check = self._items, self._check
        for name, value in pairs:
            items.append(check(name, value))

    @staticmethod
    def _check(name: Any, value: Any) -> tuple[str, str]:
        if type(name) is not str or type(value) is not str:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"header names and values are str, got {name!r}: {value!r}")
            name, value = str(name), str(value)  # plain str for subclasses (aiohttp's istr)
        if not name or _BAD_NAME.search(name) or "\n" in value or "\r" in value:
            raise ValueError(f"invalid header {name!r}: {value!r}")
        return name, value

    def append(self, name: str, value: str) -> None:
        self._items.append(self._check(name, value))

    def set(self, name: str, value: str) -> None:
        self._check(name, value)
        self.delete(name)
        self._items.append((name, value))

    def delete(self, name: str) -> None:
        low = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != low]

    def get(self, name: str, default: str | None = None) -> str | None:
        """All values of ``name`` joined by ', ' (as Fetch does), or ``default``."""
        low = name.lower()
        vals = [v for n, v in self._items if n.lower() == low]
        return ", ".join(vals) if vals else default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for n, v in self._items if n.lower() == low]

    def has(self, name: str) -> bool:
        low = name.lower()
        return any(n.lower() == low for n, _ in self._items)

    __contains__ = has

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def items(self) -> list[tuple[str, str]]:
        """Every (name, value) pair, in order, names as given."""
        return list(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return [(n.lower(), v) for n, v in self._items] == [(n.lower(), v) for n, v in other._items]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _body(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"a body is bytes or str, not {type(body).__name__}")


class _Body:
    __slots__ = ()
    _body: bytes

    async def bytes(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return (await self.bytes()).decode("utf-8")

    async def json(self) -> Any:
        return orjson.loads(await self.bytes())

    async def _parse_json(self) -> Any:
        return orjson.loads(await self.bytes())

    @property
    def body(self) -> bytes:
        return self._body


class Request(_Body):
    """An HTTP-shaped request to an object: ``url``, ``method``, ``headers``, body."""

    __slots__ = ("url", "method", "headers", "_body", "_upgrade")

    def __init__(self, url: str, *, method: str = "GET", headers: Any = None,
                 body: bytes | str | None = None) -> None:
        #: the WebSocket this upgrade request may open (the client's channel; the object
        #: process's channel id): set by whoever received the upgrade, never by hand
        self._upgrade: Any = None
        if type(url) is not str:
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        if type(method) is not str or not method.isascii() or not method.isalpha():
            raise ValueError(f"invalid method {method!r}")
        self.url = url
        self.method = method.upper()
        self.headers = Headers(headers)
        self._body = _body(body)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    @property
    def is_websocket(self) -> bool:
        """Whether this is a WebSocket upgrade request (``Upgrade: websocket``)."""
        return (self.headers.get("upgrade") or "").lower() == "websocket"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url} {len(self._body)} bytes>"


class _JsonAccessor:
    """``Response.json(data, status=)`` on the class, ``await response.json()`` on an instance."""

    def __get__(self, obj: Any, cls: type) -> Any:
        if obj is None:
            return functools.partial(_json_response, cls)
        return obj._parse_json


def _json_response(cls: type[Response], data: Any, *, status: int = 200,
                   headers: Any = None) -> Response:
    resp = cls(orjson.dumps(data), status=status, headers=headers)
    if not resp.headers.has("content-type"):
        resp.headers.set("content-type", "application/json")
    return resp


class Response(_Body):
    """An HTTP-shaped response: ``status``, ``headers``, body; ``ok`` for 2xx.

    ``body`` may be an async iterable of bytes/str: it streams, a chunk at a time
    (``iter_chunks()``; ``bytes()``/``text()``/``json()`` read it whole).
    ``Response(status=101, websocket=client)`` answers a WebSocket upgrade with the
    client end of a ``WebSocketPair``.
    """

    __slots__ = ("status", "headers", "_body", "_stream", "websocket")

    def __init__(self, body: Any = None, *, status: int = 200, headers: Any = None,
                 websocket: Any = None) -> None:
        if websocket is not None:
            if status != 101:
                raise ValueError(f"a Response with a websocket has status 101, not {status!r}")
        elif type(status) is not int or not 200 <= status <= 599:
            raise ValueError(f"status must be an int from 200 to 599 (101 with websocket=), "
                             f"got {status!r}")
        self.status = status
        self.headers = Headers(headers)
        self.websocket = websocket
        self._stream: Any = None
        if body is not None and hasattr(body, "__aiter__"):
            self._stream = body
            self._body = b""
        else:
            self._body = _body(body)
        if isinstance(body, str) and not self.headers.has("content-type"):
            self.headers.set("content-type", "text/plain;charset=UTF-8")

    @property
    def ok(self) -> bool:
        return 200 <= self.status <= 299

    @property
    def streaming(self) -> bool:
        """Whether the body streams (read it with ``iter_chunks()``)."""
        return self._stream is not None

    @property
    def body(self) -> bytes:
        if self._stream is not None:
            raise TypeError("this response's body streams: read it with `async for chunk in "
                            "resp.iter_chunks()` or `await resp.bytes()`")
        return self._body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (a body held whole is one chunk)."""
        if self._stream is None:
            if self._body:
                yield self._body
            return
        stream, self._stream = self._stream, _CONSUMED
        if stream is _CONSUMED:
            raise RuntimeError("this response's body was already read")
        async for chunk in stream:
            yield _chunk(chunk)

    async def bytes(self) -> bytes:
        if self._stream is None:
            return self._body
        self._body = b"".join([c async for c in self.iter_chunks()])
        self._stream = None
        return self._body

    json = _JsonAccessor()  # Response.json(data) builds one; await resp.json() parses one

    def __repr__(self) -> str:
        if self._stream is not None:
            return f"<Response {self.status} streaming>"
        return f"<Response {self.status} {len(self._body)} bytes>"


class _Consumed:
    def __aiter__(self) -> _Consumed:
        return self

    async def __anext__(self) -> bytes:
        raise RuntimeError("this response's body was already read")


_CONSUMED: Any = _Consumed()


def _chunk(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"a streamed body yields bytes or str, not {type(chunk).__name__}")
