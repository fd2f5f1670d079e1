#!/usr/bin/env python3
"""Chaos soak: write through the daemon while killing its processes; then check every write.

    python scripts/chaos.py --seconds 60 [--objects 40] [--writers 24] [--json]

For a bounded time, writers increment counters and append unique tokens to
per-object lists, through the Python client and through the HTTP gateway,
while a killer SIGKILLs random object processes, the broker and gateway
processes at random intervals, or SIGSTOPs one (SIGCONT after up to
hang_timeout + 4 s: some resume, some are replaced as hung), and a second
``durable serve`` is started on the live data dir now and then (it must be
refused at once, changing nothing). Some writes are sent on to another object
after they are made (the receiver's record of one whose write was lost would
break the output gate), and some objects start tasks that write later, often
after their object was evicted (a write by an evicted instance would break
"one instance"). Alarm setters arm alarms a few seconds ahead on their own
objects; each run of a handler records which alarm it ran and when. Writers
never retry a call whose outcome is unknown (a broken stub or a timeout may or
may not have run). At the end, every object must hold:

* a counter between its acknowledged and its attempted increments;
* every acknowledged token exactly once, each writer's tokens in the order
  it wrote them, and no token that was never attempted;
* a run of its last acknowledged alarm (or of a later one whose setting had
  an unknown outcome: it may have replaced it), and no run before its time.

Prints a summary (JSON with --json); exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from harness import serving  # noqa: E402

import durable  # noqa: E402
from durable.exitcodes import EXIT_STORAGE  # noqa: E402

RETRYABLE = (durable.StubBrokenError, durable.CallTimeoutError, durable.OverloadedError,
             durable.ObjectError,  # a relay whose peer call failed: its outcome is unknown
             ConnectionError, aiohttp.ClientError, asyncio.TimeoutError)


class Ledger:
    def __init__(self) -> None:
        self.inc_acked = collections.Counter()
        #: alarms per object, in the order set: (token, due); which were acknowledged, and
        #: which had an unknown outcome
        self.alarms: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        self.alarm_acked: dict[str, set[str]] = collections.defaultdict(set)
        self.alarm_unknown: dict[str, set[str]] = collections.defaultdict(set)
        self.inc_attempted = collections.Counter()
        self.tokens_acked: dict[str, set[str]] = collections.defaultdict(set)
        self.tokens_attempted: dict[str, set[str]] = collections.defaultdict(set)
        self.calls = 0
        self.failures = collections.Counter()
        self.relay_from: dict[str, str] = {}  # token -> the object that sent it on
        self.bg_acked: dict[str, set[str]] = collections.defaultdict(set)
        #: token -> how it was sent and how it ended ("stub by link, StubBrokenError at 41.2 s"), for
        #: a problem's message: an out-of-order token names its call and the one before it
        self.token_fate: dict[str, str] = {}
        self.t0 = time.monotonic()


async def writer(wid: int, client: durable.Client, http: aiohttp.ClientSession, port: int,
                 names: list[str], ledger: Ledger, stop: float, rng: random.Random) -> None:
    ns = client.namespace("CHAOS")
    stubs: dict[str, durable.Stub] = {}
    seq = 0
    while time.monotonic() < stop:
        name = rng.choice(names)
        via_http = rng.random() < 0.3
        kind = rng.random()
        append = kind < 0.5
        if append:
            seq += 1
            token = f"w{wid}-{seq}"
            path = f"/append?t={token}"
            if kind < 0.1:  # append, then send it on to another object (behind the gate)
                path = f"/relay?t={token}&to={rng.choice(names)}"
                ledger.relay_from[token] = name
            ledger.tokens_attempted[name].add(token)
        else:
            path = "/inc"
            ledger.inc_attempted[name] += 1
        ledger.calls += 1
        how = "http"
        try:
            if via_http:
                async with http.post(f"http://127.0.0.1:{port}/CHAOS/{name}{path}",
                                     timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    if r.status != 200:
                        ledger.failures[f"http_{r.status}"] += 1
                        if append:
                            ledger.token_fate[token] = (f"http, {r.status} at "
                                                        f"{time.monotonic() - ledger.t0:.1f} s")
                        continue
            else:
                stub = stubs.get(name)
                if stub is None:
                    stub = stubs[name] = ns.get(ns.id_from_name(name))
                # (the stub's path, fixed when it was made: a direct link, or the broker)
                how = "stub by link" if getattr(stub, "_peer", None) is not None else \
                    "stub by broker"
                await stub.fetch(f"http://do{path}", method="POST", timeout=10)
        except RETRYABLE as e:
            ledger.failures[type(e).__name__] += 1
            if append:
                ledger.token_fate[token] = (f"{how}, {type(e).__name__} at "
                                            f"{time.monotonic() - ledger.t0:.1f} s")
            stubs.pop(name, None)  # a new stub next time; this call's outcome is unknown
            await asyncio.sleep(0.02)
            continue
        if append:
            ledger.token_fate[token] = f"{how}, acknowledged at {time.monotonic() - ledger.t0:.1f} s"
            ledger.tokens_acked[name].add(token)
        else:
            ledger.inc_acked[name] += 1


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def role_of(p: psutil.Process) -> str | None:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return None
    for role in ("gateway", "objectproc", "broker"):
        if f"durable.broker.{role}" in cmd or f"durable.{role}" in cmd:
            return role
    return None


async def killer(pid: int, stop: float, rng: random.Random, kills: collections.Counter,
                 min_gap: float, max_gap: float, hang_timeout: float) -> None:
    """SIGKILL a process, or SIGSTOP one for a while (past hang_timeout sometimes), then SIGCONT."""
    stopped: list[asyncio.Task[None]] = []
    # The first faults SIGKILL one process of each role, in a random order; then a role is
    # drawn by weight and one of its processes at random (by role, not by process: the warm
    # spare made object processes 3 of 5 and broker kills rare; a 40 s run once had none).
    first = ["objectproc", "broker", "gateway"]
    rng.shuffle(first)
    weights = {"objectproc": 3, "broker": 1, "gateway": 1}
    while time.monotonic() < stop:
        await asyncio.sleep(rng.uniform(min_gap, max_gap))
        by_role: dict[str, list[psutil.Process]] = {}
        for p in children(pid):
            r = role_of(p)
            if r is not None:
                by_role.setdefault(r, []).append(p)
        if not by_role:
            continue
        due = next((r for r in first if r in by_role), None)
        if due is not None:
            first.remove(due)
        role = due or rng.choices(list(by_role), [weights[r] for r in by_role])[0]
        victim = rng.choice(by_role[role])
        try:
            if due is None and rng.random() < 0.25:  # a hang: resumed before hang_timeout, or replaced at it
                victim.suspend()
                kills[f"{role}_stopped"] += 1
                stopped.append(asyncio.create_task(_resume(victim, rng.uniform(0.5, hang_timeout + 4))))
            else:
                victim.kill()
                kills[role] += 1
        except psutil.Error:
            pass
    await asyncio.gather(*stopped)


async def bg_driver(client: durable.Client, names: list[str], ledger: Ledger, stop: float,
                    rng: random.Random) -> None:
    """Now and then, an object starts a task that writes later: often past its eviction."""
    ns = client.namespace("CHAOS")
    n = 0
    while time.monotonic() < stop:
        await asyncio.sleep(0.3)
        name, n = rng.choice(names), n + 1
        token = f"bg-{n}"
        try:
            await ns.get(ns.id_from_name(name)).fetch(f"http://do/bg?t={token}&after=3",
                                                      method="POST", timeout=10)
        except RETRYABLE:
            continue
        ledger.bg_acked[name].add(token)


async def alarm_driver(client: durable.Client, names: list[str], ledger: Ledger, stop: float,
                       rng: random.Random) -> None:
    """Arm alarms 0.2-3 s ahead on random objects; note which settings were acknowledged."""
    ns = client.namespace("CHAOS")
    n = 0
    while time.monotonic() < stop:
        await asyncio.sleep(0.2)
        name, n = rng.choice(names), n + 1
        token, due = f"al-{n}", time.time() * 1000 + rng.uniform(200, 3000)
        ledger.alarms[name].append((token, due))
        try:
            await ns.get(ns.id_from_name(name)).arm(due, token)
        except RETRYABLE:
            ledger.alarm_unknown[name].add(token)
            continue
        ledger.alarm_acked[name].add(token)


def check_alarms(ledger: Ledger, fired: dict[str, list]) -> tuple[list[str], int]:
    """The last acknowledged alarm of each object ran (or a later one of unknown outcome,
    which may have replaced it); nothing ran early or unasked. Returns (problems, runs)."""
    problems, runs = [], 0
    for name, attempts in ledger.alarms.items():
        got = fired.get(name, [])
        runs += len(got)
        attempted = {t for t, _ in attempts}
        for token, due, at in got:
            if token not in attempted:
                problems.append(f"{name}: alarm {token} ran but was never set")
            if due is not None and at < due:
                problems.append(f"{name}: alarm {token} ran {due - at:.0f} ms early")
        last = max((i for i, (t, _) in enumerate(attempts) if t in ledger.alarm_acked[name]),
                   default=None)
        if last is None:
            continue
        candidates = {attempts[last][0]} | {t for t, _ in attempts[last + 1:]
                                            if t in ledger.alarm_unknown[name]}
        if not candidates & {t for t, _, _ in got}:
            problems.append(f"{name}: acknowledged alarm {attempts[last][0]} never ran")
    return problems, runs


async def _resume(victim: psutil.Process, after: float) -> None:
    await asyncio.sleep(after)
    with contextlib.suppress(psutil.Error):
        victim.resume()  # a no-op if the supervisor replaced it meanwhile


async def second_daemons(config: Path, stop: float, rng: random.Random,
                         outcomes: collections.Counter, problems: list[str]) -> None:
    """Start `durable serve` on the live data dir now and then: it must be refused, at once."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))
    env.pop("NOTIFY_SOCKET", None)
    while time.monotonic() < stop:
        await asyncio.sleep(rng.uniform(2, 6))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durable.supervisor.cli", "serve", "--config", str(config),
            env=env, cwd=config.parent, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            problems.append("a second durable serve on the live data dir kept running")
            continue
        if proc.returncode == EXIT_STORAGE and b"in use by another durable daemon" in err:
            outcomes["refused"] += 1
        else:
            outcomes[f"exit {proc.returncode}"] += 1
            problems.append(f"a second durable serve exited {proc.returncode}: {err[-300:]!r}")


