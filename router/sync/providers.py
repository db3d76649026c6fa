"""Provider balances and catalogues: the loops that keep them current, and the reports on them.

Usage::

    watcher = ProviderWatcher(config, store, clients, fleet, metrics)
    await watcher.restore()            # at start-up: the fleet, catalogue sizes, last balances
    await watcher.balances_once()      # one pass; `run_balances()` loops (same for catalogues)
    watcher.reconfigure(config, clients, fresh={"beta"})               # a config reload
    rows = await provider_report(config, store, since=..., until=...)   # `smm-router providers`
    problems, probes = await check_online(config)                       # `check --online`

Balances: every `sync.balance_interval` each provider's balance is read, stored and exported,
and given to the fleet (router.fleet): a read that shows money came in lifts the funds bench.
Each provider has its own loop, which also PROBES: when the provider's breaker is open, a
`balance` call goes out as soon as its cooldown has passed (the loop wakes at `probe_at`, not
at the next interval), and its answer closes the breaker (any answer: the provider is up) or
reopens it (unreachable, ambiguous, HTTP 429, a 4xx page without the panel's error text: see
router.upstream). Orders are never probes.

Catalogues: every `sync.catalogue_interval` each provider's `services` are fetched; what they say
of each routed upstream service is stored, its rate goes to the fleet (the `cheapest` strategy
and the margin floor cost orders with it), and a routed service they no longer list is skipped
by routing. An answer that is an error, empty or unparseable changes nothing (the client raises
for all of those). Neither does, once, a valid answer listing less than MIN_CATALOGUE_SHARE of
the last accepted catalogue (a truncated or wrong-account answer would otherwise disable most
routes at once): it is held back and accepted only when the next fetch lists the same services.

Every REFRESH_INTERVAL the fleet re-reads what the store knows better than memory: the quality
outcomes, and the spend of a new UTC day.

Until a status answer records an order's real cost, the `providers` report and the spend cap
both count it at the cost it was planned at (Store.provider_margin, router.fleet); the report
costs an order without one (imported) at its route's catalogue rate now.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Final

import aiohttp
import structlog

from router import v2
from router.config import Config, Service
from router.fleet import Fleet, routed_services
from router.health import State
from router.metrics import CATALOGUE_OUTCOMES, Metrics
from router.routing import to_base
from router.store import (
    BalanceRead,
    CallLatency,
    CatalogueFetch,
    ProviderMargin,
    RouteListing,
    Store,
)
from router.upstream import (
    Outcome,
    UpstreamClient,
    UpstreamError,
    UpstreamService,
    UpstreamUnreachable,
)

log = structlog.get_logger("router.sync.providers")

MIN_CATALOGUE_SHARE: Final = 0.5
BALANCE_RETENTION_SECONDS: Final = 30 * 24 * 3600.0  # also of the breaker's transitions
BALANCE_PRUNE_INTERVAL: Final = 3600.0
REFRESH_INTERVAL: Final = 60.0  # quality outcomes; the spend of a new UTC day


# --- The loops -----------------------------------------------------------------------------------


class ProviderWatcher:
    """Reads balances and catalogues, stores them, and tells the fleet (router.fleet)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clients: Mapping[str, UpstreamClient],
        fleet: Fleet,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.fleet = fleet
        self.metrics = metrics
        self._routed = routed_services(config)
        self._sizes: dict[str, int] = {}  # services in each provider's last accepted catalogue
        self._held_back: dict[str, frozenset[int]] = {}  # a shrunken catalogue awaiting its repeat
        self._currencies: dict[str, str] = {}  # the currency label of each balance gauge
        self._woken = asyncio.Event()  # set (and replaced) to end the loops' pauses at once
        for name in config.providers:
            self._export_provider(name)

    def _export_provider(self, name: str) -> None:
        """The label sets and gauges of one provider (at start-up, or added by a reload); its
        state gauges are the fleet's."""
        missing = partial(self._missing, name)
        self.metrics.routes_missing.labels(provider=name).set_function(missing)
        for outcome in CATALOGUE_OUTCOMES:
            self.metrics.catalogue_fetches.labels(provider=name, outcome=outcome)

    def _unexport_provider(self, name: str) -> None:
        """Drop the gauges of a provider a reload removed: a balance it no longer has would
        read as current. Its counters stay (they only ever grow)."""
        with contextlib.suppress(KeyError):
            self.metrics.routes_missing.remove(name)
        if (currency := self._currencies.pop(name, None)) is not None:
            with contextlib.suppress(KeyError):
                self.metrics.provider_balance.remove(name, currency)

    def reconfigure(
        self, config: Config, clients: Mapping[str, UpstreamClient], *, fresh: Set[str]
    ) -> None:
        """Watch the providers of `config` through `clients` from now on (a config reload).

        `fresh`: providers added, or whose URL, key or currency changed: what was learnt of
        their catalogue size no longer holds (their health is reset by the fleet). The
        catalogue loop ends its pause now, so new and changed providers are read at once; the
        balance loops follow the fleet's `providers_changed`.
        """
        old = self.config
        self.config, self.clients = config, clients
        self._routed = routed_services(config)
        for name in fresh:
            self._sizes.pop(name, None)
            self._held_back.pop(name, None)
        for name in old.providers:
            if name not in config.providers:
                self._unexport_provider(name)
        for name in config.providers:
            if name not in old.providers:
                self._export_provider(name)
        self._woken.set()
        self._woken = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or until a reload ends the pause."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), seconds)

    def _missing(self, name: str) -> float:
        found = self.fleet.health.get(name)
        return 0.0 if found is None else float(len(found.missing))

    async def restore(self) -> None:
        """Load what the store knows (at start-up): the fleet, catalogue sizes, last balances."""
        await self.fleet.restore()
        self._sizes = {n: f.services for n, f in (await self.store.catalogue_fetches()).items()}
        for name, read in (await self.store.last_balances()).items():
            if name in self.config.providers:
                self._export_balance(read)

    # --- balances ---------------------------------------------------------------------------------

    async def balances_once(self) -> None:
        """Read every provider's balance once, at the same time (each also a probe)."""
        await asyncio.gather(*(self._balance(name) for name in self.clients))

    async def _balance(self, name: str) -> None:
        sent_clock, sent_wall = self.fleet.clock(), self.fleet.wall()
        client = self.clients[name]
        try:
            amount, currency = await client.balance()
        except UpstreamError as exc:
            log.warning("provider_balance_failed", provider=name, error=exc.message)
            if self.clients.get(name) is client:
                await self.fleet.after_balance_error(name, exc)
            return
        if self.clients.get(name) is not client:
            return  # a reload removed or changed it meanwhile: this was the old account's
        read = BalanceRead(name, v2.to_minor(amount), currency, sent_wall)
        # The fleet first: a probe's answer must close the breaker even if it cannot be stored.
        await self.fleet.after_balance(name, read.balance, sent_at=sent_clock)
        try:
            await self.store.record_balance(read)
        except Exception:
            log.exception("provider_balance_not_stored", provider=name)
            return
        self._export_balance(read)

    def _export_balance(self, read: BalanceRead) -> None:
        old = self._currencies.get(read.provider)
        if old is not None and old != read.currency:
            self.metrics.provider_balance.remove(read.provider, old)
        self._currencies[read.provider] = read.currency
        gauge = self.metrics.provider_balance.labels(provider=read.provider, currency=read.currency)
        gauge.set(read.balance / v2.MINOR_PER_UNIT)

    async def run_balances(self) -> None:
        """A balance loop (reads and probes) per provider of `clients`, and the pruning, until
        cancelled. The loops follow `clients` when the fleet's providers change (a reload)."""
        loops: dict[str, asyncio.Task[None]] = {}
        prune = asyncio.create_task(self._prune(), name="balance-prune")
        changed = self.fleet.providers_changed
        try:
            while True:
                changed.clear()
                for name in self.clients:
                    if name not in loops:
                        loop = self._balance_loop(name)
                        loops[name] = asyncio.create_task(loop, name=f"balance-{name}")
                for name in [name for name in loops if name not in self.clients]:
                    loops.pop(name).cancel()
                await changed.wait()
        finally:
            for task in [*loops.values(), prune]:
                task.cancel()
            for task in [*loops.values(), prune]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _balance_loop(self, name: str) -> None:
        """Read `name`'s balance every `sync.balance_interval`, and at its breaker's `probe_at`.

        Woken when its breaker opens or closes, so a probe is never late. A probe whose answer
        did not move the breaker (a read that crashed) is not repeated for the same opening.
        """
        moved = self.fleet.moved(name)
        next_read = self.fleet.clock()
        probed: float | None = None  # the probe_at the last read was sent for
        while True:
            moved.clear()  # before reading the breaker: a move from here on wakes the wait
            now = self.fleet.clock()
            probe_at = self.fleet.probe_at(name)
            if probe_at is not None and probe_at == probed:
                probe_at = None
            due = next_read if probe_at is None else min(next_read, probe_at)
            if now < due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(moved.wait(), due - now)
                continue
            probed = probe_at if probe_at is not None and probe_at <= now else None
            try:
                await self._balance(name)
            except Exception:
                log.exception("balance_read_failed", provider=name)
            next_read = self.fleet.clock() + self.config.sync.balance_interval

    async def _prune(self) -> None:
        """Forget old balance reads and breaker transitions, every BALANCE_PRUNE_INTERVAL."""
        while True:
            try:
                older_than = self.fleet.wall() - BALANCE_RETENTION_SECONDS
                await self.store.prune_balances(older_than)
                await self.store.prune_breaker_events(older_than)
            except Exception:
                log.exception("balance_prune_failed")
            await asyncio.sleep(BALANCE_PRUNE_INTERVAL)

    # --- what the store knows better ------------------------------------------------------------

    async def refresh_once(self) -> None:
        """The fleet's quality outcomes from the store, and its spend on a new UTC day."""
        await self.fleet.refresh_outcomes()
        await self.fleet.seed_spend_on_a_new_day()

    async def run_refresh(self) -> None:
        """`refresh_once` every REFRESH_INTERVAL until cancelled."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)  # restore() has just read them
            try:
                await self.refresh_once()
            except Exception:
                log.exception("fleet_refresh_failed")

    # --- catalogues -------------------------------------------------------------------------------

    async def catalogues_once(self) -> None:
        """Fetch every provider's catalogue once, at the same time."""
        await asyncio.gather(*(self._catalogue(name) for name in self.clients))

    async def _catalogue(self, name: str) -> None:
        fetched_at = self.fleet.wall()
        client = self.clients[name]
        try:
            catalogue = await client.catalogue()
        except UpstreamError as exc:
            outcome = "refused" if exc.outcome is Outcome.NO_FUNDS else str(exc.outcome)
            self.metrics.catalogue_fetches.labels(provider=name, outcome=outcome).inc()
            log.warning("catalogue_unusable", provider=name, outcome=outcome, error=exc.message)
            return
        if self.clients.get(name) is not client:
            return  # a reload removed or changed it meanwhile: this was the old server's
        listed: dict[int, UpstreamService] = {}
        for entry in catalogue.services:
            listed.setdefault(entry.service, entry)
        # A listed entry we cannot read is still there: its route keeps its last known terms.
        ids = frozenset(listed) | catalogue.unreadable
        last = self._sizes.get(name)
        if last and len(ids) < last * MIN_CATALOGUE_SHARE and self._held_back.get(name) != ids:
            self._held_back[name] = ids
            self.metrics.catalogue_fetches.labels(provider=name, outcome="held_back").inc()
            log.warning("catalogue_held_back", provider=name, services=len(ids), before=last)
            return
        self._held_back.pop(name, None)
        routed = self._routed.get(name, frozenset())
        listings = [
            _listing(name, service, listed.get(service))
            for service in sorted(routed - catalogue.unreadable)
        ]
        try:
            await self.store.record_catalogue(name, fetched_at, len(ids), listings)
        except Exception:
            log.exception("catalogue_not_stored", provider=name)
            return
        self._sizes[name] = len(ids)
        self.metrics.catalogue_fetches.labels(provider=name, outcome="accepted").inc()
        found = self.fleet.health.get(name)
        before = frozenset() if found is None else found.missing
        missing = routed - ids
        for service in sorted(missing - before):
            log.warning("upstream_service_gone", provider=name, upstream_service=service)
        for service in sorted(before - missing):
            log.info("upstream_service_back", provider=name, upstream_service=service)
        rates = {item.service: item.rate for item in listings if item.rate is not None}
        self.fleet.set_catalogue(name, rates, missing)

    async def run_catalogues(self) -> None:
        """Fetch catalogues every `sync.catalogue_interval` until cancelled."""
        while True:
            try:
                await self.catalogues_once()
            except Exception:
                log.exception("catalogue_pass_failed")
            await self._pause(self.config.sync.catalogue_interval)


