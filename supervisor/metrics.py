"""``[metrics] listen``: one Prometheus scrape covers every process of the daemon.

The supervisor serves ``/metrics`` (``prometheus_client``'s HTTP server, a thread of
its own) and builds the families at each scrape from what it already has: its
children's states, restarts and memory, and the broker's statistics (asked on the
operator socket), which carry each object process's figures from its last
heartbeat (at most a second old): calls by namespace, kind and outcome, latency
histograms, active objects, evictions, storage, fsync latency, GC pauses, alarms, WebSockets.
Nothing is counted twice and no process but the supervisor listens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import zmq
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from durable.protocol.messages import Hello, Stats, StatsReply, Welcome, parse_from_broker_to_client

__all__ = ["DaemonCollector", "serve", "broker_statistics"]

log = logging.getLogger("durable.supervisor")


def broker_statistics(endpoint: str, timeout_ms: int = 2000) -> dict[str, Any] | None:
    """The broker's statistics over its operator socket (None if it does not answer)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(Hello(os.getpid(), "metrics").encode())
        sock.send_multipart(Stats(1).encode())
        while sock.poll(timeout_ms):
            msg = parse_from_broker_to_client(sock.recv_multipart())
            if type(msg) is StatsReply:
                return msg.stats
            if type(msg) is not Welcome:
                return None
        return None
    except (zmq.ZMQError, ValueError) as e:
        log.debug("metrics: broker statistics unavailable: %s", e)
        return None
    finally:
        sock.close(linger=0)


