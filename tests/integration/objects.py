"""Objects used by the integration tests (imported by real object processes)."""

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response


def query(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


class Counter(DurableObject):
    async def fetch(self, request: Request) -> Response:
        n = (await self.state.storage.get("n")) or 0
        if request.method == "POST":
            n += int(query(request).get("by", "1"))
            await self.state.storage.put("n", n)
        return Response(str(n))


class Noop(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.method == "PUT":  # echo: bodies of every size cross both hops intact
            return Response(await request.bytes(), headers={"x-len": str(len(await request.bytes()))})
        return Response(b"ok")


class Recorder(DurableObject):
    """Appends ?n= to a stored list in arrival order; GET returns the list."""

    async def fetch(self, request: Request) -> Response:
        seen = (await self.state.storage.get("seen")) or []
        if request.method == "POST":
            seen.append(int(query(request)["n"]))
            await self.state.storage.put("seen", seen)
            if query(request).get("yield"):
                await asyncio.sleep(0)
        return Response.json(seen)


class Failing(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            await self.state.storage.put("before-raise", query(request).get("v", "x"))
            raise ValueError("boom: " + query(request).get("v", "x"))
        if request.method == "PUT":  # a Response spoiled after it was built
            resp = Response("x")
            resp.status = object()
            return resp
        return Response.json(await self.state.storage.get("before-raise"))


class Caller(DurableObject):
    """Calls COUNTER/<name> through env and returns what it answered."""

    async def fetch(self, request: Request) -> Response:
        ns = self.env.COUNTER
        stub = ns.get(ns.id_from_name(query(request)["name"]))
        resp = await stub.fetch("http://do/inc", method="POST")
        return Response(f"via env: {await resp.text()} {self.env.vars.get('greeting')}")


class Setup(DurableObject):
    """Uses block_concurrency_while in its constructor: no call sees it half set up."""

    def __init__(self, state, env):
        super().__init__(state, env)
        self.ready = False

        async def load():
            await asyncio.sleep(0.05)
            self.ready = True

        state.block_concurrency_while(load)

    async def fetch(self, request: Request) -> Response:
        return Response("ready" if self.ready else "NOT READY")


class Slow(DurableObject):
    """Sleeps ?s= seconds before answering (a call that keeps a graceful stop waiting)."""

    async def fetch(self, request: Request) -> Response:
        await asyncio.sleep(float(query(request).get("s", "1")))
        return Response("slept")


class KV(DurableObject):
    """POST ?k=&v= stores one key (PUT stores the body under ?k=); GET returns every key."""

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        if request.method == "POST":
            if q.get("twin"):  # two keys in one atomic put: a restore must hold both or neither
                await self.state.storage.put({q["k"]: q.get("v", ""), q["k"] + "~": q.get("v", "")})
            else:
                await self.state.storage.put(q["k"], q.get("v", ""))
            return Response("stored")
        if request.method == "PUT":
            await self.state.storage.put(q["k"], await request.bytes())
            return Response("stored")
        if "k" in q:
            v = await self.state.storage.get(q["k"])
            return Response.json(v if not isinstance(v, bytes) else len(v))
        rows = await self.state.storage.list()
        return Response.json({k: (len(v) if isinstance(v, bytes) else v) for k, v in rows.items()})


class Busy(DurableObject):
    """Blocks its process's loop for ?s= seconds (a pure-Python spin), holding ?mb= MiB of RSS."""

    async def fetch(self, request: Request) -> Response:
        q = query(request)
        hold = bytearray(int(q.get("mb", "0")) << 20)
        for i in range(0, len(hold), 4096):  # touch each page: calloc'd pages are not RSS yet
            hold[i] = 1
        end = time.monotonic() + float(q.get("s", "1"))
        while time.monotonic() < end:
            pass
        return Response(f"busy {len(hold)}")
