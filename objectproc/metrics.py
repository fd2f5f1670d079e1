"""What an object process counts for ``[metrics]`` (sent with its heartbeat, once a second).

Plain counters and fixed-bucket histograms (cheap: a dict increment and a bisect per
call); the supervisor turns them into Prometheus families (``supervisor/metrics.py``).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import time
from collections import Counter
from typing import Any

__all__ = ["Histogram", "CallMetrics", "GcPauses", "CALL_BUCKETS", "FSYNC_BUCKETS", "GC_BUCKETS",
           "LATENESS_BUCKETS", "LOOP_LAG_BUCKETS"]

#: seconds: a call from its arrival to its answer (output gate included)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)
#: seconds: one group commit's fdatasync
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 1.0)
#: seconds: one collection of the garbage collector
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: seconds: how late the object process's loop resumed a task whose timer was due
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)
#: seconds: how late an alarm's handler started after its due time
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0)


class Histogram:
    """Counts per bucket (not cumulative), the sum and the count."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> list[Any]:
        return [list(self.counts), round(self.sum, 6), self.count]


class CallMetrics:
    """Calls by (namespace, kind, outcome) and latency histograms by namespace."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}

    def record(self, namespace: str, kind: str, outcome: str, seconds: float) -> None:
        self.calls[(namespace, kind, outcome)] += 1
        h = self.latency.get(namespace)
        if h is None:
            h = self.latency[namespace] = Histogram(CALL_BUCKETS)
        h.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        return {"calls": [[*k, n] for k, n in self.calls.items()],
                "latency": {ns: h.snapshot() for ns, h in self.latency.items()}}


class GcPauses:
    """The garbage collector's pauses, by generation (0, 1, 2), from ``gc.callbacks``.

    A collection holds the GIL: every object of the slot waits for it, so a call can be slow
    for a reason none of the calls' own figures show. A full (generation 2) collection takes
    longer the more objects are alive, and comes rarely (objectproc/collector.py).
    """

    __slots__ = ("by_generation", "_started", "_clock")

    def __init__(self) -> None:
        self.by_generation = tuple(Histogram(GC_BUCKETS) for _ in range(3))
        self._started: float | None = None
        self._clock = time.perf_counter  # (held: a collection at exit may outlive the module's globals)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        # (collections never overlap: the collector runs one at a time, whichever thread
        # triggers it, so one start time is enough)
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            self.by_generation[info["generation"]].observe(self._clock() - self._started)
            self._started = None

    def install(self) -> None:
        if not any(cb is self for cb in gc.callbacks):
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)

    def snapshot(self) -> dict[str, list[Any]]:
        """Generation -> ``Histogram.snapshot()``, for the generations that have collected."""
        return {str(g): h.snapshot() for g, h in enumerate(self.by_generation) if h.count}
