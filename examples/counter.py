"""A durable counter, with methods and HTTP routes.

    await stub.increment(by=1) -> int     (a method call on a stub)
    await stub.value() -> int
    POST /inc?by=N, GET /                 (the same, over fetch: HTTP path routing)
"""

from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response


class Counter(DurableObject):
    async def increment(self, by: int = 1) -> int:
        n = (await self.state.storage.get("n")) or 0
        n += by
        await self.state.storage.put("n", n)
        return n

    async def value(self) -> int:
        return (await self.state.storage.get("n")) or 0

    async def fetch(self, request: Request) -> Response:
        url = urlsplit(request.url)
        if request.method == "POST" and url.path.endswith("/inc"):
            raw = parse_qs(url.query).get("by", ["1"])[0]
            try:
                by = int(raw)
            except ValueError:
                return Response(f"by must be an integer, got {raw!r}\n", status=400)
            return Response(str(await self.increment(by)))
        return Response(str(await self.value()))
