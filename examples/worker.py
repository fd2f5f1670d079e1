"""A Worker `fetch` that routes to the example objects (use it as [http] worker).

    POST /counter/<name>           increment a counter
    GET  /counter/<name>           read it
    POST /chat/<room>              post {"user", "text"}; rate limited per client
    GET  /chat/<room>?after=N&wait=S   long-poll new messages
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
        if request.method == "POST":
            verdict = await env.RATELIMIT.get_by_name(_client_key(request)).hit()
            if not verdict["allowed"]:
                return Response.json(verdict, status=429)
        room = env.CHAT.get(env.CHAT.id_from_name(name))
        query = request.url.partition("?")[2]
        return await room.fetch(f"http://do/messages?{query}", method=request.method,
                                headers=request.headers, body=request.body)
    return Response("routes: /counter/<name>, /chat/<room>", status=404)
