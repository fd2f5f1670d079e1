"""A slot whose DuckDB indexes outgrow ``duckdb_memory_mb`` keeps serving.

Found while measuring #18: DuckDB keeps its ART indexes in memory and cannot evict them,
~650 bytes per named object. A slot that outgrew the limit (~700k objects on the default
512 MB) failed every commit, restarted, failed its open ("restarting will not help") and
stopped serving. Here the limit is the smallest allowed (16 MB) so that 40,000 objects cross
it; the daemon must acknowledge every write, say what to set, and open again after SIGKILL.
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

import durable
from tests.integration.daemon import serving
from tests.integration.test_storage_faults import cli, kill_hard

pytestmark = pytest.mark.slow  # real processes, ~25 s: the full suite runs it

CONFIG = """
slots = 1
duckdb_memory_mb = 16
checkpoint_wal_mb = 2
idle_timeout = 2
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
N = 40_000


async def write_all(frontend: str, n: int) -> int:
    """Each of ``n`` objects incremented once, 64 calls in flight; returns how many answered 1."""
    async with durable.connect(frontend, timeout=60) as c:
        ns = c.namespace("COUNTER")
        todo = iter(range(n))
        ones = 0

        async def worker() -> None:
            nonlocal ones
            for i in todo:
                r = await ns.get(ns.id_from_name(f"obj-{i}")).fetch("http://do/inc", method="POST")
                ones += r.status == 200 and await r.text() == "1"

        await asyncio.gather(*[worker() for _ in range(64)])
        return ones


def storage(root) -> dict:
    st = orjson.loads(cli(root, "status", "--json").stdout)
    return next(p for p in st["processes"] if p["role"] == "objectproc")


def test_a_slot_whose_indexes_outgrow_duckdb_memory_keeps_serving_and_reopens(tmp_path):
    root = tmp_path / "root"
    with serving(root, CONFIG) as d:
        d.wait_ready()
        assert asyncio.run(write_all(d.frontend, N)) == N  # every write acknowledged
        proc = storage(root)
        assert proc["restarts"] == 0 and proc["state"] == "running", proc
        limit = proc["storage"]["duckdb_memory_limit"]
        assert limit > 16 * 10**6, proc["storage"]  # it grew, and status says so
        # (as last measured: high while it writes, low just after a checkpoint wrote them out)
        assert proc["storage"]["duckdb_index_bytes"] >= 0, proc["storage"]
        log = d.log_text()
        assert "set duckdb_memory_mb = " in log, log[-3000:]
        assert "storage failed" not in log and "cannot be opened" not in log, log[-3000:]
        kill_hard(d)  # nothing checkpointed: the next open replays into the same indexes
    with serving(root, CONFIG) as d:
        d.wait_ready(timeout=60)
        sample = random.Random(7).sample(range(N), 300)

        async def read_back() -> list[str]:
            async with durable.connect(d.frontend, timeout=60) as c:
                ns = c.namespace("COUNTER")
                got = [await (await ns.get(ns.id_from_name(f"obj-{i}")).fetch("http://do/")).text()
                       for i in sample]
                r = await ns.get(ns.id_from_name("obj-new")).fetch("http://do/inc", method="POST")
                return [*got, await r.text()]
        assert asyncio.run(read_back()) == ["1"] * len(sample) + ["1"]
        proc = storage(root)
        assert proc["restarts"] == 0 and proc["state"] == "running", (proc, d.log_text()[-3000:])
