"""Suite-wide settings: short temporary paths under pytest-xdist."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests import budget


def pytest_configure(config: pytest.Config) -> None:
    if "not slow" in (config.option.markexpr or ""):  # the fast subset: fewer examples
        budget.FAST = True
    # xdist's default (`load`) hands each worker a fixed run of tests: in a CI-like run two
    # workers still had 200 s of tests queued when the other two were done. `worksteal` lets
    # an idle worker take half of a busy one's queue. (Unless --dist was given.)
    if (getattr(config.option, "dist", "no") == "load"
            and not any(a.startswith("--dist") or a == "-d" for a in config.invocation_params.args)):
        config.option.dist = "worksteal"
    # An ipc socket's path holds at most 107 bytes, and xdist puts each worker's tmp_path a
    # level deeper (/tmp/pytest-of-USER/pytest-N/popen-gwK/...): start from a short base.
    if (getattr(config.option, "numprocesses", None) and config.option.basetemp is None
            and not hasattr(config, "workerinput")):
        parent = Path("/tmp/dt")
        parent.mkdir(exist_ok=True)
        config.option.basetemp = tempfile.mkdtemp(prefix="", dir=parent)
        config._durable_short_base = config.option.basetemp
        _prune(parent, keep=KEEP_BASES)


#: failed runs whose folders are kept (pytest's own default for its numbered folders)
KEEP_BASES = 3


def _prune(parent: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` bases of earlier runs: a failed run keeps its
    folder for its logs, and without a bound they filled the disk (56 GB of /tmp, seen)."""
    bases = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in bases[:-keep - 1]:  # (the newest is this run's own)
        shutil.rmtree(old, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = getattr(session.config, "_durable_short_base", None)
    if base is not None and exitstatus == 0:  # (kept after a failure: the daemons' logs)
        shutil.rmtree(base, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # (after -m and -k have deselected what they do)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The stateful storage test's short run (for ``-m "not slow"``) explores a subset of what
    its full run does: when both are selected, only the full one runs (~14 s saved)."""
    names = {item.nodeid for item in items}
    quick = [i for i in items if i.nodeid.endswith("TestEngineMatchesModelQuick::runTest")]
    if quick and any(n.endswith("TestEngineMatchesModel::runTest") for n in names):
        config.hook.pytest_deselected(items=quick)
        items[:] = [i for i in items if i not in quick]
    # The long tests first (a stable sort, the same on every xdist worker), so that the end of
    # a run is short tests that the workers share out, not a 45-s test begun last.
    items.sort(key=lambda i: i.get_closest_marker("slow") is None)
