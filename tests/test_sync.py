"""Status sync against real simulators: life cycles, exact refunds exactly once, costs, pacing,
refills from SQLite, and a slow provider that delays only its own orders."""

from __future__ import annotations

import asyncio
import json
import math
import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from router import v2
from router.app import CLIENTS, ORDER_SYNC
from router.config import Sync
from router.sim import Fault, SimProvider
from router.store import NewOrder
from router.sync.orders import PAGE, OrderSync, refund_for
from tests.conftest import Router, RouterFactory, SimFactory, service, wait_for

STEP = 60.0  # seconds each deterministic round moves the sync's clock


class SteppedClock:
    """The sync's clock for deterministic rounds: it moves only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def open_router(
    start_router: RouterFactory, clock: SteppedClock, *args: Any, **kwargs: Any
) -> Router:
    router = await start_router(*args, **kwargs)
    syncer(router).clock = clock
    return router


def syncer(router: Router) -> OrderSync:
    return router.app[ORDER_SYNC]


async def sync_round(router: Router, clock: SteppedClock, seconds: float = STEP) -> None:
    """One status pass over every provider, `seconds` after the previous one."""
    clock.now += seconds
    await syncer(router).run_once()


async def balances_match(router: Router, name: str = "acme") -> int:
    reseller = await router.store.reseller_by_name(name)
    assert reseller is not None
    assert await router.store.ledger_sum(reseller.id) == reseller.balance
    return reseller.balance


async def refunds_of(router: Router, order_id: int) -> list[int]:
    return [e.amount for e in await router.store.order_ledger(order_id) if e.kind == "refund"]


def test_refund_rule() -> None:
    assert refund_for(v2.PARTIAL, 123827, 1003, 250) == 30864  # 30864.12 rounded down
    assert refund_for(v2.PARTIAL, 100, 3, 1) == 33  # never more than the exact share
    assert refund_for(v2.PARTIAL, 100, 10, 15) == 100  # remains clamped to the quantity
    assert refund_for(v2.PARTIAL, 100, 10, -4) == 0  # over-delivered
    assert refund_for(v2.CANCELED, 100, 10, 3) == 100  # Canceled: everything
    assert refund_for(v2.COMPLETED, 100, 10, 3) == 0
    assert refund_for(v2.IN_PROGRESS, 100, 10, 3) == 0


# --- life cycles and refunds ---------------------------------------------------------------------


async def test_full_life_completes_without_reseller_action(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=0, progress_seconds=100)  # Pending for 10 s
    clock = SteppedClock()
    router = await open_router(
        start_router, clock, {"alpha": sim.url}, [service(1, [("alpha", 101)], rate="0.90")]
    )
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=1000))[
        "order"
    ]
    upstream = (await router.store.order(order_id)).upstream_order  # type: ignore[union-attr]

    await sync_round(router, clock)
    assert (await router.call(key=key, action="status", order=order_id))["status"] == "Pending"
    sim.advance(50)
    await sync_round(router, clock)
    view = await router.call(key=key, action="status", order=order_id)
    assert view["status"] == "In progress"
    assert view["start_count"] == str(sim.orders[upstream].start_count)
    assert 0 < int(view["remains"]) < 1000
    sim.advance(100)
    await sync_round(router, clock)

    assert await router.call(key=key, action="status", order=order_id) == {
        "charge": "0.90",
        "start_count": str(sim.orders[upstream].start_count),
        "status": "Completed",
        "remains": "0",
        "currency": "USD",
    }
    history = await router.store.order_history(order_id)
    assert [(e.kind, e.status) for e in history] == [
        ("status", "In progress"),
        ("status", "Completed"),
    ]
    assert json.loads(history[-1].detail or "") == {
        "start_count": sim.orders[upstream].start_count,
        "remains": 0,
        "charge": "0.50",
        "currency": "USD",
    }
    state = await router.store.order_sync_state(order_id)
    assert state is not None
    assert (state.cost, state.upstream_charge, state.upstream_currency) == (50000, "0.50", "USD")
    assert [e.kind for e in await router.store.order_ledger(order_id)] == ["charge"]
    assert await balances_match(router) == v2.to_minor(Decimal("9.10"))
    assert (
        router.metric("smm_router_order_status_changes_total", provider="alpha", status="Completed")
        == 1
    )
    # Final: never asked about again.
    calls = len(sim.received_actions("status"))
    await sync_round(router, clock)
    assert len(sim.received_actions("status")) == calls


async def test_partial_refunds_to_the_exact_decimal(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=1)  # every order ends Partial with a quarter undelivered
    clock = SteppedClock()
    services = [
        service(1, [("alpha", 101)], rate="1.23457", dripfeed=True),
        service(2, [("alpha", 103)], type="Custom Comments", rate="12.34567", min=1),
    ]
    router = await open_router(start_router, clock, {"alpha": sim.url}, services)
    key = await router.reseller("acme", "10")
    plain = await router.call(key=key, action="add", service=1, link="x", quantity=1003)
    drip = await router.call(
        key=key, action="add", service=1, link="x", quantity=100, runs=3, interval=5
    )
    comments = "\n".join(f"comment {n}" for n in range(7)) + "\n\n"
    custom = await router.call(key=key, action="add", service=2, link="x", comments=comments)
    orders = {"plain": plain["order"], "drip": drip["order"], "custom": custom["order"]}
    assert {k: (await router.store.order(v)).quantity for k, v in orders.items()} == {  # type: ignore[union-attr]
        "plain": 1003,
        "drip": 300,
        "custom": 7,
    }
    await sync_round(router, clock)
    sim.advance(sim.progress_seconds)
    await sync_round(router, clock)

    # charge, remains (quantity // 4), refund = charge * remains / quantity rounded down
    expected = {
        "plain": ("1.23827", 250, "0.30864", "0.92963"),  # 123827 * 250 / 1003 = 30864.12
        "drip": ("0.37037", 75, "0.09259", "0.27778"),  # 37037 * 75 / 300 = 9259.25
        "custom": ("0.08642", 1, "0.01234", "0.07408"),  # 8642 * 1 / 7 = 1234.57
    }
    for name, (charge, remains, refund, final) in expected.items():
        order_id = orders[name]
        view = await router.call(key=key, action="status", order=order_id)
        assert (view["status"], view["remains"], view["charge"]) == ("Partial", str(remains), final)
        ledger = await router.store.order_ledger(order_id)
        assert [(e.kind, v2.format_money(e.amount)) for e in ledger] == [
            ("charge", f"-{charge}"),
            ("refund", refund),
        ], name
    spent = Decimal("1.23827") + Decimal("0.37037") + Decimal("0.08642")
    refunded = Decimal("0.30864") + Decimal("0.09259") + Decimal("0.01234")
    assert await balances_match(router) == v2.to_minor(Decimal(10) - spent + refunded)
    answer = await router.call(key=key, action="balance")
    assert answer["balance"] == v2.format_money(Decimal(10) - spent + refunded)
    assert router.metric("smm_router_refunds_total", provider="alpha", status="Partial") == 3


async def test_canceled_refunds_everything_and_partial_cancel_the_rest(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=0, progress_seconds=100)
    clock = SteppedClock()
    router = await open_router(
        start_router, clock, {"alpha": sim.url}, [service(1, [("alpha", 101)], rate="1.11111")]
    )
    key = await router.reseller("acme", "10")
    untouched = (await router.call(key=key, action="add", service=1, link="x", quantity=900))[
        "order"
    ]
    answer = await router.call(key=key, action="cancel", orders=str(untouched))
    assert answer == [{"order": untouched, "cancel": 1}]
    started = (await router.call(key=key, action="add", service=1, link="x", quantity=777))["order"]
    sim.advance(40)  # about a third delivered
    await router.call(key=key, action="cancel", orders=str(started))
    await sync_round(router, clock)

    view = await router.call(key=key, action="status", order=untouched)
    assert (view["status"], view["remains"], view["charge"]) == ("Canceled", "900", "0.00")
    # 1.11111 * 900 / 1000 = 0.999999, charged (and refunded) as 1.00000
    assert await refunds_of(router, untouched) == [100000]
    upstream = (await router.store.order(started)).upstream_order  # type: ignore[union-attr]
    remains = sim.orders[upstream].remains
    assert 0 < remains < 777
    charge = v2.order_charge(Decimal("1.11111"), 777)
    view = await router.call(key=key, action="status", order=started)
    assert (view["status"], view["remains"]) == ("Partial", str(remains))
    refund = charge * remains // 777
    assert await refunds_of(router, started) == [refund]
    assert view["charge"] == v2.format_money(charge - refund)
    assert [e.kind for e in await router.store.order_history(untouched)] == ["cancel", "status"]
    assert await balances_match(router) == v2.to_minor(Decimal(10)) - charge + refund


# --- exactly once --------------------------------------------------------------------------------


async def test_refund_once_over_many_rounds_and_stale_answers(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=1)
    clock = SteppedClock()
    router = await open_router(
        start_router, clock, {"alpha": sim.url}, [service(1, [("alpha", 101)])]
    )
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=1000))[
        "order"
    ]
    stale = await router.store.orders_due("alpha", due_by=clock.now + 10 * STEP)
    assert [o.id for o in stale] == [order_id]
    sim.advance(sim.progress_seconds)
    for _ in range(5):
        await sync_round(router, clock)
    # The same final answer applied again and again to the order as it was before it ended.
    client = router.app[CLIENTS]["alpha"]
    for _ in range(3):
        readings = await client.status_readings([stale[0].upstream_order], {})
        assert readings[stale[0].upstream_order].status is not None
        changes = await syncer(router).sync_page("alpha", stale, readings, checked_at=clock.now)
        assert changes == []
    assert await refunds_of(router, order_id) == [25000]  # 1.00 * 250 / 1000
    assert [e.status for e in await router.store.order_history(order_id)] == ["Partial"]
    assert await balances_match(router) == v2.to_minor(Decimal("9.25"))


async def test_refund_once_across_restarts(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=1)
    clock = SteppedClock()
    args = ({"alpha": sim.url}, [service(1, [("alpha", 101)])])
    router = await open_router(start_router, clock, *args)
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=1000))[
        "order"
    ]
    sim.advance(5)
    await sync_round(router, clock)
    assert (await router.store.order(order_id)).status == "In progress"  # type: ignore[union-attr]
    await router.client.close()

    sim.advance(sim.progress_seconds)
    for _ in range(2):  # a new process on the same database, twice
        router = await open_router(start_router, clock, *args)
        await sync_round(router, clock)
        await sync_round(router, clock)
        await router.client.close()

    router = await open_router(start_router, clock, *args)
    await sync_round(router, clock)
    assert await refunds_of(router, order_id) == [25000]
    view = await router.call(key=key, action="status", order=order_id)
    assert (view["status"], view["charge"], view["remains"]) == ("Partial", "0.75", "250")
    assert await balances_match(router) == v2.to_minor(Decimal("9.25"))


async def test_refund_once_under_concurrent_passes(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=2, progress_seconds=10)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"alpha": sim.url},
        [service(1, [("alpha", 101)], cancel=True)],
        sync=Sync(status_interval=0.2, calls_in_flight=4),
    )
    key = await router.reseller("acme", "100")
    ids = [
        (await router.call(key=key, action="add", service=1, link="x", quantity=100 + n))["order"]
        for n in range(30)
    ]
    await router.call(key=key, action="cancel", orders=",".join(map(str, ids[:5])))
    sim.advance(sim.progress_seconds)
    clock.now += STEP
    before = len(sim.received_actions("status"))

    await asyncio.gather(syncer(router).run_once(), syncer(router).run_once())

    assert len(sim.received_actions("status")) == before + 2  # both passes asked: a real race
    refunded = 0
    for order_id in ids:
        order = await router.store.order(order_id)
        assert order is not None and order.status in ("Completed", "Partial", "Canceled")
        refunds = await refunds_of(router, order_id)
        assert len(refunds) == (order.status != "Completed"), order
        assert [e.kind for e in await router.store.order_history(order_id)].count("status") == 1
        refunded += sum(refunds)
        assert order.refunded == sum(refunds)
    assert refunded > 0
    charges = sum(v2.order_charge(Decimal("1.00"), 100 + n) for n in range(30))
    assert await balances_match(router) == v2.to_minor(Decimal(100)) - charges + refunded


# --- scale and pacing ----------------------------------------------------------------------------


async def _bulk_orders(
    router: Router, sim: SimProvider, provider: str, count: int, reseller_id: int
) -> range:
    """`count` orders placed at `provider` without HTTP: created in the simulator, then in the
    store in one transaction."""
    upstream_ids = sim.create_orders(101, count, quantity=100)
    new = NewOrder(
        reseller_id=reseller_id,
        service=1,
        link="https://x.test/a",
        quantity=100,
        charge=100,
        params={"link": "https://x.test/a", "quantity": "100"},
        provider=provider,
        upstream_service=101,
    )
    return await router.store.create_placed_orders([(new, i) for i in upstream_ids])


def _status_calls(sim: SimProvider, since: int) -> list[list[int]]:
    return [
        [int(i) for i in r.params["orders"].split(",")]
        for r in sim.received_actions("status")[since:]
    ]


async def test_ten_thousand_orders_take_one_call_per_hundred(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    counts = {"alpha": 6050, "beta": 3950}
    sims = {
        name: await start_sim(balance=Decimal(100000), progress_seconds=36000, partial_every=0)
        for name in counts
    }
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {name: sim.url for name, sim in sims.items()},
        [service(1, [("alpha", 101), ("beta", 101)])],
    )
    await router.reseller("acme", "1000")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    for name, count in counts.items():
        ids = await _bulk_orders(router, sims[name], name, count, reseller.id)
        assert len(ids) == count and (await router.store.order(ids[-1])).provider == name  # type: ignore[union-attr]

    for _ in range(2):
        seen = {name: len(sim.received_actions("status")) for name, sim in sims.items()}
        await sync_round(router, clock)
        for name, sim in sims.items():
            calls = _status_calls(sim, seen[name])
            assert len(calls) == math.ceil(counts[name] / 100), name
            assert all(len(call) <= 100 for call in calls)
            assert sorted(i for call in calls for i in call) == sorted(sim.orders)
            assert await router.store.orders_due(name, due_by=clock.now) == []
    assert await balances_match(router) == v2.to_minor(Decimal(1000)) - 100 * sum(counts.values())


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        (Fault.DEEP_JSON, "unreadable (RecursionError"),
        (Fault.NOT_UTF8, "not UTF-8"),
        (Fault.WAF_403, "HTTP 403 (text/html"),
    ],
)
async def test_an_unusable_status_answer_marks_its_orders_and_the_pass_goes_on(
    start_sim: SimFactory, start_router: RouterFactory, fault: Fault, problem: str
) -> None:
    """Each order of a page whose answer cannot be used is left as it was with the problem
    recorded; the pass goes on to the provider's next page, and other providers sync."""
    bad = await start_sim(partial_every=0)
    good = await start_sim(partial_every=0)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"bad": bad.url, "good": good.url},
        [service(1, [("bad", 101), ("good", 101)])],
    )
    await router.reseller("acme", "10")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    on_bad = await _bulk_orders(router, bad, "bad", PAGE + 1, reseller.id)  # two pages
    [on_good] = await _bulk_orders(router, good, "good", 1, reseller.id)
    bad.advance(bad.progress_seconds)  # every order has completed upstream
    good.advance(good.progress_seconds)
    bad.set_answer_fault("status", fault)

    await sync_round(router, clock)

    assert len(bad.received_actions("status")) == 2  # the second page was asked too
    for order_id in on_bad:
        order = await router.store.order(order_id)
        assert order is not None and (order.state, order.status) == ("placed", "Pending")
        state = await router.store.order_sync_state(order_id)
        assert state is not None and problem in (state.sync_problem or "")
    history = await router.store.order_history(on_bad[-1])
    assert [e.kind for e in history] == ["unknown_status"]
    assert problem in (history[0].detail or "")
    good_order = await router.store.order(on_good)
    assert good_order is not None and good_order.status == "Completed"
    assert router.metric("smm_router_order_status_unreadable_total", provider="bad") == PAGE + 1

    bad.set_answer_fault("status", None)
    await sync_round(router, clock)
    for order_id in on_bad:
        order = await router.store.order(order_id)
        assert order is not None and order.status == "Completed"
        state = await router.store.order_sync_state(order_id)
        assert state is not None and state.sync_problem is None
    assert await balances_match(router) == v2.to_minor(Decimal(10)) - 100 * (PAGE + 2)


