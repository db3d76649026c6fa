"""Every Prometheus metric of the router, on a registry the caller owns.

Usage::

    metrics = Metrics(CollectorRegistry(), providers=config.providers, currency=config.currency)
    metrics.requests.labels(action="add", outcome="ok").inc()
    await metrics.stored.read(store)               # each scrape, before exposition.render()

Labels never carry reseller IDs, order IDs or keys.

Most metrics count what this process sees. Those whose truth is in the database (money per
provider, held orders by age, sync lag) are read from it at each scrape instead (StoredMetrics):
the CLI, another process, changes money too (an operator's refund, a held order attached), and
a counter kept in one process's memory would miss it and restart from zero with the process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from router import __version__, v2
from router.exposition import Exposition
from router.health import STATES
from router.routing import REASONS
from router.store import CALL_LATENCY_BUCKETS, HeldAges, ProviderTotals, Store

ACTIONS: Final = (
    "services",
    "add",
    "status",
    "refill",
    "refill_status",
    "cancel",
    "balance",
)
UNKNOWN_ACTION: Final = "unknown"
UPSTREAM_ACTIONS: Final = ACTIONS
OUTCOMES: Final = ("accepted", "refused", "no_funds", "unreachable", "ambiguous")
PROVIDER_STATES: Final = tuple(str(state) for state in STATES)  # router.health's states
SKIP_REASONS: Final = tuple(str(reason) for reason in REASONS)  # router.routing's reasons
CATALOGUE_OUTCOMES: Final = ("accepted", "held_back", "refused", "unreachable", "ambiguous")
RELOAD_OUTCOMES: Final = ("applied", "refused")

M = TypeVar("M", bound=MetricWrapperBase)

# The bounds of the store's latency rollups too: `providers` and a dashboard see one histogram.
_LATENCY_BUCKETS: Final = CALL_LATENCY_BUCKETS
# smm_router_orders_held_by_age{age}: each bucket's label and the age (seconds) it starts at.
HELD_AGE_BUCKETS: Final = (
    ("lt_1h", 0.0),
    ("1h_6h", 3600.0),
    ("6h_24h", 6 * 3600.0),
    ("gt_24h", 24 * 3600.0),
)


class Metrics:
    """The router's metrics, registered on `registry`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        providers: Iterable[str] = (),
        currency: str = "",
    ) -> None:
        # No `_created` series: they double every counter's series for a timestamp nobody
        # charts. prometheus_client has only a process-wide switch (client_python#973), read at
        # each exposition; every process that builds its metrics builds them here.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it untyped
        providers = tuple(providers)
        self.registry = registry
        self.exposition = Exposition(registry)  # what a scrape answers: see router.exposition
        # prometheus_client adds `_info`: smm_router_build_info{version="0.1.0"} 1
        self.build = Info(
            "smm_router_build", "The running smm-router's version.", registry=registry
        )
        self.build.info({"version": __version__})
        self.requests = Counter(
            "smm_router_requests",
            "Reseller API requests by action and outcome.",
            ["action", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "smm_router_request_duration_seconds",
            "Time to answer a reseller API request.",
            ["action"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "smm_router_rate_limited",
            "Reseller API requests refused with HTTP 429: a key past its rate or in-flight limit.",
            ["action"],
            registry=registry,
        )
        self.upstream_requests = Counter(
            "smm_router_upstream_requests",
            "Calls to upstream providers by outcome class.",
            ["provider", "action", "outcome"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "smm_router_upstream_request_duration_seconds",
            "Latency of calls to upstream providers.",
            ["provider", "action"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.failovers = Counter(
            "smm_router_failovers",
            "Orders passed on to the next route, by the route that failed and why.",
            ["service", "provider", "reason"],
            registry=registry,
        )
        self.orders_held = Gauge(
            "smm_router_orders_held",
            "Orders whose upstream outcome is unknown, waiting for the operator.",
            registry=registry,
        )
        self.orders = Counter(
            "smm_router_orders",
            "Orders placed through the router, by final placement state.",
            ["service", "state"],
            registry=registry,
        )
        # Providers: balances, states, catalogues (router.sync.providers keeps them current).
        self.provider_balance = Gauge(
            "smm_router_provider_balance",
            "Our balance at each provider, as its last balance read answered.",
            ["provider", "currency"],
            registry=registry,
        )
        self.provider_state = Gauge(
            "smm_router_provider_state",
            "1 for the state each provider is in: healthy; open (breaker open: no orders); "
            "half_open (cooldown over: no orders until a balance probe answers); benched (out "
            "of funds for orders of some cost or more).",
            ["provider", "state"],
            registry=registry,
        )
        self.routes_missing = Gauge(
            "smm_router_provider_routes_missing",
            "Routed upstream services gone from the provider's catalogue (routing skips them).",
            ["provider"],
            registry=registry,
        )
        self.route_skipped = Counter(
            "smm_router_route_skipped",
            "Routes left out of an order's plan, by service, provider and reason: open, "
            "benched, margin, missing, spend_cap.",
            ["service", "provider", "reason"],
            registry=registry,
        )
        self.catalogue_fetches = Counter(
            "smm_router_catalogue_fetches",
            "Catalogue fetches by outcome; only `accepted` ones change what routing knows.",
            ["provider", "outcome"],
            registry=registry,
        )
        # Order life cycle (router.sync.orders keeps statuses, costs and refunds current).
        self.status_changes = Counter(
            "smm_router_order_status_changes",
            "Order statuses changed by the status sync, by provider and new status.",
            ["provider", "status"],
            registry=registry,
        )
        self.refunds = Counter(
            "smm_router_refunds",
            "Refunds the status sync paid to resellers (Partial or Canceled), one per order.",
            ["provider", "status"],
            registry=registry,
        )
        self.status_unreadable = Counter(
            "smm_router_order_status_unreadable",
            "Status items the sync could not read (unknown word, item error): left as they were.",
            ["provider"],
            registry=registry,
        )
        self.sync_duration = Histogram(
            "smm_router_sync_pass_duration_seconds",
            "Time of one status-sync pass over a provider's due orders and open refills.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.config_reloads = Counter(
            "smm_router_config_reloads",
            "Config reloads (SIGHUP, `smm-router reload`): applied, or refused whole.",
            ["outcome"],
            registry=registry,
        )
        # The label sets of the per-request series (see `series`), looked up once each.
        self._series: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.stored = StoredMetrics(providers, currency=currency)
        registry.register(self.stored)
        for action in ACTIONS:
            self.request_duration.labels(action=action)
            self.rate_limited.labels(action=action)
        for outcome in RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome=outcome)
        for provider in providers:
            self.add_provider(provider)

    def series(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)` (values in the order of its label names), found once and
        kept: the lookup costs three times the increment, and the requests path makes a few
        per request. Only for series nothing removes (a removed child would be kept here)."""
        key = (metric, values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*values)
        return child

    def add_provider(self, provider: str) -> None:
        """Create the label sets of a provider (at start-up, and for one a reload adds)."""
        for action in UPSTREAM_ACTIONS:
            self.upstream_duration.labels(provider=provider, action=action)
        for outcome in OUTCOMES:
            self.upstream_requests.labels(provider=provider, action="add", outcome=outcome)
        self.status_unreadable.labels(provider=provider)
        self.sync_duration.labels(provider=provider)
        self.stored.add_provider(provider)


# --- Read from the database at each scrape -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredReading:
    """What one scrape read from the database (StoredMetrics.read)."""

    at: float  # unix time of the reading
    totals: Mapping[str, ProviderTotals]
    oldest_due: Mapping[str, float | None]  # per configured provider (Store.oldest_due)
    held: HeldAges  # at least each HELD_AGE_BUCKETS age but the first


def held_by_age(held: HeldAges) -> dict[str, int]:
    """Held orders per HELD_AGE_BUCKETS label, from how many are at least each bucket's age."""
    at_least = (held.count, *held.at_least, 0)
    return {label: at_least[n] - at_least[n + 1] for n, (label, _) in enumerate(HELD_AGE_BUCKETS)}


def sync_lag(oldest_due: float | None, now: float) -> float:
    """How overdue the most overdue active order is (seconds): 0 when none is due yet."""
    return 0.0 if oldest_due is None else max(now - oldest_due, 0.0)


class StoredMetrics:
    """A prometheus_client collector of the metrics whose truth is in the database.

    The metrics listener calls `read(store)` before each exposition: a bounded number of
    indexed reads (the provider totals, two steps into orders_due per provider, the held
    orders through orders_held), whatever the size of the tables. `collect` exposes the last
    reading; before the first, the families have no samples.

    Money per provider, in `currency` (converted from integer minor units only here: a
    Prometheus sample is a float), as counters since the first order (migration 0010's totals):

    - smm_router_revenue_total: what resellers were charged for the orders placed at the
      provider, each order's charge counted once, when it was placed there.
    - smm_router_refunded_total: what the ledger gave back to resellers for those orders
      (the status sync's Partial and Canceled, the operator's `orders refund`). Net revenue,
      what resellers paid, is revenue - refunded.
    - smm_router_upstream_cost_total: what the provider charged us for them, as the status
      sync records it: every rise of an order's recorded cost.
    - smm_router_upstream_refunded_total: what the provider gave back: every fall of a
      recorded cost (an order that ended Partial or Canceled costs less, down to nothing).
      Net cost is upstream_cost - upstream_refunded; margin is net revenue - net cost.

    A held order is no provider's until it is placed; one that failed or was canceled never is
    (its charge and refund net to nothing). Every provider in the config has its series, at 0
    before its first order; a provider removed from it keeps them while its totals exist.
    """

    def __init__(self, providers: Iterable[str], *, currency: str = "") -> None:
        self.providers = tuple(providers)
        self.unit = f"in {currency}" if currency else "in the config's currency"
        self.reading: StoredReading | None = None

    def add_provider(self, provider: str) -> None:
        """A provider a reload added: its series from the next scrape on, 0 before its first
        order. A removed one keeps them while its totals exist (see the class docstring)."""
        if provider not in self.providers:
            self.providers = (*self.providers, provider)

    async def read(self, store: Store, *, now: float | None = None) -> StoredReading:
        """Read what the next `collect` exposes; `now` (unix time) defaults to the clock."""
        at = time.time() if now is None else now
        ages = [age for _, age in HELD_AGE_BUCKETS[1:]]
        self.reading = StoredReading(
            at=at,
            totals=await store.provider_totals(),
            oldest_due={name: await store.oldest_due(name) for name in self.providers},
            held=await store.held_ages(ages, now=at),
        )
        return self.reading

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry learns their names from them."""
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.reading)

    def _families(self, reading: StoredReading | None) -> list[Metric]:
        unit = self.unit
        money = (
            CounterMetricFamily(
                "smm_router_revenue",
                f"What resellers were charged for the orders placed at each provider, {unit}.",
                labels=["provider"],
            ),
            CounterMetricFamily(
                "smm_router_refunded",
                f"What resellers were refunded for the orders placed at each provider, {unit}.",
                labels=["provider"],
            ),
            CounterMetricFamily(
                "smm_router_upstream_cost",
                f"What each provider charged us for its orders (recorded costs' rises), {unit}.",
                labels=["provider"],
            ),
            CounterMetricFamily(
                "smm_router_upstream_refunded",
                f"What each provider gave back on its orders (recorded costs' falls), {unit}.",
                labels=["provider"],
            ),
        )
        lag = GaugeMetricFamily(
            "smm_router_sync_lag_seconds",
            "How overdue each provider's most overdue active order is for its status sync.",
            labels=["provider"],
        )
        by_age = GaugeMetricFamily(
            "smm_router_orders_held_by_age",
            "Held orders by the time since their reseller's add.",
            labels=["age"],
        )
        oldest = GaugeMetricFamily(
            "smm_router_orders_held_oldest_age_seconds",
            "Time since the oldest held order's add (0 when none is held).",
        )
        families: list[Metric] = [*money, lag, by_age, oldest]
        if reading is None:
            return families
        zero = ProviderTotals("", 0, 0, 0, 0)
        for provider in dict.fromkeys([*self.providers, *sorted(reading.totals)]):
            t = reading.totals.get(provider, zero)
            for family, minor in zip(
                money, (t.revenue, t.refunded, t.cost, t.cost_returned), strict=True
            ):
                family.add_metric([provider], minor / v2.MINOR_PER_UNIT)
        for provider in self.providers:
            lag.add_metric([provider], sync_lag(reading.oldest_due.get(provider), reading.at))
        for label, count in held_by_age(reading.held).items():
            by_age.add_metric([label], count)
        created = reading.held.oldest_created_at
        oldest.add_metric([], 0.0 if created is None else max(reading.at - created, 0.0))
        return families
