"""The package installs and imports as users get it: from outside the repository, and as a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["durable", "durable.codec", "durable.errors", "durable.protocol", "durable.broker",
           "durable.objectproc", "durable.objectproc.storage", "durable.supervisor",
           "durable.supervisor.cli"]


def test_installed_package_imports_from_outside_the_repo(tmp_path):
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in MODULES) + "import durable; print(durable.__file__)"
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("__init__.py")


@pytest.mark.slow
def test_wheel_holds_every_package_and_imports(tmp_path):
    """``pip install .`` builds this wheel; a wheel of pure Python imports straight from the zip."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("durable-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ["durable/__init__.py", "durable/codec.py", "durable/py.typed",
                 "durable/testing/__init__.py", "durable/testing/plugin.py",
                 "durable-0.1.0.data/data/share/doc/durable/operating.md",
                 "durable-0.1.0.data/data/share/doc/durable/durable.service",
                 "durable/objectproc/storage/slot.py", "durable/supervisor/cli.py",
                 "durable/broker/__init__.py", "durable/protocol/__init__.py"]:
        assert path in names, f"{path} missing from the wheel"
    assert not any(n.startswith(("client/", "tests/", "objectproc/")) for n in names)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import durable.objectproc.storage as s; "
            "import durable; assert sys.argv[1] in durable.__file__, durable.__file__; print('ok')")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(wheel)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "durable.supervisor.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "durable" in out.stdout


def test_the_units_documentation_is_what_the_install_puts_there():
    """Documentation= names files the wheel installs under the venv the unit runs from."""
    unit = (REPO / "scripts" / "durable.service").read_text()
    docs = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Documentation=")]
    prefix = "file:///opt/durable/venv/share/doc/durable/"
    assert docs and all(d.startswith(prefix) for d in docs), docs
    assert "/opt/durable/venv/bin/durable" in unit  # (the same venv)
    for d in docs:
        assert (REPO / "docs" / d[len(prefix):]).exists(), d
