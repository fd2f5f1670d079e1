"""What a child process (broker, object process, gateway) owes the supervisor.

The supervisor starts each child with three things in its environment:

* ``DURABLE_LOCK_FD``: the data dir's lock (``DATA_DIR/lock``, an ``flock``).
  The child keeps it open and never touches it: the lock is held as long as
  any process of the daemon lives, so an orphan is seen by the next start.
* ``DURABLE_LIFELINE_FD``: the write end of a pipe to the supervisor. A
  thread (not the event loop) writes one line a second: ``<lag ms>
  <ready>``, where *lag* is how long ago the process's main loop last turned.
  A stopped process (SIGSTOP), a loop blocked in Python or C, a thread wedged
  holding the GIL: each shows as a growing lag or as silence, and the
  supervisor replaces the process after ``hang_timeout``.
* ``DURABLE_PARENT``: the supervisor's pid. The child asks for
  ``PR_SET_PDEATHSIG`` (SIGTERM when the supervisor dies) first thing
  (``bind_to_parent``; not between fork and exec, where Python code can
  deadlock on a lock another of the supervisor's threads held at fork), and
  exits if the supervisor is already gone. A blocked loop never runs the
  SIGTERM handler:
  the same thread sees the parent gone and, after ``DURABLE_ORPHAN_GRACE``
  seconds, SIGKILLs its own process, so no orphan keeps the lock.

The thread is the zguide's heartbeat in its own thread, and gunicorn's
``WorkerTmp`` notion of "alive" (the loop turned lately), measured rather
than touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from durable.osthread import name_os_thread

__all__ = ["Lifeline", "bind_to_parent", "start", "tick_forever", "parse_beat"]

INTERVAL = 1.0


class Lifeline:
    """The child side: a daemon thread that beats and watches the parent."""

    def __init__(self, fd: int | None, parent: int | None, orphan_grace: float,
                 last_turn: Callable[[], float]) -> None:
        self.fd = fd
        self.parent = parent
        self.orphan_grace = orphan_grace
        self.last_turn = last_turn
        self.ready = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="durable-lifeline", daemon=True)

    def mark_ready(self) -> None:
        """The process serves: say so now (the supervisor's READY=1 waits for it)."""
        self.ready = True
        self._wake.set()

    def start(self) -> Lifeline:
        self._thread.start()
        return self

    def _run(self) -> None:
        name_os_thread()
        orphaned_at: float | None = None
        while True:
            now = time.monotonic()
            if self.fd is not None:
                lag = max(0.0, now - self.last_turn())
                try:
                    os.write(self.fd, f"{lag * 1000:.0f} {int(self.ready)}\n".encode())
                except BlockingIOError:
                    pass  # the supervisor is not reading (stopped?): the next line will do
                except OSError:
                    self.fd = None  # the supervisor is gone (EPIPE)
            if self.parent is not None and os.getppid() != self.parent:
                if orphaned_at is None:
                    orphaned_at = now  # PDEATHSIG's SIGTERM is on its way to the loop
                elif now - orphaned_at >= self.orphan_grace:
                    os.kill(os.getpid(), signal.SIGKILL)  # the loop did not stop by itself
            self._wake.wait(INTERVAL if orphaned_at is None else 0.1)
            self._wake.clear()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.lstrip("-").isdigit() else None


def bind_to_parent(parent: int | None = None) -> None:
    """Die with the supervisor: SIGTERM when it dies (Linux's PR_SET_PDEATHSIG), and exit
    now if it died already (before the request, no signal would ever come). ``parent``:
    the supervisor's pid (default ``DURABLE_PARENT``; without it, nothing to bind to)."""
    parent = _env_int("DURABLE_PARENT") if parent is None else parent
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def start(last_turn: Callable[[], float]) -> Lifeline:
    """Start the thread from the environment the supervisor set (a no-op beat without it)."""
    fd = _env_int("DURABLE_LIFELINE_FD")
    if fd is not None:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)
    grace = float(os.environ.get("DURABLE_ORPHAN_GRACE") or 10)
    return Lifeline(fd, _env_int("DURABLE_PARENT"), grace, last_turn).start()


async def tick_forever(mark: list[float], every: float = 0.2) -> None:
    """An asyncio task that records when the loop last ran (``mark[0]``), and, if ``mark``
    has a second slot, the main thread's CPU time then (``mark[1]``)."""
    while True:
        mark[0] = time.monotonic()
        if len(mark) > 1:
            mark[1] = time.thread_time()
        await asyncio.sleep(every)


def parse_beat(line: bytes) -> tuple[float, bool] | None:
    """``b"<lag ms> <ready>"`` as (lag seconds, ready); None for anything else."""
    parts = line.split()
    if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in (b"0", b"1"):
        return None
    return int(parts[0]) / 1000.0, parts[1] == b"1"
