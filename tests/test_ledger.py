"""The money: exact under concurrency, never below zero, always the sum of the ledger."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal

import pytest

from router import v2
from router.config import Limits
from router.store import NewOrder, StoreError
from tests.conftest import RouterFactory, SimFactory, service


async def test_200_concurrent_adds_for_50_orders_worth(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url},
        [service(1, [("alpha", 101)], rate="1.00")],
        limits=Limits(in_flight=200),  # all 200 at once: the ledger is under test, not limits
    )
    key = await router.reseller("acme", "50")

    answers = await asyncio.gather(
        *(
            router.call(key=key, action="add", service=1, link=f"l{i}", quantity=1000)
            for i in range(200)
        )
    )

    placed = [a for a in answers if "order" in a]
    refused = [a for a in answers if "error" in a]
    assert len(placed) == 50
    assert refused == [{"error": v2.NOT_ENOUGH_FUNDS}] * 150
    assert len({a["order"] for a in placed}) == 50
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    assert reseller.balance == 0
    assert await router.store.ledger_sum(reseller.id) == 0
    assert await router.store.count_orders(reseller.id) == {"placed": 50}
    assert len(sim.received_actions("add")) == 50
    assert await router.call(key=key, action="balance") == {"balance": "0.00", "currency": "USD"}


async def test_balance_cannot_go_below_zero_even_through_the_store(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router({"alpha": sim.url}, [service(1, [("alpha", 101)])])
    await router.reseller("acme", "1")
    with pytest.raises(StoreError):
        await router.store.adjust_balance(
            "acme", -v2.to_minor(Decimal("1.5")), kind="adjustment", note="too much"
        )
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None and reseller.balance == v2.to_minor(Decimal("1"))
    assert await router.store.ledger_sum(reseller.id) == reseller.balance


async def test_ledger_rows_are_append_only_and_refunds_happen_once(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router({"alpha": sim.url}, [service(1, [("alpha", 101)])])
    key = await router.reseller("acme", "5")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=1000))[
        "order"
    ]
    store = router.store
    with pytest.raises(sqlite3.IntegrityError):
        await store.write(lambda db: db.execute("UPDATE ledger SET amount = amount * 2"))

    def refund_twice(db: sqlite3.Connection) -> None:
        for _ in range(2):
            db.execute(
                "INSERT INTO ledger (reseller_id, order_id, kind, amount, created_at) "
                "SELECT reseller_id, id, 'refund', charge, 0 FROM orders WHERE id = ?",
                (order_id,),
            )

    with pytest.raises(sqlite3.IntegrityError):
        await store.write(refund_twice)
    reseller = await store.reseller_by_name("acme")
    assert reseller is not None
    assert reseller.balance == v2.to_minor(Decimal("4"))  # the failed transaction left nothing
    assert await store.ledger_sum(reseller.id) == reseller.balance


async def test_reserve_refuses_a_disabled_reseller(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router({"alpha": sim.url}, [service(1, [("alpha", 101)])])
    await router.reseller("acme", "5")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    await router.store.set_enabled("acme", False)
    order = NewOrder(reseller.id, 1, "x", 100, 100, {}, "alpha", 101)
    assert await router.store.reserve_order(order) is None
