"""Reseller request IDs: a repeated `add` (`request_id` or `Idempotency-Key`) places nothing.

The real router against a real simulated provider over loopback: the simulator counts the
`add`s it got, the store shows the orders and the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from decimal import Decimal
from typing import Any

import pytest
import structlog

from router import v2
from router.api import IDEMPOTENCY_KEY
from router.app import DESK
from router.cli import order_report
from router.orders import placement
from router.sim import Fault, SimProvider
from router.store import NewOrder, Store
from router.store import database as store_module  # where Store.open reads its defaults
from tests.conftest import Router, RouterFactory, SimFactory, service, wait_for
from tests.test_accepted import QUICK_BUSY_TIMEOUT_MS, QUICK_RETRY, events, write_lock

ADD = {"action": "add", "service": 1, "link": "https://x.test/p", "quantity": 100}  # 1.00
Logs = list[MutableMapping[str, Any]]


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


@pytest.fixture
def logs() -> Iterator[Logs]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def waits(logs: Logs) -> list[int]:
    """The orders that repeats waited for, in turn (their `repeat_waits` lines)."""
    return [line["order_id"] for line in logs if line["event"] == "repeat_waits"]


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


@pytest.mark.parametrize(
    ("fault", "state"),
    [(None, "placed"), (Fault.HTML_502, "held")],  # held: Pending to its reseller, never lost
)
async def test_a_repeat_while_the_first_is_at_a_slow_upstream(
    world: tuple[SimProvider, Router], logs: Logs, fault: Fault | None, state: str
) -> None:
    """The repeat waits for the first's end, then answers what the first got: its order, placed
    upstream once."""
    sim, router = world
    key = router.keys["acme"]
    sim.set_fault(None, fault)
    sim.pause("add")
    first = asyncio.create_task(router.call(key=key, request_id="slow-1", **ADD))
    await wait_for(lambda: sim.received_actions("add"), "the first add at the upstream")
    repeat = asyncio.create_task(router.call(key=key, request_id="slow-1", **ADD))
    await wait_for(lambda: waits(logs), "the repeat waiting for the first")

    [order_id] = waits(logs)
    order = await router.store.order(order_id)
    assert order is not None and order.state == "placing"
    status = await router.call(key=key, action="status", order=order_id)
    assert status["status"] == v2.PENDING
    assert not repeat.done()  # the upstream holds the first: nothing to answer yet

    sim.resume("add")
    assert await first == {"order": order_id}
    assert await repeat == {"order": order_id}
    assert await router.call(key=key, request_id="slow-1", **ADD) == {"order": order_id}
    assert len(sim.received_actions("add")) == 1
    assert len(sim.orders) == (1 if fault is None else 0)
    assert await snapshot(router) == (v2.to_minor(Decimal(99)), 2, {state: 1})
    assert router.app[DESK]._placing == {}


@pytest.mark.parametrize(
    "repeated",
    [
        {},
        {"quantity": 5000},  # refused by validation now: the first's answer all the same
        {"service": 99},
    ],
)
async def test_a_repeat_while_every_route_refuses_the_first_gets_its_error(
    start_sim: SimFactory,
    start_router: RouterFactory,
    logs: Logs,
    repeated: dict[str, int],
) -> None:
    """The first ends `failed` (every route refused, refunded): its reseller was told
    `Service temporarily unavailable`, and so is a repeat that came while it was placed; no
    second order, no order ID that `status` would not know."""
    alpha, beta = await start_sim(), await start_sim()
    router = await start_router(
        {"alpha": alpha.url, "beta": beta.url},
        [service(1, [("alpha", 101), ("beta", 101)], rate="10.00", min=10, max=1000)],
        upstream_timeout=60,
    )
    key = await router.reseller("acme", "100")
    for sim in (alpha, beta):
        sim.set_fault(None, Fault.REFUSE)
    alpha.pause("add")
    first = asyncio.create_task(router.call(key=key, request_id="r-1", **ADD))
    await wait_for(lambda: alpha.received_actions("add"), "the first add at alpha")
    repeat = asyncio.create_task(router.call(key=key, request_id="r-1", **{**ADD, **repeated}))
    await wait_for(lambda: waits(logs), "the repeat waiting for the first")

    alpha.resume("add")
    assert await first == {"error": v2.UNAVAILABLE}
    assert await repeat == {"error": v2.UNAVAILABLE}
    assert [len(sim.received_actions("add")) for sim in (alpha, beta)] == [1, 1]
    balance, _, orders = await snapshot(router)
    assert (balance, orders) == (v2.to_minor(Decimal(100)), {"failed": 1})
    [order_id] = waits(logs)
    status = await router.call(key=key, action="status", order=order_id)
    assert status == {"error": v2.INCORRECT_ORDER}
    assert router.app[DESK]._placing == {}


async def test_a_repeat_that_hangs_up_while_waiting_leaves_the_placement_alone(
    world: tuple[SimProvider, Router], logs: Logs
) -> None:
    """A repeat whose reseller hangs up (its connection dropped; its handler cancelled) stops
    waiting; the first's placement goes on, answers, and leaves nothing behind."""
    sim, router = world
    key = router.keys["acme"]
    desk = router.app[DESK]
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    sim.pause("add")
    first = asyncio.create_task(router.call(key=key, request_id="drop-1", **ADD))
    await wait_for(lambda: sim.received_actions("add"), "the first add at the upstream")

    dropped = asyncio.create_task(router.call(key=key, request_id="drop-1", **ADD))
    await wait_for(lambda: len(waits(logs)) == 1, "the first repeat waiting")
    dropped.cancel()  # the client closes its connection
    with pytest.raises(asyncio.CancelledError):
        await dropped
    params = {**{name: str(value) for name, value in ADD.items()}, "request_id": "drop-1"}
    cancelled = asyncio.create_task(desk.add(reseller, params))  # as a cancelled handler's
    await wait_for(lambda: len(waits(logs)) == 2, "the second repeat waiting")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    [order_id, _] = waits(logs)
    assert list(desk._placing) == [order_id] and not first.done()
    sim.resume("add")
    assert await first == {"order": order_id}
    await wait_for(lambda: not desk._placing, "the placement's entry gone")
    order = await router.store.order(order_id)
    assert order is not None and order.state == "placed"
    assert len(sim.received_actions("add")) == 1 and len(sim.orders) == 1
    assert await snapshot(router) == (v2.to_minor(Decimal(99)), 2, {"placed": 1})


