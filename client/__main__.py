"""``python -m durable``: the ``durable`` command, for when the console script is not on PATH.

The one module of the client package that reaches into the daemon's: an entry point, not
library code (tests/unit/test_layering.py names it as the exception).
"""

import sys


def main() -> int:
    try:
        from durable.supervisor.cli import main as cli
    except ImportError as e:  # a client-only install
        print(f"durable: the command line needs the daemon's packages ({e})", file=sys.stderr)
        return 2
    return cli()


if __name__ == "__main__":
    sys.exit(main())
