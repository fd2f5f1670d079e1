"""A durable counter: POST /inc adds one (or ?by=N), GET returns the value."""

from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response


class Counter(DurableObject):
    async def fetch(self, request: Request) -> Response:
        url = urlsplit(request.url)
        n = (await self.state.storage.get("n")) or 0
        if request.method == "POST" and url.path.endswith("/inc"):
            by = int(parse_qs(url.query).get("by", ["1"])[0])
            n += by
            await self.state.storage.put("n", n)
        return Response(str(n))
