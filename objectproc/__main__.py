"""``python -m durable.objectproc``: host one slot's objects until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .loop import ObjectProcess, ObjectProcessConfig

EXIT_CONFIG = 78  # EX_CONFIG: restarting will not help


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
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(levelname)s objectproc slot={args.slot} pid={os.getpid()} %(message)s")
    config = ObjectProcessConfig(
        slot=args.slot, backend=args.backend, frontend=args.frontend, data_dir=args.data_dir,
        namespaces=_pairs(args.namespace, "namespace"), vars=_pairs(args.var, "var"),
        idle_timeout=args.idle_timeout, heartbeat=args.heartbeat)
    try:
        proc = ObjectProcess(config)
    except ValueError as e:
        logging.getLogger("durable.objectproc").error("configuration error: %s", e)
        return EXIT_CONFIG

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, proc.stop)
        loop.add_signal_handler(signal.SIGINT, proc.stop)
        await proc.run()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
