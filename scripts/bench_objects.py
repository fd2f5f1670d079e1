"""Objects the RPC benchmark calls (importable from scripts/)."""

from durable import DurableObject, Request, Response


class Noop(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return Response(b"ok")

    async def noop(self) -> None:
        return None


class Relay(DurableObject):
    """GET: call NOOP/peer. POST: write a key, then call NOOP/peer (behind the output gate)."""

    async def fetch(self, request: Request) -> Response:
        if request.method == "POST":
            self.n = getattr(self, "n", 0) + 1
            await self.state.storage.put("n", self.n)
        ns = self.env.NOOP
        await ns.get(ns.id_from_name("peer")).fetch("http://do/")
        return Response(b"ok")
