"""Commit log records and write sets: format, torn tails, and damage that must not pass as one."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from durable.objectproc.storage.log import (
    SEGMENT_HEADER_SIZE,
    decode_writeset,
    encode_record,
    encode_writeset,
    mark_group_start,
    scan_segment,
    segment_header,
)
from tests.budget import examples

entries = st.dictionaries(st.text(), st.one_of(st.none(), st.binary(max_size=40)), max_size=8)


@given(st.binary(min_size=1, max_size=40), st.booleans(), entries)
def test_writeset_roundtrip(obj, clear, ents):
    ws = decode_writeset(encode_writeset(obj, clear, ents))
    assert (ws.obj, ws.clear, ws.entries) == (obj, clear, ents)


@given(st.binary(min_size=1, max_size=40), st.booleans(), entries,
       st.one_of(st.just(-2), st.just(-1), st.integers(0, 2**62)), st.integers(0, 2**62))
def test_writeset_roundtrip_with_alarm_and_time(obj, clear, ents, alarm, when):
    ws = decode_writeset(encode_writeset(obj, clear, ents, alarm, when))
    assert (ws.obj, ws.clear, ws.entries, ws.alarm, ws.time) == (obj, clear, ents, alarm, when)


@given(st.binary(min_size=1, max_size=40), st.booleans(), entries, st.integers(0, 2**62),
       st.binary(max_size=300))
def test_writeset_roundtrip_with_a_name(obj, clear, ents, when, name):
    """An object's name can ride in its write set (flag 8): one record, not two."""
    ws = decode_writeset(encode_writeset(obj, clear, ents, time=when, name=name))
    assert (ws.obj, ws.clear, ws.entries, ws.time, ws.name) == (obj, clear, ents, when, name)
    assert decode_writeset(encode_writeset(obj, clear, ents, time=when)).name is None


def test_a_name_flag_whose_name_runs_past_the_record_is_refused():
    good = encode_writeset(b"NS/o", False, {"k": b"v"}, name=b"alice")
    for cut in range(8, len(good)):
        with pytest.raises(ValueError):
            decode_writeset(good[:cut])
    flags_at = 2 + len(b"NS/o")
    bad = bytearray(good)
    bad[flags_at] |= 0x10  # an unknown flag
    with pytest.raises(ValueError, match="bad flags"):
        decode_writeset(bytes(bad))


def test_a_record_from_before_write_times_decodes_with_time_zero():
    old = b"\x04\x00NS/o\x00\x01\x00\x00\x00\x01\x00\x00\x00k\x01\x00\x00\x00v"  # 0.6 layout
    assert decode_writeset(old).time == 0
    assert encode_writeset(b"NS/o", False, {"k": b"v"}) == old


def test_a_time_flag_without_a_positive_time_is_refused():
    bad = bytearray(encode_writeset(b"NS/o", False, {"k": b"v"}, time=5))
    bad[7:15] = (0).to_bytes(8, "little")  # u16 len, "NS/o", flags, then the time
    with pytest.raises(ValueError, match="bad flags"):
        decode_writeset(bytes(bad))


@given(st.binary(max_size=80))
def test_writeset_decoder_rejects_garbage_with_value_error(data):
    try:
        decode_writeset(data)
    except ValueError:
        pass


def records(n, start=1):
    return [encode_record(start + i, encode_writeset(b"NS/o", False, {f"k{i}": b"v"})) for i in range(n)]


def segment(groups, prealloc=4096):
    """A segment as CommitLog writes it: header, groups (first record flagged), zero tail."""
    body = b"".join(mark_group_start(g[0]) + b"".join(g[1:]) for g in groups)
    data = segment_header(prealloc) + body
    return data + bytes(max(0, prealloc - len(data)))


def seqs(scan):
    return [s for s, _ in scan.records]


def test_scan_reads_all_records_and_a_zero_tail_is_a_clean_end():
    data = segment([[r] for r in records(5)])
    scan = scan_segment(data, last=True, where="t")
    assert seqs(scan) == [1, 2, 3, 4, 5]
    assert scan.torn is None and scan.damage is None


