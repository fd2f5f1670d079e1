"""Wire protocol: every message round-trips; every malformed frame is a ProtocolError."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable.errors import ProtocolError
from durable.http import Request, Response
from durable.protocol import messages as m
from tests.budget import examples

#: thousands of cases in CI; DURABLE_FUZZ_EXAMPLES=200000 for a long run
FUZZ_EXAMPLES = int(os.environ.get("DURABLE_FUZZ_EXAMPLES", examples(3000)))

CLIENT_MSGS = [
    m.Hello(123, "me"), m.Call(1, 2, "NS", "ab" * 32, 5000, b'["GET","http://x/",[]]', b"body"),
    m.Call(1, 2, "NS", "ab" * 32, 5000, b"[]", b"", "room-1"),  # with its name
    m.Ping(), m.Drop([1, 2, 3]), m.Stats(9),
]
TO_CLIENT = [
    m.Welcome(7, {"NS": "00ff"}), m.Welcome(7, {}, (3, "ipc:///r/peer-{slot}.sock")), m.Reply(3, b"[200,[]]", b"ok"), m.Error(4, "timeout", "slow", None),
    m.Pong(7), m.Disconnect("who?"), m.StatsReply(5, {"a": 1}),
    m.Error(4, "object_error", "boom", "ValueError", "Traceback (most recent call last): ..."),
    m.ChannelSend([7], m.EV_TEXT, b"hi"), m.ChannelSend([1, 2, 2**64 - 1], m.OUT_DATA, b"\x00"),
    m.Broken([3, 4]),
]
FROM_WORKER = [
    m.Ready(0, 42, 99), m.WorkerReply(b"cli", 3, b"[200,[]]", b"x"),
    m.WorkerError(b"cli", 3, "object_error", "m", "ValueError"),
    m.WorkerError(b"cli", 3, "cpu_limit", "m", None, "Traceback ..."),
    m.WorkerHeartbeat({"active": 3}), m.WorkerStopping(), m.Beat(3, 2**62 + 1),
    m.AskAlive(2**62 + 1),
    m.WorkerSend(b"cli", [5, 6], m.OUT_CLOSE, b"[1000,\"bye\"]"),
]
TO_WORKER = [m.WorkerCall(b"cli", 1, "NS", "oid", b"[]", b""), m.WorkerDisconnect("again"),
             m.WorkerCall(b"cli", 1, "NS", "oid", b"[]", b"", "alice"), m.ClientGone(b"Fcli"),
             m.StillAlive(2**62 + 1)]


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


def test_error_fields_for_object_and_durable_errors():
    from durable.errors import OverloadedError
    assert m.error_fields(KeyError("k")) == ("object_error", "'k'", "KeyError", "KeyError")
    assert m.error_fields(OverloadedError("full"))[0] == "overloaded"
    err = m.WorkerError.of(b"c", 1, KeyError("k"), "tb")
    assert (err.code, err.traceback) == ("object_error", "tb")
    assert err.to_client() == m.Error(1, "object_error", "'k'", "KeyError", "tb", "KeyError")


H = m.header
C = m.Cmd
ID = m.pack_u64(1)
BAD_FROM_CLIENT = [
    [], [b""], [b"X\x02\x01"], [b"D\x01\x02"],  # bad magic; protocol 1 (an older release)
    [bytes((0x44, m.VERSION, 0x7F))], [H(C.WELCOME), b"{}"],  # unknown; valid only to a client
    [H(C.CALL)], [H(C.CALL), ID, b"x", b"h", b"b"], [H(C.CALL), ID, b"[1,2]", b"h", b"b"],
    [H(C.CALL), ID, b'[-1,"NS","o",1]', b"h", b"b"], [H(C.CALL), ID, b'[1,"","o",1]', b"h", b"b"],
    [H(C.CALL), ID, b'[1,"NS","o",-5]', b"h", b"b"], [H(C.CALL), ID, b'[1.5,"NS","o",1]', b"h", b"b"],
    [H(C.CALL), ID, b'[true,"NS","o",1]', b"h", b"b"], [H(C.CALL), b"1234567", b'[1,"NS","o",1]', b"h", b"b"],
    [H(C.CALL), b'[1,1,"NS","o",1]', b"h", b"b"],  # protocol 1's layout: call id in the meta
    [H(C.PING), b"extra"], [H(C.HELLO), b"[]"], [H(C.HELLO), b'{"pid": "x"}'], [H(C.DROP), b'{"a":1}'],
    [H(C.DROP), b'["x"]'], [H(C.STATS), b"1234567"], [H(C.STATS)],
    [H(C.CALL), ID, b'[1,"NS","o",1,7]', b"h", b"b"],  # a name must be a str
    [H(C.CALL), ID, b'[1,"NS","o",1,"a",2]', b"h", b"b"],
]


@pytest.mark.parametrize("frames", BAD_FROM_CLIENT)
def test_malformed_client_frames_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_client(frames)


BAD_FROM_WORKER = [
    [H(C.READY), b"{}"], [H(C.READY), b'{"protocol": 1, "slot": 0, "pid": 1, "incarnation": 1}'],
    [H(C.READY), b'{"protocol": %d, "slot": -1, "pid": 1, "incarnation": 1}' % m.VERSION],
    [H(C.READY), b'{"protocol": %d, "slot": 0, "pid": 1, "incarnation": 0}' % m.VERSION],
    [H(C.READY), b"[]"], [H(C.WREPLY), b"c", b"short", b"h", b"b"], [H(C.WREPLY), b"c"],
    [H(C.WERROR), b"c", b"12345678", b'{"code": 1}'], [H(C.WHEARTBEAT), b"[]"], [H(C.CALL), b"x"],
    [H(C.WBEAT), b"12345678", b"1234567"],
]


@pytest.mark.parametrize("frames", BAD_FROM_WORKER)
def test_malformed_worker_frames_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_worker(frames)


BAD_TO_CLIENT = [
    [H(C.REPLY), b"1234567", b"h", b"b"], [H(C.ERROR), b"12345678", b"[]"], [H(C.PONG), b""],
    [H(C.WELCOME), b'{"broker": 1}'], [H(C.WELCOME), b'{"broker": 1, "namespaces": {"": "x"}}'],
    [H(C.WELCOME), b'{"broker": 1, "namespaces": {}, "peers": {"slots": 2, "endpoint": "tcp://x"}}'],
    [H(C.WELCOME), b'{"broker": 1, "namespaces": {}, "peers": {"slots": 0, "endpoint": "ipc://{slot}"}}'],
    [H(C.WELCOME), b'{"broker": 1, "namespaces": {}, "peers": []}'],
    [H(C.STATS_REPLY), b"12345678", b"[]"], [H(C.HELLO), b"{}"], [H(C.DISCONNECT)],
]


@pytest.mark.parametrize("frames", BAD_TO_CLIENT)
def test_malformed_frames_to_client_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_broker_to_client(frames)


BAD_TO_WORKER = [
    [H(C.WCALL), b"c", ID, b'["NS"]', b"h", b"b"], [H(C.WCALL), b"c", ID, b"x", b"h", b"b"],
    [H(C.WCALL), b"c", b'[1,"NS","o"]', b"h", b"b"],  # protocol 1's layout
    [H(C.BHEARTBEAT), b"{}"], [H(C.WDISCONNECT)], [H(C.READY), b"{}"],
]


@pytest.mark.parametrize("frames", BAD_TO_WORKER)
def test_malformed_frames_to_worker_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse_from_broker_to_worker(frames)


FROM_PEER = [m.PeerHello(), m.PeerCall(2**62 + 1, 5, "NS", "ab" * 32, b"[]", b"body"),
             m.PeerCall(1, 2**64 - 1, "NS", "oid", b"@inc", b"", "room-1")]
TO_PEER = [m.PeerWelcome(1, 2**62 + 3), m.PeerBye(0, 5), m.Reply(3, b"[200,[]]", b"ok"),
           m.Error(4, "stub_broken", "gone", None), m.ChannelSend([7], m.EV_TEXT, b"hi")]


@pytest.mark.parametrize("msg", FROM_PEER + TO_PEER, ids=lambda x: type(x).__name__)
def test_peer_messages_round_trip(msg):
    assert m.parse(msg.encode(), m.FROM_PEER if msg in FROM_PEER else m.TO_PEER) == msg


BAD_FROM_PEER = [
    [H(C.PHELLO), b"x"], [H(C.PCALL), ID, ID, b'["NS"]', b"h", b"b"],
    [H(C.PCALL), ID, b"1234567", b'["NS","o"]', b"h", b"b"], [H(C.PCALL), ID, ID, b"[", b"h", b"b"],
    [H(C.PCALL), ID, ID, b'["NS","o",7]', b"h", b"b"],  # a name must be a str
    [H(C.PWELCOME), ID, ID],  # callee -> caller only
    m.Call(1, 2, "NS", "ab" * 32, 5000, b"[]", b"").encode(),  # the broker's, not a peer's
]
BAD_TO_PEER = [[H(C.PWELCOME), ID, bytes(8)],  # incarnation 0 is never one
               [H(C.PWELCOME), ID], m.Welcome(7, {}).encode(), m.Broken([1]).encode()]


@pytest.mark.parametrize("frames", BAD_FROM_PEER)
def test_malformed_peer_calls_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse(frames, m.FROM_PEER)


@pytest.mark.parametrize("frames", BAD_TO_PEER)
def test_malformed_peer_answers_are_protocol_errors(frames):
    with pytest.raises(ProtocolError):
        m.parse(frames, m.TO_PEER)


def test_upgrade_requests_carry_their_channel():
    head, body = m.encode_request(Request("http://x/ws", headers={"Upgrade": "websocket"}), 77)
    req = m.decode_request(head, body)
    assert req.is_websocket and req._upgrade == 77
    assert m.decode_request(*m.encode_request(Request("http://x/")))._upgrade is None


def test_response_modes():
    from durable.websocket import WebSocketPair

    client, _server = WebSocketPair()
    resp = m.decode_response(*m.encode_response(Response(status=101, websocket=client)))
    assert resp.status == 101 and resp.websocket is m.UPGRADED

    async def body():
        yield b"x"

    resp = m.decode_response(*m.encode_response(Response(body(), status=201)))
    assert resp.status == 201 and resp._stream is m.STREAMED
    with pytest.raises(ValueError, match="101"):
        Response(status=101)
    with pytest.raises(ProtocolError, match="mode"):
        m.decode_response(b'[200, [], "other"]', b"")


@pytest.mark.parametrize("kind,kw,expect", [
    (m.EV_TEXT, {"data": "héllo"}, {"data": "héllo"}),
    (m.EV_BINARY, {"data": b"\x00\xff"}, {"data": b"\x00\xff"}),
    (m.EV_CLOSE, {"code": 4001, "reason": "done", "was_clean": True},
     {"code": 4001, "reason": "done", "was_clean": True}),
    (m.EV_ERROR, {"data": "too big"}, {"data": "too big"}),
    (m.EV_CREDIT, {"credit": 262144}, {"credit": 262144}),
    (m.EV_CANCEL, {}, {}),
])
def test_channel_events_round_trip(kind, kw, expect):
    ev = m.decode_event(*m.encode_event(kind, 2**40, **kw))
    assert ev.kind == kind and ev.channel == 2**40
    for k, v in expect.items():
        assert getattr(ev, k) == v


@pytest.mark.parametrize("head,body", [
    (b"#t", b""), (b"#z" + bytes(8), b""), (b"#t" + bytes(8), b"\xff"),
    (b"#c" + bytes(8), b"[1000]"), (b"#c" + bytes(8), b"[99999, \"\", true]"),
    (b"#k" + bytes(8), b"123"),
])
def test_bad_channel_events(head, body):
    with pytest.raises(ProtocolError):
        m.decode_event(head, body)


def test_bad_channel_lists():
    for frames in ([m.header(m.Cmd.CHANNEL), b"1234567", b"t", b""],
                   [m.header(m.Cmd.CHANNEL), b"", b"t", b""],
                   [m.header(m.Cmd.CHANNEL), bytes(8), b"?", b""]):
        with pytest.raises(ProtocolError):
            m.parse_from_broker_to_client(frames)


@pytest.mark.parametrize("head", [b"x", b"[1]", b'["GET", "u", {}]', b'["G T", "u", []]', b'["GET", 1, []]',
                                  b'["GET", "u", [], 0]', b'["GET", "u", [], "c"]'])
def test_bad_request_heads(head):
    with pytest.raises(ProtocolError):
        m.decode_request(head, b"")


@pytest.mark.parametrize("head", [b"x", b"[200]", b"[99, []]", b'["200", []]', b'[200, [["a b", "c"]]]'])
def test_bad_response_heads(head):
    with pytest.raises(ProtocolError):
        m.decode_response(head, b"")


frames_strategy = st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([m.header(c) for c in m.Cmd] + [b"[]", b"{}", b"[1,2,3,4,5]", b"12345678"]),
), max_size=6)


@settings(max_examples=FUZZ_EXAMPLES)
@given(frames_strategy)
def test_parsers_raise_only_protocol_errors(frames):
    for direction in (m.FROM_CLIENT, m.FROM_WORKER, m.TO_CLIENT, m.TO_WORKER, m.CONTROL):
        try:
            m.parse(frames, direction)
        except ProtocolError:
            pass


_FRAMES = st.lists(st.binary(max_size=8), min_size=1, max_size=6)


@settings(max_examples=examples(200))
@given(st.lists(_FRAMES, min_size=1, max_size=m.MAX_BATCH))
def test_a_batch_gives_back_its_messages_in_order(msgs):
    frames = m.pack_batch(msgs)
    assert frames[0] == m.BATCH and len(frames) == 4  # (its frames end to end: one frame)
    assert m.unpack_batch(frames) == msgs


@pytest.mark.parametrize(("frames", "says"), [
    ([m.BATCH], "has 1 frames, expected 4"),
    ([m.BATCH, b"\x01", b"\x00" * 4, b"", b""], "has 5 frames, expected 4"),
    ([m.BATCH, b"", b"", b""], "at least 1 per message"),
    ([m.BATCH, bytes([1, 0]), b"\x01\x00\x00\x00", b"a"], "at least 1 per message"),
    ([m.BATCH, bytes([2]), b"\x01\x00\x00\x00", b"a"], "say 2 frames, its lengths are 4 bytes"),
    ([m.BATCH, bytes([1]), b"\x05\x00\x00\x00", b"abc"], "add up to 5 bytes, its blob has 3"),
    ([m.BATCH, bytes([1]), b"\x01\x00\x00\x00", b"ab"], "add up to 1 bytes, its blob has 2"),
    ([m.BATCH, bytes([1]) * 256, b"\x00" * 4 * 256, b""], "holds 256 messages, at most 255"),
])
def test_a_malformed_batch_is_refused_saying_what_is_wrong(frames, says):
    with pytest.raises(ProtocolError, match=says):
        m.unpack_batch(frames)


def test_a_batch_holds_one_to_255_messages():
    for n in (0, m.MAX_BATCH + 1):
        with pytest.raises(ValueError, match="1 to 255 messages"):
            m.pack_batch([[b"x"]] * n)
    for direction in (m.FROM_PEER, m.TO_PEER, m.FROM_CLIENT, m.TO_CLIENT, m.FROM_WORKER,
                      m.TO_WORKER):  # (the broker's links batch too)
        assert m.parse([m.header(m.Cmd.PBATCHES)], direction) == m.PeerBatches()
    with pytest.raises(ProtocolError, match="PBATCHES is not valid on the control socket"):
        m.parse([m.header(m.Cmd.PBATCHES)], m.CONTROL)


# (sizes around the limits: a big frame, and messages that fill a batch's bytes)
_SIZES = st.sampled_from([0, 1, 7, m.BIG_FRAME - 1, m.BIG_FRAME, 300_000])


@settings(max_examples=examples(200))
@given(st.lists(st.lists(_SIZES, min_size=1, max_size=3), min_size=1, max_size=600))
def test_batch_runs_keep_the_order_and_every_bound(sizes):
    """Each run is sent as one message: runs of two or more as a batch within its bounds, a
    message with a big frame alone (zero-copy), nothing lost or reordered."""
    msgs = [[bytes([i % 256]) * n for n in frames] for i, frames in enumerate(sizes)]
    runs = m.batch_runs(msgs)
    assert [x for run in runs for x in run] == msgs
    for run in runs:
        big = any(len(f) >= m.BIG_FRAME for x in run for f in x)
        assert run and (len(run) == 1 or not big)
        if len(run) > 1:
            assert len(run) <= m.MAX_BATCH
            assert sum(len(f) for x in run for f in x) <= m.MAX_BATCH_BYTES
            assert m.unpack_batch(m.pack_batch(run)) == run
    # (greedy: a run closes only when the next message would break a bound or is big)
    for a, b in zip(runs, runs[1:], strict=False):
        nxt = b[0]
        assert (len(a) == m.MAX_BATCH or len(a) == 1 and any(len(f) >= m.BIG_FRAME for f in a[0])
                or any(len(f) >= m.BIG_FRAME for f in nxt)
                or sum(len(f) for x in [*a, nxt] for f in x) > m.MAX_BATCH_BYTES)


def test_frame_too_big_names_the_largest_frame_and_the_sockets_limit():
    from durable.protocol.messages import MAX_FRAME_BYTES, frame_too_big
    from durable.transport import MAX_MESSAGE_BYTES
    assert MAX_FRAME_BYTES == MAX_MESSAGE_BYTES == 64 << 20  # what every socket's MAXMSGSIZE is
    assert frame_too_big("x", b"", b"a" * 10) is None
    fits = memoryview(bytearray(MAX_FRAME_BYTES))
    assert frame_too_big("x", b"h", fits) is None  # the limit itself fits
    over = memoryview(bytearray(MAX_FRAME_BYTES + (1 << 19)))
    assert frame_too_big("the object's Response", b"h", over) == \
        "the object's Response is 64.5 MiB; a call or its answer carries at most 64 MiB"
    assert frame_too_big("a head", over, b"") is not None  # any frame, not only the last


def test_dropped_stubs_go_in_drops_the_broker_accepts():
    """A client that let go of more than 100,000 stubs in one heartbeat sent one DROP, which
    the broker refused whole (and kept every one of those stubs while the client lived)."""
    from durable.protocol.messages import FROM_CLIENT, MAX_DROP, Drop, parse
    ids = list(range(1, 2 * MAX_DROP + 5))
    msgs = Drop.messages(ids)
    assert len(msgs) == 3
    assert [i for m in msgs for i in parse(m, FROM_CLIENT).stub_ids] == ids
    assert Drop.messages([7]) == [Drop([7]).encode()] and Drop.messages([]) == []
    with pytest.raises(ProtocolError, match="at most 100,000"):
        parse(Drop(ids).encode(), FROM_CLIENT)
