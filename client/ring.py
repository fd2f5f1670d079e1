"""Placement: which slot owns an object. A pure function of (slot count, object id).

Consistent hashing with virtual nodes over a stable hash (BLAKE2b, never
Python's salted ``hash()``), so every broker, the supervisor and any tool
place an object identically, and changing the slot count moves only the
objects whose ring position changed hands (about 1/N of them per slot added).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right

__all__ = ["Ring", "stable_hash"]


def stable_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    __slots__ = ("slots", "vnodes", "_points", "_owners")

    def __init__(self, slots: int, vnodes: int = 128) -> None:
        if type(slots) is not int or slots < 1:
            raise ValueError(f"slots must be a positive int, got {slots!r}")
        self.slots = slots
        self.vnodes = vnodes
        points = sorted((stable_hash(f"slot:{s}:vnode:{v}".encode()), s)
                        for s in range(slots) for v in range(vnodes))
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]

    def slot_for(self, object_id: str) -> int:
        i = bisect_right(self._points, stable_hash(object_id.encode()))
        return self._owners[i % len(self._owners)]