def test_legacy_segment_without_header_still_reads():
    scan = scan_segment(b"".join(records(3)), last=True, where="t")
    assert seqs(scan) == [1, 2, 3] and scan.damage is None


@pytest.mark.parametrize("cut", range(1, 40))
def test_torn_tail_of_last_segment_is_dropped(cut):
    recs = records(3)
    raw = segment([recs[:2], recs[2:]], prealloc=0)[:-cut]
    scan = scan_segment(raw, last=True, where="t")
    assert scan.damage is None
    got = seqs(scan)
    assert got == [1, 2, 3][: len(got)] and len(got) >= 2 - (cut > len(recs[2]))


def test_torn_group_with_pages_out_of_order_is_a_torn_tail():
    """The last group's later record reached the disk, its first did not: still unacknowledged."""
    recs = records(4)
    data = bytearray(segment([recs[:2], recs[2:]]))
    start = SEGMENT_HEADER_SIZE + len(recs[0]) + len(recs[1])
    data[start:start + len(recs[2])] = bytes(len(recs[2]))  # record 3 (group start) never written
    scan = scan_segment(bytes(data), last=True, where="t")
    assert seqs(scan) == [1, 2] and scan.torn is not None and scan.damage is None


def test_bit_flip_followed_by_a_later_group_is_damage_even_in_the_last_segment():
    recs = records(5)
    data = bytearray(segment([[r] for r in recs]))
    at = SEGMENT_HEADER_SIZE + len(recs[0]) + 20  # inside record 2's payload
    data[at] ^= 0x01
    scan = scan_segment(bytes(data), last=True, where="seg")
    assert seqs(scan) == [1]
    assert scan.damage is not None and scan.torn is None
    assert scan.damage.after_seq == 1 and scan.damage.resumes_seq == 3
    assert [s for s, _ in scan.resumed] == [3, 4, 5]
    assert "checksum mismatch" in scan.damage.describe() and "seg" in scan.damage.describe()


def test_zeroed_page_in_the_middle_is_damage():
    recs = records(60)
    data = bytearray(segment([[r] for r in recs], prealloc=8192))
    data[512:1024] = bytes(512)
    scan = scan_segment(bytes(data), last=True, where="t")
    assert scan.damage is not None and scan.damage.resumes_seq is not None
    assert seqs(scan)[-1] < scan.damage.resumes_seq <= 60


def test_truncated_preallocated_segment_is_damage():
    recs = records(20)
    data = segment([[r] for r in recs])
    cut = data[:SEGMENT_HEADER_SIZE + sum(len(r) for r in recs[:10])]  # at a record boundary
    scan = scan_segment(cut, last=True, where="t")
    assert seqs(scan) == list(range(1, 11))
    assert scan.damage is not None and "truncated" in scan.damage.reason


def test_any_damage_in_a_sealed_segment_is_damage():
    recs = records(3)
    data = bytearray(segment([recs], prealloc=0))
    data[-1] ^= 0xFF
    assert scan_segment(bytes(data), last=True, where="t").damage is None  # torn in the last
    assert scan_segment(bytes(data), last=False, where="t").damage is not None


def test_checksum_covers_sequence_number():
    rec = bytearray(records(1, start=7)[0])
    rec[8] ^= 1  # the seq field
    scan = scan_segment(bytes(rec), last=True, where="t")
    assert seqs(scan) == [] and scan.torn is not None


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=12), st.data())
def test_damage_before_the_last_group_is_never_taken_for_a_torn_tail(sizes, data):
    """Property: flip any byte of any record outside the last group -> damage, not torn."""
    recs = records(sum(sizes))
    groups, i = [], 0
    for n in sizes:
        groups.append(recs[i:i + n])
        i += n
    raw = bytearray(segment(groups, prealloc=0))
    last_group_at = len(raw) - sum(len(r) for r in groups[-1])
    pos = data.draw(st.integers(SEGMENT_HEADER_SIZE, last_group_at - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    scan = scan_segment(bytes(raw), last=True, where="t")
    if scan.damage is None:  # only a flip of the group flag itself can go unseen
        assert scan.torn is None and len(scan.records) == len(recs)
    else:
        assert scan.torn is None