def _listing(provider: str, service: int, entry: UpstreamService | None) -> RouteListing:
    if entry is None:
        return RouteListing(provider, service, present=False)
    return RouteListing(
        provider,
        service,
        present=True,
        name=entry.name,
        type=entry.type,
        rate=v2.to_minor(entry.rate),
        min=entry.min,
        max=entry.max,
        refill=entry.refill,
        cancel=entry.cancel,
        dripfeed=entry.dripfeed,
    )


# --- `smm-router providers` ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderReport:
    """One row of `smm-router providers`: money, health and state of one provider."""

    provider: str
    currency: str  # the provider's, from the config
    money: ProviderMargin  # in minor units of the config's currency
    add_attempts: int
    add_accepted: int
    latency: CallLatency
    health: State  # healthy, open, half_open or benched (router.health)
    benched_until: float | None  # unix time, while benched
    benched_from: int | None  # while benched: orders costing this or more skip it (minor units)
    probe_at: float | None  # unix time, while its breaker is open: when a balance call probes it
    catalogue: CatalogueFetch | None  # None: no usable catalogue yet
    routes_gone: tuple[int, ...]  # routed upstream services its catalogue no longer lists
    balance: BalanceRead | None  # the last read

    @property
    def add_success_rate(self) -> float | None:
        return self.add_accepted / self.add_attempts if self.add_attempts else None

    @property
    def state(self) -> str:
        """Its health state; a healthy provider without a usable catalogue yet says so."""
        if self.health is not State.HEALTHY or self.catalogue is not None:
            return str(self.health)
        return "catalogue missing"


