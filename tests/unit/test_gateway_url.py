"""The HTTP front's request URLs: the same text aiohttp's ``request.url`` gives, for any
host and target, remembered in a bounded memory, and joined as text (``plain_url``) where
yarl would give the text as written. Pure: aiohttp's mocked requests, no socket (aiohttp's own parser over
loopback: tests/integration/test_gateway_url_parser.py)."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from durable.broker import gateway
from durable.broker.gateway import Gateway, plain_url
from tests.budget import examples

_SEGMENT = st.text(st.sampled_from("abcXYZ019-._~%20/?#=&:@!$'()*+,;é "), max_size=12)


def _gateway() -> Gateway:
    gw = object.__new__(Gateway)  # (its URL memory only)
    gw._urls = {}
    return gw


def _request(method: str, target: str, host: str | None):  # noqa: ANN202
    headers = CIMultiDict() if host is None else CIMultiDict({"Host": host})
    return make_mocked_request(method, target, headers=headers)


@settings(max_examples=examples(150), deadline=None)
@given(method=st.sampled_from(["GET", "POST", "OPTIONS"]),
       path=_SEGMENT, host=st.sampled_from(["bench", "Example.COM:8080", "127.0.0.1:8787",
                                            "[::1]:80", "a.b"]))
@example(method="GET", path="a/../../b?x=1#f", host="h")
@example(method="GET", path="%2e%2e/x", host="h")
def test_the_remembered_url_is_aiohttps_url_each_time(method, path, host):
    gw = _gateway()
    target = "/" + path
    try:
        want = str(_request(method, target, host).url)
    except ValueError:  # (a target aiohttp itself refuses: not this memory's business)
        return
    assert gw._url(_request(method, target, host)) == want
    assert gw._url(_request(method, target, host)) == want  # (from the memory)
    assert len(gw._urls) == 1


_PLAIN = st.text(st.sampled_from("abcXYZ019-._~!$&'()*+,;=:@/?"), max_size=16)
_HOST = st.one_of(st.sampled_from(["bench", "a.b", "x-y.z", "127.0.0.1", "1.2.3.4",
                                   "127.000.0.1", "0x7f.1", "a..b", "-a", "a-", "B", ""]),
                  st.tuples(st.sampled_from(["h", "127.0.0.1"]),
                            st.sampled_from(["0", "1", "80", "080", "443", "8787", "65535",
                                             "65536", "99999", "123456", ""])
                            ).map(":".join))


@settings(max_examples=examples(400), deadline=None)
@given(scheme=st.sampled_from(["http", "https"]), path=_PLAIN, host=_HOST)
@example(scheme="http", path="a?", host="h")
@example(scheme="http", path="a/./b", host="h")
@example(scheme="http", path="..", host="h")
@example(scheme="http", path="/", host="h")
@example(scheme="http", path="a", host="h:80")
@example(scheme="https", path="a", host="h:443")
def test_a_url_joined_as_text_is_aiohttps(scheme, path, host):
    target = "/" + path
    got = plain_url(scheme, host, target)
    if got is None:
        return
    req = make_mocked_request("GET", target, headers=CIMultiDict({"Host": host}),
                              sslcontext=object() if scheme == "https" else None)
    assert got == str(req.url)


def test_an_object_path_is_joined_as_text_and_an_unusual_one_is_not():
    assert plain_url("http", "bench", "/COUNTER/room-1/inc?by=2") == \
        "http://bench/COUNTER/room-1/inc?by=2"
    assert plain_url("http", "127.0.0.1:8787", "/C/id/ab12/x") == "http://127.0.0.1:8787/C/id/ab12/x"
    for host, target in [("h", "/a%2Fb"), ("h", "/a/../b"), ("h", "/a?"), ("h", "/a#f"),
                         ("H", "/a"), ("h:80", "/a"), ("[::1]:8787", "/a"), ("h", "/é"),
                         ("h", "*"), ("h", "http://h/a"), ("h", "//a")]:
        assert plain_url("http", host, target) is None, (host, target)


def test_requests_that_differ_in_host_or_target_get_their_own_url():
    gw = _gateway()
    a = gw._url(_request("GET", "/C/x/inc?by=2", "one"))
    b = gw._url(_request("GET", "/C/x/inc?by=2", "two:81"))
    c = gw._url(_request("GET", "/C/x/inc?by=3", "one"))
    assert (a, b, c) == ("http://one/C/x/inc?by=2", "http://two:81/C/x/inc?by=2",
                         "http://one/C/x/inc?by=3")
    assert gw._url(_request("GET", "/C/x/inc?by=2", "one")) == a


def test_the_memory_stays_bounded(monkeypatch):
    monkeypatch.setattr(gateway, "_STUB_CACHE", 50)
    gw = _gateway()
    for i in range(120):
        assert gw._url(_request("GET", f"/C/o{i}/", "h")) == f"http://h/C/o{i}/"
        assert gw._url(_request("GET", f"/C/o%20{i}/", "h")) == f"http://h/C/o%20{i}/"
        assert len(gw._urls) <= 50


def test_a_long_target_is_answered_but_not_kept():
    gw = _gateway()
    for target in ("/C/" + "x" * (gateway._REMEMBERED_MAX + 1),  # (joined as text)
                   "/C/" + "%20" * (gateway._REMEMBERED_MAX // 3 + 1)):  # (by yarl)
        assert gw._url(_request("GET", target, "h")) == "http://h" + target
    assert gw._urls == {}
