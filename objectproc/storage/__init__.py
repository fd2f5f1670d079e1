"""Object storage for one slot: commit log + DuckDB, per-activation caches, gates.

``SlotStore`` owns a slot's files and threads; ``ObjectStorage`` is what an
object sees as ``state.storage``; ``ModelWorld`` is the in-memory reference
model used by tests. See docs/storage.md for the design and its measurements.
"""

from .limits import DEFAULT_LIMITS, StorageLimits
from .model import ModelStorage, ModelWorld
from .object import ObjectStorage, Transaction
from .slot import SlotStore

__all__ = ["SlotStore", "ObjectStorage", "Transaction", "StorageLimits", "DEFAULT_LIMITS",
           "ModelWorld", "ModelStorage"]
