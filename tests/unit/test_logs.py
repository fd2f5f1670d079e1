"""Log lines: timestamps on a terminal, syslog priorities under journald, JSON for shippers (#19)."""

import logging
import os
import re

import orjson
import pytest

from durable.supervisor import logs


@pytest.fixture
def captured(tmp_path):
    """stderr as a file, so that JOURNAL_STREAM can name it (as systemd does)."""
    path = tmp_path / "stderr"
    f = open(path, "w+")
    yield path, f
    f.close()
    logging.getLogger().handlers[:] = []


def lines(path, f):
    f.flush()
    return path.read_text().splitlines()


def test_text_lines_carry_a_utc_timestamp(captured, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("INFO", "broker pid=7", "text", captured[1])
    logging.getLogger("durable.x").warning("slot %d is gone", 3)
    (line,) = lines(*captured)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING broker pid=7 slot 3 is gone",
                        line), line


def test_under_journald_priorities_replace_timestamps(captured, monkeypatch):
    path, f = captured
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.under_journald(f)
    logs.setup("DEBUG", "gateway pid=9", "text", f)
    log = logging.getLogger("durable.y")
    log.error("bad")
    log.info("fine")
    log.debug("detail")
    assert lines(path, f) == ["<3>ERROR gateway pid=9 bad", "<6>INFO gateway pid=9 fine",
                              "<7>DEBUG gateway pid=9 detail"]
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # another stream: not the journal
    assert not logs.under_journald(f)


def test_json_lines_for_log_shippers(captured, monkeypatch):
    monkeypatch.setenv("DURABLE_LOG_FORMAT", "json")  # (as the supervisor passes it on)
    logs.setup("INFO", "objectproc slot=1 pid=5", stream=captured[1])
    log = logging.getLogger("durable.objectproc")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("call failed: %s", "x")
    (line,) = lines(*captured)
    rec = orjson.loads(line)
    assert {k: rec[k] for k in ("level", "who", "logger", "message")} == {
        "level": "ERROR", "who": "objectproc slot=1", "logger": "durable.objectproc",
        "message": "call failed: x"}
    assert rec["ts"].endswith("Z") and "ValueError: boom" in rec["exception"]


def test_the_access_log_is_never_rate_limited(captured, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("INFO", "gateway pid=1", "text", captured[1])
    for i in range(50):
        logging.getLogger(logs.ACCESS).info("GET /x %d", i)
        logging.getLogger("durable.gateway").warning("same fault")
    out = lines(*captured)
    assert sum("GET /x" in line for line in out) == 50
    assert sum("same fault" in line for line in out) == 5  # repeats are bounded


def test_a_clients_malformed_request_is_one_info_line_and_server_errors_stay_errors(
        captured, monkeypatch):
    """aiohttp logs a request it cannot parse (and a client gone mid-body) as an ERROR with a
    traceback; the HTTP fronts' logger turns those into one INFO line. A fault in the
    server's own handler is still an ERROR with its traceback."""
    from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

    from durable.broker.gateway import server_log
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("INFO", "objectproc slot=0 pid=7", "text", captured[1])

    def raised(exc):
        try:
            raise exc
        except BaseException:
            server_log.exception("Error handling request from %s", "127.0.0.1")

    raised(BadHttpMessage("Invalid character in chunk size:\n\n  b'zz'\n    ^"))
    raised(LineTooLong("a" * 300, "16384"))
    raised(ConnectionResetError("Connection lost"))
    raised(KeyError("route"))
    out = lines(*captured)
    assert "INFO objectproc slot=0 pid=7 Error handling request from 127.0.0.1: the client's " \
           "request could not be parsed (answered 400): 400, message: Invalid character in " \
           "chunk size: b'zz' ^" in out[0]
    assert "INFO" in out[1] and "could not be parsed" in out[1] and len(out[1]) < 400
    assert out[2].endswith("INFO objectproc slot=0 pid=7 Error handling request from "
                           "127.0.0.1: the client hung up before its request was read "
                           "(Connection lost)")
    assert "ERROR objectproc slot=0 pid=7 Error handling request from 127.0.0.1" in out[3]
    assert out[4] == "Traceback (most recent call last):" and "KeyError: 'route'" in out[-1]
    assert not any("Traceback" in x for x in out[:3])

    # at WARNING, the client's faults are not written at all; the server's still are
    logs.setup("WARNING", "objectproc slot=0 pid=7", "text", captured[1])
    n = len(lines(*captured))
    raised(BadHttpMessage("bad"))
    raised(KeyError("again"))
    more = lines(*captured)[n:]
    assert "ERROR" in more[0] and "KeyError: 'again'" in more[-1] and "bad" not in "".join(more)
