"""What ops see: /metrics on its own listener, /healthz, one JSON log line per request."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from router import logs
from router.app import CallLog, create_metrics_app
from router.metrics import Metrics
from router.sim import Fault
from router.store import Store
from router.upstream import CallRecord, Outcome
from tests.conftest import Router, RouterFactory, SimFactory, service


async def _world(start_sim: SimFactory, start_router: RouterFactory) -> tuple[Router, str]:
    first = await start_sim()
    second = await start_sim()
    first.set_fault(101, Fault.REFUSE)
    second.set_fault(102, Fault.HTML_502)
    router = await start_router(
        {"first": first.url, "second": second.url},
        [
            service(1, [("first", 101), ("second", 101)]),
            service(2, [("second", 102), ("first", 102)]),
        ],
    )
    return router, await router.reseller("acme", "10")


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_listener_shows_requests_upstream_failovers_and_held(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    router, key = await _world(start_sim, start_router)
    placed = await router.call(key=key, action="add", service=1, link="x", quantity=100)
    held = await router.call(key=key, action="add", service=2, link="x", quantity=100)
    assert "order" in placed and "order" in held
    await router.call(key="wrong", action="balance")

    async with TestClient(TestServer(create_metrics_app(router.app))) as metrics:
        response = await metrics.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = _samples(text)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("smm_router_requests_total", action="add", outcome="ok") == 2
    assert value("smm_router_requests_total", action="balance", outcome="invalid_key") == 1
    assert value("smm_router_request_duration_seconds_count", action="add") == 2
    for provider, outcome in (("first", "refused"), ("second", "accepted")):
        labels = {"provider": provider, "action": "add", "outcome": outcome}
        assert value("smm_router_upstream_requests_total", **labels) == 1
    assert (
        value(
            "smm_router_upstream_requests_total",
            provider="second",
            action="add",
            outcome="ambiguous",
        )
        == 1
    )
    assert (
        value("smm_router_upstream_request_duration_seconds_count", provider="first", action="add")
        == 1
    )
    assert value("smm_router_failovers_total", service="1", provider="first", reason="refused") == 1
    assert value("smm_router_orders_held") == 1
    assert value("smm_router_build_info", version=version("smm-router")) == 1
    # No reseller, order or key in any label.
    assert key not in text and "acme" not in text
    assert not any(
        name in ("client_id", "order", "order_id", "key")
        for _, labels in samples
        for name, _ in labels
    )


async def test_healthz(start_sim: SimFactory, start_router: RouterFactory) -> None:
    router, _ = await _world(start_sim, start_router)
    response = await router.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "version": version("smm-router")}


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The router's real log set-up (JSON lines); call it in the test, once capsys captures."""
    yield capsys
    structlog.reset_defaults()


async def test_one_json_line_per_request_without_the_key(
    start_sim: SimFactory, start_router: RouterFactory, json_logs: pytest.CaptureFixture[str]
) -> None:
    router, key = await _world(start_sim, start_router)
    logs.configure(json_lines=True, level=logging.INFO)  # binds the stderr capsys installed
    json_logs.readouterr()
    answer = await router.call("get", key=key, action="add", service=1, link="x", quantity=100)
    await router.call("json", key=key, action="balance")
    await router.call("form", key=key + "-wrong", action="status", order=answer["order"])

    err = json_logs.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 3
    add, balance, refused = requests
    assert add["action"] == "add" and add["outcome"] == "ok"
    assert add["order_id"] == answer["order"] and add["provider"] == "second"
    assert add["client_id"] == balance["client_id"] != None  # noqa: E711
    assert balance["action"] == "balance"
    assert refused["outcome"] == "invalid_key" and "client_id" not in refused
    for line in requests:
        assert isinstance(line["duration"], float) and line["duration"] >= 0
        assert len(line["request_id"]) == 16
    assert len({line["request_id"] for line in requests}) == 3
    assert key not in err


async def test_call_records_outlast_a_locked_database(tmp_path: Path) -> None:
    """A flush that meets a locked database keeps its batch for the next flush: call records
    feed the latency reports, and a lock of a few seconds must not lose them."""
    store = await Store.open(tmp_path / "router.db", busy_timeout_ms=50)
    calls = CallLog(store, Metrics(CollectorRegistry()))
    blocker = sqlite3.connect(tmp_path / "router.db", isolation_level=None)
    try:
        for i in range(3):
            calls.record(CallRecord("alpha", "status", time.time(), 0.01 * i, Outcome.ACCEPTED))
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError):
            await calls.flush()
        calls.record(CallRecord("alpha", "add", time.time(), 0.02, Outcome.ACCEPTED))
        blocker.execute("ROLLBACK")
        await calls.flush()
        assert await store.count_calls("alpha") == 4
        await calls.flush()  # nothing is written twice
        assert await store.count_calls("alpha") == 4
    finally:
        blocker.close()
        await store.close()


async def test_a_config_without_providers_serves(start_router: RouterFactory) -> None:
    """An operator may start with services still to route: the app must come up and answer."""
    router = await start_router({}, [])
    key = await router.reseller()
    assert await router.call(key=key, action="services") == []
    response = await router.client.get("/healthz")
    assert response.status == 200
