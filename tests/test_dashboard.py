"""The Grafana dashboard (deploy/grafana/smm-router.json): its panels read, and every panel's
query run through a real Prometheus scraping the router with traffic, where each must return
data. The Prometheus test skips, saying how to get it, where the binary is not installed."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from router.app import ORDER_SYNC, PROVIDER_WATCHER, create_metrics_app
from router.config import Limits
from router.sim import Fault
from tests.conftest import RouterFactory, SimFactory, free_port, service, wait_for
from tests.test_deploy import _exposed_names

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "smm-router.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
PROMETHEUS_MISSING = "prometheus not installed: apt-get install prometheus (.ci/run does it)"
SCRAPE_INTERVAL = "1s"
# What Grafana puts in for its variables when the test asks Prometheus directly: a window of
# many scrapes (the test lasts less than a minute, so each window holds every sample) and the
# `All` of $provider (its allValue).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1m", "$provider": ".*"}
# Series whose labels include `provider`: a panel on one of them follows $provider.
PROVIDER_LABELLED = (
    "smm_router_failovers_total",
    "smm_router_route_skipped_total",
    "smm_router_provider_state",
    "smm_router_provider_balance",
    "smm_router_upstream_requests_total",
    "smm_router_upstream_request_duration_seconds_bucket",
    "smm_router_revenue_total",
    "smm_router_refunded_total",
    "smm_router_upstream_cost_total",
    "smm_router_upstream_refunded_total",
    "smm_router_refunds_total",
    "smm_router_sync_lag_seconds",
    "smm_router_sync_pass_duration_seconds_bucket",
)


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def _panels() -> list[dict[str, Any]]:
    """The panels that chart something (rows only group them)."""
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _queries() -> Iterator[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel."""
    for panel in _panels():
        for target in panel["targets"]:
            yield f"{panel['title']} / {target['refId']}", target["expr"]


def _metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bsmm_router_\w+", expr))


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    panels = _panels()
    assert len(panels) >= 15
    ids = [panel["id"] for panel in _dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
        assert panel["description"].strip(), f"{title}: say what it shows"
        assert panel["targets"], f"{title}: no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", title
            assert target["expr"].strip() and _metrics(target["expr"]), title
            assert "legendFormat" in target, title
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), title
    # The data source the provisioning creates is the one the panels name.
    provisioned = (PROVISIONING / "datasources" / "prometheus.yaml").read_text()
    assert "uid: prometheus" in provisioned
    assert DASHBOARD.parent == REPO / "deploy" / "grafana"  # the folder the provider loads


def test_the_subjects_issue_nine_asks_for_are_all_charted() -> None:
    charted: dict[str, list[str]] = {}
    for panel in _panels():
        charted[panel["title"]] = [target["expr"] for target in panel["targets"]]

    def panel_with(*fragments: str) -> str:
        for title, exprs in charted.items():
            if all(any(fragment in expr for expr in exprs) for fragment in fragments):
                return title
        raise AssertionError(f"no panel charts {fragments}")

    panel_with("sum by (state) (rate(smm_router_orders_total")  # orders per minute by outcome
    panel_with("sum by (reason) (rate(smm_router_failovers_total")
    panel_with("sum by (reason) (rate(smm_router_route_skipped_total")
    panel_with("smm_router_provider_state")
    panel_with("smm_router_provider_balance")
    margin = panel_with(
        "smm_router_revenue_total", "smm_router_refunded_total", "smm_router_upstream_cost_total"
    )
    assert "margin" in margin.lower()
    panel_with("smm_router_refunds_total")
    panel_with("smm_router_orders_held")
    panel_with("smm_router_orders_held_by_age")
    panel_with("smm_router_orders_held_oldest_age_seconds")
    panel_with(
        "histogram_quantile", "by (le, action)", "smm_router_request_duration_seconds_bucket"
    )
    panel_with(
        "histogram_quantile",
        "by (le, provider)",
        "smm_router_upstream_request_duration_seconds_bucket",
    )
    panel_with("smm_router_rate_limited_total")
    panel_with("smm_router_sync_lag_seconds")
    panel_with("smm_router_config_reloads_total")


def test_the_provider_variable_filters_every_provider_panel() -> None:
    [variable] = _dashboard()["templating"]["list"]
    assert variable["name"] == "provider" and variable["type"] == "query"
    assert variable["query"] == "label_values(smm_router_upstream_requests_total, provider)"
    assert variable["datasource"]["uid"] == "prometheus"
    assert variable["multi"] is True and variable["includeAll"] is True
    assert variable["allValue"] == ".*"  # All: every provider, a removed one's too
    for where, expr in _queries():
        for name in _metrics(expr) & set(PROVIDER_LABELLED):
            for selector in re.findall(rf"\b{name}(\{{[^}}]*\}})?", expr):
                assert 'provider=~"$provider"' in selector, f"{where}: {name} ignores $provider"


def test_every_query_uses_grafana_windows_and_the_router_s_metric_names() -> None:
    exposed = _exposed_names()
    for where, expr in _queries():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), f"{where}: fixed window [{window}]"
        unknown = _metrics(expr) - exposed
        assert not unknown, f"{where}: not a metric the router exposes: {sorted(unknown)}"


