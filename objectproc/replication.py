"""Cluster mode: one slot's commit log replicated on NATS JetStream (docs/cluster.md).

The object process's storage stays what it is on one host (a local commit log and a
DuckDB file); in cluster mode its log writer first stores each group of records in the
slot's subject of the cluster's stream (``supervisor/cluster.py``: ``SlotLog``, appends
fenced by the last sequence the owner knows) and writes it locally only once JetStream
acknowledged it (a quorum of its replicas has it). So a host's files always hold a prefix
of the slot's log, and whichever host serves the slot next replays the rest
(:meth:`Replicator.catch_up`).

The NATS client is asyncio; it runs on a thread of its own with its own event loop, so
that the log writer thread (and the slot's start) can call it synchronously and the
object process's loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from durable.errors import StorageCorruptError
from durable.supervisor.cluster import Deposed, SlotLog, ensure_log_stream

from .storage.log import first_record_seq, iter_records

__all__ = ["Replicator", "Deposed"]

log = logging.getLogger("durable.replication")

#: attempts at fencing the log after catching up, each after another owner's appends
_FENCE_ATTEMPTS = 20
#: seconds a catch-up read waits for its next message before it subscribes again from where
#: it stopped. A read started while the stream elects a leader gets nothing until it asks
#: again: at 10 s (twice the request timeout) a slot restarted by a NATS node's loss served
#: again ~11 s after it, 5 s after the election (seen in a CI-like run); messages that flow
#: come within milliseconds, and a read cut short loses nothing.
_READ_WAIT = 3.0


class Replicator:
    """The slot's replicated log, with a synchronous API for the storage's threads."""

    def __init__(self, servers: list[str], slot: int, *, timeout: float = 5.0,
                 replicas: int = 3, name: str = "", hint: Path | None = None) -> None:
        self.servers = servers
        self.slot = slot
        self.timeout = timeout
        self.replicas = replicas
        self.name = name or f"durable-slot-{slot}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="durable-replication", daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.slot_log: SlotLog | None = None
        self.max_payload = 1 << 20
        self.appended = 0  # messages appended by this process
        #: where a taking-over process may start reading the log: "R S" says that message S
        #: begins with record R, so every earlier message holds only records before R (a
        #: hint, rewritten at most once a second: an older one only costs a longer read)
        self.hint = hint
        self._hint_written = 0.0
        self.read_from = 0  # the stream sequence the last catch-up started after
        self._last = (0, 0)  # (first record, stream sequence) of the last message appended

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout if timeout is not None else self.timeout + 5.0)
        except TimeoutError:
            fut.cancel()  # (else it runs on beside the retry: a second consumer, and so on)
            raise

    def _patient(self, make: Any, timeout: float = 60.0) -> Any:
        """Run ``make()`` until it does not time out (a stream whose leader is being elected
        answers nothing for a few seconds), for at most ``timeout`` seconds. Only for reads,
        and for the fence, whose outcome a retry settles (a second fence is harmless)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._run(make(), None)
            except (TimeoutError, NoRespondersError, NatsTimeoutError):
                if time.monotonic() > deadline:
                    raise
                log.info("slot %d: the cluster's log did not answer in time; asking again",
                         self.slot)

    def connect(self, timeout: float = 30.0) -> None:
        """Connect and make sure the stream exists (raises if the cluster does not answer)."""
        self._run(self._connect(timeout), timeout + 5.0)

    async def _connect(self, timeout: float) -> None:
        import nats  # (the "cluster" extra; single-host mode never imports it)

        async def quiet(e: Exception) -> None:  # (nats-py prints a traceback otherwise)
            log.debug("slot %d: NATS: %s", self.slot, e)

        self.nc = await nats.connect(servers=self.servers, name=self.name, error_cb=quiet,
                                     connect_timeout=min(timeout, 5.0),
                                     allow_reconnect=True, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.2)
        self.max_payload = self.nc.max_payload or self.max_payload
        js = self.nc.jetstream(timeout=self.timeout)
        deadline = self.loop.time() + timeout
        while True:  # a cluster that just started answers JetStream requests a little later
            try:
                await ensure_log_stream(js, replicas=self.replicas)
                break
            except Exception as e:  # noqa: BLE001
                if self.loop.time() > deadline:
                    raise ConnectionError(f"the cluster's JetStream did not answer within "
                                          f"{timeout:.0f} s ({type(e).__name__}: {e})") from e
                await asyncio.sleep(0.5)
        self.slot_log = SlotLog(js, self.slot, timeout=self.timeout)

    # -- the log writer thread ------------------------------------------------------------
    def append_group(self, records: list[bytes]) -> None:
        """Store one group of encoded records (split at record boundaries into messages of
        at most the server's max_payload); returns once each is acknowledged."""
        limit = self.max_payload - 1024
        chunk: list[bytes] = []
        size = 0
        for rec in records:
            if len(rec) > limit:
                raise ValueError(f"a record of {len(rec)} bytes is over the NATS server's "
                                 f"max_payload ({self.max_payload}); raise max_payload on "
                                 "every server (it must exceed the largest write)")
            if chunk and size + len(rec) > limit:
                self._append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(rec)
            size += len(rec)
        if chunk:
            self._append(b"".join(chunk))

    def _append(self, data: bytes) -> None:
        seq = self._run(self.slot_log.append(data))
        self.appended += 1
        self._last = (first_record_seq(data), seq)
        if self.hint is not None and time.monotonic() - self._hint_written >= 1.0:
            self._hint_written = time.monotonic()
            self._write_hint(*self._last)

    def _write_hint(self, record: int, stream_seq: int) -> None:
        tmp = self.hint.with_name(self.hint.name + ".tmp")
        try:
            tmp.write_text(f"{record} {stream_seq}\n")
            os.replace(tmp, self.hint)
        except OSError as e:  # (a hint: the next catch-up reads from the start instead)
            log.debug("slot %d: could not write %s: %s", self.slot, self.hint, e)

    def _read_hint(self, next_seq: int) -> int:
        """The stream sequence to read after, from the hint if it applies to ``next_seq``."""
        try:
            record, stream_seq = map(int, self.hint.read_text().split())
        except (OSError, ValueError, AttributeError):
            return 0
        return stream_seq - 1 if 0 < record <= next_seq and stream_seq > 0 else 0

    # -- taking the slot ------------------------------------------------------------------
    def _read(self, after: int, last: int, stall: float = 60.0) -> list[tuple[int, bytes]]:
        """The slot's messages after ``after`` through ``last``. A read cut short (a leader
        election, a busy machine) goes on from the last message it got: the whole read once
        had to fit in 10 s, and a host that had to catch up on a long absence never did (it
        read the same first part again and again; seen in a 10-minute chaos run). Raises
        once ``stall`` seconds pass with no message."""
        got: list[tuple[int, bytes]] = []
        progress = time.monotonic()
        while True:
            start = got[-1][0] if got else after
            chunk: list[tuple[int, bytes]] = []  # (one per try: a cancelled one may add more)
            try:
                self._run(self.slot_log.read(start, last, _READ_WAIT, chunk),
                          _READ_WAIT + stall + 600.0)
                return got + chunk
            except (TimeoutError, NoRespondersError, NatsTimeoutError):
                taken = list(chunk)
                got += taken
                if taken:
                    progress = time.monotonic()
                elif time.monotonic() - progress > stall:
                    raise
                log.info("slot %d: the cluster's log did not answer in time; reading on from "
                         "message %d", self.slot, got[-1][0] if got else after)

    def catch_up(self, next_seq: int) -> Iterator[tuple[int, memoryview]]:
        """The slot's records from sequence ``next_seq`` on, in order; then fence the log (an
        empty append naming its last message), so that a previous owner's appends are refused
        from here on. Raises StorageCorruptError if this host's files and the log disagree."""
        expect = next_seq
        after = self.read_from = self._read_hint(next_seq)  # stream sequence read through
        newest = 0  # the newest record the log holds
        for _ in range(_FENCE_ATTEMPTS):
            last = self._patient(self.slot_log.open)
            for stream_seq, data in self._read(after, last):
                where = f"slot {self.slot}'s log message {stream_seq}"
                try:
                    records = iter_records(data, where)
                except ValueError as e:
                    raise StorageCorruptError(f"{e}: the cluster's log is damaged") from None
                for seq, payload in records:
                    newest = max(newest, seq)
                    if seq < expect:
                        continue
                    if seq > expect:
                        raise StorageCorruptError(
                            f"{where} holds record {seq}, but this host's files end at record "
                            f"{expect - 1}: the log lacks records in between. Serve this slot "
                            "from a host whose data dir was made in this cluster")
                    yield seq, payload
                    expect = seq + 1
                after = stream_seq
            after = max(after, last)
            if newest < next_seq - 1:
                raise StorageCorruptError(
                    f"this host's files hold slot {self.slot}'s records up to {next_seq - 1}, "
                    f"but the cluster's log only up to {newest}: this data dir was not made in "
                    "this cluster (or the cluster's stream was deleted). Start cluster mode with "
                    "an empty data dir (`durable import` an export to bring data in)")
            try:  # the fence (a message with no records)
                self._patient(lambda: self.slot_log.append(b""))
            except Deposed:
                log.info("slot %d: another owner appended while this host caught up; "
                         "reading on", self.slot)
                continue
            return
        raise ConnectionError(f"slot {self.slot}: could not fence the log after "
                              f"{_FENCE_ATTEMPTS} attempts (other owners kept appending)")

    def close(self) -> None:
        if self.hint is not None and self._last[1]:
            self._write_hint(*self._last)

        async def stop() -> None:
            if self.nc is not None:
                await self.nc.close()
        try:
            self._run(stop(), 5.0)
        except Exception:  # noqa: BLE001  (closing: the process exits anyway)
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
