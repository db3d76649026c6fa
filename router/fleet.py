"""The fleet: what the router knows of its providers now, and each order's plan from it.

Usage::

    fleet = Fleet(config, store, metrics)
    await fleet.restore()                                 # at start-up, from the store
    plan = fleet.plan(service, quantity=q, charge=c, rng=rng)   # no I/O: memory only
    await fleet.after_add(provider, result, cost=step.upstream_cost)   # every `add` call
    fleet.after_spend(provider, step.upstream_cost)                    # every accepted order
    await fleet.after_balance(provider, balance, sent_at=sent)         # every balance read
    report = await route_report(config, store, 1)                      # `smm-router routes 1`

Planning an order reads memory only: each provider's health (router.health: its breaker, its
funds bench, its spend of the UTC day, its upstream services gone from the catalogue), the
catalogue rate of each routed upstream service (kept by the catalogue loop), and the final
outcomes the quality strategy scores (refreshed by the provider watcher). The order desk feeds
it every `add`, the provider watcher every balance read and catalogue, the status sync every
recorded cost.

`restore` rebuilds it from the store, and is the one way anything does: the server at start-up,
and the command line (`routes`, `providers`, the operator's desk), which has no other view of the
server's memory:
- catalogue: the stored rates and the routed upstream services gone;
- funds bench: replayed from the stored `no_funds` attempts, each with the cost its order was
  planned at, and the balance reads around them (router.health.replay_bench);
- breaker: the last stored transition. The fleet writes one each time a breaker opens, reopens
  or closes (a transition, not a call: rare), because a breaker is closed by a `balance` probe
  that no attempt records: replaying attempts could not tell an open breaker from one a probe
  closed. Half-open is not stored: it is open with its cooldown over;
- spend of the day, for providers with a `daily_spend_cap`: the recorded cost, else the planned
  cost, of the orders they hold that were created since the last UTC midnight. Each accepted
  order adds its planned cost at once, each cost the status sync records corrects it, and the
  provider watcher seeds it again once a new UTC day has begun;
- quality outcomes (only when a service routes by `quality`): the final outcomes of the last
  QUALITY_DAYS, by provider and upstream service.

Times: `clock` for health (monotonic in the server; the command line uses the wall clock),
`wall` for what the store keeps and for the UTC day.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from typing import Final

import structlog

from router import health, v2
from router.config import Config, Service, Strategy
from router.health import Answer, FundsBench, ProviderHealth, State
from router.metrics import Metrics
from router.routing import (
    NO_OUTCOMES,
    QUALITY_DAYS,
    Outcomes,
    Plan,
    RateKey,
    is_flat,
    plan_order,
    quality_scores,
    strategy_of,
)
from router.store import Store
from router.upstream import (
    AddResult,
    Outcome,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTurnedAway,
)

log = structlog.get_logger("router.fleet")

REFUSALS_PAGE: Final = 100  # `no_funds` attempts read at once when replaying a bench
DAY_SECONDS: Final = 86400.0


def routed_services(config: Config) -> dict[str, frozenset[int]]:
    """The upstream services each provider's routes point at."""
    routed: dict[str, set[int]] = {name: set() for name in config.providers}
    for service in config.services.values():
        for route in service.route:
            routed.setdefault(route.provider, set()).add(route.service)
    return {name: frozenset(services) for name, services in routed.items()}


def uses_quality(config: Config) -> bool:
    """Whether any service routes by `quality` (only then are outcomes read)."""
    return any(strategy_of(config, s) is Strategy.QUALITY for s in config.services.values())


