"""Plans as pure functions: eligibility and its reasons, margin floors, strategies, seeded draws."""

from __future__ import annotations

import random
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from router.config import (
    INHERIT,
    Config,
    Listener,
    Provider,
    Route,
    Routing,
    Secret,
    Service,
    Strategy,
)
from router.health import ProviderStatus, State
from router.routing import (
    EXPLORE_SHARE,
    QUALITY_PRIOR,
    Outcomes,
    Plan,
    RateKey,
    Reason,
    below_floor,
    min_margin_of,
    plan_order,
    quality_scores,
    strategy_of,
    upstream_cost,
)

ROUTES = (("alpha", 101), ("beta", 7), ("gamma", 3))
# Minor units per 1000 in each provider's currency: 0.45 USD, 0.40 EUR (0.432 USD), 0.50 USD.
RATES: dict[RateKey, int] = {("alpha", 101): 45_000, ("beta", 7): 40_000, ("gamma", 3): 50_000}
CHARGE = 90_000  # 1000 at our 0.90
DRAWS = 4000


def make_service(
    *,
    type: str = "Default",
    rate: str = "0.90",
    route: tuple[tuple[str, int], ...] = ROUTES,
    weights: tuple[int, ...] | None = None,
    **fields: Any,
) -> Service:
    return Service(
        id=1,
        name="Followers",
        category="Tests",
        type=type,
        rate=Decimal(rate),
        min=1,
        max=100_000,
        refill=False,
        cancel=False,
        dripfeed=False,
        route=tuple(
            Route(name, upstream, None if weights is None else weights[index])
            for index, (name, upstream) in enumerate(route)
        ),
        **fields,
    )


def make_config(routing: Routing | None = None, **caps: str) -> Config:
    def provider(name: str, currency: str = "USD") -> Provider:
        cap = Decimal(caps[name]) if name in caps else None
        return Provider(
            name,
            f"http://{name}.example/api/v2",
            Secret("k"),
            currency=currency,
            daily_spend_cap=cap,
        )

    names = ["alpha", "gamma", *(f"p{n}" for n in range(1, 7))]
    providers = {name: provider(name) for name in names} | {"beta": provider("beta", "EUR")}
    return Config(
        listen=Listener("127.0.0.1", 0),
        metrics=Listener("127.0.0.1", 0),
        database=Path("/tmp/unused.db"),
        currency="USD",
        providers=MappingProxyType(providers),
        services=MappingProxyType({}),
        fx=MappingProxyType({"EUR": Decimal("1.08")}),
        routing=routing or Routing(),
    )


CONFIG = make_config()


def plan(
    service: Service | None = None,
    *,
    config: Config = CONFIG,
    quantity: int = 1000,
    charge: int = CHARGE,
    providers: Mapping[str, ProviderStatus] | None = None,
    rates: Mapping[RateKey, int] = RATES,
    outcomes: Mapping[RateKey, Outcomes] | None = None,
    rng: random.Random | None = None,
) -> Plan:
    return plan_order(
        config,
        service or make_service(),
        quantity=quantity,
        charge=charge,
        providers=providers or {},
        rates=rates,
        outcomes=outcomes or {},
        rng=rng or random.Random(1),
    )


def tried(result: Plan) -> list[str]:
    return [step.route.provider for step in result.to_try]


def skipped(result: Plan) -> list[tuple[str, Reason | None]]:
    return [(step.route.provider, step.reason) for step in result.skipped]


def first_shares(draw: Any, draws: int = DRAWS) -> dict[str, float]:
    counts: dict[str, int] = {}
    for _ in range(draws):
        name = tried(draw())[0]
        counts[name] = counts.get(name, 0) + 1
    return {name: count / draws for name, count in counts.items()}


# --- Costs ---------------------------------------------------------------------------------------


def test_costs_are_rate_times_quantity_converted_with_fx_rounded_half_up() -> None:
    assert upstream_cost(45_000, 1000, flat=False, to_base=Decimal(1)) == 45_000
    assert upstream_cost(40_000, 1000, flat=False, to_base=Decimal("1.08")) == 43_200
    assert upstream_cost(1, 500, flat=False, to_base=Decimal(1)) == 1  # 0.5 rounds up
    assert upstream_cost(1, 499, flat=False, to_base=Decimal(1)) == 0
    assert upstream_cost(3, 500, flat=False, to_base=Decimal("1.08")) == 2  # 1.62
    assert upstream_cost(200_000, 1, flat=True, to_base=Decimal("1.08")) == 216_000


