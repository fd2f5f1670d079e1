"""``python -m durable.broker``: run the broker until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from durable.exitcodes import EXIT_CONFIG
from durable.ids import load_or_create_secret, namespace_key
from durable.supervisor import lifeline, logs

from .router import Broker, BrokerConfig, load_permissions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m durable.broker")
    p.add_argument("--frontend", required=True, help="endpoint clients connect to")
    p.add_argument("--backend", required=True, help="endpoint object processes connect to")
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--data-dir", required=True, help="holds the id secret")
    p.add_argument("--namespace", action="append", default=[], help="a namespace name (repeat)")
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--queue-limit", type=int, default=10_000)
    p.add_argument("--queue-deadline", type=float, default=10.0)
    p.add_argument("--client-inflight-limit", type=int, default=10_000)
    p.add_argument("--control", help="endpoint for the supervisor's control messages")
    p.add_argument("--public", action="append", default=[],
                   help="a CurveZMQ client endpoint (repeat)")
    p.add_argument("--admin", help="the operator endpoint (durable inspect, backup, status)")
    p.add_argument("--curve-secret-key", help="the broker's key pair file (durable keygen)")
    p.add_argument("--authorized-keys", help="directory of authorized client public keys")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logs.setup(args.log_level, f"broker pid={os.getpid()}")
    secret = load_or_create_secret(args.data_dir, create=False)
    config = BrokerConfig(
        frontend=args.frontend, backend=args.backend, slots=args.slots,
        namespaces={n: namespace_key(secret, n) for n in args.namespace},
        heartbeat=args.heartbeat, queue_limit=args.queue_limit,
        client_inflight_limit=args.client_inflight_limit,
        queue_deadline=args.queue_deadline, control=args.control, public=args.public, admin=args.admin,
        curve_secret_key_file=args.curve_secret_key, authorized_keys_dir=args.authorized_keys)
    if args.authorized_keys:
        try:
            load_permissions(args.authorized_keys)
        except (ValueError, OSError) as e:
            logging.getLogger("durable.broker").error("configuration error: %s", e)
            return EXIT_CONFIG
    broker = Broker(config)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    beat = lifeline.start(lambda: broker.last_turn)
    broker.bind()
    beat.mark_ready()
    logging.getLogger("durable.broker").info(
        "listening: clients on %s, object processes on %s, %d slots", args.frontend, args.backend,
        args.slots)
    try:
        broker.run()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
