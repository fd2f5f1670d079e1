"""Daemon safety (issue #11) over real processes: one owner per data dir and port, hangs replaced.

Each test reproduces one way the daemon used to lose, split or stall, then
checks the fix: a second ``durable serve``; a port held by a plain server
(with and without SO_REUSEPORT); SIGSTOP of an object process and of the
broker; a CPU-looping object whose supervisor is SIGKILLed; a memory-limit
restart whose object is stuck in a call.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - imported here: `nobody` cannot read the stdlib
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

import durable
from tests.integration.daemon import REPO, serving
from tests.integration.procs import free_port, wait_for

CONFIG = """
slots = {slots}
grace_period = {grace}
hang_timeout = {hang}
{extra}
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.BUSY]
class = "tests.integration.objects:Busy"
"""



def config(port: int, *, slots: int = 1, grace: float = 5, hang: float = 30, extra: str = "") -> str:
    return CONFIG.format(slots=slots, grace=grace, hang=hang, extra=extra, port=port)


def serve_once(root: Path, cfg: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """A second `durable serve` (foreground) in ``root``; it must exit by itself."""
    (root / "second.toml").write_text(cfg)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "serve", "--config",
                           str(root / "second.toml")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def count(frontend: str, name: str = "x") -> str:
    with durable.connect_sync(frontend, connect_timeout=5) as c:
        ns = c.namespace("COUNTER")
        return ns.get(ns.id_from_name(name)).fetch("http://do/inc", method="POST").text()


def status(root: Path) -> dict:
    return orjson.loads((root / "durable-data" / "run" / "status.json").read_bytes())


def proc_state(root: Path, role: str, slot: int | None = None) -> tuple[int | None, str]:
    try:
        for p in status(root)["processes"]:
            if p["role"] == role and p["slot"] == slot:
                return p["pid"], p["state"]
    except (OSError, orjson.JSONDecodeError):
        pass
    return None, "?"


def test_a_second_serve_on_a_live_data_dir_changes_nothing(tmp_path):
    port = free_port()
    with serving(tmp_path, config(port, slots=2)) as d:
        d.wait_ready()
        assert count(d.frontend) == "1"
        run = tmp_path / "durable-data" / "run"
        sockets = lambda: {p.name: p.stat().st_ino for p in run.glob("*.sock")}  # noqa: E731
        before = sockets()
        # Same data dir, another slot count (it used to leave a migration.json behind).
        second = serve_once(tmp_path, config(free_port(), slots=3))
        assert second.returncode == 74, second.stderr
        assert f"{tmp_path / 'durable-data'} is in use by another durable daemon" in second.stderr
        assert f"pid {d.proc.pid}" in second.stderr, second.stderr
        assert "ready" not in second.stderr
        assert sockets() == before  # not re-bound, not unlinked
        assert (run / "status.json").exists()  # (rewritten each second by the first daemon)
        assert not (tmp_path / "durable-data" / "migration.json").exists()
        # The first daemon serves on, to new clients too (no drain, sockets not stolen).
        assert [count(d.frontend) for _ in range(3)] == ["2", "3", "4"]
        assert status(tmp_path)["supervisor"]["pid"] == d.proc.pid


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, reuse_port):
    holder = socket.socket()
    if reuse_port:  # a program that allows sharing: durable must still not share it
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = holder.getsockname()[1]
    try:
        t = time.monotonic()
        done = serve_once(tmp_path, config(port))
        took = time.monotonic() - t
    finally:
        holder.close()
    assert done.returncode == 78, done.stderr  # systemd's unit does not restart 78
    assert f"127.0.0.1:{port} is in use (by pid {os.getpid()})" in done.stderr, done.stderr
    assert "ready" not in done.stderr and "HTTP on" not in done.stderr
    assert not (tmp_path / "durable-data" / "slot-0.duckdb").exists()  # nothing was started
    print(f"refused in {took:.2f} s")


@pytest.mark.slow
def test_two_daemons_never_share_a_port(tmp_path):
    port = free_port()
    with serving(tmp_path / "a", config(port)) as d:
        d.wait_ready()
        second = serve_once(tmp_path, config(port))  # its own data dir, the same port
        assert second.returncode == 78, second.stderr
        assert f"127.0.0.1:{port} is in use" in second.stderr
        import urllib.request
        for i in range(1, 6):  # every request reaches the one daemon: 1, 2, 3, ... in order
            req = urllib.request.Request(f"http://127.0.0.1:{port}/COUNTER/x/inc", method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.read() == str(i).encode()


def _replaced(root: Path, role: str, slot: int | None, old: int, seen_hung: list[bool]):
    pid, state = proc_state(root, role, slot)
    if state == "hung":
        seen_hung.append(True)
    return pid not in (None, old) and state == "running" and pid


@pytest.mark.slow
@pytest.mark.parametrize("role,slot", [("objectproc", 0), ("broker", None)])
def test_a_stopped_process_is_shown_hung_and_replaced(tmp_path, role, slot):
    hang = 8.0  # status shows `hung` from 5 s, the process is replaced at 8 s
    # (an object process's bound is at least its CPU limit + 5 s: keep that below 8 s)
    with serving(tmp_path, config(free_port(), hang=hang, extra="cpu_limit_ms = 2000")) as d:
        d.wait_ready()
        assert count(d.frontend) == "1"
        victim = d.child(role, slot)
        victim.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        if role == "broker":  # a client is told it is hung, not that nothing runs
            with pytest.raises(ConnectionError, match="accepted the connection but did not "
                                                      "answer within 1 s: it is hung"):
                durable.connect_sync(d.frontend, connect_timeout=1)
        hung: list[bool] = []
        try:
            new = wait_for(lambda: _replaced(tmp_path, role, slot, victim.pid, hung), hang + 15,
                           f"{role} replaced", interval=0.2)
        finally:
            if victim.is_running():
                victim.send_signal(signal.SIGCONT)
        took = time.monotonic() - t
        assert hung, "durable status never showed the stopped process as hung"
        assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
        assert f"{role}" in d.log_text() and "is hung" in d.log_text()
        # The daemon serves again: nothing was lost (the counter went on from 1).
        assert wait_for(lambda: _try_count(d.frontend), 20, "a call after the restart") == "2"
        print(f"{role}: SIGSTOP -> replaced (pid {new}) in {took:.1f} s, hang_timeout {hang:g} s")


def _try_count(frontend: str) -> str | None:
    try:
        return count(frontend)
    except (durable.errors.DurableError, ConnectionError):
        return None


@pytest.mark.slow
def test_an_orphan_with_a_blocked_loop_dies_and_the_next_start_works(tmp_path):
    port = free_port()
    with serving(tmp_path, config(port, extra="")) as d:
        d.wait_ready()
        objproc = d.child("objectproc", 0)
        client = durable.connect_sync(d.frontend)
        ns = client.namespace("BUSY")
        stub = ns.get(ns.id_from_name("spin"))
        import threading
        threading.Thread(target=lambda: _quiet(lambda: stub.fetch("http://do/?s=120", timeout=200)),
                         daemon=True).start()
        wait_for(lambda: objproc.cpu_percent(0.2) > 50, 20, "the object spinning")
        kids = d.children()
        try:
            os.kill(d.proc.pid, signal.SIGKILL)  # its PDEATHSIG SIGTERM cannot run: the loop spins
            d.proc.wait(timeout=10)
            t = time.monotonic()
            psutil.wait_procs([objproc], timeout=20)
            assert not objproc.is_running(), "the orphaned object process outlived the supervisor"
            print(f"orphan gone {time.monotonic() - t:.1f} s after the supervisor's SIGKILL")
        finally:
            client.close()
            for k in kids:  # whatever the outcome, nothing of this daemon outlives the test
                with contextlib.suppress(psutil.Error):
                    k.kill()
    wait_for(lambda: not _lock_holders(tmp_path), 20, "every old process gone")
    with serving(tmp_path, config(port)) as d2:  # the lock is free: the next start serves
        d2.wait_ready()
        assert count(d2.frontend, "after") == "1"


def _lock_holders(root: Path) -> list[int]:
    lock = str(root / "durable-data" / "lock")
    out = []
    for p in psutil.process_iter():
        try:
            if any(f.path == lock for f in p.open_files()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def _quiet(fn) -> None:
    try:
        fn()
    except Exception:
        pass


@pytest.mark.slow
def test_a_memory_limit_restart_escalates_to_sigkill(tmp_path):
    grace = 2.0
    with serving(tmp_path, config(free_port(), grace=grace, hang=60,
                                  extra="memory_limit_mb = 400")) as d:
        d.wait_ready()
        objproc = d.child("objectproc", 0)
        client = durable.connect_sync(d.frontend)
        ns = client.namespace("BUSY")
        stub = ns.get(ns.id_from_name("fat"))
        import threading
        threading.Thread(target=lambda: _quiet(
            lambda: stub.fetch("http://do/?s=60&mb=500", timeout=100)), daemon=True).start()
        t = time.monotonic()
        psutil.wait_procs([objproc], timeout=grace + 20)
        assert not objproc.is_running(), "the stuck object process was never killed"
        took = time.monotonic() - t
        log = d.log_text()
        assert "over memory_limit_mb" in log and "did not stop within grace_period" in log, log
        client.close()
        print(f"memory-limit restart of a stuck process done in {took:.1f} s (grace {grace:g} s)")


NOBODY = 65534


def as_nobody(fn, groups: tuple[int, ...] = ()) -> dict:
    """Run ``fn()`` in a forked child under uid/gid nobody (and ``groups``); return what it
    returned (a dict)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, report, never return into pytest
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"crashed": f"{type(e).__name__}: {e}"}
        os.write(w, orjson.dumps(out))
        os._exit(0)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return orjson.loads(b"".join(chunks))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_local_users_cannot_reach_any_endpoint(tmp_path_factory):
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="durable-users-"))
    os.chmod(root, 0o755)  # anyone may enter it: only the daemon's own 0700 dirs keep them out
    try:
        with serving(root, config(free_port())) as d:
            d.wait_ready()
            run = root / "durable-data" / "run"
            socks = sorted(p.name for p in run.iterdir() if p.suffix == ".sock")
            assert {"broker.sock", "workers.sock", "admin.sock", "control.sock"} <= set(socks)

            def probe() -> dict:
                out = {"root_visible": os.path.isdir(root),
                       **_reach(run, socks, root / "durable-data" / "secret")}
                try:
                    with durable.connect_sync(d.frontend, connect_timeout=1.5):
                        out["client"] = "connected"
                except ConnectionError as e:
                    out["client"] = "refused" if "belongs to another user" in str(e) else str(e)
                return out

            seen = as_nobody(probe)
            assert seen.pop("root_visible", None) is True, seen  # the barrier is the daemon's, not ours
            assert seen == {**dict.fromkeys(socks, "PermissionError"), "secret": "PermissionError",
                            "client": "refused"}, seen
            assert count(d.frontend) == "1"  # and the daemon's own user still gets in
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a group and become another user")
def test_a_socket_group_lets_its_members_reach_the_client_socket_only():
    import grp
    import shutil
    import stat
    import tempfile

    subprocess.run(["groupadd", "-f", "durable-apps"], check=True, capture_output=True)
    gid = grp.getgrnam("durable-apps").gr_gid
    root = Path(tempfile.mkdtemp(prefix="durable-group-"))
    os.chmod(root, 0o755)
    try:
        cfg = config(free_port(), slots=2).replace("[broker]\n",
                                                   '[broker]\nsocket_group = "durable-apps"\n')
        with serving(root, cfg) as d:
            d.wait_ready()
            data, run = root / "durable-data", root / "durable-data" / "run"
            modes = {p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid)
                     for p in (data, run, *run.glob("*.sock"))}
            assert modes["durable-data"] == (0o710, gid) and modes["run"] == (0o750, gid)
            assert modes["broker.sock"] == (0o660, gid)
            assert all(modes[n][0] == 0o600 for n in ("workers.sock", "admin.sock", "control.sock",
                                                      "peer-0.sock", "peer-1.sock"))

            def probe() -> dict:
                out = _reach(run, ["broker.sock", "workers.sock", "admin.sock", "control.sock",
                                   "peer-1.sock"], data / "secret")
                out["count"] = count(d.frontend, "from-another-user")  # a real client
                return out

            member = as_nobody(probe, groups=(gid,))
            assert member == {"broker.sock": "connected", "workers.sock": "PermissionError",
                              "admin.sock": "PermissionError", "control.sock": "PermissionError",
                              "peer-1.sock": "PermissionError", "secret": "PermissionError",
                              "count": "1"}, member
            stranger = as_nobody(lambda: {"broker": _try_connect(run / "broker.sock")})
            assert stranger == {"broker": "PermissionError"}, stranger
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reach(run: Path, socks: list[str], secret: Path) -> dict:
    """What this process may do with each socket of ``run`` and with the id secret."""
    out = {name: _try_connect(run / name) for name in socks}
    try:
        secret.read_bytes()
        out["secret"] = "read"
    except OSError as e:
        out["secret"] = type(e).__name__
    return out


