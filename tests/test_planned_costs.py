"""The `providers` report counts an order without a recorded cost at the cost its route was
planned at (orders.estimated_cost), and only one without that at its route's catalogue rate.

Migration 0015 adds the planned costs to the daily rollup (provider_order_days) and recomputes
it; the report reads whole days from it and the partial days at a period's edges from the
orders. Here a provider's rates change after its orders were placed, orders come without a
planned cost (imported, or from before it was recorded), and a database from before 0015 is
migrated: every figure is compared with the sum over the orders, path by path.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sqlite3
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from router import v2
from router.routing import upstream_cost
from router.store import Attempt, NewOrder, RouteListing, StatusRecord, Store
from router.store.database import _migrations, _split_sql
from tests.test_at_scale import scans
from tests.test_report_rollups import DAY, expected_margin, recomputed_days, stored_days

FX = Decimal("1.08")  # the provider bills in another currency: the report converts its rates


async def place(
    store: Store,
    reseller_id: int,
    route: tuple[str, int],
    quantity: int,
    at: float,
    estimated_cost: int | None,
) -> int:
    """An order placed on `route` as `add` places it, created at `at`, planned at
    `estimated_cost` (what routing computed from the catalogue then; None: no rate known)."""
    provider, upstream_service = route
    order_id = await store.reserve_order(
        NewOrder(reseller_id, 1, "https://x.example/p", quantity, 200_000, {}, *route)
    )
    assert order_id is not None
    await store.write(
        lambda db: db.execute("UPDATE orders SET created_at = ? WHERE id = ?", (at, order_id))
    )
    await store.settle_order(
        order_id,
        state="placed",
        attempts=[Attempt(0, provider, upstream_service, at, 0.05, "accepted")],
        provider=provider,
        upstream_service=upstream_service,
        upstream_order=order_id,
        estimated_cost=estimated_cost,
    )
    return order_id


class Reports:
    """The store's `providers` figures, with the tables each read took them from."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.statements: list[str] = []

    async def margin(self, store: Store, provider: str, since: float, until: float) -> Any:
        self.statements.clear()
        got = await store.provider_margin(provider, FX, since=since, until=until)
        read = {t for t in ("provider_order_days", "orders") if self._read(t)}
        with contextlib.closing(sqlite3.connect(self.database)) as db:
            expected = expected_margin(db, provider, since, until, FX)
        # Equal to the sum over every order of the period, whichever path took it.
        assert (got.orders, got.revenue, got.cost, got.estimated, got.uncosted) == expected, (
            provider,
            since,
            until,
        )
        return got.cost, got.estimated, got.uncosted, read

    def _read(self, table: str) -> bool:
        return any(f"FROM {table} " in statement for statement in self.statements)


async def test_an_order_counts_at_its_planned_cost_until_its_status_records_one(
    tmp_path: Path,
) -> None:
    """The provider's rates rise after the orders were placed: the report keeps what they were
    planned at (not the new rates) until the status sync records each cost, through the whole
    days' rollup and the rows of the edges alike."""
    database = tmp_path / "router.db"
    reports = Reports(database)
    store = await Store.open(database, trace=reports.statements.append)
    day = 20_000
    try:
        listing = [
            RouteListing("alpha", 101, True, "Followers", "Default", 40_000, 10, 10**6),
            RouteListing("alpha", 102, True, "Pack", "Package", 90_000, 1, 1),
        ]
        await store.record_catalogue("alpha", day * DAY, 2, listing)
        acme = await store.create_reseller("acme", "hash-acme", v2.to_minor(Decimal(1000)))
        # As routing planned them: 40_000 x 1000 / 1000 x 1.08, and one package at 90_000 x 1.08.
        planned = upstream_cost(40_000, 1000, flat=False, to_base=FX)
        package = upstream_cost(90_000, 1, flat=True, to_base=FX)
        assert (planned, package) == (43_200, 97_200)
        first = await place(store, acme.id, ("alpha", 101), 1000, day * DAY + 3600, planned)
        # Just past the next midnight: a period that ends a second later reads it from the rows.
        await place(store, acme.id, ("alpha", 102), 1, (day + 1) * DAY + 0.5, package)
        await store.record_catalogue(
            "alpha",
            day * DAY + 7200,
            2,
            [replace(listing[0], rate=70_000), replace(listing[1], rate=150_000)],
        )

        whole = (float(day * DAY), float((day + 1) * DAY))
        edge = (day * DAY + 1800.0, day * DAY + 7200.0)
        both = (day * DAY - 1.0, (day + 1) * DAY + 1.0)
        rollup, rows = {"provider_order_days"}, {"orders"}
        # At the new rates they would cost 75_600 and 162_000.
        assert await reports.margin(store, "alpha", *whole) == (planned, 1, 0, rollup)
        assert await reports.margin(store, "alpha", *edge) == (planned, 1, 0, rows)
        assert await reports.margin(store, "alpha", *both) == (
            planned + package,
            2,
            0,
            rollup | rows,
        )
        margin = await store.order_margin(first, FX)
        assert margin is not None and (margin.cost, margin.cost_estimated) == (planned, True)

        # The status sync records what the provider charged: that counts from now on.
        record = StatusRecord(first, "Pending", "In progress", 0.0, remains=500, cost=41_000)
        await store.record_statuses([record], checked_at=day * DAY + 9000)
        assert await reports.margin(store, "alpha", *whole) == (41_000, 0, 0, rollup)
        assert await reports.margin(store, "alpha", *edge) == (41_000, 0, 0, rows)
        assert await reports.margin(store, "alpha", *both) == (
            41_000 + package,
            1,
            0,
            rollup | rows,
        )
        margin = await store.order_margin(first, FX)
        assert margin is not None and (margin.cost, margin.cost_estimated) == (41_000, False)
        with sqlite3.connect(database) as db:
            assert stored_days(db) == recomputed_days(db)
    finally:
        await store.close()


