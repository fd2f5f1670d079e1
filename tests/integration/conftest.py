"""Fixtures shared by the integration tests: a real broker and object processes, and a client."""

from __future__ import annotations

import contextlib

import pytest

import durable
from tests.integration.cluster import all_slots_up, running_cluster


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
            yield c
    except BaseException:
        print(cluster.log_tail())
        raise


@pytest.fixture
async def client(cluster):
    async with connected(cluster) as c:
        yield c
