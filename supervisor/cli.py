"""The ``durable`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from durable import __version__

from .config import EXIT_CONFIG, ConfigError, load


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(levelname)s supervisor pid={os.getpid()} %(message)s")


def serve(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    try:
        config = load(args.config)
        from .arbiter import Arbiter
        arbiter = Arbiter(config)
        arbiter.check()
    except ConfigError as e:
        print(f"durable serve: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"durable {__version__}: serving {', '.join(config.namespaces)} on {config.slots} slots "
          f"({config.source}); data in {config.data_path}", file=sys.stderr)
    print(f"clients connect to {config.frontend()}\n"
          f"  python: async with durable.connect({config.frontend()!r}) as client: ...",
          file=sys.stderr)
    return arbiter.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable", description="A self-hosted Durable Objects runtime.")
    parser.add_argument("--version", action="version", version=f"durable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon (built-in defaults without --config)")
    p.add_argument("--config", help="TOML configuration file (docs/configuration.md)")
    p.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
