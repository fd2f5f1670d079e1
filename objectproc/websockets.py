"""An object process's WebSockets and streamed bodies: records, not sockets.

The sockets themselves live with the caller (the gateway, a Python client);
this process keeps, per object, a record of each accepted one
(``ObjectSockets``: the ``WebSocket`` objects with their tags and attachment),
and that record outlives the object's activations. So an object whose only
activity is open sockets is evicted like any idle object (hibernation), and
the next message activates it with ``state.get_websockets()`` intact. The
records die with the process: a restart closes every socket (1012, the
broker's BROKEN), as documented.

Everything an object sends (messages, closes, stream chunks) goes through the
process's ``Outbox``: in the order sent, each held until the writes its object
made before sending it are durable (the output gate), and batched so that one
payload sent to many sockets of one client crosses the broker once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from durable.errors import ObjectEvictedError, WebSocketError
from durable.http import Request, Response
from durable.protocol.messages import (
    EV_CLOSE,
    EV_ERROR,
    OUT_AUTO,
    OUT_CLOSE,
    OUT_DATA,
    OUT_END,
    OUT_FAIL,
    ChannelEvent,
    WorkerSend,
)
from durable.streams import STREAM_WINDOW
from durable.websocket import CLOSED, CLOSING, OPEN, WebSocket, check_tags

from .context import CURRENT

__all__ = ["ObjectSockets", "Sockets", "Outbox", "SocketEvent", "UPGRADE", "MAX_PER_OBJECT"]

log = logging.getLogger("durable.objectproc")

#: (client, channel) of the upgrade request the running fetch handles, if any
UPGRADE: contextvars.ContextVar[tuple[bytes, int] | None] = contextvars.ContextVar(
    "durable_upgrade", default=None)
#: sockets one object may hold at once (Cloudflare's limit)
MAX_PER_OBJECT = 32_768
_CHUNK = 256 << 10  # a streamed chunk larger than this crosses in pieces


class SocketEvent:
    """A message, close or error on one of an object's sockets: one call of the object."""

    __slots__ = ("event", "ws")

    def __init__(self, event: ChannelEvent, ws: WebSocket) -> None:
        self.event = event
        self.ws = ws


class Outbox:
    """What this process's objects send on channels, in order, behind the output gate."""

    def __init__(self, send: Callable[[list[bytes]], None]) -> None:
        self._send = send
        #: (gate, client, channel, kind, payload); gate: a future of the writes' durability
        self._queue: deque[tuple[asyncio.Future[Any] | None, bytes, int, bytes, bytes]] = deque()
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.sent = 0

    def put(self, gate: asyncio.Future[Any] | None, client: bytes, channel: int, kind: bytes,
            payload: bytes) -> None:
        self._queue.append((gate, client, channel, kind, payload))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self, _: Any = None) -> None:
        """Send everything whose gate is open; a batch is one payload to many channels of
        one client (a broadcast)."""
        self._scheduled = False
        q = self._queue
        while q:
            gate, client, channel, kind, payload = q[0]
            if gate is not None:
                if not gate.done():
                    self._scheduled = True
                    gate.add_done_callback(self.flush)
                    return
                if gate.cancelled() or gate.exception() is not None:
                    q.popleft()  # its writes were not stored: what followed them is not sent
                    continue
            q.popleft()
            channels = [channel]
            while q and q[0][1] == client and q[0][3] == kind and q[0][4] is payload and (
                    q[0][0] is None or q[0][0] is gate):
                channels.append(q.popleft()[2])
            self.sent += len(channels)
            self._send(WorkerSend(client, channels, kind, payload).encode())


