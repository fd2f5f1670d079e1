"""How many examples the property tests draw: all of them in the full suite, a fifth in the
fast subset (``pytest -m "not slow"``, a quick check while working: tests/conftest.py sets
FAST). A DURABLE_*_EXAMPLES variable, where a test reads one, still wins."""

from __future__ import annotations

FAST = False


def examples(n: int) -> int:
    return max(10, n // 5) if FAST else n
