"""Disk faults over the real daemon: damaged logs and DuckDB files, verify, repair, data dir loss.

Every test writes through the daemon, records what was acknowledged, damages
files the way an adversary (or a disk) would, and checks what is stored
afterwards against what was acknowledged: nothing may be lost silently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest

import durable
from durable.broker.ring import Ring
from durable.errors import StorageCorruptError
from durable.objectproc.storage.log import SEGMENT_HEADER_SIZE, list_segments
from tests.integration.daemon import REPO, read_status, serving
from tests.integration.procs import wait_for

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

CONFIG = """
slots = 2
grace_period = 10
checkpoint_interval = 3600
checkpoint_wal_mb = 1024
[broker]
heartbeat = 0.2
[namespaces.KV]
class = "tests.integration.objects:KV"
"""


def cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", *args, "--config",
                        str(root / "durable.toml")], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    if check:
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def names_on(slot: int, n: int, client) -> list[str]:
    ns, ring, out, i = client.namespace("KV"), Ring(2), [], 0
    while len(out) < n:
        name = f"obj-{i}"
        if ring.slot_for(str(ns.id_from_name(name))) == slot:
            out.append(name)
        i += 1
    return out


def write(d, slot: int, count: int, *, body: int = 0) -> dict[str, set[str]]:
    """``count`` acknowledged writes, each its own record, spread over 4 objects of ``slot``."""
    acked: dict[str, set[str]] = {}
    with durable.connect_sync(d.frontend) as c:
        ns = c.namespace("KV")
        names = names_on(slot, 4, c)
        for i in range(count):
            name = names[i % 4]
            stub = ns.get(ns.id_from_name(name))
            if body:
                stub.fetch(f"http://do/?k=w{i}", method="PUT", body=os.urandom(body))
            else:
                stub.fetch(f"http://do/?k=w{i}&v={i}", method="POST")
            acked.setdefault(name, set()).add(f"w{i}")
    return acked


def stored(d, names) -> dict[str, set[str]]:
    with durable.connect_sync(d.frontend) as c:
        ns = c.namespace("KV")
        return {n: set(ns.get(ns.id_from_name(n)).fetch("http://do/").json()) for n in names}


def answering(d, names) -> dict[str, set[str]]:
    """``stored`` once the slot answers again (a restarted process registers in a moment)."""
    def attempt():
        try:
            return stored(d, names)
        except StorageCorruptError:
            return None
    return wait_for(attempt, 20, "the repaired slot to answer", interval=0.2)


def kill_hard(d) -> None:
    """SIGKILL every process of the daemon, children first: nothing is flushed or checkpointed.

    The supervisor is stopped first, so that it cannot start a new child in between (which
    would outlive it, out of the fixture's reach).
    """
    import psutil
    d.proc.send_signal(signal.SIGSTOP)
    kids = d.children()
    for k in kids:
        k.send_signal(signal.SIGKILL)
    psutil.wait_procs(kids, timeout=10)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.parent.glob(path.name + "*")):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                h.update(f.name.encode() + f.read_bytes())
        else:
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def status(root: Path) -> dict:
    return orjson.loads(cli(root, "status", "--json").stdout)


def applied_all(root: Path, slot: int, records: int) -> bool:
    """Whether ``slot``'s DuckDB holds every durable record, at least ``records`` of them (as
    its last report says: a report from before the writes would show fewer)."""
    for p in status(root).get("processes", []):
        if p["role"] == "objectproc" and p["slot"] == slot:
            st = p.get("storage") or {}
            return (st.get("durable_seq") or 0) >= records and \
                st.get("applied_seq") == st["durable_seq"]
    return False


def slot_state(root: Path, slot: int) -> str:
    """From the status file (the CLI's own view is checked once per test)."""
    for p in read_status(root).get("processes", []):
        if p["role"] == "objectproc" and p["slot"] == slot:
            return p["state"]
    return "unknown"  # (no status file yet, or no such slot: wait_for reports it)


def damage_log(data: Path, kind: str) -> None:
    segs = list_segments(data / "slot-0.log")
    assert segs, "the log should hold the writes (no checkpoint yet)"
    if kind == "sealed":
        assert len(segs) >= 2, segs
        path = segs[0].path
    else:
        path = segs[-1].path
    raw = bytearray(path.read_bytes())
    used = len(raw.rstrip(b"\0"))
    at = SEGMENT_HEADER_SIZE + (used - SEGMENT_HEADER_SIZE) * 2 // 5
    if kind in ("flip", "sealed"):
        raw[at] ^= 0x40
        path.write_bytes(bytes(raw))
    elif kind == "zero_page":
        page = at - at % 4096
        raw[page:page + 4096] = bytes(4096)
        path.write_bytes(bytes(raw))
    elif kind == "truncate":
        os.truncate(path, at)


def lagging_log(tmp_path: Path, count: int, body: int):
    """Acknowledged writes whose only copy is the commit log (DuckDB put back to an older state).

    The applier feeds DuckDB within ~0.1 s of each write, so to damage records DuckDB does
    not hold, the test swaps in a copy of the slot's DuckDB file from before the writes (a
    consistent file: the log is the durability point, DuckDB a view that may lag).
    """
    data = tmp_path / "durable-data"
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        write(d, 0, 1)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
    shutil.copyfile(data / "slot-0.duckdb", tmp_path / "old.duckdb")
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        acked = write(d, 0, count, body=body)
        other = write(d, 1, 10)
        kill_hard(d)
    shutil.copyfile(tmp_path / "old.duckdb", data / "slot-0.duckdb")
    (data / "slot-0.duckdb.wal").unlink(missing_ok=True)
    return acked, other


@pytest.mark.parametrize("kind", ["flip", "zero_page", "truncate", "sealed"])
def test_damaged_commit_log_is_never_silent_and_repair_keeps_every_valid_write(tmp_path, kind):
    body = 24_000 if kind == "sealed" else 0  # ~170 records of 24 KB fill a 4 MiB segment
    acked, other = lagging_log(tmp_path, 200 if kind == "sealed" else 300, body)
    data = tmp_path / "durable-data"
    damage_log(data, kind)
    before = digest(data / "slot-0")

    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()  # ready although slot 0 is corrupt: the other slot serves
        wait_for(lambda: slot_state(tmp_path, 0) == "corrupt", 20, "slot 0 shown as corrupt")
        assert stored(d, other) == other  # slot 1 serves, with its writes
        with durable.connect_sync(d.frontend) as c, pytest.raises(StorageCorruptError, match="verify"):
            ns = c.namespace("KV")
            ns.get(ns.id_from_name(next(iter(acked)))).fetch("http://do/", timeout=5)
        assert digest(data / "slot-0") == before, "a corrupt slot's files must stay untouched"
        assert "durable verify --slot 0" in d.log_text()
        assert "CORRUPT" in cli(tmp_path, "status").stdout

        v = cli(tmp_path, "verify", "--slot", "0", "--json", check=False)
        assert v.returncode == 1
        report = orjson.loads(v.stdout)["slots"][0]
        assert not report["ok"] and report["damage"], report

        r = orjson.loads(cli(tmp_path, "repair", "--slot", "0", "--yes", "--json").stdout)
        assert r["repaired"] and Path(r["quarantine"]).is_dir()
        lost = sum(b - a + 1 for a, b in r["records_lost"])
        wait_for(lambda: slot_state(tmp_path, 0) == "running", 20, "slot 0 back after repair")
        got = answering(d, acked)
        missing = sum(len(acked[n] - got[n]) for n in acked)
        assert all(got[n] <= acked[n] for n in acked)  # nothing invented
        if kind == "truncate":  # how many records the cut took is unknown: repair says so
            assert r["unknown_loss"] and "truncated" in r["unknown_loss"][0]
            assert missing >= 1
        else:  # every write is one record: what is missing is exactly what repair reported
            assert missing == lost >= 1, (missing, r["records_lost"])
        print(f"{kind}: {sum(map(len, acked.values()))} acknowledged, {missing} lost, "
              f"reported: {r['records_lost']} {r['unknown_loss']}")
        assert cli(tmp_path, "verify", "--slot", "0").returncode == 0


def test_damage_among_records_duckdb_holds_loses_nothing_and_keeps_the_evidence(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        acked = write(d, 0, 300)
        # the applier has fed them to DuckDB (its WAL; no checkpoint yet)
        wait_for(lambda: applied_all(tmp_path, 0, 300), 30,
                 "slot 0 to apply every durable record")
        kill_hard(d)
    data = tmp_path / "durable-data"
    damage_log(data, "flip")
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        assert stored(d, acked) == acked
        assert "only among records DuckDB already holds" in d.log_text()
        assert list((data / "quarantine").glob("*-slot-0-log/*.seg"))


def test_torn_tail_after_sigkill_is_not_corruption(tmp_path):
    """The normal crash case still recovers by itself: a half-written last group is dropped."""
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        acked = write(d, 0, 50)
        kill_hard(d)
    seg = list_segments(tmp_path / "durable-data" / "slot-0.log")[-1].path
    raw = bytearray(seg.read_bytes())
    end = len(raw.rstrip(b"\0"))
    raw[end:end + 40] = os.urandom(40)  # a group that was being written when the power went
    seg.write_bytes(bytes(raw))
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        assert stored(d, acked) == acked
        assert "torn write" in d.log_text()


def corrupt_a_data_block(path: Path) -> None:
    """Flip a byte in the first DuckDB block whose damage a full scan reports."""
    original = path.read_bytes()
    for block in range(1, len(original) // 262144 + 1):
        raw = bytearray(original)
        raw[12288 + block * 262144 + 5000] ^= 0xFF
        path.write_bytes(bytes(raw))
        try:
            con = duckdb.connect(str(path), read_only=True)
            try:
                con.execute("SELECT count(*), sum(octet_length(v)) FROM kv").fetchall()
            finally:
                con.close()
        except duckdb.Error:
            return
    path.write_bytes(original)
    raise AssertionError("no data block found to damage")


def test_damaged_duckdb_file_marks_the_slot_corrupt_and_repair_reports_the_loss(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        acked = write(d, 0, 40, body=20_000)
        other = write(d, 1, 5)
        d.proc.send_signal(signal.SIGTERM)  # a clean stop: everything checkpointed into the file
        assert d.proc.wait(timeout=30) == 0
    data = tmp_path / "durable-data"
    corrupt_a_data_block(data / "slot-0.duckdb")
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        # DuckDB checks a block when it reads it: the first read of a damaged block fails the
        # call with StorageCorruptError and takes the slot out of service as corrupt.
        with pytest.raises((StorageCorruptError, durable.ObjectError, durable.StubBrokenError)) as e:
            stored(d, acked)
        assert "damaged" in str(e.value) or "corrupt" in str(e.value).lower(), e.value
        wait_for(lambda: slot_state(tmp_path, 0) == "corrupt", 20, "slot 0 shown as corrupt")
        assert stored(d, other) == other
        v = orjson.loads(cli(tmp_path, "verify", "--json", check=False).stdout)
        bad = [s for s in v["slots"] if not s["ok"]]
        assert [s["slot"] for s in bad] == [0] and bad[0]["duckdb_ok"] is False
        assert "checksum" in bad[0]["duckdb_error"].lower()
        r = orjson.loads(cli(tmp_path, "repair", "--slot", "0", "--yes", "--json").stdout)
        assert r["repaired"] and (Path(r["quarantine"]) / "slot-0.duckdb").exists()
        wait_for(lambda: slot_state(tmp_path, 0) == "running", 20, "slot 0 back after repair")
        got = answering(d, acked)
        kept = sum(len(got[n]) for n in acked)
        print(f"duckdb damage: {kept} of {sum(map(len, acked.values()))} writes readable, "
              f"repair said up to {r['duckdb_rows_lost_at_most']} rows lost")
        assert all(got[n] <= acked[n] for n in acked)


def test_a_checkpoint_cut_short_loses_nothing(tmp_path):
    """The CI failure of 2026-12-04: a SIGKILL during a checkpoint cut DuckDB's in-place
    rewrite of its metadata block short, and the next start found the file damaged (every
    row of the slot unreadable). Here the files are left as such a kill leaves them: the
    checkpoint kept its pre-image, wrote its data blocks and the first pages of the
    metadata block, and died before the header; the WAL and commit log are still there."""
    from durable.objectproc.storage.duck import DuckStore
    from durable.objectproc.storage.preimage import HEADERS, image_path, kept_path
    data = tmp_path / "durable-data"
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        acked = write(d, 0, 20, body=3000)
        d.proc.send_signal(signal.SIGTERM)  # checkpointed: the file now has metadata blocks
        assert d.proc.wait(timeout=30) == 0
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        more = write(d, 0, 20, body=3000)
        wal = data / "slot-0.duckdb.wal"
        # (the applier's transaction committed, not only begun: a WAL past its size while the
        # commit was still being written, cut there, lacked its flush mark, and DuckDB left
        # the whole of it out; a CI-like run of 2026-12-07 then found nothing to checkpoint)
        wait_for(lambda: applied_all(tmp_path, 0, 40), 20, "the applier's commit")
        assert wal.exists() and wal.stat().st_size > 20 * 3000
        kill_hard(d)  # no checkpoint since: these writes are in the WAL and the log only
    path = data / "slot-0.duckdb"
    before, wal = path.read_bytes(), Path(f"{path}.wal").read_bytes()
    store = DuckStore(path)  # the checkpoint a kill will cut short, run here to its end
    store.checkpoint()
    store.close()
    after = path.read_bytes()
    assert image_path(path).exists() and after[:HEADERS] != before[:HEADERS]
    block = HEADERS  # block 0: the metadata block the CI failure named ("location 12288")
    assert before[block:block + 8] != after[block:block + 8], "block 0 was not rewritten"
    torn = bytearray(after)
    torn[:HEADERS] = before[:HEADERS]  # the header is written last: still the old one
    torn[block + 3 * 4096:block + 256 * 1024] = before[block + 3 * 4096:block + 256 * 1024]
    path.write_bytes(torn)
    Path(f"{path}.wal").write_bytes(wal)
    con = None
    with pytest.raises(duckdb.Error, match="checksum"):  # what DuckDB alone makes of it
        con = duckdb.connect(str(path), read_only=True)
        con.execute("SELECT count(*) FROM kv").fetchall()
    if con is not None:
        con.close()
    v = orjson.loads(cli(tmp_path, "verify", "--json", check=False).stdout)
    assert "a checkpoint was cut short" in v["slots"][0]["duckdb_error"], v
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        want = {n: acked.get(n, set()) | more.get(n, set()) for n in {*acked, *more}}
        assert stored(d, want) == want
        assert slot_state(tmp_path, 0) == "running"
        assert "its last checkpoint was cut short" in (tmp_path / "serve.log").read_text()
        with durable.connect_sync(d.frontend) as c:
            def put_back():
                got = {s["slot"]: s["reported"].get("checkpoints_put_back")
                       for s in c.statistics()["slots"]}
                return got if None not in got.values() else None
            put_back = wait_for(put_back, 10, "every slot's statistics")
        assert put_back == {0: 1, 1: 0}, put_back
    assert kept_path(path).exists()
    v = orjson.loads(cli(tmp_path, "verify", "--json").stdout)
    assert all(s["ok"] for s in v["slots"]), v


def test_data_dir_removed_while_serving_stops_the_daemon_and_nothing_starts_silently(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        write(d, 0, 5)
        shutil.rmtree(tmp_path / "durable-data")
        code = d.proc.wait(timeout=30)
        assert code == 74, d.log_text()
        assert "removed or replaced while" in d.log_text()
        wait_for(lambda: not d.children(), 10, "no children left")


def test_data_dir_with_files_but_no_identity_is_refused(tmp_path):
    data = tmp_path / "durable-data"
    data.mkdir()
    (data / "slot-0.duckdb").write_bytes(b"")  # e.g. a partial copy
    with serving(tmp_path, CONFIG) as d:
        assert d.proc.wait(timeout=30) == 74
        assert "has no identity and no secret" in d.log_text()
    assert (data / "slot-0.duckdb").read_bytes() == b""  # nothing touched


def test_first_start_says_where_it_creates_the_data_dir(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        assert f"creating a new data dir at {tmp_path / 'durable-data'}" in d.log_text()
        assert (tmp_path / "durable-data" / "identity").exists()


def test_slot_files_of_another_data_dir_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        with serving(root, CONFIG) as d:
            d.wait_ready()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(timeout=30) == 0
    shutil.copyfile(b / "durable-data" / "slot-1.duckdb", a / "durable-data" / "slot-1.duckdb")
    with serving(a, CONFIG) as d:
        assert d.proc.wait(timeout=60) == 74
        assert "belongs to data dir" in d.log_text()


def test_supervisor_survives_a_status_file_it_cannot_write(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()
        run = tmp_path / "durable-data" / "run"
        for _ in range(200):  # every write of the status file now fails (the supervisor's own
            try:  # status.tmp exists for a moment during each write: try again then)
                (run / "status.tmp").mkdir()
                break
            except FileExistsError:
                time.sleep(0.01)
        wait_for(lambda: "cannot write the status file" in d.log_text(), 10, "the failure logged")
        time.sleep(1.5)
        assert d.proc.poll() is None
        assert d.log_text().count("cannot write the status file") == 1  # once a minute at most
        acked = write(d, 0, 3)
        assert stored(d, acked) == acked
        (run / "status.tmp").rmdir()
        wait_for(lambda: cli(tmp_path, "status", check=False).returncode == 0, 10, "status again")
