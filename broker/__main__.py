"""``python -m durable.broker --settings PATH``: run the broker until SIGTERM or SIGINT.

The supervisor writes PATH (``supervisor/config.py``, ``write_settings``): the
whole checked configuration, read here once. Settings never travel in argv.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from durable.exitcodes import EXIT_CONFIG
from durable.ids import load_or_create_secret, namespace_key
from durable.peers import peer_endpoint
from durable.supervisor import lifeline, logs
from durable.supervisor.config import Config, ConfigError, settings_from_args

from .router import Broker, BrokerConfig, load_permissions


def broker_config(cfg: Config, secret: bytes) -> BrokerConfig:
    """The broker's part of the daemon's configuration."""
    b = cfg.broker
    return BrokerConfig(
        frontend=cfg.frontend(), backend=cfg.backend(), slots=cfg.slots,
        namespaces={n: namespace_key(secret, n) for n in cfg.namespaces},
        heartbeat=b.heartbeat, queue_limit=b.queue_limit, queue_deadline=b.queue_deadline,
        client_inflight_limit=b.client_inflight_limit, control=cfg.control(), admin=cfg.admin(),
        public=cfg.curve_endpoints(), curve_secret_key_file=b.curve_secret_key or None,
        authorized_keys_dir=b.authorized_keys or None, socket_group=b.socket_group or None,
        backend_extra=[f"tcp://{cfg.cluster.listen}"] if cfg.cluster.enabled else [],
        cluster_key_file=cfg.cluster.curve_key if cfg.cluster.enabled else None,
        cluster_keys_dir=str(cfg.run_dir / "cluster-keys"),
        peer_endpoint=peer_endpoint(str(cfg.run_dir), "{slot}")
        if b.peer_calls and not cfg.cluster.enabled else "")


def main(argv: list[str] | None = None) -> int:
    lifeline.bind_to_parent()  # (the supervisor's child: die with it)
    p = argparse.ArgumentParser(prog="python -m durable.broker")
    p.add_argument("--settings-fd", type=int, help="the supervisor's settings (an inherited fd)")
    p.add_argument("--settings", help="a settings file (write_settings), without a supervisor")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logs.setup(args.log_level, f"broker pid={os.getpid()}")
    log = logging.getLogger("durable.broker")
    try:
        cfg, _runtime = settings_from_args(args.settings, args.settings_fd)
        if cfg.broker.authorized_keys:
            load_permissions(cfg.broker.authorized_keys)
    except (ConfigError, ValueError, OSError) as e:
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    secret = load_or_create_secret(cfg.data_path, create=False)
    config = broker_config(cfg, secret)
    broker = Broker(config)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    beat = lifeline.start(lambda: broker.last_turn)
    broker.bind()
    beat.mark_ready()
    log.info("listening: clients on %s, object processes on %s, %d slots", config.frontend,
             " and ".join([config.backend, *config.backend_extra]), config.slots)
    try:
        broker.run()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