async def test_a_provider_in_trouble_leaves_its_orders_due(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """No usable answer because of the provider (a CDN's 502): nothing is recorded on its
    orders, they stay due for the next pass, and the rest of its pass waits for it; another
    provider syncs meanwhile."""
    bad = await start_sim(partial_every=0)
    good = await start_sim(partial_every=0)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"bad": bad.url, "good": good.url},
        [service(1, [("bad", 101), ("good", 101)])],
    )
    await router.reseller("acme", "10")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    on_bad = await _bulk_orders(router, bad, "bad", PAGE + 1, reseller.id)
    [on_good] = await _bulk_orders(router, good, "good", 1, reseller.id)
    bad.advance(bad.progress_seconds)
    good.advance(good.progress_seconds)
    bad.set_answer_fault("status", Fault.HTML_502)

    await sync_round(router, clock)

    assert 1 <= len(bad.received_actions("status")) <= 2  # both pages may be in flight at once
    due = await router.store.orders_due("bad", due_by=clock.now, limit=2 * PAGE)
    assert [order.id for order in due] == list(on_bad)
    assert all(order.sync_problem is None for order in due)
    assert (await router.store.order(on_good)).status == "Completed"  # type: ignore[union-attr]

    bad.set_answer_fault("status", None)
    await sync_round(router, clock)
    assert {(await router.store.order(i)).status for i in on_bad} == {"Completed"}  # type: ignore[union-attr]


