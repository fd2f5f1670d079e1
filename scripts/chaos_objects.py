"""The object the chaos soak writes to (importable from scripts/)."""

from durable import DurableObject, Request, Response


class Chaos(DurableObject):
    """POST /inc: counter + 1. POST /append?t=TOKEN: append TOKEN. GET /state: both."""

    async def fetch(self, request: Request) -> Response:
        storage = self.state.storage
        if request.method == "POST" and request.path.endswith("/inc"):
            n = (await storage.get("n")) or 0
            await storage.put("n", n + 1)
            return Response(str(n + 1))
        if request.method == "POST" and request.path.endswith("/append"):
            token = request.url.rsplit("t=", 1)[1]
            seq = (await storage.get("seq")) or 0
            await storage.put({"seq": seq + 1, f"e:{seq + 1:012d}": token})  # one atomic write
            return Response(str(seq + 1))
        entries = await storage.list(prefix="e:")
        return Response.json({"n": (await storage.get("n")) or 0, "entries": list(entries.values())})
