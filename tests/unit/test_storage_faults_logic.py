"""Pure pieces of the disk-fault work: restart decisions, data-dir identity, outcomes, cuts."""

from __future__ import annotations

import os

import pytest

from durable.errors import StorageCommitError, StorageFullError, error_from_wire
from durable.exitcodes import EXIT_CORRUPT, EXIT_DISK_FULL
from durable.objectproc.storage.log import (
    SEGMENT_HEADER_SIZE,
    cut_segment,
    encode_record,
    encode_writeset,
    mark_group_start,
    scan_segment,
    segment_header,
)
from durable.protocol.messages import Control, WorkerError, parse_control, parse_from_worker
from durable.supervisor.datadir import DataDirError, open_data_dir, read_identity
from durable.supervisor.restart_policy import RestartPolicy


def test_corrupt_slot_stays_down_without_halting_the_daemon():
    d = RestartPolicy().on_exit(10.0, EXIT_CORRUPT, 5.0)
    assert d.restart_in is None and d.corrupt and "durable repair" in d.reason


def test_disk_full_at_start_is_retried_forever_and_never_counts_as_flapping():
    policy = RestartPolicy(flap_limit=3)
    for i in range(50):
        d = policy.on_exit(float(i), EXIT_DISK_FULL, 0.1)
        assert d.restart_in == policy.disk_full_delay and not d.corrupt


@pytest.mark.parametrize("outcome", ["discarded", "unknown"])
def test_commit_outcome_survives_the_wire(outcome):
    err = StorageCommitError("slot 3 could not confirm", outcome=outcome)
    wire = parse_from_worker(WorkerError.of(b"c", 1, err).encode()).to_client()
    back = error_from_wire(wire.code, wire.message, wire.remote_type)
    assert type(back) is StorageCommitError and back.outcome == outcome


def test_storage_full_is_a_discarded_commit_error_that_may_be_retried():
    wire = parse_from_worker(WorkerError.of(b"c", 1, StorageFullError("disk full")).encode())
    back = error_from_wire(wire.code, wire.message)
    assert isinstance(back, StorageFullError) and back.outcome == "discarded" and back.retryable
    with pytest.raises(ValueError, match="outcome"):
        StorageCommitError("x", outcome="maybe")


def test_slot_failed_control_roundtrip_and_bad_reason_refused():
    msg = Control("slot_failed", 2, 1234, "its storage is damaged")
    assert parse_control(msg.encode()) == msg
    frames = msg.encode()
    frames[1] = frames[1].replace(b'"reason":"its storage is damaged"', b'"reason":5')
    from durable.errors import ProtocolError
    with pytest.raises(ProtocolError, match="reason"):
        parse_control(frames)


def test_data_dir_is_created_once_and_its_identity_kept(tmp_path, caplog):
    data = tmp_path / "d"
    with caplog.at_level("WARNING"):
        first = open_data_dir(data)
    assert f"creating a new data dir at {data}" in caplog.text
    assert oct((data / "identity").stat().st_mode & 0o777) == "0o600"
    assert open_data_dir(data).id == first.id and first.still_there()
    (data / "identity").unlink()
    assert not first.still_there()


def test_data_dir_with_files_but_no_identity_or_secret_is_refused(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "slot-0.duckdb").write_bytes(b"x")
    with pytest.raises(DataDirError, match="no identity and no secret"):
        open_data_dir(data)
    assert sorted(os.listdir(data)) == ["slot-0.duckdb"]  # nothing added


def test_data_dir_of_durable_0_1_is_adopted(tmp_path, caplog):
    data = tmp_path / "d"
    data.mkdir()
    (data / "secret").write_bytes(os.urandom(32))
    (data / "slot-0.duckdb").write_bytes(b"x")
    with caplog.at_level("WARNING"):
        ident = open_data_dir(data)
    assert "adopting" in caplog.text and read_identity(data).id == ident.id


def test_damaged_identity_file_is_refused(tmp_path):
    data = tmp_path / "d"
    open_data_dir(data)
    (data / "identity").write_bytes(b"{not json")
    with pytest.raises(DataDirError, match="damaged"):
        open_data_dir(data)


def _records(n):
    return [mark_group_start(encode_record(i, encode_writeset(b"NS/o", False, {f"k{i}": b"v"})))
            for i in range(1, n + 1)]


def test_cut_segment_keeps_records_up_to_the_cut_and_its_allocation():
    recs = _records(10)
    live = segment_header(4096) + b"".join(recs) + b"\x17" * 30  # a write in progress after
    live += bytes(4096 - len(live))
    cut = cut_segment(live, 6)
    assert len(cut) == 4096
    scan = scan_segment(cut, last=True, where="t")
    assert [s for s, _ in scan.records] == [1, 2, 3, 4, 5, 6]
    assert scan.damage is None and scan.torn is None
    assert cut_segment(live, 0) is None
    assert len(cut_segment(live, 99)) == 4096
    assert cut[:SEGMENT_HEADER_SIZE] == segment_header(4096)
