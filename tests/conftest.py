"""Suite-wide settings: short temporary paths under pytest-xdist."""

from __future__ import annotations

import itertools
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
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    items[:] = worker_layout(items, workers, lambda i: i.get_closest_marker("slow") is not None)


def xdist_shares(total: int, workers: int) -> list[int]:
    """How many of ``total`` tests worksteal first hands each of ``workers`` idle workers:
    consecutive runs of the list, in its order (xdist's ``check_schedule``)."""
    out = []
    for i in range(workers):
        out.append(total // (workers - i))
        total -= out[-1]
    return out


def worker_layout(items: list, workers: int, is_long) -> list:  # noqa: ANN001
    """The tests in an order whose consecutive runs, as worksteal first hands them out, each
    hold an even share of the long tests, among short ones, and end on short ones only (the
    last fifth of its short tests): what an idle worker steals (from the end of the longest
    queue) is then short. With the long tests all first, the first worker was handed every one
    (77% of the suite's time), the others stole them half a queue at a time, and the run ended
    on a 56-s test begun late, the machine mostly idle (~50 s of part one here). Each worker
    begins on a long test; a module's long tests stay together (its shared fixtures start
    once); the order is the same on every worker."""
    long_ = [i for i in items if is_long(i)]
    short = [i for i in items if not is_long(i)]
    if workers <= 1 or not long_:
        return long_ + short
    by_module: dict[str, list] = {}
    for item in long_:
        by_module.setdefault(item.nodeid.split("::")[0], []).append(item)
    shares: list[list[list]] = [[] for _ in range(workers)]
    for group in sorted(by_module.values(), key=len, reverse=True):  # (greedy, by count)
        min(shares, key=lambda groups: sum(map(len, groups))).append(group)
    out: list = []
    rest = iter(short)
    for groups, size in zip(shares, xdist_shares(len(items), workers), strict=True):
        mine = list(itertools.islice(rest, max(0, size - sum(map(len, groups)))))
        spread = len(mine) - len(mine) // 5  # (the last fifth: short tests only)
        for k, group in enumerate(groups):  # each group, then a like part of the short ones
            out.extend(group)
            out.extend(mine[spread * k // len(groups):spread * (k + 1) // len(groups)])
        out.extend(mine[spread if groups else 0:])
    out.extend(rest)
    return out
