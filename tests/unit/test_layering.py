"""client/ is the package users install: it must not depend on the daemon's parts."""

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"
FORBIDDEN = ("durable.broker", "durable.objectproc", "durable.supervisor", "zmq")


def test_client_never_imports_daemon_packages():
    offenders = []
    for path in CLIENT.rglob("*.py"):
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
