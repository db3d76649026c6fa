"""The reports' rollups (migration 0011) give the figures the queries they replace computed.

`smm-router providers` reads whole UTC days from per-provider daily rollups and the partial
days at a period's edges from the rows; `clients list` reads per-reseller running totals. Here
a database gets orders over several days through the store's own writes (placed, failed, held,
re-routed, canceled, Partial and Canceled with their refunds, an operator's refund, costs that
fall, costs planned at placement or not), and every figure is compared with the old full queries
(kept below as the reference) over many periods: all time, whole days, partial days, edges a
float's step from midnight.
"""

from __future__ import annotations

import math
import random
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

from router import v2
from router.store import Attempt, NewOrder, RouteListing, StatusRecord, Store
from router.store.reports import DAY_SECONDS

DAY = DAY_SECONDS
PROVIDERS = ("alpha", "beta", "gamma")
# alpha 101 is per 1000, alpha 102 a flat Package, beta 201 per 1000; gamma's has no rate.
ROUTES = (("alpha", 101), ("alpha", 102), ("beta", 201), ("gamma", 301))
FLAT = tuple(n for n, kind in v2.SERVICE_TYPES.items() if kind.quantity == "flat")

# The queries the rollups replaced (router/store/reports.py and resellers.py before 0011), the
# margin's with the costs planned at placement (0015): an order without a recorded cost counts
# at its estimated_cost, and only one without that either at its catalogue rate (or not at all).
REFERENCE_MARGIN = (
    "SELECT count(*), coalesce(sum(o.charge - o.refunded), 0), "
    "coalesce(sum(CASE WHEN o.cost IS NOT NULL THEN o.cost ELSE o.estimated_cost END), 0), "
    "coalesce(sum(o.cost IS NULL AND (o.estimated_cost IS NOT NULL OR c.rate IS NOT NULL)), 0), "
    "coalesce(sum(CASE WHEN o.cost IS NULL AND o.estimated_cost IS NULL THEN "
    f"CASE WHEN c.type IN ({', '.join('?' * len(FLAT))}) THEN c.rate * 1000 "
    "ELSE c.rate * o.quantity END END), 0), "
    "coalesce(sum(o.cost IS NULL AND o.estimated_cost IS NULL AND c.rate IS NULL), 0) "
    "FROM orders o LEFT JOIN route_catalogue c "
    "ON c.provider = o.provider AND c.service = o.upstream_service "
    "WHERE o.provider = ? AND o.created_at >= ? AND o.created_at < ? AND o.state = 'placed'"
)
REFERENCE_OUTCOMES = (
    "SELECT outcome, count(*) FROM attempts WHERE provider = ? AND started_at >= ? "
    "AND started_at < ? GROUP BY outcome"
)
REFERENCE_RESELLERS = (
    "SELECT r.id, r.name, r.enabled, r.balance, "
    "(SELECT count(*) FROM orders o WHERE o.reseller_id = r.id AND o.state <> 'failed'), "
    "(SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.reseller_id = r.id) "
    "FROM resellers r ORDER BY r.name"
)


def reference_margin(db: sqlite3.Connection, provider: str, since: float, until: float) -> Any:
    return db.execute(REFERENCE_MARGIN, (*FLAT, provider, since, until)).fetchone()


def expected_margin(
    db: sqlite3.Connection, provider: str, since: float, until: float, to_base: Decimal
) -> tuple[int, int, int, int, int]:
    """(orders, revenue, cost, estimated, uncosted) of the period, summed over every order,
    the catalogue estimates converted as the store converts them."""
    orders, revenue, known, estimated, milli, uncosted = reference_margin(
        db, provider, since, until
    )
    converted = (Decimal(milli) * to_base / 1000).to_integral_value(rounding="ROUND_HALF_UP")
    return orders, revenue, known + int(converted), estimated, uncosted


