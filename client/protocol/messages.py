"""Wire messages: frames in, typed messages out (sans I/O; never imports zmq).

Every message is a ZeroMQ multipart message (the ROUTER's identity frame is
stripped before parsing and added after encoding). Frame 0 is the header:
``b"D"``, the protocol version byte, the command byte. Small structured parts
are orjson; request and response bodies travel as their own frames, which
the broker forwards without decoding. A call id is always a frame of its own
(``u64``: 8 bytes little-endian), so the broker routes replies without JSON.

Each message class below carries its layout once: ``CMD``, ``encode()`` and
``decode(frames)`` side by side. ``parse(frames, DIRECTION)`` checks the
header and the frame count, and looks the class up in that direction's
``{Cmd: class}`` table; anything malformed is a ``ProtocolError``.

Client → broker (``FROM_CLIENT``)::

    HELLO   [hdr, {"pid": int, "name": str}]
    CALL    [hdr, call_id, [stub_id, namespace, object_id, timeout_ms(, name)], request_head, body]
    PING    [hdr]
    DROP    [hdr, [stub_id, ...]]              stubs the client no longer holds
    STATS   [hdr, call_id]

Broker → client (``TO_CLIENT``)::

    WELCOME     [hdr, {"broker": incarnation, "namespaces": {name: key_hex}(, "peers":
                      {"slots": n, "endpoint": "ipc://.../peer-{slot}.sock"})}]
                                               (peers: to local clients, for the peer path)
    REPLY       [hdr, call_id, response_head, body]
    ERROR       [hdr, call_id, {"code", "message", "remote_type"(, "traceback")}]
    PONG        [hdr, broker incarnation(u64)]
    DISCONNECT  [hdr, reason]                  "I do not know you: send HELLO"
    STATS_REPLY [hdr, call_id, {...}]
    CHANNEL     [hdr, channels(u64...), kind, payload]   an object's WebSocket messages, or
                                                         a streamed body's chunks
    BROKEN      [hdr, [stub_id, ...]]          these stubs' object process is gone (their
                                               WebSockets close with 1012)

Object process → broker (``FROM_WORKER``)::

    READY      [hdr, {"protocol": VERSION, "slot": int, "pid": int, "incarnation": int}]
    WREPLY     [hdr, client, call_id, response_head, body]
    WERROR     [hdr, client, call_id, {"code", "message", "remote_type"(, "traceback")}]
    WHEARTBEAT [hdr, {"active": int, "queued": int, ...}]
    WBEAT      [hdr, slot(u64), incarnation(u64)]  from the process's heartbeat thread, on
                                                   a socket of its own: alive even while
                                                   its loop runs a long call
    WSEND      [hdr, client, channels(u64...), kind, payload]  to that client's channels
    WSTOPPING  [hdr]                           this process drains and exits: send it no new
                                               calls (they wait for the next process)
    WASK       [hdr, incarnation(u64)]         after this process stood still (or its beat
                                               thread could not beat): is this incarnation
                                               still the slot's? (WALIVE, or WDISCONNECT)

Broker → object process (``TO_WORKER``)::

    WCALL       [hdr, client, call_id, [namespace, object_id(, name)], request_head, body]
    BHEARTBEAT  [hdr]
    WDISCONNECT [hdr, reason]                  "register again (READY)"
    WGONE       [hdr, client]                  that client is gone: its channels are closed
    WALIVE      [hdr, incarnation(u64)]        the answer to WASK: this broker has not ended
                                               it (everything it sent before came first)

Object process → object process of another slot (the peer path, docs/messaging.md: a
caller's DEALER to the callee's ROUTER at ``ipc://RUN_DIR/peer-<slot>.sock``)::

    PHELLO    [hdr]                                 caller -> callee: which incarnation serves?
    PWELCOME  [hdr, slot(u64), incarnation(u64)]     callee -> caller: this one (again whenever
                                                    it registers anew)
    PBYE      [hdr, slot(u64), incarnation(u64)]     callee -> caller: this incarnation is
                                                    stopping: no new stubs on the link (calls
                                                    in flight are answered)
    PCALL     [hdr, incarnation(u64), call_id, [namespace, object_id(, name)], request_head,
               body]                                a stub's call; refused (StubBrokenError)
                                                    unless ``incarnation`` is the callee's
    and back to the caller, as from the broker: REPLY, ERROR, CHANNEL.

Batches, on the peer links and the broker's (docs/messaging.md)::

    PBATCHES  [hdr]                                 "this side reads batches": a caller says it
                                                    after PHELLO, a client after HELLO, an
                                                    object process after READY; the other side
                                                    answers it once it reads them too
    PBATCH    [hdr, counts, lengths, blob]          several messages to one peer as one
                                                    (``pack_batch``), only to a side that said
                                                    PBATCHES

Supervisor → broker (``CONTROL``; a PUSH to the broker's PULL socket in the 0700 run dir)::

    CONTROL [hdr, {"op": "slot_down", "slot": int, "pid": int}]   the process exited: end it now
    CONTROL [hdr, {"op": "slot_failed", "slot", "pid", "reason"}]  down until an operator acts
    CONTROL [hdr, {"op": "drain"}]                                refuse new calls (stopping)
    CONTROL [hdr, {"op": "client_exit", "pid": int}]  a gateway process exited: forget its
                                                     clients now (their WebSockets closed)

``request_head`` is ``[method, url, [[name, value], ...]]`` and
``response_head`` is ``[status, [[name, value], ...]]``. A method call on a
stub uses the same CALL: its head is ``b"@"`` and the method's name (never a
JSON array), its body ``codec.encode_call(args, kwargs)``; its REPLY's head
is ``b"@"`` and its body ``codec.encode(result, rpc=True)``.

Channels (docs/objects.md, "WebSockets"): a client numbers each WebSocket it
opens (a u64 from its call ids) and sends it as the fourth element of the
upgrade request's head; events on it (messages, close, error) are CALLs on
the same stub whose head is ``b"#"``, a kind byte and the channel (``ChannelEvent``).
An object sends on channels with WSEND, one payload to many channels of one
client at once (a broadcast crosses the broker once per client). A streamed
response is a channel numbered by its call id: its head's third element is
``"stream"``, then CHANNEL messages carry its chunks (``OUT_DATA``), its end
or failure; the reader grants credit (``EV_CREDIT``) or cancels (``EV_CANCEL``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import orjson

from .. import codec
from ..errors import DurableError, ObjectError, ProtocolError
from ..http import Request, Response
from ..ids import MAX_OBJECT_NAME

__all__ = [
    "VERSION", "Cmd", "Message", "Hello", "Call", "Ping", "Drop", "Stats", "Welcome", "Reply",
    "Error", "Pong", "Disconnect", "StatsReply", "Ready", "WorkerReply", "WorkerError",
    "WorkerHeartbeat", "WorkerStopping", "WorkerCall", "BrokerHeartbeat", "WorkerDisconnect", "Beat", "AskAlive", "StillAlive", "Control",
    "FROM_CLIENT", "TO_CLIENT", "FROM_WORKER", "TO_WORKER", "CONTROL", "parse",
    "parse_from_client", "parse_from_broker_to_client", "parse_from_worker",
    "parse_from_broker_to_worker", "parse_control", "encode_request", "decode_request",
    "encode_response", "decode_response", "error_fields", "header", "pack_u64", "unpack_u64",
    "METHOD", "MethodCall", "encode_method_call", "decode_method_call", "encode_result",
    "decode_result", "WorkerSend", "ChannelSend", "Broken", "ClientGone", "ChannelEvent",
    "encode_event", "decode_event", "pack_channels", "unpack_channels", "EVENT", "STREAM",
    "WEBSOCKET", "STREAMED", "UPGRADED", "LOCAL", "to_client", "PeerHello", "PeerWelcome",
    "PeerCall", "PeerBye", "PeerBatches", "FROM_PEER", "TO_PEER", "PEER", "BATCH",
    "MAX_BATCH", "MAX_BATCH_BYTES", "BIG_FRAME", "batch_runs", "pack_batch", "unpack_batch",
]

#: 2: call ids are u64 frames in CALL and WCALL too (1 carried them in the JSON meta)
VERSION = 2
_U64 = struct.Struct("<Q")
MAX_NAME = 256
#: the longest call timeout a CALL carries, in milliseconds (~24.8 days)
MAX_TIMEOUT_MS = 2**31
#: the largest frame any durable socket accepts (ZeroMQ's MAXMSGSIZE): a peer that sends a
#: larger one is disconnected, and every call it had in flight fails with it. So a call's
#: body and its answer are checked against it before they are sent (``frame_too_big``).
MAX_FRAME_BYTES = 64 << 20


def frame_too_big(what: str, *frames: bytes) -> str | None:
    """Why ``frames`` may not be sent (one is over ``MAX_FRAME_BYTES``), else None."""
    n = max(map(len, frames))
    if n <= MAX_FRAME_BYTES:
        return None
    return (f"{what} is {n / 2**20:.1f} MiB; a call or its answer carries at most "
            f"{MAX_FRAME_BYTES >> 20} MiB")


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
    CHANNEL = 0x17
    BROKEN = 0x18
    READY = 0x21
    WREPLY = 0x22
    WERROR = 0x23
    WHEARTBEAT = 0x24
    WBEAT = 0x25
    WSEND = 0x26
    WSTOPPING = 0x27
    WASK = 0x28
    WCALL = 0x31
    BHEARTBEAT = 0x32
    WDISCONNECT = 0x33
    WGONE = 0x34
    WALIVE = 0x35
    CONTROL = 0x41
    PHELLO = 0x51
    PWELCOME = 0x52
    PCALL = 0x53
    PBYE = 0x54
    PBATCHES = 0x55
    PBATCH = 0x56


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


def _obj(frame: bytes, what: str) -> dict[str, Any]:
    v = _json(frame, what)
    if type(v) is not dict:
        raise ProtocolError(f"{what} must be a JSON object")
    return v


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _str(v: Any, what: str, limit: int = MAX_NAME) -> str:
    if type(v) is not str or not v or len(v) > limit:
        raise ProtocolError(f"{what} must be a non-empty str of at most {limit} chars, got {v!r:.40}")
    return v


def _name(v: Any) -> str:
    if type(v) is not str or len(v) > MAX_OBJECT_NAME:
        raise ProtocolError(f"an object name must be a str of at most {MAX_OBJECT_NAME} characters")
    return v


def _pack_target(namespace: str, object_id: str, name: str | None) -> bytes:
    """The meta frame of WCALL and PCALL: ``[namespace, object_id(, name)]``."""
    return orjson.dumps([namespace, object_id] if name is None else [namespace, object_id, name])


def _unpack_target(frame: bytes, cmd: str) -> tuple[str, str, str | None]:
    m = _json(frame, f"{cmd} meta")
    if type(m) is not list or len(m) not in (2, 3):
        raise ProtocolError(f"{cmd} meta must be [namespace, object_id(, name)]")
    return _str(m[0], "namespace"), _str(m[1], "object_id"), _name(m[2]) if len(m) == 3 else None


def _text(frame: bytes) -> str:
    return bytes(frame).decode("utf-8", "replace")


# -- request and response heads -------------------------------------------------------
def encode_request(req: Request, channel: int | None = None) -> tuple[bytes, bytes]:
    """``channel``: the WebSocket this upgrade request may open (the caller's id for it)."""
    if channel is None:
        return orjson.dumps([req.method, req.url, req.headers.items()]), req.body
    return orjson.dumps([req.method, req.url, req.headers.items(), channel]), req.body


def decode_request(head: bytes, body: bytes) -> Request:
    h = _json(head, "request head")
    if type(h) is not list or len(h) not in (3, 4) or type(h[2]) is not list:
        raise ProtocolError("request head must be [method, url, headers(, channel)]")
    try:
        req = Request(h[1], method=h[0], headers=[tuple(p) for p in h[2]], body=body)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad request head: {e}") from None
    if len(h) == 4:
        req._upgrade = _int(h[3], "channel", 1)
    return req


#: a response's third head element: its body streams (channel = the call id), or it
#: accepted a WebSocket (channel = the request's)
STREAM = "stream"
WEBSOCKET = "websocket"
#: placeholders in a decoded Response until the client binds the channel
STREAMED: Any = object()
UPGRADED: Any = object()


def encode_response(resp: Response) -> tuple[bytes, bytes]:
    if resp.websocket is not None:
        return orjson.dumps([101, resp.headers.items(), WEBSOCKET]), b""
    if resp._stream is not None:
        return orjson.dumps([resp.status, resp.headers.items(), STREAM]), b""
    return orjson.dumps([resp.status, resp.headers.items()]), resp.body


def decode_response(head: bytes, body: bytes) -> Response:
    """A response; one whose body streams holds ``STREAMED``, an accepted WebSocket
    ``UPGRADED``, for the client to replace with the channel."""
    h = _json(head, "response head")
    if type(h) is not list or len(h) not in (2, 3) or type(h[1]) is not list:
        raise ProtocolError("response head must be [status, headers(, mode)]")
    mode = h[2] if len(h) == 3 else None
    if mode not in (None, STREAM, WEBSOCKET):
        raise ProtocolError(f"unknown response mode {mode!r:.40}")
    try:
        resp = Response(body, status=h[0], headers=[tuple(p) for p in h[1]],
                        websocket=UPGRADED if mode == WEBSOCKET else None)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad response head: {e}") from None
    if mode == STREAM:
        resp._stream = STREAMED
    return resp


# -- channels: WebSockets and streamed bodies -----------------------------------------
#: A CALL whose head starts with ``#`` is an event on a channel, not a request:
#: ``b"#" + kind + u64 channel``. Kinds from the client:
EVENT = b"#"
EV_TEXT, EV_BINARY, EV_CLOSE, EV_ERROR = b"t", b"b", b"c", b"e"  # a WebSocket's
EV_CANCEL, EV_CREDIT = b"x", b"k"  # a stream's: the reader left; it read this many bytes
_EVENTS = frozenset((EV_TEXT, EV_BINARY, EV_CLOSE, EV_ERROR, EV_CANCEL, EV_CREDIT))
#: Kinds an object process sends on channels (WSEND, then CHANNEL to the client):
#: text and binary messages (EV_TEXT, EV_BINARY), and
OUT_CLOSE = b"c"  # [code, reason]: the object closed the socket
OUT_AUTO = b"a"  # [request, response] or null: the socket's auto-response
OUT_DATA, OUT_END, OUT_FAIL = b"d", b"e", b"x"  # a stream's chunk, end, failure (text)
_OUT = frozenset((EV_TEXT, EV_BINARY, OUT_CLOSE, OUT_AUTO, OUT_DATA, OUT_END, OUT_FAIL))
MAX_CLOSE_REASON = 123  # bytes (RFC 6455: a close frame's payload is at most 125)


@dataclass(slots=True)
class ChannelEvent:
    """What a client tells an object about one of its channels (a CALL with head ``#``)."""

    kind: bytes
    channel: int
    data: bytes | str = b""
    code: int = 0
    reason: str = ""
    was_clean: bool = False
    credit: int = 0


def encode_event(kind: bytes, channel: int, data: bytes | str = b"", *, code: int = 0,
                 reason: str = "", was_clean: bool = False, credit: int = 0) -> tuple[bytes, bytes]:
    head = EVENT + kind + _U64.pack(channel)
    if kind == EV_TEXT:
        return head, data.encode() if isinstance(data, str) else data
    if kind == EV_CLOSE:
        return head, orjson.dumps([code, reason, was_clean])
    if kind == EV_ERROR:
        return head, data.encode() if isinstance(data, str) else data
    if kind == EV_CREDIT:
        return head, _U64.pack(credit)
    return head, bytes(data) if not isinstance(data, str) else data.encode()


def decode_event(head: bytes, body: bytes) -> ChannelEvent:
    if len(head) != 10 or head[1:2] not in _EVENTS:
        raise ProtocolError(f"bad channel event head {bytes(head[:12])!r}")
    kind, channel = bytes(head[1:2]), _U64.unpack_from(head, 2)[0]
    if kind == EV_TEXT:
        try:
            return ChannelEvent(kind, channel, bytes(body).decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("a WebSocket text message is not valid UTF-8") from None
    if kind == EV_BINARY:
        return ChannelEvent(kind, channel, bytes(body))
    if kind == EV_CLOSE:
        c = _json(body, "close event")
        if type(c) is not list or len(c) != 3 or type(c[1]) is not str or type(c[2]) is not bool:
            raise ProtocolError("close event must be [code, reason, was_clean]")
        return ChannelEvent(kind, channel, code=_int(c[0], "close code", 0, 4999),
                            reason=c[1][:MAX_CLOSE_REASON], was_clean=c[2])
    if kind == EV_ERROR:
        return ChannelEvent(kind, channel, _text(body)[:2000])
    if kind == EV_CREDIT:
        return ChannelEvent(kind, channel, credit=unpack_u64(body, "credit"))
    return ChannelEvent(kind, channel)


def pack_channels(channels: list[int]) -> bytes:
    return struct.pack(f"<{len(channels)}Q", *channels)


def unpack_channels(frame: bytes) -> list[int]:
    if not frame or len(frame) % 8:
        raise ProtocolError(f"a channel list is a non-empty multiple of 8 bytes, got {len(frame)}")
    return list(struct.unpack(f"<{len(frame) // 8}Q", frame))


# -- method calls ---------------------------------------------------------------------
METHOD = b"@"
MAX_METHOD_NAME = 200


@dataclass(slots=True)
class MethodCall:
    """``stub.name(*args, **kwargs)``, as the object process receives it."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def encode_method_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, bytes]:
    """(head, body) of a method call; ``TypeError`` naming the argument that cannot be sent."""
    return METHOD + name.encode(), codec.encode_call(args, kwargs)


def decode_method_call(head: bytes, body: bytes) -> MethodCall:
    name = bytes(head[1:]).decode("utf-8", "replace")
    if not name.isidentifier() or name.startswith("_") or len(name) > MAX_METHOD_NAME:
        raise ProtocolError(f"{name[:MAX_METHOD_NAME]!r} is not a method name that may be called "
                            "(an identifier not starting with '_')")
    try:
        args, kwargs = codec.decode_call(body)
    except codec.MalformedValueError as e:
        raise ProtocolError(f"the arguments of {name}() are malformed: {e}") from None
    return MethodCall(name, args, kwargs)


def encode_result(value: Any) -> tuple[bytes, bytes]:
    """(head, body) of a method call's reply; ``TypeError`` if the value cannot be sent."""
    return METHOD, codec.encode(value, rpc=True)


def decode_result(body: bytes) -> Any:
    try:
        return codec.decode(body, rpc=True)
    except codec.MalformedValueError as e:
        raise ProtocolError(f"a method's result is malformed: {e}") from None


# -- errors ---------------------------------------------------------------------------
def error_fields(err: BaseException) -> tuple[str, str, str, str | None]:
    """(wire code, message, type name, builtin ancestor) for an exception: a
    DurableError's own ``code``, ``object_error`` for anything else."""
    if isinstance(err, DurableError):
        return (err.code, getattr(err, "remote_message", str(err)),
                getattr(err, "remote_type", type(err).__name__),
                err.remote_builtin if isinstance(err, ObjectError) else None)
    return "object_error", str(err), type(err).__name__, builtin_ancestor(type(err))


def builtin_ancestor(cls: type) -> str | None:
    """The nearest builtin exception a class derives from (``KeyError`` for ``class
    NotFound(KeyError)``), so the caller's ``except KeyError`` catches it too."""
    for base in cls.__mro__:
        if base.__module__ == "builtins" and base.__name__ in _MIXABLE:
            return base.__name__
    return None


#: builtin exceptions a caller's error may also be an instance of (errors.error_from_wire)
_MIXABLE = frozenset({
    "ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
    "FloatingPointError", "LookupError", "IndexError", "KeyError", "MemoryError", "NameError",
    "NotImplementedError", "OverflowError", "RecursionError", "ReferenceError",
    "RuntimeError", "TypeError", "UnboundLocalError", "UnicodeError", "ValueError",
    "ZeroDivisionError", "OSError", "BlockingIOError", "ChildProcessError", "ConnectionError",
    "BrokenPipeError", "ConnectionAbortedError", "ConnectionRefusedError",
    "ConnectionResetError", "FileExistsError", "FileNotFoundError", "InterruptedError",
    "IsADirectoryError", "NotADirectoryError", "PermissionError", "ProcessLookupError",
    "TimeoutError", "ModuleNotFoundError", "ImportError",
})


def _encode_error(code: str, message: str, remote_type: str | None, tb: str | None,
                  builtin: str | None) -> bytes:
    body = {"code": code, "message": message, "remote_type": remote_type}
    if tb is not None:
        body["traceback"] = tb
    if builtin is not None:
        body["builtin"] = builtin
    return orjson.dumps(body)


def _decode_error(frame: bytes) -> tuple[str, str, str | None, str | None, str | None]:
    e = _obj(frame, "error payload")
    if type(e.get("code")) is not str or type(e.get("message")) is not str:
        raise ProtocolError("error payload must be {code: str, message: str}")
    rt, tb, bi = e.get("remote_type"), e.get("traceback"), e.get("builtin")
    return (e["code"], e["message"], rt if type(rt) is str else None,
            tb if type(tb) is str else None, bi if bi in _MIXABLE else None)


# -- the messages ---------------------------------------------------------------------
class Message:
    """A wire message: ``CMD``, ``FRAMES`` (the count ``parse`` checks), ``encode`` and
    ``decode`` (given frames whose header and count are already checked)."""

    __slots__ = ()
    CMD: ClassVar[Cmd]
    FRAMES: ClassVar[int]

    def encode(self) -> list[bytes]:
        raise NotImplementedError

    @classmethod
    def decode(cls, frames: list[bytes]) -> Message:
        raise NotImplementedError


@dataclass(slots=True)
class Hello(Message):
    CMD: ClassVar[Cmd] = Cmd.HELLO
    FRAMES: ClassVar[int] = 2
    pid: int
    name: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.HELLO), orjson.dumps({"pid": self.pid, "name": self.name})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Hello:
        h = _obj(frames[1], "HELLO body")
        return cls(_int(h.get("pid"), "pid"), _str(h.get("name", "client"), "name"))


@dataclass(slots=True)
class Call(Message):
    CMD: ClassVar[Cmd] = Cmd.CALL
    FRAMES: ClassVar[int] = 5
    call_id: int
    stub_id: int
    namespace: str
    object_id: str
    timeout_ms: int  # the broker fails the call with ``timeout`` past it
    head: bytes
    body: bytes
    name: str | None = None  # the name the id was derived from (id_from_name), if any

    def encode(self) -> list[bytes]:
        m = [self.stub_id, self.namespace, self.object_id, self.timeout_ms]
        if self.name is not None:
            m.append(self.name)
        return [header(Cmd.CALL), pack_u64(self.call_id), orjson.dumps(m), self.head, self.body]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Call:
        m = _json(frames[2], "CALL meta")
        if type(m) is not list or len(m) not in (4, 5):
            raise ProtocolError("CALL meta must be [stub_id, namespace, object_id, timeout_ms(, name)]")
        return cls(unpack_u64(frames[1], "call_id"), _int(m[0], "stub_id"),
                   _str(m[1], "namespace"), _str(m[2], "object_id"),
                   _int(m[3], "timeout_ms", 0, MAX_TIMEOUT_MS), frames[3], frames[4],
                   _name(m[4]) if len(m) == 5 else None)


@dataclass(slots=True)
class Ping(Message):
    CMD: ClassVar[Cmd] = Cmd.PING
    FRAMES: ClassVar[int] = 1

    def encode(self) -> list[bytes]:
        return [header(Cmd.PING)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Ping:
        return cls()


@dataclass(slots=True)
class Drop(Message):
    CMD: ClassVar[Cmd] = Cmd.DROP
    FRAMES: ClassVar[int] = 2
    stub_ids: list[int]

    def encode(self) -> list[bytes]:
        return [header(Cmd.DROP), orjson.dumps(self.stub_ids)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Drop:
        ids = _json(frames[1], "DROP body")
        if type(ids) is not list or len(ids) > MAX_DROP:
            raise ProtocolError(f"DROP body must be a list of at most {MAX_DROP:,} stub ids")
        return cls([_int(i, "stub_id") for i in ids])

    @classmethod
    def messages(cls, stub_ids: list[int]) -> list[list[bytes]]:
        """``stub_ids`` as DROPs the broker accepts (a longer one it would refuse whole, and
        keep every one of those stubs for as long as the client stays connected)."""
        return [cls(stub_ids[i:i + MAX_DROP]).encode() for i in range(0, len(stub_ids), MAX_DROP)]


#: stub ids in one DROP at most
MAX_DROP = 100_000


@dataclass(slots=True)
class Stats(Message):
    CMD: ClassVar[Cmd] = Cmd.STATS
    FRAMES: ClassVar[int] = 2
    call_id: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.STATS), pack_u64(self.call_id)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Stats:
        return cls(unpack_u64(frames[1], "call_id"))


@dataclass(slots=True)
class Welcome(Message):
    CMD: ClassVar[Cmd] = Cmd.WELCOME
    FRAMES: ClassVar[int] = 2
    broker: int
    namespaces: dict[str, str]
    #: (slot count, endpoint with ``{slot}``) of the object processes' peer sockets, for a
    #: client on the daemon's machine (``durable.peers``); None: calls go by the broker
    peers: tuple[int, str] | None = None

    def encode(self) -> list[bytes]:
        w: dict[str, Any] = {"broker": self.broker, "namespaces": self.namespaces}
        if self.peers is not None:
            w["peers"] = {"slots": self.peers[0], "endpoint": self.peers[1]}
        return [header(Cmd.WELCOME), orjson.dumps(w)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Welcome:
        w = _obj(frames[1], "WELCOME body")
        if type(w.get("namespaces")) is not dict:
            raise ProtocolError("WELCOME body must hold namespaces")
        ns = {_str(k, "namespace"): _str(v, "namespace key") for k, v in w["namespaces"].items()}
        peers = w.get("peers")
        if peers is not None:
            if type(peers) is not dict:
                raise ProtocolError("WELCOME peers must be an object")
            endpoint = _str(peers.get("endpoint"), "peers endpoint", 4096)
            if not endpoint.startswith("ipc://") or "{slot}" not in endpoint:
                raise ProtocolError("WELCOME peers endpoint must be ipc:// with {slot}")
            peers = (_int(peers.get("slots"), "peers slots", 1, 65536), endpoint)
        return cls(_int(w.get("broker"), "broker incarnation"), ns, peers)


@dataclass(slots=True)
class Reply(Message):
    CMD: ClassVar[Cmd] = Cmd.REPLY
    FRAMES: ClassVar[int] = 4
    call_id: int
    head: bytes
    body: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.REPLY), pack_u64(self.call_id), self.head, self.body]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Reply:
        return cls(unpack_u64(frames[1], "call_id"), frames[2], frames[3])


@dataclass(slots=True)
class Error(Message):
    CMD: ClassVar[Cmd] = Cmd.ERROR
    FRAMES: ClassVar[int] = 3
    call_id: int
    code: str  # an error class's ``code`` (errors.py); error_from_wire rebuilds the class
    message: str
    remote_type: str | None = None
    traceback: str | None = None
    builtin: str | None = None  # the builtin exception the remote one derives from, if any

    def encode(self) -> list[bytes]:
        return [header(Cmd.ERROR), pack_u64(self.call_id), _encode_error(
            self.code, self.message, self.remote_type, self.traceback, self.builtin)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Error:
        return cls(unpack_u64(frames[1], "call_id"), *_decode_error(frames[2]))


@dataclass(slots=True)
class Pong(Message):
    CMD: ClassVar[Cmd] = Cmd.PONG
    FRAMES: ClassVar[int] = 2
    broker: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.PONG), pack_u64(self.broker)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Pong:
        return cls(unpack_u64(frames[1], "broker incarnation"))


@dataclass(slots=True)
class Disconnect(Message):
    CMD: ClassVar[Cmd] = Cmd.DISCONNECT
    FRAMES: ClassVar[int] = 2
    reason: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.DISCONNECT), self.reason.encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Disconnect:
        return cls(_text(frames[1]))


