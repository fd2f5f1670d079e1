"""The HTTP gateway: the front door any HTTP client can use (`python -m durable.broker.gateway`).

aiohttp parses HTTP (a well-kept asyncio server; we never parse HTTP
ourselves); each request becomes a ``durable.Request`` and then either

* goes to the configured Worker, ``async def fetch(request, env) -> Response``,
  where ``env`` holds the namespace bindings and ``env.vars`` exactly as object
  code sees them; or
* is routed by path: ``/<NAMESPACE>/<name>/<rest>`` reaches
  ``id_from_name(name)`` and ``/<NAMESPACE>/id/<64 hex>/<rest>`` reaches
  ``id_from_string``; the object receives the full URL, method, headers, body.

Errors become HTTP statuses:

========================  ======================================
unknown namespace         404
invalid id                400
header not UTF-8          400
``ObjectError``           500 "object error" (type and message with ``debug``)
``CpuLimitError``         503 with ``Retry-After`` (the object was reset)
``StubBrokenError``       503 with ``Retry-After`` (not retried: the call may have run)
``OverloadedError``       503 with ``Retry-After`` (also: over a namespace, object or byte bound)
``StorageFullError``      507 with ``Retry-After`` (the write was certainly not stored)
``StorageCommitError``    503 (its text says whether the write may have been stored)
``CallTimeoutError``      504
body over the limit       413
body not sent in time     408
========================  ======================================

**WebSockets** (docs/objects.md, "WebSockets"): an upgrade request reaches the
object like any other, with a channel the gateway opened for it; if the object
answers 101 with the client end of a ``WebSocketPair``, aiohttp completes the
handshake and the gateway pumps frames: each message from the browser is an
event call on the stub that upgraded (in order, at most ``Channel.window``
unanswered, then the browser waits), and what the object sends arrives on the
gateway's connection to the broker and is written here. The socket costs the
object nothing while it is idle (hibernation). An auto-response is answered here.

**Streamed bodies** are written chunk by chunk (chunked transfer, each chunk
flushed: Server-Sent Events work); a client that goes away cancels the producer.

The supervisor binds the port and passes the listening socket (``--fd``); several
gateway processes accept from that one socket to use more cores (gunicorn's
model), and no other process can share the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import HttpVersion11, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

import durable
from durable.errors import (
    CallTimeoutError,
    CpuLimitError,
    InvalidIdError,
    ObjectError,
    OverloadedError,
    StorageCommitError,
    StorageFullError,
    StubBrokenError,
    UnknownNamespaceError,
)
from durable.exitcodes import EXIT_CONFIG
from durable.ids import load_or_create_secret, namespace_key
from durable.objects import Env, load_function
from durable.peers import PeerRoutes, peer_endpoint
from durable.protocol.messages import EV_BINARY, EV_TEXT
from durable.supervisor import lifeline, logs
from durable.supervisor.config import Config, ConfigError, settings_from_args
from durable.websocket import MAX_MESSAGE, OPEN, Channel

from .ring import Ring

__all__ = ["Front", "Gateway", "main"]

log = logging.getLogger("durable.gateway")
#: one line per request with ``[http] access_log = true``
access = logging.getLogger("durable.gateway.access")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
_STUB_CACHE = 10_000
#: the longest name or request target the route and URL memories keep (a longer one is worked
#: out each time: 10,000 entries of up to 8 KB each would be ~160 MB)
_REMEMBERED_MAX = 512
#: request targets and hosts whose URL yarl leaves as written (``plain_url``)
_PLAIN_TARGET = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?]+)?")
_PLAIN_HOST = re.compile(
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::([1-9][0-9]{0,4}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LARGE_RESPONSE = 64 << 10  # responses from this size count against the byte bound
CALL_TIMEOUT = 30.0  # seconds a request waits for its object (then 504)


def plain_url(scheme: str, host: str, target: str) -> str | None:
    """The request's URL as aiohttp's ``str(request.url)`` gives it, when that is the text
    as written: an origin-form target with nothing yarl would normalize (a percent escape,
    a dot segment, an empty query, a fragment, a leading ``//``, other characters) under a lowercase host
    whose port is not the scheme's default. Else None (pure: tested against aiohttp)."""
    if _PLAIN_TARGET.fullmatch(target) is None or "/." in target.partition("?")[0] \
            or target.startswith("//"):  # (yarl may read "//x" as an authority)
        return None
    m = _PLAIN_HOST.fullmatch(host)
    if m is None:
        return None
    port = m.group(1)
    if port is not None and (int(port) > 65535 or int(port) == _DEFAULT_PORTS.get(scheme)):
        return None
    return f"{scheme}://{host}{target}"


class ClientFaults(logging.Filter):
    """aiohttp logs a request it cannot parse, and a client that hangs up while its body is
    read, as an ERROR with a traceback (a port scanner or a client's timeout would fill
    ``journalctl -p err``). Those are the client's doing and the client got its 400 (or left):
    they become one INFO line each, without the traceback. Errors in the server's own code
    stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and isinstance(
                exc, (HttpProcessingError, ConnectionResetError)):
            what = "%s: the client's request could not be parsed (answered 400): %s" \
                if isinstance(exc, HttpProcessingError) else \
                "%s: the client hung up before its request was read (%s)"
            record.msg, record.args = what, (record.getMessage(), " ".join(str(exc).split())[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


#: the logger aiohttp's server writes to: through ``ClientFaults``
server_log = logging.getLogger("durable.http.server")
server_log.addFilter(ClientFaults())


@dataclass
class Bounds:
    """What one gateway process lets in at once (docs/operating.md, "Bounds and overload").

    Requests to one namespace, or one object, cannot take the whole budget the
    broker gives this process's client: past these bounds they get 503 at once
    and the other namespaces are served as usual.
    """

    per_namespace: int = 4000
    per_object: int = 1000
    max_bytes: int = 256 << 20  # request bodies held, plus large responses being written
    namespaces: Counter[str] = field(default_factory=Counter)
    objects: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: int = 0

    def check_bytes(self, n: int) -> None:
        """OverloadedError if ``n`` more bytes would not fit now."""
        if n and self.bytes + n > self.max_bytes:
            raise OverloadedError(
                f"the gateway holds {self.bytes >> 20} MiB of request and response bodies (the "
                f"limit, http.max_inflight_mb, is {self.max_bytes >> 20} MiB); retry shortly")

    def take_bytes(self, n: int) -> None:
        self.check_bytes(n)
        self.bytes += n

    def enter(self, namespace: str, object_id: str) -> tuple[str, str]:
        """Count a request in (OverloadedError past a bound); :meth:`leave` counts it out."""
        key = (namespace, object_id)
        if self.namespaces[namespace] >= self.per_namespace:
            raise OverloadedError(f"namespace {namespace} has {self.per_namespace} requests in "
                                  "flight through this gateway (http.max_inflight_per_namespace)")
        if self.objects[key] >= self.per_object:
            raise OverloadedError(f"this object has {self.per_object} requests in flight through "
                                  "this gateway (http.max_inflight_per_object)")
        self.namespaces[namespace] += 1
        self.objects[key] += 1
        return key

    def leave(self, key: tuple[str, str]) -> None:
        for counter, k in ((self.namespaces, key[0]), (self.objects, key)):
            n = counter[k] - 1
            if n:
                counter[k] = n
            else:
                del counter[k]


class Gateway:
    def __init__(self, client: durable.Client, env: Env, *, worker: Any = None,
                 read_timeout: float = 30.0, debug: bool = False,
                 bounds: Bounds | None = None, max_websockets: int = 20_000,
                 websocket_max_message: int = MAX_MESSAGE,
                 websocket_max_buffer: int = 4 << 20, access_log: bool = False) -> None:
        self.client = client
        self.access_log = access_log
        self.env = env
        self.worker = worker
        self.read_timeout = read_timeout
        self.debug = debug
        self.bounds = bounds or Bounds()
        self._stubs: OrderedDict[tuple[str, str], durable.Stub] = OrderedDict()
        #: (namespace, name or id, by name) as the path has them -> the namespace and id
        self._routes: dict[tuple[str, str, bool], tuple[durable.Namespace, Any, str]] = {}
        #: (scheme, Host, method, request target) -> the request's URL as text
        self._urls: dict[tuple[str, str, str, str], str] = {}
        self.max_websockets = max_websockets
        self.websocket_max_message = websocket_max_message
        self.websocket_max_buffer = websocket_max_buffer
        self.sockets: set[_Socket] = set()
        self._upgrading: set[Channel] = set()  # upgrade requests not yet answered

    def _stub(self, ns: durable.Namespace, oid: durable.ObjectId,
              hex_id: str | None = None) -> durable.Stub:
        key = (ns.name, hex_id or str(oid))
        stub = self._stubs.get(key)
        if stub is None or stub._broken is not None or (
                stub._peer is None and not stub._local and self.client.peers is not None
                and self.client.peers.link_for(key[1]) is not None):
            # (a stub made before its slot's link was up: requests are independent, so the
            # next one may take the link)
            stub = self._stubs[key] = ns.get(oid)
            if len(self._stubs) > _STUB_CACHE:
                self._stubs.popitem(last=False)
        return stub

    async def route(self, req: durable.Request, path: str) -> durable.Response:
        parts = path.split("/", 3)
        if len(parts) < 3 or not parts[1]:
            raise UnknownNamespaceError(
                f"no such route {path!r}: use /<NAMESPACE>/<name>/... or /<NAMESPACE>/id/<id>/... "
                f"(namespaces: {', '.join(self.client.namespaces)})")
        named = parts[2] != "id" or len(parts) < 4
        key = (parts[1], parts[2] if named else parts[3].split("/", 1)[0], named)
        route = self._routes.get(key)
        if route is None:  # (an HMAC and a namespace lookup: done once per object)
            ns = self.client.namespace(unquote(parts[1]))
            try:
                oid = ns.id_from_name(unquote(key[1])) if named else ns.id_from_string(key[1])
            except InvalidIdError as e:
                if named:  # (a name too long to make an id)
                    raise
                # (the segment `id` followed by a path is the by-id form, whatever comes next)
                raise InvalidIdError(
                    f"{e}. /{parts[1]}/id/<id>/... names an object by its id; an object named "
                    f"\"id\" is reached at /{parts[1]}/id/<its id>/... (or /{parts[1]}/id alone)"
                ) from None
            route = (ns, oid, str(oid))
            if len(key[1]) <= _REMEMBERED_MAX:  # (a long name is not kept: bounded bytes)
                if len(self._routes) >= _STUB_CACHE:
                    self._routes.clear()
                self._routes[key] = route
        ns, oid, hex_id = route
        key = self.bounds.enter(ns.name, hex_id)  # (not a context manager: per request)
        try:
            return await self._stub(ns, oid, hex_id).fetch(req)
        finally:
            self.bounds.leave(key)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The body, counted against the byte bound as it arrives: a client holds only what it
        has sent. (Reserving a declared length up front let eight clients that declared 32 MiB
        and sent nothing refuse every other body with 503 for the 30 s of ``read_timeout``.)
        A declared length over ``max_body_bytes`` gets 413, and one that does not fit the bound
        now 503, before a byte is read."""
        limit = request._client_max_size
        declared = request.content_length
        if declared is not None:
            if declared > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
            self.bounds.check_bytes(declared)
        chunks, held = [], 0
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.content.iter_any():
                    self.bounds.take_bytes(len(chunk))
                    held += len(chunk)
                    if held > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=held)
                    chunks.append(chunk)
        finally:
            self.bounds.bytes -= held
        return b"".join(chunks)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self.access_log:
            return await self._handle(request)
        started = time.perf_counter()
        resp: web.StreamResponse | None = None
        try:
            resp = await self._handle(request)
            return resp
        finally:
            status = resp.status if resp is not None else 500
            size = 0
            if resp is not None:  # (a Response is written after this: count its body)
                body = resp.body if isinstance(resp, web.Response) else None
                size = len(body) if isinstance(body, (bytes, bytearray)) else resp.body_length
            parts = request.path.split("/", 3)  # the object, when routed by path
            obj = f"{parts[1]}/{unquote(parts[2])}" if self.worker is None and len(parts) > 2 \
                else "-"
            access.info("%s %s %d %d %.1fms %s %s", request.method, request.path_qs, status,
                        size, (time.perf_counter() - started) * 1000, obj,
                        request.headers.get("x-forwarded-for") or request.remote or "-")

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            if request.content_length == 0 or (request.content_length is None
                                               and not request.body_exists):
                body = b""
            else:
                body = await self._read_body(request)
        except TimeoutError:
            return web.Response(status=408, text="request body not received in time\n")
        except web.HTTPRequestEntityTooLarge:
            # (the rest of the body is not read: the connection closes after the answer, so
            # that its bytes are not read as the next request)
            return web.Response(status=413, headers={"Connection": "close"},
                                text="request body too large\n")
        except OverloadedError as e:
            return web.Response(status=503, headers={"Retry-After": "1", "Connection": "close"},
                                text=f"{e}\n")
        try:
            headers = list(request.headers.items())
            for name, value in headers:  # aiohttp keeps undecodable bytes as surrogates
                if not (name.isascii() and _utf8(value)):
                    raise ValueError(f"header {name.encode(errors='replace')!r} is not valid "
                                     "UTF-8 (durable passes headers on as text)")
            req = durable.Request(self._url(request), method=request.method, headers=headers,
                                  body=body)
        except (TypeError, ValueError) as e:
            return web.Response(status=400, text=f"bad request: {e}\n")
        del body  # the Request holds it now; the bytes bound counted it while it was read
        channel = None
        if req.is_websocket and request.method == "GET":
            if len(self.sockets) + len(self._upgrading) >= self.max_websockets:
                return web.Response(status=503, headers={"Retry-After": "5"}, text=(
                    f"this gateway process holds {len(self.sockets)} WebSockets (the limit, "
                    f"http.max_websockets, is {self.max_websockets})\n"))
            channel = req._upgrade = self.client.open_channel(self.websocket_max_message)
            self._upgrading.add(channel)
        try:
            answer = await self._answer(request, req, channel)
        finally:
            if channel is not None:
                self._upgrading.discard(channel)
                if channel.stub is None:
                    channel.discard()  # not upgraded
        if type(answer) is not _Upgrade:
            return answer
        del req, headers  # (a socket lives long: hold nothing of its request)
        return await self._websocket(request, answer.channel, answer.headers)

    def _url(self, request: web.BaseRequest) -> str:
        """``str(request.url)``, remembered: a connection's requests repeat it. The URL is a
        function of the key (aiohttp parses the target by the method, for CONNECT's
        authority form). A URL not yet remembered (every request to a new object's) is
        joined as text where yarl would give the text as written (``plain_url``): yarl
        builds and joins two URLs for it, ~2.6 µs more."""
        target = request.raw_path
        if len(target) > _REMEMBERED_MAX:  # (the memory's bytes stay bounded: ~10 MB)
            return plain_url(request.scheme, request.host, target) or str(request.url)
        key = (request.scheme, request.host, request.method, target)
        url = self._urls.get(key)
        if url is None:
            url = plain_url(request.scheme, request.host, target) or str(request.url)
            if len(self._urls) >= _STUB_CACHE:
                self._urls.clear()
            self._urls[key] = url
        return url

    async def _answer(self, request: web.BaseRequest, req: durable.Request,
                      channel: Channel | None) -> web.StreamResponse | _Upgrade:
        try:
            if self.worker is not None:
                resp = await self.worker(req, self.env)
                if not isinstance(resp, durable.Response):
                    raise TypeError(f"the worker returned {type(resp).__name__}, not a durable.Response")
            else:
                resp = await self.route(req, request.path)
        except UnknownNamespaceError as e:
            return web.Response(status=404, text=f"{e}\n")
        except InvalidIdError as e:
            return web.Response(status=400, text=f"{e}\n")
        except CpuLimitError as e:  # the object was reset; a retry runs on a fresh instance
            return web.Response(status=503, headers={"Retry-After": "1"},
                                text=f"{e.remote_message}\n" if self.debug else
                                "the call ran over its CPU limit; the object was reset\n")
        except ObjectError as e:
            text = f"object error: {e.remote_type}: {e.remote_message}\n" if self.debug else "object error\n"
            return web.Response(status=500, text=text)
        except StubBrokenError:
            return web.Response(status=503, headers={"Retry-After": "1"},
                                text="the object restarted during the call; retry if it is safe\n")
        except OverloadedError as e:
            return web.Response(status=503, headers={"Retry-After": "1"}, text=f"{e}\n")
        except CallTimeoutError:
            return web.Response(status=504, text="the object did not answer in time\n")
        except StorageFullError as e:
            return web.Response(status=507, headers={"Retry-After": "5"}, text=f"{e}\n")
        except StorageCommitError as e:  # outcome "unknown": the client must not blindly retry
            return web.Response(status=503, text=f"{e}\n")
        except Exception as e:  # the Worker's own error
            log.warning("worker raised %s: %s", type(e).__name__, e)
            text = f"worker error: {type(e).__name__}: {e}\n" if self.debug else "worker error\n"
            return web.Response(status=500, text=text)
        headers = [(n, v) for n, v in resp.headers.items() if n.lower() not in _HOP_BY_HOP]
        if resp.status == 101:
            if channel is None or resp.websocket is not channel:
                log.warning("a 101 response without the request's WebSocket: answered 502")
                return web.Response(status=502, text="the object answered 101 without "
                                    "accepting this request's WebSocket\n")
            return _Upgrade(channel, headers)
        if resp.streaming:
            return await self._stream(request, resp, headers)
        out = web.Response(body=resp.body, status=resp.status, headers=headers)
        size = len(resp.body)
        if size < _LARGE_RESPONSE:
            return out
        try:  # a large body counts until it is written, so write it here
            self.bounds.take_bytes(size)
        except OverloadedError as e:
            return web.Response(status=503, headers={"Retry-After": "1"}, text=f"{e}\n")
        try:
            await out.prepare(request)
            await out.write_eof()
        finally:
            self.bounds.bytes -= size
        return out


    # -- WebSockets -------------------------------------------------------------------------
    async def _websocket(self, request: web.BaseRequest, channel: Channel,
                         headers: list[tuple[str, str]]) -> web.StreamResponse:
        """Complete the handshake, then read the browser's frames until the socket closes."""
        # (no permessage-deflate: its zlib state would cost ~300 KB per idle socket)
        ws = web.WebSocketResponse(max_msg_size=self.websocket_max_message, compress=False)
        for name, value in headers:  # the object's own headers (cookies, say) ride along
            if not name.lower().startswith("sec-websocket"):
                ws.headers.add(name, value)
        try:
            await ws.prepare(request)
        except web.HTTPException as e:  # not a valid handshake after all
            channel.close_from_here(1002, "the WebSocket handshake failed", clean=False)
            return web.Response(status=e.status, text=f"WebSocket handshake failed: {e.text}\n")
        sock = _Socket(self, ws, channel, request.transport)
        self.sockets.add(sock)
        self._upgrading.discard(channel)
        channel.attach(sock)
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    kind, data = EV_TEXT, msg.data.encode()
                elif msg.type is WSMsgType.BINARY:
                    kind, data = EV_BINARY, msg.data
                elif msg.type is WSMsgType.CLOSE:
                    channel.close_from_here(msg.data if isinstance(msg.data, int) else 1005,
                                            msg.extra or "", clean=True)
                    break
                elif msg.type is WSMsgType.ERROR:
                    err = ws.exception()
                    channel.error_from_here(f"{type(err).__name__}: {err}")
                    code = getattr(err, "code", None) or ws.close_code or 1006  # 1009: too big
                    channel.close_from_here(code, str(err)[:100], clean=False)
                    break
                else:  # CLOSING, CLOSED: we closed it (the object did, or we go away)
                    channel.close_from_here(ws.close_code or 1006, "", clean=False)
                    break
                if not channel.send_nowait(kind, data):
                    if channel.state != OPEN:
                        break
                    await channel.room()  # the object is behind: stop reading meanwhile
                    channel.send_nowait(kind, data)
        finally:
            self.sockets.discard(sock)
            if channel.state == OPEN:
                channel.close_from_here(1006, "", clean=False)
        return ws

    async def _stream(self, request: web.BaseRequest, resp: durable.Response,
                      headers: list[tuple[str, str]]) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, headers=headers)
        out.enable_chunked_encoding()
        await out.prepare(request)
        async with contextlib.aclosing(resp.iter_chunks()) as chunks:
            try:
                async for chunk in chunks:
                    await out.write(chunk)  # (sent at once: each chunk is flushed)
            except (ConnectionError, RuntimeError):
                return out  # the client left: closing the chunks cancels the producer
            except Exception as e:  # the producer failed: the client sees the body cut short
                log.info("a streamed body failed: %s", e)
                if request.transport is not None:
                    request.transport.abort()
                return out
        await out.write_eof()
        return out

    async def close_websockets(self) -> None:
        """Going away (a stop or reload): every socket closes with 1001."""
        told = []
        for sock in list(self.sockets):
            told.append(sock.channel.close_from_here(1001, "the gateway is going away", clean=True))
            sock.on_close(1001, "the gateway is going away")
        waits = [f for f in told if f is not None] + [s.task for s in self.sockets if s.task]
        if waits:  # the objects have heard, and the browsers got their close frames
            await asyncio.wait(waits, timeout=5)