def recomputed_days(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """provider_order_days as migration 0015 defines it, summed here from the orders."""
    days: dict[tuple[str, int, int], list[int]] = {}
    for provider, created_at, service, charge, refunded, cost, planned, quantity in db.execute(
        "SELECT provider, created_at, upstream_service, charge, refunded, cost, estimated_cost, "
        "quantity FROM orders WHERE state = 'placed' AND provider IS NOT NULL"
    ):
        row = days.setdefault((provider, int(created_at / DAY), service or 0), [0] * 7)
        row[0] += 1
        row[1] += charge - refunded
        if cost is not None:
            row[2] += cost
        elif planned is not None:
            row[3], row[4] = row[3] + 1, row[4] + planned
        else:
            row[5], row[6] = row[5] + 1, row[6] + quantity
    return sorted((*key, *row) for key, row in days.items())


def stored_days(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """provider_order_days as stored, but for the rows left counting nothing (the triggers keep
    a row whose orders all moved away)."""
    columns = "orders, revenue, cost, planned, planned_cost, uncosted, uncosted_quantity"
    return db.execute(
        f"SELECT provider, day, upstream_service, {columns} FROM provider_order_days "
        f"WHERE NOT ({' AND '.join(f'{c.strip()} = 0' for c in columns.split(','))}) "
        "ORDER BY provider, day, upstream_service"
    ).fetchall()


def reference_outcomes(
    db: sqlite3.Connection, provider: str, since: float, until: float
) -> dict[str, int]:
    return dict(db.execute(REFERENCE_OUTCOMES, (provider, since, until)).fetchall())


async def history(
    store: Store, rng: random.Random, first_day: int, days: int, count: int = 260
) -> list[int]:
    """`count` orders created over `days` UTC days from `first_day`, moved through the store's
    writes; the days' midnights and the floats either side of them get orders of their own."""
    await store.record_catalogue(
        "alpha",
        first_day * DAY,
        2,
        [
            RouteListing("alpha", 101, True, "Followers", "Default", 40_000, 10, 10**6),
            RouteListing("alpha", 102, True, "Pack", "Package", 90_000, 1, 1),
        ],
    )
    await store.record_catalogue(
        "beta", first_day * DAY, 1, [RouteListing("beta", 201, True, "F", "Default", 55_000)]
    )
    resellers = [
        (await store.create_reseller(name, f"hash-{name}", v2.to_minor(Decimal(10**6)))).id
        for name in ("acme", "bolt", "cask")
    ]
    moments = [first_day * DAY + rng.uniform(0, days * DAY) for _ in range(count)]
    for day in range(first_day, first_day + days + 1):
        midnight = float(day * DAY)
        moments += [midnight, math.nextafter(midnight, 0), math.nextafter(midnight, math.inf)]
    orders = []

    def planned() -> int | None:
        """The cost the order's route was planned at (minor units); None: no rate was known."""
        return None if rng.random() < 0.3 else rng.randrange(0, 300_000)

    for n, at in enumerate(moments):
        provider, upstream_service = ROUTES[n % len(ROUTES)]
        quantity = rng.choice((100, 1000, 2500))
        order_id = await store.reserve_order(
            NewOrder(
                reseller_id=resellers[n % len(resellers)],
                service=1,
                link=f"https://x.example/{n}",
                quantity=quantity,
                charge=rng.randrange(1, 500_000),
                params={},
                provider=provider,
                upstream_service=upstream_service,
            )
        )
        assert order_id is not None
        await store.write(  # as if made then
            lambda db, at=at, order_id=order_id: db.execute(
                "UPDATE orders SET created_at = ? WHERE id = ?", (at, order_id)
            )
        )
        orders.append(order_id)
        attempt = Attempt(0, provider, upstream_service, at + rng.uniform(0, 2), 0.05, "accepted")
        fate = n % 7
        if fate == 0:  # no route took it: failed, refunded
            refused = Attempt(0, provider, upstream_service, at, 0.05, "refused", "Bad")
            await store.settle_order(order_id, state="failed", attempts=[refused])
        elif fate in (1, 2):  # held; then re-routed to the next provider, or canceled
            unknown = Attempt(0, provider, upstream_service, at, 5.0, "ambiguous", "timeout")
            await store.settle_order(order_id, state="held", attempts=[unknown])
            if fate == 1:
                other, service = ROUTES[(n + 1) % len(ROUTES)]
                assert await store.begin_reroute(order_id, other, service, "re-route")
                retry = Attempt(1, other, service, at + 3, 0.05, "accepted", upstream_order=n)
                await store.settle_order(
                    order_id,
                    state="placed",
                    attempts=[retry],
                    provider=other,
                    upstream_service=service,
                    upstream_order=n,
                    estimated_cost=planned(),
                )
            else:
                assert await store.refund_held(order_id, "canceled")
        else:
            placed = Attempt(0, provider, upstream_service, attempt.started_at, 0.05, "accepted")
            await store.settle_order(
                order_id,
                state="placed",
                attempts=[placed],
                provider=provider,
                upstream_service=upstream_service,
                upstream_order=n,
                estimated_cost=planned(),
            )
    # The status sync: some Completed at a cost, some Partial or Canceled with their refunds.
    for n, order_id in enumerate(orders):
        order = await store.order(order_id)
        assert order is not None
        if order.state != "placed" or n % 5 == 0:
            continue  # no status yet: costed as planned, else at the catalogue rate if any
        ending = ("Completed", "Partial", "Canceled", "In progress")[n % 4]
        cost = rng.randrange(0, 200_000)
        refund = {"Partial": order.charge // 4, "Canceled": order.charge}.get(ending, 0)
        record = StatusRecord(order_id, "Pending", ending, 0.0, remains=0, cost=cost, refund=refund)
        await store.record_statuses([record], checked_at=order.created_at + 3600)
        if ending == "In progress" and n % 3 == 0:  # a cost that falls (the order ends Partial)
            record = StatusRecord(
                order_id, "In progress", "Partial", 0.0, cost=cost // 2, refund=order.charge // 3
            )
            await store.record_statuses([record], checked_at=order.created_at + 7200)
        if ending == "Completed" and n % 2 == 0:  # the operator's goodwill refund
            assert await store.refund_ended_order(order_id, order.charge // 10, "goodwill", "r")
    # A planned cost changed by hand (no code does it; the triggers follow it all the same).
    await store.write(
        lambda db: db.execute(
            "UPDATE orders SET estimated_cost = CASE WHEN estimated_cost IS NULL THEN 12345 END "
            "WHERE id % 9 = 0"
        )
    )
    return orders


def periods(rng: random.Random, first_day: int, days: int, now: float) -> list[tuple[float, float]]:
    """Periods of every shape: all time, the report's default, whole days, partial days, one
    inside a single day, edges a step from midnight, empty and reversed ones."""
    start, end = float(first_day * DAY), float((first_day + days) * DAY)
    found = [
        (0.0, math.inf),
        (now - 30 * DAY, math.inf),
        (start, end),
        (start + DAY, start + 3 * DAY),
        (start + 0.5 * DAY, math.inf),
        (start + 1.25 * DAY, start + 1.75 * DAY),
        (math.nextafter(start + DAY, 0), math.nextafter(start + 3 * DAY, math.inf)),
        (math.nextafter(start + DAY, math.inf), math.nextafter(start + 3 * DAY, 0)),
        (start + 2 * DAY, start + 2 * DAY),
        (start + 3 * DAY, start + DAY),
        (9e18, math.inf),
        (-5.0, start + DAY),
    ]
    for _ in range(40):
        a, b = sorted(rng.uniform(start - DAY, end + DAY) for _ in range(2))
        found.append((a, b))
    return found


async def test_provider_figures_equal_the_full_queries_over_every_period(tmp_path: Path) -> None:
    rng = random.Random(11)
    database = tmp_path / "router.db"
    store = await Store.open(database)
    first_day = 20_000  # 2024-10-04
    days = 6
    try:
        await history(store, rng, first_day, days)
        now = float((first_day + days) * DAY) + 3600
        with sqlite3.connect(database) as db:
            for since, until in periods(rng, first_day, days, now):
                for provider in PROVIDERS:
                    for to_base in (Decimal(1), Decimal("1.08")):
                        got = await store.provider_margin(
                            provider, to_base, since=since, until=until
                        )
                        assert (
                            got.orders,
                            got.revenue,
                            got.cost,
                            got.estimated,
                            got.uncosted,
                        ) == expected_margin(db, provider, since, until, to_base), (
                            provider,
                            since,
                            until,
                        )
                    outcomes = await store.add_outcomes(provider, since=since, until=until)
                    assert outcomes == reference_outcomes(db, provider, since, until), (
                        provider,
                        since,
                        until,
                    )
            # The history has what the comparison needs to mean something.
            [(placed, failed, refunded, costed, planned, rated, unrated)] = db.execute(
                "SELECT sum(state = 'placed'), sum(state = 'failed'), "
                "sum(state = 'placed' AND refunded > 0), sum(cost IS NOT NULL), "
                "sum(state = 'placed' AND cost IS NULL AND estimated_cost IS NOT NULL), "
                "sum(state = 'placed' AND coalesce(cost, estimated_cost) IS NULL "
                "AND provider <> 'gamma'), "
                "sum(state = 'placed' AND coalesce(cost, estimated_cost) IS NULL "
                "AND provider = 'gamma') FROM orders"
            ).fetchall()
            assert placed > 100 and failed > 20 and refunded > 20 and costed > 50
            assert planned > 15 and rated > 4 and unrated > 1
            assert stored_days(db) == recomputed_days(db)
            rerouted = db.execute(
                "SELECT count(*) FROM order_events WHERE kind = 'resolve' AND detail = 're-route'"
            ).fetchone()[0]
            assert rerouted > 20
    finally:
        await store.close()


async def test_reseller_totals_equal_the_full_counts(tmp_path: Path) -> None:
    database = tmp_path / "router.db"
    store = await Store.open(database)
    try:
        await history(store, random.Random(5), 20_000, 3, count=90)
        await store.create_reseller("dune", "hash-dune", 0)  # no order, no ledger row
        await store.adjust_balance("bolt", -12_345, kind="adjustment", note="fee")
        listed = await store.list_resellers()
        with sqlite3.connect(database) as db:
            want = [
                (r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in db.execute(REFERENCE_RESELLERS)
            ]
        assert [(r.id, r.name, r.enabled, r.balance, r.orders, r.ledger_sum) for r in listed] == (
            want
        )
        assert all(r.balance == r.ledger_sum for r in listed)
        assert [r.orders for r in listed if r.name == "dune"] == [0]
    finally:
        await store.close()


async def test_the_migration_backfills_what_the_triggers_keep(tmp_path: Path) -> None:
    """A database written before 0011 gets the rollups the triggers would have kept (0011's
    backfill, then 0015's recomputation of provider_order_days)."""
    database = tmp_path / "router.db"
    store = await Store.open(database)
    try:
        await history(store, random.Random(7), 20_000, 3, count=90)
    finally:
        await store.close()
    tables = ("provider_order_days", "provider_attempt_days", "reseller_totals")
    with sqlite3.connect(database) as db:
        kept = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
        # Back to 0010: the rollups and their triggers gone, 0011 and 0015 (which builds on its
        # provider_order_days) not recorded.
        triggers = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND ("
            + " OR ".join(f"sql LIKE '%{t}%'" for t in tables)
            + ")"
        ).fetchall()
        assert len(triggers) == 10
        for (name,) in triggers:
            db.execute(f"DROP TRIGGER {name}")
        for table in tables:
            db.execute(f"DROP TABLE {table}")
        db.execute(
            "DELETE FROM schema_migrations "
            "WHERE name IN ('0011_report_rollups.sql', '0015_planned_costs.sql')"
        )
        # 0011's backfill counts through orders_by_reseller, which a 0010 database has (0013,
        # applied after it, replaces that index with orders_status).
        db.execute("CREATE INDEX IF NOT EXISTS orders_by_reseller ON orders (reseller_id, id)")
    await (await Store.open(database)).close()
    with sqlite3.connect(database) as db:
        backfilled = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
        assert stored_days(db) == recomputed_days(db)
    assert all(kept[t] for t in tables)
    assert backfilled == kept
