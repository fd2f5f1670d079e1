"""An existing object's calls while its rows are read off the loop (objectproc.loop._Warming):
kept in order, and bounded as an activation's calls are."""

from durable.errors import OverloadedError
from durable.objectproc.activation import MAX_PENDING
from durable.objectproc.loop import _Warming
from durable.objectproc.websockets import SocketEvent
from durable.protocol.messages import EV_CLOSE, EV_TEXT


class _Event:
    def __init__(self, kind):
        self.kind = kind


def test_calls_wait_in_order_and_past_the_bound_are_refused():
    w = _Warming(("NS", "abc"), None)
    answers = []
    for i in range(MAX_PENDING + 3):
        w.deliver(i, lambda resp, err, i=i: answers.append((i, err)))
    assert [r for r, _ in w.parked] == list(range(MAX_PENDING))
    assert [i for i, _ in answers] == [MAX_PENDING, MAX_PENDING + 1, MAX_PENDING + 2]
    assert all(isinstance(e, OverloadedError) and "NS abc" in str(e) for _, e in answers)
    # a socket's close always goes in (it cannot be retried); a message does not
    w.deliver(SocketEvent(_Event(EV_CLOSE), None), lambda *a: answers.append(a))
    w.deliver(SocketEvent(_Event(EV_TEXT), None), lambda *a: answers.append(a))
    assert len(w.parked) == MAX_PENDING + 1 and len(answers) == 4
