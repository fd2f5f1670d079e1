"""Configuration: one documented dataclass per component, read from TOML (``tomllib``).

``load(path)`` returns a checked :class:`Config`, or raises :class:`ConfigError`
naming the file, the key, what is wrong and how to fix it. Every key is
documented in docs/configuration.md; ``Config()`` is the built-in default that
``durable serve`` runs without a file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Config", "BrokerSettings", "HttpSettings", "LimitsSettings", "ConfigError", "load", "DEFAULT_NAMESPACES",
           "EXIT_CONFIG"]

#: Exit status for "the configuration is wrong; restarting will not help" (sysexits EX_CONFIG).
from durable.exitcodes import EXIT_CONFIG
from durable.protocol.heartbeat import HEARTBEAT
from durable.protocol.messages import MAX_NAME

DEFAULT_NAMESPACES = {
    "COUNTER": "durable.examples.counter:Counter",
    "CHAT": "durable.examples.chat:ChatRoom",
    "RATELIMIT": "durable.examples.ratelimit:RateLimiter",
    "SESSION": "durable.examples.session:Session",
}
_IPC_PATH_MAX = 107  # sun_path


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and how to fix it."""


@dataclass
class BrokerSettings:
    #: where clients connect; default: ipc in the 0700 run directory (tcp:// needs CurveZMQ keys)
    endpoint: str = ""
    #: where object processes connect; ipc only (default: in the run directory)
    workers_endpoint: str = ""
    #: seconds between heartbeats; a peer is dead after 5 missed
    heartbeat: float = HEARTBEAT
    #: calls that may wait for a slot with no running process
    queue_limit: int = 10_000
    #: seconds a call waits for such a slot before it fails
    queue_deadline: float = 10.0
    #: calls one client connection (a gateway process, a program) may have in flight
    client_inflight_limit: int = 10_000
    #: calls from an object process (an object, the slots front) to another slot of this
    #: host go straight to that slot's process, not through the broker (docs/messaging.md)
    peer_calls: bool = True
    #: a second client endpoint for other machines, e.g. "tcp://0.0.0.0:7700"
    public_endpoint: str = ""
    #: the broker's CurveZMQ key pair file (`durable keygen DIR --name broker`)
    curve_secret_key: str = ""
    #: directory of the public key files of the clients allowed in
    authorized_keys: str = ""
    #: a group whose members (applications running as other users) may connect to the local
    #: client socket: the data dir becomes 0710, the run dir 0750, the client socket 0660, all
    #: of that group; every other socket stays 0600
    socket_group: str = ""


@dataclass
class HttpSettings:
    #: host:port the gateway listens on
    listen: str = "127.0.0.1:8787"
    #: "module:fetch" for a Worker entry point; empty: built-in routing by path
    worker: str = ""
    #: gateway processes serving the supervisor's listening socket
    processes: int = 1
    #: "slots": each object process serves HTTP itself, and answers requests for its own
    #: slot's objects in-process; "gateways": gateway processes serve HTTP and call objects
    #: through the broker; "auto": slots, except in cluster mode or with processes > 1
    #: (docs/messaging.md, "HTTP in the object processes")
    front: str = "auto"
    #: larger request bodies get 413
    max_body_bytes: int = 32 << 20
    #: seconds to receive a request body (else 408)
    read_timeout: float = 30.0
    #: seconds an idle keep-alive connection stays open
    idle_timeout: float = 15.0
    #: requests in flight to one namespace through one gateway process (then 503)
    max_inflight_per_namespace: int = 4000
    #: requests in flight to one object through one gateway process (then 503)
    max_inflight_per_object: int = 1000
    #: MiB of request bodies (and large responses) one gateway process holds (then 503)
    max_inflight_mb: int = 256
    #: WebSockets one gateway process holds open at once (more upgrades get 503)
    max_websockets: int = 20_000
    #: KiB waiting to be written to one WebSocket whose reader does not keep up; past it the
    #: socket is closed with 1008 and logged (memory stays bounded)
    websocket_max_buffer_kb: int = 4096
    #: include the object's error type and message in 500 bodies
    debug: bool = False
    #: a log line per request: method, path, status, bytes, milliseconds, object
    access_log: bool = False


