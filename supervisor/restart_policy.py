"""When to restart a dead process, and when to stop trying (pure; the clock is passed in).

* An exit status that means "restarting will not help" halts at once:
  78 (EX_CONFIG: bad configuration, a class that cannot be imported) and
  74 (EX_IOERR: storage cannot be opened, the data dir is not the right one).
* 65 (EX_DATAERR: the slot's files are damaged) stops that slot only; it is
  shown as ``corrupt`` until ``durable repair``. 75 (EX_TEMPFAIL: the disk is
  full at start) is retried every ``disk_full_delay`` seconds, without end
  and without counting as flapping.
* A process killed from outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: an
  operator, the OOM killer, a test) is restarted at once, however often:
  a killed slot should serve again within a second.
* Only a process that dies within ``stable_after`` seconds of its start (a
  start-up crash) is backed off (exponentially, up to ``max_delay``), and
  more than ``flap_limit`` such deaths within ``flap_window`` seconds halt
  the daemon (circus' flapping plugin). A process that ran longer starts the
  count afresh.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass, field

__all__ = ["RestartPolicy", "Decision", "EXIT_CONFIG", "EXIT_STORAGE", "EXIT_CORRUPT",
           "EXIT_DISK_FULL"]

from durable.exitcodes import EXIT_CONFIG, EXIT_CORRUPT, EXIT_DISK_FULL, EXIT_STORAGE

_EXTERNAL = {-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP}
_HOPELESS = {EXIT_CONFIG: "its configuration is wrong", EXIT_STORAGE: "its storage cannot be opened"}


@dataclass(frozen=True)
class Decision:
    restart_in: float | None  # None: do not restart (halt the daemon, unless ``corrupt``)
    reason: str
    corrupt: bool = False  # only this slot stays down; the daemon serves on


@dataclass
class RestartPolicy:
    base_delay: float = 0.1
    max_delay: float = 5.0
    stable_after: float = 1.0
    flap_window: float = 30.0
    flap_limit: int = 10
    disk_full_delay: float = 2.0
    _streak: int = 0
    _restarts: deque[float] = field(default_factory=deque)

    def on_exit(self, now: float, status: int, ran_for: float) -> Decision:
        if status == EXIT_CORRUPT:
            return Decision(None, "found its slot's files damaged; the slot stays down until "
                                  "`durable repair` (see the log above); the other slots serve on",
                            corrupt=True)
        if status == EXIT_DISK_FULL:
            return Decision(self.disk_full_delay, f"cannot open its storage: the disk is full; "
                                                  f"trying again in {self.disk_full_delay:g} s")
        if status in _HOPELESS:
            return Decision(None, f"exited with status {status}: {_HOPELESS[status]}; "
                                  "restarting will not help")
        if status in _EXTERNAL:
            return Decision(0.0, f"was killed ({signal.Signals(-status).name}) after "
                                 f"{ran_for:.1f} s; restarting now")
        if ran_for >= self.stable_after:
            self._streak = 0
            self._restarts.clear()
            return Decision(0.0, f"exited with status {status} after {ran_for:.1f} s; restarting now")
        while self._restarts and now - self._restarts[0] > self.flap_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.flap_limit:
            return Decision(None, f"died within {self.stable_after:g} s of starting "
                                  f"{len(self._restarts) + 1} times in {self.flap_window:g} s "
                                  "(flapping); giving up")
        delay = 0.0 if self._streak == 0 else min(self.max_delay, self.base_delay * 2 ** (self._streak - 1))
        self._streak += 1
        self._restarts.append(now)
        return Decision(delay, f"exited with status {status} after {ran_for:.1f} s; "
                               f"restarting in {delay:g} s")
