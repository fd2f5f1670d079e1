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
* **One owner.** Before any socket, file or child, the supervisor takes the
  data dir's lock and binds the HTTP port itself (no SO_REUSEPORT): a second
  daemon, or a port in use, is refused before anything changes. Each gateway
  process serves the supervisor's listening socket (gunicorn's model), and
  every child holds the lock's fd.
* **Liveness is measured, not assumed.** Each child beats over a pipe from a
  thread of its own, reporting how long ago its loop last turned
  (``lifeline.py``). Silence or a lag beyond ``hang_timeout`` is a hang: the
  child is SIGKILLed and restarted; ``durable status`` shows ``hung`` meanwhile.
  Every SIGTERM the supervisor sends is followed by SIGKILL after
  ``grace_period``.
* **Ready means ready**: READY=1 only once the broker answers, every slot
  has registered and every gateway is serving.
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
import enum
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from durable.fsm import Transitions
from durable.objects import load_class
from durable.protocol.messages import (
    Control,
    Hello,
    Stats,
    StatsReply,
    parse_from_broker_to_client,
)

from . import cpu_latency, lifeline, status, systemd
from .config import EXIT_CONFIG, Config, ConfigError, load, settings_fd
from .datadir import DataDirError, Identity, lock_data_dir, open_data_dir
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


_TRANSITIONS = Transitions({
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
})


def _spawn(argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], *,
           stdin: int = subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
    """Start a child with a lifeline pipe; return it and the pipe's read end."""
    r, w = os.pipe()  # the lifeline (both ends close-on-exec; the child gets w)
    os.set_blocking(r, False)
    env = dict(env, DURABLE_LIFELINE_FD=str(w), DURABLE_PARENT=str(os.getpid()))
    try:
        # Its own process group (a terminal's Ctrl-C reaches the supervisor only; it stops
        # the children). No preexec_fn: Python code between fork and exec can deadlock on a
        # lock another thread held at fork (the cluster thread), and Popen waits for the exec
        # forever. The child binds its life to ours itself (lifeline.bind_to_parent).
        proc = subprocess.Popen(argv, env=env, stdin=stdin, pass_fds=(w, *pass_fds),
                                process_group=0)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return proc, r