def test_costs_round_as_the_stores_decimal_estimate() -> None:
    """The same figure the reports estimate with (Decimal, ROUND_HALF_UP), from integers."""
    rng = random.Random(9)
    for _ in range(2000):
        rate, quantity = rng.randrange(-(10**6), 10**7), rng.randrange(1, 10**6)
        fx = Decimal(rng.randrange(1, 10**6)).scaleb(-rng.randrange(0, 7))
        milli = Decimal(rate * quantity)
        expected = int((milli * fx / 1000).to_integral_value(rounding=ROUND_HALF_UP))
        assert upstream_cost(rate, quantity, flat=False, to_base=fx) == expected


def test_a_ranked_plan_tries_the_routes_as_listed_with_cost_and_margin() -> None:
    result = plan()
    assert result.service == 1 and result.strategy is Strategy.RANKED
    steps = [(s.rank, s.route, s.state, s.upstream_cost, s.margin, s.reason) for s in result.steps]
    assert steps == [
        (0, Route("alpha", 101), State.HEALTHY, 45_000, 45_000, None),
        (1, Route("beta", 7), State.HEALTHY, 43_200, 46_800, None),
        (2, Route("gamma", 3), State.HEALTHY, 50_000, 40_000, None),
    ]
    assert result.routes == [
        (0, Route("alpha", 101)),
        (1, Route("beta", 7)),
        (2, Route("gamma", 3)),
    ]
    assert result.skipped == ()


def test_a_route_without_a_catalogue_rate_has_no_cost_and_is_still_tried() -> None:
    result = plan(
        rates={("beta", 7): 40_000}, config=make_config(Routing(min_margin=Decimal("0.5")))
    )
    assert tried(result) == ["alpha", "beta", "gamma"]
    assert [step.upstream_cost for step in result.steps] == [None, 43_200, None]
    assert [step.margin for step in result.steps] == [None, 46_800, None]


# --- Cheapest ------------------------------------------------------------------------------------


def test_cheapest_orders_by_this_orders_cost_after_fx() -> None:
    result = plan(make_service(strategy=Strategy.CHEAPEST))
    assert tried(result) == ["beta", "alpha", "gamma"]  # 0.40 EUR = 0.432 USD < 0.45 < 0.50
    assert result.strategy is Strategy.CHEAPEST


def test_cheapest_breaks_ties_by_rank_and_puts_unknown_costs_last() -> None:
    rates = {("gamma", 3): 45_000, ("alpha", 101): 45_000}
    assert tried(plan(make_service(strategy=Strategy.CHEAPEST), rates=rates)) == [
        "alpha",
        "gamma",
        "beta",
    ]
    service = make_service(strategy=Strategy.CHEAPEST, route=(("gamma", 3), *ROUTES[:2]))
    assert tried(plan(service, rates={("beta", 7): 1})) == ["beta", "gamma", "alpha"]


def test_cheapest_costs_a_flat_type_once_per_order() -> None:
    service = make_service(type="Package", rate="2.40", strategy=Strategy.CHEAPEST)
    rates = {("alpha", 101): 200_000, ("beta", 7): 180_000, ("gamma", 3): 199_000}
    result = plan(service, quantity=1, charge=240_000, rates=rates)
    assert tried(result) == ["beta", "gamma", "alpha"]  # 1.80 EUR = 1.944 USD
    assert [step.upstream_cost for step in result.to_try] == [194_400, 199_000, 200_000]


def test_cheapest_follows_the_catalogue_as_rates_change() -> None:
    service = make_service(strategy=Strategy.CHEAPEST)
    assert tried(plan(service, rates=RATES | {("gamma", 3): 30_000}))[0] == "gamma"


# --- Weighted ------------------------------------------------------------------------------------


def test_weighted_draws_the_first_route_by_weight() -> None:
    service = make_service(route=ROUTES[:2], weights=(70, 30), strategy=Strategy.WEIGHTED)
    rng = random.Random(2026)
    shares = first_shares(lambda: plan(service, rng=rng))
    assert shares["alpha"] == pytest.approx(0.70, abs=0.05)
    assert shares["beta"] == pytest.approx(0.30, abs=0.05)


def test_weighted_tries_the_rest_by_rank_and_draws_among_eligible_routes_only() -> None:
    service = make_service(weights=(70, 20, 10), strategy=Strategy.WEIGHTED)
    rng = random.Random(7)
    orders = {tuple(tried(plan(service, rng=rng))) for _ in range(500)}
    assert orders == {
        ("alpha", "beta", "gamma"),
        ("beta", "alpha", "gamma"),
        ("gamma", "alpha", "beta"),
    }
    down = {"alpha": ProviderStatus(breaker=State.OPEN)}
    shares = first_shares(lambda: plan(service, providers=down, rng=rng))
    assert "alpha" not in shares
    assert shares["beta"] == pytest.approx(2 / 3, abs=0.05)


