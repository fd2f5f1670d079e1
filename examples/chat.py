"""A chat room on WebSockets with hibernation (the default ``CHAT`` namespace).

    GET /CHAT/<room>/            the room's page (plain HTML and JavaScript, no build step)
    GET /CHAT/<room>/?name=ann   with ``Upgrade: websocket``: join as ann

(With the example Worker, ``/chat/<room>`` serves the same page.) A member
sends a text message; the room stores it and broadcasts to every member as
JSON: ``{"type": "message", "seq", "name", "text", "at"}``. A new member first
gets ``{"type": "history", "messages": [...]}`` (the last 100), and everyone
sees ``join`` and ``leave``. The member's name rides on its socket as an
attachment, so the room keeps nothing in memory: it is evicted while members
sit idle (their sockets stay open in the gateway) and the next message wakes
it. ``"ping"`` is answered ``"pong"`` by the gateway without waking the room.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import orjson

from durable import DurableObject, Request, Response, WebSocketPair

HISTORY = 100
MAX_TEXT = 4000
MAX_NAME = 40


class ChatRoom(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if not request.is_websocket:
            if request.method != "GET":
                return Response("GET the page, or connect with a WebSocket", status=405)
            return Response(PAGE, headers={"content-type": "text/html; charset=utf-8"})
        query = parse_qs(urlsplit(request.url).query)
        name = (query.get("name", [""])[0].strip() or "anonymous")[:MAX_NAME]
        client, server = WebSocketPair()
        self.state.accept_websocket(server, tags=["member"])
        server.serialize_attachment({"name": name})
        if self.state.get_websocket_auto_response() is None:
            self.state.set_websocket_auto_response("ping", "pong")
        server.send(_json({"type": "history", "messages": await self.history()}))
        self.broadcast({"type": "join", "name": name})
        return Response(status=101, websocket=client)

    async def history(self) -> list[dict]:
        seq = await self.state.storage.get("seq") or 0
        rows = await self.state.storage.list(start=_key(max(1, seq - HISTORY + 1)), prefix="msg:")
        return list(rows.values())

    async def websocket_message(self, ws, message: str | bytes) -> None:
        if isinstance(message, bytes):
            ws.send(_json({"type": "error", "error": "send text"}))
            return
        text = message.strip()[:MAX_TEXT]
        if not text:
            return
        storage = self.state.storage
        seq = (await storage.get("seq") or 0) + 1
        msg = {"type": "message", "seq": seq, "name": ws.deserialize_attachment()["name"],
               "text": text, "at": int(time.time() * 1000)}
        await storage.put({_key(seq): msg, "seq": seq})
        if seq > HISTORY:
            await storage.delete(_key(seq - HISTORY))
        self.broadcast(msg)  # (leaves once the message is durable: the output gate)

    async def websocket_close(self, ws, code: int, reason: str, was_clean: bool) -> None:
        self.broadcast({"type": "leave", "name": ws.deserialize_attachment()["name"]})

    def broadcast(self, msg: dict) -> None:
        data = _json(msg)  # one str for all: it crosses the broker once per gateway
        for ws in self.state.get_websockets("member"):
            ws.send(data)


def _key(seq: int) -> str:
    return f"msg:{seq:012d}"


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>durable chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.4 system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; }
#log { list-style: none; padding: 0; height: 60vh; overflow-y: auto; border: 1px solid #ccc; }
#log li { padding: .2em .5em; } #log li.event { color: #777; font-style: italic; }
form { display: flex; gap: .5em; margin-top: .5em; } input[name=text] { flex: 1; }
#status { color: #777; }
</style></head>
<body>
<h1>Room <span id="room"></span> <small id="status">not connected</small></h1>
<form id="join"><input name="name" placeholder="your name" required maxlength="40">
<button>Join</button></form>
<ul id="log"></ul>
<form id="say" hidden><input name="text" placeholder="message" autocomplete="off" maxlength="4000">
<button>Send</button></form>
<script>
"use strict";
const $ = (s) => document.querySelector(s);
const room = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
$("#room").textContent = room;
let ws = null, name = "", ping = null;
function show(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  $("#log").append(li);
  li.scrollIntoView();
}
function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
    location.pathname + "?name=" + encodeURIComponent(name);
  ws = new WebSocket(url);
  ws.onopen = () => {
    $("#status").textContent = "connected as " + name;
    $("#say").hidden = false;
    ping = setInterval(() => ws.send("ping"), 20000);
  };
  ws.onmessage = (ev) => {
    if (ev.data === "pong") return;
    const m = JSON.parse(ev.data);
    if (m.type === "history") { $("#log").replaceChildren(); m.messages.forEach((x) => show(x.name + ": " + x.text, "msg")); }
    else if (m.type === "message") show(m.name + ": " + m.text, "msg");
    else if (m.type === "join") show(m.name + " joined", "event");
    else if (m.type === "leave") show(m.name + " left", "event");
  };
  ws.onclose = (ev) => {
    clearInterval(ping);
    $("#status").textContent = "disconnected (" + ev.code + "), reconnecting";
    setTimeout(connect, 1000);
  };
}
$("#join").onsubmit = (ev) => {
  ev.preventDefault();
  name = ev.target.name.value.trim();
  if (!name) return;
  $("#join").hidden = true;
  connect();
};
$("#say").onsubmit = (ev) => {
  ev.preventDefault();
  const input = ev.target.text;
  if (input.value.trim() && ws && ws.readyState === WebSocket.OPEN) ws.send(input.value);
  input.value = "";
};
</script>
</body></html>
"""