@dataclass
class MetricsSettings:
    #: host:port for Prometheus's /metrics (the supervisor serves it); empty: off
    listen: str = ""


@dataclass
class ClusterSettings:
    """Cluster mode (docs/cluster.md); off while ``nats`` is empty."""

    #: the NATS JetStream servers, comma-separated (nats://HOST:4222,...); empty: one host
    nats: str = ""
    #: this host's name in the cluster: unique and the same across restarts
    host_id: str = ""
    #: host:port where the other hosts' object processes reach this host's broker (loopback
    #: or a private network: this link has no CurveZMQ yet)
    listen: str = ""
    #: seconds a slot's lease lasts: a dead host's slots are taken over after about this long
    lease: float = 5.0
    #: JetStream replicas of the slots' logs and of the slot table
    replicas: int = 3
    #: the cluster's CurveZMQ key pair (`durable keygen DIR --name cluster`: the .key_secret
    #: file), the same file on every host: object processes register with a broker only
    #: with it, so no one else (another local user, another machine) can pose as a slot
    curve_key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.nats)

    def servers(self) -> list[str]:
        return [s.strip() for s in self.nats.split(",") if s.strip()]


@dataclass
class LimitsSettings:
    max_key_bytes: int = 2048
    max_value_bytes: int = 32768
    max_keys_per_call: int = 128


@dataclass
class Config:
    data_dir: str = "durable-data"
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: seconds an idle object stays loaded once its writes are durable
    idle_timeout: float = 60.0
    #: seconds a graceful stop may take before stragglers are killed
    grace_period: float = 30.0
    #: seconds a process's loop may stay blocked (or silent) before it is killed and replaced
    hang_timeout: float = 30.0
    #: milliseconds a call may run without yielding before it fails with CpuLimitError
    #: (per namespace: [namespaces.NAME] cpu_limit_ms)
    cpu_limit_ms: int = 30_000
    #: seconds an idle object's own tasks (state.wait_until, create_task) may still run
    wait_until_limit: float = 30.0
    #: send object tracebacks to callers (ObjectError.remote_traceback)
    debug: bool = False
    #: alarms started per second per slot at most (alarms that came due while the daemon
    #: was down fire after start at this pace, oldest first)
    alarm_rate: float = 10_000.0
    #: alarm handlers running at once per slot at most
    alarm_concurrency: int = 1000
    #: a raising alarm() is retried this many times, alarm_retry_base * 2**n seconds apart
    alarm_retries: int = 6
    alarm_retry_base: float = 2.0
    #: MiB of call bodies one object process holds at once (then OverloadedError)
    max_inflight_mb: int = 256
    #: the largest WebSocket message, either way (KiB; 1 MiB as Cloudflare's)
    websocket_max_message_kb: int = 1024
    #: "text" (timestamps; under journald, syslog priorities instead) or "json" (a line each)
    log_format: str = "text"
    #: restart an object process gracefully above this RSS (MiB); 0 = no limit
    memory_limit_mb: int = 0
    #: DuckDB's memory per slot (MiB): its cache of table pages and ART indexes
    duckdb_memory_mb: int = 512
    #: checkpoint a slot's DuckDB file when its WAL reaches this size (MiB); the commit log is
    #: truncated behind each checkpoint, so this bounds both (docs/operating.md, "Disk use")
    checkpoint_wal_mb: int = 8
    #: ...or when this many seconds passed since the last checkpoint with writes since
    checkpoint_interval: float = 30.0
    #: hold /dev/cpu_dma_latency at 0 while serving: CPUs poll instead of halting when idle
    #: (about half the call latency on a VM, at the cost of idle CPUs spinning)
    low_latency_idle: bool = False
    #: keep one object process started and imported, waiting: a killed or crashed slot is
    #: handed to it and serves again without an interpreter's start (docs/operating.md)
    warm_spare: bool = True
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    #: the HTTP gateway; on in the built-in defaults, off in a file without [http]
    http: HttpSettings | None = field(default_factory=HttpSettings)
    namespaces: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NAMESPACES))
    #: namespace -> its own cpu_limit_ms (the others use cpu_limit_ms)
    namespace_cpu_limits: dict[str, int] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: [secrets], resolved at load: name -> value (from an environment variable or a file)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    source: str = "built-in defaults"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).absolute()

    @property
    def run_dir(self) -> Path:
        return self.data_path / "run"

    def frontend(self) -> str:
        """The local client endpoint (ipc): the daemon's processes and local programs use it."""
        e = self.broker.endpoint
        return e if e.startswith("ipc://") else f"ipc://{self.run_dir / 'broker.sock'}"

    def control(self) -> str:
        """The supervisor's PUSH to the broker (``slot_down``, ``drain``): ipc, 0700 dir."""
        return f"ipc://{self.run_dir / 'control.sock'}"

    def admin(self) -> str:
        """The operator endpoint (``durable inspect``, ``backup``, ``status``): ipc, 0700 dir."""
        return f"ipc://{self.run_dir / 'admin.sock'}"

    def curve_endpoints(self) -> list[str]:
        """TCP client endpoints; each requires CurveZMQ keys (validated)."""
        out = [self.broker.public_endpoint] if self.broker.public_endpoint else []
        if self.broker.endpoint.startswith("tcp://"):
            out.append(self.broker.endpoint)
        return out

    def backend(self) -> str:
        return self.broker.workers_endpoint or f"ipc://{self.run_dir / 'workers.sock'}"


