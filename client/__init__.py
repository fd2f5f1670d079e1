"""durable: a self-hosted Durable Objects runtime.

This package is what programs import. The daemon's parts live in
``durable.broker``, ``durable.objectproc`` and ``durable.supervisor``; they
depend on this package, never the other way round.
"""

from . import codec
from .client import Client, Namespace, Stub, connect, default_endpoint
from .errors import (
    CallTimeoutError,
    CpuLimitError,
    DurableError,
    InvalidIdError,
    ObjectError,
    ObjectEvictedError,
    OverloadedError,
    ProtocolError,
    QueryError,
    StorageCommitError,
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageLimitError,
    StubBrokenError,
    TransactionClosedError,
    TransactionConflictError,
    UnknownNamespaceError,
    WebSocketError,
)
from .http import Headers, Request, Response
from .ids import ObjectId
from .objects import DurableObject, Env
from .sync import SyncClient, SyncResponse, connect_sync
from .websocket import ClientWebSocket, WebSocket, WebSocketPair

__version__ = "0.1.0"

__all__ = [
    "codec",
    "connect",
    "connect_sync",
    "default_endpoint",
    "Client",
    "SyncClient",
    "SyncResponse",
    "Namespace",
    "Stub",
    "ObjectId",
    "DurableObject",
    "Env",
    "Request",
    "Response",
    "Headers",
    "ProtocolError",
    "StubBrokenError",
    "ObjectError",
    "CpuLimitError",
    "ObjectEvictedError",
    "InvalidIdError",
    "UnknownNamespaceError",
    "OverloadedError",
    "CallTimeoutError",
    "DurableError",
    "StorageError",
    "StorageLimitError",
    "StorageCommitError",
    "StorageFullError",
    "StorageCorruptError",
    "TransactionClosedError",
    "TransactionConflictError",
    "WebSocketError",
    "QueryError",
    "WebSocket",
    "WebSocketPair",
    "ClientWebSocket",
]
