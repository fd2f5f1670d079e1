"""Typed stubs: ``client.namespace(name, Cls)`` gives stubs a type checker sees as ``Cls``.

mypy runs over the bundled example (no errors) and over misuse (each line flagged).
The package is laid out as users import it (``durable`` is ``client/``, with
``durable.examples``), so mypy reads the source, not the editable install's hook.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (mypy takes ~5 s: the full suite runs it)

REPO = Path(__file__).resolve().parents[2]

MISUSE = """\
import durable
from durable.examples.counter import Counter


async def main() -> None:
    async with durable.connect() as client:
        room = client.namespace("COUNTER", Counter).get_by_name("x")
        await room.increment(by="two")
        await room.nope()
        s: str = await room.value()
        plain = client.namespace("COUNTER").get_by_name("y")
        await plain.anything(1)
"""


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess:
    pkg = tmp_path / "durable"
    pkg.mkdir()
    for f in (REPO / "client").iterdir():
        (pkg / f.name).symlink_to(f)
    (pkg / "examples").symlink_to(REPO / "examples")
    return subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent",
                           "--no-error-summary", "--cache-dir", str(tmp_path / ".mypy_cache"),
                           *map(str, files)], cwd=tmp_path, capture_output=True, text=True,
                          env={"MYPYPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_typed_stubs_check_method_calls(tmp_path):
    bad = tmp_path / "misuse.py"
    bad.write_text(MISUSE)
    out = _mypy(tmp_path, REPO / "examples" / "call_counter.py", bad)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if "call_counter.py" in line], out.stdout
    flagged = sorted(int(line.split(":")[1]) for line in lines if line.startswith(bad.name))
    assert flagged == [8, 9, 10], out.stdout + out.stderr  # by="two", nope(), str = int
