"""Object ids, built as workerd builds them, so they have the same properties.

For a namespace key ``k`` (derived from the daemon's secret and the
namespace name):

* from a name: ``a = HMAC-SHA256(k, name)[:16]``; random for a unique id;
* the id is ``a ‖ HMAC-SHA256(k, a)[:16]``, written as 64 lowercase hex digits.

So the same name always gives the same id, unique ids carry 128 random bits
and cannot be guessed, and :meth:`IdFactory.from_string` can tell an id this
namespace issued from any other 64 hex digits (including another namespace's
ids) by checking the second half.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import InvalidIdError
from .fsutil import write_durably

__all__ = ["ObjectId", "IdFactory", "namespace_key", "load_or_create_secret"]

_HEX = frozenset("0123456789abcdef")


class ObjectId:
    """An object's identity: ``str(oid)`` is 64 lowercase hex digits."""

    __slots__ = ("_hex", "name")

    def __init__(self, hex_id: str, name: str | None = None) -> None:
        self._hex = hex_id
        #: the name it was derived from, when it was derived here; else None
        self.name = name

    def __str__(self) -> str:
        return self._hex

    def __repr__(self) -> str:
        return f"ObjectId({self._hex!r}" + (f", name={self.name!r})" if self.name is not None else ")")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectId) and other._hex == self._hex

    def __hash__(self) -> int:
        return hash(self._hex)


def namespace_key(secret: bytes, namespace: str) -> bytes:
    """The per-namespace MAC key: ids of one namespace are invalid in every other."""
    return hmac.new(secret, b"durable/namespace-key/v1\x00" + namespace.encode(), hashlib.sha256).digest()


def load_or_create_secret(data_dir: str | os.PathLike[str], *, create: bool = True) -> bytes:
    """Read the daemon's id secret, creating it (mode 0600) at first start.

    The daemon's children pass ``create=False``: only the supervisor creates a
    data dir, so a child restarted after the dir vanished fails instead of
    minting a new secret (which would orphan every existing id).
    """
    path = Path(data_dir) / "secret"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(f"{path} is missing: the data dir was removed or replaced "
                                    "while the daemon ran") from None
        Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        # never replace a secret another process just created: it would orphan its ids
        write_durably(path, secrets.token_bytes(32), replace=False)
        data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path} holds {len(data)} bytes; an id secret is 32 bytes")
    return data


#: (namespace key, name) -> id of the names seen lately, by every IdFactory of this process: a
#: name's id is made twice in one process when HTTP is served in the object process (the
#: route, then the check of the name on activation), and each costs two HMACs (~5 µs)
_NAMED: dict[tuple[bytes, str], str] = {}
_NAMED_MAX = 4096
#: the longest name an id is made from, in characters: the wire's limit (every message that
#: carries a name refuses a longer one), so an id made here reaches its object from anywhere
MAX_OBJECT_NAME = 4096


class IdFactory:
    """Makes and checks the ids of one namespace."""

    __slots__ = ("namespace", "_key", "_inner", "_outer")

    def __init__(self, namespace: str, key: bytes) -> None:
        self.namespace = namespace
        self._key = key
        # HMAC's two padded keys, hashed once (RFC 2104): each MAC then copies the states
        # instead of hashing them again: 0.63 µs a MAC against 1.58 µs for hmac.new() on the
        # project's VM. A call to a new named object makes four: two where its id is made
        # (the caller, or the HTTP front), two where the owner checks it (a peer's call).
        block = key if len(key) <= 64 else hashlib.sha256(key).digest()
        block = block.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def _hmac(self, msg: bytes) -> bytes:
        """HMAC-SHA256 of ``msg`` under the namespace key (all 32 bytes)."""
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _mac(self, a: bytes) -> bytes:
        return self._hmac(a)[:16]

    def from_name(self, name: str) -> ObjectId:
        return ObjectId(self.hex_from_name(name), name)

    def hex_from_name(self, name: str) -> str:
        """``str(from_name(name))``, for the checks that compare it with an id they got."""
        if type(name) is not str:
            raise TypeError(f"id_from_name takes a str, not {type(name).__name__}")
        memo = (self._key, name)
        hex_id = _NAMED.get(memo)
        if hex_id is None:
            if len(name) > MAX_OBJECT_NAME:
                raise InvalidIdError(f"an object's name is at most {MAX_OBJECT_NAME} characters; "
                                     f"this one has {len(name)} (name it by something shorter, "
                                     "a hash of it for example)")
            try:
                raw = name.encode("utf-8")
            except UnicodeEncodeError as e:  # (a lone surrogate: no message could carry it)
                raise InvalidIdError(f"an object's name must be valid Unicode text; this one "
                                     f"has a lone surrogate ({name[e.start]!r}) at index "
                                     f"{e.start}") from None
            a = self._hmac(raw)[:16]
            hex_id = (a + self._mac(a)).hex()
            if len(name) <= 256:  # (the memo's memory stays bounded: a few MiB at most)
                if len(_NAMED) >= _NAMED_MAX:
                    _NAMED.clear()
                _NAMED[memo] = hex_id
        return hex_id

    def new_unique(self) -> ObjectId:
        a = secrets.token_bytes(16)
        return ObjectId((a + self._mac(a)).hex())

    def from_string(self, hex_id: str) -> ObjectId:
        if type(hex_id) is not str or len(hex_id) != 64 or not _HEX.issuperset(hex_id):
            raise InvalidIdError(
                f"{hex_id!r:.80} is not an object id: ids are 64 lowercase hex digits")
        raw = bytes.fromhex(hex_id)
        if not hmac.compare_digest(self._mac(raw[:16]), raw[16:]):
            raise InvalidIdError(
                f"{hex_id} was not issued by namespace {self.namespace!r} (from another "
                "namespace or daemon, or altered)")
        return ObjectId(hex_id)
