"""The ``durable`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from typing import Any

import orjson

from durable import __version__

from .config import EXIT_CONFIG, Config, ConfigError, load, validate


def _logging(level: str) -> None:
    from .logs import setup
    setup(level, f"supervisor pid={os.getpid()}")


def serve(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    # Classes are imported from the working directory, as the object processes (started with
    # `python -m`) will; the `durable` console script alone would not look there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = load(args.config)
        if args.cluster or args.host_id or args.cluster_listen or args.cluster_key:
            from dataclasses import replace

            from .config import validate
            c = config.cluster
            config.cluster = replace(c, nats=args.cluster or c.nats,
                                     host_id=args.host_id or c.host_id,
                                     listen=args.cluster_listen or c.listen,
                                     curve_key=args.cluster_key or c.curve_key)
            validate(config)
        if config.log_format != "text":
            from .logs import setup
            setup(args.log_level, f"supervisor pid={os.getpid()}", config.log_format)
        from .arbiter import Arbiter, PortInUse
        arbiter = Arbiter(config)
        arbiter.check()
    except ConfigError as e:
        print(f"durable serve: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from .datadir import DataDirError
    from .restart_policy import EXIT_STORAGE
    try:
        arbiter.acquire()  # the data dir's lock, then the port: before anything is changed
    except DataDirError as e:
        print(f"durable serve: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except PortInUse as e:
        arbiter.release()
        print(f"durable serve: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"durable {__version__}: serving {', '.join(config.namespaces)} on {config.slots} slots "
          f"({config.source}); data in {config.data_path}", file=sys.stderr)
    if config.http is not None:
        try_it = (f"curl http://{config.http.listen}/" if config.http.worker else
                  f"curl -X POST http://{config.http.listen}/{next(iter(config.namespaces))}"
                  "/room-1/inc")  # (a Worker decides its own routes)
        print(f"HTTP on http://{config.http.listen}/  (try: {try_it})", file=sys.stderr)
    print(f"clients connect to {config.frontend()}\n"
          f"  python: async with durable.connect({config.frontend()!r}) as client: ...",
          file=sys.stderr)
    watcher = _watch_sources(args.config) if args.reload else None
    try:
        return arbiter.run()
    finally:
        if watcher is not None:
            watcher.set()


def _watch_sources(config_path: str | None) -> Any:
    """``serve --reload`` (development, like ``wrangler dev``): a change to a .py file under
    the working directory, or to the config, reloads the daemon (SIGHUP to itself)."""
    import signal
    import threading

    try:
        import watchfiles
    except ImportError:
        raise SystemExit(_fail("serve --reload needs watchfiles: pip install 'durable[reload]'",
                               EXIT_CONFIG)) from None
    stop = threading.Event()
    paths = [os.getcwd(), *([os.path.abspath(config_path)] if config_path else [])]

    def relevant(_change: Any, path: str) -> bool:
        return path.endswith(".py") or (config_path is not None and
                                        os.path.abspath(path) == os.path.abspath(config_path))

    def watch() -> None:
        for changes in watchfiles.watch(*paths, watch_filter=relevant, stop_event=stop,
                                        debounce=300, raise_interrupt=False):
            names = sorted({os.path.relpath(p) for _, p in changes})
            logging.getLogger("durable.supervisor").info(
                "changed: %s; reloading", ", ".join(names[:5]))
            os.kill(os.getpid(), signal.SIGHUP)

    threading.Thread(target=watch, name="durable-reload", daemon=True).start()
    return stop


def _daemon(args: argparse.Namespace) -> tuple[Any, Any]:
    """The config and a connected client, or a clear message and an exit status."""
    from .status import NotRunning, read
    try:
        config = _load(args)
    except ConfigError as e:
        raise SystemExit(_fail(f"configuration error: {e}", EXIT_CONFIG)) from None
    try:
        read(config)
    except NotRunning as e:
        raise SystemExit(_fail(str(e), 3)) from None
    import durable
    try:
        client = durable.connect_sync(config.admin(), connect_timeout=3)  # operator endpoint
    except ConnectionError as e:
        raise SystemExit(_fail(str(e), 3)) from None
    return config, client


def _load(args: argparse.Namespace) -> Any:
    """The daemon's config: ``--config``, else the one ``$DURABLE_ENDPOINT`` points at (as the
    client finds it: ``ipc://DATA_DIR/run/broker.sock`` of the built-in defaults), else the
    built-in defaults (``./durable-data``)."""
    if args.config is None:
        endpoint = os.environ.get("DURABLE_ENDPOINT")
        if endpoint:
            if not (endpoint.startswith("ipc://") and endpoint.endswith("/run/broker.sock")):
                raise ConfigError(f"DURABLE_ENDPOINT={endpoint} is not the local socket of a "
                                  "daemon on the built-in defaults (ipc://DATA_DIR/run/"
                                  "broker.sock): pass that daemon's --config")
            # The defaults with that data dir, checked as such (the current directory's
            # ./durable-data may not even make a valid ipc path).
            config = Config(data_dir=os.path.dirname(os.path.dirname(endpoint[len("ipc://"):])))
            validate(config)
            return config
    return load(args.config)


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
    try:
        return ns.get(ns.id_from_name(name_or_id))
    except InvalidIdError as e:
        raise SystemExit(_fail(str(e), 2)) from None


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


def _as_json(value: Any) -> Any:
    """What JSON cannot say, said plainly: sets as lists, bytes as base64, Decimal as text."""
    import base64
    import decimal

    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (decimal.Decimal, dt.timedelta)) or type(value).__name__ == "ObjectId":
        return str(value)
    if type(value).__name__ in ("Request", "Response"):
        return repr(value)
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _method_call(args: argparse.Namespace) -> int:
    """``durable call NS NAME --method m --args '[...]' --kwargs '{...}'``: print the result."""
    try:
        positional = orjson.loads(args.args) if args.args else []
        named = orjson.loads(args.kwargs) if args.kwargs else {}
    except orjson.JSONDecodeError as e:
        return _fail(f"--args and --kwargs take JSON ({e}); e.g. --args '[5]' --kwargs "
                     "'{\"by\": 2}'", 2)
    if type(positional) is not list or type(named) is not dict:
        return _fail("--args takes a JSON array and --kwargs a JSON object", 2)
    _config, client = _daemon(args)
    try:
        result = getattr(_stub(client, args.namespace, args.name_or_id), args.rpc)(
            *positional, **named)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    print(orjson.dumps(result, default=_as_json,
                       option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    return 0


def call_cmd(args: argparse.Namespace) -> int:
    if args.rpc is not None:
        return _method_call(args)
    if args.args is not None or args.kwargs is not None:
        return _fail("--args and --kwargs go with --method NAME", 2)
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
        stub = _stub(client, args.namespace, args.name_or_id)
        resp = stub.fetch(url, method="INSPECT")
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    rows = resp.json()
    due = resp.headers.get("x-durable-alarm")
    if args.json:  # (each value as Python's repr: the types json has not, kept readable)
        _emit(args, {"namespace": args.namespace, "id": str(stub.id),
                     "keys": [{"key": k, "value": v} for k, v in rows],
                     "alarm_ms": None if due is None else int(due)}, "")
        return 0
    if not rows:
        print("(no keys)")
    for key, value in rows:
        print(f"{key!r}: {value}")
    if due is not None:
        from .status import when
        print(f"alarm: {when(int(due))}")
    return 0


def _config_only(args: argparse.Namespace) -> Any:
    try:
        return _load(args)
    except ConfigError as e:
        raise SystemExit(_fail(f"configuration error: {e}", EXIT_CONFIG)) from None


def _say(args: argparse.Namespace) -> Any:
    """Progress lines on stderr (a terminal or a log), never mixed into --json's stdout."""
    return lambda message: print(message, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else text)


