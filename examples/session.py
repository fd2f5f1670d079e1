"""A session that ends by itself after a spell of inactivity: an alarm deletes it.

    await stub.touch({"user": "ann"}, ttl=30) -> dict   (each use pushes the end back)
    await stub.get() -> dict | None                     (None once it has ended)
    await stub.end()                                    (at once)

Every ``touch`` moves the one alarm an object has; when it fires, ``alarm``
deletes the session's storage and the alarm with it (``delete_all``). Alarms
are durable: a session still ends on time after a restart of the daemon.
"""

import time

from durable import DurableObject


class Session(DurableObject):
    async def touch(self, data: dict | None = None, ttl: float = 30.0) -> dict:
        now = time.time()
        session = await self.state.storage.get("session") or {"created": now}
        session.update(data or {})
        session["seen"] = now
        await self.state.storage.put("session", session)
        await self.state.storage.set_alarm((now + ttl) * 1000)  # epoch milliseconds
        return session

    async def get(self) -> dict | None:
        return await self.state.storage.get("session")

    async def expires_at(self) -> float | None:
        due = await self.state.storage.get_alarm()
        return None if due is None else due / 1000

    async def end(self) -> None:
        await self.state.storage.delete_all()  # the data and the alarm

    async def alarm(self, info) -> None:
        await self.state.storage.delete_all()