async def test_old_orders_are_checked_less_often(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(progress_seconds=36000)
    clock = SteppedClock()
    pacing = Sync(status_interval=10, old_order_age=100, old_order_interval=1000)
    router = await open_router(
        start_router, clock, {"alpha": sim.url}, [service(1, [("alpha", 101)])], sync=pacing
    )
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=100))[
        "order"
    ]

    await sync_round(router, clock, 5)  # young: due again 10 s later
    state = await router.store.order_sync_state(order_id)
    assert state is not None and state.checked_at is not None
    assert state.next_check_at == state.checked_at + 10
    calls = len(sim.received_actions("status"))
    await sync_round(router, clock, 5)  # not due yet: no call at all
    assert len(sim.received_actions("status")) == calls
    await sync_round(router, clock, 200)  # old now: due again 1000 s later
    state = await router.store.order_sync_state(order_id)
    assert state is not None and state.checked_at is not None
    assert state.next_check_at == state.checked_at + 1000
    assert len(sim.received_actions("status")) == calls + 1
    await sync_round(router, clock, 500)
    assert len(sim.received_actions("status")) == calls + 1
    await sync_round(router, clock, 600)
    assert len(sim.received_actions("status")) == calls + 2


# --- answers the simulator never gives -----------------------------------------------------------


