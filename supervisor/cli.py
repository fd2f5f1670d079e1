"""The ``durable`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import orjson

from durable import __version__

from .config import EXIT_CONFIG, ConfigError, load


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(levelname)s supervisor pid={os.getpid()} %(message)s")


def serve(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    # Classes are imported from the working directory, as the object processes (started with
    # `python -m`) will; the `durable` console script alone would not look there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
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
    if config.http is not None:
        print(f"HTTP on http://{config.http.listen}/  (try: curl -X POST "
              f"http://{config.http.listen}/{next(iter(config.namespaces))}/room-1/inc)", file=sys.stderr)
    print(f"clients connect to {config.frontend()}\n"
          f"  python: async with durable.connect({config.frontend()!r}) as client: ...",
          file=sys.stderr)
    return arbiter.run()


def _daemon(args: argparse.Namespace) -> tuple[Any, Any]:
    """The config and a connected client, or a clear message and an exit status."""
    from .status import NotRunning, read
    try:
        config = load(args.config)
    except ConfigError as e:
        raise SystemExit(_fail(f"configuration error: {e}", EXIT_CONFIG)) from None
    try:
        read(config)
    except NotRunning as e:
        raise SystemExit(_fail(str(e), 3)) from None
    import durable
    try:
        client = durable.connect_sync(config.frontend(), connect_timeout=3)
    except ConnectionError as e:
        raise SystemExit(_fail(str(e), 3)) from None
    return config, client


def _fail(message: str, code: int) -> int:
    print(f"durable: {message}", file=sys.stderr)
    return code


def _stub(client: Any, namespace: str, name_or_id: str) -> Any:
    """A 64-hex string this namespace issued is an id; anything else is a name."""
    from durable.errors import InvalidIdError, UnknownNamespaceError
    try:
        ns = client.namespace(namespace)
    except UnknownNamespaceError as e:
        raise SystemExit(_fail(str(e), 2)) from None
    if len(name_or_id) == 64:
        try:
            return ns.get(ns.id_from_string(name_or_id))
        except InvalidIdError:
            pass
    return ns.get(ns.id_from_name(name_or_id))


def status_cmd(args: argparse.Namespace) -> int:
    from .status import collect, render
    config, client = _daemon(args)
    try:
        stats = client.statistics()
    except Exception:  # the broker may be restarting: show what the supervisor knows
        stats = None
    finally:
        client.close()
    data = collect(config, stats)
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(data))
    return 0


def call_cmd(args: argparse.Namespace) -> int:
    _config, client = _daemon(args)
    try:
        headers = []
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                return _fail(f"header {h!r} must look like 'Name: value'", 2)
            headers.append((name.strip(), value.strip()))
        path = args.path if args.path.startswith("/") else "/" + args.path
        resp = _stub(client, args.namespace, args.name_or_id).fetch(
            f"http://do{path}", method=args.method, headers=headers,
            body=args.data.encode() if args.data is not None else None)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    print(f"HTTP {resp.status}")
    sys.stdout.write(resp.text())
    if resp.body and not resp.body.endswith(b"\n"):
        print()
    return 0 if resp.ok else 1


def inspect_cmd(args: argparse.Namespace) -> int:
    from urllib.parse import quote
    _config, client = _daemon(args)
    try:
        url = "durable:inspect" + (f"?prefix={quote(args.prefix)}" if args.prefix else "")
        resp = _stub(client, args.namespace, args.name_or_id).fetch(url, method="INSPECT")
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    rows = resp.json()
    if not rows:
        print("(no keys)")
    for key, value in rows:
        print(f"{key!r}: {value}")
    return 0


def keygen_cmd(args: argparse.Namespace) -> int:
    import zmq.auth
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")
    print("broker: [broker] curve_secret_key = <the broker's .key_secret>, authorized_keys = "
          "<a directory with each client's .key>\nclient: durable.connect(endpoint, "
          "server_key=<the broker's .key>, client_key=<this client's .key_secret>)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable", description="A self-hosted Durable Objects runtime.")
    parser.add_argument("--version", action="version", version=f"durable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon (built-in defaults without --config)")
    p.add_argument("--config", help="TOML configuration file (docs/configuration.md)")
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("status", help="processes, objects, queues and storage of the running daemon")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("call", help="call an object and print the status and body")
    p.add_argument("--config")
    p.add_argument("namespace")
    p.add_argument("name_or_id", help="a name, or a 64-hex id this namespace issued")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("-X", dest="method", default="GET")
    p.add_argument("-d", dest="data", help="request body")
    p.add_argument("-H", dest="header", action="append", default=[], help="'Name: value'")
    p = sub.add_parser("inspect", help="print an object's stored keys and values")
    p.add_argument("--config")
    p.add_argument("namespace")
    p.add_argument("name_or_id")
    p.add_argument("--prefix")
    p = sub.add_parser("keygen", help="write a CurveZMQ key pair (for clients on other machines)")
    p.add_argument("dir")
    p.add_argument("--name", default="client", help="file name: NAME.key and NAME.key_secret")
    args = parser.parse_args(argv)
    commands = {"serve": serve, "status": status_cmd, "call": call_cmd, "inspect": inspect_cmd,
                "keygen": keygen_cmd}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
