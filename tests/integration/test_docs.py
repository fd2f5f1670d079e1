"""The README's and the tutorial's code, run exactly as written against a real daemon."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.daemon import serving
from tests.integration.procs import free_port

REPO = Path(__file__).resolve().parents[2]
DURABLE = str(Path(sys.executable).with_name("durable"))
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(doc: str) -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / doc).read_text())


def run_sh(line: str, cwd: Path) -> subprocess.CompletedProcess:
    words = line.split("#")[0].split()
    if words[0] == "durable":
        words[0] = DURABLE
    elif words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "curl" and shutil.which("curl") is None:
        url = words[-1]
        code = (f"import urllib.request as u; r = u.urlopen(u.Request({url!r}, method='POST')); "
                "print(r.read().decode(), end='')")
        words = [sys.executable, "-c", code]
    return subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_getting_started_runs_as_written(tmp_path):
    """As written, but on a port of its own: never a running daemon's (or the user's) port."""
    files = {}
    commands = []
    port = str(free_port())
    for lang, body in blocks("docs/getting-started.md"):
        body = body.replace("127.0.0.1:8787", f"127.0.0.1:{port}")
        first = body.splitlines()[0] if body.strip() else ""
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = body
        elif lang == "sh":
            commands.extend(line for line in body.splitlines() if line.strip())
    assert {"myapp/counter.py", "myapp/__init__.py", "durable.toml", "call.py"} <= set(files)
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    serve = next(c for c in commands if c.startswith("durable serve"))
    with serving(tmp_path, command=[DURABLE, *serve.split()[1:]]) as d:
        d.wait_ready()
        out = {}
        for line in commands:
            if line.startswith(("durable serve", "python3 -m venv", "pip ")):
                continue  # the install steps and the daemon itself are done above
            r = run_sh(line, tmp_path)
            assert r.returncode == 0, (line, r.stdout, r.stderr)
            out[line] = r.stdout
        assert out["python call.py"].strip() == "room-1 is at 3 and fetch says 3"
        curl = next(k for k in out if k.startswith("curl"))
        assert out[curl].strip() == "4"
        assert "HTTP 200" in out["durable call COUNTER room-1 /inc -X POST"]
        assert "'n': 5" in out["durable inspect COUNTER room-1"]
        assert out["durable call COUNTER room-1 --method increment"].strip() == "6"
        assert "objectproc" in out["durable status"]


def test_ci_runs_the_readmes_test_command():
    """CI runs what the README tells a new user to run, part for part."""
    line = BLOCK.search((REPO / "README.md").read_text()).group(2).splitlines()[1]
    parts = [p.split("#")[0].strip() for p in line.split("&&") if p.strip().startswith("pytest")]
    ci = (REPO / ".ci" / "run").read_text()
    assert parts, line
    for part in parts:
        assert f"run {part[len('pytest '):]}" in ci, (part, "not in .ci/run")


def test_readme_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    first_sh = BLOCK.search(text).group(2).splitlines()
    assert first_sh[0].startswith("pip install -e . && durable serve")
    assert "pytest" in first_sh[1]
    python_block = next(body for lang, body in BLOCK.findall(text) if lang == "python")
    sh_calls = [line for lang, body in BLOCK.findall(text) if lang == "sh"
                for line in body.splitlines() if line.startswith("durable call") or line.startswith("durable status")]
    # Its own data dir (tmp_path is the cwd of every command) and its own port: the
    # built-in defaults otherwise, so a daemon the reader runs is never touched.
    # the built-in defaults but for the port (a file names its namespaces: the bundled ones)
    from durable.supervisor.config import DEFAULT_NAMESPACES
    namespaces = "".join(f'[namespaces.{n}]\nclass = "{c}"\n' for n, c in DEFAULT_NAMESPACES.items())
    (tmp_path / "durable.toml").write_text(f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
                                           + namespaces)
    with serving(tmp_path, command=[DURABLE, "serve", "--config", "durable.toml"]) as d:
        d.wait_ready()
        results = [run_sh(line, tmp_path) for line in sh_calls]
        assert all(r.returncode == 0 for r in results), results
        assert results[0].stdout == "HTTP 200\n1\n"
        (tmp_path / "readme.py").write_text(python_block)
        r = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "200 2 4", (r.stdout, r.stderr)
