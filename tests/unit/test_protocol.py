"""Wire protocol: every message round-trips; every malformed frame is a ProtocolError."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable.errors import ProtocolError
from durable.http import Request, Response
from durable.protocol import messages as m

#: thousands of cases in CI; DURABLE_FUZZ_EXAMPLES=200000 for a long run
FUZZ_EXAMPLES = int(os.environ.get("DURABLE_FUZZ_EXAMPLES", "3000"))

CLIENT_MSGS = [
    m.Hello(123, "me"), m.Call(1, 2, "NS", "ab" * 32, 5000, b'["GET","http://x/",[]]', b"body"),
    m.Call(1, 2, "NS", "ab" * 32, 5000, b"[]", b"", "room-1"),  # with its name
    m.Ping(), m.Drop([1, 2, 3]), m.Stats(9),
]
TO_CLIENT = [
    m.Welcome(7, {"NS": "00ff"}), m.Reply(3, b"[200,[]]", b"ok"), m.Error(4, "timeout", "slow", None),
    m.Pong(7), m.Disconnect("who?"), m.StatsReply(5, {"a": 1}),
    m.Error(4, "object_error", "boom", "ValueError", "Traceback (most recent call last): ..."),
]
FROM_WORKER = [
    m.Ready(0, 42, 99), m.WorkerReply(b"cli", 3, b"[200,[]]", b"x"),
    m.WorkerError(b"cli", 3, b'{"code":"object_error","message":"m","remote_type":"ValueError"}'),
    m.WorkerHeartbeat({"active": 3}), m.Beat(3, 2**62 + 1),
]
TO_WORKER = [m.WorkerCall(b"cli", 1, "NS", "oid", b"[]", b""), m.WorkerDisconnect("again"),
             m.WorkerCall(b"cli", 1, "NS", "oid", b"[]", b"", "alice")]


@pytest.mark.parametrize("msg", CLIENT_MSGS, ids=lambda x: type(x).__name__)
def test_client_messages_round_trip(msg):
    assert m.parse_from_client(msg.encode()) == msg


@pytest.mark.parametrize("msg", TO_CLIENT, ids=lambda x: type(x).__name__)
def test_broker_to_client_round_trip(msg):
    assert m.parse_from_broker_to_client(msg.encode()) == msg


@pytest.mark.parametrize("msg", FROM_WORKER, ids=lambda x: type(x).__name__)
def test_worker_messages_round_trip(msg):
    assert m.parse_from_worker(msg.encode()) == msg


@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda x: type(x).__name__)
def test_broker_to_worker_round_trip(msg):
    assert m.parse_from_broker_to_worker(msg.encode()) == msg


def test_heartbeat_to_worker():
    assert isinstance(m.parse_from_broker_to_worker(m.BrokerHeartbeat().encode()), m.BrokerHeartbeat)


def test_request_and_response_heads_round_trip():
    req = Request("http://do/x?y=1", method="post", headers=[("A", "1"), ("a", "2")], body=b"\x00")
    got = m.decode_request(*m.encode_request(req))
    assert (got.method, got.url, got.headers.get_all("a"), got.body) == ("POST", req.url, ["1", "2"], b"\x00")
    resp = Response("hi", status=418, headers={"X": "y"})
    back = m.decode_response(*m.encode_response(resp))
    assert (back.status, back.headers.get("x"), back.body) == (418, "y", b"hi")


def test_error_payload_for_object_and_durable_errors():
    import orjson

    from durable.errors import OverloadedError
    assert orjson.loads(m.error_payload(KeyError("k"))) == {
        "code": "object_error", "message": "'k'", "remote_type": "KeyError"}
    assert orjson.loads(m.error_payload(OverloadedError("full")))["code"] == "overloaded"
    assert orjson.loads(m.error_payload(KeyError("k"), "tb"))["traceback"] == "tb"


BAD_FROM_CLIENT = [
    [], [b""], [b"X\x01\x01"], [b"D\x02\x02"], [b"D\x01\x7f"], [b"D\x01\x11", b"{}"],
    [b"D\x01\x02"], [b"D\x01\x02", b"x", b"h", b"b"], [b"D\x01\x02", b"[1,2]", b"h", b"b"],
    [b"D\x01\x02", b'[-1,1,"NS","o",1]', b"h", b"b"], [b"D\x01\x02", b'[1,1,"","o",1]', b"h", b"b"],
    [b"D\x01\x02", b'[1,1,"NS","o",-5]', b"h", b"b"], [b"D\x01\x02", b'[1.5,1,"NS","o",1]', b"h", b"b"],
    [b"D\x01\x02", b'[true,1,"NS","o",1]', b"h", b"b"], [b"D\x01\x03", b"extra"],
    [b"D\x01\x01", b"[]"], [b"D\x01\x01", b'{"pid": "x"}'], [b"D\x01\x04", b'{"a":1}'],
    [b"D\x01\x04", b'["x"]'], [b"D\x01\x05", b"1234567"], [b"D\x01\x05"],
    [b"D\x01\x02", b'[1,1,"NS","o",1,7]', b"h", b"b"],  # a name must be a str
    [b"D\x01\x02", b'[1,1,"NS","o",1,"a",2]', b"h", b"b"],
]


@pytest.mark.parametrize("frames", BAD_FROM_CLIENT)
def test_malformed_client_frames_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_client(frames)


BAD_FROM_WORKER = [
    [b"D\x01\x21", b"{}"], [b"D\x01\x21", b'{"protocol": 2, "slot": 0, "pid": 1, "incarnation": 1}'],
    [b"D\x01\x21", b'{"protocol": 1, "slot": -1, "pid": 1, "incarnation": 1}'],
    [b"D\x01\x21", b'{"protocol": 1, "slot": 0, "pid": 1, "incarnation": 0}'], [b"D\x01\x21", b"[]"],
    [b"D\x01\x22", b"c", b"short", b"h", b"b"], [b"D\x01\x22", b"c"],
    [b"D\x01\x23", b"c", b"12345678", b'{"code": 1}'], [b"D\x01\x24", b"[]"], [b"D\x01\x02", b"x"],
]


@pytest.mark.parametrize("frames", BAD_FROM_WORKER)
def test_malformed_worker_frames_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_worker(frames)


BAD_TO_CLIENT = [
    [b"D\x01\x12", b"1234567", b"h", b"b"], [b"D\x01\x13", b"12345678", b"[]"],
    [b"D\x01\x14", b""], [b"D\x01\x11", b'{"broker": 1}'], [b"D\x01\x11", b'{"broker": 1, "namespaces": {"": "x"}}'],
    [b"D\x01\x16", b"12345678", b"[]"], [b"D\x01\x01", b"{}"], [b"D\x01\x15"],
]


@pytest.mark.parametrize("frames", BAD_TO_CLIENT)
def test_malformed_frames_to_client_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_broker_to_client(frames)


BAD_TO_WORKER = [
    [b"D\x01\x31", b"c", b"[1]", b"h", b"b"], [b"D\x01\x31", b"c", b"x", b"h", b"b"],
    [b"D\x01\x32"], [b"D\x01\x33"], [b"D\x01\x21", b"{}"],
]


@pytest.mark.parametrize("frames", BAD_TO_WORKER)
def test_malformed_frames_to_worker_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_broker_to_worker(frames)


@pytest.mark.parametrize("head", [b"x", b"[1]", b'["GET", "u", {}]', b'["G T", "u", []]', b'["GET", 1, []]'])
def test_bad_request_heads(head):
    with pytest.raises(ProtocolError):
        m.decode_request(head, b"")


@pytest.mark.parametrize("head", [b"x", b"[200]", b"[99, []]", b'["200", []]', b'[200, [["a b", "c"]]]'])
def test_bad_response_heads(head):
    with pytest.raises(ProtocolError):
        m.decode_response(head, b"")


frames_strategy = st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([bytes((0x44, 1, c)) for c in m.Cmd] + [b"[]", b"{}", b"[1,2,3,4,5]", b"12345678"]),
), max_size=6)


@settings(max_examples=FUZZ_EXAMPLES)
@given(frames_strategy)
def test_parsers_raise_only_protocol_errors(frames):
    for parse in (m.parse_from_client, m.parse_from_worker, m.parse_from_broker_to_client,
                  m.parse_from_broker_to_worker):
        try:
            parse(frames)
        except ProtocolError:
            pass