def _err(source: str, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}. {fix}")


def _check_type(source: str, key: str, value: Any, want: type | tuple[type, ...]) -> None:
    ok = isinstance(value, want) and not (isinstance(value, bool) and want in (int, float, (int, float)))
    if not ok:
        names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        raise _err(source, key, f"must be {names}, got {type(value).__name__} {value!r:.60}",
                   f"Write it as a TOML {names}.")


def _section(source: str, prefix: str, raw: Any, cls: type) -> Any:
    if not isinstance(raw, dict):
        raise _err(source, prefix, "must be a table", f"Write it as [{prefix}].")
    known = {f.name: f for f in fields(cls)}
    out = cls()
    for key, value in raw.items():
        if key not in known:
            raise _err(source, f"{prefix}.{key}", "unknown key",
                       f"Known keys in [{prefix}]: {', '.join(sorted(known))}.")
        default = getattr(out, key)
        want: Any = (int, float) if isinstance(default, float) else type(default)
        _check_type(source, f"{prefix}.{key}", value, want)
        setattr(out, key, float(value) if isinstance(default, float) else value)
    return out


_TOP = {"data_dir": str, "slots": int, "idle_timeout": (int, float), "grace_period": (int, float),
        "hang_timeout": (int, float), "max_inflight_mb": int, "cpu_limit_ms": int,
        "wait_until_limit": (int, float), "debug": bool, "alarm_rate": (int, float),
        "alarm_concurrency": int, "alarm_retries": int, "alarm_retry_base": (int, float),
        "memory_limit_mb": int, "duckdb_memory_mb": int, "low_latency_idle": bool,
        "warm_spare": bool, "checkpoint_wal_mb": int, "checkpoint_interval": (int, float),
        "websocket_max_message_kb": int, "log_format": str}


def from_dict(raw: dict[str, Any], source: str) -> Config:
    # A file serves only what it names: the bundled examples are the no-file defaults.
    cfg = Config(source=source, http=None, namespaces={})
    for key, value in raw.items():
        if key in _TOP:
            _check_type(source, key, value, _TOP[key])
            setattr(cfg, key, float(value) if _TOP[key] == (int, float) else value)
        elif key == "broker":
            cfg.broker = _section(source, "broker", value, BrokerSettings)
        elif key == "limits":
            cfg.limits = _section(source, "limits", value, LimitsSettings)
        elif key == "namespaces":
            cfg.namespaces, cfg.namespace_cpu_limits = _namespaces(source, value)
        elif key == "vars":
            _check_type(source, "vars", value, dict)
            cfg.vars = dict(value)
        elif key == "http":
            cfg.http = _section(source, "http", value, HttpSettings)
        elif key == "secrets":
            cfg.secrets = _secrets(source, value)
        elif key == "metrics":
            cfg.metrics = _section(source, "metrics", value, MetricsSettings)
        elif key == "cluster":
            cfg.cluster = _section(source, "cluster", value, ClusterSettings)
        else:
            raise _err(source, key, "unknown key", "Known top-level keys: " + ", ".join(
                sorted([*_TOP, "broker", "cluster", "http", "limits", "metrics", "namespaces",
                        "secrets", "vars"])) + ".")
    validate(cfg)
    return cfg


