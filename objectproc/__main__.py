"""``python -m durable.objectproc``: host one slot's objects until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import duckdb
import orjson

from durable.errors import StorageCorruptError
from durable.exitcodes import EXIT_CONFIG, EXIT_CORRUPT, EXIT_DISK_FULL, EXIT_STORAGE
from durable.supervisor import lifeline, logs

from .loop import ObjectProcess, ObjectProcessConfig
from .storage import StorageLimits
from .storage.log import is_disk_full
from .storage.recovery import DataDirMismatchError


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"--{what} takes NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m durable.objectproc")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--backend", required=True, help="the broker's object-process endpoint")
    p.add_argument("--frontend", required=True, help="the broker's client endpoint (for env calls)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--namespace", action="append", default=[], help="NAME=module:Class (repeat)")
    p.add_argument("--var", action="append", default=[], help="NAME=VALUE for env.vars (repeat)")
    p.add_argument("--vars-json", default="{}", help="env.vars as a JSON object")
    p.add_argument("--max-key-bytes", type=int, default=2048)
    p.add_argument("--max-value-bytes", type=int, default=32768)
    p.add_argument("--max-keys-per-call", type=int, default=128)
    p.add_argument("--duckdb-memory-mb", type=int, default=512)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--data-dir-id", help="the data dir's identity (its slot files must match)")
    p.add_argument("--checkpoint-wal-mb", type=int, default=8)
    p.add_argument("--checkpoint-interval", type=float, default=30.0)
    p.add_argument("--max-inflight-mb", type=int, default=256)
    p.add_argument("--cpu-limit-ms", type=int, default=30_000)
    p.add_argument("--namespace-cpu-limit-ms", action="append", default=[],
                   help="NAME=MS: another CPU limit for one namespace (repeat)")
    p.add_argument("--wait-until-limit", type=float, default=30.0)
    p.add_argument("--debug", action="store_true", help="send object tracebacks to callers")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logs.setup(args.log_level, f"objectproc slot={args.slot} pid={os.getpid()}")
    variables = orjson.loads(args.vars_json)
    variables.update(_pairs(args.var, "var"))
    config = ObjectProcessConfig(
        slot=args.slot, backend=args.backend, frontend=args.frontend, data_dir=args.data_dir,
        namespaces=_pairs(args.namespace, "namespace"), vars=variables,
        idle_timeout=args.idle_timeout, heartbeat=args.heartbeat,
        limits=StorageLimits(args.max_key_bytes, args.max_value_bytes, args.max_keys_per_call),
        duckdb_memory_mb=args.duckdb_memory_mb, data_dir_id=args.data_dir_id,
        checkpoint_wal_bytes=args.checkpoint_wal_mb << 20,
        checkpoint_interval=args.checkpoint_interval,
        max_inflight_bytes=args.max_inflight_mb << 20,
        cpu_limit=args.cpu_limit_ms / 1000,
        cpu_limits={n: int(ms) / 1000 for n, ms in
                    _pairs(args.namespace_cpu_limit_ms, "namespace-cpu-limit-ms").items()},
        wait_until_limit=args.wait_until_limit, debug=args.debug)
    try:
        proc = ObjectProcess(config)
    except ValueError as e:
        logging.getLogger("durable.objectproc").error("configuration error: %s", e)
        return EXIT_CONFIG

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, proc.stop)
        loop.add_signal_handler(signal.SIGINT, proc.stop)
        mark = proc.loop_mark
        proc.lifeline = lifeline.start(lambda: mark[0])
        ticker = asyncio.create_task(lifeline.tick_forever(mark))
        try:
            await proc.run()
        finally:
            ticker.cancel()

    log = logging.getLogger("durable.objectproc")
    try:
        asyncio.run(run())
    except DataDirMismatchError as e:
        log.error("slot %d: %s", args.slot, e)
        return EXIT_STORAGE
    except StorageCorruptError as e:
        log.error("slot %d is corrupt and stays down; every file was kept as it is. %s",
                  args.slot, e)
        return EXIT_CORRUPT
    except (OSError, duckdb.Error) as e:
        if is_disk_full(e):
            log.error("slot %d: storage in %s cannot be opened, the disk is full: %s", args.slot,
                      args.data_dir, e)
            return EXIT_DISK_FULL
        log.error("slot %d: storage in %s cannot be opened: %s: %s", args.slot, args.data_dir,
                  type(e).__name__, e)
        return EXIT_STORAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
