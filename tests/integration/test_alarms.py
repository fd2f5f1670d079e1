"""Alarms over the real daemon parts: fire on time, retry, survive kills, eviction, restarts."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

import durable
from durable.errors import ObjectError
from tests.integration.cluster import all_slots_up, running_cluster
from tests.integration.procs import async_wait_for
from tests.integration.test_messaging import slot_of


def now_ms() -> int:
    return int(time.time() * 1000)


async def runs_of(stub, n: int, timeout: float = 15.0) -> list:
    """Poll until the object recorded ``n`` runs (a fresh stub each time: a process may
    have been replaced meanwhile)."""
    ns = stub._client.namespace(stub.namespace)

    async def enough():
        runs = await ns.get(stub.id).runs()
        return runs if len(runs) >= n else False

    return await async_wait_for(enough, timeout, f"{n} alarm run(s)", 0.05,
                                ignore=(durable.StubBrokenError,))


async def test_an_alarm_fires_once_at_its_time_and_is_then_gone(client):
    stub = client.namespace("ALARMED").get_by_name("once")
    due = now_ms() + 400
    assert await stub.arm(due) == due
    assert await stub.alarm_at() == due
    (at, retry, is_retry, seen), = await runs_of(stub, 1)
    assert at >= due and at - due < 1000, (at, due)  # never early
    assert (retry, is_retry, seen) == (0, False, due)  # the handler still sees its alarm
    await asyncio.sleep(0.5)
    assert len(await stub.runs()) == 1 and await stub.alarm_at() is None


async def test_a_time_in_the_past_fires_at_once_and_delete_cancels(client):
    ns = client.namespace("ALARMED")
    past = ns.get_by_name("past")
    t = now_ms()
    await past.arm(t - 60_000)
    (at, *_), = await runs_of(past, 1, 5)
    assert at - t < 1000
    cancelled = ns.get_by_name("cancelled")
    await cancelled.arm(now_ms() + 300)
    await cancelled.cancel()
    await asyncio.sleep(0.8)
    assert await cancelled.runs() == [] and await cancelled.alarm_at() is None


@pytest.mark.slow  # (2.5 s of waiting for alarms: the full suite runs it)
async def test_an_alarm_replaced_before_it_ran_never_runs_early(client):
    """Found by the chaos soak: the old alarm came due while its replacement was not yet
    durable; its handler ran and saw the new alarm, seconds before that one's time."""
    stub = client.namespace("ALARMED").get_by_name("replaced")
    await stub.arm(now_ms() + 100)
    later = now_ms() + 2500
    await stub.replace_slowly(later, 0.4)  # the old alarm comes due during the hold
    await asyncio.sleep(0.8)
    assert await stub.runs() == []  # the old one is gone, the new one not due yet
    (at, _, _, seen), = await runs_of(stub, 1)
    assert at >= later and seen == later


async def test_a_raising_handler_is_retried_with_backoff(client):
    stub = client.namespace("ALARMED").get_by_name("flaky")
    await stub.arm(now_ms(), fail=2)  # the test cluster's alarm_retry_base is 0.2 s
    runs = await runs_of(stub, 3)
    assert [(r[1], r[2]) for r in runs] == [(0, False), (1, True), (2, True)]
    gaps = [b[0] - a[0] for a, b in zip(runs, runs[1:], strict=False)]
    assert 180 <= gaps[0] < 1500 and 380 <= gaps[1] < 2000, gaps  # 0.2 s, then 0.4 s
    await asyncio.sleep(0.3)
    assert await stub.alarm_at() is None  # the run that returned deleted it


async def test_the_handler_may_set_the_next_alarm(client):
    stub = client.namespace("ALARMED").get_by_name("repeat")
    await stub.arm(now_ms() + 50, repeat=3, every_ms=100)
    runs = await runs_of(stub, 4)
    assert all(b[0] - a[0] >= 100 for a, b in zip(runs, runs[1:], strict=False))
    await asyncio.sleep(0.4)
    assert len(await stub.runs()) == 4 and await stub.alarm_at() is None


async def test_a_class_without_a_handler_cannot_set_an_alarm(client):
    with pytest.raises(TypeError, match="no alarm\\(\\) handler") as info:
        await client.namespace("NOALARM").get_by_name("x").try_set()
    assert isinstance(info.value, ObjectError)


