"""Threads named in the operating system too, not only in Python.

Python 3.11 names only its own ``Thread`` objects: ``top -H``, ``ps -L``, ``/proc`` and
``scripts/cpu_split.py`` saw an object process's applier and commit-log threads both as
``python``, so which of them was busy could not be told without py-spy.
"""

from __future__ import annotations

import ctypes
import sys
import threading

__all__ = ["name_os_thread"]

_PR_SET_NAME = 15
#: Linux keeps 15 bytes of a thread's name (and a NUL)
MAX_NAME = 15
_libc: ctypes.CDLL | None = None


def name_os_thread(name: str | None = None) -> str | None:
    """Name the calling thread in the OS: ``name`` (default: its Python name) without the
    ``durable-`` prefix, cut to 15 bytes ("durable-commit-log" is ``commit-log``). Returns
    the name set, or None where the OS has no such call (never raises: a nicety)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    short = (name or threading.current_thread().name).removeprefix("durable-")
    raw = short.encode("utf-8", "replace")[:MAX_NAME]
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return raw.decode("utf-8", "replace")
