"""WebSockets: the object's end (``WebSocketPair``, ``WebSocket``) and the caller's
(``ClientWebSocket``, from ``stub.websocket(path)``).

The model is Cloudflare's hibernation API. In ``fetch``, for an upgrade
request, the object makes a pair, accepts the server end with
``state.accept_websocket(server, tags=[...])`` and returns
``Response(status=101, websocket=client)``. The socket itself stays where the
caller is (the HTTP gateway, or the Python client that opened it); the object
process keeps only a small record of it (tags, attachment), which outlives
the object's eviction. Each message that arrives is one call of the object's
``websocket_message(ws, message)``; ``ws.send`` leaves behind the output gate
(after the writes made before it are durable), like a response.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from . import codec
from .errors import CallTimeoutError, OverloadedError, StubBrokenError, WebSocketError
from .gate import OUTPUT_GATE
from .protocol.messages import (
    EV_BINARY,
    EV_CLOSE,
    EV_ERROR,
    EV_TEXT,
    MAX_CLOSE_REASON,
    OUT_AUTO,
    OUT_CLOSE,
)

if TYPE_CHECKING:
    from .client import Stub
    from .http import Request

__all__ = ["WebSocket", "WebSocketPair", "ClientWebSocket", "CONNECTING", "OPEN", "CLOSING",
           "CLOSED", "MAX_MESSAGE", "MAX_ATTACHMENT", "check_close"]

#: ``ready_state`` values, as in the browser's WebSocket
CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3
#: a message's largest size by default, as Cloudflare's (``websocket_max_message_kb``)
MAX_MESSAGE = 1 << 20
#: an attachment's largest encoded size, as Cloudflare's
MAX_ATTACHMENT = 2048
MAX_TAGS, MAX_TAG = 10, 256


def check_close(code: int, reason: str) -> bytes:
    """The reason's bytes, once ``code``/``reason`` are ones a close frame may carry."""
    if type(code) is not int or not (code == 1000 or 3000 <= code <= 4999):
        raise ValueError(f"a close code sent by an application is 1000 or 3000-4999, got {code!r}")
    data = reason.encode()
    if len(data) > MAX_CLOSE_REASON:
        raise ValueError(f"a close reason is at most {MAX_CLOSE_REASON} bytes of UTF-8, got "
                         f"{len(data)}")
    return data