def verify_cmd(args: argparse.Namespace) -> int:
    from .storage_tools import slots_in, verify_slot
    config = _config_only(args)
    data = config.data_path
    if not data.is_dir():
        return _fail(f"data dir {data} does not exist", 2)
    slots = [args.slot] if args.slot is not None else slots_in(data)
    reports = []
    for n in slots:
        if not args.json:
            _say(args)(f"slot {n}: checking")
        reports.append(verify_slot(data, n))
    lines = []
    for r in reports:
        state = "ok" if r.ok else "DAMAGED"
        duck = ("not checked: " + (r.duckdb_error or "") if r.duckdb_ok is None else
                f"{r.rows} keys, up to record {r.applied_seq}" if r.duckdb_ok else
                f"DAMAGED: {r.duckdb_error}")
        lines.append(f"slot {r.slot}: {state}\n  duckdb: {duck}\n  log: {r.segments} segments, "
                     f"{r.records} records to replay" + (f" (to record {r.last_seq})" if r.last_seq else ""))
        lines += [f"  damage: {d}" for d in r.damage]
        lines += [f"  missing records: {a}..{b}" for a, b in r.missing]
        if r.torn:
            lines.append(f"  torn tail (a crash during a write; never acknowledged): {r.torn}")
    bad = [r.slot for r in reports if not r.ok]
    if bad:
        lines.append(f"\n{len(bad)} slot(s) damaged. To keep every valid record and move the "
                     f"damaged files aside: durable repair --slot {bad[0]} --yes")
    _emit(args, {"ok": not bad, "slots": [r.as_dict() for r in reports]}, "\n".join(lines))
    return 1 if bad else 0


