"""A full disk is a degraded mode: writes refused (507), reads served, back by itself.

The data dir lives on a small tmpfs that the test mounts (CI runs as root; elsewhere the
test is skipped, saying why). A ballast file fills it; removing the ballast frees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import orjson
import pytest

import durable
from durable.errors import StorageFullError
from tests.integration.daemon import serving
from tests.integration.procs import free_port, wait_for
from tests.integration.test_storage_faults import cli, kill_hard, names_on

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

CONFIG = """
slots = 2
grace_period = 10
checkpoint_wal_mb = 2
checkpoint_interval = 1
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
[namespaces.KV]
class = "tests.integration.objects:KV"
"""


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt, leave: int) -> None:
    """Write a ballast file until only ``leave`` bytes are free."""
    with open(mnt / "ballast", "ab") as f:
        while (room := shutil.disk_usage(mnt).free - leave) > 0:
            try:
                f.write(b"\xff" * min(room, 1 << 20))
                f.flush()
            except OSError:
                break



def test_disk_full_refuses_writes_serves_reads_and_recovers_by_itself(tmp_path, small_disk):
    port = free_port()
    config = f'data_dir = "{small_disk / "data"}"\n' + CONFIG.format(port=port)
    root = tmp_path / "root"
    acked: dict[str, set[str]] = {}
    refused: list[StorageFullError] = []
    with serving(root, config) as d:
        d.wait_ready()
        frontend = f"ipc://{small_disk / 'data' / 'run' / 'broker.sock'}"
        with durable.connect_sync(frontend) as c:
            ns = c.namespace("KV")
            names = names_on(0, 2, c) + names_on(1, 2, c)
            for n in names:  # something to read later, on every slot
                ns.get(ns.id_from_name(n)).fetch("http://do/?k=first&v=1", method="POST")
                acked.setdefault(n, set()).add("first")
            fill(small_disk, leave=6 << 20)
            deadline = time.monotonic() + 60
            i = 0
            refused_on: set[str] = set()
            # (until names[0]'s slot refuses too: a slot with room left in its current log
            # segment takes writes for a while after the other refuses; seen in CI)
            while (len(refused) < 20 or names[0] not in refused_on) \
                    and time.monotonic() < deadline:
                n = names[i % 4]
                try:
                    ns.get(ns.id_from_name(n)).fetch(f"http://do/?k=w{i}", method="PUT",
                                                      body=os.urandom(20_000))
                    acked[n].add(f"w{i}")
                except StorageFullError as e:
                    refused.append(e)
                    refused_on.add(n)
                i += 1
            assert refused, "the disk never filled"
            assert str(small_disk / "data") in str(refused[0]) and "free" in str(refused[0])
            assert refused[0].outcome == "discarded" and refused[0].retryable
            # Reads go on, on the full slots too, and so do calls that do not write.
            for n in names:
                assert "first" in ns.get(ns.id_from_name(n)).fetch("http://do/").json()
            with pytest.raises(urllib.error.HTTPError) as http:
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/KV/{names[0]}/?k=h&v=1", method="POST"), timeout=10)
            assert http.value.code == 507 and http.value.headers["Retry-After"]
            def states() -> dict:
                return {p["slot"]: p["state"] for p in orjson.loads(cli(
                    root, "status", "--json").stdout)["processes"] if p["role"] == "objectproc"}
            wait_for(lambda: "storage-full" in states().values(), 5, "status: storage-full")
            assert "the disk is full" in cli(root, "status").stdout
            def whys() -> list:
                return [p["storage"]["storage_full_why"] for p in orjson.loads(cli(
                    root, "status", "--json").stdout)["processes"] if p["role"] == "objectproc"]
            wait_for(lambda: "disk" in whys(), 5, "status: why the storage is full")
            assert "memory" not in whys()
            assert all(p.is_running() for p in d.children())
            restarts = [p["restarts"] for p in orjson.loads(
                cli(root, "status", "--json").stdout)["processes"]]

            # Space comes back: writes are accepted again by themselves, within seconds.
            (small_disk / "ballast").unlink()
            freed = time.monotonic()

            def writes_again() -> bool:
                try:
                    for n in names:
                        ns.get(ns.id_from_name(n)).fetch("http://do/?k=after&v=1", method="POST")
                        acked[n].add("after")
                    return True
                except StorageFullError:
                    return False
            wait_for(writes_again, 5, "writes accepted within 5 s of space being freed", 0.05)
            back_in = time.monotonic() - freed
            assert [p["restarts"] for p in orjson.loads(
                cli(root, "status", "--json").stdout)["processes"]] == restarts  # no restart
        print(f"disk full: {sum(map(len, acked.values()))} writes acknowledged, {len(refused)} "
              f"refused; writes back {back_in:.2f} s after space was freed")
        # Nothing acknowledged was lost: crash everything and read it back.
        kill_hard(d)
    with serving(root, config) as d:
        d.wait_ready()
        with durable.connect_sync(frontend) as c:
            ns = c.namespace("KV")
            for n, keys in acked.items():
                got = set(ns.get(ns.id_from_name(n)).fetch("http://do/").json())
                assert keys <= got, f"{n}: {len(keys - got)} acknowledged writes lost"


def test_slots_that_cannot_start_on_a_full_disk_come_back_once_space_is_freed(tmp_path, small_disk):
    config = f'data_dir = "{small_disk / "data"}"\n' + CONFIG.format(port=free_port())
    fill(small_disk, leave=256 << 10)  # room for the identity, not for a log segment
    with serving(tmp_path, config) as d:
        wait_for(lambda: "the disk is full" in d.log_text(), 20, "a start refused for a full disk")
        time.sleep(2.5)  # a retry or two (every 2 s), and the daemon does not give up
        assert d.proc.poll() is None, d.log_text()
        assert "halted" not in d.log_text() and "flapping" not in d.log_text()
        (small_disk / "ballast").unlink()
        freed = time.monotonic()
        d.wait_ready(timeout=15)
        back = time.monotonic() - freed
        frontend = f"ipc://{small_disk / 'data' / 'run' / 'broker.sock'}"
        with durable.connect_sync(frontend) as c:
            ns = c.namespace("KV")
            for name in names_on(0, 1, c) + names_on(1, 1, c):
                ns.get(ns.id_from_name(name)).fetch("http://do/?k=x&v=1", method="POST")
        print(f"slots ready {back:.2f} s after space was freed")
        assert back < 5
