"""Provider health and smart routing end to end: the real router against real simulators.

The breaker, the funds bench by amount, each strategy, the margin floor, the daily spend cap,
and what a restarted router keeps. Health windows and cooldowns are small; waits are deadlines
(`wait_for`), never timings.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
import structlog.testing

from router import v2
from router.app import DESK, FLEET, ORDER_SYNC, PROVIDER_WATCHER, SESSION
from router.config import Health, Service, Strategy, Sync
from router.fleet import Fleet
from router.health import State
from router.sim import Fault, SimProvider, default_catalogue
from router.sync.providers import ProviderWatcher
from router.upstream import UpstreamClient
from tests.conftest import (
    SIM_KEY,
    Router,
    RouterFactory,
    SimFactory,
    free_port,
    service,
    wait_for,
)

# Three calls decide; a breaker open for 0.3 s before a balance call may probe it.
HEALTH = Health(window=60, min_calls=3, failure_ratio=Decimal("0.5"), cooldown=0.3)


def watcher(router: Router) -> ProviderWatcher:
    return router.app[PROVIDER_WATCHER]


def state_is(router: Router, provider: str, state: str) -> bool:
    return router.metric("smm_router_provider_state", provider=provider, state=state) == 1


def skipped(router: Router, provider: str, reason: str, service_id: int = 1) -> float:
    return router.metric(
        "smm_router_route_skipped_total",
        service=str(service_id),
        provider=provider,
        reason=reason,
    )


async def add(router: Router, key: str, quantity: int = 1000, service_id: int = 1) -> Any:
    return await router.call(
        key=key, action="add", service=service_id, link="https://x.test/p", quantity=quantity
    )


async def placed_at(router: Router, answer: Any) -> str | None:
    """The provider holding the order of an `add` answer, which must be placed."""
    assert "order" in answer, answer
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placed", order
    return order.provider


async def balance(router: Router, name: str = "acme") -> str:
    reseller = await router.store.reseller_by_name(name)
    assert reseller is not None
    assert await router.store.ledger_sum(reseller.id) == reseller.balance
    return v2.format_money(reseller.balance)


def catalogue(rate: str) -> list[Any]:
    """The simulator's catalogue with service 101 at `rate` per 1000."""
    return [
        dataclasses.replace(s, rate=Decimal(rate)) if s.service == 101 else s
        for s in default_catalogue()
    ]


def with_strategy(plain: Service, strategy: Strategy, weights: tuple[int, ...] = ()) -> Service:
    route = plain.route
    if weights:
        route = tuple(dataclasses.replace(r, weight=w) for r, w in zip(route, weights, strict=True))
    return dataclasses.replace(plain, strategy=strategy, route=route)


# --- the breaker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["html502", "http429", "unreachable"])
async def test_a_failing_provider_gets_min_calls_orders_then_only_a_probe_brings_it_back(
    start_sim: SimFactory, start_router: RouterFactory, failure: str
) -> None:
    second = await start_sim()
    port = free_port()
    first = SimProvider(key=SIM_KEY)  # listening from the start unless it is "unreachable"
    if failure != "unreachable":
        await first.start(port=port)
        first.set_fault(101, Fault(failure))
    try:
        router = await start_router(
            {"first": f"http://127.0.0.1:{port}/api/v2", "second": second.url},
            [service(1, [("first", 101), ("second", 101)])],
            health=HEALTH,
        )
        key = await router.reseller("acme", "100")
        assert state_is(router, "first", "healthy")

        outcomes = []
        for _ in range(6):
            answer = await add(router, key)
            order = await router.store.order(answer["order"])
            assert order is not None
            outcomes.append((order.state, order.provider))

        # 502 pages are ambiguous (held, never re-sent); 429 and unreachable fail over.
        first_three = ("held", "first") if failure == "html502" else ("placed", "second")
        assert outcomes == [first_three] * 3 + [("placed", "second")] * 3
        assert sum((await router.store.add_outcomes("first")).values()) == HEALTH.min_calls
        assert state_is(router, "first", "open")
        assert skipped(router, "first", "open") == 3
        assert (await router.store.last_breaker_events(["first"]))["first"].state == "open"

        # Cooldown over: half-open, and still no order is a probe.
        await wait_for(lambda: state_is(router, "first", "half_open"), "the cooldown")
        assert await placed_at(router, await add(router, key)) == "second"
        if failure == "unreachable":
            await watcher(router).balances_once()  # a probe that fails: open again
            assert state_is(router, "first", "open")
            await wait_for(lambda: state_is(router, "first", "half_open"), "a new cooldown")
            await first.start(port=port)
        else:
            first.set_fault(101, None)
        calls = sum((await router.store.add_outcomes("first")).values())
        assert calls == HEALTH.min_calls

        await watcher(router).balances_once()  # the probe answers: closed
        assert state_is(router, "first", "healthy")
        assert (await router.store.last_breaker_events(["first"]))["first"].state == "healthy"
        assert await placed_at(router, await add(router, key)) == "first"
    finally:
        await first.stop()


