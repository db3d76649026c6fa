"""A `/metrics` scrape is exactly what prometheus_client's `generate_latest` writes, on the
router's own metrics and on everything else a registry can hold: label values that need
escaping, help texts with backslashes and line breaks, and the metrics the Exposition leaves
to the library (timestamps, exemplars, OpenMetrics' `_gsum`/`_gcount`). The first scrape and
the later ones (the kept series texts) alike, and when a series appears between two scrapes.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.samples import Exemplar

from router import exposition as exposition_module
from router.app import create_metrics_app
from router.exposition import Exposition
from router.metrics import OUTCOMES, UPSTREAM_ACTIONS, Metrics
from tests.conftest import Router, RouterFactory, SimFactory, service

AWKWARD = ('say "hi"', "back\\slash", "two\nlines", "é ü ß", "line\u2028sep", "", "a,b=c}")


class Families:
    """A collector of hand-made families, changed between scrapes by the test."""

    def __init__(self) -> None:
        self.value = 1.0
        self.extra = False

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "awkward_labels", 'Help with a \\ backslash,\na line break and "quotes".', labels=["v"]
        )
        for index, value in enumerate(AWKWARD):
            gauge.add_metric([value], self.value * index)
        if self.extra:
            gauge.add_metric(["appeared later"], -0.0)
        yield gauge
        stamped = CounterMetricFamily("stamped", "A counter with a timestamp.", labels=["p"])
        stamped.add_metric(["x"], self.value, timestamp=1_700_000_000.25)
        yield stamped
        with_exemplar = CounterMetricFamily("exemplary", "A counter with an exemplar.")
        with_exemplar.add_metric([], 3.0)
        with_exemplar.samples[0] = with_exemplar.samples[0]._replace(
            exemplar=Exemplar({"trace": "abc"}, 1.0)
        )
        yield with_exemplar
        gauge_histogram = GaugeHistogramMetricFamily(
            "queue_sizes",
            "A gauge histogram: its _gsum and _gcount move to the end, each under one HELP.",
            labels=["queue"],
        )
        for queue in ("first", "second"):
            gauge_histogram.add_metric([queue], [("1.0", 4.0), ("+Inf", 5.0)], gsum_value=7.0)
        yield gauge_histogram
        untyped = UnknownMetricFamily("free_form", "An untyped metric.", labels=["k"])
        untyped.add_metric(["v"], float("nan"))
        untyped.add_metric(["w"], float("inf"))
        untyped.add_metric(["z"], float("-inf"))
        yield untyped


def registry_with_everything() -> tuple[CollectorRegistry, Metrics, Families]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, providers=["alpha", "beta-2", "gamma_3"], currency="USD")
    for provider in ("alpha", "beta-2", "gamma_3"):
        for index, action in enumerate(UPSTREAM_ACTIONS):
            metrics.upstream_duration.labels(provider=provider, action=action).observe(
                0.001 * (index + 1)
            )
        for outcome in OUTCOMES:
            metrics.upstream_requests.labels(provider=provider, action="add", outcome=outcome).inc(
                7
            )
    metrics.requests.labels(action="add", outcome="ok").inc(123456789)
    metrics.request_duration.labels(action="add").observe(0.25)
    counter = Counter("plain_things", "A counter without labels.", registry=registry)
    counter.inc(1e-7)
    Gauge("big_number", "A gauge past float precision.", registry=registry).set(2.0**60 + 1)
    Summary("timings", "A summary.", ["kind"], registry=registry).labels(kind="x").observe(2.5)
    Histogram("sized", "Custom buckets.", buckets=(0.5, 1, 2.5), registry=registry).observe(1)
    Enum("mood", "An enum (a state set).", states=["calm", "busy"], registry=registry).state("busy")
    families = Families()
    registry.register(families)
    return registry, metrics, families


def test_every_scrape_is_what_generate_latest_writes() -> None:
    registry, metrics, families = registry_with_everything()
    exposition = Exposition(registry)
    assert exposition.render() == generate_latest(registry)  # first: every series rendered
    for round_ in range(3):  # later: the kept texts, new values, a series that appears
        families.value += 0.5
        families.extra = round_ == 1
        metrics.upstream_duration.labels(provider="alpha", action="add").observe(3.0)
        metrics.requests.labels(action="status", outcome=f"new-{round_}").inc()
        assert exposition.render() == generate_latest(registry)


def test_the_kept_texts_start_again_past_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exposition_module, "MAX_KEPT", 10)
    registry, _, _ = registry_with_everything()
    exposition = Exposition(registry)
    for _ in range(2):  # hundreds of series through a bound of ten: rendered all the same
        assert exposition.render() == generate_latest(registry)
        assert 0 < len(exposition._series) <= 10


async def test_the_router_scrape_is_what_generate_latest_writes(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """Through the metrics app of a router that placed an order: the stored metrics (read from
    the database at each scrape) included."""
    sim = await start_sim()
    router: Router = await start_router({"alpha": sim.url}, [service(1, [("alpha", 101)])])
    key = await router.reseller()
    answer = await router.call(
        key=key, action="add", service=1, link="https://x.example/p", quantity=100
    )
    assert "order" in answer
    async with TestClient(TestServer(create_metrics_app(router.app))) as scraper:
        for _ in range(2):
            response = await scraper.get("/metrics")
            assert response.status == 200
            body = await response.read()
            assert body == generate_latest(router.registry)
            assert b'smm_router_upstream_requests_total{action="add",outcome="accepted"' in body


def test_a_series_it_cannot_cut_leaves_its_metric_to_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a prometheus-client version write a sample in a layout the Exposition cannot cut
    (its `_prefix` answers None), each metric is rendered whole by the library: the same text."""
    registry, _, _ = registry_with_everything()
    monkeypatch.setattr(Exposition, "_prefix", lambda self, metric, sample: None)
    exposition = Exposition(registry)
    assert exposition.render() == generate_latest(registry)
    assert not exposition._series
