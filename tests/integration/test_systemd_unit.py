"""scripts/durable.service: the keys the issue asks for, and systemd-analyze verify where it exists."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "durable.service"


def test_unit_has_the_required_settings():
    text = UNIT.read_text()
    for line in ["Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78 74",
                 "User=durable", "StateDirectory=durable", "RuntimeDirectory=durable",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"]:
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean(tmp_path):
    durable_bin = Path(sys.executable).with_name("durable")
    assert durable_bin.exists(), durable_bin
    unit = tmp_path / "durable.service"
    unit.write_text(UNIT.read_text().replace("/opt/durable/venv/bin/durable", str(durable_bin)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "durable.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
