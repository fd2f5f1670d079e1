"""Commit log records and write sets: format, torn tails, corruption."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable.errors import StorageCorruptError
from durable.objectproc.storage.log import (
    decode_writeset,
    encode_record,
    encode_writeset,
    scan_segment,
)

entries = st.dictionaries(st.text(), st.one_of(st.none(), st.binary(max_size=40)), max_size=8)


@given(st.binary(min_size=1, max_size=40), st.booleans(), entries)
def test_writeset_roundtrip(obj, clear, ents):
    ws = decode_writeset(encode_writeset(obj, clear, ents))
    assert (ws.obj, ws.clear, ws.entries) == (obj, clear, ents)


@given(st.binary(max_size=80))
def test_writeset_decoder_rejects_garbage_with_value_error(data):
    try:
        decode_writeset(data)
    except ValueError:
        pass


def records(n, start=1):
    return [encode_record(start + i, encode_writeset(b"NS/o", False, {f"k{i}": b"v"})) for i in range(n)]


def test_scan_reads_all_records():
    data = b"".join(records(5))
    assert [seq for seq, _ in scan_segment(data, last=True, where="t")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("cut", range(1, 40))
def test_torn_tail_of_last_segment_is_ignored(cut):
    recs = records(3)
    data = b"".join(recs)[:-cut]
    got = [seq for seq, _ in scan_segment(data, last=True, where="t")]
    assert got == [1, 2, 3][: len(got)] and len(got) >= 2 - (cut > len(recs[2]))


def test_bit_flip_ends_last_segment_but_is_corruption_elsewhere():
    data = bytearray(b"".join(records(3)))
    data[len(records(1)[0]) + 20] ^= 0x01  # inside record 2's payload
    assert [s for s, _ in scan_segment(bytes(data), last=True, where="t")] == [1]
    with pytest.raises(StorageCorruptError, match="damaged"):
        list(scan_segment(bytes(data), last=False, where="t"))


def test_checksum_covers_sequence_number():
    rec = bytearray(records(1, start=7)[0])
    rec[8] ^= 1  # the seq field
    assert list(scan_segment(bytes(rec), last=True, where="t")) == []
