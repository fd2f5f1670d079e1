"""A streamed response body, as the caller reads it (``resp.iter_chunks()``).

The object process sends at most ``STREAM_WINDOW`` bytes ahead of what the
reader has taken; the reader grants more (``EV_CREDIT``) every
``CREDIT_STEP`` bytes, so a slow reader slows the producer instead of growing
anyone's memory. A reader that stops early cancels the producer
(``EV_CANCEL``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

from .errors import ObjectError, StubBrokenError
from .protocol.messages import EV_CANCEL, EV_CREDIT, OUT_DATA, OUT_END, OUT_FAIL

__all__ = ["StreamBody", "STREAM_WINDOW", "CREDIT_STEP"]

#: bytes the producer may send beyond what the reader has taken
STREAM_WINDOW = 1 << 20
CREDIT_STEP = 256 << 10


class StreamBody:
    """The chunks of one streamed response (a client channel numbered by its call id)."""

    __slots__ = ("client", "id", "stub", "_chunks", "_done", "_error", "_waiter", "_read")

    def __init__(self, client: Any, call_id: int, stub: Any) -> None:
        self.client = client
        self.id = call_id
        self.stub = stub
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read = 0

    def deliver(self, kind: bytes, payload: bytes) -> None:
        if self._done or self._error is not None:
            return
        if kind == OUT_DATA:
            self._chunks.append(bytes(payload))
        elif kind == OUT_END:
            self._done = True
            self._forget()
        elif kind == OUT_FAIL:
            self._error = ObjectError(f"the object's streamed body failed: "
                                      f"{bytes(payload).decode('utf-8', 'replace')}", "StreamError")
            self._forget()
        self._wake()

    def lost(self, code: int, reason: str) -> None:
        if not self._done and self._error is None:
            self._error = StubBrokenError(f"the stream ended early: {reason}")
            self._forget()
            self._wake()

    def _forget(self) -> None:
        self.client._channels.pop(self.id, None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        finished = False
        try:
            while True:
                while not self._chunks:
                    if self._error is not None:
                        finished = True
                        raise self._error
                    if self._done:
                        finished = True
                        return
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                chunk = self._chunks.popleft()
                self._read += len(chunk)
                if self._read >= CREDIT_STEP and not self._done:
                    self.client._event(self, EV_CREDIT, credit=self._read)
                    self._read = 0
                yield chunk
        finally:
            if not finished and not self._done and self._error is None:
                self._error = asyncio.CancelledError()
                self._forget()
                self.client._event(self, EV_CANCEL)  # the reader left: stop the producer
