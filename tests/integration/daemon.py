"""Run `durable serve` as a real process, with a real sd_notify socket; always reaped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

REPO = Path(__file__).resolve().parents[2]


def read_status(root: Path) -> dict:
    """The supervisor's status file (rewritten each second); {} before the first. Cheaper to
    poll than `durable status`, a process of its own (~0.5 s of CPU on a slow machine)."""
    try:
        return orjson.loads((root / "durable-data" / "run" / "status.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


@dataclass
class Daemon:
    root: Path
    proc: subprocess.Popen
    notify: socket.socket
    log: Path
    messages: list[str] = field(default_factory=list)

    @property
    def frontend(self) -> str:
        return f"ipc://{self.root / 'durable-data' / 'run' / 'broker.sock'}"

    def status(self) -> dict:
        return read_status(self.root)

    def spare_ready(self) -> int | None:
        """The warm spare's pid once it has imported everything and waits for a slot."""
        spare = self.status().get("spare") or {}
        return spare.get("pid") if spare.get("ready") else None

    def read_notify(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_ready(self, timeout: float = 20.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if "READY=1" in self.read_notify():
                return time.monotonic() - start
            if self.proc.poll() is not None:
                raise AssertionError(f"durable serve exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.01)
        raise AssertionError(f"not ready within {timeout} s:\n{self.log_text()}")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def child(self, role: str, slot: int | None = None) -> psutil.Process:
        seen = []
        for c in self.children():
            try:
                cmd = " ".join(c.cmdline())
            except psutil.Error:  # exited (or a zombie not yet reaped)
                continue
            seen.append(cmd)
            if f"durable.{role}" in cmd and (slot is None or f"--slot {slot} " in cmd + " "):
                return c
        # (built from what was read above: asking a zombie again would raise while reporting)
        raise AssertionError(f"no {role} {slot} among {seen}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def serving(root: Path, config: str | None = None, env: dict[str, str] | None = None,
            args: list[str] | None = None, command: list[str] | None = None) -> Iterator[Daemon]:
    root.mkdir(parents=True, exist_ok=True)
    sock_path = root / "notify.sock"
    sock_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.setblocking(False)
    cmd = command or [sys.executable, "-m", "durable.supervisor.cli", "serve"]
    if config is not None:
        (root / "durable.toml").write_text(config)
        cmd += ["--config", str(root / "durable.toml")]
    cmd += args or []
    full_env = dict(os.environ, NOTIFY_SOCKET=str(sock_path),
                    PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    log = root / "serve.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=f, stderr=f)
    d = Daemon(root, proc, notify, log)
    try:
        yield d
    finally:
        kids = d.children()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for k in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.kill()
        psutil.wait_procs(kids, timeout=10)
        notify.close()
