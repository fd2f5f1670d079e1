"""The C allocator's settings the supervisor gives its children (``MALLOC_TOP_PAD_``).

asyncio reads a connection with ``recv(256 KiB)``. With the heap's top trimmed past 128 KiB,
each such read grew the heap and trimmed it again, and so touched a fresh zeroed page: a minor
page fault per HTTP request, with the GIL held. The faults are the kernel's own count of that
cost, and do not depend on how fast the machine is."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

import pytest

from tests.integration.daemon import serving
from tests.integration.procs import free_port

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="minor page faults are read from /proc (Linux)"),
              pytest.mark.slow]  # (5-7 s a test: the fast subset stays under 90 s)

CONFIG = """
slots = 2
warm_spare = false
[http]
listen = "127.0.0.1:{port}"
front = "{front}"
[namespaces.NOOP]
class = "tests.integration.objects:Noop"
"""
REQUESTS = 3000


def _minor_faults(pid: int) -> dict[str, int]:
    """Each thread's minor page faults (field 10 of its stat), by thread id and name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out[f"{name} {tid}"] = int(stat.rpartition(")")[2].split()[7])
    return out


def _get(conn: socket.socket, request: bytes) -> None:
    conn.sendall(request)
    got = b""
    while not got.endswith(b"\r\n\r\nok"):  # (the Noop object's answer)
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed after {got!r}"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]


def _loop_faults(port: int, procs: list) -> tuple[dict[str, int], dict]:
    """Over ``REQUESTS`` no-op requests on one connection: each process's minor page faults
    in its loop's thread (the main one), and every thread's count after."""
    request = b"GET /NOOP/a/ HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for _ in range(300):  # warm: the object, the route, the heap's first growth
            _get(conn, request)
        time.sleep(0.2)
        before = {p.pid: _minor_faults(p.pid) for p in procs}
        for _ in range(REQUESTS):
            _get(conn, request)
        after = {p.pid: _minor_faults(p.pid) for p in procs}
    loops = {f"{pid} {t}": n - before[pid].get(t, 0) for pid, threads in after.items()
             for t, n in threads.items() if t.endswith(f" {pid}")}
    return loops, after


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


@pytest.mark.parametrize("front", ["slots", "gateways"])
def test_an_http_request_takes_no_fresh_page_in_the_serving_process(tmp_path, front):
    port = free_port()
    with serving(tmp_path, CONFIG.format(port=port, front=front)) as d:
        d.wait_ready()
        kind = "durable.objectproc" if front == "slots" else "durable.broker.gateway"
        procs = [p for p in d.children() if kind in " ".join(p.cmdline())]
        assert procs, [p.cmdline() for p in d.children()]
        loops, after = _loop_faults(port, procs)
    # One process's loop served the connection (the object's, or a gateway's): a fault a
    # request there was the 256-KiB read's fresh page. Other threads fault a little anyway.
    assert max(loops.values()) < REQUESTS // 10, (
        f"minor page faults over {REQUESTS} requests, by process (its loop's thread): {loops}; "
        f"every thread after: {after}")


def test_the_operators_own_malloc_settings_win(tmp_path):
    """``MALLOC_TOP_PAD_`` in the supervisor's environment is passed on as it is: 0 brings
    back glibc's trimming, and with it a fresh page for every request."""
    port = free_port()
    with serving(tmp_path, CONFIG.format(port=port, front="slots"),
                 env={"MALLOC_TOP_PAD_": "0"}) as d:
        d.wait_ready()
        procs = [p for p in d.children() if "durable.objectproc" in " ".join(p.cmdline())]
        env = _environ(procs[0].pid)
        assert env.get("MALLOC_TOP_PAD_") == "0", env
        assert env.get("MALLOC_MMAP_THRESHOLD_") == str(1 << 20), env  # (the other default)
        loops, _ = _loop_faults(port, procs)
    assert max(loops.values()) > REQUESTS // 2, loops  # (what the default avoids, shown)