def repair_cmd(args: argparse.Namespace) -> int:
    from .datadir import DataDirError, read_identity
    from .storage_tools import RepairError, repair_slot
    config = _config_only(args)
    if not args.yes:
        return _fail(f"repair rewrites slot {args.slot}'s files (the damaged ones are kept in "
                     f"{config.data_path / 'quarantine'}); run `durable verify --slot {args.slot}` "
                     "to see what is damaged, then add --yes", 2)
    try:
        identity = read_identity(config.data_path).id
    except (FileNotFoundError, DataDirError):
        identity = None
    try:
        result = repair_slot(config.data_path, args.slot, identity=identity,
                             progress=_say(args))
    except RepairError as e:
        return _fail(str(e), 1)
    if not result["repaired"] or "put_back" in result:
        _emit(args, result, result["message"])
        return 0
    lost = result["records_lost"]
    text = [f"slot {args.slot} repaired: {result['records_kept']} log records replayed, "
            f"{result['rows']} keys stored",
            f"damaged files moved to {result['quarantine']}"]
    text.append("records lost: " + (", ".join(f"{a}..{b}" for a, b in lost) if lost else "none"))
    if result["duckdb_rows_lost_at_most"]:
        text.append(f"rows of the DuckDB file that could not be read: up to "
                    f"{result['duckdb_rows_lost_at_most']}")
    text.append("a running daemon starts the slot again by itself; otherwise start it")
    _emit(args, result, "\n".join(text))
    return 0


def backup_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .backup import BackupError, backup
    config, client = _daemon(args)  # checks that the daemon runs
    client.close()
    try:
        manifest = backup(config, Path(args.dest), say=_say(args),
                          pin_timeout=args.pin_timeout)
    except BackupError as e:
        return _fail(str(e), 1)
    except Exception as e:
        return _fail(f"backup failed: {type(e).__name__}: {e}; the destination is incomplete", 1)
    _emit(args, manifest, f"backup of {manifest['slots']} slots ({manifest['bytes'] / 2**20:.1f} "
                          f"MiB) in {args.dest}; restore with: durable restore {args.dest}")
    return 0


def restore_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .backup import BackupError, restore
    config = _config_only(args)
    try:
        result = restore(config, Path(args.src), say=_say(args))
    except BackupError as e:
        return _fail(str(e), 1)
    text = [f"restored {result['bytes'] / 2**20:.1f} MiB into {result['data_dir']}; "
            "start the daemon with `durable serve`", *result["notes"]]
    _emit(args, result, "\n".join(text))
    return 0


def objects_cmd(args: argparse.Namespace) -> int:
    """`durable objects NS`: the namespace's objects, a page at a time (docs/query.md)."""
    _config, client = _daemon(args)
    out: list[Any] = []
    try:
        for info in client.namespace(args.namespace).list_objects(
                prefix=args.prefix, limit=args.limit, start_after=args.start_after):
            out.append(info)
            if not args.json:
                print(f"{info.id}  {info.name if info.name is not None else '-'}  "
                      f"keys={info.keys} bytes={info.bytes} "
                      f"updated={_iso(info.updated_at)} alarm={_iso(info.alarm)}", flush=True)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    if args.json:
        print(orjson.dumps([{"id": o.id, "name": o.name, "keys": o.keys, "bytes": o.bytes,
                             "updated_at": o.updated_at, "alarm": o.alarm} for o in out],
                           option=orjson.OPT_INDENT_2).decode())
    elif not out:
        print("(no objects)", file=sys.stderr)
    return 0


def _iso(when: dt.datetime | None) -> str:
    return "-" if when is None else when.isoformat(timespec="milliseconds")


