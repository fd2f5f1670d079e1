"""MemorySlot: a slot's storage in memory, for ``durable.testing``.

It stands where ``SlotStore`` stands (``ObjectStorage`` and the object
process use it through the same calls), so objects under test run the
daemon's own storage code: caches, turns, transactions, limits, the codec,
the output gate. What differs is only where durable bytes go: a dict.

Durability is modelled, not skipped: a write set is *submitted* (the turn
ends) and becomes *durable* at the next turn of the loop, or when someone
waits for it (``wait_durable``, the output gate). ``crash()`` discards what
is submitted but not yet durable, as SIGKILL would; what an answered call
wrote is kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .duck import NAME_KEY, name_twin
from .limits import DEFAULT_LIMITS, StorageLimits
from .log import ALARM_DELETE, ALARM_KEEP

__all__ = ["MemorySlot"]


@dataclass
class _Record:
    seq: int
    obj: bytes
    clear: bool
    entries: dict[str, bytes | None]
    alarm: int


class _Log:
    """What the object process kicks (``store.log.kick``): a commit soon."""

    def __init__(self, slot: MemorySlot) -> None:
        self._slot = slot

    def kick(self) -> None:
        self._slot._schedule_commit()


class MemorySlot:
    """A slot whose durable state is a dict (see the module's docstring)."""

    def __init__(self, limits: StorageLimits = DEFAULT_LIMITS) -> None:
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.data: dict[bytes, dict[str, bytes]] = {}
        self.alarms: dict[bytes, int] = {}
        self._pending: list[_Record] = []
        self._seq = 0
        self.durable_seq = 0
        self._commit_scheduled = False
        self.failed: BaseException | None = None
        self.full: BaseException | None = None
        self.log = _Log(self)
        self.on_alarm: Any = None  # (the daemon's alarm scheduler; the harness reads `alarms`)
        self.commits = 0

    # -- writes -------------------------------------------------------------------------
    def submit(self, obj: bytes, clear: bool, entries: dict[str, bytes | None], *,
               kick: bool = True, alarm: int = ALARM_KEEP, name: bytes | None = None) -> int:
        self._seq += 1
        self._pending.append(_Record(self._seq, obj, clear, dict(entries), alarm))
        if name is not None:  # (the name rides in the same write set: one sequence number)
            self._pending.append(_Record(self._seq, name_twin(obj), False, {NAME_KEY: name},
                                         ALARM_KEEP))
        if kick:
            self._schedule_commit()
        return self._seq

    def _schedule_commit(self) -> None:
        if not self._commit_scheduled:
            self._commit_scheduled = True
            self.loop.call_soon(self.commit)

    def commit(self) -> None:
        """Everything submitted becomes durable (a group commit)."""
        self._commit_scheduled = False
        if not self._pending:
            return
        for rec in self._pending:
            self._apply(rec)
        self.durable_seq = self._pending[-1].seq
        self._pending.clear()
        self.commits += 1

    def _apply(self, rec: _Record) -> None:
        rows = self.data.get(rec.obj)
        if rec.clear:
            rows = self.data[rec.obj] = {}
        elif rows is None:
            rows = self.data[rec.obj] = {}
        for key, value in rec.entries.items():
            if value is None:
                rows.pop(key, None)
            else:
                rows[key] = value
        if not rows:
            del self.data[rec.obj]
        if rec.alarm == ALARM_DELETE:
            self.alarms.pop(rec.obj, None)
        elif rec.alarm != ALARM_KEEP:
            self.alarms[rec.obj] = rec.alarm

    async def wait_durable(self, seq: int) -> None:
        if seq > self.durable_seq:
            self.commit()

    def crash(self) -> int:
        """Discard what is not durable yet; returns how many write sets were lost."""
        lost = len({rec.seq for rec in self._pending})
        self._pending.clear()
        return lost

    # -- reads (writes not yet durable included, as the real slot's overlay) -------------
    def read(self, obj: bytes, key: str) -> bytes | None:
        for rec in reversed(self._pending):
            if rec.obj == obj:
                if key in rec.entries:
                    return rec.entries[key]
                if rec.clear:
                    return None
        return self.data.get(obj, {}).get(key)

    def read_all(self, obj: bytes) -> dict[str, bytes]:
        out = dict(self.data.get(obj, {}))
        for rec in self._pending:
            if rec.obj == obj:
                if rec.clear:
                    out = {}
                for key, value in rec.entries.items():
                    if value is None:
                        out.pop(key, None)
                    else:
                        out[key] = value
        return out

    def read_alarm(self, obj: bytes) -> int | None:
        for rec in reversed(self._pending):
            if rec.obj == obj and rec.alarm != ALARM_KEEP:
                return None if rec.alarm == ALARM_DELETE else rec.alarm
        return self.alarms.get(obj)

    def pending_alarms(self) -> dict[bytes, int | None]:
        return {}

    # -- what the object process and ObjectStorage also call ---------------------------
    def check_usable(self) -> None:
        pass

    def check_writable(self) -> None:
        pass

    def register(self, obj: bytes, storage: Any) -> None:
        pass

    def unregister(self, obj: bytes, storage: Any) -> None:
        pass

    def objects(self) -> list[bytes]:
        """Every object with stored data or an alarm (durable or not)."""
        seen = set(self.data) | set(self.alarms)
        seen.update(rec.obj for rec in self._pending)
        return sorted(seen)

    async def close(self) -> None:
        self.commit()

    def statistics(self) -> dict[str, Any]:
        return {"commits": self.commits}

    @property
    def alarm_counts(self) -> dict[str, int]:
        return {}

    inline_commits = 0