class CannedProvider:
    """A v2 provider whose `status` items the test writes; unknown IDs get `Incorrect order ID`."""

    def __init__(self) -> None:
        self.items: dict[str, object] = {}

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("action") != "status":
            return web.json_response({"error": "Incorrect request"})
        ids = str(form["orders"]).split(",")
        return web.json_response(
            {i: self.items.get(i, {"error": "Incorrect order ID"}) for i in ids}
        )


async def _canned(aiohttp_server: AiohttpServer) -> tuple[CannedProvider, str]:
    canned = CannedProvider()
    app = web.Application()
    app.router.add_post("/api/v2", canned.handle)
    server = await aiohttp_server(app)
    return canned, str(server.make_url("/api/v2"))


async def _canned_orders(router: Router, upstream_ids: list[int], charge: int) -> list[int]:
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    new = NewOrder(reseller.id, 1, "x", 100, charge, {"link": "x"}, "canned", 101)
    return list(await router.store.create_placed_orders([(new, i) for i in upstream_ids]))


def _item(status: str, remains: object = "0", charge: str = "0.50", currency: str = "USD") -> dict:
    return {
        "charge": charge,
        "start_count": "10",
        "status": status,
        "remains": remains,
        "currency": currency,
    }


async def test_unreadable_statuses_are_recorded_and_leave_the_order_active(
    aiohttp_server: AiohttpServer, start_router: RouterFactory
) -> None:
    canned, url = await _canned(aiohttp_server)
    clock = SteppedClock()
    router = await open_router(
        start_router, clock, {"canned": url}, [service(1, [("canned", 101)])]
    )
    await router.reseller("acme", "10")
    on_hold, unknown_id, no_remains = await _canned_orders(router, [1, 2, 3], 100000)
    canned.items["1"] = _item("On hold", "40")
    canned.items["3"] = _item("Partial", "Unknown")

    for _ in range(3):
        await sync_round(router, clock)
    for order_id, problem in (
        (on_hold, "On hold"),
        (unknown_id, "Incorrect order ID"),
        (no_remains, "Partial without a number of remains"),
    ):
        order = await router.store.order(order_id)
        assert order is not None and (order.state, order.status) == ("placed", "Pending")
        history = await router.store.order_history(order_id)
        assert [e.kind for e in history] == ["unknown_status"]  # recorded once, not each round
        assert problem in (history[0].detail or "")
        state = await router.store.order_sync_state(order_id)
        assert state is not None and problem in (state.sync_problem or "")
    assert await refunds_of(router, no_remains) == []
    assert len(await router.store.orders_due("canned", due_by=clock.now + STEP)) == 3
    assert router.metric("smm_router_order_status_unreadable_total", provider="canned") == 9

    canned.items["1"] = _item("Completed")
    canned.items["3"] = _item("Partial", "40")
    await sync_round(router, clock)
    assert (await router.store.order(on_hold)).status == "Completed"  # type: ignore[union-attr]
    assert await refunds_of(router, no_remains) == [40000]  # 1.00000 * 40 / 100
    state = await router.store.order_sync_state(on_hold)
    assert state is not None and state.sync_problem is None
    assert await balances_match(router) == v2.to_minor(Decimal(7)) + 40000