async def read_back(client: durable.Client, names: list[str]) -> dict[str, dict]:
    ns = client.namespace("CHAOS")
    out = {}
    for name in names:
        for _attempt in range(200):
            try:
                resp = await ns.get(ns.id_from_name(name)).fetch("http://do/state", timeout=10)
                out[name] = await resp.json()
                break
            except RETRYABLE:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"could not read {name} back")
    return out


async def read_fired(client: durable.Client, names: list[str]) -> dict[str, list]:
    ns = client.namespace("CHAOS")
    out = {}
    for name in names:
        for _attempt in range(200):
            try:
                out[name] = await ns.get(ns.id_from_name(name)).fired()
                break
            except RETRYABLE:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"could not read {name}'s alarm runs back")
    return out


async def _evictions(client: durable.Client) -> int:
    try:
        stats = await client.statistics()
    except Exception:
        return -1
    return sum(s.get("reported", {}).get("evicted", 0) for s in stats["slots"])


def check(ledger: Ledger, final: dict[str, dict]) -> list[str]:
    problems = []
    entries_of = {name: set(state["entries"]) for name, state in final.items()}
    for name, state in final.items():
        for token in state["heard"]:  # acted on: its cause must have been durable
            sender = ledger.relay_from.get(token)
            if sender is None or token not in entries_of.get(sender, ()):
                problems.append(f"{name} acted on {token}, but {sender}'s write of it was lost")
        for token in ledger.bg_acked.get(name, ()):
            if token not in state["bg"]:
                problems.append(f"{name}: acknowledged background write {token} is missing")
        order = [i for k, i in enumerate(state["log"]) if k == 0 or state["log"][k - 1] != i]
        if len(order) != len(set(order)):  # an instance wrote again after a later one had
            problems.append(f"{name}: two live instances wrote (write order {order[:12]})")
        if set(order) - set(state["insts"]):
            problems.append(f"{name}: writes by an instance that never started")
        n = state["n"]
        if not ledger.inc_acked[name] <= n <= ledger.inc_attempted[name]:
            problems.append(f"{name}: counter {n} outside [{ledger.inc_acked[name]}, "
                            f"{ledger.inc_attempted[name]}]")
        entries = state["entries"]
        seen = collections.Counter(entries)
        for token, count in seen.items():
            if count > 1:
                problems.append(f"{name}: token {token} appears {count} times")
            if token not in ledger.tokens_attempted[name]:
                problems.append(f"{name}: token {token} was never written")
        for token in ledger.tokens_acked[name]:
            if token not in seen:
                problems.append(f"{name}: acknowledged token {token} is missing")
        last: dict[str, int] = {}
        for token in entries:
            w, s = token.rsplit("-", 1)
            if int(s) <= last.get(w, 0):
                before = f"{w}-{last[w]}"
                problems.append(
                    f"{name}: {token} is out of its writer's order ({token}: "
                    f"{ledger.token_fate.get(token, 'no outcome')}; stored after {before}: "
                    f"{ledger.token_fate.get(before, 'no outcome')})")
            last[w] = int(s)
    return problems


