"""The wire protocol shared by client, broker and objectproc (sans I/O; never imports zmq).

``messages`` turns frames into typed messages and back; ``heartbeat`` keeps a
peer's liveness against an injected clock. The socket loops only move frames.
"""

from .heartbeat import Liveness
from .messages import VERSION, Cmd

__all__ = ["VERSION", "Cmd", "Liveness"]
