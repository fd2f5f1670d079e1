"""The supervisor's side of cluster mode (supervisor/host.py) on a real NATS JetStream
server, without the rest of the daemon: the test plays the supervisor's main loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable.ids import load_or_create_secret
from durable.supervisor.config import Config, from_dict
from durable.supervisor.host import ClusterError, ClusterHost
from tests.integration.clusterhosts import cluster_key
from tests.integration.natscluster import jetstream_ready, nats_cluster
from tests.integration.procs import free_port, wait_for

pytestmark = pytest.mark.slow  # a real nats-server

SLOTS = 2
LEASE = 1.0


def _config(root: Path, urls: list[str], host: str, data_name: str | None = None) -> Config:
    data = root / (data_name or host)
    raw = {"data_dir": str(data), "slots": SLOTS,
           "namespaces": {"COUNTER": {"class": "tests.integration.objects:Counter"}},
           "cluster": {"nats": ",".join(urls), "host_id": host, "replicas": 1, "lease": LEASE,
                       "listen": f"127.0.0.1:{free_port()}",
                       "curve_key": str(cluster_key(root))}}
    config = from_dict(raw, f"{host}.toml")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    load_or_create_secret(data, create=True)
    return config


@contextlib.contextmanager
def _turning(host: ClusterHost) -> Iterator[threading.Event]:
    """The supervisor's main loop, turning every 0.1 s until the event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            host.turned()
            time.sleep(0.1)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join()


def test_a_host_whose_main_loop_stopped_turning_lets_its_slots_go(tmp_path, caplog):
    """A supervisor whose main loop hangs cannot start or stop object processes; if its
    cluster thread went on renewing, its slots would be held and never served."""
    with nats_cluster(tmp_path / "nats") as nats:
        asyncio.run(jetstream_ready(nats.urls, 60))
        a = ClusterHost(_config(tmp_path, nats.urls, "a"))
        b = ClusterHost(_config(tmp_path, nats.urls, "b"))
        try:
            with _turning(a) as a_loop:
                a.join(30)
                wait_for(lambda: a.wanted() == frozenset(range(SLOTS)), 10, "a holding every slot")
                with _turning(b):
                    b.join(30)
                    # Both turn: each holds one slot once b asked for its share.
                    wait_for(lambda: len(a.wanted()) == len(b.wanted()) == 1, 20,
                             "one slot each")
                    a_loop.set()  # a's loop hangs from here (its cluster thread runs on)
                    hung = time.monotonic()
                    wait_for(lambda: b.wanted() == frozenset(range(SLOTS)), 10 * LEASE,
                             "b holding every slot once a's loop hung", 0.05)
                    assert time.monotonic() - hung < 6 * LEASE
                    assert a.wanted() == frozenset()  # (its lease file ran out as well)
                    # and the log says where the main thread waits (here: the test's own)
                    said = [r.getMessage() for r in caplog.records if "not turned" in r.getMessage()]
                    assert said and "test_cluster_host.py" in said[0], said
        finally:
            a.close()
            b.close()


def test_a_second_host_given_the_same_host_id_refuses_to_join_and_a_restart_does_not(tmp_path):
    """Two hosts given one host_id (a config copied to a second machine) both took every slot
    that name held and served each object twice at once, for as long as both ran (measured
    with two daemons: 98 of 100 status samples over 25 s). The newcomer hears the running
    one announce itself while it listens before claiming anything, and refuses; the running
    one keeps its slots. A restart of that host (the same name, its earlier run gone) joins."""
    with nats_cluster(tmp_path / "nats") as nats:
        asyncio.run(jetstream_ready(nats.urls, 60))
        a = ClusterHost(_config(tmp_path, nats.urls, "a"))
        twin = ClusterHost(_config(tmp_path, nats.urls, "a", data_name="elsewhere"))
        again = None
        try:
            with _turning(a):
                a.join(30)
                wait_for(lambda: a.wanted() == frozenset(range(SLOTS)), 10, "a holding every slot")
                with _turning(twin):
                    began = time.monotonic()
                    with pytest.raises(ClusterError, match="another process runs as cluster "
                                                           "host 'a'.*serves nothing"):
                        twin.join(30)
                    assert time.monotonic() - began < 10 * LEASE
                    assert twin.wanted() == frozenset()
                time.sleep(3 * LEASE)
                assert a.wanted() == frozenset(range(SLOTS))  # undisturbed
            a.close()
            again = ClusterHost(_config(tmp_path, nats.urls, "a"))
            with _turning(again):
                again.join(30)  # (the earlier run's last announcement is not a twin)
                wait_for(lambda: again.wanted() == frozenset(range(SLOTS)), 10 * LEASE,
                         "the restarted host holding every slot")
        finally:
            for h in (a, twin, again):
                if h is not None:
                    h.close()


def test_of_two_daemons_with_one_host_id_the_younger_stops_when_it_hears_the_older(tmp_path):
    """A twin the newcomer could not hear while it listened (the running host was frozen by
    SIGSTOP): once the frozen one runs again, each hears the other; the younger (fewer
    announcements) stops serving and says why, the older takes its slots back."""
    import signal

    from tests.integration.clusterhosts import host_config, stop_host
    from tests.integration.daemon import serving

    with nats_cluster(tmp_path / "nats") as nats, contextlib.ExitStack() as stack:
        old = stack.enter_context(serving(tmp_path / "old", host_config(nats, "h1", slots=4,
                                                                         lease=2.0)))
        old.wait_ready(60)
        wait_for(lambda: old.status().get("cluster", {}).get("slots") == [0, 1, 2, 3], 30,
                 "the first host holding every slot")
        time.sleep(2)  # (a few announcements: it is the older)
        stop_host(old, signal.SIGSTOP)
        try:
            young = stack.enter_context(serving(tmp_path / "young", host_config(
                nats, "h1", slots=4, lease=2.0)))
            young.wait_ready(60)
            wait_for(lambda: young.status().get("cluster", {}).get("slots") == [0, 1, 2, 3],
                     30, "the second host, alone in hearing, holding every slot")
        finally:
            stop_host(old, signal.SIGCONT)
        wait_for(lambda: young.status().get("cluster", {}).get("slots") == [], 20,
                 "the younger serving nothing")
        wait_for(lambda: old.status().get("cluster", {}).get("slots") == [0, 1, 2, 3], 30,
                 "the older holding every slot again")
        assert "another process runs as cluster host 'h1'" in young.log_text()
        assert "this host runs longer, so that one stops" in old.log_text()
        time.sleep(3)
        assert young.status().get("cluster", {}).get("slots") == []  # (for good)
