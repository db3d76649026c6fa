"""Provider balances and catalogues: the loops that keep them current, and the reports on them.

Usage::

    watcher = ProviderWatcher(config, store, clients, states, metrics)
    await watcher.restore()            # at start-up: stored catalogues and benches
    await watcher.balances_once()      # one pass; `run_balances()` loops (same for catalogues)
    watcher.reconfigure(config, clients, fresh={"beta"})               # a config reload
    rows = await provider_report(config, store, since=..., until=...)   # `smm-router providers`
    problems, probes = await check_online(config)                       # `check --online`

Balances: every `sync.balance_interval` each provider's balance is read, stored and exported.
A provider benched after `Not enough funds on balance` is back as soon as a read shows money came
in (router.routing.after_balance), or after `sync.no_funds_backoff`. Benches are not stored as
such: the attempts (`no_funds`) and the balance reads are, and replaying them gives the same
state after a restart and in the CLI.

Catalogues: every `sync.catalogue_interval` each provider's `services` are fetched; what they say
of each routed upstream service is stored, and a routed service they no longer list is skipped
by routing. An answer that is an error, empty or unparseable changes nothing (the client raises
for all of those). Neither does, once, a valid answer listing less than MIN_CATALOGUE_SHARE of
the last accepted catalogue (a truncated or wrong-account answer would otherwise disable most
routes at once): it is held back and accepted only when the next fetch lists the same services.

Cost estimates are not stored: until a status answer records an order's real cost, the reports
cost it at the catalogue rate of its route (Store.provider_margin).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence, Set
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import partial
from typing import Final

import aiohttp
import structlog

from router import routing, v2
from router.config import Config, Service
from router.metrics import CATALOGUE_OUTCOMES, Metrics
from router.routing import HEALTHY, ProviderState
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
BALANCE_RETENTION_SECONDS: Final = 30 * 24 * 3600.0
BALANCE_PRUNE_INTERVAL: Final = 3600.0


def to_base(config: Config, currency: str) -> Decimal:
    """What 1 unit of `currency` is worth in the config's currency (`fx`; config-checked)."""
    return Decimal(1) if currency == config.currency else config.fx[currency]


def routed_services(config: Config) -> dict[str, frozenset[int]]:
    """The upstream services each provider's routes point at."""
    routed: dict[str, set[int]] = {name: set() for name in config.providers}
    for service in config.services.values():
        for route in service.route:
            routed.setdefault(route.provider, set()).add(route.service)
    return {name: frozenset(services) for name, services in routed.items()}


def bench_from_history(
    no_funds_at: float | None, reads: Sequence[BalanceRead], *, backoff: float
) -> ProviderState:
    """Replay the last `Not enough funds` and the balance reads around it (one clock: unix).

    `reads` are in time order; only the last one before the bench matters there.
    """
    state = HEALTHY
    for read in reads:
        if no_funds_at is not None and read.read_at >= no_funds_at:
            break
        state = routing.after_balance(state, read.balance, read_at=read.read_at)
    if no_funds_at is None:
        return state
    state = routing.after_outcome(state, Outcome.NO_FUNDS, now=no_funds_at, backoff=backoff)
    for read in reads:
        if read.read_at >= no_funds_at:
            state = routing.after_balance(state, read.balance, read_at=read.read_at)
    return state


async def stored_benches(
    config: Config, store: Store, providers: Sequence[str]
) -> dict[str, ProviderState]:
    """Each provider's bench state as its stored attempts and balance reads say (unix clock)."""
    last = await store.last_no_funds(providers)
    states: dict[str, ProviderState] = {}
    for name in providers:
        since = last.get(name, math.inf)
        reads = await store.balance_reads(name, since)
        backoff = config.sync.no_funds_backoff
        states[name] = bench_from_history(last.get(name), reads, backoff=backoff)
    return states


# --- The loops -----------------------------------------------------------------------------------


