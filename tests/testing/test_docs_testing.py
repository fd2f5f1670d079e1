"""docs/testing.md, run as written: its files are written out and pytest runs them (#16)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


@pytest.mark.slow  # (a pytest subprocess: the full suite runs it)
def test_the_testing_guide_runs_as_written(tmp_path):
    files = {}
    for _lang, body in BLOCK.findall((REPO / "docs" / "testing.md").read_text()):
        first = body.splitlines()[0] if body.strip() else ""
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = body
    assert {"pytest.ini", "myapp/objects.py", "test_counter.py", "test_transaction.py",
            "test_alarm.py", "test_room.py", "test_crash.py", "test_shop.py"} <= set(files)
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
                          str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 passed" in out.stdout
