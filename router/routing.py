"""Which routes to try for one order, in which order: pure functions over config and state.

Usage::

    plan = plan_order(config, service, quantity=request.quantity, charge=request.charge,
                      providers={name: health[name].status(now=..., day=...) for name in ...},
                      rates=catalogue_rates, outcomes=quality_outcomes, rng=rng)
    for step in plan.to_try:            # rank, route, state, upstream_cost, margin
        ...
    plan.skipped                        # the ineligible routes, each with its reason

A plan lists the eligible routes in the order they will be tried, then the ineligible ones in
the order of the route list, each with its reason (the first that applies, in this order):
- `missing`: the provider's catalogue no longer lists the upstream service;
- `open`: the provider's breaker is open or half_open (an order there would only make a held
  order or cost a connect timeout; a `balance` probe, never an order, closes it);
- `margin`: the live upstream cost of this order is above charge x (1 - min_margin), the
  service's floor (routing.min_margin unless the service sets its own; `null`: no floor). The
  floor applies to every route, failovers too: failing over never sells at a loss the operator
  did not allow. A route whose cost is unknown (no catalogue rate yet) is not held to it:
  refusing it would stop every order before the first catalogue fetch;
- `spend_cap`: the provider is at its daily spend cap, or this order would take it past it;
- `benched`: the provider is out of funds for orders of this cost (router.health). Unless every
  route not skipped for one of the reasons above is benched: then the benched ones are tried
  anyway, in strategy order, since a funds refusal is definite and cheap and an order is never
  refused without asking the only upstreams that might take it. Routes that are open, missing,
  over the floor or capped are not "left": they would not be tried whatever happens.

Strategies order the eligible routes (config.Strategy): `ranked` as listed; `cheapest` by this
order's upstream cost (catalogue rate x quantity, or the rate once for flat types, converted with
`fx`), ties and unknown costs (last) by rank; `weighted` draws the first at random by `weight`,
the rest follow by rank; `quality` by the delivered share of the route's final outcomes over the
last QUALITY_DAYS (Completed 1, Partial the delivered share, Canceled 0), a route with fewer
than QUALITY_MIN_OUTCOMES scoring as the average of the service's routes that have enough (or
QUALITY_PRIOR when none has), ties by rank; EXPLORE_SHARE of its orders put a random other
eligible route first, so that every route keeps gathering outcomes. The random draws come from
the `rng` passed in; without one (`smm-router routes`, which shows what an order would get),
`weighted` puts the heaviest route first and `quality` explores nothing: the order the draws
favour, not a draw.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Final, NamedTuple

from router import health, v2
from router.config import INHERIT, Config, Route, Service, Strategy
from router.health import ProviderStatus, State
from router.upstream import Outcome


def fails_over(outcome: Outcome) -> bool:
    """Whether an `add` with this outcome may be tried on the next route.

    Only when nothing can exist upstream: an ambiguous outcome is never re-sent.
    """
    return outcome in (Outcome.REFUSED, Outcome.NO_FUNDS, Outcome.UNREACHABLE)


# --- Plans: the routes of one order, with provider health, costs, floors and strategies ---------

QUALITY_DAYS: Final = 7  # the final outcomes a quality score is taken from
QUALITY_MIN_OUTCOMES: Final = 20  # fewer score as the service's average
QUALITY_PRIOR: Final = 0.5  # the score of every route of a service without enough outcomes
EXPLORE_SHARE: Final = 0.05  # of `quality` orders, tried first on a route that is not the best
DEFAULT_WEIGHT: Final = 1  # a route without a weight (config requires one for `weighted`)


class Reason(StrEnum):
    """Why a route is not in an order's plan (`smm_router_route_skipped_total{reason}`)."""

    MISSING = "missing"
    OPEN = "open"
    MARGIN = "margin"
    SPEND_CAP = "spend_cap"
    BENCHED = "benched"