def _try_connect(path: Path) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return "connected"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


@pytest.mark.slow
def test_operator_requests_are_refused_on_the_data_plane(tmp_path):
    with serving(tmp_path, config(free_port())) as d:
        d.wait_ready()
        assert count(d.frontend, "secretive") == "1"
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            stub = ns.get(ns.id_from_name("secretive"))
            for method, url in (("INSPECT", "durable:inspect"), ("BACKUP", "durable:backup?op=pin")):
                with pytest.raises(durable.ObjectError) as e:
                    stub.fetch(url, method=method)
                assert "operator request" in str(e.value), e.value
        # The same request through the operator endpoint (`durable inspect`) works.
        out = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "inspect", "COUNTER",
                              "secretive", "--config", str(tmp_path / "durable.toml")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert (out.returncode, out.stdout) == (0, "'n': 1\n"), out.stdout + out.stderr


def test_a_client_is_told_why_it_cannot_connect(tmp_path):
    missing = f"ipc://{tmp_path / 'nothing.sock'}"
    with pytest.raises(ConnectionError, match="nothing is listening at .*no socket file"):
        durable.connect_sync(missing, connect_timeout=0.3)
    stale = tmp_path / "stale.sock"  # what a SIGKILLed daemon leaves behind
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ConnectionError, match="left from a daemon that is gone"):
        durable.connect_sync(f"ipc://{stale}", connect_timeout=0.3)


@pytest.mark.slow
def test_sighup_reloads_and_the_daemon_serves_on(tmp_path):
    with serving(tmp_path, config(free_port())) as d:
        d.wait_ready()
        d.proc.send_signal(signal.SIGHUP)  # its default action used to kill the supervisor
        wait_for(lambda: "reload: done" in d.log_text(), 30, "the reload (docs/operating.md)")
        assert d.proc.poll() is None
        assert count(d.frontend) == "1"
