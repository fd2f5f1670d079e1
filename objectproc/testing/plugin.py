"""The pytest plugin of ``durable.testing`` (registered as a ``pytest11`` entry point).

``durable_runtime`` is a fixture factory: ``rt = await durable_runtime({"COUNTER":
Counter})`` in an async test (pytest-asyncio) gives a running ``Runtime``; every
runtime it made is closed when the test ends, even when it fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from durable.testing import Runtime

try:
    import pytest_asyncio
except ImportError:  # without pytest-asyncio, use `async with Runtime(...)` in asyncio.run
    pytest_asyncio = None

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def durable_runtime() -> AsyncIterator[Callable[..., Awaitable[Runtime]]]:
        """``await durable_runtime(classes, **options)``: a started ``Runtime``."""
        made: list[Runtime] = []

        async def make(classes: dict[str, Any], **options: Any) -> Runtime:
            rt = Runtime(classes, **options)
            await rt.start()
            made.append(rt)
            return rt

        try:
            yield make
        finally:
            for rt in reversed(made):
                await rt.close()