async def test_the_probe_goes_out_when_the_cooldown_passes_not_at_the_next_balance_read(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim()
    second = await start_sim()
    first.set_fault(101, Fault.HTML_502)
    hour = 3600.0  # no loop comes back on its own during the test
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)])],
        background=True,
        sync=Sync(status_interval=hour, balance_interval=hour, catalogue_interval=hour),
        health=dataclasses.replace(HEALTH, min_calls=2),
    )
    key = await router.reseller("acme", "100")
    await wait_for(lambda: len(first.received_actions("balance")) == 1, "the first balance read")
    for _ in range(2):
        await add(router, key)  # held: the breaker opens on the second
    assert state_is(router, "first", "open")
    first.set_fault(101, None)

    await wait_for(lambda: state_is(router, "first", "healthy"), "the probe at probe_at")
    assert len(first.received_actions("balance")) == 2
    assert await placed_at(router, await add(router, key)) == "first"


async def test_refusals_about_the_order_never_open_the_breaker(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim()
    second = await start_sim()
    first.set_fault(101, Fault.REFUSE)  # "You have active order with this link"
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)])],
        health=HEALTH,
    )
    key = await router.reseller("acme", "100")
    for _ in range(8):
        assert await placed_at(router, await add(router, key)) == "second"
    assert len(first.received_actions("add")) == 8  # asked every time
    assert state_is(router, "first", "healthy")
    assert await router.store.last_breaker_events(["first"]) == {}


