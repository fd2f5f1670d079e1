"""Objects the RPC benchmark calls (importable from scripts/)."""

import time

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


class AlarmBench(DurableObject):
    """``arm(due)``; the handler stores when it ran and how late (ms) it was."""

    async def arm(self, due_ms: float) -> None:
        await self.state.storage.set_alarm(due_ms)

    async def put_one(self, value: int) -> None:  # the write an alarm is compared with
        await self.state.storage.put("v", value)

    async def alarm(self, info) -> None:
        now = time.time() * 1000
        due = await self.state.storage.get_alarm()
        await self.state.storage.put({"at": now, "late": now - due})

    async def result(self) -> dict | None:
        at = await self.state.storage.get("at")
        return None if at is None else {"at": at, "late": await self.state.storage.get("late")}


class WsRoom(DurableObject):
    """WebSockets: ``b:...`` is broadcast to every socket of the room (one str for all),
    anything else is echoed to its sender."""

    async def fetch(self, request: Request) -> Response:
        if not request.is_websocket:
            return Response("connect with a WebSocket", status=426)
        from durable import WebSocketPair

        client, server = WebSocketPair()
        self.state.accept_websocket(server)
        return Response(status=101, websocket=client)

    async def websocket_message(self, ws, message) -> None:
        if isinstance(message, str) and message.startswith("b:"):
            for other in self.state.get_websockets():
                other.send(message)
        else:
            ws.send(message)
