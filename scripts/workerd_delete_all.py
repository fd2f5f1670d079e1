"""What workerd's deleteAll() does to a pending alarm, at two compatibility dates.

    npm install workerd          # in any folder; pass its node_modules/.bin/workerd below
    python scripts/workerd_delete_all.py path/to/workerd

Prints one JSON line per compatibility date: ``after`` is getAlarm() after deleteAll().
Measured on 2026-11-30 with workerd 2026-11-17: 2024-01-01 keeps the alarm, 2026-11-17
deletes it. durable does what the current date does (docs/objects.md, "Alarms").
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from workerd_config import workerd_config

HERE = Path(__file__).resolve().parent

def main() -> int:
    workerd = sys.argv[1] if len(sys.argv) > 1 else "workerd"
    for date in ("2024-01-01", "2026-11-17"):
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            root = Path(tmp)
            (root / "worker.js").write_text((HERE / "workerd" / "delete_all_alarm.js").read_text())
            (root / "disk").mkdir()
            (root / "config.capnp").write_text(workerd_config(
                disk=root / "disk", port=port, date=date, classes={"OBJ": "Obj"}))
            proc = subprocess.Popen([workerd, "serve", str(root / "config.capnp")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for _ in range(100):
                    try:
                        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=2).read()
                        break
                    except OSError:
                        time.sleep(0.1)
                else:
                    raise SystemExit(f"workerd ({workerd}) did not answer on port {port}")
                print(f'{{"compatibility_date": "{date}", "result": {body.decode()}}}')
            finally:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
