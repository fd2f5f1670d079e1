"""Suite-wide settings: short temporary paths under pytest-xdist."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # An ipc socket's path holds at most 107 bytes, and xdist puts each worker's tmp_path a
    # level deeper (/tmp/pytest-of-USER/pytest-N/popen-gwK/...): start from a short base.
    if (getattr(config.option, "numprocesses", None) and config.option.basetemp is None
            and not hasattr(config, "workerinput")):
        config.option.basetemp = tempfile.mkdtemp(prefix="dt", dir="/tmp")
        config._durable_short_base = config.option.basetemp


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = getattr(session.config, "_durable_short_base", None)
    if base is not None and exitstatus == 0:  # (kept after a failure: the daemons' logs)
        shutil.rmtree(base, ignore_errors=True)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than CPUs. Most integration tests wait on real processes
    (a hang timeout, a restart, a soak's clock); measured on 2 cores: 602 s with 3 workers
    against 697 s with 2 for the tests not marked serial."""
    return (os.cpu_count() or 1) + 1
