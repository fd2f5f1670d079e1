"""durable.testing.Runtime: users' classes in-process, with the daemon's semantics (#16)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import pytest

import durable
from durable.examples.chat import ChatRoom
from durable.examples.counter import Counter
from durable.examples.session import Session
from durable.testing import Runtime
from tests.testing.objects import Account, Flaky, Greeter

CLASSES = {"COUNTER": Counter, "ACCOUNT": Account, "FLAKY": Flaky, "GREETER": Greeter,
           "SESSION": Session, "CHAT": ChatRoom}


@pytest.fixture(params=["memory", pytest.param("disk", marks=pytest.mark.slow)])
async def rt(request):
    async with Runtime(CLASSES, storage=request.param) as runtime:
        yield runtime


async def test_methods_fetch_and_what_was_stored(rt):
    c = rt.namespace("COUNTER").get_by_name("a")
    assert [await c.increment(), await c.increment(by=4)] == [1, 5]
    resp = await c.fetch("http://do/inc", method="POST")
    assert (resp.status, await resp.text()) == (200, "6")
    assert dict(await rt.storage_of(c)) == {"n": 6}
    assert [oid.name for oid in rt.list_objects("COUNTER")] == ["a"]
    assert await rt.run_in_object(c, lambda inst, state: (type(inst).__name__, str(state.id))) \
        == ("Counter", str(c.id))


async def test_the_daemons_errors(rt):
    acct = rt.namespace("ACCOUNT").get_by_name("e")
    with pytest.raises(durable.ObjectError) as e:  # the object's own error, as a caller sees it
        await acct.deposit(-5)
    assert isinstance(e.value, ValueError) and e.value.remote_type == "ValueError"
    with pytest.raises(AttributeError):
        await acct.no_such_method()
    with pytest.raises(TypeError):  # not a value that can be sent: fails before it leaves
        await acct.deposit(object())
    with pytest.raises(durable.ObjectError) as e:  # an id may be sent, not stored
        await acct.stash(acct.id)
    assert isinstance(e.value, TypeError)
    with pytest.raises(durable.UnknownNamespaceError):
        rt.namespace("NOPE")


async def test_transactions_and_e_order(rt):
    acct = rt.namespace("ACCOUNT").get_by_name("t")
    results = await asyncio.gather(*[acct.deposit(1) for _ in range(50)])
    assert results == list(range(1, 51))  # in the order sent
    assert await acct.transfer_out(20) == 30
    with pytest.raises(durable.ObjectError, match="insufficient"):
        await acct.transfer_out(100)
    assert dict(await rt.storage_of(acct)) == {"balance": 30, "last": 20}  # rolled back


async def test_eviction_keeps_storage_and_drops_the_instance(rt):
    acct = rt.namespace("ACCOUNT").get_by_name("v")
    await acct.deposit(10)
    await acct.remember("in memory")
    assert await rt.evict(acct) is True
    assert rt.active == []
    assert await acct.recall() is None  # a new instance
    assert (await rt.storage_of(acct))["balance"] == 10
    assert await rt.evict_all() == 1


async def test_a_drain_just_after_a_call_ended_lets_the_loop_turn(rt, monkeypatch):
    """A call's task leaves its activation in a done callback, a loop turn after it ends. From
    Python 3.12, ``gather`` of tasks that are all done returns without yielding, and ``drain``
    gathered them again and again: a busy loop that hung this file on 3.13 (a daemon's
    shutdown drains the same way). Here ``gather`` is made eager as there (this suite runs on
    3.11 too), with a count that fails the test where the loop would spin."""
    acct = rt.namespace("ACCOUNT").get_by_name("drained")
    await acct.deposit(1)
    act = rt._proc.catalog[("ACCOUNT", str(acct.id))]

    async def ended() -> None:
        return None

    task = act._own(ended())
    await asyncio.sleep(0)  # the task ran and ended in that turn; its done callback is next
    assert task.done() and act._tasks == {task}

    real, calls = asyncio.gather, 0

    def eager_gather(*aws, return_exceptions=False):
        nonlocal calls
        calls += 1
        assert calls < 100, "drain() spun: gather() of done tasks never let the loop turn"
        if return_exceptions and all(isinstance(a, asyncio.Future) and a.done() for a in aws):
            done = asyncio.get_running_loop().create_future()
            done.set_result([a.exception() or a.result() for a in aws])
            return done
        return real(*aws, return_exceptions=return_exceptions)

    monkeypatch.setattr(asyncio, "gather", eager_gather)
    await act.drain()  # (directly: on 3.11, wait_for's own task would let the callback run first)
    monkeypatch.setattr(asyncio, "gather", real)
    assert not act._tasks and not act.busy
    assert await acct.deposit(1) == 2  # the object still serves


async def test_an_object_calling_another(rt):
    resp = await rt.fetch("http://x/GREETER/g1/")  # routed by path, as the gateway does
    assert await resp.text() == "hello, balance 1"
    greeter = rt.namespace("GREETER").get_by_name("g1")
    assert (await rt.storage_of(greeter))["greeted"] is True


async def test_alarms_run_on_the_fake_clock(rt):
    s = rt.namespace("SESSION").get_by_name("s1")
    await s.touch({"user": "ann"}, ttl=30)
    assert await rt.advance(29) == 0
    assert await s.get() is not None
    assert await rt.advance(2) == 1  # due at 30 s: it ran, and the session is gone
    assert await s.get() is None and await s.expires_at() is None


async def test_alarm_retries_back_off_on_the_fake_clock(rt):
    f = rt.namespace("FLAKY").get_by_name("f")
    await f.arm(rt.clock.now_ms + 1000, fails=2)
    await rt.advance(1)
    assert await f.runs() == [0]
    await rt.advance(1.9)  # first retry 2 s after the failure
    assert await f.runs() == [0]
    await rt.advance(0.2)
    assert await f.runs() == [0, 1]
    await rt.advance(4)  # then 4 s
    assert await f.runs() == [0, 1, 2]
    assert await rt.advance(3600) == 0  # it worked: the alarm is gone


async def test_run_alarm_runs_it_now_and_raises_its_error(rt):
    f = rt.namespace("FLAKY").get_by_name("g")
    with pytest.raises(LookupError):
        await rt.run_alarm(f)
    await f.arm(rt.clock.now_ms + 3_600_000, fails=1)
    with pytest.raises(durable.ObjectError, match="failing run 1"):
        await rt.run_alarm(f)
    await rt.run_alarm(f)
    assert await f.runs() == [0, 0]


async def test_websockets_with_hibernation(rt):
    room = rt.namespace("CHAT").get_by_name("lobby")
    async with room.websocket("/?name=ann") as ann, room.websocket("/?name=bob") as bob:
        for ws, n in ((ann, 3), (bob, 2)):  # history, joins
            [await ws.receive(timeout=2) for _ in range(n)]
        assert await rt.evict(room) is True  # hibernated: the sockets stay open
        await ann.send("hi bob")  # wakes the room: a new instance, the same sockets
        msg = await bob.receive(timeout=2)
        assert '"name":"ann"' in msg and '"text":"hi bob"' in msg


def test_no_threads_or_tasks_left_behind():
    before = threading.active_count()

    async def main():
        async with Runtime(CLASSES) as r:
            c = r.namespace("COUNTER").get_by_name("x")
            await c.increment()
            await r.namespace("ACCOUNT").get_by_name("y").write_later(10)  # a long task
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(main()) == []
    assert threading.active_count() == before


async def test_a_crash_keeps_answered_writes_and_loses_the_rest():
    async with Runtime(CLASSES) as rt:
        acct = rt.namespace("ACCOUNT").get_by_name("c")
        await acct.deposit(7)  # answered: durable
        await acct.write_later(0.05)  # its task would write later
        room = rt.namespace("CHAT").get_by_name("r")
        ws = await room.websocket("/?name=ann")
        await rt.crash()
        with pytest.raises(durable.StubBrokenError):
            await acct.deposit(1)
        assert ws.closed and ws.close_code == 1012
        acct = rt.namespace("ACCOUNT").get_by_name("c")
        await asyncio.sleep(0.1)
        assert dict(await rt.storage_of(acct)) == {"balance": 7}  # no "later": its task died
        assert await acct.deposit(1) == 8


async def test_the_worker_fronts_fetch():
    from durable.examples.ratelimit import RateLimiter

    async with Runtime({"COUNTER": Counter, "CHAT": ChatRoom, "RATELIMIT": RateLimiter},
                       worker="durable.examples.worker:fetch") as rt:
        assert await (await rt.fetch("http://x/counter/w", method="POST")).text() == "1"
        page = await rt.fetch("http://x/chat/room")
        assert page.headers.get("content-type").startswith("text/html")


async def test_the_plugin_fixture(durable_runtime):
    rt = await durable_runtime({"COUNTER": Counter})
    assert await rt.namespace("COUNTER").get_by_name("p").increment() == 1


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least one namespace"):
        Runtime({})
    with pytest.raises(ValueError, match="memory"):
        Runtime({"C": Counter}, storage="cloud")
    with pytest.raises(ValueError, match="cannot import"):
        Runtime({"C": "nowhere.module:Thing"})
    with pytest.raises(RuntimeError, match="async with"):
        Runtime({"C": Counter}).namespace("C")


async def test_alarm_times_in_the_past_fire_at_the_next_advance(rt):
    s = rt.namespace("SESSION").get_by_name("past")
    await s.touch(ttl=-10)
    assert await rt.advance(0) == 1
    assert await s.get() is None
    assert dt.datetime.fromtimestamp(rt.clock.now, dt.UTC).year >= 2026


async def test_a_path_whose_second_segment_is_id_names_an_object_by_id(rt):
    """``/NS/id/<id>/...`` is the by-id form: a segment after it that is not an id is refused
    with the way to reach an object named "id" (as the gateway answers, 400)."""
    with pytest.raises(durable.InvalidIdError, match=r'named "id" is reached at /GREETER/id/<its id>'):
        await rt.fetch("http://x/GREETER/id/g1/")
    oid = rt.namespace("GREETER").id_from_name("id")
    assert await (await rt.fetch(f"http://x/GREETER/id/{oid}/")).text() == "hello, balance 1"


class _Quiet(durable.DurableObject):
    async def hello(self) -> str | None:
        return self.state.id.name


@pytest.mark.parametrize("storage", ["memory", pytest.param("disk", marks=pytest.mark.slow)])
async def test_a_new_objects_name_rides_in_its_first_write_and_is_stored_without_one(storage):
    """A new object's name is not a record of its own when the call writes: it goes in the
    call's write set (one record, not two: ~10% of a new object's CPU). A call
    that writes nothing still stores the name, within moments, in a record of its own."""
    from durable.objectproc.loop import name_key

    async with Runtime({"COUNTER": Counter, "QUIET": _Quiet}, storage=storage) as rt:
        store = rt._proc.store

        def seq() -> int:
            return store._seq if storage == "memory" else store.log.last_seq

        before = seq()
        c = rt.namespace("COUNTER").get_by_name("fresh")
        assert await c.increment() == 1
        assert seq() - before == 1  # its write, with its name
        q = rt.namespace("QUIET").get_by_name("still")
        assert await q.hello() == "still"
        await asyncio.sleep(0.1)  # (a name without a write: stored ~20 ms after)
        assert seq() - before == 2
        if storage != "memory":  # (and made durable: its timer kicked the log's writer)
            assert store.log.durable_seq == seq()
        for ns, stub in (("COUNTER", c), ("QUIET", q)):
            assert store.read(name_key(ns, str(stub.id)), "name") is not None, ns
        assert await c.increment() == 2
        assert seq() - before == 3  # (a stored name is not written again)
        assert await rt.evict_all() == 2
        if storage == "memory":
            await rt.crash()  # (what was not durable is lost: the names were)
        for ns, stub, name in (("COUNTER", c, "fresh"), ("QUIET", q, "still")):
            space = rt.namespace(ns)
            by_id = space.get(space.id_from_string(str(stub.id)))  # (no name travels with it)
            assert await rt.run_in_object(by_id, lambda inst, state: state.id.name) == name


async def test_a_name_learnt_without_a_write_and_evicted_before_its_timer_is_durable():
    """Eviction logs a name its timer has not logged yet, and kicks the log for it (the timer
    then finds nothing to log, and kicks only for names it logged)."""
    from durable.objectproc.loop import name_key

    async with Runtime({"QUIET": _Quiet}, storage="disk") as rt:
        store = rt._proc.store
        q = rt.namespace("QUIET").get_by_name("brief")
        assert await q.hello() == "brief"
        before = store.log.last_seq
        assert await rt.evict_all() == 1  # (within the name timer's 20 ms)
        assert store.log.last_seq == before + 1  # (its name, logged at eviction)
        await asyncio.sleep(0.1)
        assert store.log.durable_seq == store.log.last_seq, "the evicted object's name waited"
        assert store.read(name_key("QUIET", str(q.id)), "name") is not None


async def test_an_idle_object_is_a_handful_of_tracked_containers():
    """What each live object costs the garbage collector (and memory): its instance, the
    activation, its storage, state, id and the slot's weak reference to the storage. The
    queues, task sets and error log it rarely uses are made on first use (each empty deque is
    760 bytes; 10 containers and 5.0 KB an object before, docs/messaging.md)."""
    import gc

    async with Runtime({"COUNTER": Counter}) as rt:
        ns = rt.namespace("COUNTER")
        await ns.get_by_name("warm").increment()
        gc.collect()
        before = len(gc.get_objects())
        for i in range(300):
            assert await ns.get_by_name(f"o{i}").increment() == 1
        await asyncio.sleep(0)
        gc.collect()
        per_object = (len(gc.get_objects()) - before) / 300
        assert per_object <= 6.5, f"{per_object:.2f} tracked containers per idle object"
        # (an idle object's task set is made again by its next calls, two at once here)
        again = ns.get_by_name("o1")
        assert sorted(await asyncio.gather(again.increment(), again.increment())) == [2, 3]


async def test_a_constructor_of_the_objects_own_runs_in_its_context_and_only_that_one():
    """Tasks a constructor starts belong to the activation (eviction waits for them); a class
    whose construction runs no code of its own skips setting that context up (per class, read
    once), and one with an ``alarm`` handler is known to have it."""
    from durable.objectproc.activation import _class_facts
    release = asyncio.Event()

    class Starts(durable.DurableObject):
        def __init__(self, state, env):
            super().__init__(state, env)
            self.task = asyncio.create_task(release.wait())

        async def ping(self) -> str:
            return "pong"

    class Alarmed(durable.DurableObject):
        async def alarm(self, info) -> None:
            pass

    class Guarded(durable.DurableObject):
        def __setattr__(self, k, v):
            object.__setattr__(self, k, v)

    class Described(durable.DurableObject):
        @property
        def env(self):
            return self._env

        @env.setter
        def env(self, value):  # (code of the object's own, run by the constructor)
            self._env = value

    assert _class_facts(Described) == (False, False)
    assert _class_facts(Counter) == (False, True)
    assert _class_facts(Alarmed) == (True, True)
    assert _class_facts(Starts) == (False, False) and _class_facts(Guarded) == (False, False)
    async with Runtime({"STARTS": Starts, "COUNTER": Counter}) as rt:
        stub = rt.namespace("STARTS").get_by_name("a")
        assert await stub.ping() == "pong"
        act = rt._proc.catalog[("STARTS", str(stub.id))]
        assert act.owned == {act.instance.task}
        counter = rt.namespace("COUNTER").get_by_name("c")
        assert await counter.increment() == 1
        assert not rt._proc.catalog[("COUNTER", str(counter.id))].owned
        release.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not act.owned
