"""Random operation sequences: the DuckDB engine must answer exactly as the model does."""

import asyncio
import datetime as dt
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from durable.errors import DurableError
from tests.fakes.storage import EngineBackend, ModelBackend

EXAMPLES = int(os.environ.get("DURABLE_STATEFUL_EXAMPLES", "60"))

# A small alphabet makes collisions, prefixes and ordering edge cases likely.
keys = st.text(alphabet=["", "a", "b", "\x00", "é", "😀", "\uffff", "Z"][1:], max_size=3)
values = st.one_of(st.integers(), st.text(max_size=4), st.tuples(st.integers(), st.booleans()),
                   st.lists(st.integers(), max_size=3), st.frozensets(st.integers(), max_size=2))
key_lists = st.lists(keys, max_size=6)
objects = st.sampled_from(["o1", "o2"])
list_opts = st.fixed_dictionaries({}, optional={
    "start": keys, "end": keys, "prefix": keys, "reverse": st.booleans(),
    "limit": st.integers(1, 5)})
#: alarm times: epoch ms (int or float), aware datetimes, and bad ones both sides refuse
alarm_times = st.one_of(
    st.integers(0, 2**41), st.floats(0, 2e12, allow_nan=False),
    st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                 timezones=st.just(dt.UTC)),
    st.sampled_from([-5, float("nan"), float("inf"), dt.datetime(2030, 1, 1), "soon", True,
                     10**14]),
)
txn_ops = st.lists(st.one_of(
    st.tuples(st.just("set_alarm"), alarm_times),
    st.tuples(st.just("delete_alarm")),
    st.tuples(st.just("get_alarm")),
    st.tuples(st.just("put"), keys, values),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("list"), list_opts),
    st.tuples(st.just("put_many"), st.dictionaries(keys, values, max_size=3)),
), max_size=6)
txn_endings = st.sampled_from(["commit", "rollback", "raise", "caught"])


class Boom(Exception):
    pass


async def run_txn(storage, ops, ending):
    trace = []

    async def fn(txn):
        for op in ops:
            if op[0] == "set_alarm":
                trace.append(await outcome(lambda op=op: txn.set_alarm(op[1])))
            elif op[0] == "delete_alarm":
                await txn.delete_alarm()
            elif op[0] == "get_alarm":
                trace.append(await txn.get_alarm())
            elif op[0] == "put":
                await txn.put(op[1], op[2])
            elif op[0] == "put_many":
                await txn.put(op[1])
            elif op[0] == "delete":
                trace.append(await txn.delete(op[1]))
            elif op[0] == "get":
                trace.append(await txn.get(op[1]))
            else:
                trace.append(await txn.list(**op[1]))
        if ending == "rollback":
            txn.rollback()
        elif ending == "raise":
            raise Boom()
        elif ending == "caught":
            try:
                await txn.put("x", object())
            except TypeError:
                trace.append("caught")
        return len(trace)

    try:
        result = await storage.transaction(fn)
    except Boom:
        result = "boom"
    return result, trace


async def outcome(call):
    """A call's result, or its error class (both backends must agree on which; a write raises
    at the call, a read when awaited)."""
    try:
        return ("ok", await call())
    except (DurableError, ValueError, TypeError) as e:
        return ("error", type(e).__name__)


@settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class EngineMatchesModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="durable-stateful-")
        # Small apply batches and segments so that applies and truncations happen mid-run.
        self.engine = EngineBackend(__import__("pathlib").Path(self.dir), segment_bytes=2048,
                                    apply_min_records=3, apply_max_delay=0.001)
        self.model = ModelBackend(None)
        self.run(self.engine.open())
        self.storages = {}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def both(self, obj, call):
        e = self.storages.setdefault(("e", obj), self.engine.object(obj))
        m = self.storages.setdefault(("m", obj), self.model.object(obj))
        got, want = self.run(outcome(lambda: call(e))), self.run(outcome(lambda: call(m)))
        assert got == want, f"engine {got!r} != model {want!r}"

    @rule(obj=objects, k=keys, v=values)
    def put(self, obj, k, v):
        self.both(obj, lambda s: s.put(k, v))

    @rule(obj=objects, entries=st.dictionaries(keys, values, max_size=5))
    def put_many(self, obj, entries):
        self.both(obj, lambda s: s.put(entries))

    @rule(obj=objects, k=keys)
    def get(self, obj, k):
        self.both(obj, lambda s: s.get(k))

    @rule(obj=objects, ks=key_lists)
    def get_many(self, obj, ks):
        self.both(obj, lambda s: s.get(ks))

    @rule(obj=objects, k=keys)
    def delete(self, obj, k):
        self.both(obj, lambda s: s.delete(k))

    @rule(obj=objects, ks=key_lists)
    def delete_many(self, obj, ks):
        self.both(obj, lambda s: s.delete(ks))

    @rule(obj=objects, opts=list_opts)
    def list(self, obj, opts):
        self.both(obj, lambda s: s.list(**opts))

    @rule(obj=objects)
    def delete_all(self, obj):
        self.both(obj, lambda s: s.delete_all())

    @rule(obj=objects, when=alarm_times)
    def set_alarm(self, obj, when):
        self.both(obj, lambda s: s.set_alarm(when))

    @rule(obj=objects)
    def delete_alarm(self, obj):
        self.both(obj, lambda s: s.delete_alarm())

    @rule(obj=objects)
    def get_alarm(self, obj):
        self.both(obj, lambda s: s.get_alarm())

    @rule(obj=objects, ops=txn_ops, ending=txn_endings)
    def transaction(self, obj, ops, ending):
        self.both(obj, lambda s: run_txn(s, ops, ending))

    @rule(obj=objects)
    def evict(self, obj):
        """Drop the activation (and its cache) once durable, as idle eviction does."""
        s = self.storages.pop(("e", obj), None)
        if s is not None:
            self.run(s.sync())
            assert s.evict()

    @precondition(lambda self: True)
    @rule()
    def reopen(self):
        for key in [k for k in self.storages if k[0] == "e"]:
            self.run(self.storages.pop(key).sync())
        self.run(self.engine.reopen())

    @invariant()
    def full_contents_match(self):
        for obj in ("o1", "o2"):
            self.both(obj, lambda s: s.list())
            self.both(obj, lambda s: s.get_alarm())

    def teardown(self):
        try:
            self.run(self.engine.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.slow
class TestEngineMatchesModel(EngineMatchesModel.TestCase):
    """The full run (DURABLE_STATEFUL_EXAMPLES, 60 by default)."""


class TestEngineMatchesModelQuick(EngineMatchesModel.TestCase):
    """A short run for the fast subset (``pytest -m "not slow"``)."""

    settings = settings(max_examples=8, stateful_step_count=30, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