def _secrets(source: str, raw: Any) -> dict[str, str]:
    """``NAME = { env = "VAR" }`` or ``{ file = "/path" }``, read now (a missing one stops the
    start with a message naming where it was looked for, never a value)."""
    fix = 'Write NAME = { env = "API_TOKEN" } or NAME = { file = "/run/secrets/name" }.'
    if not isinstance(raw, dict):
        raise _err(source, "secrets", "must be a table", fix)
    out = {}
    for name, spec in raw.items():
        key = f"secrets.{name}"
        if not name.isidentifier():
            raise _err(source, key, "a secret's name must be an identifier", fix)
        if not isinstance(spec, dict) or len(spec) != 1 or not {"env", "file"} >= set(spec):
            raise _err(source, key, "must say where the value is: one of env or file (a value "
                       "written in the config file belongs in [vars])", fix)
        (kind, where), = spec.items()
        if not isinstance(where, str) or not where:
            raise _err(source, key, f"{kind} must be a non-empty string", fix)
        if kind == "env":
            value = os.environ.get(where)
            if value is None:
                raise _err(source, key, f"the environment variable {where} is not set",
                           f"Set {where} in the service's environment (systemd: "
                           "Environment= or EnvironmentFile=).")
        else:
            try:
                value = Path(where).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise _err(source, key, f"cannot read {where}: "
                           f"{getattr(e, 'strerror', None) or type(e).__name__}",
                           "Check the path and that the daemon's user may read it.") from None
            if value.endswith("\n"):
                value = value[:-1]  # (files written with echo end with one)
        out[name] = value
    return out


def _namespaces(source: str, raw: Any) -> tuple[dict[str, str], dict[str, int]]:
    if not isinstance(raw, dict) or not raw:
        raise _err(source, "namespaces", "must hold at least one [namespaces.NAME] table",
                   'Add for example:\n[namespaces.COUNTER]\nclass = "myapp.counter:Counter"')
    out, cpu = {}, {}
    for name, table in raw.items():
        key = f"namespaces.{name}"
        if not name.isidentifier() or not name.isascii():
            raise _err(source, key, "a namespace name must be an identifier (letters, digits, _)",
                       "Rename it, e.g. [namespaces.COUNTER].")
        if len(name) > MAX_NAME:  # (the wire's limit: a longer one hung every call)
            raise _err(source, f"namespaces.{name[:40]}...", f"a namespace name is at most "
                       f"{MAX_NAME} characters (this one has {len(name)})", "Shorten it.")
        if name.startswith("_durable"):
            raise _err(source, key, "names starting with _durable are durable's own",
                       "Rename it, e.g. [namespaces.COUNTER].")
        if not isinstance(table, dict):
            raise _err(source, key, "must be a table", f'Write [{key}] with class = "module:Class".')
        extra = set(table) - {"class", "cpu_limit_ms"}
        if extra:
            raise _err(source, f"{key}.{sorted(extra)[0]}", "unknown key",
                       'The keys are "class" and "cpu_limit_ms".')
        if "cpu_limit_ms" in table:
            _check_type(source, f"{key}.cpu_limit_ms", table["cpu_limit_ms"], int)
            if table["cpu_limit_ms"] < 1:
                raise _err(source, f"{key}.cpu_limit_ms", "must be positive",
                           "Use milliseconds, e.g. 30000.")
            cpu[name] = table["cpu_limit_ms"]
        cls = table.get("class")
        if not isinstance(cls, str) or ":" not in cls:
            raise _err(source, f"{key}.class", f"must be 'package.module:ClassName', got {cls!r}",
                       'Write class = "myapp.counter:Counter".')
        out[name] = cls
    return out, cpu


