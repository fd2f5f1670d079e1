"""Restart policy, sd_notify and configuration: pure logic (plus a real AF_UNIX socket)."""

import contextlib
import os
import re
import socket
import sys
import threading

import pytest

from durable.supervisor import systemd
from durable.supervisor.config import Config, ConfigError, from_dict, load
from durable.supervisor.restart_policy import EXIT_CONFIG, EXIT_STORAGE, RestartPolicy


def test_killed_from_outside_restarts_at_once_however_often():
    p = RestartPolicy()
    for i in range(100):
        d = p.on_exit(now=10.0 + i * 0.3, status=-9, ran_for=0.2)
        assert d.restart_in == 0.0, d
    assert "SIGKILL" in d.reason


def test_crash_signals_count_as_crashes():
    p = RestartPolicy(flap_limit=3)
    assert [p.on_exit(now=float(i), status=-11, ran_for=0.1).restart_in for i in range(3)] == [0.0, 0.1, 0.2]
    assert p.on_exit(now=4.0, status=-11, ran_for=0.1).restart_in is None


def test_startup_crashes_back_off_then_halt_as_flapping():
    p = RestartPolicy(base_delay=0.1, max_delay=1.0, flap_limit=5, flap_window=30)
    delays = [p.on_exit(now=float(i), status=1, ran_for=0.2).restart_in for i in range(5)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8]
    d = p.on_exit(now=5.0, status=1, ran_for=0.2)
    assert d.restart_in is None and "flapping" in d.reason
    p2 = RestartPolicy(flap_limit=3, flap_window=10)
    for i in range(3):
        p2.on_exit(now=float(i), status=1, ran_for=0.1)
    assert p2.on_exit(now=100.0, status=1, ran_for=0.1).restart_in is not None  # old ones expired


@pytest.mark.parametrize("status", [EXIT_CONFIG, EXIT_STORAGE])
def test_hopeless_exit_statuses_halt(status):
    d = RestartPolicy().on_exit(now=1.0, status=status, ran_for=100)
    assert d.restart_in is None and "will not help" in d.reason


def test_notify_sends_datagrams_to_a_real_socket(tmp_path):
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert systemd.notify("STATUS=hi there", {"NOTIFY_SOCKET": str(path)})
        assert [s.recv(100), s.recv(100)] == [b"READY=1", b"STATUS=hi there"]
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False


def test_notify_never_blocks_on_a_socket_nobody_reads(tmp_path):
    """A notify socket whose reader stopped reading (a stuck systemd, a test harness) once
    hung the supervisor's main loop in sendall: messages that matter wait for the next send,
    the rest are dropped, and no call waits."""
    path = tmp_path / "n.sock"
    env = {"NOTIFY_SOCKET": str(path)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.setblocking(False)
        done = threading.Event()

        def fill() -> None:
            for i in range(100_000):  # (the queue holds a few hundred datagrams)
                if not systemd.notify(f"STATUS=filling {i}", env):
                    break
            systemd.notify("READY=1", env)  # queued behind the full socket
            done.set()

        t = threading.Thread(target=fill, daemon=True)
        t.start()
        t.join(30)
        assert done.is_set(), "notify blocked on a full socket"
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(s.recv(200))
        assert got and b"READY=1" not in got
        assert systemd.flush(env)  # (the supervisor's next turn)
        assert s.recv(200) == b"READY=1"
        assert systemd.flush(env) and systemd.notify("STATUS=after", env)
        assert s.recv(200) == b"STATUS=after"
        for i in range(100):  # full again: READY=1 then STOPPING=1 wait, in that order
            if not systemd.notify(f"STATUS=again {i}", env):
                break
        assert not systemd.notify("READY=1", env) and not systemd.notify("STOPPING=1", env)
        with contextlib.suppress(BlockingIOError):
            while True:
                s.recv(200)
        assert systemd.flush(env)
        assert [s.recv(200), s.recv(200)] == [b"READY=1", b"STOPPING=1"]


def test_watchdog_interval():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}) is None


NS = {"namespaces": {"A": {"class": "m:C"}}}


def test_a_file_serves_only_the_namespaces_it_names():
    with pytest.raises(ConfigError, match="no namespace is configured") as e:
        from_dict({"slots": 2}, "app.toml")  # not the bundled examples
    assert "[namespaces.COUNTER]" in str(e.value)
    assert set(from_dict(NS, "app.toml").namespaces) == {"A"}


