"""Objects the RPC benchmark calls (importable from scripts/)."""

from durable import DurableObject, Request, Response


class Noop(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return Response(b"ok")