def validate(cfg: Config) -> None:
    src = cfg.source
    if cfg.slots < 1 or cfg.slots > 1024:
        raise _err(src, "slots", f"must be between 1 and 1024, got {cfg.slots}", "Use one per CPU.")
    for key in ("idle_timeout", "grace_period"):
        if getattr(cfg, key) <= 0:
            raise _err(src, key, "must be positive", "Use a number of seconds above 0.")
    if cfg.alarm_rate <= 0 or cfg.alarm_concurrency < 1 or cfg.alarm_retries < 0 \
            or cfg.alarm_retry_base <= 0:
        raise _err(src, "alarm_rate / alarm_concurrency / alarm_retries / alarm_retry_base",
                   "must be positive (alarm_retries may be 0)",
                   "E.g. alarm_rate = 10000, alarm_concurrency = 1000, alarm_retries = 6, "
                   "alarm_retry_base = 2.0.")
    if cfg.cpu_limit_ms < 1 or cfg.wait_until_limit <= 0:
        raise _err(src, "cpu_limit_ms / wait_until_limit", "must be positive",
                   "Use milliseconds (cpu_limit_ms) and seconds (wait_until_limit).")
    if cfg.hang_timeout < 3:
        raise _err(src, "hang_timeout", f"must be at least 3 seconds, got {cfg.hang_timeout:g}",
                   "Processes beat once a second; use 30 unless calls may block longer.")
    if cfg.checkpoint_wal_mb < 1 or cfg.checkpoint_interval <= 0:
        raise _err(src, "checkpoint_wal_mb / checkpoint_interval", "must be positive",
                   "Use a size in MiB (at least 1) and a number of seconds above 0.")
    if cfg.duckdb_memory_mb < 16:
        raise _err(src, "duckdb_memory_mb", f"must be at least 16, got {cfg.duckdb_memory_mb}",
                   "Use the MiB of page and index cache DuckDB may keep per slot.")
    if cfg.memory_limit_mb < 0:
        raise _err(src, "memory_limit_mb", "must be 0 (no limit) or positive", "Use a size in MiB.")
    if cfg.max_inflight_mb < 1:
        raise _err(src, "max_inflight_mb", "must be at least 1", "Use a size in MiB.")
    if cfg.log_format not in ("text", "json"):
        raise _err(src, "log_format", f"must be \"text\" or \"json\", got {cfg.log_format!r}",
                   'Use log_format = "json" for log shippers; "text" otherwise.')
    if not 1 <= cfg.websocket_max_message_kb <= 32 << 10:
        raise _err(src, "websocket_max_message_kb", "must be between 1 and 32768",
                   "Use a size in KiB (1024, Cloudflare's limit, is the default).")
    if cfg.broker.client_inflight_limit < 1:
        raise _err(src, "broker.client_inflight_limit", "must be positive", "Use e.g. 10000.")
    if cfg.broker.heartbeat <= 0 or cfg.broker.queue_deadline <= 0 or cfg.broker.queue_limit < 1:
        raise _err(src, "broker", "heartbeat, queue_deadline and queue_limit must be positive",
                   "Use positive numbers.")
    if cfg.http is not None:
        h = cfg.http
        host, sep, port = h.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise _err(src, "http.listen", f"must be host:port, got {h.listen!r}",
                       'Write e.g. listen = "127.0.0.1:8787".')
        if h.processes < 1 or h.processes > 64:
            raise _err(src, "http.processes", "must be between 1 and 64", "Use one per core at most.")
        if h.front not in ("auto", "gateways", "slots"):
            raise _err(src, "http.front", f'must be "auto", "slots" or "gateways", got '
                       f'{h.front!r}', 'Leave it out ("auto") unless you measured otherwise.')
        if h.front == "slots" and cfg.cluster.enabled:
            raise _err(src, "http.front", '"slots" is not available in cluster mode yet',
                       'Leave it out ("auto": gateways in cluster mode).')
        if h.front == "slots" and h.processes != 1:
            raise _err(src, "http.processes", 'counts gateway processes, and front = "slots" '
                       "has none: every object process serves HTTP",
                       'Remove processes, or set front = "gateways".')
        if h.front == "auto":  # (resolved once: every process reads the same settings)
            h.front = "gateways" if cfg.cluster.enabled or h.processes > 1 else "slots"
        if min(h.max_inflight_per_namespace, h.max_inflight_per_object, h.max_inflight_mb) < 1:
            raise _err(src, "http.max_inflight_*", "must be positive", "Use positive integers.")
        if h.max_inflight_per_namespace >= cfg.broker.client_inflight_limit:
            raise _err(src, "http.max_inflight_per_namespace",
                       f"{h.max_inflight_per_namespace} leaves no room under "
                       f"broker.client_inflight_limit ({cfg.broker.client_inflight_limit}): one "
                       "flooded namespace would take every other namespace's turn",
                       "Keep it well below broker.client_inflight_limit (default 4000 of 10000).")
        if h.max_websockets < 1 or h.websocket_max_buffer_kb < 1:
            raise _err(src, "http.max_websockets / http.websocket_max_buffer_kb",
                       "must be positive", "E.g. max_websockets = 20000, "
                       "websocket_max_buffer_kb = 4096.")
        if h.max_body_bytes < 1 or h.read_timeout <= 0 or h.idle_timeout <= 0:
            raise _err(src, "http", "max_body_bytes, read_timeout and idle_timeout must be positive",
                       "Use positive numbers.")
        if h.worker and ":" not in h.worker:
            raise _err(src, "http.worker", f"must be 'package.module:fetch', got {h.worker!r}",
                       'Write worker = "myapp.worker:fetch".')
    for name in ("max_key_bytes", "max_value_bytes", "max_keys_per_call"):
        if getattr(cfg.limits, name) < 1:
            raise _err(src, f"limits.{name}", "must be positive", "Use a positive integer.")
    b = cfg.broker
    fix_keys = ("Run `durable keygen DIR --name broker` and `durable keygen DIR --name CLIENT`, "
                "then set broker.curve_secret_key to DIR/broker.key_secret and "
                "broker.authorized_keys to a directory holding each client's .key file.")
    if b.public_endpoint:
        if not b.public_endpoint.startswith("tcp://"):
            raise _err(src, "broker.public_endpoint", "must be a tcp:// endpoint",
                       'Write e.g. public_endpoint = "tcp://0.0.0.0:7700".')
        if not (b.curve_secret_key and b.authorized_keys):
            # Even on loopback: any local user can connect to a TCP port.
            raise _err(src, "broker.public_endpoint",
                       f"{b.public_endpoint} is a TCP endpoint, which any user of this machine "
                       "(or others) can reach, so it needs CurveZMQ keys", fix_keys)
    if bool(b.curve_secret_key) != bool(b.authorized_keys):
        raise _err(src, "broker.curve_secret_key", "curve_secret_key and authorized_keys go "
                   "together", "Set both, or neither.")
    if b.curve_secret_key and not Path(b.curve_secret_key).is_file():
        raise _err(src, "broker.curve_secret_key", f"{b.curve_secret_key} is not a file",
                   "Point it at the .key_secret file `durable keygen` wrote.")
    if b.authorized_keys and not Path(b.authorized_keys).is_dir():
        raise _err(src, "broker.authorized_keys", f"{b.authorized_keys} is not a directory",
                   "Point it at a directory of client .key files.")
    if b.authorized_keys:
        from durable.broker.router import load_permissions
        try:
            load_permissions(b.authorized_keys)
        except (ValueError, OSError) as e:
            raise _err(src, "broker.authorized_keys", str(e),
                       "Fix the file: each [NAME] names a NAME.key there and holds "
                       'namespaces = ["NS", ...].') from None
    for key, endpoint in (("broker.endpoint", b.endpoint or cfg.frontend()),
                          ("broker.workers_endpoint", cfg.backend())):
        if endpoint.startswith("ipc://") and len(endpoint) - len("ipc://") > _IPC_PATH_MAX:
            raise _err(src, key, f"the ipc path is {len(endpoint) - 6} bytes; the limit is "
                       f"{_IPC_PATH_MAX}", "Use a shorter data_dir or set the endpoint explicitly.")
        if endpoint.startswith("tcp://"):
            host = endpoint[6:].rsplit(":", 1)[0].strip("[]")
            if key == "broker.workers_endpoint":
                raise _err(src, key, f"{endpoint} is a TCP endpoint: any local user could "
                           "register as an object process and see every call",
                           "Leave it unset (ipc in the 0700 run directory) or use an ipc:// path "
                           "in a directory only the daemon's user can enter.")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise _err(src, key, f"{endpoint} is not on this machine",
                           "Keep this endpoint on 127.0.0.1 or ipc://; for other machines set "
                           "broker.public_endpoint with CurveZMQ keys.")
            if not b.curve_secret_key:
                raise _err(src, key, f"{endpoint} is a TCP endpoint, which every local user can "
                           "reach, so it needs CurveZMQ keys (the daemon's own processes use "
                           "ipc in the run directory either way)",
                           fix_keys + " Or leave it unset: ipc in the 0700 run directory.")
        elif not endpoint.startswith("ipc://"):
            raise _err(src, key, f"{endpoint!r} is not an ipc:// or tcp:// endpoint",
                       'Use e.g. "ipc:///run/durable/broker.sock" or "tcp://127.0.0.1:7700".')
    if cfg.metrics.listen:
        host, sep, port = cfg.metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _err(src, "metrics.listen", f"must be host:port, got {cfg.metrics.listen!r}",
                       'Write e.g. listen = "127.0.0.1:9787".')
        if host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            raise _err(src, "metrics.listen", "must be a loopback address (the figures name "
                       "your namespaces and their load)",
                       "Use 127.0.0.1 and let Prometheus scrape through a proxy or tunnel.")
    if cfg.broker.socket_group:
        import grp

        try:
            grp.getgrnam(cfg.broker.socket_group)
        except KeyError:
            raise _err(src, "broker.socket_group", f"no group named {cfg.broker.socket_group!r}",
                       "Create it (groupadd) and add the applications' users to it.") from None
        if not cfg.frontend().startswith("ipc://"):
            raise _err(src, "broker.socket_group", "applies to an ipc:// client endpoint",
                       "Leave broker.endpoint unset (ipc in the run directory).")
    if cfg.cluster.enabled:
        _validate_cluster(cfg, src)
    if not cfg.namespaces:
        raise _err(src, "namespaces", "no namespace is configured (a config file serves only "
                   "the namespaces it names; the bundled examples run without a file)",
                   'Add for example:\n[namespaces.COUNTER]\nclass = "myapp.counter:Counter"')


