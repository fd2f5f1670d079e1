"""`durable serve` as people run it: real processes, real signals, a real notify socket."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time

import orjson
import psutil
import pytest

import durable
from durable.broker.ring import Ring
from durable.errors import StubBrokenError
from tests.integration.daemon import serving
from tests.integration.procs import async_wait_for, wait_for
from tests.integration.test_storage_faults import cli

FAST = """
slots = 2
grace_period = 10
[broker]
heartbeat = 0.2
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.RECORDER]
class = "tests.integration.objects:Recorder"
"""


def assert_halts(d, status: int, *words: str) -> None:
    """The daemon exits by itself with ``status``, says ``words`` in its log, and leaves no child."""
    code = d.proc.wait(timeout=60)
    log = d.log_text()
    assert code == status, log
    assert all(w in log for w in words), log
    wait_for(lambda: not d.children(), 10, "no children left")


def test_serve_on_defaults_in_an_empty_folder(tmp_path):
    with serving(tmp_path) as d:
        ready_in = d.wait_ready()
        wait_for(d.spare_ready, 30, "the warm spare")
        kids = d.children()
        # broker, object processes (serving HTTP too: front = "auto"), the warm spare
        assert len(kids) == 2 + (os.cpu_count() or 1), [k.cmdline() for k in kids]
        assert not any("durable.broker.gateway" in " ".join(k.cmdline()) for k in kids)
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            assert ns.get(ns.id_from_name("x")).fetch("http://do/inc", method="POST").text() == "1"
        import urllib.request
        req = urllib.request.Request("http://127.0.0.1:8787/COUNTER/x/inc", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert (r.status, r.read()) == (200, b"2")
        t = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        stopped_in = time.monotonic() - t
        gone, alive = psutil.wait_procs(kids, timeout=5)
        assert not alive, alive
        messages = d.read_notify()
        print(f"READY after {ready_in:.2f} s, stopped in {stopped_in:.2f} s")
        assert ready_in < 10 and stopped_in < 30
        assert "clients connect to" in d.log_text()
        assert oct((tmp_path / "durable-data").stat().st_mode & 0o777) == "0o700"
        assert oct((tmp_path / "durable-data" / "run").stat().st_mode & 0o777) == "0o700"
        assert oct((tmp_path / "durable-data" / "secret").stat().st_mode & 0o777) == "0o600"
        order = [m.split("=")[0] for m in messages if m.split("=")[0] in ("READY", "STOPPING")]
        assert order == ["READY", "STOPPING"], messages


def test_notify_order_ready_status_watchdog_stopping(tmp_path):
    with serving(tmp_path, FAST, env={"WATCHDOG_USEC": "200000"}) as d:
        d.wait_ready()
        time.sleep(0.5)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        kinds = [m.split("=")[0] for m in d.read_notify()]
        first = {k: kinds.index(k) for k in ("READY", "STATUS", "WATCHDOG", "STOPPING")}
        assert first["READY"] < kinds.index("WATCHDOG") < first["STOPPING"], kinds
        assert "STATUS" in kinds[first["READY"]:], kinds
        assert kinds.count("WATCHDOG") >= 3, kinds


def _slot_of(c, ns, name, slots=2):
    return Ring(slots).slot_for(str(c.namespace(ns).id_from_name(name)))


async def _increments(client, name, n, acked):
    ns = client.namespace("COUNTER")
    stub = ns.get(ns.id_from_name(name))
    for _ in range(n):
        try:
            await stub.fetch("http://do/inc", method="POST", timeout=5)
            acked[name] += 1
        except (StubBrokenError, durable.CallTimeoutError):
            stub = ns.get(ns.id_from_name(name))
            await asyncio.sleep(0.01)


@pytest.mark.slow
@pytest.mark.serial  # (it times restarts)
@pytest.mark.parametrize("role", ["objectproc", "broker"])
def test_sigkill_children_under_load_come_back_fast_and_lose_nothing(tmp_path, role):
    # (a slot's kill waits for the warm spare's imports, ~1.5 s: 12 kills keep it to ~20 s)
    kills = 12 if role == "objectproc" else 20
    with serving(tmp_path, FAST) as d:
        d.wait_ready()

        async def main():
            async with durable.connect(d.frontend, timeout=5) as client:
                acked = {f"k{i}": 0 for i in range(8)}
                load = [asyncio.ensure_future(_increments(client, name, 10**6, acked)) for name in acked]
                back_in = []
                try:
                    for _ in range(kills):
                        await asyncio.sleep(0.3)
                        victim = d.child(role, 0 if role == "objectproc" else None)
                        if role == "objectproc":  # a slot killed in steady state: the warm
                            # spare has imported everything (a cold start: ~1.3 s on a slow VM)
                            await async_wait_for(lambda v=victim: d.spare_ready() not in (
                                None, v.pid), 30, "the warm spare", 0.05)
                        t = time.monotonic()
                        victim.kill()

                        async def back(victim=victim):  # a new process of that role serves
                            if role == "objectproc":
                                slot = (await client.statistics(timeout=2))["slots"][0]
                                return slot["up"] and slot["pid"] != victim.pid
                            try:
                                new = d.child("broker")
                            except AssertionError:
                                return False
                            if new.pid == victim.pid:
                                return False
                            await _wait_serving(client)
                            return True

                        await async_wait_for(back, 15, f"a new {role} after SIGKILL", 0.01)
                        back_in.append(time.monotonic() - t)
                finally:
                    for f in load:
                        f.cancel()
                    await asyncio.gather(*load, return_exceptions=True)
                ns = client.namespace("COUNTER")
                for name, n in acked.items():
                    async def stored(name=name):  # a fresh stub each try: the last may be broken
                        r = await ns.get(ns.id_from_name(name)).fetch("http://do/", timeout=5)
                        return [int(await r.text())]

                    value, = await async_wait_for(stored, 30, f"{name}'s value", ignore=(
                        StubBrokenError, durable.CallTimeoutError))
                    assert value >= n, f"{name}: {n} increments acknowledged, {value} stored"
                return back_in, sum(acked.values())

        back_in, total = asyncio.run(main())
        back_in.sort()
        p99 = back_in[min(len(back_in) - 1, int(len(back_in) * 0.99))]
        print(f"{role}: back after SIGKILL p50 {statistics.median(back_in):.3f} s, "
              f"p99 {p99:.3f} s over {kills} kills; {total} acknowledged increments")
        assert total > 100
        # Fast is the median (a warm spare or a broker restart: ~0.5 s here); the slowest
        # is the machine's noise (1.2-1.5 s seen when other tests ran beside it), bounded
        # only as liveness. The figures are printed above.
        assert statistics.median(back_in) < 1.0, back_in
        assert back_in[-1] < 5.0, back_in


async def _wait_serving(client):
    ns = client.namespace("COUNTER")

    async def serves():
        await ns.get(ns.id_from_name("probe")).fetch("http://do/", timeout=1)
        return True

    await async_wait_for(serves, 30, "the daemon to serve again", 0.01,
                         ignore=(StubBrokenError, durable.CallTimeoutError))


@pytest.mark.slow  # (8-27 s of daemon waits: the full suite runs it)
def test_the_warm_spare_takes_a_dead_slot_and_is_itself_replaced(tmp_path):
    with serving(tmp_path, FAST) as d:
        d.wait_ready()
        first = wait_for(d.spare_ready, 30, "the warm spare")
        os.kill(first, signal.SIGKILL)  # a spare that dies unused is replaced (after 5 s)
        second = wait_for(lambda: d.spare_ready() not in (None, first) and d.spare_ready(), 30,
                          "a new warm spare")
        victim = d.child("objectproc", 1)
        victim.kill()

        def slot_1() -> int | None:
            p = next(p for p in d.status().get("processes", []) if p["slot"] == 1)
            return p["pid"] if p["state"] == "running" else None
        assert wait_for(lambda: slot_1() not in (None, victim.pid) and slot_1(), 15,
                        "slot 1 again") == second
        assert " --slot 1" in " ".join(psutil.Process(second).cmdline())  # as `ps` shows it
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            for i in range(10):  # both slots serve
                assert ns.get(ns.id_from_name(f"s{i}")).fetch("http://do/inc", method="POST").ok
        assert "from the warm spare" in d.log_text()
    with serving(tmp_path / "off", FAST.replace("slots = 2", "slots = 2\nwarm_spare = false")) as d:
        d.wait_ready()
        time.sleep(6)  # (a spare would have started by now: SPARE_AFTER_READY is 5 s)
        assert d.status().get("spare") is None and len(d.children()) == 3
        victim = d.child("objectproc", 0)
        victim.kill()

        def slot_0() -> int | None:
            p = next(p for p in d.status().get("processes", []) if p["slot"] == 0)
            return p["pid"] if p["state"] == "running" else None
        wait_for(lambda: slot_0() not in (None, victim.pid), 15, "slot 0 again")
        assert "from the warm spare" not in d.log_text()


@pytest.mark.slow  # (8-27 s of daemon waits: the full suite runs it)
def test_sigkill_of_the_supervisor_takes_every_child_down(tmp_path):
    with serving(tmp_path, FAST) as d:
        d.wait_ready()
        spare = wait_for(d.spare_ready, 30, "the warm spare")
        kids = d.children()
        assert len(kids) == 4 and spare in [k.pid for k in kids]  # broker, 2 slots, the spare
        d.proc.kill()
        d.proc.wait(timeout=10)
        t = time.monotonic()
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, [k.cmdline() for k in alive]
        print(f"children gone {time.monotonic() - t:.2f} s after the supervisor's SIGKILL")


@pytest.mark.slow
def test_sigterm_with_64_calls_in_flight_keeps_every_acknowledged_write(tmp_path):
    acked = {f"t{i}": 0 for i in range(64)}  # 64 writers: 64 calls in flight at all times
    with serving(tmp_path, FAST) as d:
        d.wait_ready()

        async def main():
            async with durable.connect(d.frontend, timeout=5) as client:
                load = [asyncio.ensure_future(_increments(client, name, 10**6, acked)) for name in acked]
                await asyncio.sleep(1.0)
                t = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(d.proc.wait, 30)
                stopped_in = time.monotonic() - t
                for f in load:
                    f.cancel()
                await asyncio.gather(*load, return_exceptions=True)
                return stopped_in

        stopped_in = asyncio.run(main())
        assert d.proc.returncode == 0, d.log_text()
        print(f"SIGTERM with 64 calls in flight: stopped in {stopped_in:.2f} s; "
              f"{sum(acked.values())} acknowledged increments")
        assert stopped_in < 5
    with serving(tmp_path, FAST) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            for name, n in acked.items():
                value = int(ns.get(ns.id_from_name(name)).fetch("http://do/").text())
                assert value >= n > 0, (name, n, value)


def test_class_that_fails_to_import_in_object_processes_halts_the_daemon(tmp_path):
    config = FAST + '[namespaces.BAD]\nclass = "tests.integration.bad_objects:Refuses"\n'
    with serving(tmp_path, config) as d:
        assert_halts(d, 78, "tests.integration.bad_objects", "refuses to load")
        assert any("halted" in m for m in d.read_notify())


@pytest.mark.parametrize("config, words", [
    ("slots = 'two'\n", ["slots", "must be int"]),
    ("nope = 1\n", ["nope", "unknown key"]),
    ("[namespaces.X]\nclass = 'no.such.module:Thing'\n", ["namespaces.X.class", "no.such.module"]),
    ("[namespaces.X]\nclass = 'os:path'\n", ["namespaces.X.class", "not a class"]),
    ("[broker]\nendpoint = 'tcp://10.0.0.1:7700'\n", ["broker.endpoint", "not on this machine"]),
    ("slots = [\n", ["not valid TOML"]),
])
def test_configuration_errors_name_file_key_and_exit_78(tmp_path, config, words):
    with serving(tmp_path, config) as d:
        code = d.proc.wait(timeout=30)
        log = d.log_text()
        assert code == 78, log
        assert "durable.toml" in log
        for w in words:
            assert w in log, (w, log)
        assert not d.children()
        assert not (tmp_path / "durable-data").exists()  # nothing half-started


def _cli(root, *args, timeout=30, env=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "durable.supervisor.cli", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow  # (8-27 s of daemon waits: the full suite runs it)
def test_operator_commands_status_call_inspect(tmp_path):
    out = _cli(tmp_path, "status")
    assert out.returncode == 3 and "no durable daemon is running" in out.stderr
    with serving(tmp_path, FAST) as d:
        d.wait_ready()
        wait_for(lambda: (tmp_path / "durable-data/run/status.json").exists(), 5, "status file")
        args = ["--config", str(tmp_path / "durable.toml")]
        r = _cli(tmp_path, "call", *args, "COUNTER", "room-1", "/inc", "-X", "POST")
        assert (r.returncode, r.stdout) == (0, "HTTP 200\n1\n"), r.stderr
        r = _cli(tmp_path, "call", *args, "RECORDER", "r", "/?n=7", "-X", "POST", "-H", "X-A: b")
        assert r.returncode == 0 and "[7]" in r.stdout, r
        r = _cli(tmp_path, "inspect", *args, "RECORDER", "r")
        assert r.returncode == 0 and r.stdout.strip() == "'seen': [7]", r
        oid = None
        with durable.connect_sync(d.frontend) as c:
            oid = str(c.namespace("COUNTER").id_from_name("room-1"))
            d_id = lambda ns, name: c.namespace(ns).id_from_name(name)  # noqa: E731
        r = _cli(tmp_path, "inspect", *args, "COUNTER", oid, "--prefix", "n")
        assert r.stdout.strip() == "'n': 1", r
        r = _cli(tmp_path, "inspect", *args, "RECORDER", "r", "--json")
        assert r.returncode == 0, r
        assert __import__("json").loads(r.stdout) == {
            "namespace": "RECORDER", "id": str(d_id("RECORDER", "r")),
            "keys": [{"key": "seen", "value": "[7]"}], "alarm_ms": None}
        r = _cli(tmp_path, "status", *args)
        assert r.returncode == 0 and "objectproc" in r.stdout and "storage:" in r.stdout, r
        r = _cli(tmp_path, "status", *args, "--json")
        data = __import__("json").loads(r.stdout)
        roles = sorted((p["role"], p["slot"]) for p in data["processes"])
        assert roles == [("broker", None), ("objectproc", 0), ("objectproc", 1)]
        assert all(p["pid"] and p["state"] == "running" and p["rss"] > 0 for p in data["processes"])
        assert all(set(p["gc"]) == {"full_collections", "last_full_seconds", "suspects",
                                    "young_collections", "frozen_garbage", "growth"}
                   for p in data["processes"] if p["role"] == "objectproc"), data["processes"]
        assert data["storage"]["bytes"] > 0
        r = _cli(tmp_path, "call", *args, "NOPE", "x")
        assert r.returncode == 2 and "known: COUNTER" in r.stderr
        # no --config: DURABLE_ENDPOINT finds the daemon, as the client library does, from
        # a directory so deep that its own ./durable-data could not hold an ipc socket
        elsewhere = tmp_path / ("elsewhere-" + "d" * 100)
        elsewhere.mkdir()
        r = _cli(elsewhere, "call", "COUNTER", "room-1", env={"DURABLE_ENDPOINT": d.frontend})
        assert (r.returncode, r.stdout) == (0, "HTTP 200\n1\n"), r.stderr
        r = _cli(elsewhere, "status", env={"DURABLE_ENDPOINT": "tcp://127.0.0.1:1"})
        assert r.returncode == 78 and "pass that daemon's --config" in r.stderr


@pytest.mark.slow
def test_memory_limit_restarts_object_processes_gracefully(tmp_path):
    # Deterministic: the limit sits between an idle object process (~85 MiB) and one that an
    # object made grow, so exactly one restart happens (a limit of 1 MiB restarted the
    # processes every second, and the test raced that loop).
    # (the default heartbeat: filling 400 MiB holds the GIL, and on a slow CPU shared with
    # other tests that outlasted FAST's 0.2 s heartbeats twice in CI-like runs)
    config = FAST.replace("grace_period = 10", "grace_period = 10\nmemory_limit_mb = 300") \
        .replace("heartbeat = 0.2", "heartbeat = 1.0") + \
        '[namespaces.HOG]\nclass = "tests.integration.objects:Hog"\n'
    with serving(tmp_path, config) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            counter, hog = c.namespace("COUNTER"), c.namespace("HOG")
            counter.get(counter.id_from_name("m")).fetch("http://do/inc", method="POST")
            stub = hog.get(hog.id_from_name("h"))
            slot = Ring(2).slot_for(str(stub.id))
            before = d.child("objectproc", slot).pid
            assert stub.fetch("http://do/?mb=400").text() == "400"
        wait_for(lambda: "over memory_limit_mb" in d.log_text(), 10, "a memory-limit restart")
        wait_for(lambda: _pid_of(d, slot) not in (None, before), 15, "a new object process")
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            assert wait_for(lambda: _answer(ns, "m"), 10, "the counter again") == "1"
        time.sleep(2.5)  # the new process is under the limit: no second restart
        assert d.log_text().count("over memory_limit_mb") == 1, d.log_text()
        status = orjson.loads(cli(tmp_path, "status", "--json").stdout)
        row = next(p for p in status["processes"] if p["role"] == "objectproc" and p["slot"] == slot)
        assert row["restarts"] == 1 and row["restart_causes"] == {"memory_limit": 1}, row


def _pid_of(d, slot):
    try:
        return d.child("objectproc", slot).pid
    except AssertionError:
        return None


def _answer(ns, name):
    try:
        return ns.get(ns.id_from_name(name)).fetch("http://do/").text()
    except (StubBrokenError, durable.CallTimeoutError):
        return None


@pytest.mark.slow
def test_second_sigterm_stops_at_once(tmp_path):
    config = FAST.replace("grace_period = 10", "grace_period = 30") + \
        '[namespaces.SLOW]\nclass = "tests.integration.objects:Slow"\n'
    with serving(tmp_path, config) as d:
        d.wait_ready()

        async def main():
            async with durable.connect(d.frontend, timeout=60) as client:
                ns = client.namespace("SLOW")
                call = asyncio.ensure_future(ns.get(ns.id_from_name("s")).fetch("http://do/?s=20"))
                await asyncio.sleep(0.5)
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert d.proc.poll() is None, "the first SIGTERM should wait for the call in flight"
                t = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(d.proc.wait, 10)
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return time.monotonic() - t

        assert asyncio.run(main()) < 3
        wait_for(lambda: not d.children(), 10, "no children left")


@pytest.mark.slow
def test_damaged_slot_is_marked_corrupt_and_the_daemon_serves_on(tmp_path):
    """A slot whose log is damaged stays down as `corrupt` (exit 65); it does not halt the rest."""
    from durable.objectproc.storage.log import encode_record, encode_writeset
    with serving(tmp_path, FAST) as d:  # lay the files out once
        d.wait_ready()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
    log_dir = tmp_path / "durable-data" / "slot-0.log"
    for old in log_dir.glob("*.seg"):
        old.unlink()
    bad = bytearray(encode_record(10**6, encode_writeset(b"COUNTER/x", False, {"n": b"1"})))
    bad[-1] ^= 0xFF
    (log_dir / f"{10**6:020d}.seg").write_bytes(bytes(bad))
    (log_dir / f"{10**6 + 1:020d}.seg").write_bytes(b"")
    with serving(tmp_path, FAST) as d:
        d.wait_ready()
        wait_for(lambda: "objectproc-0 found its slot's files damaged" in d.log_text(), 20,
                 "slot 0 reported corrupt")
        assert "damaged" in d.log_text() and d.proc.poll() is None
        assert (log_dir / f"{10**6:020d}.seg").read_bytes() == bytes(bad)  # evidence kept
        with durable.connect_sync(d.frontend) as c:  # slot 1 serves
            ns, ring, i = c.namespace("COUNTER"), Ring(2), 0
            while ring.slot_for(str(ns.id_from_name(f"n{i}"))) != 1:
                i += 1
            assert ns.get(ns.id_from_name(f"n{i}")).fetch("http://do/inc", method="POST").text() == "1"


@pytest.mark.slow
def test_low_latency_idle_holds_cpu_dma_latency_while_serving(tmp_path):
    """With root the PM QoS request is 0 while serving and gone after; without, a warning."""
    from durable.supervisor import cpu_latency

    def current():
        with open(cpu_latency.PATH, "rb") as f:
            return int.from_bytes(f.read(4), "little", signed=True)

    allowed = os.path.exists(cpu_latency.PATH) and os.access(cpu_latency.PATH, os.W_OK)
    before = current() if allowed else None
    with serving(tmp_path, "low_latency_idle = true\n" + FAST) as d:
        d.wait_ready()
        if allowed:
            assert current() == 0
            assert "CPUs poll instead of halting" in d.log_text()
        else:
            assert "low_latency_idle: cannot open" in d.log_text()
        with durable.connect_sync(d.frontend) as c:  # it serves either way
            ns = c.namespace("COUNTER")
            assert ns.get(ns.id_from_name("q")).fetch("http://do/inc", method="POST").text() == "1"
    if allowed:
        wait_for(lambda: current() == before, 5, "the PM QoS request to end with the daemon")


@pytest.mark.slow
def test_secrets_reach_objects_and_nothing_else(tmp_path):
    token, filed = "tok-" + os.urandom(8).hex(), "file-" + os.urandom(8).hex()
    (tmp_path / "api.key").write_text(filed + "\n")
    config = FAST + f"""[namespaces.SECRETS]
class = "tests.integration.objects:SecretReader"
[secrets]
TOKEN = {{ env = "DURABLE_T_TOKEN" }}
API_KEY = {{ file = "{tmp_path / 'api.key'}" }}
"""
    with serving(tmp_path, config, env={"DURABLE_T_TOKEN": token}) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            seen = c.namespace("SECRETS").get_by_name("s").secrets()
        assert seen == {"TOKEN": token, "API_KEY": filed}
        cmdlines = " ".join(" ".join(p.cmdline()) for p in d.children())
        status = _cli(tmp_path, "status", "--config", str(tmp_path / "durable.toml"), "--json")
        for value in (token, filed):
            assert value not in cmdlines and value not in d.log_text()
            assert value not in status.stdout + status.stderr
    # a secret that is not there stops the start, naming where it was looked for
    with serving(tmp_path / "again", config) as d:
        assert_halts(d, 78, "secrets.TOKEN", "DURABLE_T_TOKEN is not set")
