"""Placement: the ring lives in ``durable.ring`` (clients place objects too, for the peer path)."""

from durable.ring import Ring, stable_hash

__all__ = ["Ring", "stable_hash"]
