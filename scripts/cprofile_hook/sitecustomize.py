"""`bench.py calls`: cProfile in an object process's main thread, switched by a signal.

Python imports this module at start when its folder is first on PYTHONPATH, which only
`bench.py calls` arranges, for the daemon it starts. It acts only in an object process
(``-m durable.objectproc``) and only with ``DURABLE_BENCH_CPROFILE`` set (a folder): each
SIGRTMIN+1 switches the profiler on, the next switches it off and writes
``op-<slot>-<n>.prof`` there. Nothing of it runs in a daemon started any other way. (In the
daemon it starts, it stands in for any other ``sitecustomize`` of the Python, e.g. Debian's.)
"""

import os

_DIR = os.environ.get("DURABLE_BENCH_CPROFILE")
if _DIR:
    with open("/proc/self/cmdline", "rb") as f:
        _cmd = f.read().split(b"\0")
    if b"durable.objectproc" in _cmd:
        import cProfile
        import signal

        _slot = _cmd[_cmd.index(b"--slot") + 1].decode() if b"--slot" in _cmd else "x"
        _state: dict = {"profile": None, "n": 0}

        def _switch(*_: object) -> None:
            profile = _state["profile"]
            if profile is None:
                _state["profile"] = profile = cProfile.Profile()
                profile.enable()
                return
            profile.disable()
            _state["profile"] = None
            _state["n"] += 1
            path = os.path.join(_DIR, f"op-{_slot}-{_state['n']}.prof")
            profile.dump_stats(path + ".part")
            os.replace(path + ".part", path)  # (whole when it appears)

        signal.signal(signal.SIGRTMIN + 1, _switch)
