"""Fixtures shared by the integration tests: a real broker and object processes, and a client."""

from __future__ import annotations

import pytest

import durable
from tests.integration.cluster import all_slots_up, running_cluster


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path, slots=2) as c:
        yield c


@pytest.fixture
async def client(cluster):
    try:
        async with durable.connect(cluster.frontend, timeout=10) as c:
            await all_slots_up(c)
            yield c
    except BaseException:
        print(cluster.log_tail())
        raise