def test_the_default_strategy_applies_to_a_service_without_its_own() -> None:
    config = make_config(Routing(strategy=Strategy.WEIGHTED))
    service = make_service(route=ROUTES[:2], weights=(1, 3))
    assert strategy_of(config, service) is Strategy.WEIGHTED
    rng = random.Random(3)
    shares = first_shares(lambda: plan(service, config=config, rng=rng), draws=2000)
    assert shares["beta"] == pytest.approx(0.75, abs=0.05)
    assert strategy_of(config, make_service(strategy=Strategy.RANKED)) is Strategy.RANKED


def test_ranked_and_cheapest_draw_nothing() -> None:
    for strategy in (Strategy.RANKED, Strategy.CHEAPEST):
        rng = random.Random(5)
        before = rng.getstate()
        plan(make_service(strategy=strategy), rng=rng)
        assert rng.getstate() == before


# --- Quality -------------------------------------------------------------------------------------


def test_a_score_is_the_delivered_share_of_enough_outcomes() -> None:
    assert Outcomes(completed=19).score is None
    assert Outcomes(completed=20).score == 1.0
    assert Outcomes(canceled=20).score == 0.0
    assert Outcomes(completed=10, partial=10, partial_delivered=5.0).score == 0.75
    assert Outcomes(completed=5, partial=10, canceled=5, partial_delivered=2.5).count == 20


def test_routes_without_enough_outcomes_score_as_the_services_average() -> None:
    service = make_service()
    outcomes = {
        ("alpha", 101): Outcomes(completed=30),
        ("beta", 7): Outcomes(completed=10, canceled=10),
        ("gamma", 3): Outcomes(completed=2),
    }
    assert quality_scores(service, outcomes) == {
        ("alpha", 101): 1.0,
        ("beta", 7): 0.5,
        ("gamma", 3): 0.75,
    }
    assert quality_scores(service, {}) == dict.fromkeys(RATES, QUALITY_PRIOR)


def test_quality_prefers_the_provider_whose_orders_complete_and_explores_the_others() -> None:
    service = make_service(strategy=Strategy.QUALITY)
    outcomes = {
        ("alpha", 101): Outcomes(completed=5, canceled=25),
        ("beta", 7): Outcomes(completed=28, partial=2, partial_delivered=1.5),
        ("gamma", 3): Outcomes(completed=15, canceled=15),
    }
    rng = random.Random(11)
    plans = [plan(service, outcomes=outcomes, rng=rng) for _ in range(DRAWS)]
    best = [tried(p) for p in plans if tried(p)[0] == "beta"]
    assert all(order == ["beta", "gamma", "alpha"] for order in best)
    explored = [tried(p) for p in plans if tried(p)[0] != "beta"]
    assert len(explored) / DRAWS == pytest.approx(EXPLORE_SHARE, abs=0.015)
    # An explored order puts another route first; the rest keep their scores' order.
    assert {tuple(order) for order in explored} == {
        ("gamma", "beta", "alpha"),
        ("alpha", "beta", "gamma"),
    }


def test_quality_without_outcomes_tries_the_routes_as_listed_but_for_exploration() -> None:
    service = make_service(strategy=Strategy.QUALITY)
    rng = random.Random(4)
    shares = first_shares(lambda: plan(service, rng=rng))
    assert shares["alpha"] == pytest.approx(1 - EXPLORE_SHARE, abs=0.015)


def test_quality_with_one_eligible_route_does_not_explore() -> None:
    service = make_service(strategy=Strategy.QUALITY)
    down = {
        "alpha": ProviderStatus(breaker=State.OPEN),
        "beta": ProviderStatus(missing=frozenset({7})),
    }
    assert all(tried(plan(service, providers=down)) == ["gamma"] for _ in range(200))


# --- The margin floor ----------------------------------------------------------------------------


def test_below_floor_is_exact() -> None:
    assert not below_floor(90_000, 90_000, Decimal(0))  # no margin is allowed at floor 0
    assert below_floor(90_001, 90_000, Decimal(0))
    assert not below_floor(81_000, 90_000, Decimal("0.10"))
    assert below_floor(81_001, 90_000, Decimal("0.10"))
    assert below_floor(1, 0, Decimal(0))  # a free service cannot pay for any upstream cost


