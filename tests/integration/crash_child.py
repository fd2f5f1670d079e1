"""Child process for the crash tests: recover, dump state, then write until killed.

Protocol on stdout (one JSON object per line, each written with one ``write``):

* ``{"state": {obj: {key: value}}}`` once, after recovery;
* ``{"w": obj, "set": {key: value or null}, "clear": bool}`` before a write
  (the intent: what the object will look like if the write lands);
* ``{"a": obj}`` once that write is durable (acknowledged);
* ``{"t": event}`` from the storage engine's trace hook (fsync, apply_begin,
  apply_commit, truncate), so the parent can kill at those moments.

With ``--verify-only`` it dumps the state and exits.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading

import orjson

from durable.objectproc.storage import ObjectStorage, SlotStore

OBJECTS = [f"w{i}" for i in range(6)]
_lock = threading.Lock()


def emit(msg: dict) -> None:
    data = orjson.dumps(msg) + b"\n"
    with _lock:
        os.write(1, data)


async def writer(storage: ObjectStorage, name: str, run: int, rng: random.Random) -> None:
    state = await storage.list()
    n = 0
    while True:
        n += 1
        stamp = [run, n]
        op = rng.random()
        if op < 0.02:
            emit({"w": name, "set": {}, "clear": True})
            await storage.delete_all()
            state = {}
        elif op < 0.35:
            key = f"s{rng.randrange(8)}"
            emit({"w": name, "set": {key: stamp}, "clear": False})
            await storage.put(key, stamp)
            state[key] = stamp
        elif op < 0.6:
            group = {f"m{i}": stamp for i in range(5)}
            emit({"w": name, "set": group, "clear": False})
            await storage.put(group)
            state.update(group)
        elif op < 0.8:
            c = state.get("ta", [0, 0])[1] + 1
            change = {"ta": [run, c], "tb": [run, c]}
            emit({"w": name, "set": change, "clear": False})

            async def txn_fn(txn, change=change):
                seen = await txn.get(["ta", "tb"])
                assert seen.get("ta") == seen.get("tb"), seen  # the invariant holds inside, too
                await txn.put(change)

            await storage.transaction(txn_fn)
            state.update(change)
        else:
            key = rng.choice(sorted(state) or ["s0"])
            if key in ("ta", "tb") or key.startswith("m"):
                key = f"s{rng.randrange(8)}"
            emit({"w": name, "set": {key: None}, "clear": False})
            await storage.delete(key)
            state.pop(key, None)
        await storage.sync()
        emit({"a": name})


async def main(directory: str, run: int, verify_only: bool) -> None:
    # A checkpoint after every batch (checkpoint_wal_bytes=1): segments are deleted only
    # behind checkpoints, and the kills must land around those deletions too.
    slot = SlotStore(directory, 0, segment_bytes=4096, apply_min_records=10,
                     apply_max_delay=0.002, trace=lambda ev: emit({"t": ev}),
                     checkpoint_wal_bytes=1)
    inline = random.Random(-run)  # half the syncs commit on the loop thread, as a quiet object
    slot.commit_inline_when = lambda: inline.random() < 0.5  # process's do: both paths get killed
    storages = {name: ObjectStorage(slot, "CRASH", name) for name in OBJECTS}
    emit({"state": {name: await s.list() for name, s in storages.items()}})
    if verify_only:
        await slot.close()
        return
    rng = random.Random(run)
    async with asyncio.TaskGroup() as tg:
        for name, s in storages.items():
            tg.create_task(writer(s, name, run, rng))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), "--verify-only" in sys.argv))
