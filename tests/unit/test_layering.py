"""client/ is the package users install: it must not depend on the daemon's parts."""

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"
FORBIDDEN = ("durable.broker", "durable.objectproc", "durable.supervisor", "zmq")


#: the one exception: ``python -m durable`` runs the daemon's CLI (an entry point, not library
#: code; it imports it inside a function and says so when the daemon is not installed)
ENTRY_POINTS = {CLIENT / "__main__.py"}


def test_client_never_imports_daemon_packages():
    offenders = []
    for path in CLIENT.rglob("*.py"):
        if path in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.startswith(FORBIDDEN[:3]) or (path.parts[-2] == "protocol" and n.startswith("zmq")):
                    offenders.append(f"{path.name}: {n}")
    assert offenders == []
    assert list(CLIENT.rglob("*.py")), "client/ has no modules: the check would pass vacuously"