async def test_an_order_planned_without_a_rate_counts_at_the_catalogue_rate_or_not_at_all(
    tmp_path: Path,
) -> None:
    """An order with no planned cost (imported, or stored by an older version) is costed at its
    route's catalogue rate as it is now, and one whose route has no rate either is uncosted; a
    planned cost counts even where the catalogue has no rate."""
    database = tmp_path / "router.db"
    reports = Reports(database)
    store = await Store.open(database, trace=reports.statements.append)
    day = 20_000
    try:
        listing = RouteListing("alpha", 101, True, "Followers", "Default", 40_000, 10, 10**6)
        await store.record_catalogue("alpha", day * DAY, 1, [listing])
        acme = await store.create_reseller("acme", "hash-acme", v2.to_minor(Decimal(1000)))
        # Imported, as `create_placed_orders` (and every version before 0009) writes them.
        imported = await store.create_placed_orders(
            [
                (NewOrder(acme.id, 1, "https://x.example/i", 1000, 200_000, {}, "alpha", 101), 1),
                (NewOrder(acme.id, 1, "https://x.example/j", 1000, 200_000, {}, "gamma", 301), 2),
            ]
        )
        await store.write(
            lambda db: db.execute(
                "UPDATE orders SET created_at = ? WHERE id IN (?, ?)",
                (day * DAY + 3600, imported[0], imported[1]),
            )
        )
        rated, unrated = imported
        planned = await place(store, acme.id, ("gamma", 301), 500, day * DAY + 3600, 33_333)
        await store.record_catalogue("alpha", day * DAY + 7200, 1, [replace(listing, rate=70_000)])

        at_rate = upstream_cost(70_000, 1000, flat=False, to_base=FX)  # the rate as it is now
        for period, read in (
            ((float(day * DAY), float((day + 1) * DAY)), {"provider_order_days"}),
            ((day * DAY + 1800.0, day * DAY + 7200.0), {"orders"}),
        ):
            assert await reports.margin(store, "alpha", *period) == (at_rate, 1, 0, read)
            assert await reports.margin(store, "gamma", *period) == (33_333, 1, 1, read)
        margins = [await store.order_margin(order_id, FX) for order_id in (rated, unrated, planned)]
        assert [(m.cost, m.cost_estimated) for m in margins if m is not None] == [
            (at_rate, True),
            (None, False),
            (33_333, True),
        ]
    finally:
        await store.close()


