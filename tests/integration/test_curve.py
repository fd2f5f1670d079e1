"""CurveZMQ on the public endpoint: only authorized keys get in; the local endpoint stays keyless."""

from __future__ import annotations

import subprocess
import sys

import pytest

import durable
from tests.integration.daemon import serving
from tests.integration.test_gateway import free_port

pytestmark = pytest.mark.slow  # real processes, seconds each: the full suite runs it


def keygen(d, name):
    out = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "keygen", str(d),
                          "--name", name], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return d / f"{name}.key", d / f"{name}.key_secret"


def test_only_authorized_clients_get_through(tmp_path):
    keys, allowed, others = tmp_path / "keys", tmp_path / "allowed", tmp_path / "others"
    broker_pub, broker_sec = keygen(keys, "broker")
    good_pub, good_sec = keygen(allowed, "good")
    _, bad_sec = keygen(others, "bad")
    assert oct(bad_sec.stat().st_mode & 0o777) == "0o600"
    port = free_port()
    config = f"""
slots = 1
[broker]
heartbeat = 0.2
public_endpoint = "tcp://127.0.0.1:{port}"
curve_secret_key = "{broker_sec}"
authorized_keys = "{allowed}"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    public = f"tcp://127.0.0.1:{port}"
    with serving(tmp_path / "run", config) as d:
        d.wait_ready()
        # the authorized key works
        with durable.connect_sync(public, server_key=str(broker_pub), client_key=str(good_sec)) as c:
            ns = c.namespace("COUNTER")
            assert ns.get(ns.id_from_name("x")).fetch("http://do/inc", method="POST").text() == "1"
        # a key that is not authorized, and no key at all, get nothing (not even the handshake)
        with pytest.raises(ConnectionError):
            durable.connect_sync(public, server_key=str(broker_pub), client_key=str(bad_sec),
                                 connect_timeout=1.5)
        with pytest.raises(ConnectionError):
            durable.connect_sync(public, connect_timeout=1.5)
        # the local endpoint stays keyless
        with durable.connect_sync(d.frontend) as c:
            ns = c.namespace("COUNTER")
            assert ns.get(ns.id_from_name("x")).fetch("http://do/").text() == "1"


def test_public_endpoint_off_this_machine_without_keys_is_refused(tmp_path):
    config = """
[broker]
public_endpoint = "tcp://0.0.0.0:7799"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
"""
    with serving(tmp_path, config) as d:
        assert d.proc.wait(timeout=30) == 78
        log = d.log_text()
        assert "broker.public_endpoint" in log and "durable keygen" in log, log
        assert not d.children()
