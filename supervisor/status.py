"""The supervisor's status file (rewritten every second) and `durable status` around it.

The file lives in the 0700 run directory, so only the daemon's user reads it.
`durable status` joins it with the broker's live statistics and the size of
the data directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson
import psutil

from .config import Config

__all__ = ["write", "read", "remove", "NotRunning", "collect", "render", "when"]


class NotRunning(Exception):
    """No daemon is running for this configuration."""


def _path(config: Config) -> Path:
    return config.run_dir / "status.json"


def write(config: Config, data: dict[str, Any]) -> None:
    path = _path(config)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def remove(config: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(config).unlink()


def read(config: Config) -> dict[str, Any]:
    try:
        data = orjson.loads(_path(config).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        raise NotRunning(f"no durable daemon is running for {config.data_path} "
                         f"({config.source}); start one with `durable serve`") from None
    pid = data.get("supervisor", {}).get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        raise NotRunning(f"the durable daemon for {config.data_path} is not running (it left a "
                         f"status file behind, pid {pid}); start one with `durable serve`")
    return data


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def collect(config: Config, broker_stats: dict[str, Any] | None) -> dict[str, Any]:
    data = read(config)
    slots = {s["slot"]: s for s in (broker_stats or {}).get("slots", [])}
    for p in data["processes"]:
        s = slots.get(p["slot"]) if p["role"] == "objectproc" else None
        if s is not None:
            reported = s.get("reported", {})
            p["active_objects"] = reported.get("active")
            p["queued_calls"] = s.get("queued")
            p["inflight_calls"] = s.get("inflight")
            # (objectproc/collector.py: full collections, suspects, sampled young collections)
            p["gc"] = reported.get("gc")
            p["storage"] = {k: reported.get(k) for k in ("storage_full", "storage_full_why",
                                                          "wal_bytes", "log_bytes",
                                                          "checkpoints", "checkpoints_put_back",
                                                          "durable_seq", "applied_seq",
                                                          "duckdb_memory_limit",
                                                          "duckdb_index_bytes")}
            if reported.get("storage_full") and p["state"] == "running":
                p["state"] = "storage-full"  # serving reads, refusing writes
    data["storage"] = {"dir": str(config.data_path), "bytes": _dir_size(config.data_path)}
    data["broker"] = (broker_stats or {}).get("broker", {})
    data["alarms"] = _alarms(slots.values())
    return data


def _alarms(slots: Any) -> dict[str, dict[str, Any]]:
    """Pending alarms per namespace, over every slot, and the soonest one's due time."""
    out: dict[str, dict[str, Any]] = {}
    for s in slots:
        for ns, (n, due) in (s.get("reported", {}).get("alarms") or {}).items():
            a = out.setdefault(ns, {"pending": 0, "next_due_ms": None})
            a["pending"] += n
            if due is not None and (a["next_due_ms"] is None or due < a["next_due_ms"]):
                a["next_due_ms"] = due
    return out


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def when(ms: int | None) -> str:
    """An epoch-ms time as ISO 8601 UTC and how far ahead (or ago) it is."""
    import datetime as dt
    import time

    if ms is None:
        return "-"
    at = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
    ahead = ms / 1000 - time.time()
    return f"{at} ({'in ' + _dur(ahead) if ahead >= 0 else _dur(-ahead) + ' ago'})"


def render(data: dict[str, Any]) -> str:
    head = ("ROLE", "SLOT", "PID", "STATE", "UPTIME", "RESTARTS", "RSS", "CPU", "ACTIVE", "QUEUED")
    rows = [head]
    for p in data["processes"]:
        rows.append((p["role"], "-" if p["slot"] is None else str(p["slot"]), str(p["pid"] or "-"),
                     p["state"], _dur(p["uptime"]), str(p["restarts"]), _size(p["rss"]),
                     f"{p['cpu']:.0f}%", str(p.get("active_objects", "-") if p.get("active_objects") is not None else "-"),
                     str(p.get("queued_calls", "-") if p.get("queued_calls") is not None else "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    sup = data["supervisor"]
    lines.append("")
    lines.append(f"supervisor pid {sup['pid']}, {'ready' if sup['ready'] else 'starting'}; "
                 f"clients connect to {sup['frontend']}")
    lines.append(f"storage: {_size(data['storage']['bytes'])} in {data['storage']['dir']}")
    cluster = data.get("cluster")
    if cluster:
        lines.append(f"cluster host {cluster['host']}: serves slots "
                     f"{', '.join(map(str, cluster['slots'])) or 'none'}; live hosts: "
                     f"{', '.join(sorted(cluster['hosts'])) or 'none seen yet'}")
    spare = data.get("spare")
    if spare:
        lines.append(f"warm spare object process: pid {spare['pid']}, "
                     f"{'ready' if spare['ready'] else 'importing'}, {_size(spare['rss'])}")
    for p in data["processes"]:
        if p["state"] == "corrupt":
            lines.append(f"slot {p['slot']} is CORRUPT and out of service: run `durable verify "
                         f"--slot {p['slot']}`, then `durable repair --slot {p['slot']} --yes`")
        elif p["state"] == "storage-full" and (p.get("storage") or {}).get(
                "storage_full_why") == "memory":
            lines.append(f"slot {p['slot']}: DuckDB's indexes fill the memory it may use; it "
                         "serves reads and refuses writes: raise memory_limit_mb or add slots, "
                         "and restart (docs/operating.md, \"Memory\")")
        elif p["state"] == "storage-full":
            lines.append(f"slot {p['slot']}: the disk is full; it serves reads and refuses writes "
                         "until space is freed")
    for ns, a in sorted(data.get("alarms", {}).items()):
        lines.append(f"alarms: {ns}: {a['pending']} pending, next due {when(a['next_due_ms'])}")
    counters = data.get("broker", {}).get("counters", {})
    if counters:
        dropped = {k: v for k, v in counters.items() if k.startswith(("dropped", "unknown", "stray"))}
        lines.append(f"broker: {counters.get('calls', 0)} calls, {counters.get('replies', 0)} replies, "
                     f"dropped {sum(dropped.values())} bad messages"
                     + (f" ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})" if dropped else ""))
    return "\n".join(lines)