def migrated_to_0014(path: Path) -> sqlite3.Connection:
    """A database as the release before 0015 left it: migrations 0001-0014 applied."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, script in _migrations().items():
        if name < "0015":
            db.executescript(script)
            db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (name,))
    return db


async def test_the_migration_recomputes_the_days_with_their_planned_costs(tmp_path: Path) -> None:
    """A database from before 0015 whose orders have every combination of a recorded cost, a
    planned one, both or neither, in every state, on routes with and without a catalogue rate:
    0015 recomputes provider_order_days from the orders, through an index, and the triggers
    keep it equal to the orders from then on."""
    database = tmp_path / "router.db"
    day = 20_000
    db = migrated_to_0014(database)
    combinations = list(
        itertools.product(
            ("placing", "placed", "held", "failed", "canceled"),
            (("alpha", 101), ("alpha", 102), ("gamma", 301)),
            (None, 7_000),  # cost
            (None, 9_000),  # estimated_cost
            (day, day + 1),
        )
    )
    try:
        db.execute("INSERT INTO resellers (name, key_hash, created_at) VALUES ('acme', 'h', 0)")
        db.execute(
            "INSERT INTO ledger (reseller_id, kind, amount, created_at) "
            "VALUES (1, 'topup', 100000000, 0)"
        )
        for n, (state, (provider, service), cost, planned, created) in enumerate(combinations):
            db.execute(
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                "refunded, params, provider, upstream_service, upstream_order, cost, "
                "estimated_cost, created_at, updated_at) "
                "VALUES (1, 1, ?, 'x', ?, ?, ?, '{}', ?, ?, ?, ?, ?, ?, ?)",
                (
                    state,
                    100 * (n % 7 + 1),
                    1000 + n,
                    n % 3 * 100,
                    provider,
                    service,
                    n if state == "placed" else None,
                    cost,
                    None if planned is None else planned + n,
                    created * DAY + 60.0 * n,
                    created * DAY,
                ),
            )
        # 0011's triggers counted every order without a recorded cost as uncosted.
        [(uncosted, without_cost, neither)] = db.execute(
            "SELECT (SELECT sum(uncosted) FROM provider_order_days), "
            "(SELECT count(*) FROM orders WHERE state = 'placed' AND cost IS NULL), "
            "(SELECT count(*) FROM orders WHERE state = 'placed' "
            "AND cost IS NULL AND estimated_cost IS NULL)"
        ).fetchall()
        assert uncosted == without_cost > neither > 0
    finally:
        db.close()

    reports = Reports(database)
    store = await Store.open(database, trace=reports.statements.append)
    try:
        with sqlite3.connect(database) as db:
            assert stored_days(db) == recomputed_days(db)
            assert db.execute(
                "SELECT sum(planned), sum(uncosted) FROM provider_order_days"
            ).fetchone() == (without_cost - neither, neither)
        [backfill] = [
            statement
            for statement in _split_sql(_migrations()["0015_planned_costs.sql"])
            if statement.startswith("INSERT INTO provider_order_days")
        ]
        assert scans(database, [backfill]) == {}
        with sqlite3.connect(database) as db:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {backfill}")]
        assert any("USING INDEX orders_by_provider" in step for step in plan), plan

        listing = [
            RouteListing("alpha", 101, True, "Followers", "Default", 40_000, 10, 10**6),
            RouteListing("alpha", 102, True, "Pack", "Package", 90_000, 1, 1),
        ]
        await store.record_catalogue("alpha", day * DAY, 2, listing)
        periods = [
            (0.0, math.inf),
            (float(day * DAY), float((day + 1) * DAY)),
            (day * DAY + 90.0, day * DAY + 1500.0),
            ((day + 1) * DAY - 1.0, (day + 1) * DAY + 2000.0),
        ]

        async def figures_equal_the_orders() -> None:
            for provider in ("alpha", "gamma"):
                for since, until in periods:
                    await reports.margin(store, provider, since, until)
            with sqlite3.connect(database) as db:
                assert stored_days(db) == recomputed_days(db)

        await figures_equal_the_orders()
        # From here on, the triggers: a status records a cost, a placing order is placed at a
        # planned cost, a planned cost is changed by hand and placed orders deleted by hand.
        [(costed, placing)] = await store._reader.execute_fetchall(
            "SELECT (SELECT min(id) FROM orders WHERE state = 'placed' AND cost IS NULL "
            "AND estimated_cost IS NOT NULL), (SELECT min(id) FROM orders WHERE state = 'placing')"
        )
        record = StatusRecord(costed, "Pending", "Completed", 0.0, remains=0, cost=5_000)
        await store.record_statuses([record], checked_at=day * DAY + 9000)
        await store.write(  # placed by this process
            lambda db: db.execute(
                "UPDATE orders SET placing_by = ? WHERE id = ?", (store.owner, placing)
            )
        )
        await store.settle_order(
            placing,
            state="placed",
            attempts=[],
            provider="alpha",
            upstream_order=10**6,
            estimated_cost=4_321,
        )
        with sqlite3.connect(database, isolation_level=None) as db:  # no foreign keys: deletes
            db.execute(
                "UPDATE orders SET estimated_cost = CASE WHEN estimated_cost IS NULL THEN 777 END "
                "WHERE state = 'placed' AND id % 4 = 0"
            )
            db.execute("DELETE FROM orders WHERE state = 'placed' AND id % 5 = 0")
        assert (await store.order(placing)).state == "placed"  # type: ignore[union-attr]
        await figures_equal_the_orders()
    finally:
        await store.close()
