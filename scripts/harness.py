"""Run `durable serve` for a script: temp data dir, READY=1 via sd_notify, always torn down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


#: the loop `machine_speed` times, as a module's top level runs it (its names are globals)
_SPEED_LOOP = compile("s = 0\nfor i in range(2_000_000):\n    s += i\n", "<speed>", "exec")


def machine_speed() -> float:
    """Seconds this Python takes for 10 million additions in a module-level loop (the
    fastest of three runs of two million, times five): the scale of the figures a script
    reports. This VM's speed varies by up to 2x from hour to hour (a quick hour ~0.45 s, a
    slow one 0.9-2 s), so a figure is only compared with another taken at a similar speed,
    or as a ratio within one run."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        exec(_SPEED_LOOP, {})
        best = min(best, time.perf_counter() - t)
    return round(best * 5, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    root: Path
    proc: subprocess.Popen
    port: int  # the HTTP port the config may use as {port}

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def frontend(self) -> str:
        return f"ipc://{self.data / 'run' / 'broker.sock'}"

    @property
    def config(self) -> Path:
        return self.root / "durable.toml"

    def status(self, timeout: float = 60.0) -> dict:
        """``durable status --json``, as an operator reads it (a separate process, the
        daemon's control socket); raises ``CalledProcessError`` if it fails."""
        out = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "status", "--json",
                              "--config", str(self.config)],
                             capture_output=True, check=True, timeout=timeout)
        return json.loads(out.stdout)


def active_objects(status: dict) -> int:
    """Live objects over every object process of a ``durable status --json``."""
    return sum(p.get("active_objects") or 0 for p in status["processes"])


async def gc_pauses(frontend: str) -> dict[str, list[float]]:
    """The object processes' garbage-collector pauses so far (their heartbeats' figures,
    ``durable_gc_pause_seconds``): generation -> [collections, seconds], both slots summed."""
    import durable  # (the scripts put the checkout first on the path)
    async with durable.connect(frontend, timeout=10) as c:
        stats = await c.statistics()
    out: dict[str, list[float]] = {}
    for slot in stats.get("slots", []):
        pauses = (slot.get("reported") or {}).get("gc_pauses") or {}
        for generation, (_counts, seconds, n) in pauses.items():
            acc = out.setdefault(generation, [0, 0.0])
            acc[0] += n
            acc[1] += seconds
    return out


@contextlib.contextmanager
def serving(config: str, *, ready_timeout: float = 60.0, log_level: str = "WARNING",
            prepare: Callable[[Path], None] | None = None,
            extra_env: dict[str, str] | None = None,
            path_first: Path | None = None) -> Iterator[Daemon]:
    """``config`` may use {data} (the data dir) and {port} (a free port for [http]);
    ``prepare(root)`` runs before the daemon starts (its config is ``root/durable.toml``).
    ``extra_env``: more environment for the daemon; ``path_first``: a folder put before the
    checkout on its PYTHONPATH (``bench.py calls``: its ``sitecustomize``)."""
    with tempfile.TemporaryDirectory(prefix="durable-script-") as tmp:
        root = Path(tmp)
        port = free_port()
        (root / "durable.toml").write_text(config.format(data=root / "data", port=port))
        if prepare is not None:
            prepare(root)
        notify_path = root / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        first = [str(path_first)] if path_first is not None else []
        env = dict(os.environ, **(extra_env or {}), NOTIFY_SOCKET=str(notify_path),
                   PYTHONPATH=os.pathsep.join([*first, str(REPO), str(REPO / "scripts")]))
        log = open(root / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "durable.supervisor.cli", "serve", "--config",
                                 str(root / "durable.toml"), "--log-level", log_level],
                                env=env, cwd=root, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                try:
                    if notify.recv(4096) == b"READY=1":
                        break
                except TimeoutError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("durable serve did not become ready:\n" +
                                       (root / "serve.log").read_text(errors="replace")[-2000:])
            yield Daemon(root, proc, port)
        finally:
            kids = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _, alive = psutil.wait_procs(kids, timeout=10)
            for k in alive:
                with contextlib.suppress(psutil.Error):
                    k.kill()
            notify.close()
            log.close()
