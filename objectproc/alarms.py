"""Alarms of one slot: fire each object's alarm when it comes due, at least once.

Where alarms live: in the slot's storage, changed by write sets like any
write (``WriteSet.alarm``), applied to DuckDB's ``alarms`` table (indexed by
due time). This scheduler keeps in memory only the alarms due before its
*horizon* (``window`` ahead of now): a heap of ``(due, obj)`` and the current
due time of each object in it. It moves the horizon forward with one indexed
query before it is reached (``refill``), so a million pending alarms cost a
million DuckDB rows, not a million Python objects.

Rules this file keeps:

* **Durable before known.** The slot tells the scheduler of an alarm change
  (``on_alarm``) once its record is durable, so an alarm that was never
  acknowledged does not fire from memory; a refill also reads changes that
  DuckDB does not have yet (the slot's overlay).
* **Never early, never twice at once.** An alarm fires at or after its due
  time; an object whose handler runs is not fired again until it ends (a
  new alarm it set waits its turn).
* **At least once.** A handler that returns deletes the alarm (unless it set
  another: the activation checks); one that raises is retried after
  ``retry_base * 2**n`` seconds, ``retries`` times, then dropped with a log
  line naming the object and the last error. A crash loses only the in-memory
  retry count: the stored alarm fires again after the restart.
* **No storm.** At most ``rate`` alarms start per second and ``concurrency``
  handlers run at once, oldest due first (alarms that came due while the
  daemon was down fire after start in that order).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from typing import Any

from .metrics import LATENESS_BUCKETS, Histogram

__all__ = ["AlarmScheduler", "AlarmInfo", "AlarmCall"]

log = logging.getLogger("durable.objectproc")

_LOAD_LIMIT = 100_000  # rows one refill query reads at most (a backlog comes in parts)


class AlarmInfo:
    """What ``alarm(self, info)`` is told: ``retry_count`` (0 on the first run), ``is_retry``."""

    __slots__ = ("retry_count",)

    def __init__(self, retry_count: int = 0) -> None:
        self.retry_count = retry_count

    @property
    def is_retry(self) -> bool:
        return self.retry_count > 0

    def __repr__(self) -> str:
        return f"AlarmInfo(retry_count={self.retry_count})"


class AlarmCall:
    """An alarm's run, delivered to its activation like a call (in order with fetches)."""

    __slots__ = ("due", "retry_count")

    def __init__(self, due: int, retry_count: int) -> None:
        self.due = due
        self.retry_count = retry_count


def now_ms() -> int:
    return int(time.time() * 1000)


