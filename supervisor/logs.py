"""Logging for every process of the daemon: one line per event, repeats bounded.

A fault that repeats (a full fd table, a peer that keeps sending garbage)
must not turn the journal into the fault: 29 MB of identical tracebacks in
30 s were seen when the gateway ran out of file descriptors. So the same
message (same logger, level and text, tracebacks left out) is written at
most ``burst`` times per ``window`` seconds; the next one written after a
quiet spell says how many were held back.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

__all__ = ["RateLimit", "setup"]


class RateLimit(logging.Filter):
    def __init__(self, burst: int = 5, window: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.max_keys, self.clock = burst, window, max_keys, clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [start, n, held]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else repr(record.msg)
        key = (record.name, record.levelno, text.split("\n", 1)[0][:120])
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            held = int(entry[2]) if entry is not None else 0
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if held:
                record.msg = f"{record.getMessage()} ({held} more like this in the last " \
                             f"{self.window:g} s were not logged)"
                record.args = None
            return True
        entry[1] = int(entry[1]) + 1
        if entry[1] <= self.burst:
            return True
        entry[2] = int(entry[2]) + 1
        return False


def setup(level: str, prefix: str) -> None:
    """stderr, one line per record, ``LEVEL prefix message``, repeats rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(levelname)s {prefix} %(message)s"))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
