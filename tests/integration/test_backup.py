"""`durable backup` while writes go on, then `durable restore` into a new data dir."""

from __future__ import annotations

import os
import threading
import time

import orjson
import pytest

import durable
from tests.integration.daemon import serving
from tests.integration.test_storage_faults import cli

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

CONFIG = """
slots = 2
grace_period = 10
checkpoint_wal_mb = 1
checkpoint_interval = 1
[broker]
heartbeat = 0.2
[namespaces.KV]
class = "tests.integration.objects:KV"
"""


class Writer(threading.Thread):
    """Sequential atomic two-key writes over 8 objects; records when each was acknowledged."""

    def __init__(self, frontend: str) -> None:
        super().__init__(daemon=True)
        self.frontend = frontend
        self.stop = threading.Event()
        self.acked: list[tuple[float, str, str]] = []
        self.slowest = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with durable.connect_sync(self.frontend) as c:
                ns = c.namespace("KV")
                stubs = [ns.get(ns.id_from_name(f"o{i}")) for i in range(8)]
                i = 0
                deadline = time.monotonic() + 120  # bounded, whatever happens
                while not self.stop.is_set() and time.monotonic() < deadline:
                    t = time.monotonic()
                    stubs[i % 8].fetch(f"http://do/?k=w{i}&v={i}&twin=1", method="POST")
                    self.slowest = max(self.slowest, time.monotonic() - t)
                    self.acked.append((time.monotonic(), f"o{i % 8}", f"w{i}"))
                    i += 1
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            self.error = e


def test_backup_under_load_then_restore_keeps_every_acknowledged_write(tmp_path):
    src, dst, backup_dir = tmp_path / "src", tmp_path / "dst", tmp_path / "backup"
    with serving(src, CONFIG) as d:
        d.wait_ready()
        writer = Writer(d.frontend)
        writer.start()
        time.sleep(1.5)  # some checkpoints and segments behind us
        # A bulk of data so that the copy takes a while: 40 objects x 20 values of 20 KB.
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("KV")
            for j in range(40):
                stub = ns.get(ns.id_from_name(f"bulk{j}"))
                for k in range(20):
                    stub.fetch(f"http://do/?k=b{k}", method="PUT", body=os.urandom(20_000))
        started = time.monotonic()
        r = cli(src, "backup", str(backup_dir), "--json")
        finished = time.monotonic()
        time.sleep(0.5)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error
        manifest = orjson.loads(r.stdout)
        print(f"backup: {manifest['bytes'] / 2**20:.1f} MiB in {finished - started:.2f} s; "
              f"slowest write meanwhile {writer.slowest * 1000:.1f} ms; "
              f"{len(writer.acked)} writes acknowledged; pins "
              f"{[s['pin_seconds'] for s in manifest['slot_files']]} s")
        assert "slot 0: pinned at record" in r.stderr  # progress on the terminal
        assert manifest["slots"] == 2 and (backup_dir / "secret").exists()

    (dst / "durable.toml").parent.mkdir(parents=True)
    (dst / "durable.toml").write_text(CONFIG)
    restored = orjson.loads(cli(dst, "restore", str(backup_dir), "--json").stdout)
    assert restored["slots"] == 2
    refused = cli(dst, "restore", str(backup_dir), check=False)  # into a non-empty dir: no
    assert refused.returncode == 1 and "not empty" in refused.stderr

    with serving(dst, CONFIG) as d:
        d.wait_ready()
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("KV")
            have = {f"o{i}": ns.get(ns.id_from_name(f"o{i}")).fetch("http://do/").json()
                    for i in range(8)}
            bulk = ns.get(ns.id_from_name("bulk39")).fetch("http://do/").json()
    before = [(name, key) for t, name, key in writer.acked if t < started]
    assert before, "the writer should have written before the backup"
    missing = [(n, k) for n, k in before if k not in have[n]]
    assert not missing, f"{len(missing)} writes acknowledged before the backup are missing"
    attempted = {key for _, _, key in writer.acked} | {f"w{len(writer.acked)}"}
    for name, rows in have.items():
        for key, value in rows.items():
            base = key.rstrip("~")
            assert base in attempted, (name, key)  # nothing invented
            assert rows.get(base) == rows.get(base + "~") == value, (name, key)  # never half
    assert len(bulk) == 20 and all(v == 20_000 for v in bulk.values())
    after = sum(1 for t, _, _ in writer.acked if t >= finished)
    print(f"restored {sum(len(r) // 2 for r in have.values())} writes: all "
          f"{len(before)} acknowledged before the backup, none of the {after} after it finished")
    assert sum(1 for n, k in ((n, k) for t, n, k in writer.acked if t >= finished)
               if k in have[n]) == 0


@pytest.mark.parametrize("target", ["inside", "not-empty"])
def test_backup_refuses_bad_destinations(tmp_path, target):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        dest = tmp_path / "durable-data" / "b" if target == "inside" else tmp_path / "full"
        if target == "not-empty":
            dest.mkdir()
            (dest / "x").write_text("keep me")
        r = cli(tmp_path, "backup", str(dest), check=False)
        assert r.returncode == 1
        assert ("inside the data dir" if target == "inside" else "not empty") in r.stderr