async def provider_report(
    config: Config,
    store: Store,
    *,
    since: float = 0.0,
    until: float = math.inf,
    now: float | None = None,
) -> list[ProviderReport]:
    """One ProviderReport per configured provider, over orders and calls in [since, until).

    States are the fleet's as the store shows them at `now` (router.fleet.Fleet.restore).
    """
    now = time.time() if now is None else now
    fleet = Fleet(config, store, clock=lambda: now, wall=lambda: now)
    await fleet.restore()
    fetches = await store.catalogue_fetches()
    balances = await store.last_balances()
    routed = routed_services(config)
    gone: dict[str, list[int]] = {}
    for listing in await store.route_catalogue():
        if not listing.present and listing.service in routed.get(listing.provider, ()):
            gone.setdefault(listing.provider, []).append(listing.service)
    rows = []
    for name, provider in config.providers.items():
        rate = to_base(config, provider.currency)
        outcomes = await store.add_outcomes(name, since=since, until=until)
        health = fleet.health[name]
        benched = health.bench.active(now)
        rows.append(
            ProviderReport(
                provider=name,
                currency=provider.currency,
                money=await store.provider_margin(name, rate, since=since, until=until),
                add_attempts=sum(outcomes.values()),
                add_accepted=outcomes.get(str(Outcome.ACCEPTED), 0),
                latency=await store.call_latency(name, since=since, until=until),
                health=health.state(now),
                benched_until=health.bench.until if benched else None,
                benched_from=health.bench.threshold if benched else None,
                probe_at=health.breaker.probe_at,
                catalogue=fetches.get(name),
                routes_gone=tuple(gone.get(name, ())),
                balance=balances.get(name),
            )
        )
    return rows


