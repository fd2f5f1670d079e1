"""The `durable` command's small promises, without a daemon (#19)."""

import os
import stat
import subprocess
import sys

import pytest

from durable.supervisor import cli


def test_python_dash_m_durable_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "durable", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("durable ")


def test_keygen_makes_a_private_secret_and_never_overwrites_without_force(tmp_path, capsys):
    assert cli.main(["keygen", str(tmp_path), "--name", "app"]) == 0
    secret, public = tmp_path / "app.key_secret", tmp_path / "app.key"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    first = secret.read_bytes()
    assert cli.main(["keygen", str(tmp_path), "--name", "app"]) == 1
    assert "already exist" in capsys.readouterr().err and secret.read_bytes() == first
    assert cli.main(["keygen", str(tmp_path), "--name", "app", "--force"]) == 0
    assert secret.read_bytes() != first and stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "status_cmd", interrupted)
    assert cli.main(["status"]) == 130
    err = capsys.readouterr().err
    assert err == "durable status: interrupted\n"


def test_durable_endpoint_names_the_daemon_without_config(monkeypatch, tmp_path):
    class Args:
        config = None
    monkeypatch.setenv("DURABLE_ENDPOINT", f"ipc://{tmp_path}/data/run/broker.sock")
    cfg = cli._load(Args())
    assert cfg.frontend() == f"ipc://{tmp_path}/data/run/broker.sock"
    assert cfg.admin() == f"ipc://{tmp_path}/data/run/admin.sock"
    monkeypatch.setenv("DURABLE_ENDPOINT", "tcp://10.0.0.1:7700")
    with pytest.raises(cli.ConfigError, match="--config"):
        cli._load(Args())
