"""The pure parts of serving calls in-process: frames an object process answers its own client
with, and how the slots front places a connection by its first request line."""

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable.broker.ring import Ring
from durable.ids import IdFactory
from durable.objectproc.httpfront import slot_of_request
from durable.protocol import messages as m
from tests.budget import examples

RING = Ring(4)
IDS = {"ROOMS": IdFactory("ROOMS", b"k" * 32), "a b": IdFactory("a b", b"j" * 32)}


def _line(target: str, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.mark.parametrize("msg, expected", [
    (m.WorkerReply(m.LOCAL, 3, b"[200,[]]", b"x"), m.Reply(3, b"[200,[]]", b"x")),
    (m.WorkerError(m.LOCAL, 4, "object_error", "boom", "ValueError", "tb", "ValueError"),
     m.Error(4, "object_error", "boom", "ValueError", "tb", "ValueError")),
    (m.WorkerSend(m.LOCAL, [1, 2**64 - 1], m.OUT_DATA, b"\x00"),
     m.ChannelSend([1, 2**64 - 1], m.OUT_DATA, b"\x00")),
])
def test_worker_answers_become_what_the_broker_would_send(msg: m.Message,
                                                          expected: m.Message) -> None:
    frames = m.to_client(msg.encode())
    assert frames == expected.encode()
    assert m.parse_from_broker_to_client(frames) == expected


@pytest.mark.parametrize("msg", [m.Ready(0, 42, 99), m.WorkerHeartbeat({"a": 1}),
                                 m.Beat(0, 7)])
def test_other_worker_messages_are_not_for_the_client(msg: m.Message) -> None:
    assert m.to_client(msg.encode()) is None


def test_local_never_names_a_broker_client() -> None:
    """Broker client ids are a prefix byte (or none) and ZeroMQ's 5-byte routing id."""
    assert len(m.LOCAL) == 1 and m.LOCAL != b"A"


@settings(max_examples=examples(100), deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and s != "id"),
       st.sampled_from(["", "/inc", "/a/b?x=1", "?q=/ROOMS/other"]))
def test_a_name_places_as_its_id_does(name: str, rest: str) -> None:
    # (the name "id" followed by a path is the by-id form: the test below; found by this test)
    oid = IDS["ROOMS"].from_name(name)
    want = RING.slot_for(str(oid))
    assert slot_of_request(_line(f"/ROOMS/{quote(name, safe='')}{rest}"), IDS,
                           RING.slot_for) == want
    assert slot_of_request(_line(f"/ROOMS/id/{oid}{rest}", "POST"), IDS, RING.slot_for) == want


def test_the_segment_id_followed_by_a_path_names_an_id_as_the_gateway_reads_it() -> None:
    """``/NS/id/<rest>`` is the by-id form, so an object named "id" is placed by name only at
    ``/NS/id`` itself; with a path, the gateway refuses a segment that is not an id."""
    want = RING.slot_for(str(IDS["ROOMS"].from_name("id")))
    assert slot_of_request(_line("/ROOMS/id"), IDS, RING.slot_for) == want
    assert slot_of_request(_line("/ROOMS/id?x=1"), IDS, RING.slot_for) == want
    assert slot_of_request(_line("/ROOMS/id/inc"), IDS, RING.slot_for) is None
    oid = IDS["ROOMS"].from_name("id")
    assert slot_of_request(_line(f"/ROOMS/id/{oid}/inc"), IDS, RING.slot_for) == want


def test_quoted_namespace() -> None:
    oid = IDS["a b"].from_name("n")
    assert slot_of_request(_line("/a%20b/n/"), IDS, RING.slot_for) == RING.slot_for(str(oid))


@pytest.mark.parametrize("head", [
    b"",                                          # nothing yet
    b"GET /ROOMS/room-1/ HTTP/1.1",               # the line is not complete
    _line("/"), _line("/ROOMS"), _line("//x/"),   # no object named
    _line("/OTHER/room-1/"),                      # not a namespace
    _line("/ROOMS/id/" + "0" * 64 + "/"),         # an id this namespace did not issue
    _line("/ROOMS/id/zz/"),                       # not an id
    b"GET http://h/ROOMS/x/ HTTP/1.1\r\n\r\n",    # absolute form: served where accepted
    b"GET /ROOMS/x/\r\n\r\n",                     # HTTP/0.9 shape
    b"GET /ROOMS/\xff/ HTTP/1.1\r\n\r\n",         # not ASCII
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",  # a TLS hello
])
def test_unplaceable_first_lines(head: bytes) -> None:
    assert slot_of_request(head, IDS, RING.slot_for) is None
