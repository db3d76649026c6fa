"""The database of `make bench-scale`: N orders of several resellers at several providers.

    expected = fill(database, count, reseller_ids, due_at=...)   # seconds in `expected.filled`
    ok, lines = ledger_check(database, expected)

A few INSERT ... SELECT statements over a recursive CTE, in one transaction, through the real
schema (every index and trigger of the migrations: the debit trigger writes each order's
charge to the ledger, the refund trigger marks each refunded order), on a plain sqlite3
connection so that the bench depends on the schema, not on the store's Python API. Order i:

| kind      | which i                | state, status              | ledger            |
|-----------|------------------------|----------------------------|-------------------|
| held      | i % 1000 == 0          | held, Pending              | charge            |
| failed    | i % 20 == 1            | failed, Pending            | charge + refund   |
| active    | i % 10 == 2            | placed, Pending/In progress| charge            |
| canceled  | i % 100 == 4           | placed, Canceled           | charge + refund   |
| partial   | i % 50 == 3            | placed, Partial (1/4 left) | charge + 1/4 back |
| completed | the rest (~82%)        | placed, Completed          | charge            |

at provider PROVIDERS[i % 3], of reseller (i // 7) % len(resellers), created over the last
CREATED_DAYS days; each order has one attempt (accepted, refused or ambiguous) and one `add`
call record, and every 10th a `status` call record too, rolled up per minute as the router's
background task leaves them (raw rows kept only for the last CALL_RAW_RETENTION_SECONDS).
The k-th active order (k from 0) is upstream order SIM_FIRST_ID + k at every provider: the
simulator of the bench creates exactly those (`SimProvider.create_orders`), every 5th of them
ending Partial with a quarter left.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

from router import v2
from router.store import CALL_RAW_RETENTION_SECONDS
from router.store.calls import _ROLL_UP

PROVIDERS: Final = ("alpha", "beta", "gamma")
RESELLERS: Final = tuple(f"shop-{n}" for n in range(1, 6))
TOPUP: Final = 10_000_000  # each reseller's starting balance, in `currency`
SERVICE: Final = 1  # the local service: rate 1.00 per 1000, routed to upstream service 101
UPSTREAM_SERVICE: Final = 101  # the simulator's: rate 0.50 per 1000
QUANTITY: Final = 1000
CHARGE: Final = v2.to_minor(Decimal("1.00"))
COST: Final = v2.to_minor(Decimal("0.50"))
PARTIAL_REMAINS: Final = QUANTITY // 4  # as the simulator ends its Partial orders
SIM_FIRST_ID: Final = 1000  # SimProvider's first order ID
SIM_PARTIAL_EVERY: Final = 5  # SimProvider's default partial_every
UPSTREAM_BASE: Final = 10_000_000  # upstream IDs of the orders that are not active
CREATED_DAYS: Final = 28  # inside a 30-day report period
FILL_CACHE_KIB: Final = 512 * 1024
NOT_DUE: Final = 365 * 24 * 3600.0  # ahead of now: the sync leaves the active orders alone

# One row per order, every column from `kind`; ?1 count, ?2 first reseller ID, ?3 resellers,
# ?4 start time, ?5 seconds between orders, ?6 next_check_at of the active ones.
_ORDERS: Final = f"""
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1),
k(i, kind, at) AS (
    SELECT i, CASE WHEN i % 1000 = 0 THEN 'held' WHEN i % 20 = 1 THEN 'failed'
                   WHEN i % 10 = 2 THEN 'active' WHEN i % 100 = 4 THEN 'canceled'
                   WHEN i % 50 = 3 THEN 'partial' ELSE 'completed' END,
           ?4 + i * ?5
    FROM n
)
INSERT INTO orders (reseller_id, service, state, status, link, quantity, charge, params,
                    provider, upstream_service, upstream_order, start_count, remains, cost,
                    upstream_charge, upstream_currency, created_at, updated_at, checked_at,
                    next_check_at)