@dataclass(slots=True)
class StatsReply(Message):
    CMD: ClassVar[Cmd] = Cmd.STATS_REPLY
    FRAMES: ClassVar[int] = 3
    call_id: int
    stats: dict[str, Any]

    def encode(self) -> list[bytes]:
        return [header(Cmd.STATS_REPLY), pack_u64(self.call_id), orjson.dumps(self.stats)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> StatsReply:
        return cls(unpack_u64(frames[1], "call_id"), _obj(frames[2], "STATS_REPLY body"))


@dataclass(slots=True)
class Ready(Message):
    CMD: ClassVar[Cmd] = Cmd.READY
    FRAMES: ClassVar[int] = 2
    slot: int
    pid: int
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.READY), orjson.dumps({"protocol": VERSION, "slot": self.slot,
                                                 "pid": self.pid, "incarnation": self.incarnation})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Ready:
        r = _obj(frames[1], "READY body")
        if r.get("protocol") != VERSION:
            raise ProtocolError(f"READY speaks protocol {r.get('protocol')!r}; this broker speaks {VERSION}")
        return cls(_int(r.get("slot"), "slot", 0, 65535), _int(r.get("pid"), "pid"),
                   _int(r.get("incarnation"), "incarnation", 1))


@dataclass(slots=True)
class WorkerReply(Message):
    CMD: ClassVar[Cmd] = Cmd.WREPLY
    FRAMES: ClassVar[int] = 5
    client: bytes
    call_id: int
    head: bytes
    body: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.WREPLY), self.client, pack_u64(self.call_id), self.head, self.body]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerReply:
        return cls(frames[1], unpack_u64(frames[2], "call_id"), frames[3], frames[4])


