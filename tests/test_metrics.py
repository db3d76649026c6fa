"""The metrics read from the database at each scrape: money per provider equal to the ledger
(also for what the CLI changes, from another process), held orders by age, sync lag; and no
`_created` series, in this process or a real `serve`.

Money comes from the real path: the router app and real simulators over loopback, the status
sync's passes, the reseller's `cancel`, and the real command line in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import config as config_module
from router import v2
from router.app import ORDER_SYNC, SQL_TRACE, create_app, create_metrics_app
from router.metrics import HELD_AGE_BUCKETS, Metrics, StoredMetrics, held_by_age, sync_lag
from router.sim import Fault, SimProvider
from router.store import HeldAges, NewOrder, Store
from tests.conftest import (
    SIM_KEY,
    Router,
    SimFactory,
    build_config,
    free_port,
    service,
    wait_for,
)
from tests.test_at_scale import scans

AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
metrics: {{host: 127.0.0.1, port: {metrics_port}}}
database: router.db
currency: USD
providers:
  alpha: {{url: "{alpha}", key: "{key}", timeout: 2}}
  beta: {{url: "{beta}", key: "{key}", timeout: 2}}
  gamma: {{url: "{gamma}", key: "{key}", timeout: 2}}
sync: {{status_interval: 0.2, balance_interval: 0.2, catalogue_interval: 0.2}}
services:
  1:
    name: Followers, failing over
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 10000
    cancel: true
    route:
      - {{provider: alpha, service: 101}}
      - {{provider: beta, service: 101}}
  2:
    name: Followers, held
    category: Instagram
    type: Default
    rate: "0.80"
    min: 10
    max: 10000
    route:
      - {{provider: gamma, service: 101}}
  3:
    name: Likes
    category: Instagram
    type: Default
    rate: "0.50"
    min: 10
    max: 10000
    route:
      - {{provider: alpha, service: 102}}
"""
PROVIDERS = ("alpha", "beta", "gamma")
MONEY = (
    "smm_router_revenue_total",
    "smm_router_refunded_total",
    "smm_router_upstream_cost_total",
    "smm_router_upstream_refunded_total",
)


def write_config(folder: Path, sims: dict[str, SimProvider]) -> Path:
    """The config; its ports are free ones (only a `serve` process listens on them)."""
    path = folder / "router.yaml"
    urls = {name: sim.url for name, sim in sims.items()}
    ports = {"port": free_port(), "metrics_port": free_port()}
    path.write_text(CONFIG.format(key=SIM_KEY, **ports, **urls))
    return path


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exact(value: float) -> Decimal:
    """A sample as the decimal Prometheus' text wrote (the shortest repr of the float)."""
    return Decimal(repr(value))


def money(minor: int) -> Decimal:
    return Decimal(minor) / v2.MINOR_PER_UNIT


@dataclass
class Ledger:
    """What the ledger and the orders say, per provider, for the orders placed there."""

    charged: dict[str, int]
    refunded: dict[str, int]
    cost: dict[str, int]  # sum(orders.cost)
    not_placed_net: int  # the ledger's net over orders that failed or were canceled


def read_ledger(database: Path) -> Ledger:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        charged: dict[str, int] = {}
        refunded: dict[str, int] = {}
        for provider, kind, amount in db.execute(
            "SELECT o.provider, l.kind, sum(l.amount) FROM ledger l JOIN orders o "
            "ON o.id = l.order_id WHERE o.state = 'placed' GROUP BY o.provider, l.kind"
        ):
            if kind == "charge":
                charged[provider] = -amount
            else:
                assert kind == "refund"
                refunded[provider] = amount
        cost = dict(
            db.execute(
                "SELECT provider, coalesce(sum(cost), 0) FROM orders WHERE state = 'placed' "
                "GROUP BY provider"
            ).fetchall()
        )
        [(net,)] = db.execute(
            "SELECT coalesce(sum(l.amount), 0) FROM ledger l JOIN orders o "
            "ON o.id = l.order_id WHERE o.state IN ('failed', 'canceled')"
        ).fetchall()
    return Ledger(charged, refunded, cost, net)


