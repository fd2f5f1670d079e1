"""Wire messages: frames in, typed messages out (sans I/O; never imports zmq).

Every message is a ZeroMQ multipart message (the ROUTER's identity frame is
stripped before parsing and added after encoding). Frame 0 is the header:
``b"D"``, the protocol version byte, the command byte. Small structured parts
are orjson; request and response bodies travel as their own frames, which
the broker forwards without decoding.

Client → broker (frontend)::

    HELLO   [hdr, {"pid": int, "name": str}]
    CALL    [hdr, [call_id, stub_id, namespace, object_id, timeout_ms(, name)], request_head, body]
    PING    [hdr]
    DROP    [hdr, [stub_id, ...]]              stubs the client no longer holds
    STATS   [hdr, call_id(u64)]

Broker → client::

    WELCOME     [hdr, {"broker": incarnation, "namespaces": {name: key_hex}}]
    REPLY       [hdr, call_id(u64), response_head, body]
    ERROR       [hdr, call_id(u64), {"code", "message", "remote_type"(, "traceback")}]
    PONG        [hdr, broker incarnation(u64)]
    DISCONNECT  [hdr, reason]                  "I do not know you: send HELLO"
    STATS_REPLY [hdr, call_id(u64), {...}]

Object process → broker (backend)::

    READY      [hdr, {"slot": int, "pid": int, "incarnation": int}]
    WREPLY     [hdr, client, call_id(u64), response_head, body]
    WERROR     [hdr, client, call_id(u64), {"code", "message", "remote_type"}]
    WHEARTBEAT [hdr, {"active": int, "queued": int, ...}]
    WBEAT      [hdr, slot(u64), incarnation(u64)]  from the process's heartbeat thread, on
                                                   a socket of its own: alive even while
                                                   its loop runs a long call

Broker → object process::

    WCALL       [hdr, client, [call_id, namespace, object_id(, name)], request_head, body]
    WHEARTBEAT  [hdr, {}]
    WDISCONNECT [hdr, reason]                  "register again (READY)"

Supervisor → broker (a PUSH to the broker's PULL control socket, in the 0700 run dir)::

    CONTROL [hdr, {"op": "slot_down", "slot": int, "pid": int}]   the process exited: end it now
    CONTROL [hdr, {"op": "drain"}]                                refuse new calls (stopping)

``request_head`` is ``[method, url, [[name, value], ...]]`` and
``response_head`` is ``[status, [[name, value], ...]]``. ``u64`` fields are 8
bytes little-endian, so the broker can route replies without JSON.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

from ..errors import DurableError, ProtocolError
from ..http import Request, Response

__all__ = [
    "VERSION", "Cmd", "Hello", "Call", "Ping", "Drop", "Stats", "Welcome", "Reply", "Error",
    "Pong", "Disconnect", "StatsReply", "Ready", "WorkerReply", "WorkerError",
    "WorkerHeartbeat", "WorkerCall", "BrokerHeartbeat", "WorkerDisconnect", "Beat",
    "parse_from_client", "parse_from_broker_to_client", "parse_from_worker",
    "parse_from_broker_to_worker", "encode_request", "decode_request", "encode_response",
    "decode_response", "error_payload", "pack_u64", "unpack_u64", "Control", "parse_control",
]

VERSION = 1
_U64 = struct.Struct("<Q")
MAX_NAME = 256


class Cmd(IntEnum):
    HELLO = 0x01
    CALL = 0x02
    PING = 0x03
    DROP = 0x04
    STATS = 0x05
    WELCOME = 0x11
    REPLY = 0x12
    ERROR = 0x13
    PONG = 0x14
    DISCONNECT = 0x15
    STATS_REPLY = 0x16
    READY = 0x21
    WREPLY = 0x22
    WERROR = 0x23
    WHEARTBEAT = 0x24
    WBEAT = 0x25
    WCALL = 0x31
    BHEARTBEAT = 0x32
    WDISCONNECT = 0x33
    CONTROL = 0x41


_HEADERS = {c: bytes((0x44, VERSION, c)) for c in Cmd}


def header(cmd: Cmd) -> bytes:
    return _HEADERS[cmd]


def pack_u64(n: int) -> bytes:
    return _U64.pack(n)


def unpack_u64(b: bytes, what: str) -> int:
    if len(b) != 8:
        raise ProtocolError(f"{what} must be 8 bytes, got {len(b)}")
    return _U64.unpack(b)[0]


def _json(frame: bytes, what: str) -> Any:
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from None


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _str(v: Any, what: str, limit: int = MAX_NAME) -> str:
    if type(v) is not str or not v or len(v) > limit:
        raise ProtocolError(f"{what} must be a non-empty str of at most {limit} chars, got {v!r:.40}")
    return v


def _frames(frames: list[bytes], n: int, name: str) -> None:
    if len(frames) != n:
        raise ProtocolError(f"{name} has {len(frames)} frames, expected {n}")


_CMDS = {c.value: c for c in Cmd}


def _cmd(frames: list[bytes], allowed: frozenset[Cmd], side: str) -> Cmd:
    if not frames:
        raise ProtocolError("empty message")
    h = frames[0]
    if len(h) != 3 or h[0] != 0x44:
        raise ProtocolError(f"bad header {bytes(h[:8])!r}")
    if h[1] != VERSION:
        raise ProtocolError(f"protocol version {h[1]} is not supported (this side speaks {VERSION})")
    cmd = _CMDS.get(h[2])  # (a dict lookup: Cmd(value) goes through the enum machinery, ~1 µs)
    if cmd is None:
        raise ProtocolError(f"unknown command {h[2]:#x}")
    if cmd not in allowed:
        raise ProtocolError(f"command {cmd.name} is not valid {side}")
    return cmd


# -- request and response heads -------------------------------------------------------
def encode_request(req: Request) -> tuple[bytes, bytes]:
    return orjson.dumps([req.method, req.url, req.headers.items()]), req.body


def decode_request(head: bytes, body: bytes) -> Request:
    h = _json(head, "request head")
    if type(h) is not list or len(h) != 3 or type(h[2]) is not list:
        raise ProtocolError("request head must be [method, url, headers]")
    try:
        return Request(h[1], method=h[0], headers=[tuple(p) for p in h[2]], body=body)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad request head: {e}") from None


def encode_response(resp: Response) -> tuple[bytes, bytes]:
    return orjson.dumps([resp.status, resp.headers.items()]), resp.body


def decode_response(head: bytes, body: bytes) -> Response:
    h = _json(head, "response head")
    if type(h) is not list or len(h) != 2 or type(h[1]) is not list:
        raise ProtocolError("response head must be [status, headers]")
    try:
        return Response(body, status=h[0], headers=[tuple(p) for p in h[1]])
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad response head: {e}") from None


def error_payload(err: BaseException, traceback: str | None = None) -> bytes:
    """The ERROR payload for an exception: its wire code, message and type name."""
    if isinstance(err, DurableError):
        remote = getattr(err, "remote_type", type(err).__name__)
        message = getattr(err, "remote_message", str(err))
        out = {"code": err.code, "message": message, "remote_type": remote}
    else:
        out = {"code": "object_error", "message": str(err), "remote_type": type(err).__name__}
    if traceback is not None:
        out["traceback"] = traceback
    return orjson.dumps(out)


def _error_fields(frame: bytes) -> tuple[str, str, str | None, str | None]:
    e = _json(frame, "error payload")
    if type(e) is not dict or type(e.get("code")) is not str or type(e.get("message")) is not str:
        raise ProtocolError("error payload must be {code: str, message: str}")
    rt, tb = e.get("remote_type"), e.get("traceback")
    return e["code"], e["message"], rt if type(rt) is str else None, tb if type(tb) is str else None


# -- client <-> broker ----------------------------------------------------------------
@dataclass(slots=True)
class Hello:
    pid: int
    name: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.HELLO), orjson.dumps({"pid": self.pid, "name": self.name})]


@dataclass(slots=True)
class Call:
    call_id: int
    stub_id: int
    namespace: str
    object_id: str
    timeout_ms: int
    head: bytes
    body: bytes
    name: str | None = None  # the name the id was derived from (id_from_name), if any

    def encode(self) -> list[bytes]:
        m = [self.call_id, self.stub_id, self.namespace, self.object_id, self.timeout_ms]
        if self.name is not None:
            m.append(self.name)
        return [header(Cmd.CALL), orjson.dumps(m), self.head, self.body]


@dataclass(slots=True)
class Ping:
    def encode(self) -> list[bytes]:
        return [header(Cmd.PING)]


@dataclass(slots=True)
class Drop:
    stub_ids: list[int]

    def encode(self) -> list[bytes]:
        return [header(Cmd.DROP), orjson.dumps(self.stub_ids)]


@dataclass(slots=True)
class Stats:
    call_id: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.STATS), pack_u64(self.call_id)]


_FROM_CLIENT = frozenset({Cmd.HELLO, Cmd.CALL, Cmd.PING, Cmd.DROP, Cmd.STATS})


def parse_from_client(frames: list[bytes]) -> Hello | Call | Ping | Drop | Stats:
    """Parse what a client sent the broker; raise ProtocolError for anything malformed."""
    cmd = _cmd(frames, _FROM_CLIENT, "from a client")
    if cmd is Cmd.CALL:
        _frames(frames, 4, "CALL")
        m = _json(frames[1], "CALL meta")
        if type(m) is not list or len(m) not in (5, 6):
            raise ProtocolError("CALL meta must be [call_id, stub_id, namespace, object_id, "
                                "timeout_ms(, name)]")
        return Call(_int(m[0], "call_id"), _int(m[1], "stub_id"), _str(m[2], "namespace"),
                    _str(m[3], "object_id"), _int(m[4], "timeout_ms", 0, 2**31),
                    frames[2], frames[3], _name(m[5]) if len(m) == 6 else None)
    if cmd is Cmd.PING:
        _frames(frames, 1, "PING")
        return Ping()
    if cmd is Cmd.HELLO:
        _frames(frames, 2, "HELLO")
        h = _json(frames[1], "HELLO body")
        if type(h) is not dict:
            raise ProtocolError("HELLO body must be an object")
        return Hello(_int(h.get("pid"), "pid"), _str(h.get("name", "client"), "name"))
    if cmd is Cmd.DROP:
        _frames(frames, 2, "DROP")
        ids = _json(frames[1], "DROP body")
        if type(ids) is not list or len(ids) > 100_000:
            raise ProtocolError("DROP body must be a list of stub ids")
        return Drop([_int(i, "stub_id") for i in ids])
    _frames(frames, 2, "STATS")
    return Stats(unpack_u64(frames[1], "call_id"))


@dataclass(slots=True)
class Welcome:
    broker: int
    namespaces: dict[str, str]

    def encode(self) -> list[bytes]:
        return [header(Cmd.WELCOME), orjson.dumps({"broker": self.broker, "namespaces": self.namespaces})]


@dataclass(slots=True)
class Reply:
    call_id: int
    head: bytes
    body: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.REPLY), pack_u64(self.call_id), self.head, self.body]


@dataclass(slots=True)
class Error:
    call_id: int
    code: str
    message: str
    remote_type: str | None = None
    traceback: str | None = None

    def encode(self) -> list[bytes]:
        body = {"code": self.code, "message": self.message, "remote_type": self.remote_type}
        if self.traceback is not None:
            body["traceback"] = self.traceback
        return [header(Cmd.ERROR), pack_u64(self.call_id), orjson.dumps(body)]


@dataclass(slots=True)
class Pong:
    broker: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.PONG), pack_u64(self.broker)]


@dataclass(slots=True)
class Disconnect:
    reason: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.DISCONNECT), self.reason.encode()]


@dataclass(slots=True)
class StatsReply:
    call_id: int
    stats: dict[str, Any]

    def encode(self) -> list[bytes]:
        return [header(Cmd.STATS_REPLY), pack_u64(self.call_id), orjson.dumps(self.stats)]


_TO_CLIENT = frozenset({Cmd.WELCOME, Cmd.REPLY, Cmd.ERROR, Cmd.PONG, Cmd.DISCONNECT, Cmd.STATS_REPLY})


def parse_from_broker_to_client(frames: list[bytes]) -> Welcome | Reply | Error | Pong | Disconnect | StatsReply:
    cmd = _cmd(frames, _TO_CLIENT, "to a client")
    if cmd is Cmd.REPLY:
        _frames(frames, 4, "REPLY")
        return Reply(unpack_u64(frames[1], "call_id"), frames[2], frames[3])
    if cmd is Cmd.ERROR:
        _frames(frames, 3, "ERROR")
        return Error(unpack_u64(frames[1], "call_id"), *_error_fields(frames[2]))
    if cmd is Cmd.PONG:
        _frames(frames, 2, "PONG")
        return Pong(unpack_u64(frames[1], "broker incarnation"))
    if cmd is Cmd.WELCOME:
        _frames(frames, 2, "WELCOME")
        w = _json(frames[1], "WELCOME body")
        if type(w) is not dict or type(w.get("namespaces")) is not dict:
            raise ProtocolError("WELCOME body must hold namespaces")
        ns = {_str(k, "namespace"): _str(v, "namespace key") for k, v in w["namespaces"].items()}
        return Welcome(_int(w.get("broker"), "broker incarnation"), ns)
    if cmd is Cmd.DISCONNECT:
        _frames(frames, 2, "DISCONNECT")
        return Disconnect(bytes(frames[1]).decode("utf-8", "replace"))
    _frames(frames, 3, "STATS_REPLY")
    s = _json(frames[2], "STATS_REPLY body")
    if type(s) is not dict:
        raise ProtocolError("STATS_REPLY body must be an object")
    return StatsReply(unpack_u64(frames[1], "call_id"), s)


# -- object process <-> broker ----------------------------------------------------------
@dataclass(slots=True)
class Ready:
    slot: int
    pid: int
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.READY), orjson.dumps({"protocol": VERSION, "slot": self.slot,
                                                 "pid": self.pid, "incarnation": self.incarnation})]


@dataclass(slots=True)
class WorkerReply:
    client: bytes
    call_id: int
    head: bytes
    body: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.WREPLY), self.client, pack_u64(self.call_id), self.head, self.body]


@dataclass(slots=True)
class WorkerError:
    client: bytes
    call_id: int
    payload: bytes  # {"code", "message", "remote_type"}, forwarded as is

    def encode(self) -> list[bytes]:
        return [header(Cmd.WERROR), self.client, pack_u64(self.call_id), self.payload]


@dataclass(slots=True)
class WorkerHeartbeat:
    stats: dict[str, Any]

    def encode(self) -> list[bytes]:
        return [header(Cmd.WHEARTBEAT), orjson.dumps(self.stats)]


_FROM_WORKER = frozenset({Cmd.READY, Cmd.WREPLY, Cmd.WERROR, Cmd.WHEARTBEAT, Cmd.WBEAT})


def parse_from_worker(frames: list[bytes]) -> Ready | WorkerReply | WorkerError | WorkerHeartbeat | Beat:
    cmd = _cmd(frames, _FROM_WORKER, "from an object process")
    if cmd is Cmd.WBEAT:
        _frames(frames, 3, "WBEAT")
        return Beat(unpack_u64(frames[1], "slot"), unpack_u64(frames[2], "incarnation"))
    if cmd is Cmd.WREPLY:
        _frames(frames, 5, "WREPLY")
        return WorkerReply(frames[1], unpack_u64(frames[2], "call_id"), frames[3], frames[4])
    if cmd is Cmd.WERROR:
        _frames(frames, 4, "WERROR")
        _error_fields(frames[3])
        return WorkerError(frames[1], unpack_u64(frames[2], "call_id"), frames[3])
    if cmd is Cmd.WHEARTBEAT:
        _frames(frames, 2, "WHEARTBEAT")
        s = _json(frames[1], "WHEARTBEAT body")
        if type(s) is not dict:
            raise ProtocolError("WHEARTBEAT body must be an object")
        return WorkerHeartbeat(s)
    _frames(frames, 2, "READY")
    r = _json(frames[1], "READY body")
    if type(r) is not dict:
        raise ProtocolError("READY body must be an object")
    if r.get("protocol") != VERSION:
        raise ProtocolError(f"READY speaks protocol {r.get('protocol')!r}; this broker speaks {VERSION}")
    return Ready(_int(r.get("slot"), "slot", 0, 65535), _int(r.get("pid"), "pid"),
                 _int(r.get("incarnation"), "incarnation", 1))


@dataclass(slots=True)
class Beat:
    """An object process's heartbeat thread: this slot's incarnation is alive."""

    slot: int
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.WBEAT), pack_u64(self.slot), pack_u64(self.incarnation)]


def _name(v: object) -> str:
    if type(v) is not str or len(v) > 4096:
        raise ProtocolError("an object name must be a str of at most 4096 characters")
    return v


@dataclass(slots=True)
class WorkerCall:
    client: bytes
    call_id: int
    namespace: str
    object_id: str
    head: bytes
    body: bytes
    name: str | None = None

    def encode(self) -> list[bytes]:
        m = [self.call_id, self.namespace, self.object_id]
        if self.name is not None:
            m.append(self.name)
        return [header(Cmd.WCALL), self.client, orjson.dumps(m), self.head, self.body]


@dataclass(slots=True)
class BrokerHeartbeat:
    def encode(self) -> list[bytes]:
        return [header(Cmd.BHEARTBEAT), b"{}"]


@dataclass(slots=True)
class WorkerDisconnect:
    reason: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.WDISCONNECT), self.reason.encode()]


_TO_WORKER = frozenset({Cmd.WCALL, Cmd.BHEARTBEAT, Cmd.WDISCONNECT})


def parse_from_broker_to_worker(frames: list[bytes]) -> WorkerCall | BrokerHeartbeat | WorkerDisconnect:
    cmd = _cmd(frames, _TO_WORKER, "to an object process")
    if cmd is Cmd.WCALL:
        _frames(frames, 5, "WCALL")
        m = _json(frames[2], "WCALL meta")
        if type(m) is not list or len(m) not in (3, 4):
            raise ProtocolError("WCALL meta must be [call_id, namespace, object_id(, name)]")
        return WorkerCall(frames[1], _int(m[0], "call_id"), _str(m[1], "namespace"),
                          _str(m[2], "object_id"), frames[3], frames[4],
                          _name(m[3]) if len(m) == 4 else None)
    if cmd is Cmd.BHEARTBEAT:
        _frames(frames, 2, "WHEARTBEAT")
        return BrokerHeartbeat()
    _frames(frames, 2, "WDISCONNECT")
    return WorkerDisconnect(bytes(frames[1]).decode("utf-8", "replace"))


# -- supervisor -> broker ---------------------------------------------------------------
@dataclass(slots=True)
class Control:
    """Supervisor -> broker. ``slot_down``: that process exited; ``slot_failed``: its slot
    will not come back until an operator acts (``reason`` says why; calls fail at once);
    ``drain``: refuse new calls."""

    op: str  # "slot_down", "slot_failed" or "drain"
    slot: int | None = None
    pid: int | None = None
    reason: str | None = None

    def encode(self) -> list[bytes]:
        body: dict[str, Any] = {"op": self.op}
        if self.op in ("slot_down", "slot_failed"):
            body.update(slot=self.slot, pid=self.pid)
        if self.op == "slot_failed":
            body["reason"] = self.reason or ""
        return [header(Cmd.CONTROL), orjson.dumps(body)]


_CONTROL_OPS = ("slot_down", "slot_failed", "drain")


def parse_control(frames: list[bytes]) -> Control:
    _cmd(frames, frozenset({Cmd.CONTROL}), "on the control socket")
    _frames(frames, 2, "CONTROL")
    c = _json(frames[1], "CONTROL body")
    if type(c) is not dict or c.get("op") not in _CONTROL_OPS:
        raise ProtocolError("CONTROL body must be {op: 'slot_down' | 'slot_failed' | 'drain', ...}")
    if c["op"] == "drain":
        return Control("drain")
    slot, pid = _int(c.get("slot"), "slot", 0, 65535), _int(c.get("pid"), "pid")
    if c["op"] == "slot_failed":
        reason = c.get("reason")
        if type(reason) is not str:
            raise ProtocolError("CONTROL slot_failed needs a reason string")
        return Control("slot_failed", slot, pid, reason[:2000])
    return Control("slot_down", slot, pid)
