"""durable.transport.monitor_event: a socket monitor's message read as (event, descriptor)."""

import struct

import zmq

from durable.transport import monitor_event


def test_a_disconnect_gives_the_connections_descriptor_as_a_plain_number():
    frames = [struct.pack("=HI", zmq.EVENT_DISCONNECTED, 7), b"ipc:///run/peer-1.sock"]
    assert monitor_event(frames) == (zmq.EVENT_DISCONNECTED, 7)
    event, fd = monitor_event([struct.pack("=HI", zmq.EVENT_ACCEPTED, 2**31 + 5)])
    assert (event, fd) == (zmq.EVENT_ACCEPTED, 2**31 + 5) and type(fd) is int


def test_what_is_not_a_monitor_message_is_none_not_an_error():
    for frames in ([], [b""], [b"abc"], [b"\x00" * 7], [b"\x00" * 5, b"x"]):
        assert monitor_event(frames) is None, frames
