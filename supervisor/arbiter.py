"""The arbiter: owns one watcher per process (broker, N object processes) and keeps them running.

Rules this file keeps:

* **Signal handlers only enqueue.** SIGTERM/SIGINT/SIGCHLD append to a queue
  and wake the loop through ``signal.set_wakeup_fd``; all work happens in the
  loop (gunicorn's ``Arbiter.signal``).
* **Every child is reaped** with ``waitpid(-1, WNOHANG)``; every child dies
  with the supervisor (``PR_SET_PDEATHSIG`` on Linux, so even ``kill -9`` of the
  supervisor leaves no orphans).
* **Restarts follow the policy** (``restart_policy.py``); a process that
  cannot help (bad configuration, storage) or that flaps halts the daemon,
  saying why in the log and in systemd's STATUS.
* **Ready means ready**: READY=1 only once the broker answers and every slot
  has registered.
* **Stop**: STOPPING=1; SIGTERM the object processes (each finishes its calls
  in flight and makes every write durable), then the broker; SIGKILL what is
  left when the grace period ends. A second SIGTERM skips straight to SIGKILL.

Watcher lifecycle::

    STOPPED --start--> RUNNING --exit--> BACKOFF --due--> RUNNING
    RUNNING --exit (hopeless/flapping)--> FAILED
    RUNNING --exit 65 (slot files damaged)--> CORRUPT   (the other slots serve on)
    CORRUPT --new DuckDB file (durable repair)--> RUNNING
    RUNNING --stop--> STOPPING --exit--> STOPPED
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import zmq

from durable.objectproc.loop import load_class
from durable.protocol.messages import (
    Control,
    Hello,
    Stats,
    StatsReply,
    parse_from_broker_to_client,
)

from . import cpu_latency, status, systemd
from .config import EXIT_CONFIG, Config, ConfigError
from .datadir import DataDirError, Identity, open_data_dir
from .migrate import migrate
from .restart_policy import EXIT_STORAGE, Decision, RestartPolicy

__all__ = ["Arbiter", "Watcher", "WatcherState"]

log = logging.getLogger("durable.supervisor")


class WatcherState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FAILED = "failed"
    CORRUPT = "corrupt"  # an object process whose slot's files are damaged; the rest serve on


_TRANSITIONS = {
    (WatcherState.STOPPED, "start"): WatcherState.RUNNING,
    (WatcherState.BACKOFF, "start"): WatcherState.RUNNING,
    (WatcherState.RUNNING, "exit"): WatcherState.BACKOFF,
    (WatcherState.RUNNING, "fail"): WatcherState.FAILED,
    (WatcherState.RUNNING, "corrupt"): WatcherState.CORRUPT,
    (WatcherState.CORRUPT, "stop"): WatcherState.CORRUPT,
    (WatcherState.CORRUPT, "start"): WatcherState.RUNNING,  # `durable repair` replaced its file
    (WatcherState.RUNNING, "stop"): WatcherState.STOPPING,
    (WatcherState.BACKOFF, "stop"): WatcherState.STOPPED,
    (WatcherState.STOPPING, "exit"): WatcherState.STOPPED,
    (WatcherState.FAILED, "stop"): WatcherState.FAILED,
    (WatcherState.STOPPED, "stop"): WatcherState.STOPPED,
}


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The child's set-up between fork and exec: die with the supervisor, own process group."""
    def setup() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the supervisor died between fork and prctl: no
                os._exit(1)             # signal will come, so do not start at all
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it stops the children
    return setup


@dataclass
class Watcher:
    name: str
    role: str
    slot: int | None
    argv: list[str]
    env: dict[str, str]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    state: WatcherState = WatcherState.STOPPED
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    start_due: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    ps: Any = None
    corrupt_file: tuple[int, int] | None = None  # (dev, ino) of the damaged DuckDB file
    rss: int = 0
    cpu: float = 0.0

    def step(self, event: str) -> None:
        nxt = _TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise RuntimeError(f"watcher {self.name}: {event!r} is not allowed in state {self.state.value}")
        self.state = nxt

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, now: float) -> None:
        self.step("start")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent(os.getpid()))
        self.started_at = now
        self.rss, self.cpu = 0, 0.0
        try:
            self.ps = psutil.Process(self.proc.pid)
            self.ps.cpu_percent(None)  # the first call only sets the baseline
        except psutil.Error:
            self.ps = None
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)


