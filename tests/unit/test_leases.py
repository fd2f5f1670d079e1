"""supervisor/leases.py in a simulated cluster: hosts whose clocks run at different rates,
a bucket that accepts a write only from the current revision, messages delayed at random
(answers lost: the write landed or not, which the writer then reads the key for, as
cluster.py does; that read fails one time in ten), a watch that drops an update in ten and whose news
of a change the host reads from the bucket (as cluster.py does; hosts also read every key
once a lease), hosts paused (SIGSTOP) for longer than a lease. At no moment do two hosts serve one slot,
and once nothing is paused every slot is served again."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable.supervisor.leases import Action, Leases
from tests.budget import examples

LEASE = 5.0


class Sim:
    def __init__(self, hosts: int, slots: int, rates: list[float], latency: float,
                 pauses: list[tuple[int, float, float]], seed: int) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.rates = rates
        self.pauses = pauses
        #: slot -> (revision, host, epoch, the write's mark)
        self.kv: dict[int, tuple[int, str | None, int, int | None]] = {}
        self.revision = itertools.count(1)
        self.events: list = []
        self.order = itertools.count()
        self.t = 0.0
        self.hosts = [Leases(f"h{i}", slots, lease=LEASE) for i in range(hosts)]
        for i, h in enumerate(self.hosts):
            for slot in range(slots):
                h.observe(slot, 0, None, 0, self.local(i))
            self.at(self.rng.uniform(0, 0.25), i, self.tick)
            self.at(self.rng.uniform(0, LEASE), i, self.resync)

    def local(self, i: int) -> float:
        return 1000.0 * i + self.t * self.rates[i]  # offsets differ too: they must not matter

    def paused_until(self, i: int) -> float | None:
        for host, start, end in self.pauses:
            if host == i and start <= self.t < end:
                return end
        return None

    def at(self, when: float, i: int, fn, *args) -> None:
        heapq.heappush(self.events, (when, next(self.order), i, fn, args))

    def delay(self) -> float:
        return self.rng.uniform(0, self.latency)

    def tick(self, i: int) -> None:
        for a in self.hosts[i].plan(self.local(i), len(self.hosts)):
            self.at(self.t + self.delay(), i, self.arrive, a, self.local(i))
        self.at(self.t + 0.25, i, self.tick)

    def resync(self, i: int) -> None:  # every key read again, once a lease (cluster.py)
        for slot in range(self.hosts[i].slots):
            self.at(self.t + self.delay(), i, self.read, slot, self.observer(i))
        self.at(self.t + LEASE, i, self.resync)

    def observer(self, i: int):
        return lambda slot, rev, host, epoch, _write, now: self.hosts[i].observe(
            slot, rev, host, epoch, now)

    def read(self, i: int, slot: int, then) -> None:  # at the bucket: the key as it is now
        self.at(self.t + self.delay(), i, self.deliver, then, slot,
                *self.kv.get(slot, (0, None, 0, None)))

    def deliver(self, i: int, then, slot: int, *value) -> None:
        then(slot, *value, self.local(i))

    def arrive(self, i: int, a: Action, sent: float) -> None:  # at the bucket (never paused)
        current = self.kv.get(a.slot, (0, None, 0, None))
        if current[0] != a.revision:  # refused (and that answer may be lost too)
            lost = self.rng.random() < 0.1
            self.at(self.t + self.delay(), i, self.answer, a, sent, "lost" if lost else None)
            return
        rev = next(self.revision)
        self.kv[a.slot] = (rev, a.host, a.epoch, a.write)
        for j in range(len(self.hosts)):  # (nats-py's watch drops an update now and then)
            if self.rng.random() >= 0.1:  # the watch says the key changed; the host reads it
                self.at(self.t + self.delay(), j, self.read, a.slot, self.observer(j))
        # one answer in ten is lost: the writer hears a timeout, its write applied or not
        lost = self.rng.random() < 0.1
        self.at(self.t + self.delay(), i, self.answer, a, sent, "lost" if lost else rev)

    def answer(self, i: int, a: Action, sent: float, rev: int | str | None) -> None:
        if rev is None:  # refused: the key is read (cluster.py's _refused)
            self.at(self.t + self.delay(), i, self.read, a.slot,
                    lambda slot, rev, host, epoch, _write, now: self.hosts[i].refused(
                        a, rev, host, epoch, now))
        elif rev == "lost":  # timed out: the key is read (cluster.py's _unknown), or that fails
            if self.rng.random() < 0.1:
                self.hosts[i].failed(a, unknown=True)
            else:
                self.at(self.t + self.delay(), i, self.read, a.slot,
                        lambda slot, *value: self.hosts[i].landed(a, sent, *value))
        else:
            self.hosts[i].succeeded(a, rev, sent)

    def serving(self, slot: int) -> list[int]:
        return [i for i, h in enumerate(self.hosts) if h.serving(slot, self.local(i))]

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            when, _, i, fn, args = heapq.heappop(self.events)
            self.t = when
            for slot in range(self.hosts[0].slots):  # (before and after every event)
                assert len(self.serving(slot)) <= 1, (self.t, slot, self.serving(slot))
            end = self.paused_until(i) if fn is not self.arrive else None
            if end is not None:  # a stopped host handles nothing until it is continued
                self.at(end, i, fn, *args)
                continue
            fn(i, *args)
            for slot in range(self.hosts[0].slots):
                assert len(self.serving(slot)) <= 1, (self.t, slot, self.serving(slot))


@settings(max_examples=examples(150), deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_no_two_hosts_serve_a_slot_and_every_slot_is_served_again(hosts, slots, data):
    rates = [data.draw(st.floats(0.96, 1.04)) for _ in range(hosts)]  # (a 10% margin)
    latency = data.draw(st.floats(0.001, 0.5))
    pauses = data.draw(st.lists(st.tuples(st.integers(0, hosts - 1), st.floats(0, 30),
                                          st.floats(0.1, 12)), max_size=4))
    pauses = [(h, start, start + length) for h, start, length in pauses]
    sim = Sim(hosts, slots, rates, latency, pauses, data.draw(st.integers(0, 2**32)))
    sim.run(60.0)  # pauses end by 42 s; then every slot is served by exactly one host
    share = -(-slots // hosts)
    served = {slot: 0 for slot in range(slots)}
    settled = []  # samples at which every slot is served
    for k in range(21):  # (lost answers make short gaps: a claim whose answer was lost is
        sim.run(60.0 + k * 0.5)  # made again from the revision the watch shows)
        counts = [len(h.owned(sim.local(i))) for i, h in enumerate(sim.hosts)]
        everything = True
        for slot in range(slots):
            if len(sim.serving(slot)) == 1:
                served[slot] += 1
            else:
                everything = False
        if everything:
            settled.append(counts)
    assert all(n >= 15 for n in served.values()), (served, sim.kv)
    assert settled, "never every slot served at once"
    counts = settled[-1]
    assert all(c <= share for c in counts)
    assert max(counts) - min(counts) <= 1, counts  # a host that joined (or came back) got its part


def test_a_joining_host_gets_slots_although_the_others_are_within_the_ceiling():
    a, b = Leases("a", 4, lease=3.0), Leases("b", 4, lease=3.0)
    for s in range(4):
        a.observe(s, s + 1, "a" if s < 2 else "b", 1, 0.0)
        b.observe(s, s + 1, "a" if s < 2 else "b", 1, 0.0)
    for s in range(2):
        a.succeeded(Action("update", s, s + 1, "a", 1), s + 1, 0.0)
        b.succeeded(Action("update", s + 2, s + 3, "b", 1), s + 3, 0.0)
    # A third host is live: 2 + 2 + 0. Only the most loaded (ties: the greatest name) gives back.
    assert [x for x in a.plan(0.1, 3) if x.host is None] == []
    [back] = [x for x in b.plan(0.1, 3) if x.host is None]
    assert back.slot == 3 and not b.serving(3, 0.1)


def test_a_host_with_free_slots_around_does_not_give_one_back():
    """Giving back is for a host that joined while every slot was held; with slots free, the
    others can take those. (CI saw a host give a slot back and take it again every few
    seconds for minutes, restarting its object process each time.)"""
    a = Leases("a", 4, lease=3.0)
    for s in range(4):
        a.observe(s, s + 1, "a" if s < 2 else None, 1, 0.0)
    for s in range(2):
        a.succeeded(Action("update", s, s + 1, "a", 1), s + 1, 0.0)
    assert [x for x in a.plan(0.1, 3) if x.host is None] == []  # 3 live hosts, 2 slots free
    assert a.owned(0.2) == [0, 1]


def test_a_slot_given_back_is_left_to_the_others_for_a_lease():
    """The giver sees its slot free before anyone else does; taking it again at once made a
    host give back and take the same slot for minutes (a 10-minute chaos run)."""
    b = Leases("b", 4, lease=3.0)
    for s in range(4):
        b.observe(s, s + 1, "a" if s < 2 else "b", 1, 0.0)
    for s in (2, 3):
        b.succeeded(Action("update", s, s + 1, "b", 1), s + 1, 0.0)
    [back] = [x for x in b.plan(0.1, 3) if x.host is None]  # a third host joined with none
    assert back.slot == 3
    b.succeeded(back, 10, 0.1)
    rev = 100
    for step in range(1, 33):  # a renews its two slots; b renews slot 2; nobody takes slot 3
        now = 0.1 + step * 0.1
        for s in (0, 1):
            rev += 1
            b.observe(s, rev, "a", 1, now)
        actions = b.plan(now, 3)
        for x in actions:
            if x.slot == 2:
                rev += 1
                b.succeeded(x, rev, now)
        claims = [x for x in actions if x.slot == 3]
        if now < 3.1 - 1e-9:
            assert claims == [], now  # the joining host's turn
        else:
            assert [(x.host, x.revision) for x in claims] == [("b", 10)]  # anyone's now
            break
    else:
        raise AssertionError("slot 3 was never claimable again")


def test_a_bucket_that_went_back_a_revision_is_believed_after_a_refused_write():
    """A JetStream whose nodes were SIGKILLed can come back without a write it acknowledged
    (nats-server 2.9, seen in CI: slot 2 stood free at revision 743 while a host had seen its
    own claim at a later revision). The host's writes from that revision are refused; the
    key read after a refusal is the truth, though its revision is lower. (Before, the host
    took it for a late view and the slot stood free for good.)"""
    a = Leases("a", 1, lease=3.0)
    a.observe(0, 0, None, 0, 0.0)
    [claim] = a.plan(0.0, 1)
    a.succeeded(claim, 760, 0.0)
    [renew] = a.plan(1.0, 1)
    assert renew == Action("update", 0, 760, "a", 1)
    a.failed(renew)  # the bucket holds revision 743 ("wrong last sequence")
    a.observe(0, 743, None, 1, 1.1)  # read again after the refusal
    assert a.plan(1.2, 1) == [Action("update", 0, 743, "a", 2)]
    a.observe(0, 700, "b", 1, 1.3)  # but a late view, with no refusal since: ignored
    assert a._seen[0].revision == 743


def test_a_host_stops_serving_before_another_may_take_over():
    a, b = Leases("a", 1, lease=5.0), Leases("b", 1, lease=5.0)
    for h in (a, b):
        h.observe(0, 0, None, 0, 0.0)
    [claim] = a.plan(0.0, 2)
    assert claim == Action("create", 0, 0, "a", 1)
    assert b.plan(0.0, 2) == [Action("create", 0, 0, "b", 1)]  # both try: one wins
    a.succeeded(claim, 7, sent=0.0)
    b.observe(0, 7, "a", 1, 0.1)
    b.failed(Action("create", 0, 0, "b", 1))
    assert a.serving(0, 4.4) and not a.serving(0, 4.5)  # lease - margin after sending
    assert b.plan(5.0, 2) == []  # b saw revision 7 at 0.1: not expired until 5.1
    [take] = b.plan(5.1, 2)
    assert take == Action("update", 0, 7, "b", 2)  # a new epoch, from the revision seen
    b.succeeded(take, 9, sent=5.1)
    assert b.serving(0, 5.2)
    a.observe(0, 9, "b", 2, 5.3)
    assert not a.serving(0, 1.0) and a.plan(5.3, 2) == []


def test_an_owner_renews_and_gives_back_what_is_over_its_share():
    a = Leases("a", 4, lease=3.0)
    for s in range(4):
        a.observe(s, 0, None, 0, 0.0)
    claims = a.plan(0.0, 1)
    assert [c.slot for c in claims] == [0, 1, 2, 3]
    for rev, c in enumerate(claims, 1):
        a.succeeded(c, rev, 0.0)
    assert a.plan(0.5, 1) == []  # renewals wait a third of the lease
    renew = a.plan(1.0, 1)
    assert [(r.slot, r.revision, r.host) for r in renew] == [(s, s + 1, "a") for s in range(4)]
    for rev, r in enumerate(renew, 10):
        a.succeeded(r, rev, 1.0)
    [back] = a.plan(1.1, 2)[:1]  # a second host joined: 2 each; one given back per plan
    assert (back.slot, back.host) == (3, None)
    a.succeeded(back, 20, 1.1)
    assert a.owned(1.2) == [0, 1, 2]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="slots"):
        Leases("a", 0)
    with pytest.raises(ValueError, match="margin"):
        Leases("a", 2, lease=1.0, margin=0.6)


def test_a_renewal_that_landed_unseen_keeps_the_slot_when_the_next_is_refused():
    """A renewal whose answer timed out can land all the same, and the watch can miss it
    (nats-py drops an update now and then). The next renewal, from the revision before, is
    refused; the key read then is this host's own value at a later revision: the slot is
    still ours. (Before, the refusal dropped it: the slot's object process was stopped and
    started again at once, for nothing.)"""
    a = Leases("a", 1, lease=3.0)
    a.observe(0, 0, None, 0, 0.0)
    [claim] = a.plan(0.0, 1)
    a.succeeded(claim, 5, 0.0)
    [renew] = a.plan(1.0, 1)
    a.failed(renew, unknown=True)  # timed out; it made revision 6, unseen
    assert a.serving(0, 2.0)
    [again] = a.plan(2.0, 1)
    assert again == Action("update", 0, 5, "a", 1)
    assert a.refused(again, 6, "a", 1, 2.1)  # "wrong last sequence"; the key reads 6, ours
    assert a.serving(0, 2.5) and not a.serving(0, 3.0)  # the deadline of the write known
    assert a.plan(2.2, 1) == [Action("update", 0, 6, "a", 1)]  # renewed from 6

    b = Leases("b", 1, lease=3.0)  # but another host's value, or a new epoch: not ours
    b.observe(0, 0, None, 0, 0.0)
    [claim] = b.plan(0.0, 1)
    b.succeeded(claim, 5, 0.0)
    [renew] = b.plan(1.0, 1)
    assert not b.refused(renew, 6, "c", 2, 1.1)
    assert not b.serving(0, 1.2) and b.plan(1.2, 1) == []



def test_a_renewal_whose_answer_was_lost_is_confirmed_by_its_mark_in_the_key():
    """A renewal timed out; the key read from the leader then holds this write's own mark:
    it landed, and the lease runs from its sending. (Before, the slot was served only until
    the deadline of the last write whose answer came, and lapsed when a few answers in a row
    were lost: the lease simulation found a slot unserved for 4 s.)"""
    a = Leases("a", 1, lease=3.0)
    a.observe(0, 0, None, 0, 0.0)
    [claim] = a.plan(0.0, 1)
    a.succeeded(claim, 5, 0.0)
    [renew] = a.plan(1.0, 1)
    assert a.plan(1.1, 1) == []  # (one write at a time: none while the key is read)
    assert a.landed(renew, 1.0, 6, "a", 1, renew.write, 1.2)
    assert a.serving(0, 3.5) and not a.serving(0, 3.7)  # 1.0 + lease - margin
    assert a.plan(2.0, 1) == [Action("update", 0, 6, "a", 1)]


def test_an_earlier_write_with_the_same_host_and_epoch_confirms_nothing():
    """Two renewals in a row lost their answers: the first landed (unseen), the second,
    from the revision before it, was refused. The key holds this host's value, but the
    first write's mark: the lease may run only from the first one's sending, never the
    second's (another host counts it from when it saw the first)."""
    a = Leases("a", 1, lease=3.0)
    a.observe(0, 0, None, 0, 0.0)
    [claim] = a.plan(0.0, 1)
    a.succeeded(claim, 5, 0.0)
    [first] = a.plan(1.0, 1)
    a.failed(first, unknown=True)  # (its read failed too: it made revision 6, unseen)
    [second] = a.plan(2.0, 1)
    assert second == Action("update", 0, 5, "a", 1) and second.write != first.write
    assert not a.landed(second, 2.0, 6, "a", 1, first.write, 2.1)
    assert a.serving(0, 2.6) and not a.serving(0, 2.8)  # the claim's deadline: 0.0 + 2.7
    assert a.plan(2.2, 1) == [Action("update", 0, 6, "a", 1)]  # from the revision read

    b = Leases("b", 1, lease=3.0)  # another host's value: not ours, and observed
    b.observe(0, 0, None, 0, 0.0)
    [claim] = b.plan(0.0, 1)
    b.succeeded(claim, 5, 0.0)
    [renew] = b.plan(1.0, 1)
    assert not b.landed(renew, 1.0, 7, "c", 2, 99, 1.1)
    assert not b.serving(0, 1.2) and b.revision(0) == 7
