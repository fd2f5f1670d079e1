"""The ``durable`` command line."""

from __future__ import annotations

import argparse
import sys

from durable import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable", description="A self-hosted Durable Objects runtime.")
    parser.add_argument("--version", action="version", version=f"durable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML configuration file")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print("durable serve: the daemon (supervisor, broker, object processes) is not built yet; "
              "this release ships the storage engine only (see README, 'Status').", file=sys.stderr)
        return 3
    return 2


if __name__ == "__main__":
    sys.exit(main())
