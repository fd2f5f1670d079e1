"""The output gate for calls that leave an object (its own module: client and websocket
both need it)."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable

__all__ = ["OUTPUT_GATE"]

#: Set by the object process in each object's context: an outgoing call (``env.NS`` stubs,
#: a WebSocket it opened) awaits it before it leaves, so no other object acts on a message
#: whose cause (the object's earlier writes) could still be lost. Cloudflare's output gate,
#: for calls.
OUTPUT_GATE: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = \
    contextvars.ContextVar("durable_output_gate", default=None)