async def test_a_provider_whose_firewall_turns_every_order_away_is_opened_like_a_429(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A 403 page (no `{"error": ...}` from the panel) is a refusal, so the order fails over,
    but not a refusal about the order: min_calls of them open the breaker, and a probe turned
    away by the same page keeps it open."""
    first = await start_sim()
    second = await start_sim()
    first.set_fault(101, Fault.WAF_403)
    first.set_answer_fault("balance", Fault.WAF_403)
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)])],
        health=HEALTH,
    )
    key = await router.reseller("acme", "100")

    with structlog.testing.capture_logs() as logs:
        for _ in range(HEALTH.min_calls + 3):
            assert await placed_at(router, await add(router, key)) == "second"
    [opened] = [line for line in logs if line["event"] == "provider_breaker_opened"]
    assert (opened["provider"], opened["outcome"], opened["answer"]) == (
        "first",
        "refused",
        "turned_away",
    )
    assert opened["error"].startswith("HTTP 403")  # the log says why
    assert len(first.received_actions("add")) == HEALTH.min_calls  # then skipped: open
    assert first.orders == {}
    assert await router.store.add_outcomes("first") == {"refused": HEALTH.min_calls}
    assert state_is(router, "first", "open")
    assert skipped(router, "first", "open") == 3
    failovers = router.metric(
        "smm_router_failovers_total", service="1", provider="first", reason="refused"
    )
    assert failovers == HEALTH.min_calls
    assert router.metric("smm_router_orders_held") == 0
    assert (await router.store.last_breaker_events(["first"]))["first"].state == "open"
    restored = Fleet(router.config, router.store, clock=time.time, wall=time.time)
    await restored.restore()  # what `smm-router providers` and `routes` see
    assert restored.state("first") is State.OPEN

    await wait_for(lambda: state_is(router, "first", "half_open"), "the cooldown")
    await watcher(router).balances_once()  # the probe gets the firewall's page too
    assert state_is(router, "first", "open")
    assert len(first.received_actions("balance")) == 1

    first.set_fault(101, None)  # the firewall lets us through again
    first.set_answer_fault("balance", None)
    await wait_for(lambda: state_is(router, "first", "half_open"), "a new cooldown")
    await watcher(router).balances_once()
    assert state_is(router, "first", "healthy")
    assert await placed_at(router, await add(router, key)) == "first"
    assert router.metric("smm_router_orders_held") == 0
    assert await balance(router) == "93.00"  # seven orders at 1.00, each charged once


# --- the funds bench, by amount ------------------------------------------------------------------


async def test_cheap_orders_still_land_on_a_provider_that_refused_an_expensive_one(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim(balance=Decimal("1.00"))  # 101 costs 0.50 per 1000
    second = await start_sim()
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)], rate="2.00")],
    )
    await watcher(router).catalogues_once()
    key = await router.reseller("acme", "100")

    assert await placed_at(router, await add(router, key, 5000)) == "second"  # 2.50: no funds
    assert state_is(router, "first", "benched")
    assert await placed_at(router, await add(router, key, 1000)) == "first"  # 0.50 still goes
    assert await placed_at(router, await add(router, key, 4000)) == "second"  # 2.00: asked, no
    assert len(first.received_actions("add")) == 3
    assert await placed_at(router, await add(router, key, 4000)) == "second"  # benched from 2.00
    assert len(first.received_actions("add")) == 3
    assert skipped(router, "first", "benched") == 1
    assert await placed_at(router, await add(router, key, 1000)) == "first"  # its last 0.50
    assert first.balance == 0


async def test_a_service_whose_only_route_is_benched_still_places_orders_that_fit(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    only = await start_sim(balance=Decimal("1.00"))
    router = await start_router({"only": only.url}, [service(1, [("only", 101)], rate="2.00")])
    await watcher(router).catalogues_once()
    await watcher(router).balances_once()  # 1.00: the level a top-up must beat
    key = await router.reseller("acme", "100")

    assert await add(router, key, 5000) == {"error": v2.UNAVAILABLE}  # 2.50: no funds
    assert await placed_at(router, await add(router, key, 1000)) == "only"
    # Benched, but the only route: still asked, since a funds refusal is quick and definite.
    assert await add(router, key, 5000) == {"error": v2.UNAVAILABLE}
    assert len(only.received_actions("add")) == 3
    assert await balance(router) == "98.00"  # the refused ones cost nothing

    only.set_balance(Decimal("100"))
    await watcher(router).balances_once()  # money came in: the bench is lifted
    assert state_is(router, "only", "healthy")
    assert await placed_at(router, await add(router, key, 5000)) == "only"


# --- strategies ----------------------------------------------------------------------------------


async def test_cheapest_goes_where_the_catalogue_says_this_order_costs_least(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    dear = await start_sim(services=catalogue("0.60"))
    cheap = await start_sim(services=catalogue("0.40"))
    cheapest = service(1, [("dear", 101), ("cheap", 101)], rate="2.00")
    router = await start_router(
        {"dear": dear.url, "cheap": cheap.url}, [with_strategy(cheapest, Strategy.CHEAPEST)]
    )
    key = await router.reseller("acme", "100")
    assert await placed_at(router, await add(router, key)) == "dear"  # no costs yet: by rank

    await watcher(router).catalogues_once()
    assert await placed_at(router, await add(router, key)) == "cheap"

    cheap.set_rate(101, Decimal("0.70"))
    await watcher(router).catalogues_once()
    assert await placed_at(router, await add(router, key)) == "dear"


async def test_weighted_shares_the_first_route_by_weight(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    heavy = await start_sim()
    light = await start_sim()
    router = await start_router(
        {"heavy": heavy.url, "light": light.url},
        [with_strategy(service(1, [("heavy", 101), ("light", 101)]), Strategy.WEIGHTED, (70, 30))],
    )
    key = await router.reseller("acme", "1000")
    orders = 300
    shares = Counter([await placed_at(router, await add(router, key)) for _ in range(orders)])
    # 70% of 300 is 210; the binomial's standard deviation is 7.9: five of them either way.
    assert abs(shares["heavy"] - 210) <= 40, shares
    assert shares["heavy"] + shares["light"] == orders


async def test_quality_prefers_the_provider_whose_orders_complete_once_it_has_the_outcomes(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    poor = await start_sim(partial_every=1)  # every order ends Partial, a quarter undelivered
    good = await start_sim(partial_every=0)  # every order completes
    router = await start_router(
        {"poor": poor.url, "good": good.url},
        [
            with_strategy(service(1, [("poor", 101), ("good", 101)]), Strategy.QUALITY),
            service(2, [("poor", 101)]),
            service(3, [("good", 101)]),
        ],
    )
    router.app[DESK].rng = random.Random(2026)
    key = await router.reseller("acme", "1000")
    before = Counter([await placed_at(router, await add(router, key)) for _ in range(40)])
    assert before["poor"] >= 30, before  # no outcomes: both score alike, ties go by rank

    for service_id in (2, 3):
        for _ in range(20):
            await add(router, key, service_id=service_id)
    for sim in (poor, good):
        sim.advance(sim.progress_seconds + 1)  # every order ends
    await router.app[ORDER_SYNC].run_once()
    await watcher(router).refresh_once()
    outcomes = router.app[FLEET].outcomes
    assert outcomes[("good", 101)].score == 1.0
    assert outcomes[("poor", 101)].score == pytest.approx(0.75)

    after = Counter([await placed_at(router, await add(router, key)) for _ in range(100)])
    assert after["good"] >= 85, after  # 5% of orders explore the other route


# --- the margin floor ----------------------------------------------------------------------------


async def test_a_raised_upstream_rate_takes_its_route_out_of_every_plan(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim()  # 0.50 per 1000 for 101
    second = await start_sim()
    no_floor = dataclasses.replace(service(3, [("first", 101)]), min_margin=None)
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)]), service(2, [("first", 101)]), no_floor],
    )
    await watcher(router).catalogues_once()
    key = await router.reseller("acme", "100")
    assert await placed_at(router, await add(router, key, service_id=1)) == "first"

    first.set_rate(101, Decimal("1.20"))  # above our 1.00: every order there is a loss
    await watcher(router).catalogues_once()
    orders = await router.store.count_orders()
    assert await placed_at(router, await add(router, key, service_id=1)) == "second"
    assert await add(router, key, service_id=2) == {"error": v2.UNAVAILABLE}
    assert await router.store.count_orders() == {**orders, "placed": orders["placed"] + 1}
    assert len(first.received_actions("add")) == 1  # nothing more was sent there
    assert skipped(router, "first", "margin", 1) == skipped(router, "first", "margin", 2) == 1
    # A service without a floor sells at a loss on purpose.
    assert await placed_at(router, await add(router, key, service_id=3)) == "first"
    assert await balance(router) == "97.00"


async def test_a_failover_never_sells_below_the_floor(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim()
    second = await start_sim(services=catalogue("1.20"))  # above our 1.00
    first.set_fault(101, Fault.REFUSE)
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)])],
    )
    await watcher(router).catalogues_once()
    key = await router.reseller("acme", "100")

    answer = await add(router, key)

    assert answer == {"error": v2.UNAVAILABLE}
    assert second.received_actions("add") == []
    assert len(first.received_actions("add")) == 1
    assert await balance(router) == "100.00"  # refunded


# --- the daily spend cap -------------------------------------------------------------------------


async def test_a_provider_at_its_daily_spend_cap_gets_no_new_orders_today(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    capped = await start_sim(progress_seconds=1000)  # Pending for 100 s: cancels take
    other = await start_sim()
    services = [service(1, [("capped", 101), ("other", 101)], rate="2.00")]
    urls = {"capped": capped.url, "other": other.url}
    caps = {"capped": "1.2"}
    router = await start_router(urls, services, spend_caps=caps)
    await watcher(router).catalogues_once()  # 0.50 per 1000 at both
    key = await router.reseller("acme", "100")

    first = await add(router, key)
    assert await placed_at(router, first) == "capped"
    assert await placed_at(router, await add(router, key)) == "capped"  # 1.00 spent
    assert await placed_at(router, await add(router, key)) == "other"  # 1.50 would pass 1.20
    assert await placed_at(router, await add(router, key, 200)) == "capped"  # 0.10 fits: 1.10
    assert await placed_at(router, await add(router, key, 400)) == "other"
    assert skipped(router, "capped", "spend_cap") == 2

    again = await start_router(urls, services, spend_caps=caps)  # same database
    assert await placed_at(again, await add(again, key, 400)) == "other"  # the spend is kept

    # A canceled order costs nothing once its status says so: the spend follows.
    assert await again.call(key=key, action="cancel", orders=first["order"]) == [
        {"order": first["order"], "cancel": 1}
    ]
    await again.app[ORDER_SYNC].run_once()
    assert await placed_at(again, await add(again, key)) == "capped"  # 0.60 + 0.50


# --- after a restart -----------------------------------------------------------------------------


async def test_a_restarted_router_keeps_its_breakers_and_its_benches_by_amount(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    poor = await start_sim(balance=Decimal("1.00"))
    good = await start_sim()
    urls = {"down": f"http://127.0.0.1:{free_port()}/api/v2", "poor": poor.url, "good": good.url}
    services = [service(1, [("down", 101), ("poor", 101), ("good", 101)], rate="2.00")]
    slow_health = dataclasses.replace(HEALTH, min_calls=2, cooldown=600)
    router = await start_router(urls, services, health=slow_health)
    await watcher(router).catalogues_once()
    key = await router.reseller("acme", "100")
    assert await placed_at(router, await add(router, key, 5000)) == "good"  # poor: no funds
    assert await placed_at(router, await add(router, key, 1000)) == "poor"
    assert state_is(router, "down", "open")

    again = await start_router(urls, services, health=slow_health)
    assert state_is(again, "down", "open") and state_is(again, "poor", "benched")
    big = await add(again, key, 5000)
    assert await placed_at(again, big) == "good"
    assert [a.provider for a in await again.store.attempts(big["order"])] == ["good"]
    small = await add(again, key, 1000)
    assert await placed_at(again, small) == "poor"
    assert [a.provider for a in await again.store.attempts(small["order"])] == ["poor"]


# --- a config reload -----------------------------------------------------------------------------


async def test_a_reconfigured_fleet_forgets_what_no_longer_holds_and_the_loops_follow(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """What a config reload hands the fleet: removed providers are forgotten (with their
    gauges), changed ones start afresh, added ones are read by a balance loop of their own."""
    sims = {name: await start_sim() for name in ("kept", "changed", "removed", "added")}
    urls = {name: sim.url for name, sim in sims.items() if name != "added"}
    hour = 3600.0
    router = await start_router(
        urls,
        [service(1, [("kept", 101), ("changed", 101), ("removed", 101)])],
        background=True,
        sync=Sync(status_interval=hour, balance_interval=hour, catalogue_interval=hour),
    )
    fleet = router.app[FLEET]
    await wait_for(lambda: len(fleet.rates) == 3, "the first catalogues")
    fleet.health["changed"].breaker.restore(fleet.clock(), router.config.health)

    providers = dict(router.config.providers)
    del providers["removed"]
    providers["added"] = dataclasses.replace(providers["kept"], name="added", url=sims["added"].url)
    new = dataclasses.replace(
        router.config,
        providers=MappingProxyType(providers),
        services=MappingProxyType({1: service(1, [("kept", 101), ("added", 101)])}),
    )
    watcher(router).clients = {
        name: UpstreamClient(provider, router.app[SESSION]) for name, provider in providers.items()
    }
    fleet.reconfigure(new, fresh={"changed"})

    assert set(fleet.health) == {"kept", "changed", "added"}
    assert state_is(router, "changed", "healthy") and state_is(router, "added", "healthy")
    assert (
        router.registry.get_sample_value(
            "smm_router_provider_state", {"provider": "removed", "state": "healthy"}
        )
        is None
    )
    assert set(fleet.rates) == {("kept", 101)}
    await wait_for(lambda: sims["added"].received_actions("balance"), "the added one's read")
    assert len(sims["kept"].received_actions("balance")) == 1  # the others keep their pace
