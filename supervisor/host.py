"""Cluster mode: this host's part of the cluster, run by the supervisor (docs/cluster.md).

A thread with its own event loop keeps the host's slot leases on the cluster's bucket
(``cluster.SlotOwnership``) and publishes what the object processes need, as files in the
run dir (0700):

* ``leases``: one float64 per slot, the ``CLOCK_MONOTONIC`` time until which this host may
  serve it (0: it may not). An object process maps the file and exits once its slot's
  time has passed, whatever its supervisor is doing (a host stopped by SIGSTOP and then
  continued serves nothing after its lease).
* ``cluster-hosts.json``: ``{host: broker endpoint}`` of the live hosts; each object process
  registers with every host's broker, so a call reaches the object from any host.

The supervisor's loop asks :meth:`ClusterHost.wanted` which slots to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from .config import Config
from .leases import Leases

__all__ = ["ClusterHost", "ClusterError", "LeaseFile", "LEASES", "HOSTS"]

log = logging.getLogger("durable.cluster")

LEASES = "leases"
HOSTS = "cluster-hosts.json"
_F64 = struct.Struct("<d")
_SECRET_KEY = "secret"


class ClusterError(Exception):
    """The host cannot join the cluster (the text says why and what to do)."""


class LeaseFile:
    """The per-slot serving deadlines, shared by the supervisor (writes) and the slots."""

    def __init__(self, path: Path, slots: int, *, create: bool = False) -> None:
        self.slots = slots
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, slots * 8)
            self.map = mmap.mmap(fd, slots * 8)
        finally:
            os.close(fd)

    def set(self, slot: int, deadline: float) -> None:
        _F64.pack_into(self.map, slot * 8, deadline)

    def get(self, slot: int) -> float:
        return _F64.unpack_from(self.map, slot * 8)[0]

    def close(self) -> None:
        self.map.close()


def _twin_message(host_id: str, when: str) -> str:
    return (f"another process runs as cluster host {host_id!r}: it announced itself under "
            f"that name while this one {when}. Each host needs a host_id of its own (the same "
            "across its restarts); two with one name would both serve that name's slots. "
            "This host serves nothing: stop the other one, or give this one a host_id of its "
            "own, then start it again")


def _main_stack() -> str:
    """Where the main thread is now (what a hung loop waits on), innermost call last."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "  (no main thread)"
    return "".join(traceback.format_stack(frame)[-12:]).rstrip()