class World:
    """Three simulators and the router app on a YAML config (the CLI reads it too).

    alpha refuses service 101 (orders of service 1 fail over to beta) and takes 102; gamma
    answers every `add` with a CDN's 502 (orders of service 2 are held on it).
    """

    def __init__(self, router: Router, path: Path, sims: dict[str, SimProvider], key: str):
        self.router = router
        self.path = path
        self.sims = sims
        self.key = key
        self.seen: dict[tuple[str, str], Decimal] = {}
        self.synced_at = 0.0

    async def add(self, service: int, quantity: int = 1000) -> tuple[int, str]:
        answer = await self.router.call(
            key=self.key, action="add", service=service, link="x", quantity=quantity
        )
        order = await self.router.store.order(answer["order"])
        assert order is not None
        return order.id, order.state

    async def upstream_order(self, order_id: int) -> int:
        order = await self.router.store.order(order_id)
        assert order is not None and order.upstream_order is not None
        return order.upstream_order

    async def sync(self) -> None:
        """One status pass that finds every active order due (each pass an hour later)."""
        self.synced_at = max(time.time(), self.synced_at) + 3600
        await self.router.app[ORDER_SYNC].run_once(now=self.synced_at)

    async def scrape(self) -> Samples:
        async with TestClient(TestServer(create_metrics_app(self.router.app))) as metrics:
            response = await metrics.get("/metrics")
            assert response.status == 200
            return samples(await response.text())

    async def cli(self, *argv: str) -> str:
        """`smm-router ARGV` in a process of its own, as an operator runs it."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", *argv, "--config", str(self.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    async def assert_counters_match_the_ledger(self) -> Ledger:
        """/metrics against the ledger, to the cent, for every provider; and no counter fell
        since the last scrape."""
        scraped = await self.scrape()
        ledger = read_ledger(self.router.config.database)
        for provider in PROVIDERS:

            def value(name: str, provider: str = provider) -> Decimal:
                return exact(scraped[(name, frozenset({("provider", provider)}))])

            revenue, refunded, cost, returned = (value(name) for name in MONEY)
            assert revenue == money(ledger.charged.get(provider, 0)), provider
            assert refunded == money(ledger.refunded.get(provider, 0)), provider
            assert revenue - refunded == money(
                ledger.charged.get(provider, 0) - ledger.refunded.get(provider, 0)
            )
            assert cost - returned == money(ledger.cost.get(provider, 0)), provider
            for name in MONEY:
                before = self.seen.get((name, provider), Decimal(0))
                assert value(name) >= before, f"{name}{{provider={provider}}} fell"
                self.seen[(name, provider)] = value(name)
        assert ledger.not_placed_net == 0  # a failed or canceled order nets to nothing
        return ledger


@pytest.fixture
async def world(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path
) -> AsyncIterator[World]:
    sims = {name: await start_sim(partial_every=0) for name in PROVIDERS}
    sims["alpha"].set_fault(101, Fault.REFUSE)
    sims["gamma"].set_fault(101, Fault.HTML_502)
    path = write_config(tmp_path, sims)
    config = config_module.load(path)
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(config, background=False, registry=registry))
    router = Router(client, config, registry)
    yield World(router, path, sims, await router.reseller("acme", "100"))


async def test_money_counters_equal_the_ledger_through_failovers_refunds_and_held(
    world: World,
) -> None:
    """Failovers, a failed order, a Canceled and a Partial through the status sync, an
    operator's refund, held orders attached and refunded from other processes: after each
    step, for every provider, revenue, refunded, revenue - refunded and net cost equal what
    the ledger and the orders say, to the cent, and no counter ever fell."""
    alpha, beta = world.sims["alpha"], world.sims["beta"]
    await world.assert_counters_match_the_ledger()  # all at 0, every provider exposed

    at_beta = [await world.add(1) for _ in range(3)]  # alpha refuses: failed over to beta
    assert [state for _, state in at_beta] == ["placed"] * 3
    at_alpha = [await world.add(3) for _ in range(2)]
    beta.set_fault(101, Fault.REFUSE)
    refused = await world.router.call(
        key=world.key, action="add", service=1, link="x", quantity=1000
    )
    assert "error" in refused  # no route took it: charged and refunded, never revenue
    assert (await world.router.store.count_orders()).get("failed") == 1
    beta.set_fault(101, None)
    held = [await world.add(2) for _ in range(2)]
    assert [state for _, state in held] == ["held"] * 2
    ledger = await world.assert_counters_match_the_ledger()
    assert ledger.charged == {"alpha": 2 * 50_000, "beta": 3 * 100_000}  # gamma: held only

    await world.sync()  # the first status answers record each order's cost
    ledger = await world.assert_counters_match_the_ledger()
    rate = {name: v2.to_minor(world.sims[name].services[101].rate) for name in PROVIDERS}
    rate["alpha"] = v2.to_minor(alpha.services[102].rate)  # per 1000: each order is 1000
    assert ledger.cost == {"alpha": 2 * rate["alpha"], "beta": 3 * rate["beta"]}

    canceled, partial, _ = (order_id for order_id, _ in at_beta)
    answer = await world.router.call(key=world.key, action="cancel", order=canceled)
    assert answer == [{"order": canceled, "cancel": 1}]
    beta.end_with_remains(await world.upstream_order(partial), 400)
    for sim in world.sims.values():
        sim.advance(sim.progress_seconds)
    await world.sync()
    for order_id, status in ((canceled, "Canceled"), (partial, "Partial")):
        order = await world.router.store.order(order_id)
        assert order is not None and order.status == status
    ledger = await world.assert_counters_match_the_ledger()
    assert ledger.refunded == {"beta": 100_000 + 40_000}  # all of one, 400 of 1000 of the other
    scraped = await world.scrape()
    beta_label = frozenset({("provider", "beta")})
    # Beta charged its rate 3 times, then gave back all of one (Canceled) and 40% of another.
    assert exact(scraped[("smm_router_upstream_cost_total", beta_label)]) == money(3 * rate["beta"])
    returned = exact(scraped[("smm_router_upstream_refunded_total", beta_label)])
    assert returned == money(rate["beta"] + rate["beta"] * 4 // 10)

    # The operator, from other processes: a refund of an ended order, a held order attached
    # (placed at gamma: its charge becomes gamma's revenue), one refunded (never revenue).
    completed = at_alpha[0][0]
    await world.cli("orders", "refund", str(completed), "0.25", "--by", "ops")
    await world.cli("orders", "resolve", str(held[0][0]), "--upstream-order", "4242")
    await world.cli("orders", "resolve", str(held[1][0]), "--refund")
    ledger = await world.assert_counters_match_the_ledger()
    assert ledger.charged == {"alpha": 100_000, "beta": 300_000, "gamma": 80_000}
    assert ledger.refunded == {"alpha": 25_000, "beta": 140_000}
    scraped = await world.scrape()
    assert scraped[("smm_router_orders_held", frozenset())] == 0
    # The refund counter of the status sync still counts refunds, not money.
    for status in ("Canceled", "Partial"):
        labels = frozenset({("provider", "beta"), ("status", status)})
        assert scraped[("smm_router_refunds_total", labels)] == 1
    assert alpha.received_actions("add")  # alpha took service 3 and refused service 1


async def test_the_migration_starts_the_totals_from_the_orders_it_finds(tmp_path: Path) -> None:
    """A database from before migration 0010: its totals start from its placed orders (their
    charges, refunds and costs), and orders not placed count nowhere."""
    path = tmp_path / "router.db"
    store = await Store.open(path)
    reseller = await store.create_reseller("acme", "hash", 10_000_000)
    rows = [  # state, provider, charge, cost, refunded
        ("placed", "alpha", 100_000, 60_000, 0),
        ("placed", "alpha", 50_000, None, 20_000),
        ("placed", "beta", 70_000, 30_000, 70_000),
        ("failed", "beta", 90_000, None, 90_000),
        ("held", "beta", 40_000, None, 0),
        ("canceled", "alpha", 30_000, None, 30_000),
    ]

    def fill(db: sqlite3.Connection) -> None:
        for n, (state, provider, charge, cost, refund) in enumerate(rows):
            cursor = db.execute(
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, params, "
                "provider, upstream_order, cost, created_at, updated_at) "
                "VALUES (?, 1, ?, 'x', 100, ?, '{}', ?, ?, ?, 0, 0)",
                (reseller.id, state, charge, provider, n + 1 if state == "placed" else None, cost),
            )
            if refund:
                db.execute(
                    "INSERT INTO ledger (reseller_id, order_id, kind, amount, created_at) "
                    "VALUES (?, ?, 'refund', ?, 0)",
                    (reseller.id, cursor.lastrowid, refund),
                )

    await store.write(fill)
    await store.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        # Undo 0010 as if it had never run: what a database from the release before has.
        for (trigger,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN "
            "('orders', 'ledger') AND sql LIKE '%provider_totals%' OR name IN "
            "('orders_placed_stay_placed', 'orders_charge_is_final')"
        ).fetchall():
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE provider_totals")
        db.execute("DELETE FROM schema_migrations WHERE name = '0010_money_totals.sql'")

    store = await Store.open(path)
    try:
        totals = await store.provider_totals()
    finally:
        await store.close()
    found = {name: (t.revenue, t.refunded, t.cost, t.cost_returned) for name, t in totals.items()}
    assert found == {"alpha": (150_000, 20_000, 60_000, 0), "beta": (70_000, 70_000, 30_000, 0)}


async def test_the_schema_keeps_what_the_revenue_counts_on(tmp_path: Path) -> None:
    """A placed order stays placed and its charge never changes: the revenue counted it once,
    when it was placed. Orders imported as placed count, a cost counts by its changes."""
    store = await Store.open(tmp_path / "router.db")
    try:
        reseller = await store.create_reseller("acme", "hash", 1_000_000)
        new = NewOrder(reseller.id, 1, "x", 100, 30_000, {"quantity": "100"}, "alpha", 101)
        [order_id] = await store.create_placed_orders([(new, 77)])
        for statement in (
            "UPDATE orders SET state = 'failed' WHERE id = ?",
            "UPDATE orders SET charge = 1 WHERE id = ?",
        ):
            with pytest.raises(sqlite3.IntegrityError):
                await store.write(lambda db, s=statement: db.execute(s, (order_id,)))

        def costs(db: sqlite3.Connection) -> None:
            for cost in (20_000, 25_000, 5_000, None):  # set, raised, lowered, cleared
                db.execute("UPDATE orders SET cost = ? WHERE id = ?", (cost, order_id))

        await store.write(costs)
        [totals] = (await store.provider_totals()).values()
        assert (totals.revenue, totals.cost, totals.cost_returned) == (30_000, 25_000, 25_000)
    finally:
        await store.close()


# --- Held orders by age, sync lag ----------------------------------------------------------------


def test_held_orders_fall_in_one_age_bucket_each() -> None:
    # 7 held: 3 under 1 h, 2 from 1 h to 6 h, 1 from 6 h to 24 h, 1 over a day.
    assert held_by_age(HeldAges(7, (4, 2, 1), 0.0)) == {
        "lt_1h": 3,
        "1h_6h": 2,
        "6h_24h": 1,
        "gt_24h": 1,
    }
    assert set(held_by_age(HeldAges(0, (0, 0, 0), None)).values()) == {0}
    assert [label for label, _ in HELD_AGE_BUCKETS] == ["lt_1h", "1h_6h", "6h_24h", "gt_24h"]
    assert sync_lag(None, 100.0) == 0.0
    assert sync_lag(130.0, 100.0) == 0.0  # due later: not overdue
    assert sync_lag(40.0, 100.0) == 60.0


def _gauges(metrics: Metrics) -> Samples:
    return samples(generate_latest(metrics.registry).decode())


async def test_held_ages_and_the_oldest_held_order_from_the_database(tmp_path: Path) -> None:
    """Held orders are aged from their reseller's `add`, as `orders held` shows it, from the
    index of held orders alone (every scrape reads them)."""
    statements: list[str] = []
    store = await Store.open(tmp_path / "router.db", trace=statements.append)
    metrics = Metrics(CollectorRegistry(), providers=["alpha"], currency="USD")
    try:
        reseller = await store.create_reseller("acme", "hash", 0)
        now = 1_800_000_000.0
        ages = [10, 3599, 3600, 7200, 30_000, 90_000, 200_000]

        def ages_of_held(db: sqlite3.Connection) -> None:
            for age in ages:
                db.execute(
                    "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                    "params, provider, created_at, updated_at) "
                    "VALUES (?, 1, 'held', 'x', 1, 0, '{}', 'alpha', ?, ?)",
                    (reseller.id, now - age, now),  # updated_at: held just now
                )
            db.execute(  # not held: not counted
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, params, "
                "provider, created_at, updated_at) "
                "VALUES (?, 1, 'failed', 'x', 1, 0, '{}', 'alpha', ?, ?)",
                (reseller.id, now - 500_000, now),
            )

        await store.write(ages_of_held)
        await metrics.stored.read(store, now=now)
        scraped = _gauges(metrics)
        by_age = {
            label: scraped[("smm_router_orders_held_by_age", frozenset({("age", label)}))]
            for label, _ in HELD_AGE_BUCKETS
        }
        assert by_age == {"lt_1h": 2, "1h_6h": 2, "6h_24h": 1, "gt_24h": 2}
        assert scraped[("smm_router_orders_held_oldest_age_seconds", frozenset())] == 200_000
        [ages_read] = [sql for sql in statements if "min(created_at)" in sql]
        with contextlib.closing(sqlite3.connect(tmp_path / "router.db")) as db:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {ages_read}")]
        assert plan == ["SEARCH orders USING COVERING INDEX orders_held (state=?)"]

        def cancel_held(db: sqlite3.Connection) -> None:
            db.execute("UPDATE orders SET state = 'canceled' WHERE state = 'held'")

        await store.write(cancel_held)
        await metrics.stored.read(store, now=now)
        scraped = _gauges(metrics)
        assert scraped[("smm_router_orders_held_oldest_age_seconds", frozenset())] == 0
        assert {
            scraped[("smm_router_orders_held_by_age", frozenset({("age", label)}))]
            for label, _ in HELD_AGE_BUCKETS
        } == {0}
    finally:
        await store.close()


async def test_sync_lag_is_how_overdue_the_most_overdue_active_order_is(tmp_path: Path) -> None:
    """Per provider: now - the earliest due time of its active orders, 0 when none is due; an
    order never checked is due from when it was placed; ended orders do not count."""
    store = await Store.open(tmp_path / "router.db")
    metrics = Metrics(CollectorRegistry(), providers=["alpha", "beta", "gamma"])
    try:
        reseller = await store.create_reseller("acme", "hash", 0)
        now = 1_800_000_000.0

        async def order(provider: str, status: str, next_check_at: float, placed: float) -> None:
            def insert(db: sqlite3.Connection) -> None:
                db.execute(
                    "INSERT INTO orders (reseller_id, service, state, status, link, quantity, "
                    "charge, params, provider, upstream_order, next_check_at, created_at, "
                    "updated_at) VALUES (?, 1, 'placed', ?, 'x', 1, 0, '{}', ?, "
                    "(SELECT count(*) + 1 FROM orders), ?, ?, ?)",
                    (reseller.id, status, provider, next_check_at, placed - 86_400, placed),
                )

            await store.write(insert)

        def lag(provider: str) -> float:
            labels = frozenset({("provider", provider)})
            return _gauges(metrics)[("smm_router_sync_lag_seconds", labels)]

        await order("alpha", "In progress", now - 120, now - 3600)  # checked, due 2 min ago
        await order("alpha", "Pending", now - 30, now - 3600)
        await order("alpha", "Completed", now - 9000, now - 9000)  # ended: not synced
        await order("beta", "Pending", now + 60, now - 600)  # due in a minute
        await metrics.stored.read(store, now=now)
        assert (lag("alpha"), lag("beta"), lag("gamma")) == (120, 0, 0)

        await order("beta", "Pending", 0, now - 45)  # placed 45 s ago, never checked
        await order("alpha", "Pending", 0, now - 20)
        await metrics.stored.read(store, now=now)
        assert (lag("alpha"), lag("beta"), lag("gamma")) == (120, 45, 0)
    finally:
        await store.close()


# --- No `_created` series, in every process ------------------------------------------------------


async def test_no_created_series_and_the_money_families_in_a_real_serve(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    """`python -m router serve`: its /metrics has the money families, held ages and sync lag,
    and no `_created` series; nor has this process's registry."""
    sims = {name: await start_sim() for name in PROVIDERS}
    path = write_config(tmp_path, sims)
    config = config_module.load(path)
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "serve", "--config", str(path),
            stdout=output, stderr=output,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{config.metrics.port}/metrics"
            text = ""
            async with aiohttp.ClientSession() as http:

                async def scraped() -> bool:
                    nonlocal text
                    assert process.returncode is None, log.read_text()
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with http.get(url) as response:
                            text = await response.text()
                            return response.status == 200
                    return False

                await wait_for(scraped, "the router's metrics listener", within=30)
        finally:
            process.terminate()
            await process.wait()
    found = samples(text)
    for name in MONEY:
        for provider in PROVIDERS:
            assert found[(name, frozenset({("provider", provider)}))] == 0
    for provider in PROVIDERS:
        assert (("smm_router_sync_lag_seconds", frozenset({("provider", provider)}))) in found
    assert ("smm_router_orders_held_oldest_age_seconds", frozenset()) in found
    assert "_created" not in text
    assert "smm_router_requests_total" in text  # the other counters are there, without theirs

    metrics = Metrics(CollectorRegistry(), providers=["alpha"])
    metrics.requests.labels(action="add", outcome="ok").inc()
    assert "_created" not in generate_latest(metrics.registry).decode()


