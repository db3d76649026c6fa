"""Every Prometheus metric of the router, on a registry the caller owns.

Usage::

    metrics = Metrics(CollectorRegistry(), providers=config.providers)
    metrics.requests.labels(action="add", outcome="ok").inc()

Labels never carry reseller IDs, order IDs or keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.health import STATES
from router.routing import REASONS

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

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The router's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, *, providers: Iterable[str] = ()) -> None:
        self.registry = registry
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
        for action in ACTIONS:
            self.request_duration.labels(action=action)
            self.rate_limited.labels(action=action)
        for provider in providers:
            for action in UPSTREAM_ACTIONS:
                self.upstream_duration.labels(provider=provider, action=action)
            for outcome in OUTCOMES:
                self.upstream_requests.labels(provider=provider, action="add", outcome=outcome)
            self.status_unreadable.labels(provider=provider)
            self.sync_duration.labels(provider=provider)
