"""Cluster mode's replicated slot log (objectproc/replication.py, docs/cluster.md) under real
SlotStores (real DuckDB files, real log segments) and a real 3-node NATS JetStream cluster:
a host that takes a slot replays what the previous owner wrote, fences the log so that the
previous owner's next write is refused (and not acknowledged), and a data dir that holds
records the cluster's log does not is refused with a clear error."""

from __future__ import annotations

import asyncio

import pytest

from durable.errors import StorageCommitError, StorageCorruptError
from durable.objectproc.replication import Replicator
from durable.objectproc.storage import SlotStore
from tests.integration.natscluster import jetstream_ready, nats_cluster

pytestmark = pytest.mark.slow  # a real 3-node cluster

OBJ = b"Counter/obj-1"


async def _open(path, urls, slot=0):  # noqa: ANN001, ANN202
    path.mkdir(parents=True, exist_ok=True)
    rep = Replicator(urls, slot, timeout=5.0, hint=path / f"slot-{slot}.stream")
    await asyncio.to_thread(rep.connect, 30.0)
    return SlotStore(path, slot, replication=rep), rep


async def _write(store: SlotStore, key: str, value: bytes) -> None:
    await store.wait_durable(store.submit(OBJ, False, {key: value}))


def test_a_new_owner_replays_the_log_and_the_old_one_is_fenced(tmp_path):
    async def main(urls: list[str]) -> None:
        await jetstream_ready(urls)
        a, rep_a = await _open(tmp_path / "a", urls)
        for i in range(50):
            await _write(a, f"k{i:03d}", b"%d" % i)
        before = rep_a.appended
        seqs = [a.submit(OBJ, False, {f"big{i}": bytes(30_000)}, kick=False) for i in range(60)]
        await a.wait_durable(seqs[-1])  # one group of 1.8 MB: several messages of <= 1 MB
        assert rep_a.appended - before >= 2
        with pytest.raises(StorageCommitError, match="max_payload"):  # a 2 MB record
            await a.wait_durable(a.submit(OBJ, False, {f"huge{i}": bytes(20_000)
                                                       for i in range(100)}))
        a.abandon()
        rep_a.close()
        a, rep_a = await _open(tmp_path / "a", urls)  # (the process restarts)
        assert a.read(OBJ, "huge0") is None and a.read(OBJ, "big59") == bytes(30_000)

        b, rep_b = await _open(tmp_path / "b", urls)  # takes the slot: replays, then fences
        assert b.caught_up == 110  # (an empty data dir: every record)
        assert [b.read(OBJ, f"k{i:03d}") for i in range(50)] == [b"%d" % i for i in range(50)]
        assert b.read(OBJ, "big59") == bytes(30_000)

        with pytest.raises(StorageCommitError):  # a's write after the takeover is refused
            await _write(a, "k000", b"stale")
        a.abandon()
        rep_a.close()
        await _write(b, "k001", b"from b")
        await b.close()
        rep_b.close()

        a2, rep_a2 = await _open(tmp_path / "a", urls)  # a serves it again: b's write replayed
        assert a2.read(OBJ, "k001") == b"from b"
        assert a2.read(OBJ, "k000") == b"0"  # the refused write is nowhere
        assert a2.caught_up == 1
        await _write(a2, "k002", b"from a2")
        await a2.close()
        rep_a2.close()

        b2, rep_b2 = await _open(tmp_path / "b", urls)  # b again: its hint skips what it has
        assert rep_b2.read_from > 0
        assert b2.caught_up == 1 and b2.read(OBJ, "k002") == b"from a2"
        assert b2.read(OBJ, "k001") == b"from b" and b2.read(OBJ, "k049") == b"49"
        await b2.close()
        rep_b2.close()

    with nats_cluster(tmp_path / "nats") as cluster:
        asyncio.run(main(cluster.urls))


def test_a_data_dir_ahead_of_the_clusters_log_is_refused(tmp_path):
    async def main(urls: list[str]) -> None:
        await jetstream_ready(urls)
        local = SlotStore(tmp_path / "d", 3)  # single-host mode: not in the cluster's log
        await _write(local, "k", b"1")
        await local.close()
        rep = Replicator(urls, 3)
        await asyncio.to_thread(rep.connect, 30.0)
        with pytest.raises(StorageCorruptError, match="not made in this cluster"):
            SlotStore(tmp_path / "d", 3, replication=rep)
        rep.close()

    with nats_cluster(tmp_path / "nats") as cluster:
        asyncio.run(main(cluster.urls))


def test_a_catch_up_cut_short_reads_on_from_where_it_stopped(tmp_path, monkeypatch):
    """A long absence means a long read; each try that is cut short (a leader election, a
    busy machine) keeps what it got. Before, the whole read had to fit in 10 s, and a host
    back from a long absence read the same first part again and again (a chaos run)."""
    from nats.errors import TimeoutError as NatsTimeoutError

    from durable.supervisor.cluster import SlotLog

    async def main(urls: list[str]) -> None:
        await jetstream_ready(urls)
        a, rep_a = await _open(tmp_path / "a", urls, slot=5)
        for i in range(120):
            await _write(a, f"k{i:03d}", b"%d" % i)
        await a.close()
        rep_a.close()

        real, calls = SlotLog.read, []

        async def short(self, after, last, timeout=30.0, out=None):  # noqa: ANN001, ANN202
            calls.append(after)  # each try gets 25 messages at most, then "times out"
            part: list = []
            await real(self, after, min(last, after + 1_000_000), timeout, part)
            out.extend(part[:25])
            if len(part) > 25:
                raise NatsTimeoutError()
            return out

        monkeypatch.setattr(SlotLog, "read", short)
        b, rep_b = await _open(tmp_path / "b", urls, slot=5)  # (no files: reads it all)
        assert [b.read(OBJ, f"k{i:03d}") for i in range(120)] == [b"%d" % i for i in range(120)]
        assert len(calls) >= 5 and calls == sorted(calls) and len(set(calls)) == len(calls)
        await b.close()
        rep_b.close()

    with nats_cluster(tmp_path / "nats") as cluster:
        asyncio.run(main(cluster.urls))