def day_start(day: date) -> float:
    """The unix time of a UTC day's midnight."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


class Fleet:
    """Every configured provider's health, the catalogue rates and the quality outcomes."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.health: dict[str, ProviderHealth] = {
            name: ProviderHealth() for name in config.providers
        }
        self.rates: dict[RateKey, int] = {}  # catalogue rate per 1000 (flat: per order), minor
        self.outcomes: Mapping[RateKey, Outcomes] = NO_OUTCOMES
        self.spend_day: date | None = None  # the UTC day the spend was last seeded for
        # Set when a breaker opens or closes: the provider's probe loop reschedules at once.
        self._moved = {name: asyncio.Event() for name in config.providers}
        # Set when `reconfigure` changes the providers: the balance loops follow.
        self.providers_changed = asyncio.Event()
        for name in config.providers:
            self._export(name)

    def _export(self, name: str) -> None:
        """`smm_router_provider_state` of one provider, read from its health at each scrape."""
        if self.metrics is None:
            return
        for state in health.STATES:
            gauge = self.metrics.provider_state.labels(provider=name, state=str(state))
            gauge.set_function(partial(self._in_state, name, state))

    def _in_state(self, name: str, state: State) -> float:
        return float(self.state(name) is state)

    def reconfigure(self, config: Config, *, fresh: Set[str] = frozenset()) -> None:
        """Plan with `config` from now on (a config reload). A provider it adds, or one in
        `fresh` (another server or account now: URL, key or currency changed), starts healthy
        with no rates; one it removes is forgotten, with its gauges. Orders already planned
        finish on their plan. The balance loops follow (`providers_changed`).
        """
        old, self.config = self.config, config
        for name in old.providers:
            if name not in config.providers or name in fresh:
                self.health.pop(name, None)
                self.rates = {key: rate for key, rate in self.rates.items() if key[0] != name}
            if name not in config.providers and self.metrics is not None:
                for state in health.STATES:
                    with contextlib.suppress(KeyError):
                        self.metrics.provider_state.remove(name, str(state))
        for name in config.providers:
            if name not in self.health:
                self.health[name] = ProviderHealth()
            if name not in old.providers:
                self._export(name)
        self.providers_changed.set()

    # --- what routing reads -----------------------------------------------------------------

    def today(self) -> date:
        return health.utc_day(self.wall())

    def state(self, provider: str) -> State:
        """The provider's state now (`smm_router_provider_state`)."""
        found = self.health.get(provider)
        return State.HEALTHY if found is None else found.state(self.clock())

    def status(self, provider: str) -> health.ProviderStatus:
        found = self.health.get(provider)
        if found is None:
            return health.HEALTHY
        return found.status(now=self.clock(), day=self.today())

    def plan(
        self, service: Service, *, quantity: int, charge: int, rng: random.Random | None
    ) -> Plan:
        """The plan of one order (routing.plan_order) on what the fleet knows now."""
        now, day = self.clock(), self.today()
        providers = {
            route.provider: found.status(now=now, day=day)
            for route in service.route
            if (found := self.health.get(route.provider)) is not None
        }
        return plan_order(
            self.config,
            service,
            quantity=quantity,
            charge=charge,
            providers=providers,
            rates=self.rates,
            outcomes=self.outcomes,
            rng=rng,
        )

    def probe_at(self, provider: str) -> float | None:
        """When the provider's open breaker may be probed (on `clock`); None while closed."""
        found = self.health.get(provider)
        return None if found is None else found.breaker.probe_at

    def moved(self, provider: str) -> asyncio.Event:
        """Set whenever the provider's breaker opens or closes (its probe loop clears it)."""
        return self._moved.setdefault(provider, asyncio.Event())

    # --- what the desk, the watcher and the status sync tell it -----------------------------

    async def after_add(self, provider: str, result: AddResult, *, cost: int | None) -> None:
        """An `add` at `provider` for an order costing `cost` there (None: unknown) ended."""
        found = self.health.get(provider)
        if found is None:
            return  # a provider no longer configured (a held order re-routed after a change)
        before = found.breaker.opened_at
        found.after_add(
            result.outcome,
            rate_limited=result.rate_limited,
            turned_away=result.turned_away,
            cost=cost,
            now=self.clock(),
            rules=self.config.health,
            backoff=self.config.sync.no_funds_backoff,
        )
        if result.outcome is Outcome.NO_FUNDS:
            threshold = found.bench.threshold
            log.info(
                "provider_benched",
                provider=provider,
                from_cost=None if threshold is None else v2.format_money(threshold),
            )
        if before is None and found.breaker.opened_at is not None:
            # The last answer's kind and text (redacted), so that the log says why.
            answer = Answer.of(
                result.outcome, rate_limited=result.rate_limited, turned_away=result.turned_away
            )
            log.warning(
                "provider_breaker_opened",
                provider=provider,
                outcome=str(result.outcome),
                answer=str(answer),
                error=result.error,
            )
            await self._transition(provider, "open")

    async def after_balance(self, provider: str, balance: int, *, sent_at: float) -> None:
        """A balance read sent at `sent_at` (on `clock`) answered `balance` (minor units)."""
        found = self.health.get(provider)
        if found is None:
            return
        now = self.clock()
        opened, benched = found.breaker.opened_at, found.bench.active(now)
        found.after_balance(balance, sent_at=sent_at, now=now, rules=self.config.health)
        if benched and not found.bench.active(now):
            log.info("provider_funds_back", provider=provider, balance=v2.format_money(balance))
        if opened is not None and found.breaker.opened_at is None:
            log.info("provider_breaker_closed", provider=provider)
            await self._transition(provider, "healthy")

    async def after_balance_error(self, provider: str, error: UpstreamError) -> None:
        """A balance read failed: a probe that fails reopens a half-open breaker."""
        found = self.health.get(provider)
        if found is None:
            return
        opened = found.breaker.opened_at
        found.after_balance_error(
            error.outcome,
            rate_limited=isinstance(error, UpstreamRateLimited),
            turned_away=isinstance(error, UpstreamTurnedAway),
            now=self.clock(),
            rules=self.config.health,
        )
        if found.breaker.opened_at != opened:
            log.warning("provider_breaker_reopened", provider=provider, error=error.message)
            await self._transition(provider, "open")

    async def _transition(self, provider: str, state: str) -> None:
        """Store a breaker transition (for restarts and the CLI) and wake its probe loop."""
        self.moved(provider).set()
        try:
            await self.store.record_breaker_event(provider, self.wall(), state)
        except Exception:  # the transition holds in memory; an order must not fail for it
            with contextlib.suppress(Exception):
                log.exception("breaker_event_not_stored", provider=provider, state=state)

    def after_spend(self, provider: str, cost: int | None) -> None:
        """An order planned to cost `cost` (None: unknown) at `provider` was accepted there."""
        if cost and self._capped(provider):
            self.health[provider].after_spend(cost, day=self.today())

    def correct_spend(self, provider: str, change: int, *, created_at: float) -> None:
        """A recorded cost changed what an order created at `created_at` (unix time) costs by
        `change`: counted if that order is of the current UTC day."""
        if not change or not self._capped(provider):
            return
        day = self.today()
        if health.utc_day(created_at) == day:
            found = self.health[provider]
            found.set_spend(max(found.spend.on(day) + change, 0), day=day)

    def _capped(self, provider: str) -> bool:
        configured = self.config.providers.get(provider)
        return (
            configured is not None
            and configured.daily_spend_cap is not None
            and provider in self.health
        )

    def set_catalogue(
        self, provider: str, rates: Mapping[int, int], missing: frozenset[int]
    ) -> None:
        """A usable catalogue: the rates it lists (by upstream service), the routed ones gone."""
        for service, rate in rates.items():
            self.rates[provider, service] = rate
        found = self.health.get(provider)
        if found is not None:
            found.missing = missing

    # --- from the store ---------------------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild everything from the store (see the module docstring)."""
        routed = routed_services(self.config)
        missing: dict[str, set[int]] = {}
        rates: dict[RateKey, int] = {}
        for listing in await self.store.route_catalogue():
            if listing.service not in routed.get(listing.provider, ()):
                continue
            if not listing.present:
                missing.setdefault(listing.provider, set()).add(listing.service)
            if listing.rate is not None:
                rates[listing.provider, listing.service] = listing.rate
        self.rates = rates
        names = list(self.config.providers)
        events = await self.store.last_breaker_events(names)
        for name in names:
            restored = ProviderHealth()
            restored.missing = frozenset(missing.get(name, ()))
            restored.bench = await self._stored_bench(name)
            event = events.get(name)
            if event is not None and event.state == "open":
                restored.breaker.restore(self._on_clock(event.at), self.config.health)
            self.health[name] = restored
        await self.seed_spend()
        await self.refresh_outcomes()

    def _on_clock(self, at: float) -> float:
        """A unix time on `clock`."""
        return at + self.clock() - self.wall()

    async def _stored_bench(self, provider: str) -> FundsBench:
        """The provider's bench, replayed from its refusals that may still bench it now.

        A refusal benches until `sync.no_funds_backoff` after it; one that came while an earlier
        bench stood lowers and prolongs that bench. So the refusals that count are the latest
        run without a gap of a back-off between two (and the last within one of now).
        """
        backoff = self.config.sync.no_funds_backoff
        now = self.wall()
        run: list[tuple[float, int | None]] = []
        newest = now
        before, complete = math.inf, False
        while not complete:
            page = await self.store.no_funds_refusals(provider, before=before, limit=REFUSALS_PAGE)
            for refusal in page:  # the latest first
                if newest - refusal.at >= backoff:
                    complete = True
                    break
                run.append((refusal.at, refusal.cost))
                newest = refusal.at
            if len(page) < REFUSALS_PAGE:
                complete = True
            elif page:
                before = page[-1].started_at
        since = min((at for at, _ in run), default=math.inf)
        reads = await self.store.balance_reads(provider, since)
        return health.replay_bench(
            [(self._on_clock(at), cost) for at, cost in run],
            [(self._on_clock(read.read_at), read.balance) for read in reads],
            backoff=backoff,
        )

    async def seed_spend(self) -> None:
        """The spend of the UTC day of each capped provider, as the store has it."""
        day = self.today()
        capped = [name for name in self.health if self._capped(name)]
        spent = await self.store.spend_since(capped, day_start(day)) if capped else {}
        for name, amount in spent.items():
            self.health[name].set_spend(amount, day=day)
        self.spend_day = day

    async def seed_spend_on_a_new_day(self) -> None:
        """Seed the spend again once a new UTC day has begun (what another process placed)."""
        if self.spend_day != self.today():
            await self.seed_spend()

    async def refresh_outcomes(self) -> None:
        """The final outcomes of the last QUALITY_DAYS, when a service routes by quality."""
        if not uses_quality(self.config):
            self.outcomes = NO_OUTCOMES
            return
        since = self.wall() - QUALITY_DAYS * DAY_SECONDS
        self.outcomes = {
            (row.provider, row.upstream_service): Outcomes(
                row.completed, row.partial, row.canceled, row.partial_delivered
            )
            for row in await self.store.final_outcomes(since)
        }