class WebSocket:
    """One end of a ``WebSocketPair``; the object holds the server end once accepted.

    ``send`` and ``close`` never wait: what they send leaves once the object's earlier
    writes are durable. ``tags`` and the attachment survive the object's eviction
    (hibernation): ``state.get_websockets()`` returns these same sockets to the next
    instance.
    """

    __slots__ = ("_peer", "_host", "_key", "tags", "_attachment", "ready_state", "_server",
                 "__weakref__")

    def __init__(self, server: bool = True) -> None:
        self._peer: WebSocket | None = None
        self._host: Any = None  # the object process's record keeper, once accepted
        self._key: tuple[bytes, int] | None = None  # (client, channel) once accepted
        self.tags: tuple[str, ...] = ()
        self._attachment: bytes | None = None
        self.ready_state = CONNECTING
        self._server = server

    def _live(self) -> Any:
        if not self._server:
            raise WebSocketError("this is the client end of the pair: return it in "
                                 "Response(status=101, websocket=client) and use the other end")
        if self._host is None:
            raise WebSocketError("accept the socket first: self.state.accept_websocket(server)")
        self._host.check_live()
        return self._host

    def send(self, message: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message."""
        host = self._live()
        if isinstance(message, str):
            kind, data = EV_TEXT, host.encode(message)  # (one bytes for a broadcast's sends)
        elif isinstance(message, bytes):
            kind, data = EV_BINARY, message
        elif isinstance(message, (bytearray, memoryview)):
            kind, data = EV_BINARY, bytes(message)
        else:
            raise TypeError(f"a WebSocket message is str or bytes, not {type(message).__name__}")
        if self.ready_state != OPEN:
            raise WebSocketError(f"the WebSocket is {_STATES[self.ready_state]}: nothing can be "
                                 "sent on it")
        if len(data) > host.max_message:
            raise ValueError(f"a WebSocket message is at most {host.max_message} bytes, this one "
                             f"is {len(data)} (websocket_max_message_kb)")
        host.send(self, kind, data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket; the peer gets ``code`` and ``reason``. Closing twice does nothing."""
        host = self._live()
        data = check_close(code, reason)
        if self.ready_state in (CLOSING, CLOSED):
            return
        host.close(self, code, data)

    def serialize_attachment(self, value: Any) -> None:
        """Keep ``value`` (a storage value, at most 2,048 bytes encoded) with the socket:
        it survives hibernation, unlike the instance's attributes."""
        data = codec.encode(value)
        if len(data) > MAX_ATTACHMENT:
            raise ValueError(f"a WebSocket attachment is at most {MAX_ATTACHMENT} bytes encoded, "
                             f"this one is {len(data)}")
        self._attachment = data

    def deserialize_attachment(self) -> Any:
        """The value last given to ``serialize_attachment`` (``None`` if none)."""
        return None if self._attachment is None else codec.decode(self._attachment)

    def __repr__(self) -> str:
        if not self._server:
            return "<WebSocket client end>"
        return f"<WebSocket {_STATES[self.ready_state]} tags={list(self.tags)}>"


_STATES = {CONNECTING: "connecting", OPEN: "open", CLOSING: "closing", CLOSED: "closed"}


class WebSocketPair(tuple[WebSocket, WebSocket]):
    """``client, server = durable.WebSocketPair()``: return ``client`` in the 101 response,
    accept and keep ``server``."""

    def __new__(cls) -> WebSocketPair:
        client, server = WebSocket(server=False), WebSocket()
        client._peer, server._peer = server, client
        return super().__new__(cls, (client, server))

    @property
    def client(self) -> WebSocket:
        return self[0]

    @property
    def server(self) -> WebSocket:
        return self[1]


def check_tags(tags: Any) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str):
        raise TypeError("tags is a list of str, not a str (tags=['room-1'])")
    out = tuple(tags)
    if len(out) > MAX_TAGS:
        raise ValueError(f"a WebSocket has at most {MAX_TAGS} tags, got {len(out)}")
    for t in out:
        if type(t) is not str or not t or len(t) > MAX_TAG:
            raise ValueError(f"a tag is a non-empty str of at most {MAX_TAG} characters, got {t!r:.60}")
    return out


