"""A fixed-window rate limiter: one object per client key.

    await stub.hit(limit=N, window=S) -> {"allowed": bool, "remaining": n, "reset": t}
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
    async def hit(self, limit: int | None = None, window: float | None = None,
                  *, count: bool = True) -> dict:
        """One hit against this key's window (``count=False``: only look)."""
        vars_ = getattr(self.env, "vars", {})
        limit = int(vars_.get("ratelimit_limit", 10) if limit is None else limit)
        window = float(vars_.get("ratelimit_window", 60) if window is None else window)
        now = time.time()
        storage = self.state.storage
        state = await storage.get("window") or {"start": now, "count": 0}
        if now - state["start"] >= window:
            state = {"start": now, "count": 0}
        allowed = state["count"] < limit
        if allowed and count:
            state["count"] += 1
            await storage.put("window", state)
        return {"allowed": allowed, "remaining": max(0, limit - state["count"]),
                "reset": round(state["start"] + window, 3)}

    async def fetch(self, request: Request) -> Response:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        try:
            limit = int(q["limit"]) if "limit" in q else None
            window = float(q["window"]) if "window" in q else None
        except ValueError:
            return Response("limit and window must be numbers", status=400)
        body = await self.hit(limit, window, count=request.method == "POST")
        return Response.json(body, status=200 if body["allowed"] else 429)