SELECT ?2 + (i / 7) % ?3, {SERVICE},
       CASE kind WHEN 'held' THEN 'held' WHEN 'failed' THEN 'failed' ELSE 'placed' END,
       CASE kind WHEN 'active' THEN CASE (i / 10) % 2 WHEN 0 THEN 'Pending' ELSE 'In progress' END
                 WHEN 'canceled' THEN 'Canceled' WHEN 'partial' THEN 'Partial'
                 WHEN 'completed' THEN 'Completed' ELSE 'Pending' END,
       'https://x.example/p/' || i, {QUANTITY}, {CHARGE}, '{{}}',
       CASE i % 3 WHEN 0 THEN '{PROVIDERS[0]}' WHEN 1 THEN '{PROVIDERS[1]}'
                  ELSE '{PROVIDERS[2]}' END,
       {UPSTREAM_SERVICE},
       CASE kind WHEN 'active' THEN {SIM_FIRST_ID} + (i - 2) / 10 WHEN 'held' THEN NULL
                 WHEN 'failed' THEN NULL ELSE {UPSTREAM_BASE} + i END,
       CASE WHEN kind IN ('completed', 'partial', 'canceled') THEN 100 END,
       CASE kind WHEN 'completed' THEN 0 WHEN 'partial' THEN {PARTIAL_REMAINS}
                 WHEN 'canceled' THEN {QUANTITY} END,
       CASE kind WHEN 'completed' THEN {COST}
                 WHEN 'partial' THEN {COST * (QUANTITY - PARTIAL_REMAINS) // QUANTITY}
                 WHEN 'canceled' THEN 0 END,
       CASE kind WHEN 'completed' THEN '0.50' WHEN 'partial' THEN '0.375'
                 WHEN 'canceled' THEN '0' END,
       CASE WHEN kind IN ('completed', 'partial', 'canceled') THEN 'USD' END,
       at, at + 60,
       CASE WHEN kind IN ('completed', 'partial', 'canceled') THEN at + 3600
            WHEN kind = 'active' THEN at + 60 END,
       CASE kind WHEN 'active' THEN ?6 ELSE 0 END
FROM k
"""

# What the status sync (Partial, Canceled) and a failed placement gave back.
_REFUNDS: Final = """
INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at)
SELECT reseller_id, id, 'refund',
       CASE WHEN state = 'failed' OR status = 'Canceled' THEN charge
            ELSE charge * remains / quantity END,
       CASE WHEN state = 'failed' THEN 'no upstream took the order'
            ELSE 'upstream status ' || status END,
       created_at + 3600
FROM orders WHERE state = 'failed' OR (state = 'placed' AND status IN ('Canceled', 'Partial'))
"""

_ATTEMPTS: Final = """
INSERT INTO attempts (order_id, rank, provider, upstream_service, started_at, latency, outcome,
                      error, upstream_order)
SELECT id, 0, provider, upstream_service, created_at, 0.040 + (id % 50) * 0.002,
       CASE state WHEN 'failed' THEN 'refused' WHEN 'held' THEN 'ambiguous' ELSE 'accepted' END,
       CASE state WHEN 'failed' THEN 'Incorrect request'
                  WHEN 'held' THEN 'timed out after sending' END,
       CASE WHEN state = 'placed' THEN upstream_order END
FROM orders
"""

_CALLS: Final = """
INSERT INTO upstream_calls (provider, action, started_at, latency, outcome)
SELECT provider, 'add', created_at, 0.040 + (id % 50) * 0.002,
       CASE state WHEN 'failed' THEN 'refused' WHEN 'held' THEN 'ambiguous' ELSE 'accepted' END