# -- the caller's end -------------------------------------------------------------------
class ClientWebSocket:
    """A WebSocket to an object, from ``stub.websocket(path)`` (no HTTP involved).

    ``await ws.send(str | bytes)``; ``async for message in ws`` until it closes
    (``close_code``/``close_reason`` say how); ``await ws.close()``. Messages that
    arrive and are not read are held up to ``max_buffered`` bytes; past that the
    socket is closed with 1008 (a reader that does not read must not grow memory).
    """

    def __init__(self, channel: Any, response_headers: Any, max_buffered: int) -> None:
        self._channel = channel
        self.headers = response_headers
        self._queue: collections.deque[str | bytes] = collections.deque()
        self._held = 0
        self._max_buffered = max_buffered
        self._waiter: asyncio.Future[None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        channel.attach(self)

    # the channel's sink
    def on_message(self, kind: bytes, payload: bytes) -> None:
        if self.close_code is not None:
            return
        msg: str | bytes = payload.decode("utf-8", "replace") if kind == EV_TEXT else bytes(payload)
        self._held += len(payload)
        if self._held > self._max_buffered:
            self._channel.close_from_here(1008, "message buffer overflow: the client did not "
                                                "read", clean=False)
            self.on_close(1008, f"more than {self._max_buffered} bytes arrived unread")
            return
        self._queue.append(msg)
        self._wake()

    def on_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def send(self, message: str | bytes) -> None:
        """Send a message; it is one ``websocket_message`` call of the object, in order."""
        if isinstance(message, str):
            kind, data = EV_TEXT, message.encode()
        elif isinstance(message, (bytes, bytearray, memoryview)):
            kind, data = EV_BINARY, bytes(message)
        else:
            raise TypeError(f"a WebSocket message is str or bytes, not {type(message).__name__}")
        if self.close_code is not None:
            raise WebSocketError(f"the WebSocket closed ({self.close_code} {self.close_reason})")
        if len(data) > self._channel.max_message:
            raise ValueError(f"a WebSocket message is at most {self._channel.max_message} bytes, "
                             f"this one is {len(data)}")
        await self._channel.send(kind, data)

    async def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message; ``WebSocketError`` once the socket has closed."""
        async with asyncio.timeout(timeout):
            while not self._queue:
                if self.close_code is not None:
                    raise WebSocketError(f"the WebSocket closed ({self.close_code} "
                                         f"{self.close_reason})".rstrip())
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        msg = self._queue.popleft()
        self._held -= len(msg)
        return msg

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.receive()
            except WebSocketError:
                return

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket: the object's ``websocket_close`` hears ``code`` and ``reason``."""
        check_close(code, reason)
        if self.close_code is None:
            self._channel.close_from_here(code, reason, clean=True)
            self.on_close(code, reason)

    async def __aenter__(self) -> ClientWebSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class WebSocketConnect:
    """``stub.websocket(path)``: ``async with`` it, or ``await`` it, for a ClientWebSocket."""

    def __init__(self, stub: Stub, request: Request, max_buffered: int) -> None:
        self._stub = stub
        self._request = request
        self._max_buffered = max_buffered
        self._ws: ClientWebSocket | None = None

    def __await__(self) -> Any:
        return self._open().__await__()

    async def _open(self) -> ClientWebSocket:
        client = self._stub._client
        channel = client.open_channel()
        self._request._upgrade = channel
        try:
            resp = await self._stub.fetch(self._request)
        except BaseException:
            channel.discard()
            raise
        if resp.status != 101 or resp.websocket is not channel:
            channel.discard()
            raise WebSocketError(
                f"{self._stub.namespace} {self._stub.id} did not accept the WebSocket: it "
                f"answered {resp.status} (an object accepts with state.accept_websocket(server) "
                "and returns Response(status=101, websocket=client))", resp.status,
                resp.body if not resp.streaming else b"")
        self._ws = ClientWebSocket(channel, resp.headers, self._max_buffered)
        return self._ws

    async def __aenter__(self) -> ClientWebSocket:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()


# -- the client's record of one channel ------------------------------------------------
class Channel:
    """A WebSocket this client holds, whoever reads it (the gateway, a ClientWebSocket).

    Messages from the object reach ``sink`` (``on_message``/``on_close``); the ones
    that arrive before it is bound (sent while the upgrade call ran) wait in order.
    Messages to the object are calls on the stub that opened it (E-order), at most
    ``window`` unanswered at once.
    """

    __slots__ = ("client", "id", "stub", "sink", "_early", "auto", "_inflight", "state",
                 "max_message", "window")

    def __init__(self, client: Any, channel_id: int, max_message: int = MAX_MESSAGE,
                 window: int = 64) -> None:
        self.client = client
        self.id = channel_id
        self.stub: Stub | None = None
        self.sink: Any = None
        self._early: list[tuple[bytes, bytes]] | None = []
        self.auto: tuple[str, str] | None = None
        self._inflight: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.state = CONNECTING
        self.max_message = max_message
        self.window = window

    def bind(self, stub: Stub) -> None:
        """The upgrade call returned 101 (called before any later message is handled)."""
        self.stub = stub
        self.state = OPEN

    def attach(self, sink: Any) -> None:
        self.sink = sink
        early, self._early = self._early, None
        for kind, payload in early or ():
            self.deliver(kind, payload)

    def deliver(self, kind: bytes, payload: bytes) -> None:
        if kind == OUT_AUTO:
            pair = orjson.loads(payload)
            self.auto = None if pair is None else (pair[0], pair[1])
            return
        if self._early is not None:
            self._early.append((kind, payload))
            return
        if kind == OUT_CLOSE:
            code, reason = orjson.loads(payload)
            self._ended()
            self.sink.on_close(code, reason)
        elif self.state == OPEN:
            self.sink.on_message(kind, payload)

    def lost(self, code: int, reason: str) -> None:
        """The socket is gone without a close handshake (1012: the object's process
        restarted; 1001/1006: this side is going away)."""
        if self.state == CLOSED:
            return
        self._ended()
        if self.sink is not None:
            self.sink.on_close(code, reason)
        elif self._early is not None:
            self._early.append((OUT_CLOSE, orjson.dumps([code, reason])))

    def _ended(self) -> None:
        self.state = CLOSED
        self.client._channels.pop(self.id, None)

    def discard(self) -> None:
        """The upgrade did not happen: forget the channel."""
        self.state = CLOSED
        self.client._channels.pop(self.id, None)

    async def send(self, kind: bytes, data: bytes) -> None:
        """Deliver a message to the object (waits while ``window`` are unanswered)."""
        if self.auto is not None and kind == EV_TEXT and data == self.auto[0].encode():
            self.sink.on_message(EV_TEXT, self.auto[1].encode())
            return
        if self.state != OPEN:
            raise WebSocketError("the WebSocket is closed")
        await self.room()
        gate = OUTPUT_GATE.get()
        if gate is not None:  # inside an object: its earlier writes become durable first
            await gate()
        fut = self.client._event(self, kind, data)
        if fut is not None:
            self._inflight.append(fut)
            fut.add_done_callback(self._answered)

    def send_nowait(self, kind: bytes, data: bytes) -> bool:
        """``send`` when the window has room (the gateway's reader); False when full."""
        if self.auto is not None and kind == EV_TEXT and data == self.auto[0].encode():
            self.sink.on_message(EV_TEXT, self.auto[1].encode())
            return True
        if self.state != OPEN or len(self._inflight) >= self.window:
            return False
        fut = self.client._event(self, kind, data)
        if fut is not None:
            self._inflight.append(fut)
            fut.add_done_callback(self._answered)
        return True

    async def room(self) -> None:
        """Wait until another message may be sent."""
        inflight = self._inflight
        while len(inflight) >= self.window:
            first = inflight[0]
            if first.done():  # (its callback, which removes it, may not have run yet)
                inflight.popleft()
                continue
            await asyncio.wait([first])

    def _answered(self, fut: asyncio.Future[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._inflight.remove(fut)
        if fut.cancelled():
            return
        err = fut.exception()
        if isinstance(err, StubBrokenError):
            self.lost(1012, "the object's process restarted")
        elif isinstance(err, (OverloadedError, CallTimeoutError)):
            # The message may not have reached the object: never drop one silently. The
            # socket closes (1013: try again later; 1011: it did not answer) and the object
            # hears why; an error of the object's own handler leaves the socket open.
            code, why = ((1013, "the object is overloaded; reconnect later")
                         if isinstance(err, OverloadedError)
                         else (1011, "the object did not answer in time"))
            self.close_from_here(code, why, clean=False)
            if self.sink is not None:
                self.sink.on_close(code, why)

    def close_from_here(self, code: int, reason: str, *, clean: bool) -> asyncio.Future[Any] | None:
        """This side closed (the browser, the Python caller): the object hears of it (the
        future answers once it has)."""
        if self.state == CLOSED:
            return None
        self._ended()
        if self.stub is None:
            return None
        return self.client._event(self, EV_CLOSE, b"", code=code, reason=reason, was_clean=clean)

    def error_from_here(self, message: str) -> None:
        if self.state == OPEN and self.stub is not None:
            self.client._event(self, EV_ERROR, message.encode())
