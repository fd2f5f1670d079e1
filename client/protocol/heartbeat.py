"""Liveness of a peer, with an injected clock (tests never sleep through timeouts).

Any traffic from the peer counts as life; a heartbeat is sent only when we
have sent nothing for ``interval``; the peer is dead after ``interval *
misses`` of silence (zguide's Paranoid Pirate, with monotonic time).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Liveness", "HEARTBEAT", "MISSES"]

#: seconds between heartbeats, and how many missed ones make a peer dead: every side's
#: default (the daemon's ``broker.heartbeat`` setting overrides the interval)
HEARTBEAT = 1.0
MISSES = 5


class Liveness:
    __slots__ = ("interval", "misses", "clock", "last_heard", "last_sent")

    def __init__(self, interval: float = HEARTBEAT, misses: int = MISSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or misses < 1:
            raise ValueError("interval must be > 0 and misses >= 1")
        self.interval = interval
        self.misses = misses
        self.clock = clock
        now = clock()
        self.last_heard = now
        self.last_sent = now

    def heard(self) -> None:
        self.last_heard = self.clock()

    def sent(self) -> None:
        self.last_sent = self.clock()

    def send_due(self) -> bool:
        return self.clock() - self.last_sent >= self.interval

    def alive(self) -> bool:
        return self.clock() - self.last_heard < self.interval * self.misses

    def next_deadline(self) -> float:
        """Seconds until something is due (a heartbeat to send or the peer's expiry)."""
        now = self.clock()
        return max(0.0, min(self.last_sent + self.interval,
                            self.last_heard + self.interval * self.misses) - now)
