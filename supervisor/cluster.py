"""Cluster mode's slot ownership on a JetStream key-value bucket (docs/cluster.md).

:class:`SlotOwnership` drives :class:`~durable.supervisor.leases.Leases` (the pure rules)
against a real bucket: it reads every ``slot/N`` key at start, watches the bucket for other
hosts' writes, and sends the writes the rules ask for as compare-and-set operations (a
``create``, or an ``update`` from the revision the rules saw). Needs the ``cluster`` extra
(``nats-py``); single-host mode never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from .leases import Action, Leases

__all__ = ["SlotOwnership", "SlotLog", "Deposed", "BUCKET", "STREAM", "ensure_log_stream"]

log = logging.getLogger("durable.cluster")

BUCKET = "durable_slots"
STREAM = "DURABLE_LOG"
#: JetStream's answer to an append whose expected last subject sequence is not the last
_WRONG_LAST_SEQUENCE = 10071


def _key(slot: int) -> str:
    return f"slot/{slot}"


def _mark(value: bytes | None) -> tuple[str, int] | None:
    """A membership value's (boot, beat), if it has them."""
    try:
        doc = orjson.loads(value or b"null")
        boot, beat = doc["boot"], doc["beat"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if type(boot) is not str or type(beat) is not int:
        return None
    return boot, beat


def _decode(value: bytes | None) -> tuple[str | None, int]:
    host, epoch, _ = _decode_write(value)
    return host, epoch


def _decode_write(value: bytes | None) -> tuple[str | None, int, int | None]:
    """``host, epoch`` and the mark of the write that made the value (None: none)."""
    try:
        doc = orjson.loads(value or b"null")
        write = doc.get("write")
        return doc.get("host"), int(doc.get("epoch", 0)), write if isinstance(write, int) else None
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None, 0, None  # a value no host wrote: treated as free (a write from it is a CAS)


class SlotOwnership:
    """This host's leases, kept on the bucket. Call :meth:`step` often (a few times a
    second); ask :meth:`serving` before serving a slot.

    Membership is kept in the same bucket: each host rewrites ``host/NAME`` every third of
    a lease, and a host counts as live while its key changes within a lease as this host
    sees it (the rule the slot leases follow); the fair share is over the live hosts."""

    def __init__(self, js: Any, leases: Leases, *, replicas: int = 3,
                 clock: Callable[[], float] = time.monotonic, timeout: float = 2.0,
                 announce: bytes = b"{}") -> None:
        self.js = js
        self.announce = announce  # this host's membership value (where its broker listens)
        #: host -> its membership value, as last seen
        self.values: dict[str, bytes] = {}
        self.leases = leases
        self.replicas = replicas
        self.clock = clock
        self.timeout = timeout
        self.kv: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._watched_at = -float("inf")  # when the watch last delivered an entry
        self.rewatches = 0
        self._rewatching: asyncio.Task[None] | None = None  # a new watch being made
        self._closed = False
        self._reading: dict[int, asyncio.Task[None]] = {}  # slot -> its key's read from the leader
        self._unknowns: set[asyncio.Task[None]] = set()  # reads after a write's answer was lost
        self._read_again: set[int] = set()  # slots whose key changed while being read
        #: host -> (revision, last seen new, its (boot, beat) if its value has them)
        self._members: dict[str, tuple[int, float, tuple[str, int] | None]] = {}
        self._boot = secrets.token_hex(8)  # (this process's announcements: see _saw_member)
        #: another process's announcements under this host's own name: its boot -> (the
        #: first beat seen, the highest). One beat is what an earlier run of this host left
        #: behind; two are a live process (``twin``).
        self._foreign: dict[str, tuple[int, int]] = {}
        #: a live process announcing this host's name (boot, its highest beat seen), if any
        self.twin: tuple[str, int] | None = None
        try:  # (announce is host.py's JSON object; the mark is added to it)
            doc = orjson.loads(announce)
        except orjson.JSONDecodeError:
            doc = None
        self._announce_doc: dict[str, Any] = doc if isinstance(doc, dict) else {}
        self._beat = 0
        self._announced = -float("inf")
        self._announcing = False

    def hosts(self) -> int:
        """Live hosts as this host sees them (itself included)."""
        now = self.clock()
        return len({self.leases.host} | {h for h, (_, since, _) in self._members.items()
                                         if now - since < self.leases.lease})

    async def start(self) -> None:
        self.kv = await self.js.create_key_value(bucket=BUCKET, replicas=self.replicas,
                                                 history=1)
        watcher = await self.kv.watchall()
        for slot in range(self.leases.slots):
            try:
                entry = await self.kv.get(_key(slot))
            except KeyNotFoundError:
                self.leases.observe(slot, 0, None, 0, self.clock())
            else:
                host, epoch = _decode(entry.value)
                self.leases.observe(slot, entry.revision, host, epoch, self.clock())
        self._follow_soon(watcher)

    def _follow_soon(self, watcher: Any) -> None:
        self._watched_at = self.clock()  # (a new watch gets a lease before it is suspect)
        self._watch = asyncio.create_task(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                self._watched_at = self.clock()
                if entry is None:
                    continue  # (the initial values have all been delivered)
                if entry.key.startswith("host/"):
                    host = entry.key[5:]
                    if entry.operation in ("DEL", "PURGE"):
                        self._members.pop(host, None)
                        self.values.pop(host, None)
                    else:
                        self._saw_member(host, entry.revision, entry.value)
                    continue
                if not entry.key.startswith("slot/"):
                    continue
                try:
                    slot = int(entry.key[5:])
                except ValueError:
                    continue
                if not 0 <= slot < self.leases.slots:
                    continue
                # The watch says when a slot's key changed, not its revision: a read from the
                # stream's leader does. The revision a write is checked against is the
                # leader's, and after NATS nodes were SIGKILLed a watch's consumer, on
                # another replica, delivered each write 3 revisions above the leader's
                # number for it (nats-server 2.9.10, a cluster chaos run): every renewal
                # from that number was refused and the slot flapped, and another host's
                # claim from such a number could match a later write's revision.
                self._read_soon(slot)
        except Exception as e:  # noqa: BLE001  (logged, as below)
            log.warning("the watch of the cluster's keys failed (%r): this host hears of "
                        "changes only by its resyncs, once a lease", e)
        else:  # (logged: the resyncs alone make every lease look old, see resync())
            log.warning("the watch of the cluster's keys ended: this host hears of changes "
                        "only by its resyncs, once a lease")
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def step(self) -> None:
        """Send what the rules ask for now, each write on its own (a slow membership write
        must not hold the renewals up), and record each outcome."""
        now = self.clock()
        tasks = []
        if now - self._announced >= self.leases.lease / 3 and not self._announcing:
            self._announcing = True
            tasks.append(self._announce(now))
        tasks += [self._send(a, now) for a in self.leases.plan(now, self.hosts())]
        if tasks:
            await asyncio.gather(*tasks)

    async def _announce(self, now: float) -> None:
        try:
            self._beat += 1
            await asyncio.wait_for(self.kv.put(f"host/{self.leases.host}", self._announcement()),
                                   self.timeout)
            self._announced = now
        except Exception as e:  # noqa: BLE001  (no quorum: the slots' writes fail too)
            log.warning("could not announce host %s: %s", self.leases.host, e)
        finally:
            self._announcing = False

    async def _send(self, action: Action, sent: float) -> None:
        value = orjson.dumps({"host": action.host, "epoch": action.epoch, "write": action.write})
        try:
            if action.kind == "create":
                rev = await asyncio.wait_for(self.kv.create(_key(action.slot), value),
                                             self.timeout)
            else:
                rev = await asyncio.wait_for(
                    self.kv.update(_key(action.slot), value, last=action.revision), self.timeout)
        except KeyWrongLastSequenceError:
            await self._refused(action)
        except Exception as e:  # noqa: BLE001  (a timeout or a lost quorum: outcome unknown)
            # (read apart from this step: a NATS slow to answer may be slow to read too, and
            # the step's other renewals must not wait for it; the slot stays pending meanwhile)
            task = asyncio.create_task(self._unknown(action, sent, e))
            self._unknowns.add(task)
            task.add_done_callback(self._unknowns.discard)
        else:
            self.leases.succeeded(action, rev, sent)

    async def _unknown(self, action: Action, sent: float, why: BaseException) -> None:
        """A write whose answer did not come: read the key from the leader, which says
        whether this write landed (its mark is there: Leases.landed)."""
        try:
            entry = await asyncio.wait_for(self.kv.get(_key(action.slot)), self.timeout)
        except KeyNotFoundError:
            revision, host, epoch, write = 0, None, 0, None
        except Exception as e:  # noqa: BLE001  (the next resync reads it again)
            log.warning("slot %d: lease write failed (%s) and reading the key failed (%s); "
                        "served at most until its lease ends", action.slot, why, e)
            self.leases.failed(action, unknown=True)
            return
        else:
            revision = entry.revision
            host, epoch, write = _decode_write(entry.value)
        if self.leases.landed(action, sent, revision, host, epoch, write, self.clock()):
            log.info("slot %d: lease write failed (%s), but the key holds it: it landed",
                     action.slot, why)
        else:
            log.warning("slot %d: lease write failed (%s); served at most until its lease ends",
                        action.slot, why)

    def serving(self, slot: int) -> bool:
        return self.leases.serving(slot, self.clock())

    def _read_soon(self, slot: int) -> None:
        """Read ``slot``'s key from the leader; changes that come while a read is out are
        covered by one read more after it."""
        if slot in self._reading:
            self._read_again.add(slot)
            return
        self._reading[slot] = asyncio.create_task(self._read_while_changed(slot))

    async def _read_while_changed(self, slot: int) -> None:
        """A failed read is tried again (0.05 s later, doubling to 0.5 s) for up to a lease:
        the watch does not say the key changed twice, and waiting for the next resync left a
        change unseen for a lease (a read timed out during a NATS election, seen in a CI-like
        run). Past a lease, the resync reads it."""
        give_up, delay = self.clock() + self.leases.lease, 0.05
        try:
            while True:
                self._read_again.discard(slot)
                if not await self._reread(slot):
                    if self.clock() + delay > give_up:
                        return
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 0.5)
                    self._read_again.add(slot)
                if slot not in self._read_again:
                    return
        finally:
            del self._reading[slot]

    async def _refused(self, action: Action) -> None:
        """Another write came first: read the key (the watch may have missed that write,
        which may be an earlier one of ours whose answer timed out)."""
        try:
            entry = await asyncio.wait_for(self.kv.get(_key(action.slot)), self.timeout)
        except KeyNotFoundError:
            revision, host, epoch = 0, None, 0
        except Exception as e:  # noqa: BLE001  (the next resync reads it again)
            log.info("slot %d: lease write from revision %d refused; reading the key failed: "
                     "%s", action.slot, action.revision, e)
            self.leases.failed(action)
            return
        else:
            revision = entry.revision
            host, epoch = _decode(entry.value)
        if self.leases.refused(action, revision, host, epoch, self.clock()):
            log.info("slot %d: lease write from revision %d refused, but revision %d is this "
                     "host's: an earlier renewal whose answer timed out had landed; still held",
                     action.slot, action.revision, revision)
        else:
            # (logged: the flapping slot of docs/cluster.md is not wholly explained yet)
            log.info("slot %d: lease write from revision %d refused: %s wrote revision %d",
                     action.slot, action.revision, host or "nobody (given back)", revision)

    async def _reread(self, slot: int) -> bool:
        """Read ``slot``'s key from the leader; False if the read failed."""
        try:
            entry = await asyncio.wait_for(self.kv.get(_key(slot)), self.timeout)
        except KeyNotFoundError:
            self.leases.observe(slot, 0, None, 0, self.clock())
        except Exception as e:  # noqa: BLE001  (read again by the caller or the next resync)
            log.debug("slot %d: reading its key failed: %r", slot, e)
            return False
        else:
            host, epoch = _decode(entry.value)
            self.leases.observe(slot, entry.revision, host, epoch, self.clock())
        return True

    async def resync(self) -> None:
        """Read every key again. The watch is how changes arrive, but nats-py's watcher drops
        an update whose callback times out (a busy machine), and a slot given back and never
        written again would then look held forever: no host would claim it. Run every lease.

        A watch can also stand still without ending: while the NATS server its consumer was on
        is down, and for seconds after (measured: nothing in 8 s of a dead server, then 5-10 s
        more after it came back, while writes went on). Every lease then looked expired just
        before each resync, and the hosts' shares swung with it (the flapping slot of
        docs/cluster.md). So when this read finds a change the watch did not deliver, or this
        host's own announcement was acknowledged and not delivered (the reads can all time out
        for 8 s of an election, measured), and the watch has delivered nothing for a lease, it
        is started anew, in the background: making a watch takes two requests of the cluster,
        which took over a second each on a loaded machine just after an election (the
        consumers were made on the server, and the client had given up: seen in CI-like
        runs)."""
        missed = False
        for slot in range(self.leases.slots):
            before = self.leases.revision(slot)
            await self._reread(slot)
            missed |= self.leases.revision(slot) > before
        unseen = self._announced > self._watched_at  # (sent after the last delivery, acked)
        if ((missed or unseen) and self.clock() - self._watched_at > self.leases.lease
                and not self._closed
                and (self._rewatching is None or self._rewatching.done())):
            self._rewatching = asyncio.create_task(self._rewatch())
        try:
            keys = await asyncio.wait_for(self.kv.keys(), self.timeout * 2)
        except Exception as e:  # noqa: BLE001  (NoKeysError, a timeout: next time)
            log.debug("listing the cluster's hosts failed: %s", e)
            return
        for key in keys:
            if not key.startswith("host/"):
                continue
            try:
                entry = await asyncio.wait_for(self.kv.get(key), self.timeout)
            except Exception:  # noqa: BLE001  (deleted meanwhile, or slow)
                continue
            self._saw_member(key[5:], entry.revision, entry.value)

    def must_yield(self) -> bool:
        """Whether a live twin (another process announcing this host's name: the same
        ``host_id`` on two machines) is the older of the two, so that this one stops. Beats
        count announcements, a third of a lease apart, so the older has more; a tie goes by
        boot, the same answer on both sides. (A newcomer does not get this far: it refuses
        to join when it hears a twin while it listens first, ``listen_for_twin``.)"""
        t = self.twin
        return t is not None and (t[1], t[0]) > (self._beat, self._boot)

    async def listen_for_twin(self, seconds: float) -> None:
        """Announce and listen for ``seconds`` before claiming any slot: a live process
        announcing this host's name (every third of a lease) is heard within them. Two
        hosts given the same ``host_id`` otherwise both took every slot that key named, and
        served each object twice at once, for as long as both ran (measured: 98 of 100
        status samples over 25 s)."""
        for _ in range(max(1, round(seconds / 0.05))):
            if self.twin is not None:
                return
            if self.clock() - self._announced >= self.leases.lease / 3 and not self._announcing:
                self._announcing = True
                await self._announce(self.clock())
            await asyncio.sleep(0.05)

    def _announcement(self) -> bytes:
        """This host's membership value: ``announce`` plus a mark that changes each time."""
        return orjson.dumps({**self._announce_doc, "boot": self._boot, "beat": self._beat})

    def _saw_member(self, host: str, revision: int, value: bytes | None) -> None:
        """A host's key as the watch or a read gave it. It is news, and the host live for a
        lease more, when its mark (``boot``, ``beat``) is new: revisions from the watch and
        from reads are not comparable (a watch numbered every write 3 above the stream
        leader, docs/cluster.md), so a read could not refresh a host the watch had seen at a
        higher number. Values without a mark (hosts of an older version) go by revision."""
        mark = _mark(value)
        if host == self.leases.host and mark is not None and mark[0] != self._boot:
            first, top = self._foreign.get(mark[0], (mark[1], mark[1]))
            self._foreign[mark[0]] = (first, max(top, mark[1]))
            if max(top, mark[1]) != first:  # (a second announcement: it runs)
                self.twin = (mark[0], max(top, mark[1]))
        known = self._members.get(host)
        if known is not None:
            if mark is not None and known[2] is not None:
                if mark[0] == known[2][0] and mark[1] <= known[2][1]:
                    return  # (seen: a dead host's last value, read again, keeps it no longer)
            elif revision <= known[0]:
                return
        self._members[host] = (revision, self.clock(), mark)
        self.values[host] = value or b"{}"

    async def _rewatch(self) -> None:
        """Watch anew. Making a watch makes a consumer, which needs the cluster's metadata
        leader: while the dead server's place is being elected, each try fails after the
        JetStream context's timeout (seen for 6-8 s in quiet runs). A failed try is made again
        (0.05 s later, doubling to half a second) for up to two leases; then the next resync
        starts over if the watch still stands still."""
        log.warning("the watch of the cluster's keys delivered nothing for %.1f s while keys "
                    "changed (its NATS server went away?): watching anew",
                    self.clock() - self._watched_at)
        limit = 2 * self.leases.lease
        give_up, delay, tries = time.monotonic() + limit, 0.05, 0
        while True:
            tries += 1
            try:  # (each request has the context's timeout: this bounds one never answered)
                watcher = await asyncio.wait_for(self.kv.watchall(),
                                                  max(give_up - time.monotonic(), delay))
                break
            except Exception as e:  # noqa: BLE001  (tried again, as below)
                if time.monotonic() + delay > give_up:
                    log.warning("watching the cluster's keys anew failed %d times in %.1f s "
                                "(last: %r); the next resync tries again", tries, limit, e)
                    return
                log.debug("watching the cluster's keys anew failed (%r): trying again", e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)
        if self._watch is not None:
            self._watch.cancel()  # (not awaited: stopping a consumer on a dead server may hang)
        self.rewatches += 1
        self._follow_soon(watcher)

    def live_values(self) -> dict[str, bytes]:
        """The membership value of each live host (this one included)."""
        now = self.clock()
        out = {h: self.values.get(h, b"{}") for h, (_, since, _) in self._members.items()
               if now - since < self.leases.lease}
        out[self.leases.host] = self.announce
        return out

    async def release_all(self) -> None:
        """Give back every slot this host holds (a graceful stop, after its object processes
        stopped): the others take them at once instead of after the lease."""
        for slot, revision, epoch in self.leases.held():
            self.leases.drop(slot)
            value = orjson.dumps({"host": None, "epoch": epoch})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.kv.update(_key(slot), value, last=revision),
                                       self.timeout)

    def owned(self) -> list[int]:
        return self.leases.owned(self.clock())

    async def close(self) -> None:
        self._closed = True  # (a resync still running starts no new watch)
        if self._rewatching is not None:  # (first: it may start a watch)
            self._rewatching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._rewatching
        for task in [self._watch, *self._reading.values(), *self._unknowns]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class Deposed(Exception):
    """An append was refused because another owner appended to the slot's log since: this
    host no longer owns the slot, and the write was not stored."""


