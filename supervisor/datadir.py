"""The data dir's identity: a daemon never starts silently on the wrong (or an emptied) store.

Rules this file keeps:

* A data dir carries ``identity`` (a random id and its creation time, mode
  0600), written once, with the id secret, when the dir is first created.
  Every slot's DuckDB file records the id (``SlotStore``), so files of two data
  dirs cannot be mixed without the slot refusing to start.
* **First run**: an absent or empty dir is created, and the log says so with
  its absolute path ("creating a new data dir at ...") -- a daemon started from
  another working directory shows it at once.
* **Refused**: a dir that holds durable's files but no identity and no secret
  (a partial copy, a wrong path). A dir with the secret but no identity was
  made by durable 0.1, which had none: it is adopted (the log says so).
* **One daemon per dir**: the supervisor takes ``DATA_DIR/lock`` (``flock``,
  exclusive) before it touches any socket, file or child, and every child
  inherits it; a second ``durable serve`` is refused, naming the holder's pid,
  and changes nothing.
* **While serving** the supervisor checks every second that the identity file
  is still the one it started with; a data dir removed or replaced under a
  running daemon stops it (status 74, which systemd does not restart), rather
  than writes going on into deleted files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil

from durable.fsutil import write_durably
from durable.ids import load_or_create_secret

__all__ = ["DataDirError", "DataDirLocked", "Identity", "open_data_dir", "lock_data_dir",
           "IDENTITY_FILE", "LOCK_FILE"]

IDENTITY_FILE = "identity"
LOCK_FILE = "lock"
# Files the supervisor itself may leave in a fresh dir before the identity exists.
_HARMLESS = {"run", "lock", "identity.tmp", "secret.tmp", "quarantine"}

log = logging.getLogger("durable.supervisor")


class DataDirError(Exception):
    """The data dir is not one this daemon may use; the message says why and what to do."""


class DataDirLocked(DataDirError):
    """Another daemon (or what is left of one) holds the data dir's lock."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


def lock_data_dir(path: Path) -> int:
    """Take the data dir's lock; return its fd (inheritable, to pass to every child).

    The lock is an ``flock`` on ``DATA_DIR/lock``: the kernel drops it when the
    last process holding the fd exits, however it exits, so it is never stale.
    """
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pids = _holders(path / LOCK_FILE, os.read(fd, 64))
        finally:
            os.close(fd)
        who = (f"pid {', '.join(map(str, pids))}" if pids
               else "a process this user cannot see")
        raise DataDirLocked(
            f"the data dir {path} is in use by another durable daemon ({who}); nothing was "
            "changed. Stop that daemon first (`systemctl stop durable`, or SIGTERM to the pid), "
            "or give this one another data_dir", pids) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.set_inheritable(fd, True)
    return fd


def _holders(lock: Path, content: bytes) -> list[int]:
    """Who holds the lock: the supervisor whose pid the file names, else whoever has it open."""
    with contextlib.suppress(ValueError, psutil.Error):
        pid = int(content.split()[0])
        if psutil.pid_exists(pid) and any(str(lock) == f.path
                                          for f in psutil.Process(pid).open_files()):
            return [pid]
    found = []
    for proc in psutil.process_iter(["pid"]):  # an orphaned child: the supervisor is gone
        with contextlib.suppress(psutil.Error):
            if any(f.path == str(lock) for f in proc.open_files()):
                found.append(proc.pid)
    return found


@dataclass(frozen=True)
class Identity:
    id: str
    created: float
    path: Path
    dev: int
    ino: int

    def still_there(self) -> bool:
        """Whether the identity file is still the same file (not removed, not replaced)."""
        try:
            st = os.stat(self.path / IDENTITY_FILE)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


def _write_identity(path: Path) -> None:
    body = orjson.dumps({"id": secrets.token_hex(16), "created": time.time(),
                         "format": "durable data dir v1"})
    write_durably(path / IDENTITY_FILE, body)


def read_identity(path: Path) -> Identity:
    """The identity of an existing data dir (``FileNotFoundError`` if it has none)."""
    file = path / IDENTITY_FILE
    raw = file.read_bytes()
    try:
        data = orjson.loads(raw)
        ident, created = data["id"], float(data["created"])
        if type(ident) is not str or len(ident) != 32:
            raise ValueError("bad id")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataDirError(f"{file} is damaged ({e}); restore the data dir from a backup "
                           "(`durable restore`)") from None
    st = os.stat(file)
    return Identity(ident, created, path, st.st_dev, st.st_ino)


def open_data_dir(path: Path) -> Identity:
    """Create (first run), adopt (durable 0.1) or check the data dir; return its identity."""
    path = path.absolute()
    try:
        return read_identity(path)
    except FileNotFoundError:
        pass
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    ours = [n for n in present if n not in _HARMLESS]
    if "secret" in ours:
        log.warning("data dir %s has a secret but no identity (made by durable 0.1): adopting it",
                    path)
    elif ours:
        raise DataDirError(
            f"data dir {path} is not empty ({', '.join(ours[:6])}{', ...' if len(ours) > 6 else ''}) "
            "but has no identity and no secret: it is not a durable data dir, or its files were "
            "lost. Point data_dir at the right directory, restore it (`durable restore`), or "
            "move these files away to start an empty store there")
    else:
        log.warning("creating a new data dir at %s", path)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    load_or_create_secret(path)
    with contextlib.suppress(FileNotFoundError):
        (path / f"{IDENTITY_FILE}.tmp").unlink()
    _write_identity(path)
    return read_identity(path)
