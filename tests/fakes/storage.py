"""Two storage backends behind one interface, for the contract suite (dramatiq-style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from durable.objectproc.storage import (
    DEFAULT_LIMITS,
    ModelWorld,
    ObjectStorage,
    SlotStore,
    StorageLimits,
)
from durable.objectproc.storage.memory import MemorySlot


class EngineBackend:
    """The real engine: a SlotStore on a DuckDB file and commit log in ``directory``."""

    name = "duckdb"

    def __init__(self, directory: Path, limits: StorageLimits = DEFAULT_LIMITS, **opts: Any) -> None:
        self.directory = directory
        self.limits = limits
        self.opts = opts
        self.slot: SlotStore | None = None

    async def open(self) -> None:
        self.slot = SlotStore(self.directory, 0, limits=self.limits, **self.opts)

    def object(self, object_id: str = "obj1", namespace: str = "NS") -> ObjectStorage:
        assert self.slot is not None
        return ObjectStorage(self.slot, namespace, object_id)

    async def reopen(self) -> None:
        await self.close()
        await self.open()

    async def close(self) -> None:
        if self.slot is not None:
            await self.slot.close()
            self.slot = None


class ModelBackend:
    """The in-memory reference model."""

    name = "model"

    def __init__(self, directory: Path, limits: StorageLimits = DEFAULT_LIMITS, **opts: Any) -> None:
        self.world = ModelWorld(limits)

    async def open(self) -> None:
        pass

    def object(self, object_id: str = "obj1", namespace: str = "NS") -> Any:
        return self.world.object(namespace, object_id)

    async def reopen(self) -> None:
        pass

    async def close(self) -> None:
        pass


class MemoryBackend:
    """The in-memory slot of ``durable.testing`` under the real ObjectStorage."""

    name = "memory"

    def __init__(self, directory: Path, limits: StorageLimits = DEFAULT_LIMITS, **opts: Any) -> None:
        self.limits = limits
        self.slot: MemorySlot | None = None

    async def open(self) -> None:
        if self.slot is None:  # (a reopen keeps what was durable, as a restart does)
            self.slot = MemorySlot(self.limits)
        else:
            self.slot.crash()

    def object(self, object_id: str = "obj1", namespace: str = "NS") -> ObjectStorage:
        assert self.slot is not None
        return ObjectStorage(self.slot, namespace, object_id)

    async def reopen(self) -> None:
        await self.slot.close()
        await self.open()

    async def close(self) -> None:
        pass


BACKENDS = {"duckdb": EngineBackend, "model": ModelBackend, "memory": MemoryBackend}
