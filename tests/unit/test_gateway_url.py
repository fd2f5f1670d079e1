"""The HTTP front's remembered request URLs: the same text aiohttp's ``request.url`` gives,
for any host and target, and a bounded memory. Pure: aiohttp's mocked requests, no socket."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from durable.broker import gateway
from durable.broker.gateway import Gateway
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
        assert len(gw._urls) <= 50


def test_a_long_target_is_answered_but_not_kept():
    gw = _gateway()
    target = "/C/" + "x" * (gateway._REMEMBERED_MAX + 1)
    assert gw._url(_request("GET", target, "h")) == "http://h" + target
    assert gw._urls == {}
