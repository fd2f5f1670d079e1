"""A client flooding one object: bounded memory, an answer for every call, others keep working."""

from __future__ import annotations

import asyncio
import statistics
import time

import psutil
import pytest

import durable
from tests.integration.daemon import serving

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it

CONFIG = """
slots = 2
[broker]
heartbeat = 0.5
[namespaces.NOOP]
class = "tests.integration.objects:Noop"
"""
FLOOD = 100_000
RSS_BOUND = 600 * 2**20  # the whole daemon (broker + 2 object processes + supervisor)


def daemon_rss(d) -> int:
    total = 0
    for p in [psutil.Process(d.proc.pid), *d.children()]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


async def latencies(client, n=200):
    ns = client.namespace("NOOP")
    stubs = [ns.get(ns.id_from_name(f"other{i}")) for i in range(5)]
    out = []
    for i in range(n):
        t = time.perf_counter()
        await stubs[i % 5].fetch("http://do/")
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def test_flood_of_100000_unawaited_calls(tmp_path):
    with serving(tmp_path, CONFIG) as d:
        d.wait_ready()

        async def main():
            async with durable.connect(d.frontend, timeout=60) as flooder, \
                    durable.connect(d.frontend, timeout=60) as other:
                normal = await latencies(other)
                ns = flooder.namespace("NOOP")
                stub = ns.get(ns.id_from_name("target"))
                rss = [daemon_rss(d)]
                calls = [asyncio.ensure_future(stub.fetch("http://do/")) for _ in range(FLOOD)]
                during = []
                while not all(c.done() for c in calls[-100:]):
                    during.append(await latencies(other, 20))
                    rss.append(daemon_rss(d))
                results = await asyncio.gather(*calls, return_exceptions=True)
                return normal, during, rss, results

        normal, during, rss, results = asyncio.run(main())
        kinds = {type(r).__name__ for r in results}
        ok = sum(isinstance(r, durable.Response) for r in results)
        overloaded = sum(isinstance(r, durable.OverloadedError) for r in results)
        ratio = statistics.median(during) / normal if during else 1.0
        print(f"flood: {ok} answered, {overloaded} overloaded; daemon RSS peak "
              f"{max(rss) / 2**20:.0f} MiB; other objects' p50 {normal * 1e3:.2f} ms normal, "
              f"{statistics.median(during) * 1e3 if during else 0:.2f} ms during (x{ratio:.1f})")
        assert kinds <= {"Response", "OverloadedError"}, kinds
        assert ok + overloaded == FLOOD and ok > 0
        assert max(rss) < RSS_BOUND, f"{max(rss) / 2**20:.0f} MiB"
        # Objects on the flooded slot queue behind flood messages in its FIFO pipe, so some
        # slowdown is expected (x1.0-2.5 seen here on a noisy machine); starvation, as with an
        # earlier drain that yielded to the loop every 256 messages, shows as x20-40.
        assert ratio < 4.0, f"other objects slowed x{ratio:.1f} during the flood"
