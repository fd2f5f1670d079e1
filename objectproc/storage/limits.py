"""Storage limits and argument checks, shared by the engine and the model.

The defaults are the original Durable Objects limits. Checks run before
anything is written, so a call that breaks a limit writes nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from durable import codec
from durable.errors import StorageLimitError


@dataclass(frozen=True)
class StorageLimits:
    """Per-slot storage limits (configurable; defaults from the seed API)."""

    max_key_bytes: int = 2048
    max_value_bytes: int = 32768
    max_keys_per_call: int = 128


DEFAULT_LIMITS = StorageLimits()

#: alarms may be set at most this far ahead (year ~2286 in epoch ms: beyond any real use)
MAX_ALARM_MS = 10**13


def alarm_time(when: Any) -> int:
    """``set_alarm``'s argument as epoch milliseconds: an aware ``datetime``, or epoch
    milliseconds as ``int``/``float`` (as Cloudflare takes them). A naive datetime is
    refused: its time zone would be a guess."""
    import datetime as dt
    import math

    if isinstance(when, dt.datetime):
        if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
            raise TypeError("set_alarm() needs an aware datetime (with tzinfo, e.g. "
                            "datetime.now(timezone.utc) + timedelta(seconds=30)), not a naive one")
        ms = round(when.timestamp() * 1000)
    elif type(when) in (int, float):
        if not math.isfinite(when):
            raise ValueError(f"set_alarm() needs a finite time, got {when!r}")
        ms = round(when)
    else:
        raise TypeError(f"set_alarm() takes an aware datetime or epoch milliseconds (int or "
                        f"float), not {type(when).__name__}")
    if not 0 <= ms <= MAX_ALARM_MS:
        raise ValueError(f"set_alarm() time {ms} ms is outside 1970..2286 (epoch milliseconds; "
                         "a datetime is converted for you)")
    return ms


def check_key(key: Any, limits: StorageLimits) -> bytes:
    """Return the key's UTF-8 bytes, or raise naming what is wrong."""
    if type(key) is not str:
        raise TypeError(f"storage keys must be str, not {type(key).__name__} ({key!r:.60})")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"key {key!r:.60} is not valid Unicode (it holds a lone surrogate)"
        ) from None
    if len(raw) > limits.max_key_bytes:
        raise StorageLimitError(
            f"key is {len(raw)} bytes; keys are limited to {limits.max_key_bytes} bytes"
        )
    return raw


def encode_value(key: str, value: Any, limits: StorageLimits) -> bytes:
    """Encode a value for ``key`` and check its size against the value limit.

    The limit counts the value, not its encoding: a str by its UTF-8 length,
    bytes by their length (the codec writes them as base64, a third longer),
    anything else by its encoded size less that base64 growth. So 32,768 raw
    bytes, or a 32 KiB str, fit under the default 32 KiB.
    """
    try:
        data = codec.encode(value)
    except TypeError as e:
        raise TypeError(f"cannot store key {key!r:.60}: {e}") from None
    if len(data) > limits.max_value_bytes:
        size = value_size(value, data)
        if size > limits.max_value_bytes:
            raise StorageLimitError(
                f"value for key {key!r:.60} is {size} bytes; values are limited to "
                f"{limits.max_value_bytes} bytes (limits.max_value_bytes)"
            )
    return data


def value_size(value: Any, data: bytes) -> int:
    """The size the value limit counts (see :func:`encode_value`); ``data`` is its encoding."""
    t = type(value)
    if t is str:
        return len(value.encode("utf-8", "surrogatepass"))
    if t is bytes or t is bytearray:
        return len(value)
    return len(data) - _base64_growth(value, set())


