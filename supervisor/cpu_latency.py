"""``low_latency_idle``: ask the kernel to keep CPUs out of deep idle states while serving.

A call crosses five processes and threads that mostly sleep between messages.
On a VM whose idle CPUs halt (here: the ``haltpoll`` cpuidle driver with
``guest_halt_poll_ns = 0``), every wake-up pays for a halted virtual CPU being
resumed, and that, not Python, is most of a call's latency. Writing 0 to
``/dev/cpu_dma_latency`` (the PM QoS interface that tuned's latency profiles
use) makes cpuidle poll instead of halting, for as long as the file stays
open; the kernel drops the request when the file is closed, also when the
process dies. Measured with ``scripts/bench.py rpc --repeat 3`` with and
without ``--low-latency-idle``: no-op call p50 0.24–0.26 → 0.13–0.14 ms,
durable counter 0.46–0.49 → 0.29 ms. The cost: idle CPUs busy-poll (the
guest still counts them idle, but they use their host cores fully), so the
machine never rests. Hence off by default.
"""

from __future__ import annotations

import logging
import struct
from typing import BinaryIO

__all__ = ["hold", "PATH"]

PATH = "/dev/cpu_dma_latency"
log = logging.getLogger("durable.supervisor")


def hold(path: str = PATH) -> BinaryIO | None:
    """Request 0 µs wake-up latency; keep the returned file open for as long as it should last.

    Returns ``None`` after a warning if the request cannot be made (no such
    device, or not allowed): the daemon serves anyway, only slower.
    """
    try:
        f = open(path, "wb", buffering=0)  # noqa: SIM115 (held open on purpose)
    except OSError as e:
        log.warning("low_latency_idle: cannot open %s (%s); serving without it. It needs root, "
                    "or write access to that device (e.g. a udev rule).", path, e.strerror or e)
        return None
    try:
        f.write(struct.pack("i", 0))
    except OSError as e:
        f.close()
        log.warning("low_latency_idle: writing to %s failed (%s); serving without it.", path,
                    e.strerror or e)
        return None
    log.info("low_latency_idle: CPUs poll instead of halting while the daemon serves (%s = 0)", path)
    return f
