"""Refill and cancel of many orders: multi-order calls grouped by provider, at most 100 IDs each,
and an order's open refill answered again instead of asked twice.

The real router against real simulated providers over loopback; the simulators count the calls.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import structlog

from router import v2
from router.app import DESK, ORDER_SYNC
from router.sim import REFILL_UNAVAILABLE, Fault, SimProvider
from router.store import NewOrder, Reseller
from tests.conftest import Router, RouterFactory, SimFactory, service, wait_for

PROGRESS = 100.0  # seconds an order (or a refill) takes at the simulator


async def start(
    start_sim: SimFactory, start_router: RouterFactory, names: tuple[str, ...] = ("alpha",)
) -> tuple[dict[str, SimProvider], Router, Reseller]:
    sims = {
        name: await start_sim(balance=Decimal(10**6), progress_seconds=PROGRESS, partial_every=0)
        for name in names
    }
    router = await start_router(
        {name: sim.url for name, sim in sims.items()},
        [service(number, [(name, 101)]) for number, name in enumerate(names, start=1)],
        upstream_timeout=60,  # a paused call stays in flight as long as a test needs
    )
    await router.reseller("acme", "10000")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    return sims, router, reseller


async def placed(router: Router, sim: SimProvider, provider: str, count: int) -> list[int]:
    """`count` orders placed at `provider` (service 1 of `start`'s for alpha, 2 for beta...)
    without HTTP: made in the simulator, then in the store."""
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    service_id = next(
        s.id for s in router.config.services.values() if s.route[0].provider == provider
    )
    new = NewOrder(reseller.id, service_id, "https://x.test/a", 100, 100, {}, provider, 101)
    upstream_ids = sim.create_orders(101, count, quantity=100)
    return list(await router.store.create_placed_orders([(new, i) for i in upstream_ids]))


def sent_ids(sim: SimProvider, action: str, since: int = 0) -> list[list[int]]:
    """The upstream order IDs of each `action` call the simulator got, call by call."""
    return [
        [int(i) for i in (r.params.get("orders") or r.params["order"]).split(",")]
        for r in sim.received_actions(action)[since:]
    ]


def alpha_id(sim: SimProvider, index: int) -> int:
    """The simulator's ID of the `index`-th order it made."""
    return sorted(sim.orders)[index]


async def test_a_refill_of_100_orders_on_one_provider_is_one_call(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sims, router, _ = await start(start_sim, start_router)
    alpha = sims["alpha"]
    ids = await placed(router, alpha, "alpha", 100)
    alpha.advance(PROGRESS)  # completed: refills are allowed
    key = router.keys["acme"]
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, ids)))
    assert [item["order"] for item in answer] == ids
    refills = [item["refill"] for item in answer]
    assert all(type(r) is int for r in refills) and len(set(refills)) == 100
    assert len(sent_ids(alpha, "refill")) == 1  # ONE upstream call...
    assert sorted(sent_ids(alpha, "refill")[0]) == sorted(o.id for o in alpha.orders.values())
    assert len(alpha.refills) == 100  # ...that made all 100 refills
    statuses = await router.call(
        key=key, action="refill_status", refills=",".join(map(str, refills))
    )
    assert {s["status"] for s in statuses} == {v2.PENDING}


async def test_150_orders_are_two_calls_each_way(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """More than 100 orders at once (the desk's own callers are not bound by the API's 100):
    batches of at most 100 upstream IDs."""
    sims, router, reseller = await start(start_sim, start_router)
    alpha = sims["alpha"]
    desk = router.app[DESK]
    done = await placed(router, alpha, "alpha", 150)
    alpha.advance(PROGRESS)
    refills = await desk.refill(reseller, done)
    assert all(isinstance(refills[i], int) for i in done)
    assert [len(call) for call in sent_ids(alpha, "refill")] == [100, 50]

    running = await placed(router, alpha, "alpha", 150)
    cancels = await desk.cancel(reseller, running)
    assert cancels == dict.fromkeys(running, None)
    assert sorted(len(call) for call in sent_ids(alpha, "cancel")) == [50, 100]
    assert all(
        alpha.orders[i].status == v2.CANCELED for call in sent_ids(alpha, "cancel") for i in call
    )


async def test_mixed_providers_are_grouped_by_provider(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sims, router, _ = await start(start_sim, start_router, ("alpha", "beta"))
    alpha, beta = sims["alpha"], sims["beta"]
    on_alpha = await placed(router, alpha, "alpha", 3)
    on_beta = await placed(router, beta, "beta", 4)
    mixed = [on_alpha[0], on_beta[0], on_alpha[1], on_beta[1], on_beta[2], on_alpha[2], on_beta[3]]
    alpha.advance(PROGRESS)
    beta.advance(PROGRESS)
    key = router.keys["acme"]
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, mixed)))
    assert [item["order"] for item in answer] == mixed
    assert all(type(item["refill"]) is int for item in answer)
    assert [sorted(call) for call in sent_ids(alpha, "refill")] == [sorted(alpha.orders)]
    assert [sorted(call) for call in sent_ids(beta, "refill")] == [sorted(beta.orders)]

    more = await placed(router, alpha, "alpha", 2) + await placed(router, beta, "beta", 2)
    answer = await router.call(key=key, action="cancel", orders=",".join(map(str, more)))
    assert answer == [{"order": i, "cancel": 1} for i in more]
    assert [len(call) for call in sent_ids(alpha, "cancel")] == [2]
    assert [len(call) for call in sent_ids(beta, "cancel")] == [2]