class Arbiter:
    def __init__(self, config: Config, *, python: str = sys.executable,
                 clock: Any = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.python = python
        self.watchers: list[Watcher] = []
        self._signals: deque[int] = deque()
        self._stopping = False
        self._ready = False
        self.exit_code = 0
        self.control_endpoint = f"ipc://{config.run_dir / 'control.sock'}"
        self._control: zmq.Socket | None = None
        self.identity: Identity | None = None
        self._status_error_logged = 0.0

    # -- set-up ---------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that would make children fail at once; raise ConfigError first."""
        for name, spec in self.config.namespaces.items():
            try:
                load_class(spec)
            except ValueError as e:
                raise ConfigError(f"{self.config.source}: namespaces.{name}.class: {e}. Check "
                                  "the module is importable (installed, or on PYTHONPATH).") from None

    def _prepare_dirs(self) -> None:
        self.identity = open_data_dir(self.config.data_path)  # DataDirError: refuse to start
        run = self.config.run_dir
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run, 0o700)
        for endpoint in (self.config.frontend(), self.config.backend()):
            if endpoint.startswith("ipc://"):  # e.g. /run/durable when not under systemd
                Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _build_watchers(self) -> None:
        c = self.config
        env = dict(os.environ)
        front, back = c.frontend(), c.backend()
        broker = [self.python, "-m", "durable.broker", "--frontend", front, "--backend", back,
                  "--slots", str(c.slots), "--data-dir", str(c.data_path),
                  "--heartbeat", str(c.broker.heartbeat), "--queue-limit", str(c.broker.queue_limit),
                  "--queue-deadline", str(c.broker.queue_deadline),
                  "--control", self.control_endpoint]
        if c.broker.public_endpoint:
            broker += ["--public", c.broker.public_endpoint]
        if c.broker.curve_secret_key:
            broker += ["--curve-secret-key", c.broker.curve_secret_key,
                       "--authorized-keys", c.broker.authorized_keys]
        for ns in c.namespaces:
            broker += ["--namespace", ns]
        self.watchers.append(Watcher("broker", "broker", None, broker, env))
        for slot in range(c.slots):
            argv = [self.python, "-m", "durable.objectproc", "--slot", str(slot), "--backend", back,
                    "--frontend", front, "--data-dir", str(c.data_path),
                    "--idle-timeout", str(c.idle_timeout), "--heartbeat", str(c.broker.heartbeat),
                    "--vars-json", orjson.dumps(c.vars).decode(),
                    "--max-key-bytes", str(c.limits.max_key_bytes),
                    "--max-value-bytes", str(c.limits.max_value_bytes),
                    "--max-keys-per-call", str(c.limits.max_keys_per_call),
                    "--duckdb-memory-mb", str(c.duckdb_memory_mb),
                    "--checkpoint-wal-mb", str(c.checkpoint_wal_mb),
                    "--checkpoint-interval", str(c.checkpoint_interval),
                    "--data-dir-id", self.identity.id if self.identity else ""]
            for ns, cls in c.namespaces.items():
                argv += ["--namespace", f"{ns}={cls}"]
            self.watchers.append(Watcher(f"objectproc-{slot}", "objectproc", slot, argv, env))
        if c.http is not None:
            h = c.http
            argv = [self.python, "-m", "durable.broker.gateway", "--listen", h.listen,
                    "--frontend", front, "--data-dir", str(c.data_path),
                    "--vars-json", orjson.dumps(c.vars).decode(),
                    "--max-body-bytes", str(h.max_body_bytes), "--read-timeout", str(h.read_timeout),
                    "--idle-timeout", str(h.idle_timeout), "--heartbeat", str(c.broker.heartbeat),
                    "--grace", str(c.grace_period)]
            for ns in c.namespaces:
                argv += ["--namespace", ns]
            if h.worker:
                argv += ["--worker", h.worker]
            if h.debug:
                argv.append("--debug")
            for i in range(h.processes):
                self.watchers.append(Watcher(f"gateway-{i}", "gateway", None, argv, env))

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.check()
        try:
            self._prepare_dirs()
        except DataDirError as e:
            log.error("%s", e)
            systemd.notify(f"STATUS=halted: {e}")
            return EXIT_STORAGE
        try:
            moved = migrate(self.config.data_path, self.config.slots, log=log.info)
        except Exception as e:
            log.exception("moving objects to the new slot count failed: %s", e)
            systemd.notify(f"STATUS=halted: moving objects to {self.config.slots} slots failed: {e}")
            return EXIT_STORAGE
        if moved:
            log.info("moved %d objects to their new slots", moved)
        self._build_watchers()
        latency = cpu_latency.hold() if self.config.low_latency_idle else None
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda s, _f: self._signals.append(s))
        watchdog = systemd.watchdog_interval()
        next_watchdog = self.clock()
        next_sample = self.clock()
        self._started = time.time()
        systemd.notify("STATUS=starting the broker and object processes")
        now = self.clock()
        for w in self.watchers:
            w.start(now)
        probe = _Probe(self.config.frontend())
        self._control = zmq.Context.instance().socket(zmq.PUSH)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.SNDHWM, 100)
        self._control.connect(self.control_endpoint)
        try:
            while True:
                now = self.clock()
                due = [w.start_due for w in self.watchers if w.state is WatcherState.BACKOFF]
                timeout = max(0.0, min([0.2, *[d - now for d in due]]))
                with contextlib.suppress(InterruptedError):
                    select.select([rfd], [], [], timeout)
                with contextlib.suppress(BlockingIOError):
                    while os.read(rfd, 4096):
                        pass
                self._reap()
                if self._handle_signals():
                    break
                if self.exit_code:
                    self._stop(immediate=False)
                    break
                self._start_due()
                corrupt = {w.slot for w in self.watchers if w.state is WatcherState.CORRUPT}
                if not self._ready and probe.all_slots_up(self.config.slots, corrupt) and self._http_up():
                    self._ready = True
                    systemd.notify("READY=1")
                    systemd.notify(f"STATUS=serving {len(self.config.namespaces)} namespaces on "
                                   f"{self.config.slots} slots at {self.config.frontend()}")
                    log.info("ready: clients connect to %s%s", self.config.frontend(),
                             f", HTTP on http://{self.config.http.listen}" if self.config.http else "")
                if self.clock() >= next_sample:
                    next_sample = self.clock() + 1.0
                    self._sample()
                if watchdog is not None and self._ready and self.clock() >= next_watchdog:
                    systemd.notify("WATCHDOG=1")
                    next_watchdog = self.clock() + watchdog
        finally:
            if latency is not None:
                latency.close()  # the kernel ends the request (it would at exit anyway)
            probe.close()
            self._control.close(linger=0)
            with contextlib.suppress(OSError):
                status.remove(self.config)
            signal.set_wakeup_fd(-1)
            os.close(rfd)
            os.close(wfd)
            for w in self.watchers:  # nothing runs unowned, whatever happened above
                w.signal(signal.SIGKILL)
                if w.proc is not None:
                    with contextlib.suppress(Exception):
                        w.proc.wait(timeout=5)
        return self.exit_code

    def _http_up(self) -> bool:
        if self.config.http is None:
            return True
        host, _, port = self.config.http.listen.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.2):
                return True
        except OSError:
            return False

    def _sample(self) -> None:
        """psutil: RSS and CPU of every child; restart an object process over its memory limit."""
        if self.identity is not None and not self.identity.still_there() and not self.exit_code:
            log.error("the data dir %s was removed or replaced while serving (its identity file "
                      "is gone or is another file): stopping, so that nothing is written into "
                      "deleted files or a new, empty store. Restore it (`durable restore`) or "
                      "start again to create a new one", self.config.data_path)
            systemd.notify("STATUS=halted: the data dir was removed or replaced while serving")
            self.exit_code = EXIT_STORAGE
            return
        limit = self.config.memory_limit_mb * 1024 * 1024
        for w in self.watchers:
            if w.state is not WatcherState.RUNNING or w.ps is None:
                continue
            try:
                with w.ps.oneshot():
                    w.rss = w.ps.memory_info().rss
                    w.cpu = w.ps.cpu_percent(None)
            except psutil.Error:
                continue
            if limit and w.role == "objectproc" and w.rss > limit:
                log.warning("%s uses %.0f MiB, over memory_limit_mb = %d: restarting it gracefully "
                            "(its writes are made durable first)", w.name, w.rss / 2**20,
                            self.config.memory_limit_mb)
                w.signal(signal.SIGTERM)
                w.ps = None  # one SIGTERM; the exit restarts it
        self._write_status({
            "supervisor": {"pid": os.getpid(), "started": self._started, "ready": self._ready,
                           "config": self.config.source, "frontend": self.config.frontend()},
            "processes": [{
                "role": w.role, "slot": w.slot, "pid": w.pid, "state": w.state.value,
                "uptime": round(self.clock() - w.started_at, 1) if w.state is WatcherState.RUNNING else None,
                "restarts": w.restarts, "rss": w.rss, "cpu": w.cpu, "last_exit": w.last_exit,
            } for w in self.watchers],
        })

    def _write_status(self, data: dict[str, Any]) -> None:
        """The status file is a convenience: failing to write it is logged (once a minute)."""
        try:
            status.write(self.config, data)
        except OSError as e:
            if time.monotonic() - self._status_error_logged >= 60:
                self._status_error_logged = time.monotonic()
                log.error("cannot write the status file in %s (%s); serving on, but `durable "
                          "status` cannot see this daemon until it can", self.config.run_dir, e)

    def _handle_signals(self) -> bool:
        while self._signals:
            sig = self._signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: stopping", signal.Signals(sig).name)
                self._stop(immediate=False)
                return True
        return False

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            for w in self.watchers:
                if w.pid == pid:
                    w.proc.returncode = code
                    self._exited(w, code)

    def _tell_broker(self, msg: Control) -> None:
        if self._control is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._control.send_multipart(msg.encode(), zmq.NOBLOCK)

    def _exited(self, w: Watcher, code: int) -> None:
        now = self.clock()
        w.last_exit = code
        if w.role == "objectproc":  # its stubs break now, not after missed heartbeats
            self._tell_broker(Control("slot_down", w.slot, w.pid))
        if self._stopping or w.state is WatcherState.STOPPING:
            if w.state is WatcherState.STOPPING:
                w.step("exit")
            return
        decision: Decision = w.policy.on_exit(now, code, now - w.started_at)
        if decision.corrupt and w.role == "objectproc":
            w.step("corrupt")
            w.corrupt_file = self._slot_file(w.slot)
            log.error("%s %s", w.name, decision.reason)
            systemd.notify(f"STATUS=degraded: slot {w.slot} is corrupt (durable verify --slot "
                           f"{w.slot}); the other slots serve")
            self._tell_broker(Control("slot_failed", w.slot, w.pid,
                                      "its storage is damaged and the slot is out of service; an "
                                      f"operator must run `durable verify --slot {w.slot}`"))
            return
        if decision.restart_in is None:
            w.step("fail")
            log.error("%s %s", w.name, decision.reason)
            systemd.notify(f"STATUS=halted: {w.name} {decision.reason}")
            self.exit_code = code if code in (EXIT_CONFIG, EXIT_STORAGE) else 1
            return
        w.step("exit")
        w.start_due = now + decision.restart_in
        w.restarts += 1
        log.warning("%s %s", w.name, decision.reason)

    def _start_due(self) -> None:
        now = self.clock()
        for w in self.watchers:
            if w.state is WatcherState.BACKOFF and now >= w.start_due:
                w.start(now)
            elif (w.state is WatcherState.CORRUPT and not self._stopping
                  and self._slot_file(w.slot) != w.corrupt_file):
                log.warning("%s: slot %d's DuckDB file was replaced (durable repair): starting it "
                            "again", w.name, w.slot)
                w.start(now)

    def _slot_file(self, slot: int | None) -> tuple[int, int] | None:
        try:
            st = os.stat(self.config.data_path / f"slot-{slot}.duckdb")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _stop(self, *, immediate: bool) -> None:
        self._stopping = True
        systemd.notify("STOPPING=1")
        systemd.notify("STATUS=stopping: finishing calls in flight and making writes durable")
        deadline = self.clock() + (0 if immediate else self.config.grace_period)
        self._tell_broker(Control("drain"))  # stop taking new calls; calls in flight finish
        gateways = [w for w in self.watchers if w.role == "gateway"]
        objectprocs = [w for w in self.watchers if w.role == "objectproc"]
        brokers = [w for w in self.watchers if w.role == "broker"]
        for group in (gateways, objectprocs, brokers):
            for w in group:
                if w.state is WatcherState.RUNNING:
                    w.step("stop")
                    w.signal(signal.SIGTERM)
                elif w.state is WatcherState.BACKOFF:
                    w.step("stop")
            while any(w.state is WatcherState.STOPPING for w in group):
                if self.clock() >= deadline or any(s in (signal.SIGTERM, signal.SIGINT)
                                                   for s in self._signals):
                    for w in group:
                        if w.state is WatcherState.STOPPING:
                            log.warning("%s did not stop in time: SIGKILL", w.name)
                            w.signal(signal.SIGKILL)
                    self._signals.clear()
                    deadline = self.clock()
                time.sleep(0.01)
                self._reap()
        log.info("stopped")


class _Probe:
    """Asks the broker (as a client) whether every slot has registered."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sock.send_multipart(Hello(os.getpid(), "supervisor").encode())
        self.next_ask = 0.0
        self.call_id = 0

    def all_slots_up(self, slots: int, skip: set[int] | None = None) -> bool:
        """Whether every slot but those in ``skip`` (corrupt: they will not come) is up."""
        up = False
        while self.sock.poll(0):
            try:
                msg = parse_from_broker_to_client(self.sock.recv_multipart())
            except Exception:
                continue
            if isinstance(msg, StatsReply):
                s = msg.stats.get("slots", [])
                up = len(s) == slots and all(x.get("up") or x.get("slot") in (skip or ())
                                             for x in s)
        now = time.monotonic()
        if not up and now >= self.next_ask:
            self.call_id += 1
            self.sock.send_multipart(Stats(self.call_id).encode())
            self.sock.send_multipart(Hello(os.getpid(), "supervisor").encode())  # if the broker restarted
            self.next_ask = now + 0.05
        return up

    def close(self) -> None:
        self.sock.close(linger=0)