# --- `smm-router check --online` -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What one provider answered to `services` and `balance`."""

    provider: str
    catalogue: Mapping[int, UpstreamService] | None
    catalogue_error: UpstreamError | None
    balance: Decimal | None
    currency: str | None
    balance_error: UpstreamError | None


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # in the YAML, as the offline check writes it
    kind: str  # unreachable, catalogue, gone, type, loss, min, max, refill, cancel, dripfeed,
    # balance, currency
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


async def probe_providers(config: Config) -> dict[str, Probe]:
    """Ask every provider for its catalogue and balance, all at once, on one session."""
    async with aiohttp.ClientSession(headers={"User-Agent": "smm-router"}) as session:
        clients = {name: UpstreamClient(p, session) for name, p in config.providers.items()}
        probes = await asyncio.gather(*(_probe(client) for client in clients.values()))
    return {probe.provider: probe for probe in probes}


async def _probe(client: UpstreamClient) -> Probe:
    catalogue: dict[int, UpstreamService] | None = None
    catalogue_error: UpstreamError | None = None
    try:
        entries = await client.services()
    except UpstreamError as exc:
        catalogue_error = exc
    else:
        catalogue = {}
        for entry in entries:
            catalogue.setdefault(entry.service, entry)
    amount: Decimal | None = None
    currency: str | None = None
    balance_error: UpstreamError | None = None
    if isinstance(catalogue_error, UpstreamUnreachable):
        balance_error = catalogue_error  # nothing answers there: no second wait
    else:
        try:
            amount, currency = await client.balance()
        except UpstreamError as exc:
            balance_error = exc
    return Probe(client.name, catalogue, catalogue_error, amount, currency, balance_error)


