"""The alarm scheduler with a fake clock: order, never early, retries, rate, the window."""

from __future__ import annotations

import heapq

import pytest

from durable.objectproc.alarms import AlarmScheduler


class FakeLoop:
    """call_later against a clock the test moves (ms), run in time order."""

    def __init__(self) -> None:
        self.now_ms = 1_000_000
        self._timers: list[tuple[float, int, object]] = []
        self._n = 0

    def clock(self) -> int:
        return self.now_ms

    def call_later(self, delay: float, fn):
        self._n += 1
        handle = Handle(fn)
        heapq.heappush(self._timers, (self.now_ms + delay * 1000, self._n, handle))
        return handle

    def advance(self, ms: int) -> None:
        end = self.now_ms + ms
        while self._timers and self._timers[0][0] <= end:
            at, _, handle = heapq.heappop(self._timers)
            self.now_ms = max(self.now_ms, int(at))
            if not handle.cancelled:
                handle.fn()
        self.now_ms = end


class Handle:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class World:
    """Stored alarms (what DuckDB holds) and a handler the test scripts."""

    def __init__(self, **kw) -> None:
        self.loop = FakeLoop()
        self.stored: dict[bytes, int] = {}
        self.fired: list[tuple[bytes, int, int, int]] = []  # (obj, due, retry, at)
        self.running: dict[bytes, object] = {}
        self.fail: dict[bytes, int] = {}  # obj -> how many more runs raise
        self.auto_finish = True
        self.given_up: list[bytes] = []
        self.s = AlarmScheduler(self.loop, self.load, lambda: {}, self.fire, self.give_up,
                                clock=self.loop.clock, **kw)

    def load(self, lo, hi, limit):
        return sorted(((o, d) for o, d in self.stored.items() if lo <= d < hi), key=lambda r: r[1])[:limit]

    def fire(self, obj, due, retry, done):
        self.fired.append((obj, due, retry, self.loop.now_ms))
        if self.auto_finish:
            self.finish(obj, due, done)
        else:
            self.running[obj] = (due, done)

    def finish(self, obj, due, done):
        if self.fail.get(obj, 0) > 0:
            self.fail[obj] -= 1
            done(RuntimeError("handler raised"))
            return
        if self.stored.get(obj) == due:  # the activation deletes the alarm it ran
            del self.stored[obj]
            self.s.on_alarm(obj, None)
        done(None)

    def give_up(self, obj, due, error):
        self.given_up.append(obj)
        if self.stored.get(obj) == due:
            del self.stored[obj]

    def set(self, obj: bytes, due: int) -> None:  # an acknowledged set_alarm
        self.stored[obj] = due
        self.s.on_alarm(obj, due)


def test_alarms_fire_in_due_order_never_early():
    w = World()
    now = w.loop.now_ms
    for i, delay in enumerate([5000, 100, 2500, 100]):
        w.set(b"NS/o%d" % i, now + delay)
    w.s.start()
    w.loop.advance(10_000)
    assert [f[0] for f in w.fired] == [b"NS/o1", b"NS/o3", b"NS/o2", b"NS/o0"]
    assert all(at >= due for _, due, _, at in w.fired)
    assert w.stored == {}


def test_setting_again_replaces_and_deleting_cancels():
    w = World()
    w.s.start()
    now = w.loop.now_ms
    w.set(b"NS/a", now + 1000)
    w.set(b"NS/a", now + 3000)  # replaced: fires once, at the later time
    w.set(b"NS/b", now + 2000)
    del w.stored[b"NS/b"]
    w.s.on_alarm(b"NS/b", None)
    w.loop.advance(5000)
    assert [(o, d) for o, d, _, _ in w.fired] == [(b"NS/a", now + 3000)]


def test_alarms_beyond_the_window_are_loaded_before_they_are_due():
    w = World(window_ms=10_000)
    now = w.loop.now_ms
    w.stored = {b"NS/far%d" % i: now + 25_000 + i for i in range(3)}  # in DuckDB only
    w.s.start()
    assert w.s.in_memory() == 0  # not in memory while far away
    w.loop.advance(30_000)
    assert sorted(f[0] for f in w.fired) == [b"NS/far0", b"NS/far1", b"NS/far2"]
    assert all(at >= due for _, due, _, at in w.fired)


def test_a_raising_handler_is_retried_with_doubling_backoff_then_dropped():
    w = World(retries=3, retry_base=2.0)
    w.s.start()
    now = w.loop.now_ms
    w.set(b"NS/x", now)
    w.fail[b"NS/x"] = 99
    w.loop.advance(60_000)
    runs = [(retry, at - now) for o, _, retry, at in w.fired]
    assert [r for r, _ in runs] == [0, 1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in zip(runs, runs[1:], strict=False)]
    assert gaps == [2000, 4000, 8000]
    assert w.given_up == [b"NS/x"] and b"NS/x" not in w.stored


def test_a_retry_that_succeeds_deletes_the_alarm():
    w = World(retry_base=1.0)
    w.s.start()
    w.set(b"NS/y", w.loop.now_ms + 10)
    w.fail[b"NS/y"] = 1
    w.loop.advance(5000)
    assert [r for _, _, r, _ in w.fired] == [0, 1] and w.stored == {} and w.given_up == []


def test_an_object_never_runs_its_handler_twice_at_once():
    w = World()
    w.auto_finish = False
    w.s.start()
    now = w.loop.now_ms
    w.set(b"NS/z", now + 10)
    w.loop.advance(100)
    assert len(w.fired) == 1
    # While it runs, the handler sets the next alarm, already due.
    w.set(b"NS/z", now + 50)
    w.loop.advance(1000)
    assert len(w.fired) == 1  # waits for the running one
    due, done = w.running.pop(b"NS/z")
    w.finish(b"NS/z", due, done)  # the first ends: the stored alarm is the new one, kept
    w.loop.advance(10)
    assert [d for _, d, _, _ in w.fired] == [now + 10, now + 50]


def test_a_backlog_after_downtime_fires_oldest_first_under_the_rate():
    w = World(rate=100.0)
    now = w.loop.now_ms
    w.stored = {b"NS/b%03d" % i: now - 100_000 + i * 10 for i in range(300)}
    w.s.start()
    w.loop.advance(1000)
    first = len(w.fired)
    assert 90 <= first <= 110  # about 100 in the first second
    w.loop.advance(5000)
    assert len(w.fired) == 300
    dues = [d for _, d, _, _ in w.fired]
    assert dues == sorted(dues)


def test_concurrency_is_bounded():
    w = World(concurrency=5)
    w.auto_finish = False
    now = w.loop.now_ms
    w.stored = {b"NS/c%d" % i: now for i in range(20)}
    w.s.start()
    w.loop.advance(1000)
    assert len(w.running) == 5
    for obj in list(w.running)[:3]:
        due, done = w.running.pop(obj)
        w.finish(obj, due, done)
    w.loop.advance(100)
    assert len(w.running) == 5 and len(w.fired) == 8


@pytest.mark.parametrize("n", [1, 3])
def test_close_stops_everything(n):
    w = World()
    w.s.start()
    for i in range(n):
        w.set(b"NS/q%d" % i, w.loop.now_ms + 100)
    w.s.close()
    w.loop.advance(10_000)
    assert w.fired == []