def _histogram(name: str, doc: str, label_names: list[str], buckets: tuple[float, ...],
               series: list[tuple[list[str], list[Any]]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=label_names)
    for labels, (counts, total, _n) in series:
        cumulative, running = [], 0
        for bound, c in zip([*map(str, buckets), "+Inf"], counts, strict=True):
            running += c
            cumulative.append((bound, running))
        fam.add_metric(labels, cumulative, total)
    return fam


class DaemonCollector(Collector):
    """Families built at scrape time (see the module)."""

    def __init__(self, processes: Callable[[], list[dict[str, Any]]],
                 statistics: Callable[[], dict[str, Any] | None]) -> None:
        self._processes = processes
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        from durable.objectproc.metrics import (
            CALL_BUCKETS,
            FSYNC_BUCKETS,
            GC_BUCKETS,
            LATENESS_BUCKETS,
            LOOP_LAG_BUCKETS,
        )

        procs = self._processes()
        up = GaugeMetricFamily("durable_process_up", "1 if the process runs", labels=["role", "slot"])
        restarts = CounterMetricFamily("durable_process_restarts", "restarts of the process, "
                                       "by cause", labels=["role", "slot", "cause"])
        rss = GaugeMetricFamily("durable_process_resident_bytes", "resident memory",
                                labels=["role", "slot"])
        for p in procs:
            labels = [p["role"], "" if p["slot"] is None else str(p["slot"])]
            up.add_metric(labels, 1.0 if p["state"] == "running" else 0.0)
            rss.add_metric(labels, float(p.get("rss") or 0))
            for cause, n in (p.get("restart_causes") or {}).items():
                restarts.add_metric([*labels, cause], n)
        yield from (up, restarts, rss)
        stats = self._statistics()
        if stats is None:
            yield GaugeMetricFamily("durable_broker_up", "1 if the broker answered the scrape",
                                    value=0.0)
            return
        yield GaugeMetricFamily("durable_broker_up", "1 if the broker answered the scrape",
                                value=1.0)
        broker = stats.get("broker", {})
        counters = broker.get("counters", {})
        refused = CounterMetricFamily("durable_broker_refused_calls", "calls the broker refused "
                                      "or failed, by error code", labels=["code"])
        for key, n in counters.items():
            if key.startswith("error_"):
                refused.add_metric([key[len("error_"):]], n)
        yield refused
        yield GaugeMetricFamily("durable_broker_clients", "connected clients",
                                value=float(broker.get("clients", 0)))
        calls = CounterMetricFamily("durable_calls", "calls answered by object processes",
                                    labels=["namespace", "kind", "outcome"])
        latency: list[tuple[list[str], list[Any]]] = []
        merged: dict[str, list[Any]] = {}
        call_counts: dict[tuple[str, str, str], int] = {}
        slot_gauges = {name: GaugeMetricFamily(f"durable_{name}", doc, labels=["slot"])
                       for name, doc in (
                           ("active_objects", "objects loaded (not evicted)"),
                           ("queued_calls", "calls waiting in the broker for the slot"),
                           ("inflight_calls", "calls dispatched to the slot, not answered"),
                           ("websockets_open", "WebSockets accepted by the slot's objects"),
                           ("storage_keys", "live keys stored in the slot (counted every 10 s)"),
                           ("storage_file_bytes", "the slot's DuckDB file and WAL"),
                           ("commit_log_bytes", "the slot's commit log segments"),
                           ("duckdb_memory_limit_bytes", "the slot's DuckDB memory limit (grows "
                                                         "past duckdb_memory_mb if the indexes "
                                                         "need it)"),
                           ("duckdb_index_bytes", "memory the slot's DuckDB indexes hold "
                                                  "(checked every 2 s while it writes; low "
                                                  "just after a checkpoint)"),
                           ("apply_lag_records", "durable records not yet in DuckDB"),
                           ("alarms_in_memory", "alarms due within the scheduler's window"),
                           ("peer_links_up", "the slot process's links to the host's other "
                                             "slots that are up (docs/messaging.md)"))}
        evicted = CounterMetricFamily("durable_evictions", "objects evicted (idle)",
                                      labels=["slot"])
        peer_calls = CounterMetricFamily("durable_peer_calls", "calls the slot served that came "
                                         "straight from the host's other slots, not through "
                                         "the broker", labels=["slot"])
        overloaded = CounterMetricFamily("durable_slot_overloaded_calls", "calls an object "
                                         "process refused (bodies over max_inflight_mb)",
                                         labels=["slot"])
        stalls = CounterMetricFamily("durable_slot_stalls", "times an object process found it "
                                     "could not beat for 3/4 of the broker's window (stopped, "
                                     "starved, the GIL held): kept, the broker said it still "
                                     "served; registered_anew, it had ended it or did not "
                                     "answer (that slot's stubs broke)",
                                     labels=["slot", "outcome"])
        pending = GaugeMetricFamily("durable_alarms_pending", "alarms set and not yet run",
                                    labels=["namespace"])
        fsync, lateness, gc_pauses, loop_lag = [], [], [], []
        pending_by_ns: dict[str, int] = {}
        for s in stats.get("slots", []):
            slot = str(s["slot"])
            r = s.get("reported") or {}
            values = {"active_objects": r.get("active"), "queued_calls": s.get("queued"),
                      "inflight_calls": s.get("inflight"), "websockets_open": r.get("websockets"),
                      "storage_keys": r.get("storage_keys"),
                      "storage_file_bytes": r.get("storage_file_bytes"),
                      "commit_log_bytes": r.get("log_bytes"),
                      "duckdb_memory_limit_bytes": r.get("duckdb_memory_limit"),
                      "duckdb_index_bytes": r.get("duckdb_index_bytes"),
                      "apply_lag_records": (r["durable_seq"] - r["applied_seq"])
                      if "durable_seq" in r and "applied_seq" in r else None,
                      "alarms_in_memory": r.get("alarms_in_memory"),
                      "peer_links_up": r.get("peer_links_up")}
            for name, v in values.items():
                if v is not None:
                    slot_gauges[name].add_metric([slot], float(v))
            evicted.add_metric([slot], r.get("evicted", 0))
            overloaded.add_metric([slot], r.get("overloaded", 0))
            peer_calls.add_metric([slot], r.get("peer_calls_served", 0))
            stalls.add_metric([slot, "kept"], r.get("stall_asks_alive", 0))
            stalls.add_metric([slot, "registered_anew"], r.get("stalls", 0))
            m = r.get("metrics") or {}
            for ns, kind, outcome, n in m.get("calls", []):
                call_counts[(ns, kind, outcome)] = call_counts.get((ns, kind, outcome), 0) + n
            for ns, (counts, total, n) in (m.get("latency") or {}).items():
                acc = merged.setdefault(ns, [[0] * len(counts), 0.0, 0])
                acc[0] = [a + b for a, b in zip(acc[0], counts, strict=True)]
                acc[1] += total
                acc[2] += n
            if r.get("fsync"):
                fsync.append(([slot], r["fsync"]))
            for generation, h in sorted((r.get("gc_pauses") or {}).items()):
                gc_pauses.append(([slot, generation], h))
            if r.get("loop_lag"):
                loop_lag.append(([slot], r["loop_lag"]))
            if r.get("alarm_lateness"):
                lateness.append(([slot], r["alarm_lateness"]))
            for ns, (n, _due) in (r.get("alarms") or {}).items():
                pending_by_ns[ns] = pending_by_ns.get(ns, 0) + n
        for (ns, kind, outcome), n in sorted(call_counts.items()):
            calls.add_metric([ns, kind, outcome], n)
        latency = [([ns], v) for ns, v in sorted(merged.items())]
        for ns, n in sorted(pending_by_ns.items()):
            pending.add_metric([ns], n)
        yield calls
        yield _histogram("durable_call_duration_seconds", "from a call's arrival in its object "
                         "process to its answer (output gate included)", ["namespace"],
                         CALL_BUCKETS, latency)
        yield from slot_gauges.values()
        yield from (evicted, overloaded, peer_calls, stalls, pending)
        yield _histogram("durable_commit_fsync_seconds", "one group commit's fdatasync of the "
                         "commit log", ["slot"], FSYNC_BUCKETS, fsync)
        yield _histogram("durable_gc_pause_seconds", "one collection of the object process's "
                         "garbage collector (every object of the slot waits for it)",
                         ["slot", "generation"], GC_BUCKETS, gc_pauses)
        yield _histogram("durable_loop_lag_seconds", "how late the object process's event loop "
                         "ran a task that was due (every call of the slot waits as long)",
                         ["slot"], LOOP_LAG_BUCKETS, loop_lag)
        yield _histogram("durable_alarm_lateness_seconds", "from an alarm's due time to its "
                         "handler's start", ["slot"], LATENESS_BUCKETS, lateness)


def serve(listen: str, processes: Callable[[], list[dict[str, Any]]], admin_endpoint: str) -> Any:
    """Start the scrape endpoint (a thread); returns the server (``shutdown()`` it at exit)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(processes, lambda: broker_statistics(admin_endpoint)))
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
