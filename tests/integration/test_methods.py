"""Method calls on stubs over the real daemon parts: order, errors, sync client, object to object."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal

import pytest

import durable
from durable.errors import ObjectError, StubBrokenError
from tests.integration.procs import async_wait_for
from tests.integration.test_messaging import slot_of


async def test_500_interleaved_fetch_and_method_calls_on_one_stub_keep_their_order(client):
    stub = client.namespace("ACCOUNT").get_by_name("order")
    calls = [stub.record(i) if i % 2 else stub.fetch(f"http://do/?n={i}", method="POST")
             for i in range(500)]  # sent in this order, none awaited yet
    results = await asyncio.gather(*calls)
    assert [r if isinstance(r, int) else int(await r.text()) for r in results] == list(range(500))
    assert await stub.log() == list(range(500))


async def test_values_cross_exactly_and_methods_may_be_plain_functions(client):
    stub = client.namespace("ACCOUNT").get_by_name("values")
    args = (1, (2, 3), {4, 5}, b"\x00", decimal.Decimal("1.50"), dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
    got_args, got_kwargs = await stub.echo(*args, when=dt.date(2026, 1, 1), ids=[stub.id])
    assert got_args == args and type(got_args[1]) is tuple and type(got_args[2]) is set
    assert got_kwargs == {"when": dt.date(2026, 1, 1), "ids": [stub.id]}
    assert await stub.noop() is None
    me = await stub.whoami()
    assert me == stub.id and me.name == "values"
    assert await stub.deposit(5, memo="first") == 5 and await stub.deposit(2) == 7


async def test_errors_arrive_with_their_type_and_writes_before_a_raise_are_kept(client):
    stub = client.namespace("ACCOUNT").get_by_name("errors")
    with pytest.raises(ValueError, match="refused x") as info:  # except ValueError works
        await stub.write_then_raise("x")
    assert isinstance(info.value, ObjectError) and info.value.type_name == "ValueError"
    assert await stub.get("before-raise") == "x"  # as for fetch: writes before the raise persist
    with pytest.raises(KeyError) as info:  # a user exception deriving from KeyError
        await stub.missing("k")
    assert info.value.type_name == "NotFound"
    with pytest.raises(ObjectError, match=r"ACCOUNT: Account has no method 'nope'.*deposit") as info:
        await stub.nope(1)
    assert isinstance(info.value, AttributeError)
    for private in ("_log", "fetch"):  # never callable: refused before anything is sent ...
        if private.startswith("_"):
            with pytest.raises(AttributeError):
                getattr(stub, private)
        else:  # ... or by the object process (fetch is the stub's own, with its own signature)
            assert callable(getattr(stub, private))
    with pytest.raises(TypeError, match="argument 0: type object cannot be sent"):
        await stub.deposit(object())
    with pytest.raises(TypeError) as info:  # a wrong call, found by the object's Python
        await stub.deposit()
    assert isinstance(info.value, ObjectError)
    assert await stub.deposit(1) == 1  # the stub stays usable after all of these


async def test_object_to_object_method_calls(client):
    ns = client.namespace("ACCOUNT")
    assert await ns.get_by_name("alice").deposit(100) == 100
    assert await ns.get_by_name("alice").transfer("bob", 30) == 30
    assert await ns.get_by_name("alice").get("balance") == 70
    assert await ns.get_by_name("bob").get("memo") == "from alice"


@pytest.mark.slow
async def test_sigkill_breaks_a_stub_for_methods_too(client, cluster):
    ns = client.namespace("ACCOUNT")
    stub = ns.get_by_name("victim")
    pid = await stub.pid()
    slot = slot_of(client, cluster, "ACCOUNT", "victim")
    assert cluster.workers[slot].pid == pid
    cluster.kill(cluster.workers[slot])
    cluster.start_worker(slot)
    with pytest.raises(StubBrokenError):
        for _ in range(100):  # until the broker sees the process gone
            await stub.deposit(1)
            await asyncio.sleep(0.05)
    with pytest.raises(StubBrokenError):  # and it stays broken, for fetch as well
        await stub.fetch("http://do/?n=1", method="POST")

    async def fresh():
        return await ns.get_by_name("victim").pid()

    assert await async_wait_for(fresh, 15, "a new stub to work", ignore=(StubBrokenError,)) != pid


def test_the_sync_client_calls_methods_and_blocks_for_their_value(cluster):
    with durable.connect_sync(cluster.frontend) as c:
        stub = c.namespace("ACCOUNT").get_by_name("sync")
        assert stub.deposit(3) == 3 and stub.deposit(4, memo="m") == 7
        assert stub.echo(1, (2,)) == ((1, (2,)), {})
        with pytest.raises(ValueError):
            stub.write_then_raise("y")
        with pytest.raises(TypeError, match="cannot be sent"):
            stub.deposit(object())
        assert stub.fetch("http://do/?n=9", method="POST").text() == "9"
        assert stub.log() == [9]


@pytest.mark.slow
def test_durable_call_with_a_method_prints_its_result_as_json(tmp_path):
    from tests.integration.daemon import serving
    from tests.integration.test_supervisor import FAST, _cli

    config = FAST + '[namespaces.ACCOUNT]\nclass = "tests.integration.objects:Account"\n'
    with serving(tmp_path, config) as d:
        d.wait_ready()
        args = ["--config", str(tmp_path / "durable.toml")]
        r = _cli(tmp_path, "call", *args, "ACCOUNT", "acct", "--method", "deposit", "--args", "[5]",
                 "--kwargs", '{"memo": "cli"}')
        assert (r.returncode, r.stdout.strip()) == (0, "5"), r.stderr
        r = _cli(tmp_path, "call", *args, "ACCOUNT", "acct", "--method", "echo", "--args", '[[1, 2], "x"]')
        assert r.returncode == 0 and __import__("json").loads(r.stdout) == [[[1, 2], "x"], {}], r
        r = _cli(tmp_path, "call", *args, "ACCOUNT", "acct", "--method", "write_then_raise",
                 "--args", '["z"]')
        assert r.returncode == 1 and "ValueError: refused z" in r.stderr, r
        r = _cli(tmp_path, "call", *args, "ACCOUNT", "acct", "--method", "deposit", "--args", "{")
        assert r.returncode == 2 and "JSON" in r.stderr, r
