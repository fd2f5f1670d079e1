"""Method calls on stubs, without sockets: the wire encoding, errors, and what may be called."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable import DurableObject, codec
from durable.errors import ObjectError, ProtocolError, error_from_wire
from durable.http import Request, Response
from durable.ids import ObjectId
from durable.objectproc.activation import callable_method, callable_methods
from durable.protocol import messages as m
from tests.budget import examples
from tests.unit.test_codec import same, values

OID = ObjectId("ab" * 32, "room-1")


@settings(max_examples=examples(300))
@given(st.lists(values, max_size=4).map(tuple), st.dictionaries(st.from_regex(r"[a-z_]\w{0,8}", fullmatch=True), values, max_size=3))
def test_every_codec_type_round_trips_as_arguments_and_result(args, kwargs):
    head, body = m.encode_method_call("increment", args, kwargs)
    call = m.decode_method_call(head, body)
    assert call.name == "increment" and same(call.args, args) and same(call.kwargs, kwargs)
    rhead, rbody = m.encode_result(args)
    assert rhead == m.METHOD and same(m.decode_result(rbody), args)


def test_object_ids_requests_and_responses_cross_a_call_but_never_reach_storage():
    req = Request("http://do/x", method="PUT", headers=[("A", "1"), ("a", "2")], body=b"\x00\xff")
    resp = Response("made", status=201, headers={"X": "y"})
    (oid, r1), kw = codec.decode_call(codec.encode_call((OID, req), {"resp": resp}))
    assert oid == OID and oid.name == "room-1"
    assert (r1.method, r1.url, r1.headers.get_all("a"), r1.body) == ("PUT", req.url, ["1", "2"], b"\x00\xff")
    back = kw["resp"]
    assert (back.status, back.headers.get("x"), back.body) == (201, "y", b"made")
    for value in (OID, req, resp):
        with pytest.raises(TypeError, match="cannot be stored"):
            codec.encode(value)  # storage keeps plain values only


def test_an_argument_that_cannot_be_sent_is_named_before_anything_is_sent():
    class Thing:
        pass

    with pytest.raises(TypeError, match=r"argument 1: type .*Thing cannot be sent"):
        m.encode_method_call("f", (1, Thing()), {})
    with pytest.raises(TypeError, match=r"argument 'by' \[0\]\['k'\]: .*Thing"):
        m.encode_method_call("f", (), {"by": [{"k": Thing()}]})
    with pytest.raises(TypeError, match="subclass of int"):
        import enum
        m.encode_method_call("f", (enum.IntEnum("E", "A").A,), {})
    with pytest.raises(TypeError, match="cannot be sent"):
        m.encode_result(object())


@pytest.mark.parametrize("head", [b"@_private", b"@__init__", b"@a b", b"@", b"@1x", b"@" + b"x" * 201,
                                  b"@\xff\xfe"])
def test_names_that_cannot_be_called_are_refused_on_the_wire(head):
    with pytest.raises(ProtocolError, match="not a method name"):
        m.decode_method_call(head, codec.encode_call((), {}))


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'[["l"], {}]', b'[["t"], []]', b'[["t", ["zz"]], {}]',
                                  b'[["t", ["I", "short", null]], {}]', b'[["t"], {"a": ["Rq", 1]}]'])
def test_malformed_arguments_are_protocol_errors(body):
    with pytest.raises(ProtocolError):
        m.decode_method_call(b"@f", body)


class UserError(KeyError):
    pass


@pytest.mark.parametrize("exc, builtin", [
    (ValueError("v"), ValueError), (KeyError("k"), KeyError), (TypeError("t"), TypeError),
    (LookupError("l"), LookupError), (PermissionError("p"), PermissionError),
    (TimeoutError("t"), TimeoutError), (UserError("u"), KeyError),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), ValueError),  # its base that takes a message
])
def test_errors_keep_their_builtin_type_across_the_wire(exc, builtin):
    wire = m.parse_from_worker(m.WorkerError.of(b"c", 1, exc).encode()).to_client()
    err = error_from_wire(wire.code, wire.message, wire.remote_type, wire.traceback, wire.builtin)
    assert isinstance(err, ObjectError) and isinstance(err, builtin)
    assert err.type_name == type(exc).__name__ and err.remote_message == str(exc)
    assert str(err).startswith(f"{type(exc).__name__}: ")
    try:
        raise err
    except builtin:
        pass


@pytest.mark.parametrize("builtin", [None, "Exception", "StopIteration", "os", "__import__",
                                     "SystemExit", "DeprecationWarning", "Nope"])
def test_other_names_give_a_plain_object_error_and_import_nothing(builtin):
    err = error_from_wire("object_error", "m", "Whatever", None, builtin)
    assert type(err) is ObjectError


class Base(DurableObject):
    async def inherited(self):
        return 1


class Counter(Base):
    label = "not a function"

    def __init__(self, state, env):
        super().__init__(state, env)

    async def increment(self, by=1):
        return by

    def plain(self):
        return 2

    def _private(self):
        pass

    async def alarm(self, info):
        pass

    async def fetch(self, request):
        return Response("x")

    @property
    def prop(self):
        return 3

    @staticmethod
    def static():
        return 4

    @classmethod
    def klass(cls):
        return 5


@pytest.mark.parametrize("name", ["increment", "plain", "inherited"])
def test_the_users_functions_may_be_called(name):
    assert callable_method(Counter, name) is not None


@pytest.mark.parametrize("name", ["_private", "__init__", "fetch", "alarm", "label", "prop", "static",
                                  "klass", "missing", "websocket_message", "__class__", "mro"])
def test_what_may_not_be_called(name):
    assert callable_method(Counter, name) is None


def test_the_callable_names_listed_for_error_messages():
    assert callable_methods(Counter) == ["increment", "inherited", "plain"]
    assert callable_methods(DurableObject) == []