@dataclass(slots=True)
class WorkerError(Message):
    CMD: ClassVar[Cmd] = Cmd.WERROR
    FRAMES: ClassVar[int] = 4
    client: bytes
    call_id: int
    code: str
    message: str
    remote_type: str | None = None
    traceback: str | None = None
    builtin: str | None = None

    @classmethod
    def of(cls, client: bytes, call_id: int, err: BaseException,
           traceback: str | None = None) -> WorkerError:
        """The error an object process answers for ``err`` (see ``error_fields``)."""
        code, message, remote_type, builtin = error_fields(err)
        return cls(client, call_id, code, message, remote_type, traceback, builtin)

    def encode(self) -> list[bytes]:
        return [header(Cmd.WERROR), self.client, pack_u64(self.call_id), _encode_error(
            self.code, self.message, self.remote_type, self.traceback, self.builtin)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerError:
        return cls(frames[1], unpack_u64(frames[2], "call_id"), *_decode_error(frames[3]))

    def to_client(self) -> Error:
        return Error(self.call_id, self.code, self.message, self.remote_type, self.traceback,
                     self.builtin)


@dataclass(slots=True)
class WorkerHeartbeat(Message):
    CMD: ClassVar[Cmd] = Cmd.WHEARTBEAT
    FRAMES: ClassVar[int] = 2
    stats: dict[str, Any]

    def encode(self) -> list[bytes]:
        return [header(Cmd.WHEARTBEAT), orjson.dumps(self.stats)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerHeartbeat:
        return cls(_obj(frames[1], "WHEARTBEAT body"))


@dataclass(slots=True)
class WorkerStopping(Message):
    """The process is shutting down: it finishes the calls it holds and takes no new ones."""

    CMD: ClassVar[Cmd] = Cmd.WSTOPPING
    FRAMES: ClassVar[int] = 1

    def encode(self) -> list[bytes]:
        return [header(Cmd.WSTOPPING)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerStopping:
        return cls()


@dataclass(slots=True)
class Beat(Message):
    """An object process's heartbeat thread: this slot's incarnation is alive."""

    CMD: ClassVar[Cmd] = Cmd.WBEAT
    FRAMES: ClassVar[int] = 3
    slot: int
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.WBEAT), pack_u64(self.slot), pack_u64(self.incarnation)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Beat:
        return cls(unpack_u64(frames[1], "slot"), unpack_u64(frames[2], "incarnation"))


@dataclass(slots=True)
class WorkerCall(Message):
    CMD: ClassVar[Cmd] = Cmd.WCALL
    FRAMES: ClassVar[int] = 6
    client: bytes
    call_id: int
    namespace: str
    object_id: str
    head: bytes
    body: bytes
    name: str | None = None

    def encode(self) -> list[bytes]:
        return [header(Cmd.WCALL), self.client, pack_u64(self.call_id),
                _pack_target(self.namespace, self.object_id, self.name), self.head, self.body]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerCall:
        namespace, object_id, name = _unpack_target(frames[3], "WCALL")
        return cls(frames[1], unpack_u64(frames[2], "call_id"), namespace, object_id,
                   frames[4], frames[5], name)


@dataclass(slots=True)
class BrokerHeartbeat(Message):
    CMD: ClassVar[Cmd] = Cmd.BHEARTBEAT
    FRAMES: ClassVar[int] = 1

    def encode(self) -> list[bytes]:
        return [header(Cmd.BHEARTBEAT)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> BrokerHeartbeat:
        return cls()


@dataclass(slots=True)
class WorkerDisconnect(Message):
    CMD: ClassVar[Cmd] = Cmd.WDISCONNECT
    FRAMES: ClassVar[int] = 2
    reason: str

    def encode(self) -> list[bytes]:
        return [header(Cmd.WDISCONNECT), self.reason.encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerDisconnect:
        return cls(_text(frames[1]))


@dataclass(slots=True)
class WorkerSend(Message):
    """An object process sends ``payload`` (of ``kind``) on channels of one client."""

    CMD: ClassVar[Cmd] = Cmd.WSEND
    FRAMES: ClassVar[int] = 5
    client: bytes
    channels: list[int]
    kind: bytes
    payload: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.WSEND), self.client, pack_channels(self.channels), self.kind,
                self.payload]

    @classmethod
    def decode(cls, frames: list[bytes]) -> WorkerSend:
        kind = bytes(frames[3])
        if kind not in _OUT:
            raise ProtocolError(f"unknown channel message kind {kind[:4]!r}")
        return cls(frames[1], unpack_channels(frames[2]), kind, frames[4])


@dataclass(slots=True)
class ChannelSend(Message):
    """WSEND as the client gets it."""

    CMD: ClassVar[Cmd] = Cmd.CHANNEL
    FRAMES: ClassVar[int] = 4
    channels: list[int]
    kind: bytes
    payload: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.CHANNEL), pack_channels(self.channels), self.kind, self.payload]

    @classmethod
    def decode(cls, frames: list[bytes]) -> ChannelSend:
        kind = bytes(frames[2])
        if kind not in _OUT:
            raise ProtocolError(f"unknown channel message kind {kind[:4]!r}")
        return cls(unpack_channels(frames[1]), kind, frames[3])


