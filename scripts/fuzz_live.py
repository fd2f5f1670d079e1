#!/usr/bin/env python3
"""Live fuzzer: junk at a running daemon's sockets while correct traffic runs beside it.

    python scripts/fuzz_live.py [--frames 100000] [--http 2000] [--json]

Sends malformed, truncated, oversized and replayed ZeroMQ messages at the
broker's client and object-process sockets, and junk HTTP at the gateway,
while a correct client increments counters and checks every answer. Passes
when no process crashed or restarted, every correct call got the right
answer, and the broker counted the drops (they show in `durable status`).
Valid READY registrations are not sent: the object-process socket lives in
the 0700 run directory, where only the daemon's user can connect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from harness import serving  # noqa: E402

import durable  # noqa: E402
from durable.protocol import messages as m  # noqa: E402


def junk_messages(rng: random.Random, oid: str) -> list[list[bytes]]:
    valid = [
        m.Call(rng.getrandbits(40), 1, "COUNTER", oid, 1000, b'["GET","http://x/",[]]', b"").encode(),
        m.Ping().encode(), m.Hello(1, "f").encode(), m.Stats(5).encode(),
        m.WorkerReply(b"Fnobody", rng.getrandbits(40), b"[200,[]]", b"x").encode(),
        m.WorkerHeartbeat({"active": 1}).encode(),
        m.WorkerError(b"Fnobody", 3, "x", "y").encode(),
    ]
    out = []
    for _ in range(64):
        kind = rng.randrange(6)
        if kind == 0:  # random bytes
            out.append([os.urandom(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))])
        elif kind == 1:  # truncated valid message
            msg = rng.choice(valid)
            out.append(msg[:rng.randint(1, max(1, len(msg) - 1))] if len(msg) > 1 else [msg[0][:2]])
        elif kind == 2:  # a valid header, wrong types in the body
            hdr = m.header(rng.choice(list(m.Cmd)))
            body = orjson.dumps(rng.choice([[], {}, [1, "a", None], {"slot": "x"}, "s", 1.5]))
            out.append([hdr, body, b"", os.urandom(3)][: rng.randint(1, 4)])
        elif kind == 3:  # replayed valid messages (stray, or from a peer nobody knows)
            out.append(list(rng.choice(valid)))
        elif kind == 4:  # tiny frames
            out.append([b""] if rng.random() < 0.5 else [bytes([rng.randrange(256)])])
        else:  # a wrong protocol version
            out.append([bytes((0x44, rng.choice([1, *range(m.VERSION + 1, 255)]), 0x02)), b"[1,2,3,4,5]", b"", b""])
    return out


JUNK_HTTP = [
    b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /COUNTER/x/inc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
    b"GET /COUNTER/%ff%fe/ HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /COUNTER/id/zz/ HTTP/1.1\r\nHost: x\r\n\r\n",
]


async def correct_traffic(frontend: str, stop: float, result: dict) -> None:
    async with durable.connect(frontend, timeout=10) as c:
        ns = c.namespace("COUNTER")
        stub = ns.get(ns.id_from_name("steady"))
        expect = 0
        while time.monotonic() < stop:
            expect += 1
            got = int(await (await stub.fetch("http://do/inc", method="POST")).text())
            if got != expect:
                result["wrong_answers"] += 1
                expect = got
            result["correct_calls"] += 1
            await asyncio.sleep(0.001)


def send_zmq_junk(endpoint: str, frames: int, rng: random.Random, oid: str) -> int:
    ctx = zmq.Context.instance()
    sent = 0
    sock = None
    while sent < frames:
        if sock is None:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(endpoint)
        for msg in junk_messages(rng, oid):
            try:
                sock.send_multipart(msg, zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.001)
            sent += 1
        if rng.random() < 0.002:  # now and then a message over the size limit: the peer is cut off
            try:
                sock.send_multipart([m.header(m.Cmd.CALL), b"x" * (65 << 20)], zmq.NOBLOCK)
            except zmq.Again:
                pass
            sent += 1
            sock.close(linger=0)
            sock = None
        while sock is not None:  # read and forget whatever comes back
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
    if sock is not None:
        sock.close(linger=0)
    return sent


def _send_http(payload: bytes, port: int) -> None:
    """One connection: junk in, whatever comes back read (a stalled request waits 0.5 s)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(payload)
            s.settimeout(0.5)
            try:
                s.recv(4096)
            except (TimeoutError, OSError):
                pass
    except OSError:
        pass


def send_http_junk(port: int, n: int, rng: random.Random) -> int:
    """``n`` junk connections, 32 at a time: a request the server waits on (random bytes with
    no end of head) holds its connection for 0.5 s, which one at a time took ~2 minutes."""
    from concurrent.futures import ThreadPoolExecutor
    payloads = [rng.choice(JUNK_HTTP) if i % 4 else os.urandom(rng.randint(1, 200))
                for i in range(n)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(_send_http, payloads, [port] * n))
    return n


async def fuzz(args: argparse.Namespace, root: Path, port: int) -> dict:
    run = root / "data" / "run"
    frontend, backend = f"ipc://{run / 'broker.sock'}", f"ipc://{run / 'workers.sock'}"
    rng = random.Random(args.seed)
    async with durable.connect(frontend) as c:
        oid = str(c.namespace("COUNTER").id_from_name("target"))
    result = {"correct_calls": 0, "wrong_answers": 0}
    stop = time.monotonic() + 3600
    traffic = asyncio.ensure_future(correct_traffic(frontend, stop, result))
    half = args.frames // 2
    t = time.monotonic()
    sent_front = await asyncio.to_thread(send_zmq_junk, frontend, half, rng, oid)
    sent_back = await asyncio.to_thread(send_zmq_junk, backend, args.frames - half, rng, oid)
    sent_http = await asyncio.to_thread(send_http_junk, port, args.http, rng)
    await asyncio.sleep(1.0)
    traffic.cancel()
    await asyncio.gather(traffic, return_exceptions=True)
    async with durable.connect(frontend) as c:
        stats = await c.statistics()
    counters = stats["broker"]["counters"]
    result.update(seconds=round(time.monotonic() - t, 1), frames_client=sent_front,
                  frames_workers=sent_back, http_junk=sent_http,
                  dropped=sum(v for k, v in counters.items() if k.startswith(("dropped", "unknown", "stray"))),
                  counters=counters)
    return result


CONFIG = """
data_dir = "{data}"
slots = 2
[http]
listen = "127.0.0.1:{port}"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--http", type=int, default=2000)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with serving(CONFIG) as d:
        before = {c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)}
        result = asyncio.run(fuzz(args, d.root, d.port))
        after = {c.pid for c in psutil.Process(d.proc.pid).children(recursive=True)}
        status = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "status",
                                 "--config", str(d.config)], cwd=d.root,
                                capture_output=True, text=True, timeout=30)
        result["restarted_processes"] = len(before - after)
        result["status_shows_drops"] = "dropped" in status.stdout
        # (every process of before is still there; a warm spare may have started since)
        result["ok"] = (d.proc.poll() is None and not before - after and result["wrong_answers"] == 0
                        and result["correct_calls"] > 0 and result["dropped"] > 0
                        and result["status_shows_drops"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"live fuzz: {result['frames_client']} + {result['frames_workers']} junk zmq messages, "
              f"{result['http_junk']} junk HTTP connections in {result['seconds']} s; "
              f"{result['correct_calls']} correct calls, {result['wrong_answers']} wrong; "
              f"{result['dropped']} drops counted; {result['restarted_processes']} processes restarted; "
              f"{'OK' if result['ok'] else 'PROBLEMS'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