def test_a_namespace_name_is_at_most_the_wires_256_characters():
    """A longer name used to pass: the daemon started, the broker's welcome to each object
    process (which lists the namespaces) was dropped as malformed, and every call hung."""
    from durable.protocol.messages import MAX_NAME
    ok = "N" * MAX_NAME
    assert set(from_dict({"namespaces": {ok: {"class": "m:C"}}}, "f.toml").namespaces) == {ok}
    with pytest.raises(ConfigError, match=r"namespaces\.N{40}\.\.\.: a namespace name is at most 256 "
                                          r"characters \(this one has 257\)"):
        from_dict({"namespaces": {ok + "N": {"class": "m:C"}}}, "f.toml")


def test_defaults_are_valid_and_local():
    c = load(None)
    assert c.http is not None and c.http.listen == "127.0.0.1:8787"
    assert from_dict(NS, "f.toml").http is None  # a file without [http] runs no gateway
    assert c.frontend().startswith("ipc://") and c.frontend().endswith("durable-data/run/broker.sock")
    assert set(c.namespaces) == {"COUNTER", "CHAT", "RATELIMIT", "SESSION"}


def test_full_config_parses():
    c = from_dict({"data_dir": "/tmp/x", "slots": 3, "idle_timeout": 5, "grace_period": 2.5,
                   "memory_limit_mb": 512, "broker": {"endpoint": "ipc:///tmp/x/b.sock", "heartbeat": 1},
                   "limits": {"max_value_bytes": 1000},
                   "namespaces": {"A": {"class": "m:C"}}, "vars": {"x": [1, 2]}}, "f.toml")
    assert (c.slots, c.idle_timeout, c.broker.heartbeat, c.limits.max_value_bytes) == (3, 5.0, 1.0, 1000)
    assert c.frontend() == "ipc:///tmp/x/b.sock" and c.vars == {"x": [1, 2]}
    assert isinstance(c, Config)
    assert not c.low_latency_idle and from_dict({"low_latency_idle": True, **NS}, "f").low_latency_idle


def test_cpu_latency_request_is_written_or_warned_about(tmp_path, caplog):
    from durable.supervisor import cpu_latency

    dev = tmp_path / "cpu_dma_latency"
    dev.write_bytes(b"\x00\x94\x35\x77")
    held = cpu_latency.hold(str(dev))
    assert held is not None
    held.close()
    assert dev.read_bytes() == b"\x00\x00\x00\x00"  # an int32 0: "no wake-up latency"
    assert cpu_latency.hold(str(tmp_path / "missing" / "dev")) is None
    assert "serving without it" in caplog.text


