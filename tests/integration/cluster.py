"""Start a broker and object processes as real processes; always kill and reap them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from durable.broker.ring import Ring
from durable.supervisor.config import from_dict, write_settings
from tests.integration.procs import async_wait_for

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = {
    "COUNTER": "tests.integration.objects:Counter",
    "NOOP": "tests.integration.objects:Noop",
    "RECORDER": "tests.integration.objects:Recorder",
    "FAILING": "tests.integration.objects:Failing",
    "CALLER": "tests.integration.objects:Caller",
    "SETUP": "tests.integration.objects:Setup",
    "ACCOUNT": "tests.integration.objects:Account",
    "ALARMED": "tests.integration.objects:Alarmed",
    "NOALARM": "tests.integration.objects:NoAlarmHandler",
    "NAMED": "tests.integration.objects:Named",
    "ROOM": "tests.integration.objects:Room",
    "STREAMER": "tests.integration.objects:Streamer",
    "WSCALLER": "tests.integration.objects:WsCaller",
    "RETURNS": "tests.integration.objects:FailsOnReturn",
    "PIPE": "tests.integration.objects:Pipeliner",
    "SLOW": "tests.integration.objects:Slow",
    "WSHOLDER": "tests.integration.objects:WsHolder",
    "BUSY": "tests.integration.objects:Busy",
    "CYCLIC": "tests.integration.objects:Cyclic",
    "CHURN": "tests.integration.objects:Churn",
}


@dataclass
class Cluster:
    root: Path
    slots: int
    heartbeat: float = 0.2
    idle_timeout: float = 60.0
    frontend: str = ""
    backend: str = ""
    broker: subprocess.Popen | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        run = self.root / "run"
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.frontend = f"ipc://{run}/broker.sock"
        self.backend = f"ipc://{run}/workers.sock"
        self.data = self.root / "data"
        # (as `durable serve` makes it: the object processes' peer sockets live there)
        (self.data / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        # The processes read one settings file, as under `durable serve`: the supervisor's own
        # config type, checked by its own code (no second list of flags or defaults here).
        config = from_dict({
            "data_dir": str(self.data), "slots": self.slots, "idle_timeout": self.idle_timeout,
            "broker": {"endpoint": self.frontend, "workers_endpoint": self.backend,
                       "heartbeat": self.heartbeat, "queue_deadline": 5},
            "namespaces": {ns: {"class": cls} for ns, cls in NAMESPACES.items()},
            "vars": {"greeting": "hello"}, "alarm_retry_base": 0.2,
        }, "tests/integration/cluster.py")
        self.settings = run / "settings.json"
        write_settings(config, self.settings)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as f:
            return subprocess.Popen([sys.executable, *args], stdout=f, stderr=f, env=self._env(),
                                    cwd=REPO)

    def start_broker(self) -> None:
        self.broker = self._spawn("broker", ["-m", "durable.broker", "--settings",
                                             str(self.settings)])

    def start_worker(self, slot: int) -> subprocess.Popen:
        proc = self._spawn(f"objectproc-{slot}", ["-m", "durable.objectproc", "--settings",
                                                  str(self.settings), "--slot", str(slot)])
        self.workers[slot] = proc
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        procs = [p for p in [self.broker, *self.workers.values()] if p is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(p)

    def log_tail(self, n: int = 30) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)


@contextlib.contextmanager
def running_cluster(root: Path, slots: int = 2, heartbeat: float = 0.2,
                    idle_timeout: float = 60.0) -> Iterator[Cluster]:
    c = Cluster(root, slots, heartbeat, idle_timeout)
    # The id secret is shared through the data dir: the broker creates it, object processes read it.
    from durable.ids import load_or_create_secret
    load_or_create_secret(c.data)
    c.start_broker()
    for s in range(slots):
        c.start_worker(s)
    try:
        yield c
    finally:
        c.stop_all()


async def all_slots_up(c, timeout: float = 15.0) -> None:
    """Wait until every slot's object process has registered with the broker (a question
    asked while the client starts over with a new broker is asked again)."""
    from durable.errors import StubBrokenError

    async def up():
        return all(s["up"] for s in (await c.statistics())["slots"])

    await async_wait_for(lambda: up(), timeout, "every slot to register",
                         ignore=(StubBrokenError,))


async def slot_seen_down(c, slot: int, timeout: float = 15.0) -> None:
    """Wait until the broker has ended a killed slot's incarnation. Without a supervisor to
    tell it, it notices by a failed send or missed heartbeats; calls on the peer path no longer
    cross it, so a test that kills a process and restarts it waits for this in between."""
    async def down():
        return not (await c.statistics())["slots"][slot]["up"]

    await async_wait_for(down, timeout, f"the broker to see slot {slot} down")


def name_on(client, namespace: str, slot: int, prefix: str) -> str:
    """A name whose object the ring places on ``slot`` (of 2): a test puts a caller and its
    callee on different slots."""
    ns = client.namespace(namespace)
    for i in range(1000):
        if Ring(2).slot_for(str(ns.id_from_name(f"{prefix}{i}"))) == slot:
            return f"{prefix}{i}"
    raise AssertionError("no name found")


async def broker_calls(client) -> int:
    """Calls the broker has forwarded: a test sees whether a call skipped it."""
    return (await client.statistics())["broker"]["counters"].get("calls", 0)