class AlarmScheduler:
    """Fires due alarms of one slot. ``fire(obj, due, retry_count, done)`` runs the
    object's handler; it calls ``done(error_or_None)`` when the handler has ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 load: Callable[[int, int, int], list[tuple[bytes, int]]],
                 pending: Callable[[], dict[bytes, int | None]],
                 fire: Callable[[bytes, int, int, Callable[[BaseException | None], None]], None],
                 give_up: Callable[[bytes, int, BaseException], None], *,
                 clock: Callable[[], int] = now_ms, window_ms: int = 60_000,
                 rate: float = 10_000.0, concurrency: int = 1000, retries: int = 6,
                 retry_base: float = 2.0) -> None:
        self.loop = loop
        self._load = load  # (lo, hi, limit) -> [(obj, due)] with lo <= due < hi, soonest first
        self._pending = pending
        self._fire = fire
        self._give_up = give_up
        self.clock = clock
        self.window = window_ms
        self.rate = rate
        self.concurrency = concurrency
        self.retries = retries
        self.retry_base = retry_base
        self.horizon = 0  # every alarm due before this is known here (ms)
        self._heap: list[tuple[int, bytes]] = []
        self._due: dict[bytes, int] = {}  # obj -> its alarm's due time (in window)
        self._running: dict[bytes, int] = {}  # obj -> the due time its handler runs for
        self._retry: dict[bytes, int] = {}  # obj -> failures so far (in memory)
        self._orig: dict[bytes, int] = {}  # obj -> the due time a scheduled retry is for
        self._timer: asyncio.TimerHandle | None = None
        self._refill_timer: asyncio.TimerHandle | None = None
        self._burst = max(1.0, rate / 10)  # at most 100 ms worth of alarms at once
        self._tokens = self._burst
        self._tokens_at = clock() / 1000
        self._closed = False
        self.fired = 0
        self.failed = 0
        self.dropped = 0
        self.lateness_ms: list[float] = []  # recent (due -> start) delays, for the stats
        self.lateness = Histogram(LATENESS_BUCKETS)  # every one, for [metrics]

    # -- what is known ------------------------------------------------------------
    def start(self) -> None:
        self.refill()

    def close(self) -> None:
        self._closed = True
        for t in (self._timer, self._refill_timer):
            if t is not None:
                t.cancel()

    def in_memory(self) -> int:
        return len(self._due)

    def on_alarm(self, obj: bytes, due: int | None) -> None:
        """A durable change of ``obj``'s alarm (the slot calls this)."""
        if obj not in self._running:  # a new alarm: a retry of the old one is off
            self._retry.pop(obj, None)
            self._orig.pop(obj, None)
        if due is None or due >= self.horizon:
            self._due.pop(obj, None)  # (a stale heap entry is skipped when it comes up)
            return
        self._add(obj, due)

    def _add(self, obj: bytes, due: int) -> None:
        self._due[obj] = due
        heapq.heappush(self._heap, (due, obj))
        if self._heap[0][0] == due:  # the soonest now: the timer moves
            self._arm()

    def refill(self) -> None:
        """Load what comes due before ``now + window`` that is not known yet."""
        self._refill_timer = None
        if self._closed:
            return
        lo, hi = self.horizon, self.clock() + self.window
        if hi > lo:
            rows = self._load(lo, hi, _LOAD_LIMIT)
            if len(rows) == _LOAD_LIMIT and rows[-1][1] > lo:
                hi = rows[-1][1]  # a backlog: take it in parts, soonest first
                rows = [r for r in rows if r[1] < hi]
            pending = self._pending()
            for obj, due in rows:
                if obj not in pending and obj not in self._running:
                    self._add(obj, due)
            for obj, due in pending.items():  # changes DuckDB does not have yet
                if due is not None and lo <= due < hi and obj not in self._running:
                    self._add(obj, due)
            self.horizon = hi
        delay = max(0.05, min(self.window / 2000, (self.horizon - self.clock()) / 2000))
        self._refill_timer = self.loop.call_later(delay, self.refill)
        self._arm()

    # -- firing -------------------------------------------------------------------
    def _arm(self) -> None:
        if self._closed:
            return
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale: deleted, replaced, or running
        if not self._heap:
            return
        delay = max(0.0, (self._heap[0][0] - self.clock()) / 1000)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._run_due)

    def _take_token(self) -> bool:
        now = self.clock() / 1000
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _run_due(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self.clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, obj = heap[0]
            if self._due.get(obj) != due:
                heapq.heappop(heap)
                continue
            if obj in self._running:  # its handler runs: this one waits for it to end
                heapq.heappop(heap)  # (still in _due: _done puts it back)
                continue
            if len(self._running) >= self.concurrency:
                return  # a handler's end (_done) arms the timer again
            if not self._take_token():  # the rate: wait for the next token
                self._timer = self.loop.call_later(max(0.001, 1 / self.rate), self._run_due)
                return
            heapq.heappop(heap)
            del self._due[obj]
            self._start(obj, due, now)
        self._arm()

    def _start(self, obj: bytes, at: int, now: int) -> None:
        due = self._orig.pop(obj, at)  # a retry runs for the alarm it retries
        self._running[obj] = due
        retry = self._retry.get(obj, 0)
        if retry == 0:
            self.lateness_ms.append(now - due)
            self.lateness.observe(max(0, now - due) / 1000)
            if len(self.lateness_ms) > 4096:
                del self.lateness_ms[:2048]
        self.fired += 1
        try:
            self._fire(obj, due, retry, lambda error: self._done(obj, due, error))
        except Exception as e:  # (the object process could not even start it)
            self._done(obj, due, e)

    def _done(self, obj: bytes, due: int, error: BaseException | None) -> None:
        self._running.pop(obj, None)
        if self._closed:
            return
        if error is None:
            self._retry.pop(obj, None)
        elif obj in self._due:  # it raised after setting a new alarm: the new one stands
            self._retry.pop(obj, None)
        else:
            self.failed += 1
            n = self._retry.get(obj, 0) + 1
            if n > self.retries:
                self._retry.pop(obj, None)
                self.dropped += 1
                self._give_up(obj, due, error)
            else:
                self._retry[obj] = n
                self._orig[obj] = due
                again = self.clock() + int(self.retry_base * 2 ** (n - 1) * 1000)
                if again < self.horizon:
                    self._add(obj, again)
                else:
                    self._due[obj] = again  # beyond the window: kept in memory all the same
                    heapq.heappush(self._heap, (again, obj))
        if obj in self._due:  # an alarm that came due (or was set) while it ran: its turn now
            heapq.heappush(self._heap, (self._due[obj], obj))
        self._arm()

    def stats(self) -> dict[str, Any]:
        late = sorted(self.lateness_ms[-1024:])
        return {"alarms_in_memory": len(self._due), "alarms_running": len(self._running),
                "alarms_fired": self.fired, "alarms_failed": self.failed,
                "alarms_dropped": self.dropped,
                "alarm_lateness_p50_ms": late[len(late) // 2] if late else None,
                "alarm_lateness_p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))]
                if late else None, "alarm_lateness": self.lateness.snapshot()}
