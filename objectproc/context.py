"""The activation whose code is running: a context variable of its own module, so that the
activation and the WebSocket records (which it imports) can both read it."""

from __future__ import annotations

import contextvars
from typing import Any

__all__ = ["CURRENT"]

#: The activation whose code is running (set in each of its tasks' contexts).
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("durable_activation", default=None)
