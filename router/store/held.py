"""Held orders: the operator's resolutions."""

from __future__ import annotations

import sqlite3
import time

from router.store.database import _upstream_taken
from router.store.orders import OrderStore
from router.store.records import HeldOrder, LedgerEntry, OrderEvent


class HeldStore(OrderStore):
    # --- Operator: held orders ----------------------------------------------------------------
    # Each resolution moves the state, the ledger and the order's history in ONE transaction,
    # and only from `held`: two operators (or a retry) cannot resolve the same order twice.

    async def held_orders(self) -> list[HeldOrder]:
        rows = await self._reader.execute_fetchall(
            "SELECT o.id, o.reseller_id, r.name, o.service, o.provider, o.upstream_service, "
            "o.charge, o.created_at, o.updated_at, "
            "(SELECT a.error FROM attempts a WHERE a.order_id = o.id AND a.provider = o.provider "
            "AND a.upstream_service = o.upstream_service ORDER BY a.id DESC LIMIT 1) "
            "FROM orders o INDEXED BY orders_held JOIN resellers r ON r.id = o.reseller_id "
            "WHERE o.state = 'held' ORDER BY o.id"
        )
        return [HeldOrder(*row) for row in rows]

    async def order_history(self, order_id: int) -> list[OrderEvent]:
        rows = await self._reader.execute_fetchall(
            "SELECT at, kind, status, detail FROM order_events WHERE order_id = ? ORDER BY id",
            (order_id,),
        )
        return [OrderEvent(*row) for row in rows]

    async def order_ledger(self, order_id: int) -> list[LedgerEntry]:
        rows = await self._reader.execute_fetchall(
            "SELECT id, reseller_id, order_id, kind, amount, note, created_at FROM ledger "
            "WHERE order_id = ? ORDER BY id",
            (order_id,),
        )
        return [LedgerEntry(*row) for row in rows]

    async def reseller_name(self, reseller_id: int) -> str | None:
        rows = await self._reader.execute_fetchall(
            "SELECT name FROM resellers WHERE id = ?", (reseller_id,)
        )
        return str(rows[0][0]) if rows else None  # type: ignore[index]

    async def attach_held(self, order_id: int, upstream_order: int, event: str) -> bool:
        """Held -> placed with the upstream order found at the provider it was held on.

        False (nothing changed) when the order is not held, or when another order of that
        provider already has this upstream order (the same upstream order twice is two costs
        for one delivery): the database's unique index refuses it (migration 0006).
        """
        now = time.time()

        def attach(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE orders SET state = 'placed', upstream_order = ?1, updated_at = ?2 "
                "WHERE id = ?3 AND state = 'held'",
                (upstream_order, now, order_id),
            )
            if cursor.rowcount != 1:
                return False
            self._insert_resolve_event(db, order_id, now, event)
            return True

        try:
            return await self.write(attach)
        except sqlite3.IntegrityError as exc:
            if _upstream_taken(exc):
                return False
            raise

    async def refund_ended_order(self, order_id: int, amount: int, note: str, event: str) -> bool:
        """The operator's refund of `amount` for an order that has ended upstream and was not
        refunded yet (a package that ended Partial, a goodwill gesture): the order's one refund
        row, so no later refund can pay twice. False (nothing changed) otherwise."""
        now = time.time()

        def refund(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
                "SELECT reseller_id, id, 'refund', ?1, ?2, ?3 FROM orders WHERE id = ?4 "
                "AND state = 'placed' AND status IN ('Completed', 'Partial', 'Canceled') "
                "AND refunded = 0 AND ?1 > 0 AND ?1 <= charge ON CONFLICT DO NOTHING",
                (amount, note, now, order_id),
            )
            if cursor.rowcount != 1:
                return False
            self._insert_resolve_event(db, order_id, now, event)
            return True

        return await self.write(refund)

    async def refund_held(self, order_id: int, event: str) -> bool:
        """Held -> canceled: status Canceled, nothing delivered, the charge refunded in full.

        False (nothing changed) when the order is not held.
        """
        now = time.time()

        def cancel(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE orders SET state = 'canceled', updated_at = ? "
                "WHERE id = ? AND state = 'held'",
                (now, order_id),
            )
            if cursor.rowcount != 1:
                return False
            self._refund_canceled(db, order_id, now, "held order canceled by the operator")
            self._insert_resolve_event(db, order_id, now, event)
            return True

        return await self.write(cancel)

    async def begin_reroute(
        self, order_id: int, provider: str, upstream_service: int, event: str
    ) -> bool:
        """Held -> placing on the first route to try; then `settle_order` ends it as an add.

        False (nothing changed) when the order is not held: only one re-route at a time.
        """
        now = time.time()

        def begin(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE orders SET state = 'placing', provider = ?, upstream_service = ?, "
                "updated_at = ?, placing_by = ? WHERE id = ? AND state = 'held'",
                (provider, upstream_service, now, self.owner, order_id),
            )
            if cursor.rowcount != 1:
                return False
            self._insert_resolve_event(db, order_id, now, event)
            return True

        return await self.write(begin)

    async def hold_interrupted_reroute(self, order_id: int, event: str) -> None:
        """A re-route stopped mid-call (Ctrl-C, error): held again on the route being tried."""
        now = time.time()

        def hold(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "UPDATE orders SET state = 'held', updated_at = ? "
                "WHERE id = ? AND state = 'placing'",
                (now, order_id),
            )
            if cursor.rowcount == 1:
                self._insert_resolve_event(db, order_id, now, event)

        await self.write(hold)