@dataclass(slots=True)
class Broken(Message):
    """These stubs of the client were bound to a process that is gone."""

    CMD: ClassVar[Cmd] = Cmd.BROKEN
    FRAMES: ClassVar[int] = 2
    stub_ids: list[int]

    def encode(self) -> list[bytes]:
        return [header(Cmd.BROKEN), orjson.dumps(self.stub_ids)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Broken:
        ids = _json(frames[1], "BROKEN body")
        if type(ids) is not list:
            raise ProtocolError("BROKEN body must be a list of stub ids")
        return cls([_int(i, "stub_id") for i in ids])


@dataclass(slots=True)
class AskAlive(Message):
    """An object process asks whether the broker still counts ``incarnation`` as the slot's.

    Its beat thread needs the GIL to beat: a process that held the GIL long enough (a call
    into C code, an overloaded machine) cannot tell from its own clock whether the broker
    ended it. The broker's answer comes on the same socket as its calls, behind every call
    it sent before, so what arrived before the answer is known to be current or stale."""

    CMD: ClassVar[Cmd] = Cmd.WASK
    FRAMES: ClassVar[int] = 2
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.WASK), pack_u64(self.incarnation)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> AskAlive:
        return cls(unpack_u64(frames[1], "incarnation"))


@dataclass(slots=True)
class StillAlive(Message):
    """The broker's answer to ``AskAlive``: it has not ended ``incarnation`` (and has heard
    from it now). An incarnation it ended gets ``WorkerDisconnect`` instead."""

    CMD: ClassVar[Cmd] = Cmd.WALIVE
    FRAMES: ClassVar[int] = 2
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.WALIVE), pack_u64(self.incarnation)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> StillAlive:
        return cls(unpack_u64(frames[1], "incarnation"))