class ObjectSockets:
    """One object's accepted sockets and auto-response; outlives its activations."""

    __slots__ = ("registry", "key", "sockets", "auto", "owner")

    def __init__(self, registry: Sockets, key: tuple[str, str]) -> None:
        self.registry = registry
        self.key = key
        self.sockets: dict[tuple[bytes, int], WebSocket] = {}
        self.auto: tuple[str, str] | None = None
        self.owner: Any = None  # the live activation (its instance may send)

    @property
    def max_message(self) -> int:
        return self.registry.max_message

    def encode(self, text: str) -> bytes:
        return self.registry.encode(text)

    def check_live(self) -> None:
        act = CURRENT.get()
        if act is not None and (act is not self.owner or not act.live):
            raise ObjectEvictedError("this instance was evicted or reset: it can no longer send "
                                     "on the object's WebSockets (the next instance can)")

    def accept(self, ws: Any, tags: Any) -> None:
        if not isinstance(ws, WebSocket) or not ws._server:
            raise TypeError("accept_websocket() takes the server end of a WebSocketPair "
                            "(client, server = durable.WebSocketPair())")
        if ws._host is not None:
            raise WebSocketError("this WebSocket was already accepted")
        key = UPGRADE.get()
        if key is None:
            raise WebSocketError("accept_websocket() works only while fetch() handles a "
                                 "WebSocket upgrade request (Upgrade: websocket) from the "
                                 "gateway or from stub.websocket()")
        if key in self.sockets:
            raise WebSocketError("this upgrade request already accepted a WebSocket")
        if len(self.sockets) >= MAX_PER_OBJECT:
            raise WebSocketError(f"this object holds {len(self.sockets)} WebSockets (the limit "
                                 f"is {MAX_PER_OBJECT}); close some first")
        ws.tags = check_tags(tags)
        ws._host, ws._key, ws.ready_state = self, key, OPEN
        self.sockets[key] = ws
        self.registry.track(key[0], self)
        if self.auto is not None:
            self.registry.outbox.put(None, key[0], key[1], OUT_AUTO, orjson.dumps(self.auto))

    def settle(self, key: tuple[bytes, int], resp: Any, error: BaseException | None) -> BaseException | None:
        """After an upgrade's fetch: keep its socket if it answered 101 with it, else drop it.

        Returns the error the caller gets instead, if the 101 was wrong."""
        ws = self.sockets.get(key)
        if error is None and isinstance(resp, Response) and resp.websocket is not None:
            peer = resp.websocket
            if ws is None or peer._peer is not ws:
                error = WebSocketError("fetch returned a 101 whose websocket was not accepted: "
                                       "call self.state.accept_websocket(server) on the other "
                                       "end of its WebSocketPair first")
            else:
                return None
        if ws is not None:  # not upgraded after all: the socket never opened
            self.drop(ws)
        return error

    def send(self, ws: WebSocket, kind: bytes, payload: bytes) -> None:
        client, channel = ws._key
        self.registry.outbox.put(self.owner.outbound_gate() if self.owner is not None else None,
                                 client, channel, kind, payload)

    def close(self, ws: WebSocket, code: int, reason: bytes) -> None:
        client, channel = ws._key
        self.send(ws, OUT_CLOSE, orjson.dumps([code, reason.decode()]))
        self.drop(ws)

    def drop(self, ws: WebSocket) -> None:
        ws.ready_state = CLOSED
        if self.sockets.pop(ws._key, None) is not None:
            self.registry.untrack(ws._key[0], self)

    def get(self, tag: str | None) -> list[WebSocket]:
        if tag is None:
            return [ws for ws in self.sockets.values() if ws.ready_state == OPEN]
        return [ws for ws in self.sockets.values() if ws.ready_state == OPEN and tag in ws.tags]

    def set_auto(self, request: Any, response: Any) -> None:
        if request is None and response is None:
            self.auto = None
        else:
            if type(request) is not str or type(response) is not str or not request:
                raise TypeError("set_websocket_auto_response(request, response) takes two str "
                                "(a text message and its answer), or neither to remove it")
            if len(request.encode()) > 2048 or len(response.encode()) > 2048:
                raise ValueError("an auto-response's request and response are at most 2,048 "
                                 "bytes each")
            self.auto = (request, response)
        payload = orjson.dumps(self.auto)
        for client, channel in list(self.sockets):
            self.registry.outbox.put(None, client, channel, OUT_AUTO, payload)


class _Stream:
    __slots__ = ("task", "unacked", "waiter")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.unacked = 0
        self.waiter: asyncio.Future[None] | None = None