@pytest.mark.parametrize("raw, words", [
    ({"slots": True}, ["slots", "must be int"]),
    ({"slots": 0}, ["slots", "between 1 and 1024"]),
    ({"broker": {"endpont": "x"}}, ["broker.endpont", "unknown key", "endpoint"]),
    ({"broker": {"heartbeat": "1"}}, ["broker.heartbeat", "must be"]),
    ({"namespaces": {}}, ["namespaces", "at least one"]),
    ({"namespaces": {"a-b": {"class": "m:C"}}}, ["namespaces.a-b", "identifier"]),
    ({"namespaces": {"A": {"class": "nocolon"}}}, ["namespaces.A.class"]),
    ({"namespaces": {"A": {"class": "m:C", "extra": 1}}}, ["namespaces.A.extra"]),
    ({"broker": {"endpoint": "tcp://0.0.0.0:1"}}, ["not on this machine"]),
    ({"broker": {"endpoint": "udp://x"}}, ["not an ipc:// or tcp://"]),
    # Other local users can reach any TCP port: no keyless TCP endpoint, even on loopback.
    ({"broker": {"endpoint": "tcp://127.0.0.1:7700"}}, ["broker.endpoint", "CurveZMQ keys"]),
    ({"broker": {"workers_endpoint": "tcp://127.0.0.1:7701"}},
     ["broker.workers_endpoint", "register as an object process"]),
    ({"broker": {"public_endpoint": "tcp://127.0.0.1:7702"}},
     ["broker.public_endpoint", "durable keygen"]),
    ({"hang_timeout": 1}, ["hang_timeout", "at least 3"]),
    ({"data_dir": "/" + "d" * 120}, ["ipc path"]),
    ({"http": {"listen": "nope"}}, ["http.listen", "host:port"]),
    ({"http": {"procs": 2}}, ["http.procs", "unknown key"]),
    ({"http": {"worker": "nocolon"}}, ["http.worker"]),
    ({"low_latency_idle": "yes"}, ["low_latency_idle", "must be bool"]),
    ({"cluster": {"nats": "nats://127.0.0.1:4222"}}, ["cluster.host_id", "--host-id"]),
    ({"cluster": {"nats": "http://x:1", "host_id": "a"}}, ["cluster.nats", "not a NATS URL"]),
    ({"cluster": {"nats": "nats://h:1", "host_id": "a", "listen": "x"}},
     ["cluster.listen", "HOST:PORT"]),
    ({"cluster": {"nats": "nats://h:1", "host_id": "a", "listen": "127.0.0.1:7710"}},
     ["cluster.curve_key", "durable keygen"]),
    ({"cluster": {"nats": "nats://h:1", "host_id": "a", "listen": "127.0.0.1:7710",
                  "curve_key": "/nonexistent/cluster.key_secret"}},
     ["cluster.curve_key", "cannot read"]),
    ({"cluster": {"nats": "nats://h:1", "host_id": "a b"}}, ["cluster.host_id", "unique name"]),
])
def test_bad_configs_name_key_and_fix(raw, words):
    with pytest.raises(ConfigError) as e:
        from_dict(raw, "cfg.toml")
    msg = str(e.value)
    assert msg.startswith("cfg.toml: ")
    for w in words:
        assert w in msg, (w, msg)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("slots = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path / "bad.toml")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_supervisor_died_before_prctl_does_not_start():
    """PR_SET_PDEATHSIG set after the parent is gone never fires: the child must see that."""
    from durable.supervisor.lifeline import bind_to_parent
    for parent, want in ((os.getpid(), 0), (os.getpid() + 10**6, 1)):  # the real one, a gone one
        pid = os.fork()
        if pid == 0:
            try:
                bind_to_parent(parent)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == want


def test_a_tcp_client_endpoint_is_curve_and_the_daemon_keeps_ipc(tmp_path):
    import zmq.auth
    keys = tmp_path / "keys"
    keys.mkdir()
    _, secret = zmq.auth.create_certificates(str(keys), "broker")
    clients = tmp_path / "clients"
    clients.mkdir()
    zmq.auth.create_certificates(str(clients), "app1")
    broker = {"endpoint": "tcp://127.0.0.1:7700", "public_endpoint": "tcp://0.0.0.0:7701",
              "curve_secret_key": secret, "authorized_keys": str(clients)}
    c = from_dict({"data_dir": str(tmp_path / "d"), "broker": broker, **NS}, "f.toml")
    assert c.frontend() == f"ipc://{tmp_path / 'd' / 'run' / 'broker.sock'}"
    assert c.curve_endpoints() == ["tcp://0.0.0.0:7701", "tcp://127.0.0.1:7700"]
    assert c.admin().endswith("/run/admin.sock")
    (clients / "permissions.toml").write_text('[nobody]\nnamespaces = ["A"]\n')
    with pytest.raises(ConfigError, match="no nobody.key"):
        from_dict({"broker": broker}, "f.toml")
    (clients / "permissions.toml").write_text('[app1]\nnamespaces = "A"\n')
    with pytest.raises(ConfigError, match=r"namespaces = \["):
        from_dict({"broker": broker}, "f.toml")


def test_repeated_log_lines_are_held_back_and_counted():
    import logging

    from durable.supervisor.logs import RateLimit

    now = [0.0]
    limit = RateLimit(burst=5, window=10.0, clock=lambda: now[0])

    def rec(msg, *args, level=logging.ERROR):
        return logging.LogRecord("durable.gateway", level, "f", 1, msg, args, None)

    passed = [limit.filter(rec("accept failed: %s", i)) for i in range(100)]
    assert passed.count(True) == 5 and passed[:5] == [True] * 5
    assert limit.filter(rec("another message"))  # other messages are not held back
    now[0] = 10.5
    r = rec("accept failed: %s", "later")
    assert limit.filter(r)
    assert r.getMessage() == ("accept failed: later (95 more like this in the last 10 s were "
                              "not logged)")
    assert limit.filter(rec("accept failed: %s", 1))  # a new window: a fresh burst


def test_children_get_the_whole_checked_config_through_one_settings_file(tmp_path):
    from durable.supervisor.config import read_settings, write_settings

    raw = {"data_dir": str(tmp_path / "d"), "slots": 3, "idle_timeout": 5, "cpu_limit_ms": 900,
           "debug": True, "broker": {"heartbeat": 0.2, "client_inflight_limit": 50},
           "http": {"listen": "127.0.0.1:9999", "max_inflight_per_namespace": 20},
           "limits": {"max_value_bytes": 131072},
           "namespaces": {"A": {"class": "m:A", "cpu_limit_ms": 50}, "B": {"class": "m:B"}},
           "vars": {"token": "s3cret", "n": [1, 2]}}
    cfg = from_dict(raw, "f.toml")
    path = tmp_path / "settings.json"
    write_settings(cfg, path, data_dir_id="abc")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    back, runtime = read_settings(path)
    assert back == cfg and runtime == {"data_dir_id": "abc"}
    assert back.namespace_cpu_limits == {"A": 50} and back.http.max_inflight_per_namespace == 20
    from durable.supervisor.config import read_settings_fd, settings_fd
    fd = settings_fd(cfg, data_dir_id="abc")  # what the supervisor hands its children
    try:
        assert read_settings_fd(fd) == (cfg, {"data_dir_id": "abc"})
        assert read_settings_fd(fd)[0] == cfg  # read again: the offset is not consumed
    finally:
        os.close(fd)
    assert from_dict(NS, "f").http is None  # and a config without [http] stays without one
    c2, _ = read_settings(_written(tmp_path, from_dict(NS, "f")))
    assert c2.http is None


def _written(tmp_path, cfg):
    from durable.supervisor.config import write_settings
    path = tmp_path / "s2.json"
    write_settings(cfg, path)
    return path


def test_secrets_come_from_the_environment_or_files_never_the_config(tmp_path, monkeypatch):
    (tmp_path / "key").write_text("from-a-file\n")
    monkeypatch.setenv("DURABLE_T_TOKEN", "from-the-env")
    cfg = from_dict({**NS, "secrets": {"TOKEN": {"env": "DURABLE_T_TOKEN"},
                                       "KEY": {"file": str(tmp_path / "key")}}}, "f.toml")
    assert cfg.secrets == {"TOKEN": "from-the-env", "KEY": "from-a-file"}
    assert "from-the-env" not in repr(cfg)
    from durable.supervisor.config import read_settings, to_raw, write_settings

    assert "secrets" not in to_raw(cfg)  # never in the TOML-shaped config
    write_settings(cfg, tmp_path / "settings.json")  # (0600; the supervisor's is a memfd)
    assert read_settings(tmp_path / "settings.json")[0].secrets == cfg.secrets
    bad = [({"T": {"env": "DURABLE_T_NOPE"}}, "DURABLE_T_NOPE is not set"),
           ({"T": {"file": str(tmp_path / "nope")}}, "cannot read"),
           ({"T": "plain"}, "belongs in [vars]"),
           ({"T": {"env": "A", "file": "b"}}, "one of env or file")]
    for secrets, words in bad:
        with pytest.raises(ConfigError, match=re.escape(words)) as e:
            from_dict({**NS, "secrets": secrets}, "f.toml")
        assert "from-the-env" not in str(e.value)


def test_peer_calls_are_on_by_default_and_can_be_turned_off():
    assert from_dict(NS, "f.toml").broker.peer_calls is True
    assert from_dict({**NS, "broker": {"peer_calls": False}}, "f.toml").broker.peer_calls is False
    with pytest.raises(ConfigError, match="broker.peer_calls"):
        from_dict({**NS, "broker": {"peer_calls": "no"}}, "f.toml")


def test_an_rss_limit_caps_how_far_duckdb_may_grow_for_its_indexes():
    from durable.objectproc.__main__ import process_config
    free = process_config(from_dict(NS, "app.toml"), 0, None)
    assert free.duckdb_memory_ceiling_mb == 0  # no RSS limit: half the machine
    capped = process_config(from_dict({**NS, "memory_limit_mb": 1000}, "app.toml"), 0, None)
    assert capped.duckdb_memory_ceiling_mb == 800  # (Python's share stays out of it)
    tight = process_config(from_dict({**NS, "memory_limit_mb": 300}, "app.toml"), 0, None)
    assert tight.duckdb_memory_ceiling_mb == 512  # never below duckdb_memory_mb


def test_the_supervisor_turns_fast_only_until_ready_and_for_a_bounded_time():
    """50 Hz while it waits for every slot (each turn asks the broker), but a slot that never
    comes up must not keep it asking every 20 ms for good; a due restart cuts any sleep."""
    from durable.supervisor.arbiter import FAST_TURNS_SECONDS, turn_timeout

    start = 100.0
    fast_until = start + FAST_TURNS_SECONDS
    assert turn_timeout(start + 1, False, fast_until, []) == 0.02
    assert turn_timeout(start + FAST_TURNS_SECONDS + 1, False, fast_until, []) == 0.2
    assert turn_timeout(start + 1, True, fast_until, []) == 0.2
    assert turn_timeout(start + 1, True, fast_until, [start + 1.05]) == pytest.approx(0.05)
    assert turn_timeout(start + 1, True, fast_until, [start]) == 0.0  # (overdue: no sleep)


def test_a_quiet_supervisor_turns_once_a_second_and_a_due_restart_still_cuts_it():
    from durable.supervisor.arbiter import QUIET_TURN, turn_timeout

    start = 100.0
    assert turn_timeout(start + 1, True, start, [], quiet=True) == QUIET_TURN == 1.0
    assert turn_timeout(start + 1, True, start, [start + 1.3], quiet=True) == pytest.approx(0.3)
    assert turn_timeout(start + 1, False, start + 30, [], quiet=True) == 0.02  # (not ready)
    assert turn_timeout(start + 40, False, start + 30, [], quiet=True) == 0.2