async def test_a_repeated_refill_while_open_answers_the_same_refill(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sims, router, _ = await start(start_sim, start_router)
    alpha = sims["alpha"]
    first, second = await placed(router, alpha, "alpha", 2)
    alpha.advance(PROGRESS)
    key = router.keys["acme"]
    refill = (await router.call(key=key, action="refill", order=first))["refill"]
    assert sent_ids(alpha, "refill") == [[alpha_id(alpha, 0)]]

    # Pending: the same refill, nothing sent.
    assert await router.call(key=key, action="refill", order=first) == {"refill": refill}
    # In a list with an order that has none open: only that one is sent.
    answer = await router.call(key=key, action="refill", orders=f"{first},{second}")
    assert answer[0] == {"order": first, "refill": int(refill)}
    assert sent_ids(alpha, "refill", since=1) == [[alpha_id(alpha, 1)]]
    # In progress (the refill loop read it): still the same one.
    alpha.advance(PROGRESS / 2)
    await router.app[ORDER_SYNC].run_once()
    assert await router.call(key=key, action="refill_status", refill=refill) == {
        "status": v2.IN_PROGRESS
    }
    assert await router.call(key=key, action="refill", order=first) == {"refill": refill}
    assert len(sent_ids(alpha, "refill")) == 2
    # Completed: a new refill may be asked for.
    alpha.advance(PROGRESS)
    await router.app[ORDER_SYNC].run_once()
    again = await router.call(key=key, action="refill", order=first)
    assert again["refill"] != refill
    assert len(sent_ids(alpha, "refill")) == 3


async def test_concurrent_refills_of_one_order_make_one_upstream_refill(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sims, router, _ = await start(start_sim, start_router)
    alpha = sims["alpha"]
    [order_id] = await placed(router, alpha, "alpha", 1)
    alpha.advance(PROGRESS)
    key = router.keys["acme"]
    alpha.pause("refill")
    first = asyncio.create_task(router.call(key=key, action="refill", order=order_id))
    await wait_for(lambda: alpha.received_actions("refill"), "the first refill upstream")
    with structlog.testing.capture_logs() as logs:
        second = asyncio.create_task(router.call(key=key, action="refill", orders=str(order_id)))
        third = asyncio.create_task(router.call(key=key, action="refill", order=order_id))
        await wait_for(
            lambda: (
                [e["orders"] for e in logs if e["event"] == "refill_joins_another_request"]
                == [[order_id]] * 2
            ),
            "the later two waiting for the first",
        )
    alpha.resume("refill")
    refill = (await first)["refill"]
    assert await second == [{"order": order_id, "refill": int(refill)}]
    assert await third == {"refill": refill}
    assert len(alpha.received_actions("refill")) == 1 and len(alpha.refills) == 1


async def test_per_order_refusals_pass_through_and_failures_are_unavailable(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sims, router, _ = await start(start_sim, start_router)
    alpha = sims["alpha"]
    done = await placed(router, alpha, "alpha", 2)
    alpha.advance(PROGRESS)
    running = await placed(router, alpha, "alpha", 1)  # not completed: the upstream refuses it
    key = router.keys["acme"]
    asked = [done[0], running[0], done[1]]
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, asked)))
    assert len(sent_ids(alpha, "refill")) == 1
    assert type(answer[0]["refill"]) is int and type(answer[2]["refill"]) is int
    assert answer[1] == {"order": running[0], "refill": {"error": REFILL_UNAVAILABLE}}
    assert await router.call(key=key, action="refill", order=running[0]) == {
        "error": REFILL_UNAVAILABLE
    }

    await alpha.stop()  # the whole call fails: nothing known, nothing stored
    more = await placed(router, alpha, "alpha", 2)
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, more)))
    assert answer == [{"order": i, "refill": {"error": v2.UNAVAILABLE}} for i in more]
    assert await router.store.open_refills_of(more) == {}


async def test_a_refill_turned_away_by_a_firewall_page_is_unavailable_not_its_text(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A `refill` answered by a firewall's 403 page never passes the page's text (or our HTTP
    diagnosis of it) to the reseller: `Service temporarily unavailable`, nothing stored; once
    the firewall lets it through, the refill is made."""
    sims, router, _ = await start(start_sim, start_router)
    alpha = sims["alpha"]
    done = await placed(router, alpha, "alpha", 2)
    alpha.advance(PROGRESS)
    key = router.keys["acme"]
    alpha.set_answer_fault("refill", Fault.WAF_403)
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, done)))
    assert answer == [{"order": i, "refill": {"error": v2.UNAVAILABLE}} for i in done]
    assert await router.call(key=key, action="refill", order=done[0]) == {"error": v2.UNAVAILABLE}
    assert len(sent_ids(alpha, "refill")) == 2  # it was asked, and turned us away
    assert await router.store.open_refills_of(done) == {}

    alpha.set_answer_fault("refill", None)
    answer = await router.call(key=key, action="refill", orders=",".join(map(str, done)))
    assert [type(item["refill"]) for item in answer] == [int, int]