def sql_cmd(args: argparse.Namespace) -> int:
    """`durable sql "SELECT ..."`: read-only SQL over every object's storage."""
    os.nice(10)  # (an operator's query on the daemon's machine yields to the daemon)
    from durable.query import to_json_rows
    _config, client = _daemon(args)
    try:
        result = client.sql(args.query, namespace=args.namespace, timeout=args.timeout,
                            threads=args.threads, memory_limit=args.memory_limit)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    finally:
        client.close()
    if args.json:
        sys.stdout.buffer.write(to_json_rows(result) + b"\n")
    elif args.csv:
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(result.columns)
        w.writerows(result.rows)
    else:
        _table(result.columns, result.rows)
    return 0


def _table(columns: list[str], rows: list[tuple]) -> None:
    cells = [[("NULL" if v is None else str(v)) for v in row] for row in rows]
    width = [max([len(c)] + [min(len(r[i]), 60) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, width, strict=True)).rstrip())
    print("  ".join("-" * w for w in width))
    for r in cells:
        print("  ".join((v if len(v) <= 60 else v[:59] + "…").ljust(w)
                        for v, w in zip(r, width, strict=True)).rstrip())
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=sys.stderr)


def export_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from durable.query import export
    config, client = _daemon(args)
    try:
        secret = (config.data_path / "secret").read_bytes()
        manifest = client._run(export(client._client, Path(args.dest), namespace=args.namespace,
                                      file_format=args.format, secret=secret,
                                      say=_say(args)))
    except Exception as e:
        return _fail(f"export failed: {type(e).__name__}: {e}", 1)
    finally:
        client.close()
    _emit(args, manifest, f"exported {manifest['rows']:,} rows of {manifest['objects']:,} objects "
                          f"and {manifest['alarms']:,} alarms to {args.dest}; load them into an "
                          f"empty data dir with: durable import {args.dest}")
    return 0


def import_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .datadir import DataDirError
    from .dataio import ImportError_, import_export
    config = _config_only(args)
    try:
        result = import_export(config, Path(args.src), say=_say(args))
    except (ImportError_, DataDirError) as e:
        return _fail(str(e), 1)
    text = [f"imported {result['rows']:,} rows of {result['objects']:,} objects and "
            f"{result['alarms']:,} alarms into {result['data_dir']} in {result['seconds']:.1f} s; "
            "start the daemon with `durable serve`", *result["notes"]]
    _emit(args, result, "\n".join(text))
    return 0


def reload_cmd(args: argparse.Namespace) -> int:
    """SIGHUP to the supervisor, then follow the reload to its end (progress on stderr)."""
    import signal
    import time

    from .status import NotRunning, read
    config = _config_only(args)
    try:
        before = read(config)
    except NotRunning as e:
        return _fail(str(e), 3)
    pid = before["supervisor"]["pid"]
    gen = (before["supervisor"].get("reload") or {}).get("generation", 0)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    shown = None
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            state = read(config)["supervisor"].get("reload") or {}
        except NotRunning as e:
            return _fail(str(e), 3)
        if state.get("generation", 0) <= gen:
            continue
        if state["state"] == "rolling" and not args.json:
            step = f"{state['done']}/{state['total']}"
            if step != shown:
                shown = step
                print(f"reload: {step} processes restarted", file=sys.stderr, flush=True)
        elif state["state"] in ("done", "refused"):
            if args.json:
                print(orjson.dumps(state).decode())
            if state["state"] == "refused":
                return _fail(f"reload refused (the running configuration stays): "
                             f"{state['error']}", 1)
            if not args.json:
                print(f"reload: done ({state['total']} processes on the new configuration)")
            return 0
    return _fail(f"the reload did not finish within {args.timeout:g} s; see `durable status` "
                 "and the log", 1)


