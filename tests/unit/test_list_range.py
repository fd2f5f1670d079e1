"""list() option checking and the bisecting key selection, against a plain filter."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable.objectproc.storage.limits import list_range

keys = st.text(alphabet="ab\x00é😀", max_size=4)


@given(st.sets(keys, max_size=20), st.none() | keys, st.none() | keys, st.none() | keys,
       st.booleans(), st.none() | st.integers(1, 25))
def test_select_matches_naive_filter(ks, start, end, prefix, reverse, limit):
    r = list_range(start, end, prefix, reverse, limit)
    sk = sorted(ks)
    want = [k for k in sk if (start is None or k >= start) and (end is None or k < end)
            and (prefix is None or k.startswith(prefix))]
    if reverse:
        want.reverse()
    if limit is not None:
        want = want[:limit]
    assert r.select(sk) == want


def test_python_str_order_is_utf8_byte_order():
    ks = ["", "\x00", "A", "Z", "a", "é", "\ue000", "\uffff", "😀", "\U0010ffff", "\uff3a", "\U0001d655"]
    assert sorted(ks) == sorted(ks, key=lambda k: k.encode("utf-8"))


@pytest.mark.parametrize("kw", [{"limit": 0}, {"limit": -3}])
def test_limit_values(kw):
    with pytest.raises(ValueError, match="positive"):
        list_range(**kw)
