"""The object the chaos soak writes to (importable from scripts/)."""

import asyncio
import random
import time
import uuid
from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response


def _q(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


class Chaos(DurableObject):
    """POST /inc: counter + 1. POST /append?t=TOKEN: append TOKEN. GET /state: everything.

    POST /relay?t=TOKEN&to=NAME: append TOKEN, then tell NAME (``/heard``), which records
    ``h:TOKEN``: a token heard must be in the sender's list (the output gate held the call
    until the append was durable).

    POST /bg?t=TOKEN&after=S: a logged write, then a task that makes another after S
    seconds. Every logged write records which instance made it (``log:<seq>``, in write
    order; ``insts`` lists the instances in the order they started): once a later instance
    wrote, an earlier one never writes again (one instance, even after eviction).
    """

    def __init__(self, state, env):
        super().__init__(state, env)
        self.me = uuid.uuid4().hex[:12]
        self.joined = False

    async def fetch(self, request: Request) -> Response:
        storage = self.state.storage
        path = request.path
        if request.method == "POST" and path.endswith("/inc"):
            n = (await storage.get("n")) or 0
            await storage.put("n", n + 1)
            return Response(str(n + 1))
        if request.method == "POST" and (path.endswith("/append") or path.endswith("/relay")):
            q = _q(request)
            token = q["t"]
            seq = (await storage.get("seq")) or 0
            await storage.put({"seq": seq + 1, f"e:{seq + 1:012d}": token})  # one atomic write
            if path.endswith("/relay"):
                ns = self.env.CHAOS
                peer = ns.get(ns.id_from_name(q["to"]))
                resp = await peer.fetch(f"http://do/heard?t={token}", method="POST", timeout=10)
                if resp.status != 200:
                    return Response("peer failed", status=502)
            return Response(str(seq + 1))
        if request.method == "POST" and path.endswith("/heard"):
            await storage.put(f"h:{_q(request)['t']}", True)
            return Response("heard")
        if request.method == "POST" and path.endswith("/bg"):
            q = _q(request)
            token = q["t"]
            await self._logged({f"b:{token}": "call"})
            asyncio.create_task(self._later(token, float(q.get("after", "1"))))
            return Response("started")
        entries = await storage.list(prefix="e:")
        heard = await storage.list(prefix="h:")
        log = await storage.list(prefix="log:")
        bg = await storage.list(prefix="b:")
        return Response.json({"n": (await storage.get("n")) or 0, "entries": list(entries.values()),
                              "heard": [k[2:] for k in heard], "log": list(log.values()),
                              "insts": (await storage.get("insts")) or [],
                              "bg": {k[2:]: v for k, v in bg.items()}})

    async def arm(self, due_ms: float, token: str) -> None:
        """Set the alarm, with the token it is known by (one atomic write)."""
        await self.state.storage.put("alarm_token", token)
        await self.state.storage.set_alarm(due_ms)

    async def alarm(self, info) -> None:
        """Record each run: which alarm (token, due) and when it ran."""
        storage = self.state.storage
        due = await storage.get_alarm()
        fired = (await storage.get("fired")) or []
        fired.append([await storage.get("alarm_token"), due, time.time() * 1000])
        await storage.put("fired", fired)

    async def fired(self) -> list:
        return (await self.state.storage.get("fired")) or []

    async def _later(self, token: str, after: float) -> None:
        await asyncio.sleep(after * random.random())
        await self._logged({f"b:{token}": "task"})

    async def _logged(self, entries: dict) -> None:
        storage = self.state.storage
        if not self.joined:
            self.joined = True
            await storage.put("insts", [*((await storage.get("insts")) or []), self.me])
        w = (await storage.get("wseq")) or 0
        await storage.put({**entries, "wseq": w + 1, f"log:{w + 1:010d}": self.me})
