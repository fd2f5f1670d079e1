"""The per-call CPU limit: object code that holds the loop too long is interrupted.

A thread watches the CPU time the main thread has used since the event loop
last turned (the object process's timer task records both at each tick). CPU
time, not wall time: a process paused (SIGSTOP, a VM's stolen time) or a call
blocked in a sleep does not count. The thread looks every :func:`watch_period`; once the loop has
been held for the smallest configured limit, it sends SIGUSR1 to the process
every 0.25 s while the hold lasts. The handler runs in the main
thread, between two bytecodes of whatever holds the loop, and in that task's
context. If that is an object's code (``CURRENT`` is set) and the hold passed
that object's namespace's limit, it raises :class:`CpuLimitExceeded` there:
the call fails with ``CpuLimitError`` and the object is reset.

What it cannot interrupt: a loop held inside C code that never returns to the
interpreter (no bytecode runs, so no handler does). That is a hang, and the
supervisor replaces the process (``hang_timeout``). The handler also leaves
durable's own code alone (the storage engine must not stop half-way through
an update); it tries again at the next signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from durable.osthread import name_os_thread

from .activation import CURRENT, CpuLimitExceeded

__all__ = ["CpuWatch", "watch_period"]

_OURS = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "client"))
#: a loop that turns while calls come has a mark at most this old (its timer ticks every
#: 0.1 s then; an idle slot's, every 0.5 s, runs up no CPU to speak of in between)
_TICK = 0.2


def watch_period(smallest_limit: float) -> float:
    """How often the watch looks: a thirtieth of the smallest limit, from 0.05 to 1 s.

    A hold is noticed at most one period late, so a limit is overrun by at most ~3%
    (less for limits under 1.5 s). The thread's every look costs a wake-up and the GIL:
    at 20 a second (0.05 s, whatever the limit) it was ~2 ms of CPU a second per object
    process, the largest share of an idle daemon's CPU after the loops (measured); at the
    default 30-s limit it now looks once a second."""
    return min(1.0, max(0.05, smallest_limit / 30))


class CpuWatch:
    def __init__(self, mark: list[float], smallest_limit: float,
                 period: float | None = None) -> None:
        self.mark = mark
        self.smallest = smallest_limit
        self.period = watch_period(smallest_limit) if period is None else period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="durable-cpu-limit", daemon=True)
        self.interrupted = 0
        self._main_clock = time.pthread_getcpuclockid(threading.main_thread().ident)

    def start(self) -> None:
        signal.signal(signal.SIGUSR1, self._handler)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def held_for(self) -> float:
        """CPU seconds the main thread used since the loop last turned."""
        if time.monotonic() - self.mark[0] < _TICK * 1.5:
            return 0.0  # the loop turned lately
        return max(0.0, time.clock_gettime(self._main_clock) - self.mark[1])

    def _run(self) -> None:
        name_os_thread()
        next_signal = 0.0
        while not self._stop.wait(self.period):
            if self.held_for() >= self.smallest and time.monotonic() >= next_signal:
                next_signal = time.monotonic() + 0.25
                os.kill(os.getpid(), signal.SIGUSR1)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        act = CURRENT.get()
        if act is None:
            return  # durable's own work, or no object: not the CPU limit's business
        held = time.thread_time() - self.mark[1]  # (this is the main thread)
        if held < act.cpu_limit:
            return
        if frame is not None and frame.f_code.co_filename.startswith(_OURS):
            return  # inside the storage engine or the client: next time
        self.interrupted += 1
        raise CpuLimitExceeded(
            f"{act.namespace} {act.object_id}: the call used {held:.1f} s of CPU without yielding, over "
            f"its CPU limit of {act.cpu_limit:g} s (cpu_limit_ms); the object was reset")