class _Upgrade:
    """The object accepted the request's WebSocket: complete the handshake next."""

    __slots__ = ("channel", "headers")

    def __init__(self, channel: Channel, headers: list[tuple[str, str]]) -> None:
        self.channel = channel
        self.headers = headers


class _Socket:
    """One browser's WebSocket: writes what its object sends, in order, bounded.

    A frame is written at once when nothing waits before it (``send_frame`` then
    finishes without suspending: see ``_write_now``); when the peer reads slowly the
    rest queue behind a writer task that waits for the transport to drain. Past
    ``websocket_max_buffer`` bytes waiting (queued here or in the transport), the
    socket is closed with 1008.
    """

    __slots__ = ("gw", "ws", "channel", "transport", "queue", "held", "task", "closing",
                 "__weakref__")

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, channel: Channel,
                 transport: Any) -> None:
        self.gw = gw
        self.ws = ws
        self.channel = channel
        self.transport = transport
        self.queue: deque[tuple[WSMsgType, bytes, int]] = deque()
        self.held = 0
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    def on_message(self, kind: bytes, payload: bytes) -> None:
        if self.closing:
            return
        opcode = WSMsgType.TEXT if kind == EV_TEXT else WSMsgType.BINARY
        if not self.queue and self.task is None:
            self._write_now(opcode, payload)
        else:
            self.queue.append((opcode, payload, 0))
            self.held += len(payload)
        transport = self.transport
        buffered = self.held + (transport.get_write_buffer_size() if transport is not None else 0)
        if buffered > self.gw.websocket_max_buffer:
            log.warning("closing a WebSocket whose reader does not keep up: %d bytes wait for "
                        "it (http.websocket_max_buffer_kb = %d)", buffered,
                        self.gw.websocket_max_buffer >> 10)
            self.queue.clear()
            self.held = 0
            self.channel.close_from_here(1008, "the client did not read its messages", clean=False)
            self.on_close(1008, "message buffer overflow")

    def _write_now(self, opcode: WSMsgType, payload: bytes) -> bool:
        """Write one frame without a task: aiohttp's ``send_frame`` writes to the transport
        synchronously and suspends only to wait for a slow peer to drain. Stepping the
        coroutine once runs it to its end in the usual case (most of a broadcast's cost
        was a task per frame); if it suspends, the frame is already written and only the
        drain wait is dropped: the writer task waits for the drain instead."""
        coro = self.ws.send_frame(payload, opcode)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return True
        except Exception as e:  # the connection is closing
            log.debug("a WebSocket write failed: %s", e)
            return True
        self._start(_Resumed(coro, waiting_on))  # the writer task finishes it
        return False

    def on_close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.queue.append((WSMsgType.CLOSE, reason.encode()[:123], code))
        self._start()

    def _start(self, first: Any = None) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._drain(first))

    async def _drain(self, first: Any) -> None:
        try:
            if first is not None:
                await first
            while self.queue:
                opcode, payload, code = self.queue.popleft()
                self.held -= len(payload)
                if opcode is WSMsgType.CLOSE:
                    await self.ws.close(code=code, message=payload)
                    return
                await self.ws.send_frame(payload, opcode)
        except Exception as e:  # the connection went away: the reader sees it end
            log.debug("a WebSocket write failed: %s", e)
            self.queue.clear()
        finally:
            self.task = None