async def soak(args: argparse.Namespace, root: Path, port: int, daemon: subprocess.Popen) -> dict:
    rng = random.Random(args.seed)
    frontend = f"ipc://{root / 'data' / 'run' / 'broker.sock'}"
    names = [f"obj{i}" for i in range(args.objects)]
    ledger = Ledger()
    kills: collections.Counter = collections.Counter()
    seconds: collections.Counter = collections.Counter()
    daemon_problems: list[str] = []
    async with durable.connect(frontend, timeout=10) as client, aiohttp.ClientSession() as http:
        stop = time.monotonic() + args.seconds
        tasks = [writer(i, client, http, port, names, ledger, stop, random.Random(rng.random()))
                 for i in range(args.writers)]
        tasks.append(killer(daemon.pid, stop, rng, kills, args.min_gap, args.max_gap, HANG_TIMEOUT))
        tasks.append(second_daemons(root / "durable.toml", stop, random.Random(rng.random()),
                                    seconds, daemon_problems))
        bg_names = [f"bg{i}" for i in range(8)]
        tasks.append(bg_driver(client, bg_names, ledger, stop, random.Random(rng.random())))
        alarm_names = [f"al{i}" for i in range(12)]
        tasks.append(alarm_driver(client, alarm_names, ledger, stop, random.Random(rng.random())))
        await asyncio.gather(*tasks)
        # The last killed process comes back, background tasks end, the last alarms (up to
        # 3 s ahead, plus a retry or a restart) fire.
        await asyncio.sleep(8.0)
        final = await read_back(client, names + bg_names)
        fired = await read_fired(client, alarm_names)
        evictions = await _evictions(client)
    alarm_problems, alarm_runs = check_alarms(ledger, fired)
    problems = daemon_problems + check(ledger, final) + alarm_problems
    return {
        "seconds": args.seconds, "objects": args.objects, "writers": args.writers,
        "kills": dict(kills), "kills_total": sum(kills.values()),
        "second_daemons": dict(seconds), "calls": ledger.calls,
        "relays_heard": sum(len(s["heard"]) for s in final.values()),
        "background_writes": {"acknowledged": sum(len(v) for v in ledger.bg_acked.values()),
                              "by_tasks": sum(list(s["bg"].values()).count("task")
                                              for s in final.values()),
                              "instances": sum(len(s["insts"]) for s in final.values())},
        "evictions": evictions,
        "alarms": {"set": sum(len(v) for v in ledger.alarms.values()),
                   "acknowledged": sum(len(v) for v in ledger.alarm_acked.values()),
                   "runs": alarm_runs,
                   "problems": sum(1 for p in alarm_problems)},
        "acknowledged": sum(ledger.inc_acked.values()) + sum(len(t) for t in ledger.tokens_acked.values()),
        "failed_calls": dict(ledger.failures),
        "lost_writes": sum(1 for p in problems if "missing" in p or "outside" in p),
        "acted_on_lost_cause": sum(1 for p in problems if "acted on" in p),
        "two_instances": sum(1 for p in problems if "two live instances" in p),
        "problems": problems[:20], "ok": not problems,
    }


