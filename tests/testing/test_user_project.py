"""The pytest plugin works from a user's project outside this repository's tests (#16)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USER_PROJECT = Path(__file__).resolve().parents[1] / "userproject"


@pytest.mark.slow  # (a pytest subprocess: the full suite runs it)
def test_a_user_project_runs_its_tests_with_the_plugin(tmp_path):
    project = tmp_path / "project"  # a copy: nothing of this repository's conftest applies
    shutil.copytree(USER_PROJECT, project)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(project), "-c", str(project / "pytest.ini"),
                          str(project)], cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout
