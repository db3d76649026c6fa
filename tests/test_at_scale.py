"""A million orders: /healthz, a /metrics scrape, start-up and the operator's reports read by
index, never a scan.

Every statement the store runs is captured (`SQL_TRACE`, or `Store.open(trace=...)` for the
reports) and its plan asked of SQLite (EXPLAIN QUERY PLAN): a change that adds a scan of a
growing table to one of these paths fails here, whatever the statement. The reports
(`smm-router providers`, `clients list`, `orders held`) are held to more: no read of a
provider's whole history either (an index searched by the provider alone).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from router.app import SQL_TRACE, create_app, create_metrics_app
from router.store import Store
from router.store.reports import DAY_SECONDS
from router.sync.providers import provider_report
from tests.conftest import build_config, free_port, service

MILLION = 1_000_000
DAY = DAY_SECONDS
PROVIDERS = ("alpha", "beta", "gone")  # `gone` is no longer in the config
# What a statement may read whole: small tables, and the rows of a CTE or a constant. Any other
# SCAN (orders, attempts, ledger, upstream_calls, refills, order_events, an alias) fails.
SMALL = {
    "resellers",
    "schema_migrations",
    "sqlite_master",
    "counters",
    "provider_totals",  # one row per provider (migration 0010)
    "provider_catalogues",
    "route_catalogue",
    "provider_balances",  # pruned to a retention period: start-up reads each provider's last
    "seen",  # the providers found by Store.orphaned_orders' skip-scan
    "outcomes",  # the outcomes a provider's attempts had, from provider_attempt_days (0011)
    "CONSTANT",  # SCAN CONSTANT ROW
}

# One INSERT of `count` orders with the real schema's every index and trigger. Order i is:
# held (every 1000th), placing by an unknown process (every 100,000th, 500 on), failed (i % 10
# == 1), placed and In progress (i % 10 == 2), else placed and Completed; at PROVIDERS[i % 3].
# No charge: the debit trigger then writes no ledger row (the ledger is not what is measured);
# the held counter's trigger counts the held rows as they go in.
FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
INSERT INTO orders (reseller_id, service, state, status, link, quantity, charge, params,
                    provider, upstream_service, upstream_order, created_at, updated_at,
                    next_check_at)
SELECT ?2, 1,
       CASE WHEN i % 1000 = 0 THEN 'held' WHEN i % 100000 = 500 THEN 'placing'
            WHEN i % 10 = 1 THEN 'failed' ELSE 'placed' END,
       CASE WHEN i % 10 = 2 THEN 'In progress'
            WHEN i % 10 = 1 OR i % 1000 = 0 OR i % 100000 = 500 THEN 'Pending'
            ELSE 'Completed' END,
       'x', 100, 0, '{}',
       CASE i % 3 WHEN 0 THEN 'alpha' WHEN 1 THEN 'beta' ELSE 'gone' END,
       101,
       CASE WHEN i % 10 = 1 OR i % 1000 = 0 OR i % 100000 = 500 THEN NULL ELSE i END,
       ?3 + i * 0.001, ?3 + i * 0.001, ?3 + i
FROM n
"""


def _kind(i: int) -> str:
    """What FILL makes of order i."""
    if i % 1000 == 0:
        return "held"
    if i % 100_000 == 500:
        return "placing"
    if i % 10 == 1:
        return "failed"
    return "active" if i % 10 == 2 else "done"


def fill_day() -> int:
    """The UTC day (number) FILL creates its orders on: 30 days ago. They start an hour into
    it and take 1,000 s, so the day holds them all."""
    return int(time.time() // DAY) - 30


async def fill_orders(store: Store, reseller_id: int, count: int) -> float:
    """Insert `count` orders (see FILL) in one transaction; the seconds it took."""
    started = time.perf_counter()

    def fill(db: sqlite3.Connection) -> None:
        db.execute(FILL, (count, reseller_id, fill_day() * DAY + 3600.0))

    await store.write(fill)
    return time.perf_counter() - started


def scans(database: Path, statements: Iterable[str]) -> dict[str, list[str]]:
    """Each statement whose plan reads a growing table without an index, with that plan."""
    found: dict[str, list[str]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        for statement in dict.fromkeys(statements):  # a trigger's steps repeat their statement
            if not re.match(r"\s*(SELECT|WITH|INSERT|UPDATE|DELETE)\b", statement, re.I):
                continue  # BEGIN, COMMIT, PRAGMA: no plan
            # The trace writes an infinite float (`until` of all time) as Inf: not SQL.
            explained = re.sub(r"\bInf\b", "9e999", statement)
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {explained}")]
            if any(_unindexed(step) for step in plan):
                found[statement] = plan
    return found


def _unindexed(step: str) -> bool:
    """A plan step that reads a whole table (or a whole index of it) other than a small one;
    an alias counts as its growing table."""
    match = re.match(r"SCAN (\S+)", step)
    return match is not None and match.group(1) not in SMALL


# The growing tables (and the reports' aliases of them) a report must not read a provider's
# every row of (call latency reads the per-minute rollups of migration 0012, and the raw calls
# not rolled up yet by id).
HISTORY = {"orders", "o", "attempts", "a", "ledger", "l", "upstream_calls"}


def history_reads(database: Path, statements: Iterable[str]) -> dict[str, list[str]]:
    """Each statement that reads a growing table by the provider alone: all its history."""
    found: dict[str, list[str]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        for statement in dict.fromkeys(statements):
            if not re.match(r"\s*(SELECT|WITH)\b", statement, re.I):
                continue
            explained = re.sub(r"\bInf\b", "9e999", statement)
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {explained}")]
            for step in plan:
                match = re.match(r"SEARCH (\S+) USING .*\((provider=\?)\)$", step)
                if match is not None and match.group(1) in HISTORY:
                    found[statement] = plan
    return found


async def _timed(request: Callable[[], Any], times: int = 20) -> tuple[Any, float, float]:
    """The first answer, and the first and median milliseconds of `times` requests."""
    took: list[float] = []
    answers = []
    for _ in range(times):
        started = time.perf_counter()
        response = await request()
        await response.read()
        took.append((time.perf_counter() - started) * 1000)
        answers.append(response)
    return answers[0], took[0], statistics.median(took)


async def test_healthz_metrics_and_start_up_read_a_million_orders_by_index(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    database = tmp_path / "router.db"
    store = await Store.open(database)
    reseller = await store.create_reseller("acme", "hash", 0)
    filled = await fill_orders(store, reseller.id, MILLION)
    await store.close()
    print(f"\nfilled {MILLION:,} orders in {filled:.2f} s")
    # Held once start-up has held the placing orders (their process is unknown).
    held = sum(_kind(i) in ("held", "placing") for i in range(500, MILLION + 1, 500))
    gone = range(PROVIDERS.index("gone"), MILLION + 1, len(PROVIDERS))
    orphaned = sum(_kind(i) in ("held", "placing", "active") for i in gone)

    url = f"http://127.0.0.1:{free_port()}/api/v2"  # start-up calls no provider
    config = build_config(
        database, {"alpha": url, "beta": url}, [service(1, [("alpha", 101), ("beta", 101)])]
    )
    app = create_app(config, background=False, registry=CollectorRegistry())
    statements: list[str] = []
    app[SQL_TRACE] = statements.append
    started = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        client = await aiohttp_client(app)
    print(f"start-up: {(time.perf_counter() - started) * 1000:.1f} ms")
    start_up, statements[:] = list(statements), []
    assert [(e["provider"], e["count"]) for e in logs if e["event"] == "orphaned_orders"] == [
        ("gone", orphaned)
    ]

    response, first, median = await _timed(lambda: client.get("/healthz"))
    assert response.status == 200 and (await response.json())["status"] == "ok"
    print(f"/healthz: {first:.2f} ms first, {median:.2f} ms median of 20")
    healthz, statements[:] = list(statements), []

    async with TestClient(TestServer(create_metrics_app(app))) as metrics:
        response, first, median = await _timed(lambda: metrics.get("/metrics"))
        text = await response.text()
    print(f"/metrics: {first:.2f} ms first, {median:.2f} ms median of 20")
    scrape = list(statements)
    [gauge] = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "smm_router_orders_held"
    ]
    assert gauge == held == 1010

    assert healthz and scrape and start_up  # the trace saw them
    for path, captured in (("start-up", start_up), ("/healthz", healthz), ("/metrics", scrape)):
        assert scans(database, captured) == {}, f"{path} scans a growing table"

    # The operator's reports, on the same million (what the CLI runs, less its start-up).
    reports: dict[str, list[str]] = {}
    store = await Store.open(database, trace=statements.append)
    try:
        now = time.time()
        day = fill_day()
        for name, report in (
            # `smm-router providers`: its default period (the last 30 days, no end) and one
            # that ends: whole days from the rollups, the partial days at both edges from rows.
            ("providers", lambda: provider_report(config, store, since=now - 30 * DAY, now=now)),
            (
                "providers --since --until",
                lambda: provider_report(
                    config, store, since=day * DAY - 1800.0, until=(day + 1) * DAY + 1800.0
                ),
            ),
            ("clients list", store.list_resellers),
            ("orders held", store.held_orders),
            # One order's margin: its recorded cost, else its planned one, else its route's rate.
            ("order margin", lambda: store.order_margin(MILLION // 2, Decimal(1))),
        ):
            statements[:] = []
            started = time.perf_counter()
            answer = await report()
            print(f"{name}: {(time.perf_counter() - started) * 1000:.1f} ms")
            reports[name] = list(statements)
            if name == "providers --since --until":
                placed = {
                    provider: sum(
                        _kind(i) in ("active", "done")
                        for i in range(n or len(PROVIDERS), MILLION + 1, len(PROVIDERS))
                    )
                    for n, provider in enumerate(PROVIDERS)
                    if provider in config.providers
                }
                assert {row.provider: row.money.orders for row in answer} == placed
            elif name == "clients list":
                failed = sum(_kind(i) == "failed" for i in range(1, MILLION + 1))
                assert [r.orders for r in answer] == [MILLION - failed]
            elif name == "orders held":
                assert len(answer) == held
            elif name == "order margin":
                assert answer is not None and answer.order_id == MILLION // 2
    finally:
        await store.close()
    for name, captured in reports.items():
        assert captured, name
        assert scans(database, captured) == {}, f"{name} scans a growing table"
        assert history_reads(database, captured) == {}, f"{name} reads a provider's history"


async def test_the_scan_check_sees_a_scan(tmp_path: Path) -> None:
    """The check above can fail: a count of failed orders reads every order, through an index
    or not; the same for held orders reads only theirs."""
    database = tmp_path / "router.db"
    await (await Store.open(database)).close()
    for statement in (
        "SELECT count(*) FROM orders WHERE state = 'failed'",
        "SELECT count(*) FROM orders WHERE status = 'Pending'",
    ):
        assert list(scans(database, [statement])) == [statement]
    assert scans(database, ["SELECT count(*) FROM orders WHERE state = 'held'"]) == {}
    joined = "SELECT o.id FROM orders o JOIN resellers r ON r.id = o.reseller_id"
    assert list(scans(database, [joined])) == [joined]
    assert scans(database, ["SELECT value FROM counters WHERE name = 'orders_held'"]) == {}
    # A provider's attempts by time through an index that starts (provider, outcome, ...) read
    # every attempt of the provider: no scan, but its whole history (the report before 0011).
    by_time = (
        "SELECT outcome, count(*) FROM attempts WHERE provider = 'alpha' "
        "AND started_at >= 0 AND started_at < 9e999 GROUP BY outcome"
    )
    assert scans(database, [by_time]) == {}
    assert list(history_reads(database, [by_time])) == [by_time]
    by_day = "SELECT sum(attempts) FROM provider_attempt_days WHERE provider = 'alpha' AND day >= 1"
    assert history_reads(database, [by_day]) == {}
