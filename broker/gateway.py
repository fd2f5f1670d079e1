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

The supervisor binds the port and passes the listening socket (``--fd``); several
gateway processes accept from that one socket to use more cores (gunicorn's
model), and no other process can share the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

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
from durable.supervisor import lifeline, logs
from durable.supervisor.config import Config, ConfigError, settings_from_args

__all__ = ["Gateway", "main"]

log = logging.getLogger("durable.gateway")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
_STUB_CACHE = 10_000
_LARGE_RESPONSE = 64 << 10  # responses from this size count against the byte bound
CALL_TIMEOUT = 30.0  # seconds a request waits for its object (then 504)


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

    def take_bytes(self, n: int) -> None:
        if n and self.bytes + n > self.max_bytes:
            raise OverloadedError(
                f"the gateway holds {self.bytes >> 20} MiB of request and response bodies (the "
                f"limit, http.max_inflight_mb, is {self.max_bytes >> 20} MiB); retry shortly")
        self.bytes += n

    @contextlib.contextmanager
    def call(self, namespace: str, object_id: str) -> Iterator[None]:
        key = (namespace, object_id)
        if self.namespaces[namespace] >= self.per_namespace:
            raise OverloadedError(f"namespace {namespace} has {self.per_namespace} requests in "
                                  "flight through this gateway (http.max_inflight_per_namespace)")
        if self.objects[key] >= self.per_object:
            raise OverloadedError(f"this object has {self.per_object} requests in flight through "
                                  "this gateway (http.max_inflight_per_object)")
        self.namespaces[namespace] += 1
        self.objects[key] += 1
        try:
            yield
        finally:
            for counter, k in ((self.namespaces, namespace), (self.objects, key)):
                counter[k] -= 1
                if not counter[k]:
                    del counter[k]


class Gateway:
    def __init__(self, client: durable.Client, env: Env, *, worker: Any = None,
                 read_timeout: float = 30.0, debug: bool = False,
                 bounds: Bounds | None = None) -> None:
        self.client = client
        self.env = env
        self.worker = worker
        self.read_timeout = read_timeout
        self.debug = debug
        self.bounds = bounds or Bounds()
        self._stubs: OrderedDict[tuple[str, str], durable.Stub] = OrderedDict()

    def _stub(self, ns: durable.Namespace, oid: durable.ObjectId) -> durable.Stub:
        key = (ns.name, str(oid))
        stub = self._stubs.get(key)
        if stub is None or stub._broken is not None:
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
        ns = self.client.namespace(unquote(parts[1]))
        if parts[2] == "id" and len(parts) > 3:
            oid = ns.id_from_string(parts[3].split("/", 1)[0])
        else:
            oid = ns.id_from_name(unquote(parts[2]))
        with self.bounds.call(ns.name, str(oid)):
            return await self._stub(ns, oid).fetch(req)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, counted against the byte bound as it arrives (chunked bodies too)."""
        declared = request.content_length
        if declared is not None:
            self.bounds.take_bytes(declared)  # refused before a byte is read
            try:
                async with asyncio.timeout(self.read_timeout):
                    return await request.read()
            finally:
                self.bounds.bytes -= declared
        chunks, held = [], 0
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.content.iter_any():
                    self.bounds.take_bytes(len(chunk))
                    held += len(chunk)
                    if held > request._client_max_size:
                        raise web.HTTPRequestEntityTooLarge(max_size=request._client_max_size,
                                                            actual_size=held)
                    chunks.append(chunk)
        finally:
            self.bounds.bytes -= held
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.content_length == 0 or (request.content_length is None
                                               and not request.body_exists):
                body = b""
            else:
                body = await self._read_body(request)
        except TimeoutError:
            return web.Response(status=408, text="request body not received in time\n")
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="request body too large\n")
        except OverloadedError as e:
            return web.Response(status=503, headers={"Retry-After": "1", "Connection": "close"},
                                text=f"{e}\n")
        try:
            headers = list(request.headers.items())
            for name, value in headers:  # aiohttp keeps undecodable bytes as surrogates
                if not (name.isascii() and _utf8(value)):
                    raise ValueError(f"header {name.encode(errors='replace')!r} is not valid "
                                     "UTF-8 (durable passes headers on as text)")
            req = durable.Request(str(request.url), method=request.method, headers=headers,
                                  body=body)
        except (TypeError, ValueError) as e:
            return web.Response(status=400, text=f"bad request: {e}\n")
        del body  # the Request holds it now; the bytes bound counted it while it was read
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


async def run(cfg: Config, fd: int | None) -> None:
    asyncio.get_running_loop().set_exception_handler(_loop_errors)
    h = cfg.http
    mark = [time.monotonic()]
    beat = lifeline.start(lambda: mark[0])
    ticker = asyncio.create_task(lifeline.tick_forever(mark))
    secret = load_or_create_secret(cfg.data_path, create=False)
    keys = {n: namespace_key(secret, n) for n in cfg.namespaces}
    client = durable.Client(cfg.frontend(), name=f"gateway-{os.getpid()}", namespaces=keys,
                            timeout=CALL_TIMEOUT, heartbeat=cfg.broker.heartbeat)
    await client.start(wait=False)
    env = Env({n: client.namespace(n) for n in cfg.namespaces}, cfg.vars)
    worker = load_function(h.worker) if h.worker else None
    bounds = Bounds(h.max_inflight_per_namespace, h.max_inflight_per_object,
                    h.max_inflight_mb << 20)
    gw = Gateway(client, env, worker=worker, read_timeout=h.read_timeout, debug=h.debug,
                 bounds=bounds)
    app = web.Application(client_max_size=h.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", gw.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=h.idle_timeout, max_field_size=16384)
    await runner.setup()
    host, _, port = h.listen.rpartition(":")
    if fd is not None:  # the supervisor's socket: it owns the port
        site: web.BaseSite = web.SockSite(runner, socket.socket(fileno=fd),
                                          shutdown_timeout=cfg.grace_period)
    else:  # run by hand: bind it here, exclusively
        site = web.TCPSite(runner, host.strip("[]"), int(port), backlog=1024,
                           shutdown_timeout=cfg.grace_period)
    await site.start()
    beat.mark_ready()
    log.info("listening on http://%s%s", h.listen, f" (worker {h.worker})" if worker else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()  # stops accepting, lets requests in flight finish
    await client.close()
    ticker.cancel()


def main(argv: list[str] | None = None) -> int:
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