def keygen_cmd(args: argparse.Namespace) -> int:
    import zmq.auth
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public = os.path.join(args.dir, f"{args.name}.key")
    secret = public + "_secret"
    existing = [p for p in (public, secret) if os.path.exists(p)]
    if existing and not args.force:
        return _fail(f"keygen: {', '.join(existing)} already exist(s); keep the pair in use, or "
                     "pass --force to replace it (clients with the old key are refused after)", 1)
    for p in existing:
        os.unlink(p)
    old = os.umask(0o077)  # the secret key is 0600 from its first byte, not chmod-ed later
    try:
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
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
    p.add_argument("--reload", action="store_true", help="development: reload when a .py file "
                   "under the working directory (or the config) changes (needs watchfiles)")
    p.add_argument("--cluster", metavar="NATS_URLS", help="cluster mode: the NATS JetStream "
                   "servers, comma-separated (docs/cluster.md; [cluster] nats)")
    p.add_argument("--host-id", help="cluster mode: this host's unique name ([cluster] host_id)")
    p.add_argument("--cluster-listen", metavar="HOST:PORT", help="cluster mode: where the other "
                   "hosts reach this host's broker ([cluster] listen)")
    p.add_argument("--cluster-key", metavar="PATH", help="cluster mode: the cluster's CurveZMQ "
                   "key pair, the same on every host ([cluster] curve_key)")
    p = sub.add_parser("status", help="processes, objects, queues and storage of the running daemon")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("call", help="call an object and print the status and body (or, with "
                       "--method, call a method and print its result as JSON)")
    p.add_argument("--config")
    p.add_argument("namespace")
    p.add_argument("name_or_id", help="a name, or a 64-hex id this namespace issued")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("--method", dest="rpc", metavar="NAME", help="call the object's method NAME")
    p.add_argument("--args", help="the method's arguments, a JSON array")
    p.add_argument("--kwargs", help="the method's keyword arguments, a JSON object")
    p.add_argument("-X", dest="method", default="GET")
    p.add_argument("-d", dest="data", help="request body")
    p.add_argument("-H", dest="header", action="append", default=[], help="'Name: value'")
    p = sub.add_parser("inspect", help="print an object's stored keys and values")
    p.add_argument("--config")
    p.add_argument("namespace")
    p.add_argument("name_or_id")
    p.add_argument("--prefix")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (each value as its Python repr)")
    p = sub.add_parser("verify", help="check slots' commit logs and DuckDB files (changes nothing)")
    p.add_argument("--config")
    p.add_argument("--slot", type=int, help="only this slot (default: every slot in the data dir)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("repair", help="salvage a damaged slot; damaged files go to quarantine/")
    p.add_argument("--config")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--yes", action="store_true", help="really rewrite the slot's files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("backup", help="copy the running daemon's data into DEST (online)")
    p.add_argument("--config")
    p.add_argument("dest", help="a new or empty directory")
    p.add_argument("--pin-timeout", type=float, default=600.0,
                   help="seconds a slot's files may be held for the copy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("restore", help="lay a backup out as the (empty) configured data dir")
    p.add_argument("--config")
    p.add_argument("src", help="a directory written by `durable backup`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("objects", help="list a namespace's objects (id, name, keys, bytes, "
                       "last write, alarm), by id")
    p.add_argument("--config")
    p.add_argument("namespace")
    p.add_argument("--prefix", help="only objects whose name starts with this")
    p.add_argument("--limit", type=int, help="at most this many")
    p.add_argument("--start-after", help="resume after this object id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("sql", help="run one read-only SQL query over every object's storage "
                       "(views kv, objects, alarms; docs/query.md)")
    p.add_argument("--config")
    p.add_argument("query")
    p.add_argument("--namespace", help="fetch only this namespace's rows (faster)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before it is stopped")
    p.add_argument("--memory-limit", default="2GB", help="DuckDB's memory limit for the query")
    p.add_argument("--threads", type=int, default=2, help="DuckDB threads for the query")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="rows as a JSON array of objects")
    form.add_argument("--csv", action="store_true", help="rows as CSV with a header")
    form.add_argument("--table", action="store_true", help="an aligned table (the default)")
    p = sub.add_parser("export", help="write every object's rows and alarms to DEST (online, "
                       "one consistent point per slot)")
    p.add_argument("--config")
    p.add_argument("dest", help="a new or empty directory")
    p.add_argument("--namespace", help="only this namespace")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("import", help="load an export into the (empty) configured data dir")
    p.add_argument("--config")
    p.add_argument("src", help="a directory written by `durable export`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("reload", help="re-read the config and roll the object processes and "
                       "gateways onto it (and onto new code) one at a time")
    p.add_argument("--config")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the end")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("keygen", help="write a CurveZMQ key pair (for clients on other machines)")
    p.add_argument("dir")
    p.add_argument("--name", default="client", help="file name: NAME.key and NAME.key_secret")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    args = parser.parse_args(argv)
    commands = {"serve": serve, "status": status_cmd, "call": call_cmd, "inspect": inspect_cmd,
                "keygen": keygen_cmd, "verify": verify_cmd, "repair": repair_cmd,
                "backup": backup_cmd, "restore": restore_cmd, "reload": reload_cmd,
                "objects": objects_cmd, "sql": sql_cmd, "export": export_cmd,
                "import": import_cmd}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's status for it
        print(f"durable {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
