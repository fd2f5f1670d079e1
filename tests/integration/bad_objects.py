"""A module whose import fails inside object processes only (the supervisor's own check passes)."""

import __main__

if getattr(getattr(__main__, "__spec__", None), "name", "") == "durable.objectproc.__main__":
    raise RuntimeError("this module refuses to load in an object process")

from durable import DurableObject  # noqa: E402


class Refuses(DurableObject):
    pass