@dataclass(slots=True)
class ClientGone(Message):
    """A client the broker no longer knows (expired, or its process exited)."""

    CMD: ClassVar[Cmd] = Cmd.WGONE
    FRAMES: ClassVar[int] = 2
    client: bytes

    def encode(self) -> list[bytes]:
        return [header(Cmd.WGONE), self.client]

    @classmethod
    def decode(cls, frames: list[bytes]) -> ClientGone:
        return cls(frames[1])


@dataclass(slots=True)
class PeerHello(Message):
    CMD: ClassVar[Cmd] = Cmd.PHELLO
    FRAMES: ClassVar[int] = 1

    def encode(self) -> list[bytes]:
        return [header(Cmd.PHELLO)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> PeerHello:
        return cls()


@dataclass(slots=True)
class PeerWelcome(Message):
    """The incarnation a slot's process serves peer calls under (0 is never one)."""

    CMD: ClassVar[Cmd] = Cmd.PWELCOME
    FRAMES: ClassVar[int] = 3
    slot: int
    incarnation: int

    def encode(self) -> list[bytes]:
        return [header(Cmd.PWELCOME), pack_u64(self.slot), pack_u64(self.incarnation)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> PeerWelcome:
        inc = unpack_u64(frames[2], "incarnation")
        if not inc:
            raise ProtocolError("PWELCOME incarnation must not be 0")
        return cls(unpack_u64(frames[1], "slot"), inc)


@dataclass(slots=True)
class PeerBye(PeerWelcome):
    """The incarnation is stopping (a graceful stop, a reload): new stubs go by the broker."""

    CMD: ClassVar[Cmd] = Cmd.PBYE

    def encode(self) -> list[bytes]:
        return [header(Cmd.PBYE), pack_u64(self.slot), pack_u64(self.incarnation)]


@dataclass(slots=True)
class PeerCall(Message):
    """A call straight to the object process that owns the object, bound to the
    incarnation the caller's stub was made for."""

    CMD: ClassVar[Cmd] = Cmd.PCALL
    FRAMES: ClassVar[int] = 6
    incarnation: int
    call_id: int
    namespace: str
    object_id: str
    head: bytes
    body: bytes
    name: str | None = None

    def encode(self) -> list[bytes]:
        return [header(Cmd.PCALL), pack_u64(self.incarnation), pack_u64(self.call_id),
                _pack_target(self.namespace, self.object_id, self.name), self.head, self.body]

    @classmethod
    def decode(cls, frames: list[bytes]) -> PeerCall:
        namespace, object_id, name = _unpack_target(frames[3], "PCALL")
        return cls(unpack_u64(frames[1], "incarnation"), unpack_u64(frames[2], "call_id"),
                   namespace, object_id, frames[4], frames[5], name)


@dataclass(slots=True)
class PeerBatches(Message):
    """"This side reads batches" (``PBATCH``): a peer-link caller says it after PHELLO, a
    broker's client after HELLO, an object process after READY; the other side answers it
    once it reads them too. Each side batches only to a side that said it, so a peer of an
    older release never gets a batch it cannot read (an older broker drops the PBATCHES it
    does not know, and never answers)."""

    CMD: ClassVar[Cmd] = Cmd.PBATCHES
    FRAMES: ClassVar[int] = 1

    def encode(self) -> list[bytes]:
        return [header(Cmd.PBATCHES)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> PeerBatches:
        return cls()


#: The first frame of a batch: several messages to one peer as one ZeroMQ message of four
#: frames, ``[BATCH, counts, lengths, blob]``: ``counts`` one byte per message (its frames),
#: ``lengths`` each frame's length (u32 little-endian), ``blob`` the frames end to end. Each
#: message that finds ZeroMQ's I/O thread asleep wakes it, and then the peer's I/O thread and
#: loop: a loop turn's messages to one peer as one share those wake-ups. One frame instead of
#: one per message's frame: a frame costs each side ~0.6 µs to send and ~0.9 µs to receive.
BATCH = header(Cmd.PBATCH)
#: messages in one batch at most (a count is one byte)
MAX_BATCH = 255
#: a batch's blob stops growing past this (each socket's MAXMSGSIZE bounds one frame)
MAX_BATCH_BYTES = 1 << 20


def pack_batch(msgs: list[list[bytes]]) -> list[bytes]:
    """Messages (each a list of frames, at most 255 of them) as one batch."""
    if not 1 <= len(msgs) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} messages, not {len(msgs)}")
    flat = [f for m in msgs for f in m]
    return [BATCH, bytes(len(m) for m in msgs),
            struct.pack(f"<{len(flat)}I", *map(len, flat)), b"".join(flat)]


#: a message with a frame this big leaves alone, not in a batch: ZeroMQ sends it without a
#: copy (pyzmq's zero-copy threshold), where a batch's blob would copy it
BIG_FRAME = 1 << 16


def batch_runs(msgs: list[list[bytes]]) -> list[list[list[bytes]]]:
    """One peer's messages, in their order, as the runs to send: each run of two or more as
    one batch, a run of one alone (a message with a ``BIG_FRAME`` is always alone; a run
    closes at ``MAX_BATCH`` messages or ``MAX_BATCH_BYTES``)."""
    runs: list[list[list[bytes]]] = []
    run: list[list[bytes]] = []
    size = 0
    for m in msgs:
        big = False
        n = 0
        for f in m:
            n += len(f)
            big = big or len(f) >= BIG_FRAME
        if big or len(run) == MAX_BATCH or size + n > MAX_BATCH_BYTES:
            if run:
                runs.append(run)
            run, size = [], 0
            if big:
                runs.append([m])
                continue
        run.append(m)
        size += n
    if run:
        runs.append(run)
    return runs


def unpack_batch(frames: list[bytes]) -> list[list[bytes]]:
    """The messages of a batch (``frames[0]`` is ``BATCH``); ProtocolError, naming what is
    wrong, if its parts do not agree."""
    if len(frames) != 4:
        raise ProtocolError(f"PBATCH has {len(frames)} frames, expected 4")
    _, counts, lengths, blob = frames
    if not counts or 0 in counts:
        raise ProtocolError("PBATCH counts must be one byte of at least 1 per message")
    if len(counts) > MAX_BATCH:  # (what one batch may make its reader do is bounded)
        raise ProtocolError(f"PBATCH holds {len(counts)} messages, at most {MAX_BATCH}")
    n = sum(counts)
    if len(lengths) != 4 * n:
        raise ProtocolError(f"PBATCH counts say {n} frames, its lengths are {len(lengths)} "
                            "bytes (4 a frame)")
    sizes = struct.unpack(f"<{n}I", lengths)
    if sum(sizes) != len(blob):
        raise ProtocolError(f"PBATCH lengths add up to {sum(sizes)} bytes, its blob has "
                            f"{len(blob)}")
    out, at, k = [], 0, 0
    for c in counts:
        m = []
        for size in sizes[k:k + c]:
            m.append(blob[at:at + size])
            at += size
        k += c
        out.append(m)
    return out


_CONTROL_OPS = ("slot_down", "slot_failed", "drain", "client_exit")


@dataclass(slots=True)
class Control(Message):
    """Supervisor -> broker. ``slot_down``: that process exited; ``slot_failed``: its slot
    will not come back until an operator acts (``reason`` says why; calls fail at once);
    ``drain``: refuse new calls."""

    CMD: ClassVar[Cmd] = Cmd.CONTROL
    FRAMES: ClassVar[int] = 2
    op: str  # one of _CONTROL_OPS
    slot: int | None = None
    pid: int | None = None
    reason: str | None = None

    def encode(self) -> list[bytes]:
        body: dict[str, Any] = {"op": self.op}
        if self.op in ("slot_down", "slot_failed"):
            body.update(slot=self.slot, pid=self.pid)
        if self.op == "slot_failed":
            body["reason"] = self.reason or ""
        if self.op == "client_exit":
            body["pid"] = self.pid
        return [header(Cmd.CONTROL), orjson.dumps(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Control:
        c = _obj(frames[1], "CONTROL body")
        if c.get("op") not in _CONTROL_OPS:
            raise ProtocolError("CONTROL body must be {op: 'slot_down' | 'slot_failed' | 'drain' "
                                "| 'client_exit', ...}")
        if c["op"] == "drain":
            return cls("drain")
        if c["op"] == "client_exit":
            return cls("client_exit", pid=_int(c.get("pid"), "pid"))
        slot, pid = _int(c.get("slot"), "slot", 0, 65535), _int(c.get("pid"), "pid")
        if c["op"] == "slot_failed":
            reason = c.get("reason")
            if type(reason) is not str:
                raise ProtocolError("CONTROL slot_failed needs a reason string")
            return cls("slot_failed", slot, pid, reason[:2000])
        return cls("slot_down", slot, pid)


# -- one table per direction ----------------------------------------------------------
class Direction:
    """The messages valid on one hop: a ``{command byte: class}`` table and its name."""

    __slots__ = ("side", "table")

    def __init__(self, side: str, *classes: type[Message]) -> None:
        self.side = side
        self.table = {cls.CMD.value: cls for cls in classes}


FROM_CLIENT = Direction("from a client", Hello, Call, Ping, Drop, Stats, PeerBatches)
TO_CLIENT = Direction("to a client", Welcome, Reply, Error, Pong, Disconnect, StatsReply,
                      ChannelSend, Broken, PeerBatches)
FROM_WORKER = Direction("from an object process", Ready, WorkerReply, WorkerError,
                        WorkerHeartbeat, Beat, WorkerSend, WorkerStopping, PeerBatches,
                        AskAlive)
TO_WORKER = Direction("to an object process", WorkerCall, BrokerHeartbeat, WorkerDisconnect,
                      ClientGone, PeerBatches, StillAlive)
CONTROL = Direction("on the control socket", Control)
FROM_PEER = Direction("from a peer object process", PeerHello, PeerCall, PeerBatches)
TO_PEER = Direction("to a peer object process", PeerWelcome, PeerBye, Reply, Error, ChannelSend,
                    PeerBatches)
_NAMES = {c.value: c.name for c in Cmd}


def parse(frames: list[bytes], direction: Direction) -> Any:
    """The typed message ``frames`` hold; ProtocolError, naming what is wrong, for anything
    malformed or not valid in ``direction``."""
    if not frames:
        raise ProtocolError("empty message")
    h = frames[0]
    if len(h) != 3 or h[0] != 0x44:
        raise ProtocolError(f"bad header {bytes(h[:8])!r}")
    if h[1] != VERSION:
        raise ProtocolError(f"protocol version {h[1]} is not supported (this side speaks "
                            f"{VERSION}): are both ends from the same durable release?")
    cls = direction.table.get(h[2])
    if cls is None:
        what = _NAMES.get(h[2])
        raise ProtocolError(f"unknown command {h[2]:#x}" if what is None
                            else f"command {what} is not valid {direction.side}")
    if len(frames) != cls.FRAMES:
        raise ProtocolError(f"{cls.CMD.name} has {len(frames)} frames, expected {cls.FRAMES}")
    return cls.decode(frames)


def parse_from_client(frames: list[bytes]) -> Hello | Call | Ping | Drop | Stats | PeerBatches:
    return parse(frames, FROM_CLIENT)


def parse_from_broker_to_client(frames: list[bytes]) -> Any:
    return parse(frames, TO_CLIENT)


def parse_from_worker(frames: list[bytes]) -> Any:
    return parse(frames, FROM_WORKER)


def parse_from_broker_to_worker(frames: list[bytes]) -> Any:
    return parse(frames, TO_WORKER)


def parse_control(frames: list[bytes]) -> Control:
    return parse(frames, CONTROL)


#: The client frame of calls an object process serves for its own client, in-process
#: (``durable.client.LocalRoute``). The broker's client ids are a prefix and ZeroMQ's 5-byte
#: routing id, so one byte never names a client of the broker.
LOCAL = b"L"
#: The first byte of the client frame of calls that came from another slot's process on the
#: peer path (then that peer's 5-byte routing id on the callee's ROUTER): no broker client id
#: starts with it, and it is not ``A`` (an operator).
PEER = b"Q"
_TO_CLIENT = {header(Cmd.WREPLY): header(Cmd.REPLY), header(Cmd.WERROR): header(Cmd.ERROR),
              header(Cmd.WSEND): header(Cmd.CHANNEL)}


def to_client(frames: list[bytes]) -> list[bytes] | None:
    """A reply, error or channel send of an object process (WREPLY, WERROR, WSEND) as the
    client gets it from the broker (REPLY, ERROR, CHANNEL): the same frames without the
    client's. None for any other message."""
    cmd = _TO_CLIENT.get(frames[0]) if len(frames) > 1 else None
    return None if cmd is None else [cmd, *frames[2:]]