async def test_the_stored_families_are_empty_until_the_first_reading() -> None:
    collector = StoredMetrics(["alpha"], currency="USD")
    families = list(collector.collect())
    assert {family.name for family in families} >= {
        "smm_router_revenue",
        "smm_router_sync_lag_seconds",
        "smm_router_orders_held_oldest_age_seconds",
    }
    assert all(not family.samples for family in families)
    assert "in USD" in families[0].documentation


async def test_a_scrape_reads_by_index_only(aiohttp_client: AppClient, tmp_path: Path) -> None:
    """Every statement of a scrape, EXPLAINed: the stored metrics' reads are SEARCHes of the
    due and held indexes and the small totals table, never a SCAN of a growing table (the
    million-order test in test_at_scale.py times it)."""
    url = f"http://127.0.0.1:{free_port()}/api/v2"
    config = build_config(
        tmp_path / "router.db",
        {"alpha": url, "beta": url},
        [service(1, [("alpha", 101), ("beta", 101)])],
    )
    app = create_app(config, background=False, registry=CollectorRegistry())
    statements: list[str] = []
    app[SQL_TRACE] = statements.append
    await aiohttp_client(app)
    statements.clear()
    async with TestClient(TestServer(create_metrics_app(app))) as metrics:
        started = time.perf_counter()
        assert (await metrics.get("/metrics")).status == 200
        print(f"\n/metrics on an empty database: {(time.perf_counter() - started) * 1000:.1f} ms")
    read = " ".join(statements)
    for index in ("FROM provider_totals", "INDEXED BY orders_due", "INDEXED BY orders_held"):
        assert index in read
    assert scans(config.database, statements) == {}
    assert sum("orders_due" in statement for statement in statements) == 2  # one per provider
