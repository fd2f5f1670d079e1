"""A fixed-window rate limiter: one object per client key.

    POST /hit?limit=N&window=S  -> 200 {"allowed": true, "remaining": n, "reset": t}
                                   or 429 {"allowed": false, ...}

Defaults: env.vars["ratelimit_limit"] (10) hits per env.vars["ratelimit_window"]
(60) seconds. Each key's object is the one place its count lives, so two
gateways or workers can never both let the 11th hit through.
"""

import time
from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response


class RateLimiter(DurableObject):
    async def fetch(self, request: Request) -> Response:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        vars_ = getattr(self.env, "vars", {})
        try:
            limit = int(q.get("limit", vars_.get("ratelimit_limit", 10)))
            window = float(q.get("window", vars_.get("ratelimit_window", 60)))
        except ValueError:
            return Response("limit and window must be numbers", status=400)
        now = time.time()
        storage = self.state.storage
        state = await storage.get("window") or {"start": now, "count": 0}
        if now - state["start"] >= window:
            state = {"start": now, "count": 0}
        allowed = state["count"] < limit
        if allowed and request.method == "POST":
            state["count"] += 1
            await storage.put("window", state)
        body = {"allowed": allowed, "remaining": max(0, limit - state["count"]),
                "reset": round(state["start"] + window, 3)}
        return Response.json(body, status=200 if allowed else 429)
