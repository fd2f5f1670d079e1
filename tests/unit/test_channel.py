"""A client's WebSocket channel, without sockets: what it does with each answer (#15)."""

import asyncio

import orjson
import pytest

from durable.errors import CallTimeoutError, ObjectError, OverloadedError, StubBrokenError
from durable.protocol.messages import EV_CLOSE, EV_TEXT, OUT_AUTO, OUT_CLOSE
from durable.websocket import CLOSED, OPEN, Channel


class FakeClient:
    def __init__(self):
        self._channels = {}
        self.events = []
        self.futures = []

    def _event(self, channel, kind, data=b"", **kw):
        self.events.append((kind, data, kw))
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


class Sink:
    def __init__(self):
        self.messages, self.closed = [], None

    def on_message(self, kind, payload):
        self.messages.append((kind, bytes(payload)))

    def on_close(self, code, reason):
        self.closed = (code, reason)


def open_channel():
    client = FakeClient()
    ch = Channel(client, 7, window=2)
    client._channels[7] = ch
    ch.deliver(EV_TEXT, b"early")  # sent while the upgrade call ran: held
    ch.bind(stub=type("S", (), {"_broken": None})())
    sink = Sink()
    ch.attach(sink)
    return client, ch, sink


async def test_early_messages_arrive_first_and_in_order():
    _, ch, sink = open_channel()
    ch.deliver(EV_TEXT, b"later")
    assert sink.messages == [(EV_TEXT, b"early"), (EV_TEXT, b"later")]
    assert ch.state == OPEN


@pytest.mark.parametrize("error,code", [(OverloadedError("full"), 1013),
                                        (CallTimeoutError("slow"), 1011)])
async def test_a_message_that_may_be_lost_closes_the_socket(error, code):
    client, ch, sink = open_channel()
    await ch.send(EV_TEXT, b"hello")
    client.futures[0].set_exception(error)
    await asyncio.sleep(0)
    assert sink.closed[0] == code and ch.state == CLOSED
    assert client.events[-1][0] == EV_CLOSE and client.events[-1][2]["code"] == code
    assert 7 not in client._channels


async def test_the_objects_own_error_keeps_the_socket_and_a_restart_closes_it_1012():
    client, ch, sink = open_channel()
    await ch.send(EV_TEXT, b"hello")
    client.futures[0].set_exception(ObjectError("bug", "ValueError"))
    await asyncio.sleep(0)
    assert sink.closed is None and ch.state == OPEN
    await ch.send(EV_TEXT, b"again")
    client.futures[1].set_exception(StubBrokenError("restarted"))
    await asyncio.sleep(0)
    assert sink.closed == (1012, "the object's process restarted")


async def test_the_window_holds_the_sender_and_auto_responses_never_leave():
    client, ch, sink = open_channel()
    ch.deliver(OUT_AUTO, orjson.dumps(["ping", "pong"]))
    await ch.send(EV_TEXT, b"ping")
    assert sink.messages[-1] == (EV_TEXT, b"pong") and client.events == []
    await ch.send(EV_TEXT, b"a")
    await ch.send(EV_TEXT, b"b")
    third = asyncio.ensure_future(ch.send(EV_TEXT, b"c"))
    await asyncio.sleep(0)
    assert not third.done() and len(client.events) == 2  # two unanswered: it waits
    client.futures[0].set_result(None)
    await asyncio.wait_for(third, 1)
    assert [e[1] for e in client.events] == [b"a", b"b", b"c"]


async def test_the_object_closing_the_socket():
    _, ch, sink = open_channel()
    ch.deliver(OUT_CLOSE, orjson.dumps([4000, "bye"]))
    assert sink.closed == (4000, "bye") and ch.state == CLOSED
    ch.deliver(EV_TEXT, b"after")  # nothing after the close
    assert (EV_TEXT, b"after") not in sink.messages