@pytest.mark.slow
async def test_an_alarm_survives_sigkill_of_its_object_process(client, cluster):
    stub = client.namespace("ALARMED").get_by_name("survivor")
    due = now_ms() + 1500
    await stub.arm(due)
    slot = slot_of(client, cluster, "ALARMED", "survivor")
    cluster.kill(cluster.workers[slot])
    cluster.start_worker(slot)
    (at, *_), = await runs_of(stub, 1)
    assert at >= due


@pytest.mark.slow
async def test_an_evicted_object_is_activated_by_its_alarm(tmp_path):
    with running_cluster(tmp_path, slots=1, idle_timeout=0.3) as cluster:
        async with durable.connect(cluster.frontend, timeout=10) as client:
            await all_slots_up(client)
            stub = client.namespace("ALARMED").get_by_name("sleeper")
            due = now_ms() + 2000
            await stub.arm(due)

            async def evicted():
                stats = await client.statistics()
                return stats["slots"][0]["reported"].get("evicted", 0) >= 1

            await async_wait_for(evicted, 5, "the object to be evicted")
            (at, *_), = await runs_of(stub, 1)
            assert at >= due


def _alarm_config(slots: int) -> str:
    return f"""
slots = {slots}
grace_period = 10
alarm_retry_base = 0.2
[broker]
heartbeat = 0.2
[namespaces.ALARMED]
class = "tests.integration.objects:Alarmed"
"""


@pytest.mark.slow
def test_alarms_survive_sigkill_of_the_supervisor_and_a_slot_count_change(tmp_path):
    """Pending alarms on many objects; the supervisor is SIGKILLed (its children die with
    it); the daemon starts again on 3 slots instead of 2 (objects move): every one fires."""
    from tests.integration.daemon import serving

    names = [f"obj{i}" for i in range(30)]
    with serving(tmp_path, _alarm_config(2)) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("ALARMED")
            due = now_ms() + 4000
            for name in names:
                ns.get_by_name(name).arm(due)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)
    (tmp_path / "durable.toml").unlink()
    with serving(tmp_path, _alarm_config(3)) as d:
        d.wait_ready(timeout=60)
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("ALARMED")
            deadline = time.monotonic() + 30
            pending = set(names)
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    runs = ns.get_by_name(name).runs()
                    if runs:
                        assert runs[0][0] >= due
                        pending.discard(name)
                time.sleep(0.2)
            assert not pending, f"never fired: {sorted(pending)}"
            r = __import__("subprocess").run(
                [__import__("sys").executable, "-m", "durable.supervisor.cli", "status", "--json",
                 "--config", str(tmp_path / "durable.toml")], cwd=tmp_path, capture_output=True,
                text=True, timeout=30)
            assert r.returncode == 0, r.stderr


@pytest.mark.slow
async def test_an_alarm_survives_sigkill_of_the_broker(client, cluster):
    stub = client.namespace("ALARMED").get_by_name("broker-victim")
    due = now_ms() + 1000
    await stub.arm(due)
    cluster.kill(cluster.broker)
    cluster.start_broker()

    async def fired():
        try:
            return await client.namespace("ALARMED").get_by_name("broker-victim").runs()
        except durable.StubBrokenError:
            return False

    runs = await async_wait_for(fired, 15, "the alarm to fire after the broker came back")
    assert runs[0][0] >= due


@pytest.mark.slow
def test_status_and_inspect_show_pending_alarms(tmp_path):
    import subprocess
    import sys

    from tests.integration.daemon import serving

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "durable.supervisor.cli", *args, "--config",
                               str(tmp_path / "durable.toml")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)

    with serving(tmp_path, _alarm_config(2)) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("ALARMED")
            due = now_ms() + 3_600_000
            for i in range(3):
                ns.get_by_name(f"later{i}").arm(due + i)
        deadline = time.monotonic() + 20
        out = ""
        while time.monotonic() < deadline and "ALARMED: 3 pending" not in out:
            time.sleep(0.5)
            out = cli("status").stdout
        assert "alarms: ALARMED: 3 pending, next due" in out and "(in 59m" in out, out
        r = cli("inspect", "ALARMED", "later0")
        assert r.returncode == 0 and "alarm: " in r.stdout and "(in 59m" in r.stdout, r
