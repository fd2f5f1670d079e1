"""One error tree for everything durable raises.

Every error is a :class:`DurableError`, so ``except durable.DurableError``
catches all of them. Errors also subclass the builtin that a Python caller
would reach for first (``ValueError`` for bad input, ``ConnectionError`` for a
broken stub), so code that does not know durable still handles them sensibly.

Each class carries a stable ``code`` (what crosses the wire; an unknown code
decodes to the root) and ``retryable``: whether sending the same call again
may succeed.
"""

from __future__ import annotations

__all__ = [
    "DurableError",
    "StorageError",
    "StorageLimitError",
    "StorageCommitError",
    "StorageCorruptError",
    "TransactionClosedError",
    "TransactionConflictError",
]


class DurableError(Exception):
    """Root of every error durable raises."""

    code: str = "durable"
    retryable: bool = False


class StorageError(DurableError):
    """Something went wrong in an object's storage."""

    code = "storage"


class StorageLimitError(StorageError, ValueError):
    """A key, value or batch broke a storage limit; nothing was written."""

    code = "storage_limit"


class StorageCommitError(StorageError):
    """A write could not be made durable; the object's unsaved state was discarded."""

    code = "storage_commit"
    retryable = True


class StorageCorruptError(StorageError):
    """The slot's commit log or database is damaged in a way recovery must not guess about."""

    code = "storage_corrupt"


class TransactionClosedError(StorageError, RuntimeError):
    """An operation on a transaction after ``rollback()`` or after it ended."""

    code = "transaction_closed"


class TransactionConflictError(StorageError):
    """A transaction kept conflicting with concurrent writes and gave up retrying."""

    code = "transaction_conflict"
    retryable = True