REASONS: Final = tuple(Reason)
# Members as module names: reading an Enum class attribute costs about 0.2 us on Python 3.11.
_MISSING: Final = Reason.MISSING
_OPEN: Final = Reason.OPEN
_MARGIN: Final = Reason.MARGIN
_SPEND_CAP: Final = Reason.SPEND_CAP
_BENCHED: Final = Reason.BENCHED
_RANKED: Final = Strategy.RANKED
_CHEAPEST: Final = Strategy.CHEAPEST
_WEIGHTED: Final = Strategy.WEIGHTED
RateKey = tuple[str, int]  # (provider, upstream service)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """The final outcomes of one (provider, upstream service)'s orders over QUALITY_DAYS."""

    completed: int = 0
    partial: int = 0
    canceled: int = 0
    partial_delivered: float = 0.0  # the sum, over the partial ones, of delivered / quantity

    @property
    def count(self) -> int:
        return self.completed + self.partial + self.canceled

    @property
    def score(self) -> float | None:
        """The delivered share, from 0 to 1; None with fewer than QUALITY_MIN_OUTCOMES."""
        if self.count < QUALITY_MIN_OUTCOMES:
            return None
        return (self.completed + self.partial_delivered) / self.count


NO_OUTCOMES: Final[Mapping[RateKey, Outcomes]] = MappingProxyType({})


