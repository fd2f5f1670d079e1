"""HTTP in the object processes (``[http] front = "slots"``): each connection is served by
the process that owns the object its first request names.

Every object process accepts from the supervisor's one listening socket (gunicorn's
model; the supervisor owns the port). Before a byte is read, the first request's line is
peeked (``MSG_PEEK``): a path ``/<NAMESPACE>/<name>/...`` or ``/<NAMESPACE>/id/<id>/...``
names an object, and so a slot (the broker's ring). If another process owns that slot, the
connection itself is handed to it (``SCM_RIGHTS`` over a unix socket in the run directory),
unread, and its requests reach their object with no hop at all. Later requests on a
connection that name other slots go through the broker as any call does, so the hand-off
is only where a connection is served, never a question of correctness: anything it cannot
place (a Worker entry point, a malformed or slow first line, an owner that is restarting)
is served where it was accepted.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from durable.errors import InvalidIdError
from durable.ids import IdFactory

__all__ = ["SlotFront", "handoff_path", "slot_of_request"]

log = logging.getLogger("durable.objectproc.http")
#: the most of a request's first bytes looked at to place it
PEEK = 4096
#: seconds to wait for a connection's first request line before serving it here
FIRST_LINE_WAIT = 1.0


def handoff_path(run_dir: str, slot: int) -> str:
    return str(Path(run_dir) / f"http-slot-{slot}.sock")


def slot_of_request(head: bytes, ids: dict[str, IdFactory],
                    slot_for: Callable[[str], int]) -> int | None:
    """The slot of the object a request's first line names, routed by path as the gateway
    routes it; None when the line is incomplete or names no object (pure: unit-tested)."""
    end = head.find(b"\r\n")
    if end < 0:
        return None
    parts = head[:end].split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    path = unquote(target.split("?", 1)[0])
    p = path.split("/", 3)
    if len(p) < 3 or not p[1]:
        return None
    factory = ids.get(unquote(p[1]))
    if factory is None:
        return None
    try:
        if p[2] == "id" and len(p) > 3:
            oid = factory.from_string(p[3].split("/", 1)[0])
        else:
            oid = factory.from_name(unquote(p[2]))
    except (InvalidIdError, TypeError, ValueError):
        return None
    return slot_for(str(oid))


class SlotFront:
    """The accept loop of one object process: place each new connection, serve it here
    (``adopt``) or hand it to its owner's process."""

    def __init__(self, listener: socket.socket, slot: int, slots: int, run_dir: str,
                 place: Callable[[bytes], int | None], adopt: Callable[[socket.socket], Any]
                 ) -> None:
        self.listener = listener
        self.slot = slot
        self.slots = slots
        self.run_dir = run_dir
        self.place = place
        self.adopt = adopt
        self.counters = {"accepted": 0, "handed_off": 0, "taken_over": 0, "served_here": 0}
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        listener.setblocking(False)
        path = handoff_path(run_dir, slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._inbox: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._inbox.bind(path)
            os.chmod(path, 0o600)
        except OSError as e:  # (a path over the 108 bytes of AF_UNIX, say): serve, unhanded
            log.warning("slot %d: no hand-off socket at %s (%s): connections other processes "
                        "place here are served where they arrive, through the broker",
                        slot, path, e)
            self._inbox.close()
            self._inbox = None
        else:
            self._inbox.setblocking(False)
            self._loop.add_reader(self._inbox.fileno(), self._taken)
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)
        self._loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and taking connections over; those waiting are served here."""
        self._loop.remove_reader(self.listener.fileno())
        for fd, (conn, timer) in list(self._waiting.items()):
            timer.cancel()
            self._loop.remove_reader(fd)
            self._serve_here(conn)
        self._waiting.clear()
        if self._inbox is not None:
            self._loop.remove_reader(self._inbox.fileno())
            self._inbox.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handoff_path(self.run_dir, self.slot))
        self._outbox.close()

    # -- accepting ------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):  # (another process may take the rest)
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds: the connection waits in the listen queue
                log.warning("accepting an HTTP connection failed: %s", e)
                return
            self.counters["accepted"] += 1
            conn.setblocking(False)
            fd = conn.fileno()
            timer = self._loop.call_later(FIRST_LINE_WAIT, self._first_line_late, fd)
            self._waiting[fd] = (conn, timer)
            self._loop.add_reader(fd, self._first_bytes, fd)

    def _first_line_late(self, fd: int) -> None:
        entry = self._waiting.pop(fd, None)
        if entry is not None:
            self._loop.remove_reader(fd)
            self._serve_here(entry[0])

    def _first_bytes(self, fd: int) -> None:
        conn, timer = self._waiting[fd]
        try:
            head = conn.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        if head and b"\r\n" not in head and len(head) < PEEK:
            return  # the first line is still coming
        del self._waiting[fd]
        timer.cancel()
        self._loop.remove_reader(fd)
        owner = self.place(head) if head else None
        log.debug("a connection's first request %r is for slot %s", head[:60], owner)
        if owner is not None and owner != self.slot and self._hand_off(conn, owner):
            return
        self._serve_here(conn)

    def _hand_off(self, conn: socket.socket, owner: int) -> bool:
        try:
            # (socket.send_fds drops its address argument on Python 3.11: sendmsg here)
            self._outbox.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [conn.fileno()]))], 0,
                                 handoff_path(self.run_dir, owner))
        except OSError as e:  # the owner is restarting (or its queue is full): serve it here
            log.debug("handing a connection to slot %d failed (%s): served here", owner, e)
            return False
        self.counters["handed_off"] += 1
        conn.close()  # (the owner holds its own descriptor of the connection now)
        return True

    def _taken(self) -> None:
        for _ in range(64):
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(self._inbox, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("taking over an HTTP connection failed: %s", e)
                return
            for fd in fds:
                self.counters["taken_over"] += 1
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                self._serve_here(conn, counted=False)

    def _serve_here(self, conn: socket.socket, *, counted: bool = True) -> None:
        if counted:
            self.counters["served_here"] += 1
        try:
            self.adopt(conn)
        except Exception as e:  # (a connection that died meanwhile)
            log.debug("an HTTP connection could not be served: %s", e)
            conn.close()