async def ensure_log_stream(js: Any, *, replicas: int = 3) -> None:
    """The stream holding every slot's log, one subject per slot (``slotlog.N``)."""
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(name=STREAM, subjects=["slotlog.*"], num_replicas=replicas)


class SlotLog:
    """One slot's commit log on JetStream, as its owner writes it: each append names the
    last record the owner knows of (``Nats-Expected-Last-Subject-Sequence``), so an owner
    that was deposed has every append refused, whatever it still believes."""

    def __init__(self, js: Any, slot: int, *, timeout: float = 2.0) -> None:
        self.js = js
        self.slot = slot
        self.subject = f"slotlog.{slot}"
        self.timeout = timeout
        self.last = 0  # the last record's stream sequence, as this owner knows it

    async def open(self) -> int:
        """Learn the slot's last record (0: none); call after taking the slot."""
        try:
            msg = await self.js.get_last_msg(STREAM, self.subject)
        except NotFoundError:
            self.last = 0
        else:
            self.last = msg.seq
        return self.last

    async def append(self, payload: bytes) -> int:
        """Store one record; its stream sequence once a quorum of replicas has it. Raises
        :class:`Deposed` if another owner appended since; any other error leaves the outcome
        unknown (as an fsync that fails), and the caller must not acknowledge the write."""
        try:
            ack = await self.js.publish(self.subject, payload, timeout=self.timeout,
                                        headers={"Nats-Expected-Last-Subject-Sequence":
                                                 str(self.last)})
        except BadRequestError as e:
            if e.err_code == _WRONG_LAST_SEQUENCE:
                raise Deposed(f"slot {self.slot}: another host appended to its log after "
                              f"record {self.last}; this host no longer owns it") from None
            raise
        self.last = ack.seq
        return ack.seq

    async def read(self, after: int, last: int, timeout: float = 30.0,
                   out: list[tuple[int, bytes]] | None = None) -> list[tuple[int, bytes]]:
        """The records after stream sequence ``after`` through ``last``, in order, through an
        ordered consumer (one stream of messages with flow control: ~100x faster than a
        request per message on a busy machine). ``timeout``: for each message. Appends to
        ``out`` as they come, so that a read cut short keeps what it got."""
        out = [] if out is None else out
        if after >= last:
            return out
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=after + 1)
        sub = await self.js.subscribe(self.subject, stream=STREAM, ordered_consumer=True,
                                      config=config)
        try:
            while True:
                msg = await sub.next_msg(timeout=timeout)
                seq = msg.metadata.sequence.stream
                if seq > last:
                    break
                out.append((seq, msg.data))
                if seq >= last:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out