# --- `smm-router routes` -------------------------------------------------------------------------


class ReportRefused(Exception):
    """A report that cannot be made as asked (an unknown service, a quantity out of range)."""


@dataclass(frozen=True, slots=True)
class RouteReport:
    """The plan a new order of `quantity` would get now (`smm-router routes`)."""

    service: Service
    quantity: int  # charged units (1 for flat-priced types)
    charge: int  # minor units
    plan: Plan
    config_version: str
    scores: Mapping[RateKey, float]  # `quality` only: the score of each route; else empty

    @property
    def drawn(self) -> bool:
        """Whether live orders draw their first route (weighted, quality): then the plan
        shown is the order the draws favour, not what every order gets."""
        return self.plan.strategy in (Strategy.WEIGHTED, Strategy.QUALITY)


async def route_report(
    config: Config, store: Store, service_id: int, *, quantity: int | None = None
) -> RouteReport:
    """The plan of a new order on service `service_id` from what the store shows now.

    `quantity` defaults to the service's minimum; a flat-priced type is one order whatever
    it is. The fleet is restored as the server restores it, on the wall clock.
    """
    service = config.services.get(service_id)
    if service is None:
        raise ReportRefused(f"no service {service_id} in the config")
    if is_flat(service.type):
        quantity, charge = 1, v2.to_minor(service.rate)
    else:
        quantity = service.min if quantity is None else quantity
        if not service.min <= quantity <= service.max:
            raise ReportRefused(
                f"service {service_id} takes a quantity from {service.min} to {service.max}"
            )
        charge = v2.order_charge(service.rate, quantity)
    fleet = Fleet(config, store, clock=time.time, wall=time.time)
    await fleet.restore()
    plan = fleet.plan(service, quantity=quantity, charge=charge, rng=None)
    scores = quality_scores(service, fleet.outcomes) if plan.strategy is Strategy.QUALITY else {}
    return RouteReport(service, quantity, charge, plan, config.version, scores)