class Step(NamedTuple):
    """One route of a plan: eligible (`reason` None) or skipped, with what it was judged on.

    A NamedTuple, not a frozen dataclass: a plan builds one per route of every order, and a
    frozen dataclass takes several times longer to build.
    """

    rank: int  # its place in the service's route list
    route: Route
    state: State  # its provider's
    upstream_cost: int | None  # this order's cost there, minor units of `currency`; None: unknown
    margin: int | None  # charge - upstream_cost; None when the cost is unknown
    reason: Reason | None = None

    @property
    def eligible(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class Plan:
    """The routes of one order: those to try, in order, then the skipped ones by rank."""

    service: int
    strategy: Strategy
    steps: tuple[Step, ...]

    @property
    def to_try(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.reason is None)

    @property
    def skipped(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.reason is not None)

    @property
    def routes(self) -> list[tuple[int, Route]]:
        """The routes to try as (rank in the route list, route), in the order tried."""
        return [(step.rank, step.route) for step in self.steps if step.reason is None]


def to_base(config: Config, currency: str) -> Decimal:
    """What 1 unit of `currency` is worth in the config's currency (`fx`; config-checked)."""
    return Decimal(1) if currency == config.currency else config.fx[currency]


def is_flat(service_type: str) -> bool:
    """Whether a service type costs its rate once per order (Package), not per 1000."""
    kind = v2.SERVICE_TYPES.get(service_type)
    return kind is not None and kind.quantity == "flat"


def upstream_cost(rate: int, quantity: int, *, flat: bool, to_base: Decimal) -> int:
    """What an order costs upstream, in minor units of the base currency, rounded half up.

    `rate` is the catalogue's, in minor units of the provider's currency per 1000 (per order
    when `flat`); `to_base` converts that currency (`fx`). As the store estimates costs.
    """
    milli = rate * 1000 if flat else rate * quantity
    numerator, denominator = to_base.as_integer_ratio()
    # Integers, not Decimal arithmetic: exact, and several times faster per route.
    return _round_half_up(milli * numerator, denominator * 1000)


def _round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator (> 0) rounded half away from zero, as Decimal's ROUND_HALF_UP."""
    whole = (2 * abs(numerator) + denominator) // (2 * denominator)
    return whole if numerator >= 0 else -whole


def strategy_of(config: Config, service: Service) -> Strategy:
    """The service's own strategy, else routing.strategy."""
    return config.routing.strategy if service.strategy is None else service.strategy


def min_margin_of(config: Config, service: Service) -> Decimal | None:
    """The service's margin floor: its own, else routing.min_margin; None: no floor."""
    if service.min_margin is INHERIT:
        return config.routing.min_margin
    return service.min_margin


def below_floor(cost: int, charge: int, min_margin: Decimal) -> bool:
    """Whether `cost` > `charge` x (1 - min_margin), exactly (no rounding of the product)."""
    numerator, denominator = min_margin.as_integer_ratio()
    return cost * denominator > charge * (denominator - numerator)


def quality_scores(service: Service, outcomes: Mapping[RateKey, Outcomes]) -> dict[RateKey, float]:
    """Each route's score: its own with enough outcomes, else the average of those that have."""
    keys = [(route.provider, route.service) for route in service.route]
    own: dict[RateKey, float] = {}
    for key in keys:
        found = outcomes.get(key)
        score = None if found is None else found.score
        if score is not None:
            own[key] = score
    fallback = sum(own.values()) / len(own) if own else QUALITY_PRIOR
    return {key: own.get(key, fallback) for key in keys}


def plan_order(
    config: Config,
    service: Service,
    *,
    quantity: int,
    charge: int,
    providers: Mapping[str, ProviderStatus],
    rates: Mapping[RateKey, int],
    outcomes: Mapping[RateKey, Outcomes] = NO_OUTCOMES,
    rng: random.Random | None,
) -> Plan:
    """The plan of one order of `quantity` (charged units) for `charge` (minor units).

    `providers`: each provider's health now (a provider left out is healthy); `rates`: the
    catalogue rate of each (provider, upstream service), minor units of the provider's
    currency per 1000 (per order for flat types); `outcomes`: the quality strategy's inputs;
    `rng`: the random draws of `weighted` and `quality` (None: their most likely order).
    """
    floor = min_margin_of(config, service)
    flat = is_flat(service.type)
    judged: list[Step] = []
    for rank, route in enumerate(service.route):
        status = providers.get(route.provider, health.HEALTHY)
        provider = config.providers[route.provider]
        rate = rates.get((route.provider, route.service))
        cost = None
        if rate is not None:
            fx = to_base(config, provider.currency)
            cost = upstream_cost(rate, quantity, flat=flat, to_base=fx)
        cap = health.spend_cap(provider.daily_spend_cap)
        reason = None
        if route.service in status.missing:
            reason = _MISSING
        elif not status.takes_orders:
            reason = _OPEN
        elif floor is not None and cost is not None and below_floor(cost, charge, floor):
            reason = _MARGIN
        elif health.over_cap(cap, status.spent_today, cost):
            reason = _SPEND_CAP
        elif status.benched(cost):
            reason = _BENCHED
        margin = None if cost is None else charge - cost
        judged.append(Step(rank, route, status.state, cost, margin, reason))
    eligible = [step for step in judged if step.reason is None]
    benched = [step for step in judged if step.reason is _BENCHED]
    if not eligible and benched:
        eligible = [step._replace(reason=None) for step in benched]
    strategy = strategy_of(config, service)
    ordered = _order(strategy, service, eligible, outcomes, rng)
    tried = {step.rank for step in ordered}
    return Plan(service.id, strategy, (*ordered, *(s for s in judged if s.rank not in tried)))


def _order(
    strategy: Strategy,
    service: Service,
    steps: Sequence[Step],
    outcomes: Mapping[RateKey, Outcomes],
    rng: random.Random | None,
) -> list[Step]:
    """`steps` (in rank order) in the order `strategy` tries them; `rng` None: no draw."""
    if len(steps) < 2 or strategy is _RANKED:
        return list(steps)
    if strategy is _CHEAPEST:
        return sorted(steps, key=lambda s: (s.upstream_cost is None, s.upstream_cost or 0, s.rank))
    if strategy is _WEIGHTED:
        weights = [step.route.weight or DEFAULT_WEIGHT for step in steps]
        if rng is None:  # the heaviest first (the first of them on a tie)
            first = weights.index(max(weights))
        else:
            first = rng.choices(range(len(steps)), weights=weights)[0]
        return [steps[first], *(step for index, step in enumerate(steps) if index != first)]
    scores = quality_scores(service, outcomes)
    ordered = sorted(steps, key=lambda s: (-scores[s.route.provider, s.route.service], s.rank))
    if rng is not None and rng.random() < EXPLORE_SHARE:
        pick = rng.randrange(1, len(ordered))
        ordered.insert(0, ordered.pop(pick))
    return ordered
