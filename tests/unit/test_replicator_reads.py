"""Replicator._read (objectproc/replication.py) against a fake slot log: a subscription that
stays silent (made around a stream's election) is given up after ``_READ_WAIT`` and the read
asks again; a read cut short goes on from its last message. No NATS: the log is a list."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("nats")

from durable.objectproc import replication  # noqa: E402
from durable.objectproc.replication import Replicator  # noqa: E402


class _Log:
    """Messages 1..n; each read is told what to do by ``script``: "silent" waits out its
    timeout and raises, an int delivers that many messages then stalls, "all" delivers the
    rest."""

    def __init__(self, n: int, script: list[str | int]) -> None:
        self.messages = [(seq, f"m{seq}".encode()) for seq in range(1, n + 1)]
        self.script = list(script)
        self.calls: list[tuple[int, float]] = []

    async def read(self, after: int, last: int, timeout: float,
                   out: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        self.calls.append((after, timeout))
        step = self.script.pop(0)
        todo = [m for m in self.messages if after < m[0] <= last]
        if step == "all":
            out.extend(todo)
            return out
        out.extend(todo[:0 if step == "silent" else int(step)])
        await asyncio.sleep(timeout)
        raise TimeoutError("no message within the wait")


@pytest.fixture
def replicator(monkeypatch):
    monkeypatch.setattr(replication, "_READ_WAIT", 0.05)
    r = Replicator(["nats://127.0.0.1:1"], 0)
    yield r
    r.close()


def test_a_silent_subscription_is_asked_again_after_the_wait(replicator):
    replicator.slot_log = log = _Log(6, ["silent", "silent", "all"])
    assert replicator._read(0, 6) == log.messages
    assert log.calls == [(0, 0.05)] * 3  # (each try waited _READ_WAIT, not the 10 s of before)


def test_a_read_cut_short_goes_on_from_its_last_message(replicator):
    replicator.slot_log = log = _Log(10, [3, "silent", 4, "all"])
    assert replicator._read(0, 10) == log.messages  # every message once, in order
    assert [after for after, _ in log.calls] == [0, 3, 3, 7]


def test_a_read_that_stays_silent_past_the_stall_bound_raises(replicator):
    replicator.slot_log = _Log(5, ["silent"] * 100)
    with pytest.raises(TimeoutError):
        replicator._read(0, 5, stall=0.2)
