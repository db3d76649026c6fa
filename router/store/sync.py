"""Refills and the status sync: what is due, what upstream said."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence

from router.store.database import Database, _placeholders
from router.store.records import (
    _ACTIVE_ORDER,
    _OPEN_REFILL,
    ActiveOrder,
    NewOrder,
    OpenRefill,
    OpenWork,
    Order,
    OrderSyncState,
    Refill,
    StatusChange,
    StatusRecord,
)


class SyncStore(Database):
    # --- Refills ------------------------------------------------------------------------------

    async def create_refills(self, refills: Sequence[tuple[Order, int]]) -> dict[int, int]:
        """Refills the upstream made, as (order, upstream refill ID), in ONE statement: the
        local refill ID of each order."""
        if not refills:
            return {}
        now = time.time()
        values: list[object] = []
        for order, upstream_refill in refills:
            assert order.provider is not None
            values += (order.id, order.reseller_id, order.provider, upstream_refill, now, now)
        rows = await self.write(
            lambda db: db.execute(
                "INSERT INTO refills (order_id, reseller_id, provider, upstream_refill, "
                "created_at, updated_at) VALUES "
                + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(refills))
                + " RETURNING order_id, id",
                values,
            ).fetchall()
        )
        return {row[0]: row[1] for row in rows}

    async def open_refills_of(self, order_ids: Sequence[int]) -> dict[int, int]:
        """The refill still open (Pending, In progress) of each of these orders that has one:
        order ID -> the latest such refill's ID."""
        if not order_ids:
            return {}
        rows = await self._reader.execute_fetchall(
            "SELECT order_id, max(id) FROM refills INDEXED BY refills_open_by_order "
            f"WHERE order_id IN ({_placeholders(len(order_ids))}) AND {_OPEN_REFILL} "
            "GROUP BY order_id",
            list(order_ids),
        )
        return {row[0]: row[1] for row in rows}

    async def refills_of(self, reseller_id: int, refill_ids: Sequence[int]) -> dict[int, Refill]:
        if not refill_ids:
            return {}
        rows = await self._reader.execute_fetchall(
            "SELECT id, order_id, reseller_id, provider, upstream_refill, status FROM refills "
            f"WHERE reseller_id = ? AND id IN ({_placeholders(len(refill_ids))})",
            (reseller_id, *refill_ids),
        )
        return {row[0]: Refill(*row) for row in rows}

    async def orders_due(
        self,
        provider: str,
        *,
        due_by: float,
        after: tuple[float, int] | None = None,
        limit: int = 100,
    ) -> list[ActiveOrder]:
        """Active orders at `provider` due by `due_by`, oldest due first, after the keyset
        `after` (next_check_at, id) of the previous page: a pass reads each order once even
        when its call fails and leaves it due.

        Two seeks into orders_due, merged in order: the rest of the orders due at `after`'s
        time, by ID (many share one: every order not checked yet is due at 0), then those due
        later. One condition `(next_check_at, id) > after` would make SQLite step over every
        order due at that time still left before the keyset, so that a page could cost as
        much as the pass so far."""
        last_due, last_id = after if after is not None else (-1.0, 0)
        due = (
            "SELECT id, upstream_order, quantity, charge, status, created_at, next_check_at, "
            "sync_problem, service, cost, estimated_cost FROM orders INDEXED BY orders_due "
            f"WHERE provider = ?1 AND {_ACTIVE_ORDER} AND upstream_order IS NOT NULL AND "
        )
        # `?3 <= ?2` rather than `next_check_at <= ?2`: a bound on the column would turn the
        # first seek into a range of it, stepping over the orders before the keyset again.
        rows = await self._reader.execute_fetchall(
            f"{due}next_check_at = ?3 AND id > ?4 AND ?3 <= ?2 "
            f"UNION ALL {due}next_check_at > ?3 AND next_check_at <= ?2 "
            "ORDER BY next_check_at, id LIMIT ?5",
            (provider, due_by, last_due, last_id, limit),
        )
        return [ActiveOrder(*row) for row in rows]

    async def oldest_due(self, provider: str) -> float | None:
        """When the most overdue active order at `provider` fell due (unix time); None when it
        has no active order. The status loop takes orders in this order (orders_due).

        An order never checked yet (next_check_at 0: due at once) fell due when it was placed:
        its updated_at, which only the placement wrote. Of those, orders_due holds the lowest
        ID first, the oldest order, which stands for the earliest placed (a held order placed
        later by the operator may have been placed before it: until the next pass, the lag is
        then read a little short). Two steps into orders_due, whatever the number of orders.
        """
        rows = await self._reader.execute_fetchall(
            "SELECT (SELECT next_check_at FROM orders INDEXED BY orders_due "
            f"WHERE provider = ?1 AND {_ACTIVE_ORDER} AND next_check_at > 0 "
            "AND upstream_order IS NOT NULL ORDER BY next_check_at LIMIT 1), "
            "(SELECT updated_at FROM orders INDEXED BY orders_due "
            f"WHERE provider = ?1 AND {_ACTIVE_ORDER} AND next_check_at = 0 "
            "AND upstream_order IS NOT NULL ORDER BY id LIMIT 1)",
            (provider,),
        )
        due = [at for at in rows[0] if at is not None]  # type: ignore[index]
        return min(due, default=None)

    async def record_statuses(
        self, records: Sequence[StatusRecord], *, checked_at: float
    ) -> list[StatusChange]:
        """Apply one status call's answers in one transaction; the changes made."""
        same = [r for r in records if r.status is not None and r.status == r.seen_status]
        unreadable = [r for r in records if r.status is None]
        changed = [r for r in records if r.status is not None and r.status != r.seen_status]

        def apply(db: sqlite3.Connection) -> list[StatusChange]:
            changes: list[StatusChange] = []
            db.executemany(
                "UPDATE orders SET start_count = coalesce(?, start_count), "
                "remains = coalesce(?, remains), cost = coalesce(?, cost), "
                "upstream_charge = coalesce(?, upstream_charge), "
                "upstream_currency = coalesce(?, upstream_currency), sync_problem = NULL, "
                "checked_at = ?, next_check_at = ?, updated_at = ? "
                f"WHERE id = ? AND status = ? AND {_ACTIVE_ORDER}",
                [
                    (
                        *_sync_values(r),
                        checked_at,
                        r.next_check_at,
                        checked_at,
                        r.order_id,
                        r.status,
                    )
                    for r in same
                ],
            )
            db.executemany(
                "UPDATE orders SET start_count = coalesce(?, start_count), "
                "remains = coalesce(?, remains), cost = coalesce(?, cost), "
                "upstream_charge = coalesce(?, upstream_charge), "
                "upstream_currency = coalesce(?, upstream_currency), sync_problem = ?, "
                f"next_check_at = ?, updated_at = ? WHERE id = ? AND {_ACTIVE_ORDER}",
                [
                    (*_sync_values(r), r.problem, r.next_check_at, checked_at, r.order_id)
                    for r in unreadable
                ],
            )
            db.executemany(
                "INSERT INTO order_events (order_id, at, kind, status, detail) "
                "SELECT id, ?, 'unknown_status', status, ? FROM orders WHERE id = ? "
                f"AND {_ACTIVE_ORDER}",
                [
                    (checked_at, r.problem, r.order_id)
                    for r in unreadable
                    if r.problem != r.seen_problem
                ],
            )
            for record in changed:
                change = self._change_status(db, record, checked_at)
                if change is not None:
                    changes.append(change)
            return changes

        return await self.write(apply)

    @staticmethod
    def _change_status(
        db: sqlite3.Connection, record: StatusRecord, now: float
    ) -> StatusChange | None:
        assert record.status is not None
        cursor = db.execute(
            "UPDATE orders SET status = ?, start_count = coalesce(?, start_count), "
            "remains = coalesce(?, remains), cost = coalesce(?, cost), "
            "upstream_charge = coalesce(?, upstream_charge), "
            "upstream_currency = coalesce(?, upstream_currency), sync_problem = NULL, "
            "checked_at = ?, next_check_at = ?, updated_at = ? "
            f"WHERE id = ? AND status = ? AND {_ACTIVE_ORDER}",
            (
                record.status,
                *_sync_values(record),
                now,
                record.next_check_at,
                now,
                record.order_id,
                record.seen_status,
            ),
        )
        if cursor.rowcount != 1:
            return None  # another pass moved it first, or it left `placed`: nothing to do
        db.execute(
            "INSERT INTO order_events (order_id, at, kind, status, detail) "
            "VALUES (?, ?, 'status', ?, ?)",
            (record.order_id, now, record.status, record.detail),
        )
        if record.refund <= 0:
            return StatusChange(record.order_id, record.status, 0)
        cursor = db.execute(
            "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
            "SELECT reseller_id, id, 'refund', ?, ?, ? FROM orders WHERE id = ? "
            "ON CONFLICT DO NOTHING",
            (record.refund, f"upstream status {record.status}", now, record.order_id),
        )
        if cursor.rowcount != 1:
            return StatusChange(record.order_id, record.status, 0, refund_refused=True)
        return StatusChange(record.order_id, record.status, record.refund)

    async def order_sync_state(self, order_id: int) -> OrderSyncState | None:
        rows = await self._reader.execute_fetchall(
            "SELECT checked_at, next_check_at, cost, upstream_charge, upstream_currency, "
            "refunded, sync_problem FROM orders WHERE id = ?",
            (order_id,),
        )
        return OrderSyncState(*rows[0]) if rows else None  # type: ignore[index]

    async def open_refills(
        self, provider: str, *, after: int = 0, limit: int = 100
    ) -> list[OpenRefill]:
        """Refills at `provider` whose outcome is still open, by ID after `after`."""
        rows = await self._reader.execute_fetchall(
            "SELECT id, upstream_refill, status FROM refills INDEXED BY refills_open "
            f"WHERE provider = ? AND {_OPEN_REFILL} AND id > ? ORDER BY id LIMIT ?",
            (provider, after, limit),
        )
        return [OpenRefill(*row) for row in rows]

    async def open_work(self, provider: str, *, placing_before: float) -> OpenWork:
        """What `provider` still has open, and the orders being placed since before
        `placing_before` (unix time), anywhere. Each count reads one partial index."""
        active = await self._reader.execute_fetchall(
            f"SELECT count(*) FROM orders INDEXED BY orders_due WHERE provider = ? "
            f"AND {_ACTIVE_ORDER}",
            (provider,),
        )
        unsettled = await self._reader.execute_fetchall(
            "SELECT (SELECT count(*) FROM orders INDEXED BY orders_held "
            "WHERE state = 'held' AND provider = ?1) + coalesce(sum(provider = ?1), 0), "
            "coalesce(sum(created_at < ?2), 0) "
            "FROM orders INDEXED BY orders_placing WHERE state = 'placing'",
            (provider, placing_before),
        )
        refills = await self._reader.execute_fetchall(
            f"SELECT count(*) FROM refills INDEXED BY refills_open WHERE provider = ? "
            f"AND {_OPEN_REFILL}",
            (provider,),
        )
        (active_orders,), (unsettled_orders, placing), (open_refills,) = (
            next(iter(rows)) for rows in (active, unsettled, refills)
        )
        return OpenWork(active_orders + unsettled_orders, open_refills, placing)

    async def record_refill_statuses(self, changes: Sequence[tuple[OpenRefill, str]]) -> None:
        """New refill words, each applied only from the word read before asking."""
        if not changes:
            return
        rows = [(word, time.time(), refill.id, refill.status) for refill, word in changes]
        await self.write(
            lambda db: db.executemany(
                "UPDATE refills SET status = ?, updated_at = ? WHERE id = ? AND status = ?", rows
            )
        )

    async def record_cancel_requests(self, outcomes: Mapping[int, str | None]) -> None:
        """Forwarded cancels in their orders' history: None when the upstream took it."""
        if not outcomes:
            return
        now = time.time()
        rows = [
            (now, "requested" if error is None else f"refused: {error}", order_id)
            for order_id, error in outcomes.items()
        ]
        await self.write(
            lambda db: db.executemany(
                "INSERT INTO order_events (order_id, at, kind, status, detail) "
                "SELECT id, ?, 'cancel', status, ? FROM orders WHERE id = ?",
                rows,
            )
        )

    async def create_placed_orders(self, orders: Sequence[tuple[NewOrder, int]]) -> range:
        """Orders already placed upstream (NewOrder, upstream order ID), debited, in ONE
        transaction; their local IDs. For imports and tests that need thousands at once."""
        now = time.time()

        def create(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, params, "
                "provider, upstream_service, upstream_order, created_at, updated_at) "
                "VALUES (?, ?, 'placed', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        o.reseller_id,
                        o.service,
                        o.link,
                        o.quantity,
                        o.charge,
                        json.dumps(dict(o.params), separators=(",", ":")),
                        o.provider,
                        o.upstream_service,
                        upstream_order,
                        now,
                        now,
                    )
                    for o, upstream_order in orders
                ],
            )
            return int(db.execute("SELECT max(id) FROM orders").fetchone()[0] or 0)

        last = await self.write(create)
        # One writer: the rowids of one job's inserts are consecutive.
        return range(last - len(orders) + 1, last + 1)


def _sync_values(
    record: StatusRecord,
) -> tuple[int | None, int | None, int | None, str | None, str | None]:
    return (
        record.start_count,
        record.remains,
        record.cost,
        record.upstream_charge,
        record.upstream_currency,
    )
