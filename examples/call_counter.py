"""Call the counter's methods from a program: ``python -m durable.examples.call_counter``.

``client.namespace("COUNTER", Counter)`` gives stubs that a type checker sees
as ``Counter``: ``await room.increment(by=2)`` is checked against the method.
"""

import asyncio

import durable
from durable.examples.counter import Counter


async def main() -> None:
    async with durable.connect() as client:
        counters = client.namespace("COUNTER", Counter)
        room = counters.get_by_name("room-1")
        n: int = await room.increment(by=2)
        total: int = await room.value()
        print(f"room-1 is at {n} (read back: {total})")


if __name__ == "__main__":
    asyncio.run(main())
