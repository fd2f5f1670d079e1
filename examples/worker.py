"""A Worker `fetch` that routes to the example objects (use it as [http] worker).

    POST /counter/<name>           increment a counter
    GET  /counter/<name>           read it
    GET  /chat/<room>              the chat room's page; with Upgrade: websocket, join it
                                   (joins are rate limited per client)
"""

from durable import Request, Response


def _client_key(request: Request) -> str:
    return request.headers.get("x-forwarded-for", "").split(",")[0].strip() or \
        request.headers.get("x-client", "anonymous")


async def fetch(request: Request, env) -> Response:
    parts = request.path.strip("/").split("/")
    if len(parts) != 2:
        return Response("routes: /counter/<name>, /chat/<room>", status=404)
    kind, name = parts
    if kind == "counter":  # methods on stubs; the Worker decides what HTTP may reach
        counter = env.COUNTER.get_by_name(name)
        n = await (counter.increment() if request.method == "POST" else counter.value())
        return Response(str(n))
    if kind == "chat":
        if request.is_websocket:
            verdict = await env.RATELIMIT.get_by_name(_client_key(request)).hit()
            if not verdict["allowed"]:
                return Response.json(verdict, status=429)
        # the request as it came, upgrade included: the room accepts the WebSocket itself
        return await env.CHAT.get_by_name(name).fetch(request)
    return Response("routes: /counter/<name>, /chat/<room>", status=404)