class ClusterHost:
    def __init__(self, config: Config) -> None:
        c = config.cluster
        self.config = config
        self.leases = Leases(c.host_id, config.slots, lease=c.lease)
        self.endpoint = f"tcp://{c.listen}"
        self.lease_file = LeaseFile(config.run_dir / LEASES, config.slots, create=True)
        self.hosts_path = config.run_dir / HOSTS
        self._wanted: frozenset[int] = frozenset()
        self._hosts: bytes = b""
        self._stop = threading.Event()
        self._joined = threading.Event()
        self._error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self.own: Any = None
        self.nc: Any = None
        # When the supervisor's main loop last turned (turned()). A host whose loop stopped
        # turning cannot start or stop its object processes: it must not keep its leases
        # (it would hold slots it never serves), so the thread stops renewing.
        self._turned = time.monotonic()
        self.patience = max(0.5, c.lease / 2)

    # -- the supervisor's side ------------------------------------------------------------
    def join(self, timeout: float = 60.0) -> None:
        """Connect, agree on the id secret, start keeping leases; raise ClusterError."""
        self._thread = threading.Thread(target=self._main, name="durable-cluster", daemon=True)
        self._turned = time.monotonic() + timeout  # (the loop starts turning after the join)
        self._thread.start()
        if not self._joined.wait(timeout) and self._error is None:
            self._error = ClusterError(f"the cluster's NATS servers ({self.config.cluster.nats}) "
                                       f"did not answer within {timeout:.0f} s; check that they "
                                       "run and that JetStream has a leader")
        if self._error is not None:
            self.close()
            raise self._error if isinstance(self._error, ClusterError) else ClusterError(
                f"joining the cluster failed: {type(self._error).__name__}: {self._error}")
        self._turned = time.monotonic()

    def turned(self) -> None:
        """The supervisor's main loop turned (it calls this every turn)."""
        self._turned = time.monotonic()

    def wanted(self) -> frozenset[int]:
        """The slots this host serves now (its object processes for the others must stop)."""
        now = time.monotonic()
        return frozenset(s for s in self._wanted if self.lease_file.get(s) > now)

    def status(self) -> dict[str, Any]:
        """This host's part of `durable status`: the slots it serves and the live hosts."""
        try:
            hosts = orjson.loads(self._hosts or b"{}")
        except orjson.JSONDecodeError:
            hosts = {}
        return {"host": self.config.cluster.host_id, "nats": self.config.cluster.nats,
                "slots": sorted(self.wanted()), "hosts": hosts,
                "lease": self.config.cluster.lease}

    def close(self, *, release: bool = False) -> None:
        """Stop keeping leases (``release``: give every slot back first, for a graceful stop
        after the object processes stopped)."""
        if self._thread is not None and self._thread.is_alive():
            if release and self.own is not None:
                fut = asyncio.run_coroutine_threadsafe(self.own.release_all(), self.loop)
                try:
                    fut.result(10.0)
                except Exception as e:  # noqa: BLE001  (their leases lapse instead)
                    log.warning("giving the slots back failed (%s); the others take them "
                                "once their leases lapse", e)
            self._stop.set()
            self._thread.join(10.0)
        for slot in range(self.config.slots):
            self.lease_file.set(slot, 0.0)

    # -- the thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as e:  # noqa: BLE001  (reported to join, or logged)
            if not self._joined.is_set():
                self._error = e
                self._joined.set()
            else:
                if isinstance(e, ClusterError):
                    log.error("%s", e)
                else:
                    log.exception("cluster thread failed: %s", e)
                for slot in range(self.config.slots):  # serve nothing: the leases lapse
                    self.lease_file.set(slot, 0.0)
                self._wanted = frozenset()

    async def _run(self) -> None:
        import nats

        from .cluster import SlotOwnership

        async def quiet(e: Exception) -> None:
            log.debug("NATS: %s", e)

        c = self.config.cluster
        self.nc = await nats.connect(servers=c.servers(), name=f"durable-host-{c.host_id}",
                                     error_cb=quiet, connect_timeout=5,
                                     max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        resync: asyncio.Task[None] | None = None
        try:
            js = self.nc.jetstream(timeout=2.0)
            deadline = time.monotonic() + 60
            while True:  # a cluster that just started elects its JetStream leader first
                try:
                    await js.account_info()
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            announce = orjson.dumps({"broker": self.endpoint, "pid": os.getpid()})
            # Each lease write may take a quarter of the lease: a renewal that times out leaves
            # time for two more before the deadline (lease - lease/10 after the last success).
            self.own = SlotOwnership(js, self.leases, replicas=c.replicas, announce=announce,
                                     timeout=min(2.0, c.lease / 4))
            await self._start_ownership()
            await self._agree_on_secret()
            await self.own.listen_for_twin(2 * c.lease / 3)
            if self.own.twin is not None:
                raise ClusterError(_twin_message(c.host_id, "was starting"))
            self._joined.set()
            log.info("joined the cluster as %s (lease %.1f s); this host's broker for the "
                     "others: %s", c.host_id, c.lease, self.endpoint)
            next_resync = time.monotonic() + c.lease
            stalled_since: float | None = None
            warned_twin = False
            last_round = paused_until = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_round > self.patience:  # this thread stood still as well (the
                    paused_until = now + self.patience  # whole process was SIGSTOPped, the VM
                last_round = now                        # paused): the loop turns first
                stalled = now - self._turned
                if stalled <= self.patience or now < paused_until:
                    if stalled_since is not None:
                        log.warning("the supervisor's main loop turns again (after %.1f s): "
                                    "keeping leases again", time.monotonic() - stalled_since)
                        stalled_since = None
                    await self.own.step()
                    if self.own.must_yield():
                        raise ClusterError(_twin_message(
                            c.host_id, "ran, and it has run longer"))
                    if self.own.twin is not None and not warned_twin:
                        warned_twin = True
                        log.error("another process announces itself as cluster host %r (a "
                                  "host_id given twice?); this host runs longer, so that one "
                                  "stops: give it a host_id of its own", c.host_id)
                elif stalled_since is None:
                    stalled_since = self._turned
                    log.error("the supervisor's main loop has not turned for %.1f s: this host "
                              "no longer renews its leases, so that the other hosts take its "
                              "slots. The main thread is at:\n%s", stalled, _main_stack())
                self._publish()
                if time.monotonic() >= next_resync and (resync is None or resync.done()):
                    next_resync = time.monotonic() + c.lease
                    resync = asyncio.ensure_future(self.own.resync())
                await asyncio.sleep(0.05)
        finally:
            if resync is not None and not resync.done():
                resync.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await resync
            await self.own.close() if self.own is not None else None
            await self.nc.close()

    async def _start_ownership(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.own.start()
                return
            except Exception:  # noqa: BLE001  (the bucket's stream is being placed)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _agree_on_secret(self) -> None:
        """Ids are signed with the data dir's secret: every host must have the cluster's. The
        first host to join gives its own; a later one takes it if its data dir holds no slot
        yet, and refuses to start otherwise."""
        from nats.js.errors import KeyWrongLastSequenceError

        path = self.config.data_path / "secret"
        mine = path.read_bytes()
        try:
            await self.own.kv.create(_SECRET_KEY, mine)
            return
        except KeyWrongLastSequenceError:
            pass
        theirs = (await self.own.kv.get(_SECRET_KEY)).value
        if theirs == mine:
            return
        if any(self.config.data_path.glob("slot-*.duckdb")):
            raise ClusterError(
                f"this host's data dir ({self.config.data_path}) was made outside this "
                "cluster (its id secret differs, and it holds slots): start the host with an "
                "empty data dir, or `durable export` it and import the export into the cluster")
        from durable.fsutil import write_durably
        write_durably(path, theirs, replace=True)
        log.info("took the cluster's id secret (this data dir held no slot yet)")

    def _publish(self) -> None:
        """The leases file and the hosts file, from what the rules say now."""
        wanted = []
        for slot in range(self.config.slots):
            d = self.leases.deadline(slot)
            self.lease_file.set(slot, d if d is not None else 0.0)
            if d is not None and d > time.monotonic():
                wanted.append(slot)
        self._wanted = frozenset(wanted)
        hosts = {}
        for host, value in sorted(self.own.live_values().items()):
            try:
                hosts[host] = orjson.loads(value).get("broker")
            except (orjson.JSONDecodeError, AttributeError):
                continue
        body = orjson.dumps(hosts)
        if body != self._hosts:
            tmp = self.hosts_path.with_name(HOSTS + ".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, self.hosts_path)
            self._hosts = body
