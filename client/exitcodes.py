"""Exit statuses of durable's processes: what the supervisor (and systemd) do about each.

One table for every process, so that a child and the supervisor never
disagree about what a number means (sysexits.h names where they fit).
"""

from __future__ import annotations

__all__ = ["EXIT_CONFIG", "EXIT_STORAGE", "EXIT_CORRUPT", "EXIT_DISK_FULL", "EXIT_LEASE_LOST"]

#: EX_CONFIG: bad configuration; restarting will not help (the daemon halts).
EXIT_CONFIG = 78
#: EX_IOERR: storage cannot be opened, or the data dir is not what it should be (halts).
EXIT_STORAGE = 74
#: EX_DATAERR: this slot's files are damaged; the slot stays down as ``corrupt`` until
#: ``durable repair``, the other slots keep serving.
EXIT_CORRUPT = 65
#: EX_TEMPFAIL: the disk is full at start; the slot is restarted every few seconds.
EXIT_DISK_FULL = 75
#: EX_PROTOCOL: cluster mode, this host's lease on the slot ended (another host may serve it
#: now): the object process exits at once; the supervisor runs it again only if the host
#: holds the slot again.
EXIT_LEASE_LOST = 76
