"""sd_notify in a few lines: a datagram to $NOTIFY_SOCKET; nothing without it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["flush", "notify", "watchdog_interval"]


#: messages systemd must get, in order: kept when the socket is full, sent before the next
_MUST = ("READY=", "STOPPING=", "RELOADING=", "MAINPID=")
_pending: dict[str, list[str]] = {}  # by socket address


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send e.g. ``"READY=1"`` or ``"STATUS=..."``; return whether it was sent.

    Never waits: a reader that stopped reading (a stuck systemd, a harness) once hung the
    supervisor's main loop in a blocking send. When the socket is full, a message systemd
    must get (READY=1, STOPPING=1, ...) waits and goes first with the next call that
    finds room; the others (STATUS, EXTEND_TIMEOUT_USEC, WATCHDOG) are dropped, since
    the next one says the same."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    queue = [*_pending.pop(addr, ()), message]
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(addr)
            for m in queue:
                s.send(m.encode())
                sent += 1
    except BlockingIOError:  # full: what must arrive waits (the last few, if it stays full)
        _pending[addr] = [m for m in queue[sent:] if m.startswith(_MUST)][-16:]
        return False
    except OSError:  # no socket there (not under systemd any more): nothing to keep
        return False
    return True


def flush(env: Mapping[str, str] | None = None) -> bool:
    """Send what waited for room (the supervisor calls this every turn: a READY=1 that found
    the socket full must not wait for a next notification that may never come). Return
    whether nothing waits any more."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    key = "\0" + addr[1:] if addr.startswith("@") else addr
    waiting = _pending.pop(key, None)
    if not waiting:
        return True
    _pending[key] = waiting[:-1]
    return notify(waiting[-1], env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if not asked."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