def _validate_cluster(cfg: Config, src: str) -> None:
    c = cfg.cluster
    for url in c.servers():
        if not url.startswith(("nats://", "tls://")):
            raise _err(src, "cluster.nats", f"{url!r} is not a NATS URL",
                       "Write nats://HOST:4222 (several: comma-separated).")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", c.host_id or ""):
        raise _err(src, "cluster.host_id", f"{c.host_id!r} is not a host name for the cluster",
                   "Give each host a unique name of letters, digits, '-' and '_' "
                   "(--host-id NAME).")
    host, _, port = c.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _err(src, "cluster.listen", f"{c.listen!r} is not HOST:PORT",
                   "Give the address the other hosts reach this host's broker at, e.g. "
                   "--cluster-listen 10.0.0.5:7710.")
    if not c.curve_key:
        raise _err(src, "cluster.curve_key", "cluster mode needs the cluster's CurveZMQ key pair",
                   "Make one with `durable keygen /etc/durable --name cluster`, copy it to every "
                   "host, and set curve_key = \"/etc/durable/cluster.key_secret\" (or "
                   "--cluster-key).")
    try:
        from zmq.auth import load_certificate
        _, secret = load_certificate(c.curve_key)
    except (OSError, ValueError) as e:
        raise _err(src, "cluster.curve_key", f"cannot read a key pair from {c.curve_key}: {e}",
                   "Give the .key_secret file `durable keygen` wrote.") from None
    if not secret:
        raise _err(src, "cluster.curve_key", f"{c.curve_key} holds no secret key",
                   "Give the .key_secret file, not the public .key.")
    if c.lease < 1.0 or c.replicas not in (1, 3, 5):
        raise _err(src, "cluster", "lease must be at least 1 s and replicas 1, 3 or 5",
                   "The defaults: lease = 5.0, replicas = 3.")
    try:
        import nats  # noqa: F401
    except ImportError:
        raise _err(src, "cluster.nats", "cluster mode needs the NATS client",
                   "pip install 'durable[cluster]'") from None