class Sockets:
    """Every object's socket records in this process, and the streams it produces."""

    def __init__(self, outbox: Outbox, max_message: int) -> None:
        self.outbox = outbox
        self.max_message = max_message
        self.objects: dict[tuple[str, str], ObjectSockets] = {}
        #: client -> its objects with sockets (a client that leaves closes them all)
        self._by_client: dict[bytes, dict[tuple[str, str], int]] = {}
        self.streams: dict[tuple[bytes, int], _Stream] = {}
        self._text: str | None = None
        self._data = b""

    def encode(self, text: str) -> bytes:
        """``text`` as UTF-8; the same bytes object for the same str sent again (a broadcast
        sends one str to every socket: the outbox batches sends of one payload object)."""
        if text is not self._text:
            self._text, self._data = text, text.encode()
        return self._data

    def of(self, key: tuple[str, str]) -> ObjectSockets:
        obj = self.objects.get(key)
        if obj is None:
            obj = self.objects[key] = ObjectSockets(self, key)
        return obj

    def track(self, client: bytes, obj: ObjectSockets) -> None:
        per = self._by_client.setdefault(client, {})
        per[obj.key] = per.get(obj.key, 0) + 1

    def untrack(self, client: bytes, obj: ObjectSockets) -> None:
        per = self._by_client.get(client)
        if per is not None:
            n = per.get(obj.key, 0) - 1
            if n > 0:
                per[obj.key] = n
            else:
                per.pop(obj.key, None)
                if not per:
                    del self._by_client[client]
        if not obj.sockets and obj.auto is None and obj.owner is None:
            self.objects.pop(obj.key, None)

    def released(self, obj: ObjectSockets) -> None:
        """Its activation was evicted: keep the record only if it still matters."""
        obj.owner = None
        if not obj.sockets and obj.auto is None:
            self.objects.pop(obj.key, None)

    def find(self, key: tuple[str, str], client: bytes, channel: int) -> WebSocket | None:
        obj = self.objects.get(key)
        return None if obj is None else obj.sockets.get((client, channel))

    def client_gone(self, client: bytes) -> list[tuple[tuple[str, str], WebSocket]]:
        """The sockets of a client that left (the caller tells their objects: 1006), and
        its streams are cancelled."""
        out = []
        for key in list(self._by_client.pop(client, {})):
            obj = self.objects.get(key)
            if obj is None:
                continue
            for (c, _), ws in list(obj.sockets.items()):
                if c == client:
                    ws.ready_state = CLOSING
                    out.append((key, ws))
        for skey in [k for k in self.streams if k[0] == client]:
            self.cancel_stream(skey)
        return out

    def forget_all(self) -> list[tuple[tuple[str, str], WebSocket]]:
        """Every socket, dropped (the process re-registered), and every stream cancelled."""
        out = []
        for key, obj in list(self.objects.items()):
            for ws in list(obj.sockets.values()):
                obj.drop(ws)
                out.append((key, ws))
        for skey in list(self.streams):
            self.cancel_stream(skey)
        return out

    @property
    def count(self) -> int:
        return sum(len(o.sockets) for o in self.objects.values())

    # -- streamed bodies ----------------------------------------------------------------
    def stream(self, act: Any, client: bytes, call_id: int, body: Any) -> None:
        """Send ``body``'s chunks on channel ``call_id`` (after the response head)."""
        st = _Stream()
        key = (client, call_id)
        self.streams[key] = st
        st.task = act.own_task(self._produce(act, key, st, body))

    async def _produce(self, act: Any, key: tuple[bytes, int], st: _Stream, body: Any) -> None:
        client, channel = key
        try:
            async for chunk in body:
                data = chunk.encode() if isinstance(chunk, str) else chunk
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(f"a streamed body yields bytes or str, not "
                                    f"{type(chunk).__name__}")
                data = bytes(data)
                await act.gate()
                for i in range(0, len(data), _CHUNK):
                    piece = data[i:i + _CHUNK]
                    while st.unacked and st.unacked + len(piece) > STREAM_WINDOW:
                        st.waiter = asyncio.get_running_loop().create_future()
                        await st.waiter
                    st.unacked += len(piece)
                    self.outbox.put(None, client, channel, OUT_DATA, piece)
            await act.gate()
            self.outbox.put(None, client, channel, OUT_END, b"")
        except asyncio.CancelledError:
            pass  # the reader left (or the object was evicted): nothing more is sent
        except Exception as e:
            act.report(e, None, e, "a streamed body")
            self.outbox.put(None, client, channel, OUT_FAIL, f"{type(e).__name__}: {e}".encode())
        finally:
            self.streams.pop(key, None)
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass

    def credit(self, client: bytes, channel: int, n: int) -> None:
        st = self.streams.get((client, channel))
        if st is not None:
            st.unacked = max(0, st.unacked - n)
            if st.waiter is not None and not st.waiter.done():
                st.waiter.set_result(None)

    def cancel_stream(self, key: tuple[bytes, int]) -> None:
        st = self.streams.get(key)
        if st is not None and st.task is not None:
            st.task.cancel()


def event_close(code: int = 1006, reason: str = "", was_clean: bool = False) -> ChannelEvent:
    return ChannelEvent(EV_CLOSE, 0, code=code, reason=reason, was_clean=was_clean)


def event_error(message: str) -> ChannelEvent:
    return ChannelEvent(EV_ERROR, 0, message)


def is_upgrade(request: Any) -> bool:
    return type(request) is Request and request._upgrade is not None
