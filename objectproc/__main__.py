"""``python -m durable.objectproc --settings PATH --slot N``: host one slot's objects until
SIGTERM. PATH is the supervisor's settings file (``supervisor/config.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import duckdb
import setproctitle

from durable.errors import StorageCorruptError
from durable.exitcodes import EXIT_CONFIG, EXIT_CORRUPT, EXIT_DISK_FULL, EXIT_STORAGE
from durable.objects import load_class
from durable.supervisor import lifeline, logs
from durable.supervisor.config import Config, ConfigError, settings_from_args

from .loop import ObjectProcess, ObjectProcessConfig
from .storage import StorageLimits
from .storage.log import is_disk_full
from .storage.recovery import DataDirMismatchError

#: an object process's own memory beside DuckDB's (Python, its modules, the filter, the active
#: objects): the part of ``memory_limit_mb`` DuckDB's limit does not grow into (docs/operating.md,
#: "Memory"). Measured: 167-187 MiB of RSS with DuckDB at 20 MB under 8 writers of new objects,
#: so 160 let the RSS limit restart a process before its DuckDB reached the ceiling.
_PYTHON_MB = 200


def process_config(cfg: Config, slot: int, data_dir_id: str | None) -> ObjectProcessConfig:
    """One object process's part of the daemon's configuration."""
    return ObjectProcessConfig(
        slot=slot, backend=cfg.backend(), frontend=cfg.frontend(), data_dir=str(cfg.data_path),
        namespaces=dict(cfg.namespaces), vars=dict(cfg.vars),
        secrets=dict(cfg.secrets), idle_timeout=cfg.idle_timeout,
        heartbeat=cfg.broker.heartbeat,
        limits=StorageLimits(cfg.limits.max_key_bytes, cfg.limits.max_value_bytes,
                             cfg.limits.max_keys_per_call),
        duckdb_memory_mb=cfg.duckdb_memory_mb, data_dir_id=data_dir_id,
        # (an RSS limit caps DuckDB's growth: under it, not a restart at every open)
        duckdb_memory_ceiling_mb=max(cfg.duckdb_memory_mb, cfg.memory_limit_mb - _PYTHON_MB)
        if cfg.memory_limit_mb else 0,
        checkpoint_wal_bytes=cfg.checkpoint_wal_mb << 20,
        checkpoint_interval=cfg.checkpoint_interval,
        max_inflight_bytes=cfg.max_inflight_mb << 20, cpu_limit=cfg.cpu_limit_ms / 1000,
        cpu_limits={n: ms / 1000 for n, ms in cfg.namespace_cpu_limits.items()},
        wait_until_limit=cfg.wait_until_limit, debug=cfg.debug, alarm_rate=cfg.alarm_rate,
        alarm_concurrency=cfg.alarm_concurrency, alarm_retries=cfg.alarm_retries,
        alarm_retry_base=cfg.alarm_retry_base,
        websocket_max_message=cfg.websocket_max_message_kb << 10,
        metrics=bool(cfg.metrics.listen), run_dir=str(cfg.run_dir),
        peer_calls=cfg.broker.peer_calls,
        cluster_servers=cfg.cluster.servers(), cluster_replicas=cfg.cluster.replicas,
        cluster_endpoint=f"tcp://{cfg.cluster.listen}" if cfg.cluster.enabled else "",
        slots=cfg.slots, cluster_key_file=cfg.cluster.curve_key if cfg.cluster.enabled else "")


def _stand_by(args: argparse.Namespace, argv: list[str]) -> int | None:
    """A warm spare: everything imported (ours and the namespaces' classes), then wait for
    the supervisor to name the slot to serve (a line on stdin). A slot killed at any moment
    then serves again without paying for an interpreter and its imports (~0.9 s of a 1.3 s
    restart on a slow 2-core VM). None: serve the slot now in ``args.slot``; else exit."""
    log = logging.getLogger("durable.objectproc")
    logs.setup(args.log_level, f"objectproc standby pid={os.getpid()}")
    try:
        cfg, _ = settings_from_args(args.settings, args.settings_fd)
        for spec in cfg.namespaces.values():
            load_class(spec)
        if args.http_fd is not None:  # (the HTTP front's imports too)
            import durable.broker.gateway  # noqa: F401
    except (ConfigError, ValueError, OSError) as e:
        log.error("standby: configuration error: %s", e)
        return EXIT_CONFIG
    fd = os.environ.get("DURABLE_LIFELINE_FD")
    if fd:  # the supervisor shows the spare as ready (`durable status`)
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), b"standby\n")
    line = sys.stdin.buffer.readline()  # EOF: the supervisor no longer needs a spare
    if not line.strip():
        return 0
    try:
        args.slot = int(line)
    except ValueError:
        log.error("standby: the supervisor sent %r, not a slot number", line[:40])
        return EXIT_CONFIG
    rest = [a for a in argv if a != "--standby"]
    # As if started for that slot: `ps`, `durable status` and operators' scripts find it so.
    setproctitle.setproctitle(" ".join([sys.executable, "-m", "durable.objectproc", *rest,
                                        "--slot", str(args.slot)]))
    return None


def main(argv: list[str] | None = None) -> int:
    lifeline.bind_to_parent()  # (the supervisor's child: die with it)
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m durable.objectproc")
    p.add_argument("--settings-fd", type=int, help="the supervisor's settings (an inherited fd)")
    p.add_argument("--settings", help="a settings file (write_settings), without a supervisor")
    p.add_argument("--slot", type=int)
    p.add_argument("--http-fd", type=int,
                   help='the listening socket to serve HTTP on ([http] front = "slots")')
    p.add_argument("--standby", action="store_true",
                   help="import everything, then serve the slot whose number comes on stdin")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.standby == (args.slot is not None):
        p.error("give exactly one of --slot N and --standby")
    if args.standby:
        code = _stand_by(args, argv)
        if code is not None:
            return code
    logs.setup(args.log_level, f"objectproc slot={args.slot} pid={os.getpid()}")
    try:
        cfg, runtime = settings_from_args(args.settings, args.settings_fd)
        if not 0 <= args.slot < cfg.slots:
            raise ConfigError(f"--slot {args.slot}: the daemon has {cfg.slots} slots")
        config = process_config(cfg, args.slot, runtime.get("data_dir_id") or None)
        if args.http_fd is not None and cfg.http is not None:
            config.http_fd, config.daemon = args.http_fd, cfg
        proc = ObjectProcess(config)
    except (ConfigError, ValueError, OSError) as e:
        logging.getLogger("durable.objectproc").error("configuration error: %s", e)
        return EXIT_CONFIG

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, proc.stop)
        loop.add_signal_handler(signal.SIGINT, proc.stop)
        mark = proc.loop_mark  # (kept by the process's timer task: _timer_loop)
        proc.lifeline = lifeline.start(lambda: mark[0])
        await proc.run()

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
    except (TimeoutError, ConnectionError) as e:
        if not config.cluster_servers:
            log.error("slot %d: storage in %s cannot be opened: %s: %s", args.slot,
                      config.data_dir, type(e).__name__, e)
            return EXIT_STORAGE
        log.error("slot %d: the cluster's log did not answer (%s: %s); exiting, to be started "
                  "again while this host holds the slot", args.slot, type(e).__name__, e)
        return 1
    except (OSError, duckdb.Error) as e:
        if is_disk_full(e):
            log.error("slot %d: storage in %s cannot be opened, the disk is full: %s", args.slot,
                      config.data_dir, e)
            return EXIT_DISK_FULL
        log.error("slot %d: storage in %s cannot be opened: %s: %s", args.slot, config.data_dir,
                  type(e).__name__, e)
        return EXIT_STORAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
