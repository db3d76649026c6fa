"""Reseller request IDs: a repeated `add` (`request_id` or `Idempotency-Key`) places nothing.

The real router against a real simulated provider over loopback: the simulator counts the
`add`s it got, the store shows the orders and the ledger.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
import structlog

from router import v2
from router.api import IDEMPOTENCY_KEY
from router.cli import order_report
from router.sim import Fault, SimProvider
from tests.conftest import Router, RouterFactory, SimFactory, service, wait_for

ADD = {"action": "add", "service": 1, "link": "https://x.test/p", "quantity": 100}  # 1.00


@pytest.fixture
async def world(start_sim: SimFactory, start_router: RouterFactory) -> tuple[SimProvider, Router]:
    sim = await start_sim(progress_seconds=100)
    router = await start_router(
        {"alpha": sim.url},
        [service(1, [("alpha", 101)], rate="10.00", min=10, max=1000)],
        upstream_timeout=60,  # a paused `add` stays at the upstream as long as a test needs
    )
    await router.reseller("acme", "100")
    return sim, router


async def snapshot(router: Router, name: str = "acme") -> tuple[Any, ...]:
    """What an `add` may change: the balance, the ledger, the orders."""
    reseller = await router.store.reseller_by_name(name)
    assert reseller is not None
    assert await router.store.ledger_sum(reseller.id) == reseller.balance
    return reseller.balance, len(await router.store.ledger(reseller.id)), await orders(router)


async def orders(router: Router, name: str = "acme") -> dict[str, int]:
    reseller = await router.store.reseller_by_name(name)
    assert reseller is not None
    return await router.store.count_orders(reseller.id)


async def test_concurrent_duplicates_make_one_order(world: tuple[SimProvider, Router]) -> None:
    sim, router = world
    key = router.keys["acme"]
    answers = await asyncio.gather(
        *(router.call(key=key, request_id="order-77", **ADD) for _ in range(20))
    )
    [order_id] = {answer["order"] for answer in answers}
    assert all(answer == {"order": order_id} for answer in answers)
    assert len(sim.received_actions("add")) == 1
    assert await snapshot(router) == (
        v2.to_minor(Decimal(99)),
        2,
        {"placed": 1},
    )  # topup + one charge
    order = await router.store.order(order_id)
    assert order is not None and order.request_id == "order-77" and order.state == "placed"


async def test_a_repeat_while_the_first_is_at_a_slow_upstream(
    world: tuple[SimProvider, Router],
) -> None:
    sim, router = world
    key = router.keys["acme"]
    sim.pause("add")
    first = asyncio.create_task(router.call(key=key, request_id="slow-1", **ADD))
    await wait_for(lambda: sim.received_actions("add"), "the first add at the upstream")

    repeat = await router.call(key=key, request_id="slow-1", **ADD)
    order_id = repeat["order"]
    assert not first.done()  # answered at once, while the first is still being placed
    order = await router.store.order(order_id)
    assert order is not None and order.state == "placing"
    status = await router.call(key=key, action="status", order=order_id)
    assert status["status"] == v2.PENDING

    sim.resume("add")
    assert await first == {"order": order_id}
    assert await router.call(key=key, request_id="slow-1", **ADD) == {"order": order_id}
    assert len(sim.received_actions("add")) == 1
    assert await snapshot(router) == (v2.to_minor(Decimal(99)), 2, {"placed": 1})


async def test_two_resellers_with_one_id_get_two_orders(world: tuple[SimProvider, Router]) -> None:
    sim, router = world
    other = await router.reseller("other", "100")
    mine = await router.call(key=router.keys["acme"], request_id="same", **ADD)
    theirs = await router.call(key=other, request_id="same", **ADD)
    assert mine["order"] != theirs["order"]
    assert len(sim.received_actions("add")) == 2
    assert await orders(router, "acme") == {"placed": 1}
    assert await orders(router, "other") == {"placed": 1}
    # Each one's repeat is its own order.
    assert await router.call(key=other, request_id="same", **ADD) == theirs
    assert len(sim.received_actions("add")) == 2


async def test_without_a_request_id_every_add_places(world: tuple[SimProvider, Router]) -> None:
    sim, router = world
    key = router.keys["acme"]
    first = await router.call(key=key, **ADD)
    again = await router.call(key=key, request_id="", **ADD)  # empty: none sent
    assert first != again
    assert len(sim.received_actions("add")) == 2


async def test_the_idempotency_key_header(world: tuple[SimProvider, Router]) -> None:
    sim, router = world
    key = router.keys["acme"]
    fields = {"key": key, **{name: str(value) for name, value in ADD.items()}}

    async def post(headers: dict[str, str], **extra: str) -> Any:
        response = await router.client.post("/api/v2", data={**fields, **extra}, headers=headers)
        assert response.status == 200 and response.content_type == "application/json"
        return await response.json()

    first = await post({IDEMPOTENCY_KEY: "hdr-1"})
    assert set(first) == {"order"}
    assert await post({IDEMPOTENCY_KEY: "hdr-1"}) == first
    assert await post({}, request_id="hdr-1") == first  # the header and the parameter: one ID
    assert await post({IDEMPOTENCY_KEY: "hdr-1"}, request_id="hdr-1") == first
    response = await router.client.get("/api/v2", params=fields, headers={IDEMPOTENCY_KEY: "hdr-1"})
    assert await response.json() == first
    order = await router.store.order(first["order"])
    assert order is not None and order.request_id == "hdr-1"
    assert len(sim.received_actions("add")) == 1

    before = await snapshot(router)
    # Two different IDs in one request: refused, nothing placed (either could be the wrong one).
    assert await post({IDEMPOTENCY_KEY: "hdr-2"}, request_id="hdr-3") == {
        "error": v2.INCORRECT_REQUEST
    }
    assert await post({IDEMPOTENCY_KEY: "hdr-1"}, request_id="hdr-9") == {
        "error": v2.INCORRECT_REQUEST
    }
    assert await snapshot(router) == before
    assert len(sim.received_actions("add")) == 1
    # Another action ignores the header.
    balance = await router.client.post(
        "/api/v2",
        data={"key": key, "action": "balance", "request_id": "x"},
        headers={IDEMPOTENCY_KEY: "y"},
    )
    assert set(await balance.json()) == {"balance", "currency"}


@pytest.mark.parametrize(
    "request_id",
    [
        "x" * (v2.MAX_REQUEST_ID_LENGTH + 1),
        "has space",
        "tab\there",
        "nul\x00",
        "bell\x07",
        "caf\u00e9",
        "\u202eevil",
        "emoji\U0001f600",
    ],
)
@pytest.mark.parametrize("encoding", ["form", "json", "get"])
async def test_a_malformed_request_id_changes_nothing(
    world: tuple[SimProvider, Router], request_id: str, encoding: str
) -> None:
    sim, router = world
    before = await snapshot(router)
    answer = await router.call(encoding, key=router.keys["acme"], request_id=request_id, **ADD)
    assert answer == {"error": v2.INCORRECT_REQUEST}
    assert await snapshot(router) == before
    assert sim.received_actions("add") == []


@pytest.mark.parametrize("header", ["x" * (v2.MAX_REQUEST_ID_LENGTH + 1), "has space"])
async def test_a_malformed_idempotency_key_changes_nothing(
    world: tuple[SimProvider, Router], header: str
) -> None:
    sim, router = world
    before = await snapshot(router)
    response = await router.client.post(
        "/api/v2",
        data={"key": router.keys["acme"], **{k: str(v) for k, v in ADD.items()}},
        headers={IDEMPOTENCY_KEY: header},
    )
    assert await response.json() == {"error": v2.INCORRECT_REQUEST}
    assert await snapshot(router) == before
    assert sim.received_actions("add") == []


async def test_the_longest_request_id(world: tuple[SimProvider, Router]) -> None:
    _, router = world
    longest = "".join(chr(33 + i % 94) for i in range(v2.MAX_REQUEST_ID_LENGTH))  # ! to ~
    answer = await router.call("json", key=router.keys["acme"], request_id=longest, **ADD)
    order = await router.store.order(answer["order"])
    assert order is not None and order.request_id == longest


async def test_a_repeat_of_a_failed_add_gets_its_error_again(
    world: tuple[SimProvider, Router],
) -> None:
    """No route took the first: its reseller was told `Service temporarily unavailable` and
    never saw an order ID. A repeat is told the same (never an ID of an order that does not
    exist for it), sends nothing and charges nothing; a new ID places a new order."""
    sim, router = world
    key = router.keys["acme"]
    sim.set_fault(None, Fault.REFUSE)
    assert await router.call(key=key, request_id="f-1", **ADD) == {"error": v2.UNAVAILABLE}
    before = await snapshot(router)
    assert before[0] == v2.to_minor(Decimal(100)) and before[2] == {"failed": 1}
    sim.set_fault(None, None)  # the upstream would take it now: still the first's answer
    assert await router.call(key=key, request_id="f-1", **ADD) == {"error": v2.UNAVAILABLE}
    assert await snapshot(router) == before
    assert len(sim.received_actions("add")) == 1
    placed = await router.call(key=key, request_id="f-2", **ADD)
    assert set(placed) == {"order"}
    assert len(sim.received_actions("add")) == 2


async def test_a_repeat_of_a_held_add_is_its_order(world: tuple[SimProvider, Router]) -> None:
    sim, router = world
    key = router.keys["acme"]
    sim.set_fault(None, Fault.HTML_502)  # ambiguous: the order is held, never re-sent
    first = await router.call(key=key, request_id="h-1", **ADD)
    sim.set_fault(None, None)
    assert await router.call(key=key, request_id="h-1", **ADD) == first
    assert len(sim.received_actions("add")) == 1
    assert await snapshot(router) == (v2.to_minor(Decimal(99)), 2, {"held": 1})


async def test_a_repeat_is_its_order_even_when_the_add_would_be_refused_now(
    world: tuple[SimProvider, Router],
) -> None:
    """The reseller's panel must not take a placed order for a refused one: a repeat whose
    add would now fail (too large, a service gone, funds spent) still answers its order."""
    sim, router = world
    key = router.keys["acme"]
    first = await router.call(key=key, request_id="p-1", **ADD)
    assert await router.call(key=key, request_id="p-1", **{**ADD, "quantity": 5000}) == first
    assert await router.call(key=key, request_id="p-1", **{**ADD, "service": 99}) == first
    await router.store.adjust_balance(
        "acme", -v2.to_minor(Decimal(99)), kind="adjustment", note="spent"
    )
    assert await router.call(key=key, request_id="p-1", **ADD) == first
    assert await router.call(key=key, request_id="p-2", **ADD) == {"error": v2.NOT_ENOUGH_FUNDS}
    assert len(sim.received_actions("add")) == 1


async def test_the_request_id_in_the_log_line_and_orders_show(
    world: tuple[SimProvider, Router],
) -> None:
    _, router = world
    key = router.keys["acme"]
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        first = await router.call(key=key, request_id="log-1", **ADD)
        await router.call(key=key, request_id="log-1", **ADD)
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert [line["reseller_request_id"] for line in lines] == ["log-1", "log-1"]
    assert all(line["request_id"] != "log-1" for line in lines)  # the line's own ID stays
    assert [line.get("repeated_request") for line in lines] == [None, True]
    assert [line["order_id"] for line in lines] == [first["order"]] * 2

    report = await order_report(router.store, first["order"])
    assert report["order"]["request_id"] == "log-1"
    plain = await router.call(key=key, **ADD)
    assert (await order_report(router.store, plain["order"]))["order"]["request_id"] is None
