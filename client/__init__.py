"""durable: a self-hosted Durable Objects runtime.

This package is what programs import. The daemon's parts live in
``durable.broker``, ``durable.objectproc`` and ``durable.supervisor``; they
depend on this package, never the other way round.
"""

from . import codec
from .errors import (
    DurableError,
    StorageCommitError,
    StorageCorruptError,
    StorageError,
    StorageLimitError,
    TransactionClosedError,
    TransactionConflictError,
)

__version__ = "0.1.0"

__all__ = [
    "codec",
    "DurableError",
    "StorageError",
    "StorageLimitError",
    "StorageCommitError",
    "StorageCorruptError",
    "TransactionClosedError",
    "TransactionConflictError",
]