def test_a_raised_rate_takes_its_route_out_of_the_plan() -> None:
    result = plan(rates=RATES | {("alpha", 101): 95_000})
    assert tried(result) == ["beta", "gamma"]
    assert skipped(result) == [("alpha", Reason.MARGIN)]
    (out,) = result.skipped
    assert out.state is State.HEALTHY and out.upstream_cost == 95_000 and out.margin == -5_000


def test_the_floor_applies_to_failover_routes_too() -> None:
    result = plan(rates=RATES | {("beta", 7): 90_000})  # 97,200 after fx
    assert tried(result) == ["alpha", "gamma"]
    assert skipped(result) == [("beta", Reason.MARGIN)]


def test_a_services_floor_overrides_the_default_and_null_turns_it_off() -> None:
    floor = make_service(min_margin=Decimal("0.10"))
    rates = RATES | {("alpha", 101): 81_000, ("gamma", 3): 81_001}
    assert tried(plan(floor, rates=rates)) == ["alpha", "beta"]
    config = make_config(Routing(min_margin=Decimal("0.5")))
    assert min_margin_of(config, make_service()) == Decimal("0.5")
    assert tried(plan(config=config)) == ["alpha", "beta"]  # gamma's 0.50 leaves 44%
    free = make_service(min_margin=None)
    assert min_margin_of(config, free) is None
    result = plan(free, config=config, rates=RATES | {("alpha", 101): 95_000})
    assert tried(result) == ["alpha", "beta", "gamma"] and result.steps[0].margin == -5_000
    assert make_service().min_margin is INHERIT


def test_every_route_below_the_floor_leaves_nothing_to_try() -> None:
    result = plan(rates=dict.fromkeys(RATES, 100_000))
    assert result.to_try == () and result.routes == []
    assert skipped(result) == [(name, Reason.MARGIN) for name, _ in ROUTES]


# --- Health: open, benched, spend caps, missing --------------------------------------------------


def test_an_open_or_half_open_provider_is_skipped() -> None:
    providers = {
        "alpha": ProviderStatus(breaker=State.OPEN),
        "beta": ProviderStatus(breaker=State.HALF_OPEN),
    }
    result = plan(providers=providers)
    assert tried(result) == ["gamma"]
    assert [(s.route.provider, s.state, s.reason) for s in result.skipped] == [
        ("alpha", State.OPEN, Reason.OPEN),
        ("beta", State.HALF_OPEN, Reason.OPEN),
    ]


def test_a_bench_skips_orders_of_its_cost_or_more_only() -> None:
    providers = {"alpha": ProviderStatus(bench_from=45_000)}
    result = plan(providers=providers)
    assert tried(result) == ["beta", "gamma"] and skipped(result) == [("alpha", Reason.BENCHED)]
    cheaper = plan(providers=providers, quantity=999, charge=89_910)  # costs 44,955 at alpha
    assert tried(cheaper) == ["alpha", "beta", "gamma"]
    assert cheaper.steps[0].state is State.BENCHED  # benched above this order's cost


def test_when_every_route_left_is_benched_they_are_still_tried_in_order() -> None:
    benched = ProviderStatus(bench_from=0)
    providers = {"alpha": benched, "beta": benched, "gamma": ProviderStatus(breaker=State.OPEN)}
    result = plan(providers=providers)
    assert tried(result) == ["alpha", "beta"]
    assert [step.state for step in result.to_try] == [State.BENCHED, State.BENCHED]
    assert skipped(result) == [("gamma", Reason.OPEN)]
    cheapest = plan(make_service(strategy=Strategy.CHEAPEST), providers=providers)
    assert tried(cheapest) == ["beta", "alpha"]


def test_routes_out_for_other_reasons_do_not_count_as_left() -> None:
    benched = ProviderStatus(bench_from=0)
    rates = RATES | {("gamma", 3): 95_000}
    providers = {"alpha": ProviderStatus(missing=frozenset({101})), "beta": benched}
    result = plan(providers=providers, rates=rates)
    assert tried(result) == ["beta"]
    assert skipped(result) == [("alpha", Reason.MISSING), ("gamma", Reason.MARGIN)]


def test_a_benched_route_is_not_tried_while_another_route_is_eligible() -> None:
    providers = {"alpha": ProviderStatus(bench_from=0), "beta": ProviderStatus(bench_from=0)}
    result = plan(providers=providers)
    assert tried(result) == ["gamma"]
    assert skipped(result) == [("alpha", Reason.BENCHED), ("beta", Reason.BENCHED)]


