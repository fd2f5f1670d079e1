"""A chat room over plain HTTP: messages are stored in the object; GET long-polls.

The WebSocket room (``durable.examples.chat``) is the one to use; this one
stays because it teaches waiting inside an object (an ``asyncio.Condition``
that a later call notifies) and is what the long-poll flood test drives.

    POST /messages          body: {"user": "...", "text": "..."}  -> {"seq": n}
    GET  /messages?after=N&wait=S  -> {"messages": [...], "last": n}; waits up to S seconds
                                      (at most 25) when there is nothing after N

Each message is its own key ("msg:" + 12-digit sequence number), so a poll
reads only what is new with one prefix list. Order is the order of the
POSTs as the room received them (E-order per caller, one sequence for all).
"""

import asyncio
from urllib.parse import parse_qs, urlsplit

from durable import DurableObject, Request, Response

MAX_WAIT = 25.0
MAX_TEXT = 4000


class ChatRoom(DurableObject):
    def __init__(self, state, env):
        super().__init__(state, env)
        self.changed = asyncio.Condition()

    async def fetch(self, request: Request) -> Response:
        url = urlsplit(request.url)
        if not url.path.endswith("/messages"):
            return Response("use /messages", status=404)
        if request.method == "POST":
            return await self.post(request)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            after = int(q.get("after", "0"))
            wait = min(float(q.get("wait", "0")), MAX_WAIT)
        except ValueError:
            return Response("after and wait must be numbers", status=400)
        storage = self.state.storage
        if wait > 0 and ((await storage.get("last")) or 0) <= after:
            async with self.changed:
                try:
                    await asyncio.wait_for(
                        self.changed.wait_for(lambda: self.last_seen > after), wait)
                except TimeoutError:
                    pass
        msgs = await storage.list(start=f"msg:{after + 1:012d}", prefix="msg:", limit=1000)
        last = (await storage.get("last")) or 0
        return Response.json({"messages": list(msgs.values()), "last": last})

    @property
    def last_seen(self) -> int:
        return getattr(self, "_last", 0)

    async def post(self, request: Request) -> Response:
        try:
            body = await request.json()
            user, text = str(body["user"]), str(body["text"])
        except (ValueError, KeyError, TypeError):
            return Response('POST {"user": "...", "text": "..."}', status=400)
        if len(text) > MAX_TEXT:
            return Response(f"text is limited to {MAX_TEXT} characters", status=413)
        storage = self.state.storage
        seq = ((await storage.get("last")) or 0) + 1
        await storage.put({f"msg:{seq:012d}": {"seq": seq, "user": user, "text": text}, "last": seq})
        self._last = seq
        async with self.changed:
            self.changed.notify_all()
        return Response.json({"seq": seq})
