"""When to restart a dead process, and when to stop trying (pure; the clock is passed in).

* An exit status that means "restarting will not help" halts at once:
  78 (EX_CONFIG: bad configuration, a class that cannot be imported) and
  74 (EX_IOERR: storage cannot be opened or is damaged).
* Otherwise restart: at once the first time (a crashed slot should serve
  again within a second), then with exponential backoff up to ``max_delay``.
  A process that ran for ``stable_after`` seconds starts the backoff afresh.
* Flapping: more than ``flap_limit`` restarts within ``flap_window`` seconds
  halts (circus' flapping plugin).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["RestartPolicy", "Decision", "EXIT_CONFIG", "EXIT_STORAGE"]

EXIT_CONFIG = 78
EXIT_STORAGE = 74
_HOPELESS = {EXIT_CONFIG: "its configuration is wrong", EXIT_STORAGE: "its storage cannot be opened"}


@dataclass(frozen=True)
class Decision:
    restart_in: float | None  # None: do not restart; halt the daemon
    reason: str


@dataclass
class RestartPolicy:
    base_delay: float = 0.1
    max_delay: float = 5.0
    stable_after: float = 10.0
    flap_window: float = 30.0
    flap_limit: int = 10
    _streak: int = 0
    _restarts: deque[float] = field(default_factory=deque)

    def on_exit(self, now: float, status: int, ran_for: float) -> Decision:
        if status in _HOPELESS:
            return Decision(None, f"exited with status {status}: {_HOPELESS[status]}; "
                                  "restarting will not help")
        while self._restarts and now - self._restarts[0] > self.flap_window:
            self._restarts.popleft()
        if len(self._restarts) >= self.flap_limit:
            return Decision(None, f"restarted {len(self._restarts)} times in "
                                  f"{self.flap_window:g} s (flapping); giving up")
        if ran_for >= self.stable_after:
            self._streak = 0
        delay = 0.0 if self._streak == 0 else min(self.max_delay, self.base_delay * 2 ** (self._streak - 1))
        self._streak += 1
        self._restarts.append(now)
        return Decision(delay, f"exited with status {status} after {ran_for:.1f} s; "
                               f"restarting in {delay:g} s")