def to_raw(cfg: Config) -> dict[str, Any]:
    """The config as TOML-shaped data: ``from_dict(to_raw(cfg))`` gives it back, checked."""
    raw: dict[str, Any] = {k: getattr(cfg, k) for k in _TOP}
    raw["data_dir"] = str(cfg.data_path)  # children may run elsewhere
    raw["broker"] = asdict(cfg.broker)
    raw["limits"] = asdict(cfg.limits)
    if cfg.http is not None:
        raw["http"] = asdict(cfg.http)
    raw["metrics"] = asdict(cfg.metrics)
    if cfg.cluster.enabled:
        raw["cluster"] = asdict(cfg.cluster)
    raw["namespaces"] = {
        name: {"class": cls, **({"cpu_limit_ms": cfg.namespace_cpu_limits[name]}
                                if name in cfg.namespace_cpu_limits else {})}
        for name, cls in cfg.namespaces.items()}
    raw["vars"] = dict(cfg.vars)
    return raw


def _settings_body(cfg: Config, runtime: dict[str, Any]) -> bytes:
    # The secrets' values, as resolved at load (to_raw leaves them out: it is TOML-shaped).
    return orjson.dumps({"source": cfg.source, "config": to_raw(cfg), "runtime": runtime,
                         "secrets": cfg.secrets})