class _Resumed:
    """Await a coroutine that was already stepped once and suspended on ``waiting_on``
    (``_Socket._write_now``): a task continues it exactly as if it had run it from the
    start (the same future to wait on, then sends and throws passed through)."""

    __slots__ = ("coro", "waiting_on")

    def __init__(self, coro: Any, waiting_on: Any) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def __await__(self) -> Any:
        pending = self.waiting_on
        while True:
            try:
                value = yield pending
            except BaseException as e:  # (a cancellation: the coroutine gets it)
                try:
                    pending = self.coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = self.coro.send(value)
                except StopIteration as stop:
                    return stop.value


def _adopted(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:  # (it closed meanwhile)
        log.debug("an HTTP connection could not be served: %s", task.exception())


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _loop_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Running out of fds is an operator's problem: say so in one line (rate-limited)."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("out of file descriptors (%s; this process may open %d): new connections "
                  "wait in the listen queue until some close. Raise LimitNOFILE in the systemd "
                  "unit (or ulimit -n), or lower http.idle_timeout", exc.strerror, soft)
        return
    loop.default_exception_handler(context)


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """``Expect: 100-continue`` (curl sends it before a body over 1 KiB): say go on, as
    aiohttp's router did, unless the declared body is over the limit (413 before it is
    sent); any other expectation is refused (417)."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        return web.Response(status=417, text=f"unknown Expect: {expect}\n")
    declared = request.content_length
    if declared is not None and declared > request._client_max_size:
        return web.Response(status=413, headers={"Connection": "close"},
                            text="request body too large\n")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # (the response proper has not started)
    return None


class Front:
    """An HTTP front on a client: the gateway's server, in a gateway process or (``[http]
    front = "slots"``) in each object process, on the supervisor's listening socket."""

    def __init__(self, gateway: Gateway, runner: web.BaseRunner) -> None:
        self.gateway = gateway
        self.runner = runner
        self.acceptor: Any = None  # (front = "slots": objectproc.httpfront.SlotFront)

    def adopt(self, conn: socket.socket) -> None:
        """Serve a connection accepted elsewhere (front = "slots": this process's own accept
        loop, or another object process's hand-off)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(self.runner.server, sock=conn))
        task.add_done_callback(_adopted)

    @classmethod
    async def start(cls, cfg: Config, client: durable.Client, env: Env,
                    fd: int | None, *, accept: bool = True) -> Front:
        """``accept``: serve the listening socket ``fd`` (or bind the port) with aiohttp's
        own accept loop; else connections come only through ``adopt``."""
        h = cfg.http
        assert h is not None
        worker = load_function(h.worker) if h.worker else None
        bounds = Bounds(h.max_inflight_per_namespace, h.max_inflight_per_object,
                        h.max_inflight_mb << 20)
        gw = Gateway(client, env, worker=worker, read_timeout=h.read_timeout, debug=h.debug,
                     bounds=bounds, max_websockets=h.max_websockets,
                     websocket_max_message=cfg.websocket_max_message_kb << 10,
                     websocket_max_buffer=h.websocket_max_buffer_kb << 10,
                     access_log=h.access_log)
        # aiohttp's low-level server, not an Application: every path goes to one handler,
        # so the router, match info and middleware chain were ~6% of a no-op request's CPU
        loop = asyncio.get_running_loop()

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any,
                         task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=h.max_body_bytes)

        async def serve(request: web.BaseRequest) -> web.StreamResponse:
            if request.headers.get("Expect"):
                refused = await _expect(request)
                if refused is not None:
                    return refused
            return await gw.handle(request)

        server = web.Server(serve, request_factory=make_request, access_log=None,
                            keepalive_timeout=h.idle_timeout, max_field_size=16384,
                            logger=server_log)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        if not accept:
            return cls(gw, runner)
        host, _, port = h.listen.rpartition(":")
        if fd is not None:  # the supervisor's socket: it owns the port
            site: web.BaseSite = web.SockSite(runner, socket.socket(fileno=fd),
                                              shutdown_timeout=cfg.grace_period)
        else:  # run by hand: bind it here, exclusively
            site = web.TCPSite(runner, host.strip("[]"), int(port), backlog=1024,
                               shutdown_timeout=cfg.grace_period)
        await site.start()
        log.info("listening on http://%s%s", h.listen, f" (worker {h.worker})" if worker else "")
        return cls(gw, runner)

    async def close(self) -> None:
        """Stop accepting; WebSockets close with 1001; requests in flight finish."""
        if self.acceptor is not None:
            self.acceptor.close()
        await self.gateway.close_websockets()
        await self.runner.cleanup()


async def run(cfg: Config, fd: int | None) -> None:
    asyncio.get_running_loop().set_exception_handler(_loop_errors)
    mark = [time.monotonic()]
    beat = lifeline.start(lambda: mark[0])
    ticker = asyncio.create_task(lifeline.tick_forever(mark))
    secret = load_or_create_secret(cfg.data_path, create=False)
    keys = {n: namespace_key(secret, n) for n in cfg.namespaces}
    client = durable.Client(cfg.frontend(), name=f"gateway-{os.getpid()}", namespaces=keys,
                            timeout=CALL_TIMEOUT, heartbeat=cfg.broker.heartbeat, direct=False)
    await client.start(wait=False)
    if cfg.broker.peer_calls and not cfg.cluster.enabled:  # straight to the object processes
        client.peers = PeerRoutes(client, Ring(cfg.slots).slot_for, -1, {
            s: peer_endpoint(str(cfg.run_dir), s) for s in range(cfg.slots)})
        client.peers.start()
    env = Env({n: client.namespace(n) for n in cfg.namespaces}, cfg.vars, cfg.secrets)
    front = await Front.start(cfg, client, env, fd)
    # Thousands of open WebSockets are tens of thousands of long-lived objects: with the
    # default thresholds a full collection walked them all every few hundred requests
    # (a broadcast's p99 doubled). Freeze what start-up made; collect less often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    beat.mark_ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await front.close()
    await client.close()
    ticker.cancel()


def main(argv: list[str] | None = None) -> int:
    lifeline.bind_to_parent()  # (the supervisor's child: die with it)
    p = argparse.ArgumentParser(prog="python -m durable.broker.gateway")
    p.add_argument("--settings-fd", type=int, help="the supervisor's settings (an inherited fd)")
    p.add_argument("--settings", help="a settings file (write_settings), without a supervisor")
    p.add_argument("--fd", type=int, help="a listening socket to serve (the supervisor's)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logs.setup(args.log_level, f"gateway pid={os.getpid()}")
    try:
        cfg, _runtime = settings_from_args(args.settings, args.settings_fd)
        if cfg.http is None:
            raise ConfigError("the configuration has no [http] section")
        if cfg.http.worker:
            load_function(cfg.http.worker)
    except (ConfigError, ValueError, OSError) as e:
        logging.getLogger("durable.gateway").error("configuration error: %s", e)
        return EXIT_CONFIG
    asyncio.run(run(cfg, args.fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