async def test_cost_in_another_currency_is_converted_half_up(
    aiohttp_server: AiohttpServer, start_router: RouterFactory
) -> None:
    canned, url = await _canned(aiohttp_server)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"canned": url},
        [service(1, [("canned", 101)])],
        fx={"EUR": Decimal("1.08")},
    )
    await router.reseller("acme", "10")
    [order_id] = await _canned_orders(router, [7], 100000)
    canned.items["7"] = _item("In progress", "50", charge="0.500375", currency="EUR")
    await sync_round(router, clock)
    state = await router.store.order_sync_state(order_id)
    assert state is not None
    # 0.500375 EUR * 1.08 = 0.540405 USD: 54040.5 minor units, half up
    assert (state.cost, state.upstream_charge, state.upstream_currency) == (
        54041,
        "0.500375",
        "EUR",
    )


# --- refills -------------------------------------------------------------------------------------


async def test_refill_status_is_answered_from_sqlite(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=0, progress_seconds=100)  # refills Pending 10 s
    clock = SteppedClock()
    router = await open_router(
        start_router, clock, {"alpha": sim.url}, [service(1, [("alpha", 101)])]
    )
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=1, link="x", quantity=100))[
        "order"
    ]
    sim.advance(sim.progress_seconds)
    await sync_round(router, clock)
    refill_id = int((await router.call(key=key, action="refill", order=order_id))["refill"])

    await sync_round(router, clock)
    assert await router.call(key=key, action="refill_status", refill=refill_id) == {
        "status": "Pending"
    }
    sim.advance(sim.progress_seconds / 2)
    await sync_round(router, clock)
    assert (await router.call(key=key, action="refill_status", refill=refill_id))[
        "status"
    ] == "In progress"
    sim.advance(sim.progress_seconds)
    calls = len(sim.received_actions("refill_status"))
    # The upstream has completed it, but the loop has not asked yet: the answer is the stored one.
    assert await router.call(key=key, action="refill_status", refills=f"{refill_id},999") == [
        {"refill": refill_id, "status": "In progress"},
        {"refill": 999, "status": {"error": "Refill not found"}},
    ]
    assert len(sim.received_actions("refill_status")) == calls
    await sync_round(router, clock)
    assert len(sim.received_actions("refill_status")) == calls + 1
    assert sim.received_actions("refill_status")[-1].params["refills"] == "1"
    assert await router.call(key=key, action="refill_status", refill=refill_id) == {
        "status": "Completed"
    }
    await sync_round(router, clock)  # Completed is final: not asked again
    assert len(sim.received_actions("refill_status")) == calls + 1


