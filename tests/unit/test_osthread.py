"""Threads named in the OS (``durable.osthread``): what top -H and cpu_split.py show."""

import sys
import threading
from pathlib import Path

import pytest

from durable.osthread import MAX_NAME, name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's prctl")


def _named_in_thread(name: str | None, python_name: str = "durable-commit-log"
                     ) -> tuple[str | None, str]:
    out: list = []

    def run() -> None:
        set_ = name_os_thread(name)
        out.append((set_, Path(f"/proc/self/task/{threading.get_native_id()}/comm")
                    .read_text().strip()))

    t = threading.Thread(target=run, name=python_name)
    t.start()
    t.join()
    return out[0]


def test_a_thread_takes_its_python_name_without_the_prefix():
    assert _named_in_thread(None) == ("commit-log", "commit-log")


def test_a_long_name_is_cut_to_what_linux_keeps_and_the_caller_hears_what_was_set():
    set_, comm = _named_in_thread("durable-a-name-much-longer-than-fifteen")
    assert set_ == comm == "a-name-much-lon" and len(comm) == MAX_NAME
