"""`smm-router routes`, `providers` states and `orders show`'s config version, from a real
command line against the database of a running router and real simulators."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from router import config as config_module
from router.app import PROVIDER_WATCHER, create_app
from router.cli import main
from router.sim import default_catalogue
from tests.conftest import SIM_KEY, Router, SimFactory, free_port

CONFIG = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: router.db
currency: USD
providers:
  alpha: {{url: "{alpha}", key: "{key}", timeout: 2}}
  beta: {{url: "{beta}", key: "{key}", timeout: 2}}
  gamma: {{url: "{gamma}", key: "{key}", timeout: 2}}
  delta: {{url: "{delta}", key: "{key}", timeout: 2}}
health: {{window: 60, min_calls: 1, failure_ratio: "0.5", cooldown: 600}}
routing: {{strategy: cheapest, min_margin: "0"}}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "0.90"
    min: 50
    max: 10000
    route:
      - {{provider: gamma, service: 101}}
      - {{provider: beta, service: 101}}
      - {{provider: delta, service: 101}}
      - {{provider: alpha, service: 101}}
  2:
    name: Followers, gamma first
    category: Instagram
    type: Default
    rate: "0.90"
    min: 50
    max: 10000
    strategy: ranked
    route:
      - {{provider: gamma, service: 101}}
      - {{provider: alpha, service: 101}}
  3:
    name: Followers, shared
    category: Instagram
    type: Default
    rate: "0.90"
    min: 50
    max: 10000
    strategy: weighted
    route:
      - {{provider: alpha, service: 101, weight: 1}}
      - {{provider: beta, service: 101, weight: 3}}
"""

AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def catalogue(rate: str) -> list[object]:
    return [
        dataclasses.replace(s, rate=Decimal(rate)) if s.service == 101 else s
        for s in default_catalogue()
    ]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """`smm-router ARGV --config PATH` in a thread (it runs its own event loop)."""

    async def run(path: Path, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, [*argv, "--config", str(path)])
        out, err = capsys.readouterr()
        return code, out, err

    yield run


async def test_routes_shows_the_plan_of_a_new_order_with_each_reason(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path, cli: Cli
) -> None:
    alpha = await start_sim(services=catalogue("0.45"))
    beta = await start_sim(services=catalogue("0.40"), balance=Decimal("0.10"))
    delta = await start_sim(services=catalogue("1.00"))  # above our 0.90: below the floor
    path = tmp_path / "router.yaml"
    path.write_text(
        CONFIG.format(
            key=SIM_KEY,
            alpha=alpha.url,
            beta=beta.url,
            gamma=f"http://127.0.0.1:{free_port()}/api/v2",
            delta=delta.url,
        )
    )
    config = config_module.load(path)
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(config, background=False, registry=registry))
    router = Router(client, config, registry)
    await router.app[PROVIDER_WATCHER].catalogues_once()
    key = await router.reseller("acme", "10")

    # Cheapest first: beta (0.40) refuses for lack of funds, alpha (0.45) takes it; delta
    # is below the floor, gamma (no catalogue, so no cost) would come last.
    first = await router.call(key=key, action="add", service=1, link="x", quantity=1000)
    # gamma is down: one call opens its breaker (min_calls 1).
    await router.call(key=key, action="add", service=2, link="x", quantity=1000)

    code, out, _ = await cli(path, "routes", "1", "--quantity", "1000", "--json")
    assert code == 0
    assert json.loads(out) == {
        "service": 1,
        "strategy": "cheapest",
        "config_version": config.version,
        "routes": [
            {
                "provider": "alpha",
                "service": 101,
                "state": "healthy",
                "upstream_cost": "0.45000",
                "margin": "0.45000",
                "eligible": True,
                "reason": None,
            },
            {
                "provider": "gamma",
                "service": 101,
                "state": "open",
                "upstream_cost": None,
                "margin": None,
                "eligible": False,
                "reason": "open",
            },
            {
                "provider": "beta",
                "service": 101,
                "state": "benched",
                "upstream_cost": "0.40000",
                "margin": "0.50000",
                "eligible": False,
                "reason": "benched",
            },
            {
                "provider": "delta",
                "service": 101,
                "state": "healthy",
                "upstream_cost": "1.00000",
                "margin": "-0.10000",
                "eligible": False,
                "reason": "margin",
            },
        ],
    }

    # At its minimum (50), an order costs beta 0.02: below what it refused, so beta is tried.
    code, out, _ = await cli(path, "routes", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"service 1 (Followers): cheapest; 50 for 0.045 USD; config {config.version}"
    assert lines[1].split() == ["TRY", "PROVIDER", "SERVICE", "STATE", "COST", "MARGIN", "REASON"]
    assert [line.split() for line in lines[2:]] == [
        ["1", "beta", "101", "benched", "0.02000", "0.02500", "-"],
        ["2", "alpha", "101", "healthy", "0.02250", "0.02250", "-"],
        ["-", "gamma", "101", "open", "unknown", "-", "open"],
        ["-", "delta", "101", "healthy", "0.05000", "-0.00500", "margin"],
    ]

    code, out, _ = await cli(path, "routes", "3")
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()[2:4]] == [["1", "beta"], ["2", "alpha"]]
    assert "weighted: each order draws its first route by weight" in out

    for argv, error in (
        (["routes", "9"], "no service 9 in the config"),
        (["routes", "1", "--quantity", "5"], "service 1 takes a quantity from 50 to 10000"),
    ):
        code, out, err = await cli(path, *argv)
        assert (code, out) == (1, "") and error in err

    code, out, _ = await cli(path, "providers", "--json")
    rows = {row["provider"]: row for row in json.loads(out)["providers"]}
    assert rows["gamma"]["state"] == "open" and rows["gamma"]["probe_at"] is not None
    assert (rows["beta"]["state"], rows["beta"]["benched_from"]) == ("benched", "0.40")
    assert rows["alpha"]["state"] == "healthy"

    # Each order records the config that routed it.
    code, out, _ = await cli(path, "orders", "show", str(first["order"]), "--json")
    assert json.loads(out)["order"]["config_version"] == config.version != ""
    code, out, _ = await cli(path, "orders", "show", str(first["order"]))
    assert f"  config    {config.version}" in out.splitlines()
