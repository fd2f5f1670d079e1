"""Small files written so that a crash leaves the old content or the new, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_durably", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, replace: bool = True, mode: int = 0o600) -> bool:
    """Write ``data`` to a temporary file, fsync it, then move it to ``path`` and fsync the
    directory. With ``replace=False`` an existing ``path`` wins (``os.link``: another
    process may have just created it); the answer says whether ours was put in place."""
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    placed = True
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            placed = False
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return placed
