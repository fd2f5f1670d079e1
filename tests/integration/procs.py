"""Helpers for tests that run real processes: always killed and reaped, even on failure."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def spawned(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """Start a process; on exit SIGKILL it (if still running) and reap it."""
    proc = subprocess.Popen(args, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


class LineReader:
    """Read lines from a pipe with a deadline (never blocks past it)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.eof = True
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until truthy; on timeout fail saying what it last returned."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")


async def async_wait_for(predicate: Callable[[], Any], timeout: float, what: str,
                         interval: float = 0.05,
                         ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """``wait_for`` for async tests: ``predicate`` may be a coroutine function, and an
    exception in ``ignore`` counts as "not yet". On timeout, fail saying what it last saw."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
        except ignore as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")
        await asyncio.sleep(interval)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Each pytest-xdist worker takes its ports from a block of its own, below the kernel's
#: ephemeral range: a port the kernel picked (bind to port 0) could be given to another
#: connection's source port before the server bound it, and was (CI: a NATS node's client
#: port became the source port of another node's route connection, "address already in use").
_PORT_BLOCK = 1500
_PORTS_FROM = 10_000 + _PORT_BLOCK * int(
    os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_next_port = [0]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now, from this test process's block
    below the ephemeral range (the kernel's own choice when no such block fits)."""
    if _PORTS_FROM + _PORT_BLOCK <= _ephemeral_low():
        for _ in range(_PORT_BLOCK):
            port = _PORTS_FROM + _next_port[0] % _PORT_BLOCK
            _next_port[0] += 1
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # (in use, or a connection of an earlier test in TIME_WAIT)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
