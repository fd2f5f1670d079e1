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
import time

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


CEILING = """
slots = 1
duckdb_memory_mb = 64
memory_limit_mb = 264
checkpoint_wal_mb = 2
idle_timeout = 1
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""


async def write_until_refused(frontend: str, limit: int) -> tuple[list[int], str | None, int]:
    """New objects, 8 calls in flight, until a write is refused; returns the acknowledged
    ones, the refusal's message and how many calls broke (a graceful restart for
    ``memory_limit_mb`` breaks the stubs of the calls it finds in flight: they may have run)."""
    async with durable.connect(frontend, timeout=60) as c:
        ns = c.namespace("COUNTER")
        todo = iter(range(limit))
        done: list[int] = []
        refused: list[str] = []
        broken = 0

        async def worker() -> None:
            nonlocal broken
            for i in todo:
                if refused:
                    return
                try:
                    r = await ns.get(ns.id_from_name(f"obj-{i}")).fetch("http://do/inc",
                                                                        method="POST")
                except durable.StorageFullError as e:
                    refused.append(str(e))
                    return
                except durable.StubBrokenError:
                    broken += 1
                    continue
                assert r.status == 200 and await r.text() == "1"
                done.append(i)

        await asyncio.gather(*[worker() for _ in range(8)])
        return done, refused[0] if refused else None, broken


def failed_restarts(proc: dict) -> int:
    """Restarts other than the supervisor's for ``memory_limit_mb``. That one is graceful (the
    writes are made durable first) and is the limit doing its job: the object process's Python
    share is an estimate (~150-170 MiB measured beside DuckDB's 64 MB, against 200), and one CI
    run went over it. What this test guards against, a slot failing, is any other restart."""
    causes = proc["restart_causes"]
    assert sum(causes.values()) == proc["restarts"], proc
    return proc["restarts"] - causes.get("memory_limit", 0)


def why_restarted(d) -> str:
    return "\n".join(line for line in d.log_text().splitlines()
                     if any(w in line for w in ("exited", "over memory_limit", "failed", "restart",
                                                "killed", "hung")))


def test_at_its_memory_ceiling_a_slot_refuses_writes_and_keeps_serving(tmp_path):
    """``memory_limit_mb = 264`` caps DuckDB's memory at 64 MB (a ceiling of 20 MB left DuckDB too
    little beside its indexes: a replay at open ran out of memory, seen under load). Before, the indexes filled it,
    a commit failed, DuckDB invalidated the file and the slot failed and could not open
    again. Now writes are refused with what to do, reads go on, and after SIGKILL every
    acknowledged write is there."""
    root = tmp_path / "root"
    with serving(root, CEILING) as d:
        d.wait_ready()
        done, refusal, broken = asyncio.run(write_until_refused(d.frontend, 200_000))
        assert refusal is not None and "memory_limit_mb" in refusal, (refusal, len(done))
        assert broken == 0 or "over memory_limit_mb" in d.log_text(), why_restarted(d)
        for _ in range(30):  # (status is as of the slot's last heartbeat: each second)
            proc = storage(root)
            if proc["state"] != "running":
                break
            time.sleep(0.2)
        assert proc["state"] == "storage-full", why_restarted(d)
        assert failed_restarts(proc) == 0, why_restarted(d)
        assert proc["storage"]["storage_full_why"] == "memory"
        assert "raise memory_limit_mb" in cli(root, "status").stdout
        assert "storage failed" not in d.log_text(), d.log_text()[-3000:]
        kill_hard(d)
    with serving(root, CEILING) as d:
        d.wait_ready(timeout=60)
        sample = random.Random(7).sample(done, 200)

        async def read_back() -> list[str]:
            async with durable.connect(d.frontend, timeout=60) as c:
                ns = c.namespace("COUNTER")
                return [await (await ns.get(ns.id_from_name(f"obj-{i}")).fetch("http://do/")).text()
                        for i in sample]
        assert asyncio.run(read_back()) == ["1"] * len(sample)
        proc = storage(root)
        assert failed_restarts(proc) == 0, why_restarted(d)
