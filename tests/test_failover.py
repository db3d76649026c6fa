"""Failover for each outcome class, against real simulators (and a port with nothing on it)."""

from __future__ import annotations

import asyncio

import pytest

from router import v2
from router.sim import Fault
from tests.conftest import RouterFactory, SimFactory, free_port, service, wait_for


async def _two_providers(
    start_sim: SimFactory,
    start_router: RouterFactory,
    *,
    upstream_timeout: float = 2.0,
    **sim_kwargs: float,
):
    first = await start_sim(**sim_kwargs)
    second = await start_sim()
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)], rate="1.00")],
        upstream_timeout=upstream_timeout,
    )
    key = await router.reseller("acme", "10")
    return first, second, router, key


async def _ledger_balances(router, key: str, expected_balance: str) -> None:
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    assert v2.format_money(reseller.balance) == expected_balance
    assert await router.store.ledger_sum(reseller.id) == reseller.balance
    answer = await router.call(key=key, action="balance")
    assert answer["balance"] == expected_balance


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.REFUSE, "refused"),
        (Fault.NO_FUNDS, "no_funds"),
        (Fault.WAF_403, "refused"),  # a firewall's page: turned away before the panel
    ],
)
async def test_refusals_fail_over(
    start_sim: SimFactory, start_router: RouterFactory, fault: Fault, reason: str
) -> None:
    first, second, router, key = await _two_providers(start_sim, start_router)
    first.set_fault(101, fault)

    answer = await router.call(key=key, action="add", service=1, link="x", quantity=1000)

    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placed" and order.provider == "second"
    assert len(first.received_actions("add")) == 1
    assert len(second.received_actions("add")) == 1
    attempts = await router.store.attempts(order.id)
    assert [(a.provider, a.outcome) for a in attempts] == [
        ("first", reason),
        ("second", "accepted"),
    ]
    assert attempts[1].upstream_order == order.upstream_order
    assert all(a.latency >= 0 for a in attempts)
    assert first.orders == {}  # nothing was created where it was refused
    assert (
        router.metric("smm_router_failovers_total", service="1", provider="first", reason=reason)
        == 1
    )
    await _ledger_balances(router, key, "9.00")


async def test_no_funds_benches_the_provider(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first, second, router, key = await _two_providers(start_sim, start_router)
    first.set_fault(101, Fault.NO_FUNDS)
    for _ in range(3):
        await router.call(key=key, action="add", service=1, link="x", quantity=100)
    assert len(first.received_actions("add")) == 1  # benched after its first refusal
    assert len(second.received_actions("add")) == 3


async def test_unreachable_fails_over(start_sim: SimFactory, start_router: RouterFactory) -> None:
    second = await start_sim()
    router = await start_router(
        {"down": f"http://127.0.0.1:{free_port()}/api/v2", "second": second.url},
        [service(1, [("down", 5), ("second", 101)])],
    )
    key = await router.reseller("acme", "10")
    answer = await router.call(key=key, action="add", service=1, link="x", quantity=100)
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placed" and order.provider == "second"
    attempts = await router.store.attempts(order.id)
    assert [a.outcome for a in attempts] == ["unreachable", "accepted"]


async def test_stopped_provider_is_unreachable(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first, _, router, key = await _two_providers(start_sim, start_router)
    await first.stop()
    answer = await router.call(key=key, action="add", service=1, link="x", quantity=100)
    order = await router.store.order(answer["order"])
    assert order is not None and order.provider == "second" and order.state == "placed"


@pytest.mark.parametrize("fault", [Fault.HTML_502, Fault.SLOW, Fault.RESET])
async def test_ambiguous_holds_and_never_resends(
    start_sim: SimFactory, start_router: RouterFactory, fault: Fault
) -> None:
    first, second, router, key = await _two_providers(
        start_sim, start_router, upstream_timeout=0.5, slow_seconds=1.5
    )
    first.set_fault(101, fault)

    answer = await router.call(key=key, action="add", service=1, link="x", quantity=1000)

    assert set(answer) == {"order"}
    assert second.received_actions("add") == []  # never re-sent anywhere
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "held" and order.provider == "first"
    attempts = await router.store.attempts(order.id)
    assert [(a.provider, a.outcome) for a in attempts] == [("first", "ambiguous")]
    status = await router.call(key=key, action="status", order=order.id)
    assert status["status"] == "Pending"
    await _ledger_balances(router, key, "9.00")  # funds stay reserved
    assert await router.store.count_held() == 1
    assert router.metric("smm_router_orders_total", service="1", state="held") == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [(Fault.DEEP_JSON, "unreadable (RecursionError"), (Fault.NOT_UTF8, "not UTF-8")],
)
async def test_an_unreadable_answer_holds_the_order(
    start_sim: SimFactory, start_router: RouterFactory, fault: Fault, error: str
) -> None:
    """The panel took the order and its answer cannot be read: held, never re-sent, and the
    reseller gets its order ID (not an error: its panel would send the order again)."""
    first, second, router, key = await _two_providers(start_sim, start_router)
    first.set_fault(101, fault)

    answer = await router.call(key=key, action="add", service=1, link="x", quantity=1000)

    assert set(answer) == {"order"}
    assert len(first.orders) == 1  # it exists upstream: only its answer was garbled
    assert len(first.received_actions("add")) == 1
    assert second.received_actions("add") == []
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "held" and order.provider == "first"
    [attempt] = await router.store.attempts(order.id)
    assert attempt.outcome == "ambiguous" and attempt.error is not None and error in attempt.error
    status = await router.call(key=key, action="status", order=order.id)
    assert status["status"] == "Pending"
    await _ledger_balances(router, key, "9.00")
    assert router.metric("smm_router_requests_total", action="add", outcome="ok") == 1


async def test_every_route_refused_refunds(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first, second, router, key = await _two_providers(start_sim, start_router)
    first.set_fault(None, Fault.REFUSE)
    second.set_fault(None, Fault.REFUSE)

    answer = await router.call(key=key, action="add", service=1, link="x", quantity=1000)

    assert answer == {"error": v2.UNAVAILABLE}
    await _ledger_balances(router, key, "10.00")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    kinds = [entry.kind for entry in await router.store.ledger(reseller.id)]
    assert kinds == ["topup", "charge", "refund"]
    counts = await router.store.count_orders(reseller.id)
    assert counts == {"failed": 1}


async def test_a_second_router_on_the_database_leaves_in_flight_orders_alone(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A rolling restart: the new router starts while the old one is still placing an order.
    It must not hold it; the old one finishes it."""
    slow = await start_sim(slow_seconds=0.5)
    slow.set_fault(101, Fault.SLOW)
    old = await start_router({"alpha": slow.url}, [service(1, [("alpha", 101)])])
    key = await old.reseller("acme", "10")
    adding = asyncio.create_task(
        old.call(key=key, action="add", service=1, link="x", quantity=1000)
    )
    await wait_for(lambda: slow.received_actions("add"), "the add to reach the provider")

    new = await start_router({"alpha": slow.url}, [service(1, [("alpha", 101)])])
    assert new.config.database == old.config.database
    assert await new.store.count_held() == 0

    answer = await adding
    order = await new.store.order(answer["order"])
    assert order is not None and order.state == "placed"
