"""Disk use under sustained writes: DuckDB's WAL and the commit log stay bounded.

    python scripts/soak_disk.py --seconds 600        # the 10-minute run (JSON on stdout)
    python scripts/soak_disk.py --seconds 60         # what CI runs

Runs a real daemon (1 slot), keeps ``--inflight`` writes going: half overwrite
a small set of hot keys, half add new keys (so the store grows). Every second
it samples the slot's DuckDB main file, its WAL and the commit log's segments.
It fails (exit 1) if the WAL ever passes ``--wal-bound-mb`` or the main file
did not grow, i.e. if checkpoints stopped. Bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import serving  # noqa: E402

import durable  # noqa: E402

CONFIG = """
data_dir = "{data}"
slots = 1
checkpoint_wal_mb = {wal_mb}
[broker]
heartbeat = 1.0
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.KV]
class = "tests.integration.objects:KV"
"""


def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(len(s) * p))] * 1000, 2) if s else 0.0


def sizes(data: Path) -> dict[str, int]:
    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return 0
    log = sum(size(p) for p in (data / "slot-0.log").glob("*.seg"))
    return {"main": size(data / "slot-0.duckdb"), "wal": size(data / "slot-0.duckdb.wal"),
            "log": log}


async def writers(frontend: str, seconds: float, inflight: int, value: int,
                  lat: list[float]) -> dict[str, int]:
    counts = {"hot": 0, "unique": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    # Random (incompressible) values: the disk figure per key is then an honest one.
    payload_of = [secrets.token_hex(value // 2) for _ in range(1024)]
    async with durable.connect(frontend) as client:
        ns = client.namespace("KV")
        stubs = [ns.get(ns.id_from_name(f"obj-{i}")) for i in range(100)]

        async def one(w: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                stub = stubs[(w * 7 + i) % 100]
                payload = payload_of[(w * 31 + i) % 1024]
                if i % 2:
                    url, kind = f"http://do/?k=hot{i % 8}&v={payload}", "hot"
                else:
                    url, kind = f"http://do/?k=u{w}-{i}&v={payload}", "unique"
                try:
                    t = time.perf_counter()
                    await stub.fetch(url, method="POST", timeout=30)
                    lat.append(time.perf_counter() - t)
                    counts[kind] += 1
                except durable.DurableError:
                    counts["errors"] += 1
                i += 1

        await asyncio.gather(*(one(w) for w in range(inflight)))
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--checkpoint-wal-mb", type=int, default=16)
    p.add_argument("--wal-bound-mb", type=float, default=64.0)
    args = p.parse_args()
    samples: list[dict[str, float]] = []
    with serving(CONFIG.replace("{wal_mb}", str(args.checkpoint_wal_mb))) as d:
        data = d.data
        start = sizes(data)
        task_result: dict[str, int] = {}
        lat: list[float] = []

        async def run() -> None:
            t0 = time.monotonic()
            work = asyncio.ensure_future(writers(d.frontend, args.seconds, args.inflight,
                                                 args.value_bytes, lat))
            while not work.done():
                await asyncio.sleep(1.0)
                s = sizes(data)
                samples.append({"t": round(time.monotonic() - t0, 1), **s})
                print(f"{samples[-1]['t']:6.0f} s  main {s['main'] / 2**20:8.1f} MiB  "
                      f"wal {s['wal'] / 2**20:6.1f} MiB  log {s['log'] / 2**20:6.1f} MiB",
                      file=sys.stderr, flush=True)
            task_result.update(await work)

        asyncio.run(run())
        end = sizes(data)
    writes = task_result["hot"] + task_result["unique"]
    peak_wal = max(s["wal"] for s in samples)
    peak_log = max(s["log"] for s in samples)
    # A checkpoint shows as the WAL shrinking between two samples.
    wal_drops = sum(1 for a, b in itertools.pairwise(samples) if b["wal"] < a["wal"])
    live_keys = task_result["unique"] + 8 * 100  # every unique key, and at most 8 hot per object
    result = {
        "seconds": args.seconds, "inflight": args.inflight, "value_bytes": args.value_bytes,
        "checkpoint_wal_mb": args.checkpoint_wal_mb, "wal_bound_mb": args.wal_bound_mb,
        "writes": writes, "writes_per_s": round(writes / args.seconds), **task_result,
        "peak_wal_mb": round(peak_wal / 2**20, 2), "peak_log_mb": round(peak_log / 2**20, 2),
        "wal_drops": wal_drops,
        "main_mb_start": round(start["main"] / 2**20, 2),
        "main_mb_end": round(end["main"] / 2**20, 2),
        "live_keys_at_most": live_keys,
        "write_ms": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "p999": _pct(lat, 0.999),
                     "max": _pct(lat, 1.0)},
        "disk_bytes_per_live_key": round(end["main"] / max(1, live_keys), 1),
        "samples": samples,
    }
    result["ok"] = (peak_wal <= args.wal_bound_mb * 2**20 and end["main"] > start["main"]
                    and task_result["errors"] == 0)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
