"""An object process's threads carry their names in the OS (what top -H, ps -L and
scripts/cpu_split.py read from /proc), not only in Python."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.procs import async_wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")


def _thread_names(pid: int) -> set[str]:
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:  # (a thread that ended meanwhile)
            pass
    return names


async def test_an_object_process_names_its_threads(client, cluster):
    await (await client.namespace("COUNTER").get_by_name("threads").fetch(
        "http://c/", method="POST")).text()  # (a write: every storage thread has started)
    pid = cluster.workers[0].pid

    async def named() -> bool:
        return {"applier", "commit-log", "beat"} <= _thread_names(pid)

    await async_wait_for(named, 10, f"the threads of {pid} to be named: {_thread_names(pid)}")
