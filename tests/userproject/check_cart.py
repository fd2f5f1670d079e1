"""A user's tests of their object, with durable's pytest plugin (the durable_runtime fixture)."""

import pytest
from shop.cart import Cart

import durable


async def test_checkout(durable_runtime):
    rt = await durable_runtime({"CART": Cart})
    cart = rt.namespace("CART").get_by_name("ann")
    assert await cart.add("apple", 2) == {"apple": 2}
    assert await cart.checkout() == 1
    with pytest.raises(durable.ObjectError, match="empty"):
        await cart.checkout()


async def test_abandoned_carts(durable_runtime):
    rt = await durable_runtime({"CART": "shop.cart:Cart"})
    cart = rt.namespace("CART").get_by_name("bob")
    await cart.add("pear")
    await rt.advance(3601)
    assert (await rt.storage_of(cart))["abandoned"] is True
