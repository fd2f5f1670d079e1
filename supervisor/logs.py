"""Logging for every process of the daemon: one line per event, repeats bounded.

Three shapes, one setup for every entry point (``setup``):

* **text** on a terminal or into a file: ``2026-11-30T17:40:01.123Z LEVEL who message``;
* **journald** (stderr is the journal's stream, ``JOURNAL_STREAM``): no timestamp (the
  journal adds its own), and a syslog priority prefix (``<3>`` for errors...) so that
  ``journalctl -p err`` works;
* **json** (``log_format = "json"``): one object per line for log shippers, with ``ts``,
  ``level``, ``who``, ``pid``, ``logger``, ``message`` (and ``exception``).

The daemon's children inherit the choice through ``DURABLE_LOG_FORMAT``.

A fault that repeats (a full fd table, a peer that keeps sending garbage)
must not turn the journal into the fault: 29 MB of identical tracebacks in
30 s were seen when the gateway ran out of file descriptors. So the same
message (same logger, level and text, tracebacks left out) is written at
most ``burst`` times per ``window`` seconds; the next one written after a
quiet spell says how many were held back.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["RateLimit", "setup", "FORMATS", "under_journald"]

FORMATS = ("text", "json")
ACCESS = "durable.gateway.access"  # the gateway's access log: never rate-limited
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class RateLimit(logging.Filter):
    def __init__(self, burst: int = 5, window: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.max_keys, self.clock = burst, window, max_keys, clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [start, n, held]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == ACCESS:  # every request gets its line
            return True
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


def under_journald(stream: Any = None) -> bool:
    """Whether ``stream`` (stderr) is the journal's (systemd sets ``JOURNAL_STREAM=dev:inode``)."""
    journal = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = journal.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(journal) and dev == str(st.st_dev) and ino == str(st.st_ino)


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class _Text(logging.Formatter):
    def __init__(self, prefix: str, journald: bool) -> None:
        super().__init__()
        self.prefix, self.journald = prefix, journald

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {self.prefix} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journald:  # one priority for the record, its traceback lines included
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return f"{_timestamp(record)} {text}"


class _Json(logging.Formatter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.who = prefix.rsplit(" pid=", 1)[0]

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname, "who": self.who,
               "pid": record.process, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str, prefix: str, fmt: str | None = None, stream: Any = None) -> None:
    """stderr (or ``stream``), one line per record, repeats rate-limited; ``fmt`` "text" or
    "json" (default: ``$DURABLE_LOG_FORMAT``, else text). Text under journald drops the
    timestamp and adds the syslog priority."""
    fmt = fmt or os.environ.get("DURABLE_LOG_FORMAT") or "text"
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Json(prefix) if fmt == "json" else _Text(prefix, under_journald(stream)))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