def _base64_growth(value: Any, seen: set[int]) -> int:
    t = type(value)
    if t is bytes or t is bytearray:
        if t is bytearray:  # a bytearray seen before is written as a reference
            if id(value) in seen:
                return 0
            seen.add(id(value))
        return 4 * ((len(value) + 2) // 3) - len(value)
    if t in (list, tuple, set, frozenset, dict):
        if t is not tuple and t is not frozenset:
            if id(value) in seen:
                return 0
            seen.add(id(value))
        items = value.items() if t is dict else ((v, None) for v in value)
        total = 0
        for k, v in items:
            total += _base64_growth(k, seen) + _base64_growth(v, seen)
        return total
    return 0


def check_keys(keys: Any, limits: StorageLimits, what: str) -> list[str]:
    """Check a multi-key argument (a list or tuple of str) and return it as a list."""
    if not isinstance(keys, (list, tuple)):
        raise TypeError(f"{what} takes a key (str) or a list of keys, not {type(keys).__name__}")
    if len(keys) > limits.max_keys_per_call:
        raise StorageLimitError(
            f"{what} was given {len(keys)} keys; one call is limited to "
            f"{limits.max_keys_per_call} keys"
        )
    for k in keys:
        check_key(k, limits)
    return list(keys)


def encode_entries(entries: Any, limits: StorageLimits) -> dict[str, bytes]:
    """Check and encode a ``put({k: v, ...})`` argument; all or nothing."""
    if not isinstance(entries, dict):
        raise TypeError(f"put takes (key, value) or a dict of entries, not {type(entries).__name__}")
    if len(entries) > limits.max_keys_per_call:
        raise StorageLimitError(
            f"put was given {len(entries)} entries; one call is limited to "
            f"{limits.max_keys_per_call} entries"
        )
    out: dict[str, bytes] = {}
    for k, v in entries.items():
        check_key(k, limits)
        out[k] = encode_value(k, v, limits)
    return out


@dataclass(frozen=True)
class ListRange:
    """Checked ``list()`` options: keys in ``[lo, hi)`` with ``prefix``, in order."""

    start: str | None
    end: str | None
    prefix: str | None
    reverse: bool
    limit: int | None

    def empty(self) -> bool:
        return self.start is not None and self.end is not None and self.start >= self.end

    def select(self, keys: list[str]) -> list[str]:
        """Pick the matching keys from ``keys`` (ascending), by bisection."""
        if self.empty():
            return []
        lo = self.start
        if self.prefix is not None and (lo is None or self.prefix > lo):
            lo = self.prefix
        i = bisect_left(keys, lo) if lo is not None else 0
        j = bisect_left(keys, self.end, i) if self.end is not None else len(keys)
        if self.prefix is not None:
            k = i
            while k < j and keys[k].startswith(self.prefix):
                k += 1
            j = k
        if self.reverse:
            if self.limit is not None:
                i = max(i, j - self.limit)
            return keys[i:j][::-1]
        if self.limit is not None:
            j = min(j, i + self.limit)
        return keys[i:j]

    def matches(self, k: str) -> bool:
        return ((self.start is None or k >= self.start)
                and (self.end is None or k < self.end)
                and (self.prefix is None or k.startswith(self.prefix)))


def list_range(start: Any = None, end: Any = None, prefix: Any = None,
               reverse: Any = False, limit: Any = None) -> ListRange:
    """Validate ``list()`` options; raise ``TypeError``/``ValueError`` naming the bad one."""
    for name, v in (("start", start), ("end", end), ("prefix", prefix)):
        if v is not None and type(v) is not str:
            raise TypeError(f"list({name}=...) must be a str or None, not {type(v).__name__}")
    if type(reverse) is not bool:
        raise TypeError(f"list(reverse=...) must be a bool, not {type(reverse).__name__}")
    if limit is not None:
        if type(limit) is not int:
            raise TypeError(f"list(limit=...) must be a positive int, not {type(limit).__name__}")
        if limit <= 0:
            raise ValueError(f"list(limit={limit}) must be a positive int")
    return ListRange(start, end, prefix, reverse, limit)