def route_problems(config: Config, probes: Mapping[str, Probe]) -> list[Problem]:
    """Every problem the providers' answers show with the config, by YAML path."""
    problems: list[Problem] = []
    for name, provider in config.providers.items():
        probe = probes[name]
        path = f"providers.{name}"
        error = probe.balance_error
        if isinstance(error, UpstreamUnreachable):
            problems.append(Problem(path, "unreachable", f"unreachable: {error.message}"))
        elif error is not None:
            problems.append(Problem(path, "balance", f"no balance: {error.message}"))
        elif probe.balance is not None and probe.balance <= 0:
            shown = f"{v2.format_money(probe.balance)} {probe.currency}"
            problems.append(Problem(path, "balance", f"balance is {shown}: it takes no orders"))
        if probe.currency is not None and probe.currency != provider.currency:
            problems.append(
                Problem(
                    f"{path}.currency",
                    "currency",
                    f"{name} bills in {probe.currency}, the config says {provider.currency}",
                )
            )
    for service in config.services.values():
        for index in range(len(service.route)):
            path = f"services.{service.id}.route[{index}]"
            problems += [
                Problem(path, kind, message)
                for kind, message in _route_problems(config, service, index, probes)
            ]
    return problems


def _route_problems(
    config: Config, service: Service, index: int, probes: Mapping[str, Probe]
) -> list[tuple[str, str]]:
    route = service.route[index]
    probe = probes[route.provider]
    at = f"at {route.provider}"
    if probe.catalogue is None:
        error = probe.catalogue_error
        assert error is not None
        if isinstance(error, UpstreamUnreachable):
            return [("unreachable", f"provider {route.provider} is unreachable: {error.message}")]
        return [("catalogue", f"provider {route.provider} gave no catalogue: {error.message}")]
    upstream = probe.catalogue.get(route.service)
    if upstream is None:
        return [("gone", f"upstream service {route.service} {at} is gone")]
    found: list[tuple[str, str]] = []
    label = f"upstream service {route.service} {at}"
    if upstream.type.strip().lower() != service.type.lower():
        found.append(("type", f"{label} is of type '{upstream.type}', ours is '{service.type}'"))
    currency = config.providers[route.provider].currency
    cost = upstream.rate * to_base(config, currency)
    if cost > service.rate:
        ours = f"{v2.format_money(service.rate)} {config.currency}"
        theirs = f"{v2.format_money(upstream.rate)} {currency}"
        if currency != config.currency:
            theirs += f" ({v2.format_money(cost)} {config.currency})"
        found.append(("loss", f"{label} costs {theirs}, above our rate {ours}: a loss"))
    if upstream.min > service.min:
        found.append(("min", f"{label} takes at least {upstream.min}, our min is {service.min}"))
    if upstream.max < service.max:
        found.append(("max", f"{label} takes at most {upstream.max}, our max is {service.max}"))
    for flag in ("refill", "cancel", "dripfeed"):
        if getattr(service, flag) and not getattr(upstream, flag):
            found.append((flag, f"we offer {flag}, {label} does not"))
    return found


async def check_online(config: Config) -> tuple[list[Problem], dict[str, Probe]]:
    """Call every provider and compare its answers with the config."""
    probes = await probe_providers(config)
    return route_problems(config, probes), probes