@dataclass
class Spare:
    """The warm spare: an object process started with ``--standby``, its imports done,
    waiting for a slot number on its stdin (objectproc/__main__.py)."""

    proc: subprocess.Popen
    beat_fd: int
    started_at: float
    rss: int = 0
    ready: bool = False  # its imports are done (it said "standby" on its lifeline)

    def read_beats(self) -> None:
        with contextlib.suppress(OSError):
            if b"standby" in os.read(self.beat_fd, 4096):
                self.ready = True

    def hand(self, slot: int) -> bool:
        """Give it a slot; False if it is gone already (its exit is reaped as a spare's)."""
        try:
            self.proc.stdin.write(b"%d\n" % slot)
            self.proc.stdin.close()
        except OSError:
            return False
        return True

    def drop(self) -> None:
        """No slot for it: EOF on its stdin ends it, SIGTERM in case it is still importing."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            os.close(self.beat_fd)


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
    #: restarts by cause ("hang", "memory_limit", "killed": a signal, "exit"), for [metrics]
    restart_causes: dict[str, int] = field(default_factory=dict)
    memory_restart: bool = False
    last_exit: int | None = None
    ps: Any = None
    corrupt_file: tuple[int, int] | None = None  # (dev, ino) of the damaged DuckDB file
    rss: int = 0
    cpu: float = 0.0
    beat_fd: int | None = None  # read end of the child's lifeline pipe
    last_beat: float = 0.0
    lag: float = 0.0  # how long ago the child's loop last turned, as last reported
    ready: bool = False  # the child said it serves (storage open, port served)
    kill_at: float | None = None  # SIGKILL then, unless it exited after our SIGTERM
    hung: bool = False
    pass_fds: tuple[int, ...] = ()
    hang_timeout: float | None = None  # None: the config's
    rolling: bool = False  # stopped by a reload: started again at once, on the new settings

    def step(self, event: str) -> None:
        self.state = _TRANSITIONS.step(f"watcher {self.name}", self.state, event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, now: float, spare: Spare | None = None) -> None:
        """Start a new process, or become the given spare (already handed this slot)."""
        self.step("start")
        if spare is not None:
            self.proc, r = spare.proc, spare.beat_fd
        else:
            self.proc, r = _spawn(self.argv, self.env, self.pass_fds)
        self.close_beat()
        self.beat_fd = r
        self.last_beat, self.lag, self.ready, self.kill_at, self.hung = now, 0.0, False, None, False
        self.started_at = now
        self.rss, self.cpu = 0, 0.0
        try:
            self.ps = psutil.Process(self.proc.pid)
            self.ps.cpu_percent(None)  # the first call only sets the baseline
        except psutil.Error:
            self.ps = None
        log.info("started %s (pid %d)%s", self.name, self.proc.pid,
                 " from the warm spare" if spare is not None else "")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def terminate(self, now: float, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` if it has not exited by then."""
        self.signal(signal.SIGTERM)
        if self.kill_at is None:
            self.kill_at = now + grace

    def read_beats(self, now: float) -> None:
        """Take every line the child wrote; the last one says how it is."""
        if self.beat_fd is None:
            return
        try:
            data = os.read(self.beat_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the child exited (its exit is reaped separately)
            self.close_beat()
            return
        for line in reversed(data.splitlines()):
            beat = lifeline.parse_beat(line)
            if beat is not None:
                self.lag, ready = beat
                self.ready = self.ready or ready
                self.last_beat = now
                return

    def close_beat(self) -> None:
        if self.beat_fd is not None:
            os.close(self.beat_fd)
            self.beat_fd = None

    def stuck_for(self, now: float) -> float:
        """How long the child has shown no sign of a working loop (0: it is fine)."""
        silence = now - self.last_beat
        # A loop's lag counts once the child is ready: opening storage (log replay) may
        # hold the loop for long, and its lifeline thread still beats meanwhile.
        lag = self.lag + silence if self.ready else 0.0
        return max(silence - 2 * lifeline.INTERVAL, lag)


#: seconds after the daemon is ready before its first warm spare starts (later ones start
#: as soon as the slot they replaced serves again)
SPARE_AFTER_READY = 5.0
#: seconds from start during which the supervisor turns at 50 Hz until ready; after that,
#: 5 Hz (a slot that never comes up, or a long recovery, must not cost a probe every 20 ms)
FAST_TURNS_SECONDS = 30.0
#: the longest turn of a supervisor with nothing to do but watch: a child's exit (SIGCHLD), a
#: signal and each child's lifeline beat wake it sooner. Turning every 0.2 s instead was half
#: the idle supervisor's wake-ups and CPU (measured: ``scripts/bench.py idle``)
QUIET_TURN = 1.0


def turn_timeout(now: float, ready: bool, fast_until: float, due: list[float],
                 quiet: bool = False) -> float:
    """How long the supervisor's turn may sleep: 0.02 s until ready, when each turn asks the
    broker whether every slot is up (a start waited ~0.4 s past the slots' registration
    for two turns, measured), but only for ``FAST_TURNS_SECONDS``; QUIET_TURN when ``quiet``
    (ready, every child running, nothing rolling: signals and lifelines wake it anyway);
    else 0.2 s; never past a due restart (``due``)."""
    fast = not ready and now < fast_until
    longest = 0.02 if fast else QUIET_TURN if quiet and ready else 0.2
    return max(0.0, min([longest, *[d - now for d in due]]))


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
        self._fast_until = 0.0  # (set at start: FAST_TURNS_SECONDS on)
        self.exit_code = 0
        self.control_endpoint = config.control()
        self._control: zmq.Socket | None = None
        self.identity: Identity | None = None
        self._status_error_logged = 0.0
        self.lock_fd: int | None = None
        self.settings: int | None = None  # the children's settings (a memfd they inherit)
        self.http_socket: socket.socket | None = None
        #: a reload (SIGHUP, `durable reload`): the children still to roll, the one rolling
        self._roll: deque[Watcher] = deque()
        self._rolling: Watcher | None = None
        self._old_settings: int | None = None
        self.reload_state: dict[str, Any] = {"generation": 0, "state": "none"}
        self.spare: Spare | None = None
        self._spare_due = 0.0  # no new spare before (after one died unused)
        self.host: Any = None  # cluster mode: host.ClusterHost (which slots to run)
        self.watchdog = systemd.watchdog_interval()  # (seconds between WATCHDOG=1, or None)

    # -- set-up ---------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that would make children fail at once; raise ConfigError first."""
        for name, spec in self.config.namespaces.items():
            try:
                load_class(spec)
            except ValueError as e:
                raise ConfigError(f"{self.config.source}: namespaces.{name}.class: {e}. Check "
                                  "the module is importable (installed, or on PYTHONPATH).") from None

    def acquire(self) -> None:
        """Take the data dir's lock, then the HTTP port: before anything else changes.

        Raises ``DataDirLocked`` (another daemon) or ``PortInUse``; both leave
        every file and socket as they were.
        """
        if self.lock_fd is None:
            self.lock_fd = lock_data_dir(self.config.data_path)
        if self.config.http is not None and self.http_socket is None:
            self.http_socket = bind_http(self.config.http.listen)

    def release(self) -> None:
        if self.http_socket is not None:
            self.http_socket.close()
            self.http_socket = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # children still holding it keep the lock
            self.lock_fd = None
        if self.settings is not None:
            os.close(self.settings)
            self.settings = None

    def _prepare_dirs(self) -> None:
        self.identity = open_data_dir(self.config.data_path)  # DataDirError: refuse to start
        run = self.config.run_dir
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run, 0o700)
        group = self.config.broker.socket_group
        if group:  # the group may reach the client socket (the broker sets its mode), no more
            import grp

            gid = grp.getgrnam(group).gr_gid
            for path, mode in ((self.config.data_path, 0o710), (run, 0o750)):
                os.chown(path, -1, gid)
                os.chmod(path, mode)
        for endpoint in (self.config.frontend(), self.config.backend()):
            if endpoint.startswith("ipc://"):  # e.g. /run/durable when not under systemd
                Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _build_watchers(self) -> None:
        c = self.config
        env = dict(os.environ)
        # glibc: allocations from 1 MiB always come from mmap and go back to the kernel when
        # freed (its default threshold grows to 32 MiB after a large free, so bodies of a few
        # MiB stayed in the heap: 836 MiB RSS with nothing active), and at most 2 arenas.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        env.setdefault("MALLOC_ARENA_MAX", "2")
        # ...and a megabyte kept free at each heap's top. asyncio reads a connection with
        # recv(256 KiB): CPython allocates all of it and shrinks it to what came. Over the
        # 128-KiB trim threshold, every HTTP read grew the heap and trimmed it again (two brk
        # and a fresh zeroed page, with the GIL held): ~11% of a no-op request's CPU.
        env.setdefault("MALLOC_TOP_PAD_", str(1 << 20))
        env["DURABLE_LOG_FORMAT"] = c.log_format  # (each child's logging, set up before it reads
        #                                            its settings, takes the same shape)
        self.settings = settings_fd(c, data_dir_id=self.identity.id if self.identity else None)
        common = ["--settings-fd", str(self.settings), "--log-level", logging.getLevelName(
            logging.getLogger().getEffectiveLevel())]
        env["DURABLE_ORPHAN_GRACE"] = str(min(c.grace_period, 5.0))  # its replies have nowhere to go
        self.watchers.append(Watcher("broker", "broker", None,
                                     [self.python, "-m", "durable.broker", *common], env))
        # A call may hold the loop up to its CPU limit, and is interrupted then: only a hold
        # well past that is a hang.
        longest = max([c.cpu_limit_ms, *c.namespace_cpu_limits.values()]) / 1000
        front = self._slots_front()  # [http] front = "slots": object processes serve HTTP
        for slot in range(c.slots):
            argv = [self.python, "-m", "durable.objectproc", *common, *front, "--slot", str(slot)]
            self.watchers.append(Watcher(f"objectproc-{slot}", "objectproc", slot, argv, env,
                                         hang_timeout=max(c.hang_timeout, longest + 5),
                                         pass_fds=(int(front[1]),) if front else ()))
        if c.http is not None and not front:
            fd = self.http_socket.fileno()
            argv = [self.python, "-m", "durable.broker.gateway", *common, "--fd", str(fd)]
            for i in range(c.http.processes):
                self.watchers.append(Watcher(f"gateway-{i}", "gateway", None, argv, env,
                                             pass_fds=(fd,)))
        for w in self.watchers:  # every child holds the lock: an orphan is seen by the next start
            w.pass_fds = (*w.pass_fds, self.lock_fd, self.settings)

    def _slots_front(self) -> list[str]:
        """``--http-fd FD`` for object processes that serve HTTP themselves, else nothing."""
        h = self.config.http
        if h is None or h.front != "slots":
            return []
        return ["--http-fd", str(self.http_socket.fileno())]

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.check()
        try:
            self.acquire()
            try:
                self._prepare_dirs()
            except BaseException:
                self.release()
                raise
        except (DataDirError, PortInUse) as e:
            log.error("%s", e)
            systemd.notify(f"STATUS=halted: {e}")
            return EXIT_CONFIG if isinstance(e, PortInUse) else EXIT_STORAGE
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> int:
        def progress(line: str) -> None:  # each step of a long move extends systemd's patience
            log.info("%s", line)
            systemd.notify(f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}")

        if self.config.cluster.enabled:
            from .host import ClusterError, ClusterHost
            systemd.notify(f"STATUS=joining the cluster ({self.config.cluster.nats})")
            try:
                self.host = ClusterHost(self.config)
                self.host.join()
            except ClusterError as e:
                log.error("%s", e)
                systemd.notify(f"STATUS=halted: {e}")
                return EXIT_CONFIG
        try:
            # (cluster mode: every host has the same slot count, and nothing moves here)
            moved = 0 if self.host else migrate(self.config.data_path, self.config.slots,
                                                log=progress)
        except Exception as e:
            log.exception("moving objects to the new slot count failed: %s", e)
            systemd.notify(f"STATUS=halted: moving objects to {self.config.slots} slots failed: {e}")
            return EXIT_STORAGE
        if moved:
            log.info("moved %d objects to their new slots", moved)
        server = None
        if self.config.metrics.listen:
            from . import metrics
            try:
                server = metrics.serve(self.config.metrics.listen, self._process_rows,
                                       self.config.admin())
            except OSError as e:
                log.error("metrics.listen = %s: %s; use a free port", self.config.metrics.listen,
                          e.strerror or e)
                systemd.notify(f"STATUS=halted: metrics port {self.config.metrics.listen}: {e}")
                return EXIT_CONFIG
            log.info("metrics on http://%s/metrics", self.config.metrics.listen)
        try:
            self._build_watchers()
            with self._running() as turn:
                while turn.once():
                    pass
            return self.exit_code
        finally:
            if self.host is not None:
                self.host.close()
            if server is not None:
                server.shutdown()
                server.server_close()

    def _process_rows(self) -> list[dict[str, Any]]:
        """What a metrics scrape reports of the children (read from the scrape's thread)."""
        return [{"role": w.role, "slot": w.slot, "state": w.state.value, "rss": w.rss,
                 "restart_causes": dict(w.restart_causes)} for w in list(self.watchers)]

    @contextlib.contextmanager
    def _running(self) -> Iterator[_Turn]:
        """Signals, the children, the broker probe and control socket; all undone after,
        and every child killed, whatever happened (nothing runs unowned)."""
        latency = cpu_latency.hold() if self.config.low_latency_idle else None
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self._signals.append(s))
        self._started = time.time()
        systemd.notify("STATUS=starting the broker and object processes")
        now = self.clock()
        self._fast_until = now + FAST_TURNS_SECONDS
        for w in self.watchers:
            if self.host is None or w.role != "objectproc":  # (cluster: the slots it holds)
                w.start(now)
        probe = _Probe(self.config.frontend())
        self._control = zmq.Context.instance().socket(zmq.PUSH)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.SNDHWM, 100)
        self._control.connect(self.control_endpoint)
        try:
            yield _Turn(self, rfd, probe)
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
            spare, self.spare = self.spare, None
            if spare is not None:
                spare.drop()
                with contextlib.suppress(Exception):
                    spare.proc.kill()
                    spare.proc.wait(timeout=5)
            for w in self.watchers:
                w.signal(signal.SIGKILL)
                if w.proc is not None:
                    with contextlib.suppress(Exception):
                        w.proc.wait(timeout=5)
                w.close_beat()

    def _wait(self, wakeup_fd: int) -> None:
        """Sleep until a signal, a child's lifeline, or the next due restart (turn_timeout)."""
        now = self.clock()
        due = [w.start_due for w in self.watchers if w.state is WatcherState.BACKOFF]
        quiet = (self.host is None and not self._stopping and self._rolling is None
                 and not self._roll and (self.watchdog is None or self.watchdog >= 2 * QUIET_TURN)
                 and all(w.state is WatcherState.RUNNING and w.kill_at is None
                         for w in self.watchers))
        timeout = turn_timeout(now, self._ready, self._fast_until, due, quiet)
        beats = {w.beat_fd: w for w in self.watchers if w.beat_fd is not None}
        spare = self.spare if self.spare is not None and not self.spare.ready else None
        readable: list[int] = []
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(
                [wakeup_fd, *beats, *([spare.beat_fd] if spare else [])], [], [], timeout)
        if spare is not None and spare.beat_fd in readable:
            spare.read_beats()
        with contextlib.suppress(BlockingIOError):
            while os.read(wakeup_fd, 4096):
                pass
        now = self.clock()
        for fd in readable:
            if fd in beats:
                beats[fd].read_beats(now)

    def _announce_ready(self, probe: _Probe) -> None:
        """READY=1 once every gateway serves and every slot that can be up is registered
        (with front = "slots", once every object process that can be up serves HTTP too)."""
        corrupt = {w.slot for w in self.watchers if w.state is WatcherState.CORRUPT}
        fronts = ("gateway", "objectproc") if self._slots_front() else ("gateway",)
        gateways_up = all(w.ready for w in self.watchers
                          if w.role in fronts and w.slot not in corrupt)
        if gateways_up and probe.all_slots_up(self.config.slots, corrupt):
            self._ready = True
            # The first spare waits a little: it would compete with clients coming back.
            self._spare_due = max(self._spare_due, self.clock() + SPARE_AFTER_READY)
            systemd.notify("READY=1")
            systemd.notify(f"STATUS=serving {len(self.config.namespaces)} namespaces on "
                           f"{self.config.slots} slots at {self.config.frontend()}")
            log.info("ready: clients connect to %s%s", self.config.frontend(),
                     f", HTTP on http://{self.config.http.listen}" if self.config.http else "")

    def _check_liveness(self) -> None:
        """SIGKILL a child whose loop stopped turning (a hang), or one that outstayed SIGTERM."""
        if self._stopping:
            return
        now = self.clock()
        for w in self.watchers:
            if w.state is not WatcherState.RUNNING or w.proc is None or w.proc.returncode is not None:
                continue
            if w.kill_at is not None:
                if now >= w.kill_at:
                    log.warning("%s (pid %d) did not stop within grace_period = %g s after "
                                "SIGTERM: SIGKILL", w.name, w.pid, self.config.grace_period)
                    w.signal(signal.SIGKILL)
                    w.kill_at = float("inf")  # once
                continue
            stuck = w.stuck_for(now)
            bound = w.hang_timeout or self.config.hang_timeout
            if stuck >= bound:
                w.hung = True
                what = (f"its loop has not turned for {stuck:.0f} s" if now - w.last_beat < 3
                        else f"it sent no heartbeat for {now - w.last_beat:.0f} s (stopped?)")
                log.error("%s (pid %d) is hung: %s, over its bound of %g s (hang_timeout; for "
                          "object processes at least the CPU limit + 5 s). SIGKILL and restart; "
                          "its calls in flight fail (their stubs break)", w.name, w.pid, what,
                          bound)
                w.signal(signal.SIGKILL)
                w.kill_at = float("inf")

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
                w.terminate(self.clock(), self.config.grace_period)
                w.memory_restart = True
                w.ps = None  # one SIGTERM; the exit restarts it
        self._write_status({
            "supervisor": {"pid": os.getpid(), "started": self._started, "ready": self._ready,
                           "config": self.config.source, "frontend": self.config.frontend(),
                           "reload": self.reload_state},
            "processes": [{
                "role": w.role, "slot": w.slot, "pid": w.pid, "state": self._state_shown(w),
                "lag": round(w.lag, 3),
                "uptime": round(self.clock() - w.started_at, 1) if w.state is WatcherState.RUNNING else None,
                "restarts": w.restarts, "restart_causes": dict(w.restart_causes), "rss": w.rss,
                "cpu": w.cpu, "last_exit": w.last_exit,
            } for w in self.watchers],
            "spare": self._spare_row(),
            **({"cluster": self.host.status()} if self.host is not None else {}),
        })

    def _spare_row(self) -> dict[str, Any] | None:
        spare = self.spare
        if spare is None:
            return None
        with contextlib.suppress(psutil.Error):
            spare.rss = psutil.Process(spare.proc.pid).memory_info().rss
        return {"pid": spare.proc.pid, "ready": spare.ready, "rss": spare.rss,
                "uptime": round(self.clock() - spare.started_at, 1)}

    def _state_shown(self, w: Watcher) -> str:
        """``hung`` once a running child looks stuck (killed at hang_timeout)."""
        if w.state is WatcherState.RUNNING and (w.hung or w.stuck_for(self.clock()) >= min(
                5.0, self.config.hang_timeout)):
            return "hung"
        return w.state.value

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
            if sig == signal.SIGHUP:  # `durable reload`, `systemctl reload durable`
                self._reload()
        return False

    # -- reload ---------------------------------------------------------------------------
    def _reload(self) -> None:
        """Re-read the config; if it is valid and its classes import, roll the children onto
        it one at a time (each drains, then starts again). A bad config keeps the old one."""
        gen = self.reload_state["generation"] + 1
        if self._rolling is not None or self._roll:
            self.reload_state = {"generation": gen, "state": "refused",
                                 "error": "a reload is already rolling; wait for it to finish"}
            log.warning("reload: %s", self.reload_state["error"])
            return
        source = self.config.source
        try:
            new = load(None if source == "built-in defaults" else source)
            self._same_shape(new)
            self._check_imports(new)
        except ConfigError as e:
            self.reload_state = {"generation": gen, "state": "refused", "error": str(e)}
            log.error("reload refused, the running configuration stays: %s", e)
            systemd.notify(f"STATUS=reload refused: {e}")
            return
        namespaces_changed = set(new.namespaces) != set(self.config.namespaces)
        self.config = new
        self._drop_spare()  # it holds the old settings and code
        self._old_settings = self.settings
        self.settings = settings_fd(new, data_dir_id=self.identity.id if self.identity else None)
        for w in self.watchers:
            w.argv = [str(self.settings) if a == str(self._old_settings) and
                      w.argv[i - 1] == "--settings-fd" else a for i, a in enumerate(w.argv)]
            w.pass_fds = tuple(self.settings if fd == self._old_settings else fd
                               for fd in w.pass_fds)
            w.env = {**w.env, "DURABLE_LOG_FORMAT": new.log_format}
        order = [w for w in self.watchers if w.role == "objectproc"] + \
                [w for w in self.watchers if w.role == "gateway"] + \
                ([w for w in self.watchers if w.role == "broker"] if namespaces_changed else [])
        self._roll = deque(w for w in order if w.state is WatcherState.RUNNING)
        self.reload_state = {"generation": gen, "state": "rolling", "total": len(self._roll),
                             "done": 0}
        log.info("reload: rolling %d processes onto the new configuration, one at a time",
                 len(self._roll))
        systemd.notify("RELOADING=1")

    def _same_shape(self, new: Config) -> None:
        """What a reload cannot change (a restart can): the slots, the files, the sockets."""
        old = self.config
        fixed = {"slots": (old.slots, new.slots),
                 "data_dir": (old.data_path, new.data_path),
                 "broker.endpoint": (old.frontend(), new.frontend()),
                 "broker.workers_endpoint": (old.backend(), new.backend()),
                 "broker.public_endpoint": (old.broker.public_endpoint, new.broker.public_endpoint),
                 "broker.socket_group": (old.broker.socket_group, new.broker.socket_group),
                 "http": (old.http and (old.http.listen, old.http.processes),
                          new.http and (new.http.listen, new.http.processes)),
                 "metrics.listen": (old.metrics.listen, new.metrics.listen)}
        changed = [k for k, (a, b) in fixed.items() if a != b]
        if changed:
            raise ConfigError(f"{new.source}: {', '.join(changed)} changed; a reload cannot "
                              "change these. Restart the daemon (`systemctl restart durable`)")

    def _check_imports(self, new: Config) -> None:
        """Import every class in a fresh interpreter (this one has the old code loaded)."""
        code = ("import sys\nfrom durable.objects import load_class, load_function\n"
                "for spec in sys.argv[2:]:\n    load_class(spec)\n"
                "if sys.argv[1]:\n    load_function(sys.argv[1])\n")
        worker = new.http.worker if new.http is not None else ""
        out = subprocess.run([self.python, "-c", code, worker, *new.namespaces.values()],
                             capture_output=True, text=True, timeout=120,
                             env=self.watchers[0].env if self.watchers else None)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"{new.source}: the new code does not import: {last}")

    def _roll_next(self) -> None:
        """One step of a reload: stop the next child; once its successor is ready, go on."""
        now = self.clock()
        w = self._rolling
        if w is not None:
            if w.state is WatcherState.RUNNING and not w.rolling and w.ready:
                self.reload_state["done"] += 1
                self._rolling = None
            elif w.state in (WatcherState.FAILED, WatcherState.CORRUPT):
                self._rolling = None  # (its own failure is logged and shown)
            else:
                return
        if not self._roll:
            if self.reload_state.get("state") == "rolling":
                self.reload_state["state"] = "done"
                if self._old_settings is not None:
                    os.close(self._old_settings)
                    self._old_settings = None
                log.info("reload: done")
                systemd.notify("READY=1")
            return
        w = self._roll.popleft()
        if w.state is not WatcherState.RUNNING:
            return
        w.rolling = True
        self._rolling = w
        log.info("reload: restarting %s (pid %s) on the new configuration", w.name, w.pid)
        w.terminate(now, self.config.grace_period)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.spare is not None and self.spare.proc.pid == pid:
                self.spare.proc.returncode = code
                self.spare.drop()
                self.spare = None
                if not self._stopping:  # (a spare killed at once: a config error shows at
                    self._spare_due = self.clock() + 5.0  # a slot's own start)
                    log.warning("the warm spare (pid %d) exited with status %d; another starts "
                                "in 5 s", pid, code)
                continue
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
        w.read_beats(now)
        w.close_beat()
        if w.hung:
            log.warning("%s (pid %d) was hung and is gone (status %d)", w.name, w.pid, code)
        if w.role == "objectproc":  # its stubs break now, not after missed heartbeats
            self._tell_broker(Control("slot_down", w.slot, w.pid))
        elif w.role == "gateway":  # its WebSockets are gone: objects hear 1006 now
            self._tell_broker(Control("client_exit", pid=w.pid))
        if self._stopping or w.state is WatcherState.STOPPING:
            if w.state is WatcherState.STOPPING:
                w.step("exit")
            return
        if w.rolling:  # a reload stopped it: its successor starts now, on the new settings
            w.rolling = False
            w.step("exit")
            w.start_due = now
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
        cause = ("hang" if w.hung else "memory_limit" if w.memory_restart
                 else "killed" if code < 0 else "exit")
        w.restart_causes[cause] = w.restart_causes.get(cause, 0) + 1
        w.memory_restart = False
        log.warning("%s %s", w.name, decision.reason)

    def _cluster_turn(self) -> None:
        """Cluster mode: run the object processes of the slots this host holds, and only
        those. A slot lost (its lease lapsed, or given back) is SIGKILLed at once: it may not
        serve anything more (it would also exit by itself at its lease's end)."""
        self.host.turned()
        if self._stopping:
            return
        wanted = self.host.wanted()
        now = self.clock()
        for w in self.watchers:
            if w.role != "objectproc":
                continue
            if w.slot in wanted:
                if w.state is WatcherState.STOPPED:
                    log.info("slot %d: this host holds it now; starting it", w.slot)
                    w.start(now)
            elif w.state is WatcherState.RUNNING:
                log.warning("slot %d: this host no longer holds it; stopping it now", w.slot)
                w.step("stop")
                w.signal(signal.SIGKILL)
            elif w.state is WatcherState.BACKOFF:
                w.step("stop")

    def _start_due(self) -> None:
        now = self.clock()
        for w in self.watchers:
            if w.state is WatcherState.BACKOFF and now >= w.start_due:
                w.start(now, self._take_spare(w))
            elif (w.state is WatcherState.CORRUPT and not self._stopping
                  and self._slot_file(w.slot) != w.corrupt_file):
                log.warning("%s: slot %d's DuckDB file was replaced (durable repair): starting it "
                            "again", w.name, w.slot)
                w.start(now, self._take_spare(w))

    # -- the warm spare -------------------------------------------------------------------
    def _take_spare(self, w: Watcher) -> Spare | None:
        """The spare, handed ``w``'s slot, if there is one for an object process."""
        spare, self.spare = self.spare, None
        if spare is None or w.role != "objectproc":
            self.spare = spare
            return None
        if spare.proc.returncode is None and spare.hand(w.slot):
            return spare
        spare.drop()  # it died: its exit is reaped as a stranger's; start cold
        return None

    def _keep_spare(self) -> None:
        """One spare while serving, started once every slot is up (never competing with the
        slots' own start) and on the current settings (a reload drops the old one)."""
        if (self.spare is not None or not self.config.warm_spare or self._stopping
                or not self._ready or self.clock() < self._spare_due):
            return
        model = next((w for w in self.watchers if w.role == "objectproc"), None)
        if model is None or any(w.role == "objectproc" and not w.ready for w in self.watchers):
            return
        front = self._slots_front()
        argv = [self.python, "-m", "durable.objectproc", "--settings-fd", str(self.settings),
                "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                *front, "--standby"]
        proc, r = _spawn(argv, model.env, (self.lock_fd, self.settings,
                                           *((int(front[1]),) if front else ())),
                         stdin=subprocess.PIPE)
        self.spare = Spare(proc, r, self.clock())
        log.info("started the warm spare object process (pid %d)", proc.pid)

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.drop()
            # (reaped by _reap, which finds no spare and no watcher for it: ignored)
            self.spare = None

    def _slot_file(self, slot: int | None) -> tuple[int, int] | None:
        try:
            st = os.stat(self.config.data_path / f"slot-{slot}.duckdb")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _stop(self, *, immediate: bool) -> None:
        self._stopping = True
        self._drop_spare()
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
                # (a snapshot: a signal handler may append while a generator walks the deque;
                # CI saw "deque mutated during iteration" when a SIGCHLD came in between)
                if self.clock() >= deadline or any(s in (signal.SIGTERM, signal.SIGINT)
                                                   for s in tuple(self._signals)):
                    for w in group:
                        if w.state is WatcherState.STOPPING:
                            log.warning("%s did not stop in time: SIGKILL", w.name)
                            w.signal(signal.SIGKILL)
                    self._signals.clear()
                    deadline = self.clock()
                time.sleep(0.01)
                self._reap()
            if group is objectprocs and self.host is not None:
                self.host.close(release=True)  # the others take its slots now
        log.info("stopped")


class _Turn:
    """One turn of the supervisor's loop: wait, reap, watch, restart, report."""

    def __init__(self, arbiter: Arbiter, wakeup_fd: int, probe: _Probe) -> None:
        self.a = arbiter
        self.wakeup_fd = wakeup_fd
        self.probe = probe
        self.watchdog = arbiter.watchdog
        self.next_watchdog = self.next_sample = arbiter.clock()

    def once(self) -> bool:
        """One turn; False when the supervisor is to stop."""
        a = self.a
        a._wait(self.wakeup_fd)
        systemd.flush()  # (a READY=1 that found systemd's socket full)
        a._reap()
        a._check_liveness()
        if a._handle_signals():
            return False
        if a.exit_code:
            a._stop(immediate=False)
            return False
        if a.host is not None:
            a._cluster_turn()
        a._start_due()
        a._keep_spare()
        if not a._ready:
            a._announce_ready(self.probe)
        elif a._rolling is not None or a._roll:
            a._roll_next()
        now = a.clock()
        if now >= self.next_sample:
            self.next_sample = now + 1.0
            a._sample()
            if not a._ready:  # a long recovery: ask systemd for more than TimeoutStartSec
                systemd.notify(f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}")
        if self.watchdog is not None and a._ready and a.clock() >= self.next_watchdog:
            systemd.notify("WATCHDOG=1")
            self.next_watchdog = a.clock() + self.watchdog
        return True


#: what each EXTEND_TIMEOUT_USEC asks for while the daemon is not ready yet (slot moves,
#: log replays): sent every second, so a start that makes progress is never killed at
#: TimeoutStartSec, and one that hangs is (the supervisor stops sending when it hangs)
EXTEND_USEC = 30_000_000


class PortInUse(Exception):
    """The HTTP port is taken: a configuration problem, restarting will not help."""


def bind_http(listen: str) -> socket.socket:
    """Bind and listen on ``host:port`` for the gateways (no SO_REUSEPORT: one owner)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise PortInUse(f"http.listen = {listen!r}: {host} does not resolve ({e}); use an "
                        "address of this machine, e.g. 127.0.0.1:8787") from None
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; Linux keeps
    try:                                                     # a listener exclusive
        s.bind(addr)
        s.listen(1024)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            pids = _listeners(int(port))
            by = f" (by pid {', '.join(map(str, pids))})" if pids else ""
            raise PortInUse(f"{listen} is in use{by}: another program, or another durable daemon, "
                            "listens there. Stop it, or set http.listen to a free port") from None
        raise PortInUse(f"cannot listen on {listen}: {e}. Set http.listen to an address of "
                        "this machine and a port this user may bind") from None
    s.set_inheritable(True)
    return s


def _listeners(port: int) -> list[int]:
    """Pids listening on a TCP port, where this user may see them."""
    with contextlib.suppress(psutil.Error, OSError):
        return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                       and c.pid})
    return []


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
