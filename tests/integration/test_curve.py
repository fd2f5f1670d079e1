"""CurveZMQ on the public endpoint: only authorized keys get in; the local endpoint stays keyless."""

from __future__ import annotations

import subprocess
import sys

import pytest

import durable
from durable.ids import ObjectId
from tests.integration.daemon import serving
from tests.integration.procs import free_port

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
        with pytest.raises(ConnectionError, match="CurveZMQ authentication failed"):
            durable.connect_sync(public, server_key=str(broker_pub), client_key=str(bad_sec),
                                 connect_timeout=1.5)
        with pytest.raises(ConnectionError, match="requires CurveZMQ"):
            durable.connect_sync(public, connect_timeout=1.5)
        with pytest.raises(ConnectionError, match="server_key is not this broker's"):
            durable.connect_sync(public, server_key=str(good_pub), client_key=str(good_sec),
                                 connect_timeout=1.5)
    with pytest.raises(ConnectionError, match=f"nothing is listening at {public}"):
        durable.connect_sync(public, connect_timeout=0.5)
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


def test_tcp_endpoint_needs_keys_and_keys_see_only_their_namespaces(tmp_path):
    """broker.endpoint on TCP (even loopback) is CurveZMQ; permissions.toml limits each key."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    broker_pub, broker_sec = keygen(keys, "broker")
    _, full_sec = keygen(allowed, "full")
    _, narrow_sec = keygen(allowed, "narrow")
    (allowed / "permissions.toml").write_text('[narrow]\nnamespaces = ["COUNTER"]\n')
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    config = f"""
slots = 1
[broker]
heartbeat = 0.2
endpoint = "{endpoint}"
curve_secret_key = "{broker_sec}"
authorized_keys = "{allowed}"
[namespaces.COUNTER]
class = "durable.examples.counter:Counter"
[namespaces.SECRET]
class = "durable.examples.counter:Counter"
"""
    with serving(tmp_path / "run", config) as d:
        d.wait_ready()
        with pytest.raises(ConnectionError):  # what any local user without a key gets
            durable.connect_sync(endpoint, connect_timeout=1.5)
        with durable.connect_sync(endpoint, server_key=str(broker_pub),
                                  client_key=str(full_sec)) as c:
            assert set(c.namespaces) == {"COUNTER", "SECRET"}
            secret_id = str(c.namespace("SECRET").id_from_name("vault"))
            with pytest.raises(durable.DurableError, match="local clients"):
                c.statistics()
        with durable.connect_sync(endpoint, server_key=str(broker_pub),
                                  client_key=str(narrow_sec)) as c:
            assert set(c.namespaces) == {"COUNTER"}  # no id key for SECRET
            ns = c.namespace("COUNTER")
            assert ns.get(ns.id_from_name("x")).fetch("http://do/inc", method="POST").text() == "1"
            # An id of SECRET obtained elsewhere does not get it in either.
            c._client._keys["SECRET"] = b"\0" * 32  # a made-up key, to build a stub at all
            stub = c.namespace("SECRET").get(ObjectId(secret_id))
            with pytest.raises(durable.UnknownNamespaceError, match="may not call"):
                stub.fetch("http://do/")
        # The daemon's own processes and local programs use ipc, without keys.
        with durable.connect_sync(d.frontend) as c:
            assert set(c.namespaces) == {"COUNTER", "SECRET"}