def test_a_benched_route_below_the_floor_is_never_tried() -> None:
    providers = {name: ProviderStatus(bench_from=0) for name, _ in ROUTES}
    result = plan(providers=providers, rates=RATES | {("alpha", 101): 95_000})
    assert tried(result) == ["beta", "gamma"]
    assert skipped(result) == [("alpha", Reason.MARGIN)]


def test_an_order_of_unknown_cost_is_benched_while_any_threshold_stands() -> None:
    providers = {"alpha": ProviderStatus(bench_from=10**9)}
    assert skipped(plan(providers=providers, rates={})) == [("alpha", Reason.BENCHED)]


def test_a_provider_at_its_spend_cap_gets_no_new_orders() -> None:
    config = make_config(alpha="500")  # 50,000,000 minor units
    near = {"alpha": ProviderStatus(spent_today=49_990_000)}
    result = plan(config=config, providers=near)  # 45,000 more would pass 500
    assert tried(result) == ["beta", "gamma"] and skipped(result) == [("alpha", Reason.SPEND_CAP)]
    small = plan(config=config, providers=near, quantity=100, charge=9_000)  # 4,500 fits
    assert tried(small) == ["alpha", "beta", "gamma"]
    at_cap = {"alpha": ProviderStatus(spent_today=50_000_000)}
    assert skipped(plan(config=config, providers=at_cap, rates={})) == [("alpha", Reason.SPEND_CAP)]
    assert tried(plan(providers=at_cap)) == ["alpha", "beta", "gamma"]  # no cap configured


def test_a_route_gone_from_its_catalogue_is_skipped() -> None:
    providers = {"beta": ProviderStatus(missing=frozenset({7, 8}))}
    result = plan(providers=providers)
    assert tried(result) == ["alpha", "gamma"] and skipped(result) == [("beta", Reason.MISSING)]


def test_each_reason_in_rank_order_after_the_routes_to_try() -> None:
    route = tuple((f"p{n}", 10 + n) for n in range(1, 7))
    service = make_service(route=route, strategy=Strategy.CHEAPEST)
    rates = {key: 45_000 for key in route} | {("p3", 13): 95_000, ("p6", 16): 50_000}
    providers = {
        "p1": ProviderStatus(missing=frozenset({11}), breaker=State.OPEN),  # missing wins
        "p2": ProviderStatus(breaker=State.OPEN, bench_from=0),  # open wins over benched
        "p4": ProviderStatus(spent_today=50_000_000, bench_from=0),
        "p5": ProviderStatus(bench_from=0),
    }
    result = plan(service, config=make_config(p4="500"), providers=providers, rates=rates)
    assert tried(result) == ["p6"]
    assert [(s.rank, s.route.provider, s.state, s.reason) for s in result.skipped] == [
        (0, "p1", State.OPEN, Reason.MISSING),
        (1, "p2", State.OPEN, Reason.OPEN),
        (2, "p3", State.HEALTHY, Reason.MARGIN),
        (3, "p4", State.BENCHED, Reason.SPEND_CAP),
        (4, "p5", State.BENCHED, Reason.BENCHED),
    ]
    assert [str(reason) for reason in Reason] == [
        "missing",
        "open",
        "margin",
        "spend_cap",
        "benched",
    ]


def test_without_a_draw_weighted_puts_the_heaviest_first_and_quality_explores_nothing() -> None:
    """What `smm-router routes` shows: the order the draws favour, the same every time."""
    weighted = make_service(strategy=Strategy.WEIGHTED, weights=(20, 50, 30))
    shown = plan_order(
        make_config(), weighted, quantity=1000, charge=CHARGE, providers={}, rates=RATES, rng=None
    )
    assert [step.route.provider for step in shown.to_try] == ["beta", "alpha", "gamma"]
    tie = make_service(strategy=Strategy.WEIGHTED, weights=(50, 50, 30))
    shown = plan_order(
        make_config(), tie, quantity=1000, charge=CHARGE, providers={}, rates=RATES, rng=None
    )
    assert [step.route.provider for step in shown.to_try] == ["alpha", "beta", "gamma"]
    quality = make_service(strategy=Strategy.QUALITY)
    outcomes = {("gamma", 3): Outcomes(completed=30), ("alpha", 101): Outcomes(canceled=30)}
    for _ in range(200):  # EXPLORE_SHARE would put another first in about 10 of these
        shown = plan_order(
            make_config(),
            quality,
            quantity=1000,
            charge=CHARGE,
            providers={},
            rates=RATES,
            outcomes=outcomes,
            rng=None,
        )
        assert [step.route.provider for step in shown.to_try] == ["gamma", "beta", "alpha"]
