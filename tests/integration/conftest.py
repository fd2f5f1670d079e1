"""Fixtures shared by the integration tests: a real broker and object processes, and a client."""

from __future__ import annotations

import contextlib

import pytest

import durable
from tests.integration.cluster import all_slots_up, running_cluster
from tests.integration.procs import async_wait_for


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path, slots=2) as c:
        yield c


@contextlib.asynccontextmanager
async def connected(cluster):
    """A client of ``cluster`` once every slot is up; its processes' log tails if it fails."""
    try:
        async with durable.connect(cluster.frontend, timeout=10) as c:
            await all_slots_up(c)
            if c.peers is not None:  # (so that every stub the test makes takes one path)
                await async_wait_for(lambda: c.peers.statistics()["peer_links_up"]
                                     == len(c.peers.links), 10, "the client's peer links")
            yield c
    except BaseException:
        print(cluster.log_tail())
        raise


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One cluster for a module's tests that only call objects (each uses names of its own
    and kills nothing): starting a cluster costs 1.2-2 s, most of those tests' time."""
    with running_cluster(tmp_path_factory.mktemp("shared"), slots=2) as c:
        yield c


@pytest.fixture
async def client(request):
    """A client of the test's own ``cluster`` if it asks for one (to kill or restart its
    processes), else of the module's shared one."""
    name = "cluster" if "cluster" in request.fixturenames else "shared_cluster"
    async with connected(request.getfixturevalue(name)) as c:
        yield c