# --- A real Prometheus ---------------------------------------------------------------------------


def _expr_for_prometheus(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not fill: {expr}"
    return expr


class Prometheus:
    """Prometheus' HTTP API on loopback."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def query(self, expr: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/api/v1/query", params={"query": expr}) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
            return answer

    async def vector(self, expr: str) -> list[float]:
        answer = await self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return [float(item["value"][1]) for item in answer["data"]["result"]]

    async def ready(self) -> bool:
        try:
            async with self.http.get(f"{self.base}/-/ready") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False


def _prometheus_config(folder: Path, target: str) -> Path:
    path = folder / "prometheus.yml"
    path.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
        "scrape_configs:\n"
        "  - job_name: smm-router\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    return path


async def test_every_panel_query_returns_data_from_a_real_prometheus(
    start_sim: SimFactory, start_router: RouterFactory, tmp_path: Path
) -> None:
    """A real Prometheus scrapes the router's metrics listener every second while it takes
    orders (failovers, a route skipped, one held), syncs statuses (a Partial refunded), reads
    balances and refuses a key past its limit; then every panel's query runs through
    Prometheus' API: none may error, and each must return data."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(PROMETHEUS_MISSING)
    alpha, beta, gamma = [await start_sim(partial_every=0) for _ in range(3)]
    alpha.set_fault(101, Fault.REFUSE)  # orders of service 1 fail over to beta
    gamma.set_fault(101, Fault.HTML_502)  # orders of service 2 are held
    router = await start_router(
        {"alpha": alpha.url, "beta": beta.url, "gamma": gamma.url},
        [
            service(1, [("alpha", 101), ("beta", 101)]),
            service(2, [("gamma", 101)]),
            service(3, [("alpha", 999), ("beta", 101)]),  # alpha does not list 999: skipped
        ],
        limits=Limits(other=2),
    )
    key = await router.reseller("acme", "100")
    metrics = TestServer(create_metrics_app(router.app), host="127.0.0.1", port=free_port())
    await metrics.start_server()
    port = free_port()
    config = _prometheus_config(tmp_path, f"127.0.0.1:{metrics.port}")
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=output,
            stderr=output,
        )
    try:
        async with aiohttp.ClientSession() as http:
            prometheus = Prometheus(http, f"http://127.0.0.1:{port}")

            async def scraping() -> bool:
                assert process.returncode is None, log.read_text()
                if not await prometheus.ready():
                    return False
                return await prometheus.vector('up{job="smm-router"} == 1') == [1.0]

            await wait_for(scraping, "Prometheus to scrape the router", within=60)

            # Traffic that makes every panel's series exist.
            await router.app[PROVIDER_WATCHER].catalogues_once()  # alpha's lacks service 999
            skipped = await router.call(key=key, action="add", service=3, link="x", quantity=100)
            assert "order" in skipped and alpha.received_actions("add") == []
            for _ in range(3):  # alpha refuses, beta takes it: a failover each
                answer = await router.call(key=key, action="add", service=1, link="x", quantity=100)
                assert "order" in answer
            held = await router.call(key=key, action="add", service=2, link="x", quantity=100)
            assert "order" in held  # held at gamma: its reseller sees Pending
            partial = await router.store.order(answer["order"])
            assert partial is not None and partial.upstream_order is not None
            beta.end_with_remains(partial.upstream_order, 40)
            await router.app[ORDER_SYNC].run_once()  # costs recorded
            for sim in (alpha, beta, gamma):
                sim.advance(sim.progress_seconds)
            await router.app[ORDER_SYNC].run_once(now=time.time() + 3600)  # Partial: refunded
            assert router.metric("smm_router_refunds_total", provider="beta", status="Partial")
            await router.app[PROVIDER_WATCHER].balances_once()
            answers = [await router.raw(key=key, action="balance") for _ in range(3)]
            assert [response.status for response in answers] == [200, 200, 429]
            await router.call(key=key, action="status", order=held["order"])

            # Scraped enough: three scrapes since the traffic ended, so that every series
            # the traffic created has at least two samples (a rate needs two).
            count = 'count_over_time(up{job="smm-router"}[5m])'
            [seen] = await prometheus.vector(count)

            async def scraped_since() -> bool:
                return (await prometheus.vector(count))[0] >= seen + 3

            await wait_for(scraped_since, "three more scrapes", within=30)
            [duration] = await prometheus.vector('scrape_duration_seconds{job="smm-router"}')
            print(f"\nscrape of the router by Prometheus: {duration * 1000:.1f} ms")

            failures: dict[str, str] = {}
            for where, expr in _queries():
                answer = await prometheus.query(_expr_for_prometheus(expr))
                if answer["status"] != "success":
                    failures[where] = f"error: {answer.get('error')}"
                    continue
                values = [float(item["value"][1]) for item in answer["data"]["result"]]
                if not values:
                    failures[where] = "no data"
                elif all(math.isnan(value) for value in values):
                    failures[where] = "only NaN: no sample in the window"
            assert await prometheus.vector('{__name__=~".+_created"}') == []
    finally:
        process.terminate()
        await process.wait()
        await metrics.close()
    assert not failures, "panel queries that fail:\n" + "\n".join(
        f"  {where}: {why}" for where, why in sorted(failures.items())
    )
