"""Objects the harness tests host (plain classes, as a user's project would have)."""

from __future__ import annotations

import asyncio

from durable import DurableObject, Response


class Account(DurableObject):
    async def deposit(self, amount: int) -> int:
        if amount <= 0:
            raise ValueError(f"a deposit is positive, got {amount}")
        balance = (await self.state.storage.get("balance") or 0) + amount
        await self.state.storage.put("balance", balance)
        return balance

    async def transfer_out(self, amount: int) -> int:
        async def move(txn):
            balance = await txn.get("balance") or 0
            if balance < amount:
                raise ValueError("insufficient funds")
            await txn.put("balance", balance - amount)
            await txn.put("last", amount)
            return balance - amount
        return await self.state.storage.transaction(move)

    async def stash(self, value) -> None:
        await self.state.storage.put("stash", value)

    async def remember(self, value) -> None:  # on the instance only: gone after an eviction
        self.memory = value

    async def recall(self):
        return getattr(self, "memory", None)

    async def write_later(self, delay: float) -> None:
        async def later():
            await asyncio.sleep(delay)
            await self.state.storage.put("later", True)
        self.state.wait_until(later())


class Flaky(DurableObject):
    """An alarm that fails ``fails`` times, then works."""

    async def arm(self, at_ms: float, fails: int) -> None:
        await self.state.storage.put("fails", fails)
        await self.state.storage.set_alarm(at_ms)

    async def alarm(self, info) -> None:
        runs = (await self.state.storage.get("runs") or []) + [info.retry_count]
        await self.state.storage.put("runs", runs)
        if len(runs) <= await self.state.storage.get("fails"):
            raise RuntimeError(f"failing run {len(runs)}")

    async def runs(self):
        return await self.state.storage.get("runs")


class Greeter(DurableObject):
    """Calls another object (env.ACCOUNT) after writing: behind the output gate."""

    async def fetch(self, request):
        await self.state.storage.put("greeted", True)
        balance = await self.env.ACCOUNT.get_by_name("shared").deposit(1)
        return Response(f"hello, balance {balance}")
