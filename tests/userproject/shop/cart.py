"""A shopping cart: items, a checkout in one transaction, and an abandoned-cart alarm."""

from durable import DurableObject


class Cart(DurableObject):
    async def add(self, sku: str, qty: int = 1) -> dict:
        items = await self.state.storage.get("items") or {}
        items[sku] = items.get(sku, 0) + qty
        await self.state.storage.put("items", items)
        await self.state.storage.set_alarm(self.state_time() + 3_600_000)  # abandoned in 1 h
        return items

    def state_time(self) -> float:
        import time

        return time.time() * 1000

    async def checkout(self) -> int:
        async def buy(txn):
            items = await txn.get("items") or {}
            if not items:
                raise ValueError("the cart is empty")
            await txn.delete("items")
            orders = (await txn.get("orders") or 0) + 1
            await txn.put("orders", orders)
            return orders
        orders = await self.state.storage.transaction(buy)
        await self.state.storage.delete_alarm()
        return orders

    async def alarm(self, info) -> None:
        await self.state.storage.put("abandoned", True)