def settings_fd(cfg: Config, **runtime: Any) -> int:
    """The whole checked config (and what the supervisor learnt at start, ``runtime``) in an
    anonymous in-memory file, for the children to inherit and read once at their start.

    Not a file on disk: a full disk or a removed data dir must not turn into a bad
    configuration, and nothing (a key path, a var) shows in ``ps`` or in the data dir.
    """
    fd = os.memfd_create("durable-settings", os.MFD_CLOEXEC)
    os.write(fd, _settings_body(cfg, runtime))
    return fd


def read_settings_fd(fd: int) -> tuple[Config, dict[str, Any]]:
    """A child's side of :func:`settings_fd` (read at offset 0: the fd is shared)."""
    return _parse_settings(os.pread(fd, os.fstat(fd).st_size, 0))


def write_settings(cfg: Config, path: Path, **runtime: Any) -> None:
    """The same settings as a 0600 file, for processes started without a supervisor (the
    tests' cluster, the benchmark)."""
    body = _settings_body(cfg, runtime)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_settings(path: str | os.PathLike[str]) -> tuple[Config, dict[str, Any]]:
    """A child's side of :func:`write_settings`: the config, checked again, and the runtime."""
    return _parse_settings(Path(path).read_bytes())


def _parse_settings(body: bytes) -> tuple[Config, dict[str, Any]]:
    data = orjson.loads(body)
    cfg = from_dict(data["config"], data["source"])
    cfg.secrets = dict(data.get("secrets") or {})
    return cfg, data["runtime"]


def settings_from_args(path: str | None, fd: int | None) -> tuple[Config, dict[str, Any]]:
    """``--settings PATH`` or ``--settings-fd N``, as a child was started with."""
    if fd is not None:
        return read_settings_fd(fd)
    if path is None:
        raise ConfigError("no settings: pass --settings-fd (from the supervisor) or --settings")
    return read_settings(path)


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read and check a config file; ``None`` gives the built-in defaults."""
    if path is None:
        cfg = Config()
        validate(cfg)
        return cfg
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file. Pass the path of a TOML file to --config.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}. Fix the syntax at that line.") from None
    return from_dict(raw, str(p))
