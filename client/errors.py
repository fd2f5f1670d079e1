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
    "ProtocolError",
    "StubBrokenError",
    "ObjectError",
    "CpuLimitError",
    "ObjectEvictedError",
    "InvalidIdError",
    "UnknownNamespaceError",
    "OverloadedError",
    "CallTimeoutError",
    "error_from_wire",
    "StorageError",
    "StorageLimitError",
    "StorageCommitError",
    "StorageFullError",
    "StorageCorruptError",
    "TransactionClosedError",
    "TransactionConflictError",
    "WebSocketError",
    "QueryError",
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
    """A write could not be made durable, or it is not known whether it was.

    ``outcome`` says which: ``"discarded"`` means the write is certainly not
    stored (sending it again applies it once); ``"unknown"`` means the commit
    log failed after the write reached it (a failed ``fdatasync``), so it may
    be stored: read before you write again, or make the write idempotent.
    Either way the object is reset (its in-memory state is dropped).
    """

    code = "storage_commit"
    retryable = True
    OUTCOMES = ("discarded", "unknown")

    def __init__(self, message: str, outcome: str | None = None) -> None:
        if outcome is None:  # rebuilt from the wire: the message carries it
            outcome = "discarded" if "(outcome: discarded)" in message else "unknown"
        elif outcome not in self.OUTCOMES:
            raise ValueError(f"outcome must be one of {self.OUTCOMES}, got {outcome!r}")
        elif f"(outcome: {outcome})" not in message:
            message = f"{message} (outcome: {outcome})"
        super().__init__(message)
        self.outcome = outcome


class StorageFullError(StorageCommitError):
    """The slot cannot take writes: the write was refused or discarded, certainly not stored.

    Its disk is full (writes are accepted again by itself within seconds once space is
    freed: retry later), or DuckDB's indexes fill the memory the slot may give them (until
    the operator raises ``memory_limit_mb`` or adds slots; the message says which). The slot
    keeps serving reads and calls that do not write.
    """

    code = "storage_full"

    def __init__(self, message: str, outcome: str | None = "discarded") -> None:
        super().__init__(message, outcome or "discarded")


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


class IllegalTransition(DurableError, RuntimeError):
    """A lifecycle step its transition table does not allow (``durable.fsm``): a bug in durable."""

    code = "illegal_transition"


class ProtocolError(DurableError):
    """A peer sent a message that breaks the wire protocol (malformed, truncated, out of order)."""

    code = "protocol"


class StubBrokenError(DurableError, ConnectionError):
    """The stub lost its object (process restart, broker restart, heartbeat loss).

    Every call in flight and every later call on this stub raises it; get a
    new stub with ``namespace.get(id)``. Calls on the old and the new stub
    are not ordered with respect to each other, and a call that failed this
    way may or may not have run.
    """

    code = "stub_broken"
    retryable = True


class ObjectError(DurableError):
    """The object's ``fetch`` or method raised; the stub stays usable.

    When the remote exception derives from a builtin one (``ValueError``,
    ``KeyError``, ``PermissionError``, ...), the error raised here is also an
    instance of that builtin, so ``except KeyError:`` works across the call.
    """

    code = "object_error"

    def __init__(self, message: str, remote_type: str = "Exception",
                 remote_traceback: str | None = None, remote_builtin: str | None = None) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        #: the object's traceback, when the daemon runs with ``debug = true``
        self.remote_traceback = remote_traceback
        #: the builtin exception the remote one derives from, if any (e.g. ``"KeyError"``)
        self.remote_builtin = remote_builtin

    @property
    def type_name(self) -> str:
        """The name of the exception type the object raised (e.g. ``"StorageLimitError"``)."""
        return self.remote_type


class CpuLimitError(ObjectError):
    """A call ran longer than its namespace's ``cpu_limit_ms`` without yielding; the object
    was reset (its in-memory state discarded, its durable writes kept)."""

    code = "cpu_limit"

    def __init__(self, message: str, remote_type: str = "CpuLimitError",
                 remote_traceback: str | None = None, remote_builtin: str | None = None) -> None:
        super().__init__(message, remote_type, remote_traceback, remote_builtin)


class ObjectEvictedError(StorageError):
    """Storage used through a ``state`` whose object was evicted or reset: nothing was written.

    Raised inside object code, e.g. by a background task that outlived its
    object's eviction; the object's current instance is unaffected.
    """

    code = "object_evicted"


class InvalidIdError(DurableError, ValueError):
    """A string is not an object id that this namespace issued, or a name too long to make one."""

    code = "invalid_id"


class UnknownNamespaceError(DurableError, LookupError):
    """No namespace of that name is configured."""

    code = "unknown_namespace"


class OverloadedError(DurableError):
    """A bounded queue is full; the call was not delivered. Retry later."""

    code = "overloaded"
    retryable = True


class CallTimeoutError(DurableError, TimeoutError):
    """The call got no answer within its deadline; it may or may not have run."""

    code = "timeout"
    retryable = True


class WebSocketError(DurableError):
    """A WebSocket could not be opened (``status``/``body``: the object's answer), or was
    used after it closed."""

    code = "websocket"

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class QueryError(DurableError, ValueError):
    """A SQL query was refused (not one read-only statement, file access) or failed; the
    message says which and what to change."""

    code = "query"


def _all_errors(cls: type[DurableError]) -> list[type[DurableError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_errors(sub))
    return out


_BY_CODE: dict[str, type[DurableError]] = {}


_MIXED: dict[tuple[type, str], type] = {}


def _with_builtin(cls: type[ObjectError], builtin: str | None) -> type[ObjectError]:
    """``cls`` made also an instance of the builtin exception named (looked up in
    ``builtins`` only: nothing is ever imported). A builtin whose constructor cannot
    take a message (UnicodeDecodeError) gives way to its nearest base that can."""
    import builtins

    base = getattr(builtins, builtin, None) if builtin else None
    if not (isinstance(base, type) and issubclass(base, Exception)) or issubclass(base, (
            StopIteration, StopAsyncIteration, Warning, BaseExceptionGroup)):
        return cls
    mixed = _MIXED.get((cls, base.__name__))
    if mixed is None:
        for b in base.__mro__:
            if b is Exception:
                mixed = cls
                break
            candidate = type(f"{cls.__name__}[{b.__name__}]", (cls, b),
                             {"__str__": BaseException.__str__, "__module__": cls.__module__})
            try:
                candidate("probe", "Exception", None)
            except TypeError:
                continue
            mixed = candidate
            break
        _MIXED[(cls, base.__name__)] = mixed
    return mixed


def error_from_wire(code: str, message: str, remote_type: str | None = None,
                    traceback: str | None = None, builtin: str | None = None) -> DurableError:
    """Rebuild an error from its wire code; an unknown code gives the root class."""
    if not _BY_CODE:
        for cls in _all_errors(DurableError):
            _BY_CODE.setdefault(cls.code, cls)
    cls = _BY_CODE.get(code, DurableError)
    if issubclass(cls, ObjectError):
        default = "CpuLimitError" if cls is CpuLimitError else "Exception"
        return _with_builtin(cls, builtin)(message, remote_type or default, traceback, builtin)
    err = cls(message)
    return err