async def test_a_repeat_gives_up_on_a_placement_past_its_bound(
    start_sim: SimFactory, start_router: RouterFactory, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process's placement outlasts the longest a placement may take (its settle retried
    under a locked database): the repeat stops waiting and answers the order's ID, as the
    first's own answer will be."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", QUICK_BUSY_TIMEOUT_MS)
    monkeypatch.setattr(store_module, "SETTLE_RETRY", QUICK_RETRY)
    monkeypatch.setattr(placement, "PLACEMENT_SLACK_SECONDS", 0.0)  # the bound: one 2 s call
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url}, [service(1, [("alpha", 101)], rate="10.00", min=10, max=1000)]
    )
    key = await router.reseller("acme", "100")
    sim.pause("add")
    first = asyncio.create_task(router.call(key=key, request_id="long-1", **ADD))
    await wait_for(lambda: sim.received_actions("add"), "the first add at the upstream")
    repeat = asyncio.create_task(router.call(key=key, request_id="long-1", **ADD))
    await wait_for(lambda: waits(logs), "the repeat waiting for the first")
    [order_id] = waits(logs)
    with write_lock(router.config.database):
        sim.resume("add")
        await wait_for(lambda: events(logs, "write_retried"), "the settle retried")
        await wait_for(repeat.done, "the repeat answered at the bound, the lock still held")
        assert repeat.result() == {"order": order_id}
        order = await router.store.order(order_id)
        assert order is not None and order.state == "placing" and not first.done()
    assert await first == {"order": order_id}
    await wait_for(lambda: not router.app[DESK]._placing, "the placement's entry gone")
    assert len(sim.orders) == 1
    assert await snapshot(router) == (v2.to_minor(Decimal(99)), 2, {"placed": 1})


async def test_a_repeat_of_another_process_placement_reads_its_end(
    start_sim: SimFactory, start_router: RouterFactory, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another router on the database (or the CLI re-routing) is placing the first: nothing in
    this process knows its end, so the repeat reads the order again until it ended (failed:
    the first's error; placed: its ID), or until the longest its placement may take has passed:
    its ID then, as the order is held by then."""
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url},
        [service(1, [("alpha", 101)], rate="10.00", min=10, max=1000)],
        upstream_timeout=0.5,
    )
    key = await router.reseller("acme", "100")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    elsewhere = await Store.open(router.config.database)
    elsewhere.owner = "another-host:4242:1"  # its orders are alive: nobody here holds them
    try:

        async def placing_elsewhere(request_id: str) -> tuple[int, asyncio.Task[Any]]:
            """An order `elsewhere` is placing, and a repeat of it waiting here."""
            order_id = await elsewhere.reserve_order(
                NewOrder(
                    reseller.id,
                    1,
                    str(ADD["link"]),
                    100,
                    v2.to_minor(Decimal(1)),
                    {"link": str(ADD["link"]), "quantity": "100"},
                    "alpha",
                    101,
                    request_id=request_id,
                )
            )
            assert order_id is not None
            seen = len(waits(logs))
            repeat = asyncio.create_task(router.call(key=key, request_id=request_id, **ADD))
            await wait_for(lambda: len(waits(logs)) > seen, f"the repeat of {request_id} waiting")
            assert waits(logs)[-1] == order_id
            return order_id, repeat

        failed, repeat = await placing_elsewhere("else-1")
        await elsewhere.settle_order(failed, state="failed", attempts=[])
        assert await repeat == {"error": v2.UNAVAILABLE}

        placed, repeat = await placing_elsewhere("else-2")
        await elsewhere.settle_order(
            placed, state="placed", attempts=[], provider="alpha", upstream_order=4242
        )
        assert await repeat == {"order": placed}

        # Still placing at the bound (0.5 s of upstream timeout + the slack): its ID.
        monkeypatch.setattr(placement, "PLACEMENT_SLACK_SECONDS", 0.2)
        stuck, repeat = await placing_elsewhere("else-3")
        assert await repeat == {"order": stuck}
        order = await router.store.order(stuck)
        assert order is not None and order.state == "placing"  # the repeat changed nothing
        assert [line["placing_here"] for line in logs if line["event"] == "repeat_waits"] == [
            False
        ] * 3
    finally:
        await elsewhere.close()
    assert sim.received_actions("add") == []
    balance, _, orders = await snapshot(router)
    assert (balance, orders) == (
        v2.to_minor(Decimal(98)),
        {"failed": 1, "placed": 1, "placing": 1},
    )


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