class ProviderWatcher:
    """Reads balances and catalogues, stores them, and keeps routing's provider states current.

    `states` is the dict the OrderDesk routes with (app key PROVIDER_STATES); its times are on
    `clock` (monotonic), the stored ones on `wall` (unix).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        clients: Mapping[str, UpstreamClient],
        states: MutableMapping[str, ProviderState],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.states = states
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self._routed = routed_services(config)
        self._sizes: dict[str, int] = {}  # services in each provider's last accepted catalogue
        self._held_back: dict[str, frozenset[int]] = {}  # a shrunken catalogue awaiting its repeat
        self._currencies: dict[str, str] = {}  # the currency label of each balance gauge
        self._woken = asyncio.Event()  # set (and replaced) to end the loops' pauses at once
        for name in config.providers:
            self._export_provider(name)

    def _export_provider(self, name: str) -> None:
        """The label sets and gauges of one provider (at start-up, or added by a reload)."""
        metrics = self.metrics
        for state in ("ok", "benched"):
            gauge = metrics.provider_state.labels(provider=name, state=state)
            gauge.set_function(partial(self._in_state, name, state == "benched"))
        missing = partial(self._missing, name)
        metrics.routes_missing.labels(provider=name).set_function(missing)
        for outcome in CATALOGUE_OUTCOMES:
            metrics.catalogue_fetches.labels(provider=name, outcome=outcome)

    def _unexport_provider(self, name: str) -> None:
        """Drop the gauges of a provider a reload removed: a state or a balance it no longer
        has would read as current. Its counters stay (they only ever grow)."""
        for state in ("ok", "benched"):
            with contextlib.suppress(KeyError):
                self.metrics.provider_state.remove(name, state)
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
        their catalogue size no longer holds (their routing state is dropped by the caller).
        The loops end their pause now: new and changed providers are read at once, and new
        intervals apply.
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

    def _state(self, name: str) -> ProviderState:
        return self.states.get(name, HEALTHY)

    def _in_state(self, name: str, benched: bool) -> float:
        return float(self._state(name).benched(self.clock()) == benched)

    def _missing(self, name: str) -> float:
        return float(len(self._state(name).missing))

    async def restore(self) -> None:
        """Load the stored catalogues, benches and last balances (at start-up)."""
        self._sizes = {n: f.services for n, f in (await self.store.catalogue_fetches()).items()}
        missing: dict[str, set[int]] = {}
        for listing in await self.store.route_catalogue():
            if not listing.present and listing.service in self._routed.get(listing.provider, ()):
                missing.setdefault(listing.provider, set()).add(listing.service)
        names = list(self.config.providers)
        benches = await stored_benches(self.config, self.store, names)
        shift = self.clock() - self.wall()  # unix time -> clock time
        last_reads = await self.store.last_balances()
        for name in names:
            bench = benches[name]
            if bench.benched_until:
                bench = replace(
                    bench,
                    benched_until=bench.benched_until + shift,
                    benched_at=bench.benched_at + shift,
                )
            self.states[name] = replace(bench, missing=frozenset(missing.get(name, ())))
            if (read := last_reads.get(name)) is not None:
                self._export_balance(read)

    # --- balances ---------------------------------------------------------------------------------

    async def balances_once(self) -> None:
        """Read every provider's balance once, at the same time."""
        await asyncio.gather(*(self._balance(name) for name in self.clients))

    async def _balance(self, name: str) -> None:
        sent_clock, sent_wall = self.clock(), self.wall()
        client = self.clients[name]
        try:
            amount, currency = await client.balance()
        except UpstreamError as exc:
            log.warning("provider_balance_failed", provider=name, error=exc.message)
            return
        if self.clients.get(name) is not client:
            return  # a reload removed or changed it meanwhile: this was the old account's
        try:
            read = BalanceRead(name, v2.to_minor(amount), currency, sent_wall)
            await self.store.record_balance(read)
        except Exception:
            log.exception("provider_balance_not_stored", provider=name)
            return
        self._export_balance(read)
        before = self._state(name)
        after = routing.after_balance(before, read.balance, read_at=sent_clock)
        self.states[name] = after
        if before.benched(self.clock()) and not after.benched(self.clock()):
            log.info("provider_funds_back", provider=name, balance=v2.format_money(read.balance))

    def _export_balance(self, read: BalanceRead) -> None:
        old = self._currencies.get(read.provider)
        if old is not None and old != read.currency:
            self.metrics.provider_balance.remove(read.provider, old)
        self._currencies[read.provider] = read.currency
        gauge = self.metrics.provider_balance.labels(provider=read.provider, currency=read.currency)
        gauge.set(read.balance / v2.MINOR_PER_UNIT)

    async def run_balances(self) -> None:
        """Read balances every `sync.balance_interval` until cancelled; prune old reads."""
        pruned_at = -math.inf
        while True:
            try:
                await self.balances_once()
                if self.clock() - pruned_at > BALANCE_PRUNE_INTERVAL:
                    await self.store.prune_balances(self.wall() - BALANCE_RETENTION_SECONDS)
                    pruned_at = self.clock()
            except Exception:
                log.exception("balance_pass_failed")
            await self._pause(self.config.sync.balance_interval)

    # --- catalogues -------------------------------------------------------------------------------

    async def catalogues_once(self) -> None:
        """Fetch every provider's catalogue once, at the same time."""
        await asyncio.gather(*(self._catalogue(name) for name in self.clients))

    async def _catalogue(self, name: str) -> None:
        fetched_at = self.wall()
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
        before = self._state(name).missing
        missing = routed - ids
        for service in sorted(missing - before):
            log.warning("upstream_service_gone", provider=name, upstream_service=service)
        for service in sorted(before - missing):
            log.info("upstream_service_back", provider=name, upstream_service=service)
        self.states[name] = routing.with_missing(self.states.get(name), missing)

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
    benched_until: float | None  # unix time, while benched
    catalogue: CatalogueFetch | None  # None: no usable catalogue yet
    routes_gone: tuple[int, ...]  # routed upstream services its catalogue no longer lists
    balance: BalanceRead | None  # the last read

    @property
    def add_success_rate(self) -> float | None:
        return self.add_accepted / self.add_attempts if self.add_attempts else None

    @property
    def state(self) -> str:
        if self.benched_until is not None:
            return "benched"
        return "ok" if self.catalogue is not None else "catalogue missing"


async def provider_report(
    config: Config,
    store: Store,
    *,
    since: float = 0.0,
    until: float = math.inf,
    now: float | None = None,
) -> list[ProviderReport]:
    """One ProviderReport per configured provider, over orders and calls in [since, until)."""
    now = time.time() if now is None else now
    names = list(config.providers)
    benches = await stored_benches(config, store, names)
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
        bench = benches[name]
        rows.append(
            ProviderReport(
                provider=name,
                currency=provider.currency,
                money=await store.provider_margin(name, rate, since=since, until=until),
                add_attempts=sum(outcomes.values()),
                add_accepted=outcomes.get(str(Outcome.ACCEPTED), 0),
                latency=await store.call_latency(name, since=since, until=until),
                benched_until=bench.benched_until if bench.benched(now) else None,
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