# The shortest allowed: some SIGSTOPs outlast it (replaced), some do not. An object process's
# bound is its CPU limit (0.5 s here) + 5 s: some of its SIGSTOPs (up to 7 s) outlast that.
HANG_TIMEOUT = 3.0

CONFIG = """
data_dir = "{data}"
slots = %d
grace_period = 10
hang_timeout = %g
cpu_limit_ms = 500
idle_timeout = 1
wait_until_limit = 1
[broker]
heartbeat = 0.2
[http]
listen = "127.0.0.1:{port}"
front = "%s"
[namespaces.CHAOS]
class = "chaos_objects:Chaos"
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--objects", type=int, default=40)
    p.add_argument("--writers", type=int, default=24)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--min-gap", type=float, default=0.3, help="seconds between kills, at least")
    p.add_argument("--max-gap", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--front", default="auto", choices=("auto", "slots", "gateways"),
                   help="[http] front: who serves HTTP (auto: the object processes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cluster", action="store_true", help="the cluster run instead: 3 hosts on "
                   "a 3-node NATS cluster, hosts killed and stopped, NATS nodes killed "
                   "(scripts/chaos_cluster.py)")
    p.add_argument("--lease", type=float, default=5.0, help="--cluster: the slot lease (s)")
    p.add_argument("--keep", type=Path, help="--cluster: run in this directory and leave it "
                   "(every host's and NATS node's whole log)")
    p.add_argument("--min-faults", type=int, default=0, help="--cluster: go on past --seconds "
                   "(by at most 180 s) until this many faults are done")
    args = p.parse_args(argv)
    if args.cluster:
        from chaos_cluster import run
        result = run(args.seconds, args.objects, min(args.writers, 16), args.seed, args.lease,
                     keep=args.keep, min_faults=args.min_faults)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"cluster chaos: {result['seconds']:g} s, faults {result['faults']}, "
                  f"{result['calls']} calls, {result['acknowledged']} acknowledged, "
                  f"lost or stale = {result['lost_or_stale']}, "
                  f"{'OK' if result['ok'] else 'PROBLEMS: ' + '; '.join(result['problems'])}")
        return 0 if result["ok"] else 1
    with serving(CONFIG % (args.slots, HANG_TIMEOUT, args.front)) as d:
        result = asyncio.run(soak(args, d.root, d.port, d.proc))
        result["daemon_alive"] = d.proc.poll() is None
        result["ok"] = result["ok"] and result["daemon_alive"]
    result["seed"] = args.seed
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"chaos soak: {result['seconds']:g} s, {result['kills_total']} kills {result['kills']}, "
              f"second daemons {result['second_daemons']}, relays heard {result['relays_heard']}, "
              f"background writes {result['background_writes']}, evictions {result['evictions']}, "
              f"{result['calls']} calls, {result['acknowledged']} acknowledged writes, "
              f"failed calls {result['failed_calls']}, lost writes = {result['lost_writes']}, "
              f"{'OK' if result['ok'] else 'PROBLEMS: ' + '; '.join(result['problems'])}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