FROM orders
UNION ALL
SELECT provider, 'status', created_at + 60, 0.030 + (id % 40) * 0.002, 'accepted'
FROM orders WHERE id % 10 = 0
ORDER BY 3
"""

# The router's steady state (router.store.calls): every call rolled up by the store's own
# roll-up statement, the watermark past them, raw rows kept only for the raw retention.
_ROLLED_UP: Final = """
UPDATE counters SET value = (SELECT coalesce(max(id), 0) FROM upstream_calls)
WHERE name = 'upstream_calls_rolled_up'
"""
_RAW_PRUNED: Final = """
DELETE FROM upstream_calls WHERE started_at < ?1 AND id < (SELECT max(id) FROM upstream_calls)
"""


def kind(i: int) -> str:
    """What the fill makes of order i (the CASE of _ORDERS)."""
    if i % 1000 == 0:
        return "held"
    if i % 20 == 1:
        return "failed"
    if i % 10 == 2:
        return "active"
    if i % 100 == 4:
        return "canceled"
    return "partial" if i % 50 == 3 else "completed"


def active_count(count: int) -> int:
    """Active orders among `count`: i % 10 == 2, which no earlier kind takes."""
    return 0 if count < 2 else (count - 2) // 10 + 1


@dataclass
class Expected:
    """What the database must hold, counted without it."""

    count: int
    filled: float = 0.0  # seconds the fill took
    # orders, refunds, attempts, calls, their roll-up, its watermark, the raw rows' pruning
    steps: list[float] = field(default_factory=list)
    balances: dict[int, int] = field(default_factory=dict)  # reseller ID -> minor units
    shown: dict[int, int] = field(default_factory=dict)  # reseller ID -> orders not failed
    kinds: dict[str, int] = field(default_factory=dict)
    sync_refunds: dict[int, int] = field(default_factory=dict)  # after the sync: per reseller
    sync_partials: int = 0

    @property
    def placed(self) -> int:
        return self.count - self.kinds.get("held", 0) - self.kinds.get("failed", 0)


def count_expected(count: int, reseller_ids: list[int]) -> Expected:
    expected = Expected(count)
    for rid in reseller_ids:
        expected.balances[rid] = v2.to_minor(Decimal(TOPUP))
        expected.shown[rid] = 0
        expected.sync_refunds[rid] = 0
    back = CHARGE * PARTIAL_REMAINS // QUANTITY
    for i in range(1, count + 1):
        rid = reseller_ids[(i // 7) % len(reseller_ids)]
        what = kind(i)
        expected.kinds[what] = expected.kinds.get(what, 0) + 1
        expected.balances[rid] -= CHARGE
        if what in ("failed", "canceled"):
            expected.balances[rid] += CHARGE
        elif what == "partial":
            expected.balances[rid] += back
        if what != "failed":
            expected.shown[rid] += 1
        if what == "active" and ((i - 2) // 10 + 1) % SIM_PARTIAL_EVERY == 0:
            expected.sync_refunds[rid] += back
            expected.sync_partials += 1
    return expected


def fill(database: Path, count: int, reseller_ids: list[int], *, due_at: float) -> Expected:
    """Fill `count` orders (see the module's table) for `reseller_ids` (consecutive, as a fresh
    database numbers them); what it must then hold."""
    first = reseller_ids[0]
    if reseller_ids != list(range(first, first + len(reseller_ids))):
        raise ValueError(f"reseller IDs are not consecutive: {reseller_ids}")
    now = time.time()
    start, step = now - CREATED_DAYS * 86400, (CREATED_DAYS - 1) * 86400 / max(count, 1)
    started = time.perf_counter()
    steps: list[float] = []
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        # The fill's own connection: a cache that holds the indexes it grows, or each insert
        # reads and writes their pages again (minutes instead of seconds at a million).
        db.execute(f"PRAGMA cache_size = -{FILL_CACHE_KIB}")
        db.execute("BEGIN IMMEDIATE")
        for statement, args in (
            (_ORDERS, (count, first, len(reseller_ids), start, step, due_at)),
            (_REFUNDS, ()),
            (_ATTEMPTS, ()),
            (_CALLS, ()),
            (_ROLL_UP, (0, 2**62)),
            (_ROLLED_UP, ()),
            (_RAW_PRUNED, (now - CALL_RAW_RETENTION_SECONDS,)),
        ):
            began = time.perf_counter()
            db.execute(statement, args)
            steps.append(time.perf_counter() - began)
        # No ANALYZE: the router never runs it, so a database in production has no statistics
        # and its plans are the planner's defaults; the bench measures those.
        db.execute("COMMIT")
    expected = count_expected(count, reseller_ids)
    expected.filled = time.perf_counter() - started
    expected.steps = steps
    return expected


def make_active_due(database: Path) -> int:
    """Every active order due at once: the next sync pass works through all of them."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        cursor = db.execute(
            "UPDATE orders SET next_check_at = 0 WHERE state = 'placed' "
            "AND status NOT IN ('Completed', 'Partial', 'Canceled')"
        )
        return cursor.rowcount


def ledger_check(
    database: Path, expected: Expected, *, synced: bool = False
) -> tuple[bool, list[str]]:
    """Each reseller's balance = the sum of its ledger = what `expected` counted (plus the
    sync's refunds once `synced`); orders by kind as filled."""
    lines, ok = [], True
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT r.id, r.name, r.balance, (SELECT coalesce(sum(amount), 0) FROM ledger l "
            "WHERE l.reseller_id = r.id) FROM resellers r ORDER BY r.id"
        ).fetchall()
        [(held, failed, placed, active, partial)] = db.execute(
            "SELECT sum(state = 'held'), sum(state = 'failed'), sum(state = 'placed'), "
            "sum(state = 'placed' AND status NOT IN ('Completed', 'Partial', 'Canceled')), "
            "sum(state = 'placed' AND status = 'Partial') FROM orders"
        ).fetchall()
    for rid, name, balance, ledger in rows:
        want = expected.balances[rid] + (expected.sync_refunds[rid] if synced else 0)
        exact = balance == ledger == want
        ok &= exact
        if not exact:
            lines.append(
                f"{name}: balance {v2.format_money(balance)}, ledger sum "
                f"{v2.format_money(ledger)}, expected {v2.format_money(want)}"
            )
    want_active = 0 if synced else expected.kinds.get("active", 0)
    want_partial = expected.kinds.get("partial", 0) + (expected.sync_partials if synced else 0)
    counts = (held or 0, failed or 0, placed or 0, active or 0, partial or 0)
    wanted = (
        expected.kinds.get("held", 0),
        expected.kinds.get("failed", 0),
        expected.placed,
        want_active,
        want_partial,
    )
    if counts != wanted:
        ok = False
        lines.append(f"orders (held, failed, placed, active, partial): {counts}, expected {wanted}")
    if ok:
        lines.append(
            f"{len(rows)} resellers: balance = ledger sum = expected; orders "
            f"(held, failed, placed, active, partial) = {counts}"
        )
    return ok, lines
