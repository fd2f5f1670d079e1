"""Slot leases for cluster mode (docs/cluster.md): one host's view of who owns each slot.

Pure logic, no sockets: the host feeds it what it sees of the JetStream key-value bucket
(``slot/N`` → ``{host, epoch}``, each change a new revision) and the outcome of its own
compare-and-set writes, and asks it what to write next and whether it may serve a slot.

No host compares its clock with another's. An owner renews by rewriting its key from the
revision it holds, which makes a new revision. Another host counts a lease as expired when
*it* has seen the same revision for ``lease`` seconds of its own monotonic clock; it then
takes the slot by a write from that revision, which fails if the owner renewed meanwhile.
The owner serves only until ``lease - margin`` seconds, on its own clock, after it *sent*
its last successful write. That write reached the bucket after it was sent, and anyone who
saw it saw it later still, so the owner stops before anyone may take over, as long as the
two clocks' rates differ by less than ``margin / lease`` (10% by default): clock offsets
do not matter, only rates, and monotonic clocks drift by parts per million.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

__all__ = ["Action", "Leases"]


@dataclass(frozen=True, slots=True)
class Action:
    """A write to make: ``create`` (the key does not exist) or ``update`` from ``revision``,
    of the value ``{host, epoch, write}``. ``sent`` must be passed back with its outcome."""

    kind: str  # "create" | "update"
    slot: int
    revision: int
    host: str | None  # None: give the slot back
    epoch: int
    #: this write's own mark in the value, to tell whether it landed when its answer was
    #: lost (:meth:`Leases.landed`); random, so that no restart of the host repeats one
    write: int = field(default_factory=lambda: secrets.randbits(63), compare=False)


@dataclass(slots=True)
class _Seen:
    revision: int  # 0: the key does not exist
    host: str | None
    epoch: int
    since: float  # our clock when this revision was first seen


class Leases:
    """One host's leases over ``slots`` slots."""

    def __init__(self, host: str, slots: int, *, lease: float = 5.0,
                 margin: float | None = None) -> None:
        if slots < 1 or lease <= 0:
            raise ValueError("slots must be >= 1 and lease > 0")
        self.host = host
        self.slots = slots
        self.lease = lease
        self.margin = lease / 10 if margin is None else margin
        if not 0 < self.margin < lease / 2:
            raise ValueError("margin must be between 0 and half the lease")
        self._seen: dict[int, _Seen] = {}
        self._held: dict[int, float] = {}  # slot -> when our last successful write was sent
        self._pending: set[int] = set()  # slots with a write of ours in flight
        # Slots whose key a write of ours was refused on: the next view of the key is the
        # truth even with a lower revision (a JetStream whose majority was SIGKILLed can come
        # back without a write it acknowledged).
        self._refused: set[int] = set()
        # Slots this host gave back, and when: not taken again for a lease, so that the host
        # they were given back for can take them (it sees them free later than the giver).
        self._given: dict[int, float] = {}

    # -- what the host sees --------------------------------------------------------------
    def observe(self, slot: int, revision: int, host: str | None, epoch: int,
                now: float) -> None:
        """A key's value as read or watched (revision 0: it does not exist / was deleted)."""
        seen = self._seen.get(slot)
        if seen is not None and revision < seen.revision and slot not in self._refused:
            return  # an older view arriving late
        self._refused.discard(slot)
        if seen is None or revision != seen.revision:
            self._seen[slot] = _Seen(revision, host, epoch, now)
            if host != self.host and slot in self._held and slot not in self._pending:
                del self._held[slot]  # someone else wrote it: ours no more

    def succeeded(self, action: Action, revision: int, sent: float) -> None:
        """Our write was accepted and made ``revision``; ``sent``: when it was sent."""
        self._pending.discard(action.slot)
        self.observe(action.slot, revision, action.host, action.epoch, sent)
        if action.host == self.host and self._seen[action.slot].revision == revision:
            self._held[action.slot] = sent
        else:  # given back, or another host's later write was seen first: not ours
            self._held.pop(action.slot, None)

    def failed(self, action: Action, *, unknown: bool = False) -> None:
        """Our write was refused (another revision is current: the slot is not ours until a
        later write of ours succeeds), or, with ``unknown``, its outcome is unknown (a timeout,
        a lost quorum). A renewal of unknown outcome leaves the slot held until the deadline
        of the last write that did succeed: a later revision, ours or not, was made after
        that one, so no one can count the lease expired sooner. (Dropping it at once turned
        every slow answer of an overloaded NATS into a restart of the slot.)"""
        self._pending.discard(action.slot)
        if not (unknown and action.host == self.host):
            self._held.pop(action.slot, None)
        if not unknown:
            self._refused.add(action.slot)

    def landed(self, action: Action, sent: float, revision: int, host: str | None,
               epoch: int, write: int | None, now: float) -> bool:
        """Our write's outcome was unknown (a timeout), and the key, read from the stream's
        leader since, holds ``revision`` of ``{host, epoch, write}``. If that is this very
        write's mark, it landed and made ``revision``: as :meth:`succeeded` (True). Else
        :meth:`failed` with ``unknown`` (it may land yet), and the key is observed.

        Host and epoch alone would not do: an earlier renewal whose answer was lost too may
        have written the same pair, sent before this one, and a lease counted from this one's
        sending would outlast what the others count. (Before, any lost answer left the slot
        to lapse at the deadline of the last write whose answer came: the lease simulation
        found a slot unserved for 4 s after 5 of 8 answers were lost.)"""
        if action.host == self.host and host == self.host and write == action.write:
            self.succeeded(action, revision, sent)
            return True
        self.failed(action, unknown=True)
        self.observe(action.slot, revision, host, epoch, now)
        return False

    def refused(self, action: Action, revision: int, host: str | None, epoch: int,
                now: float) -> bool:
        """Our write was refused, and the key, read from the stream's leader, holds
        ``revision``, ``host``, ``epoch``. When that is this host's own value and the slot is
        held, no other host wrote since our last write that landed: the slot is still ours,
        until the deadline of the last write known to have succeeded (sent no later than the
        one the key holds, so no host can count the lease expired sooner), and the next
        renewal goes from ``revision``. True then; else it is :meth:`failed` and the key as
        read is observed. Two ways to get here, both seen, both restarted the slot's object
        process for nothing when the refusal dropped the slot:

        - a renewal whose answer timed out landed all the same, unseen by the watch (the key
          holds a later revision than ours);
        - a revision that was not the leader's: after NATS nodes were SIGKILLed, a host's
          watch delivered each write 3 revisions above the leader's number for it
          (nats-server 2.9.10), and every renewal from the watch's number was refused (the
          key holds an earlier revision than ours). cluster.py now takes revisions only from
          the leader; a leader that lost writes in a failover can still answer lower."""
        if (action.host == self.host and host == self.host and epoch == action.epoch
                and action.slot in self._held):
            self._pending.discard(action.slot)
            self._refused.add(action.slot)  # (the leader's revision, though it may be lower)
            self.observe(action.slot, revision, host, epoch, now)
            return True
        self.failed(action)
        self.observe(action.slot, revision, host, epoch, now)
        return False

    def revision(self, slot: int) -> int:
        """The revision of ``slot``'s key last seen (0: none, or the key does not exist)."""
        seen = self._seen.get(slot)
        return 0 if seen is None else seen.revision

    # -- what the host does --------------------------------------------------------------
    def serving(self, slot: int, now: float) -> bool:
        """Whether this host may serve ``slot`` at ``now`` (its own clock)."""
        sent = self._held.get(slot)
        return sent is not None and now < sent + self.lease - self.margin

    def _most_loaded(self, now: float, hosts: int, count: int) -> bool:
        """Whether this host should give one slot back although it is within the fair share:
        it holds at least two more than the least loaded live host (a host that joined holds
        none: 4 slots on 2 hosts are 2 + 2, and a third host would get none by the ceiling
        alone), and it is the most loaded (ties: the greatest name), so that one host at a
        time gives back. Never while a slot is free or lapsed: the others take that one
        first (giving one back then only made this host take it again, over and over)."""
        counts: dict[str, int] = {}
        for slot in range(self.slots):
            seen = self._seen.get(slot)
            if seen is None or seen.host is None:
                return False
            if seen.host == self.host:
                continue
            if now - seen.since >= self.lease:
                return False
            counts[seen.host] = counts.get(seen.host, 0) + 1
        counts[self.host] = count
        least = 0 if len(counts) < hosts else min(counts.values())
        top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return count >= least + 2 and top == self.host

    def deadline(self, slot: int) -> float | None:
        """Until when (this host's clock) it may serve ``slot``, if it holds it."""
        sent = self._held.get(slot)
        return None if sent is None else sent + self.lease - self.margin

    def held(self) -> list[tuple[int, int, int]]:
        """``(slot, revision, epoch)`` of each slot this host holds (to give them back)."""
        return [(s, self._seen[s].revision, self._seen[s].epoch) for s in sorted(self._held)
                if s in self._seen]

    def drop(self, slot: int) -> None:
        """Stop serving ``slot`` at once (it is being given back)."""
        self._held.pop(slot, None)

    def owned(self, now: float) -> list[int]:
        return [s for s in range(self.slots) if self.serving(s, now)]

    def plan(self, now: float, hosts: int) -> list[Action]:
        """The writes to send now (mark them sent by sending them): renew what is ours when a
        third of the lease has passed, claim free or expired slots up to a fair share of the
        slots among ``hosts`` live hosts, and give back what is over it."""
        share = math.ceil(self.slots / max(1, hosts))
        actions: list[Action] = []
        for slot in [s for s in self._held if not self.serving(s, now)]:
            del self._held[slot]  # lapsed (this host was stopped): claimed again below
        mine = list(self._held)
        over = len(mine) > share or self._most_loaded(now, hosts, len(mine))
        for slot in sorted(mine):
            if slot in self._pending:
                continue
            seen = self._seen[slot]
            if over and slot == max(mine):
                # Given back: this host stops serving it now, before anyone can see it free.
                actions.append(Action("update", slot, seen.revision, None, seen.epoch))
                mine.remove(slot)
                del self._held[slot]
                self._given[slot] = now
            elif now - self._held[slot] >= self.lease / 3:
                actions.append(Action("update", slot, seen.revision, self.host, seen.epoch))
        room = share - len(mine)
        for slot in range(self.slots):
            if room <= 0:
                break
            if slot in self._held or slot in self._pending:
                continue
            if now - self._given.get(slot, -math.inf) < self.lease:
                continue  # given back: the others' turn (else this host took it back at once,
                # again and again, restarting its object process each time: a chaos run)
            seen = self._seen.get(slot)
            if seen is None:
                continue  # not read yet
            if seen.revision == 0:
                actions.append(Action("create", slot, 0, self.host, 1))
            elif seen.host == self.host:  # ours as last seen (lapsed, or a write whose
                # outcome was unknown): from that revision, so it fails if anyone wrote since
                actions.append(Action("update", slot, seen.revision, self.host, seen.epoch))
            elif seen.host is None or now - seen.since >= self.lease:
                actions.append(Action("update", slot, seen.revision, self.host, seen.epoch + 1))
            else:
                continue
            room -= 1
        for a in actions:
            self._pending.add(a.slot)
        return actions