# --- the real loop -------------------------------------------------------------------------------


async def test_a_hanging_provider_delays_only_its_own_orders(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    fast = await start_sim(partial_every=0, progress_seconds=1)
    slow = await start_sim(partial_every=0, progress_seconds=1)
    slow.stall("status")
    router = await start_router(
        {"fast": fast.url, "slow": slow.url},
        [service(1, [("fast", 101)]), service(2, [("slow", 101)])],
        upstream_timeout=60,  # the hanging call stays in flight for the whole test
        background=True,
    )
    key = await router.reseller("acme", "10")
    on_fast = (await router.call(key=key, action="add", service=1, link="x", quantity=100))["order"]
    on_slow = (await router.call(key=key, action="add", service=2, link="x", quantity=100))["order"]
    fast.advance(2)
    slow.advance(2)

    async def fast_completed() -> bool:
        view = await router.call(key=key, action="status", order=on_fast)
        return bool(view["status"] == "Completed")

    await wait_for(lambda: slow.received_actions("status"), "the slow provider to be asked")
    await wait_for(fast_completed, "the fast provider's order to complete")
    assert len(fast.received_actions("status")) >= 1
    assert len(slow.received_actions("status")) == 1  # still waiting for its answer
    view = await router.call(key=key, action="status", order=on_slow)
    assert view["status"] == "Pending"
    state = await router.store.order_sync_state(on_slow)
    assert state is not None and state.checked_at is None


async def test_a_package_ending_partial_is_left_to_the_operator(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A package's remains count units of a size we do not know: no refund is guessed."""
    sim = await start_sim(partial_every=1)
    clock = SteppedClock()
    services = [service(3, [("alpha", 102)], type="Package", rate="2.50", min=1, max=1)]
    router = await open_router(start_router, clock, {"alpha": sim.url}, services)
    key = await router.reseller("acme", "10")
    order_id = (await router.call(key=key, action="add", service=3, link="x"))["order"]
    await sync_round(router, clock)
    sim.advance(sim.progress_seconds)
    await sync_round(router, clock)

    view = await router.call(key=key, action="status", order=order_id)
    assert view["status"] == "Partial" and view["charge"] == "2.50"
    assert view["remains"] == "250"  # of the simulator's 1000-unit package, as it said
    assert await refunds_of(router, order_id) == []
    assert await balances_match(router) == v2.to_minor(Decimal("7.50"))
    events = await router.store.order_history(order_id)
    assert any("operator decides" in (event.detail or "") for event in events)


async def test_a_package_shows_the_remains_its_upstream_said(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A package's remains are the upstream's figure, for the operator's refund decision (its
    charged quantity is 1: clamped to it, they read 0 or 1). Over-delivery still reads 0; a
    counted order's remains stay within its quantity, so its refund never exceeds its charge."""
    sim = await start_sim(partial_every=0)
    clock = SteppedClock()
    services = [
        service(3, [("alpha", 102)], type="Package", rate="2.50", min=1, max=1),
        service(1, [("alpha", 101)], rate="1.00", min=10, max=1000),
    ]
    router = await open_router(start_router, clock, {"alpha": sim.url}, services)
    key = await router.reseller("acme", "10")
    ends = {"partial package": 600, "over-delivered package": -40, "over-refunded": 5000}
    orders: dict[str, int] = {}
    for name, remains in ends.items():
        params = {"service": 3} if "package" in name else {"service": 1, "quantity": 100}
        orders[name] = (await router.call(key=key, action="add", link="x", **params))["order"]
        upstream = (await router.store.order(orders[name])).upstream_order  # type: ignore[union-attr]
        sim.end_with_remains(upstream, remains)
    sim.advance(sim.progress_seconds / 2)
    await sync_round(router, clock)
    in_progress = await router.call(key=key, action="status", order=orders["partial package"])
    sim.advance(sim.progress_seconds / 2)
    await sync_round(router, clock)

    views = {
        name: await router.call(key=key, action="status", order=order_id)
        for name, order_id in orders.items()
    }
    assert in_progress["status"] == "In progress" and int(in_progress["remains"]) > 600
    assert views["partial package"] | {"start_count": "-"} == {
        "charge": "2.50",  # no refund guessed: the operator decides
        "start_count": "-",
        "status": "Partial",
        "remains": "600",
        "currency": "USD",
    }
    stored = await router.store.order(orders["partial package"])
    assert stored is not None and stored.remains == 600 and stored.quantity == 1
    assert await refunds_of(router, orders["partial package"]) == []
    assert views["over-delivered package"]["status"] == "Completed"
    assert views["over-delivered package"]["remains"] == "0"
    # Partial with remains above its quantity: clamped, refunded its whole charge, no more.
    assert views["over-refunded"]["status"] == "Partial"
    assert views["over-refunded"]["remains"] == "100"
    assert await refunds_of(router, orders["over-refunded"]) == [v2.to_minor(Decimal("0.10"))]
    assert views["over-refunded"]["charge"] == "0.00"
    assert await balances_match(router) == v2.to_minor(Decimal("10") - 2 * Decimal("2.50"))
