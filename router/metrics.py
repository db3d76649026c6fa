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
        for action in ACTIONS:
            self.request_duration.labels(action=action)
        for provider in providers:
            for action in UPSTREAM_ACTIONS:
                self.upstream_duration.labels(provider=provider, action=action)
            for outcome in OUTCOMES:
                self.upstream_requests.labels(provider=provider, action="add", outcome=outcome)
