"""Resellers and their ledger."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from router.store.database import Database, StoreError, _reason
from router.store.records import LedgerEntry, Reseller, ResellerSummary


class ResellerStore(Database):
    # --- Resellers ----------------------------------------------------------------------------

    async def create_reseller(self, name: str, key_hash: str, balance: int = 0) -> Reseller:
        now = time.time()

        def create(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO resellers (name, key_hash, created_at) VALUES (?, ?, ?)",
                (name, key_hash, now),
            )
            reseller_id = cursor.lastrowid
            assert reseller_id is not None
            if balance:
                db.execute(
                    "INSERT INTO ledger (reseller_id, kind, amount, note, created_at) "
                    "VALUES (?, 'topup', ?, 'initial balance', ?)",
                    (reseller_id, balance, now),
                )
            return reseller_id

        try:
            reseller_id = await self.write(create)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot create reseller {name!r}: {_reason(exc)}") from exc
        return Reseller(reseller_id, name, True, balance)

    async def reseller_by_key_hash(self, key_hash: str) -> Reseller | None:
        """The enabled reseller holding this key hash, or None: read at every request (a key
        the CLI disabled or rotated is refused at once), by index, on the event loop."""
        rows = await self._read_now(
            "SELECT id, name, enabled, balance FROM resellers WHERE key_hash = ? AND enabled = 1",
            (key_hash,),
        )
        return _reseller(rows[0]) if rows else None

    async def reseller_by_name(self, name: str) -> Reseller | None:
        rows = await self._reader.execute_fetchall(
            "SELECT id, name, enabled, balance FROM resellers WHERE name = ?", (name,)
        )
        return _reseller(rows[0]) if rows else None  # type: ignore[index]

    async def list_resellers(self) -> list[ResellerSummary]:
        """Every reseller with its orders (not failed) and its ledger sum, from the totals that
        migration 0011's triggers keep as orders and ledger rows are written: no scan of either.
        A reseller without a row there has no order and no ledger row yet."""
        rows = await self._reader.execute_fetchall(
            "SELECT id, name, enabled, balance, coalesce(orders, 0), coalesce(ledger, 0) "
            "FROM resellers LEFT JOIN reseller_totals ON reseller_id = id ORDER BY name"
        )
        return [ResellerSummary(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]

    async def adjust_balance(self, name: str, amount: int, *, kind: str, note: str) -> Reseller:
        """Add a ledger row of `kind` ('topup' or 'adjustment') for `amount` minor units."""
        reseller = await self.reseller_by_name(name)
        if reseller is None:
            raise StoreError(f"no reseller named {name!r}")
        args = (reseller.id, kind, amount, note, time.time())
        try:
            await self.write(
                lambda db: db.execute(
                    "INSERT INTO ledger (reseller_id, kind, amount, note, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    args,
                )
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"balance of {name!r} cannot change by that: {_reason(exc)}") from exc
        updated = await self.reseller_by_name(name)
        assert updated is not None
        return updated

    async def set_enabled(self, name: str, enabled: bool) -> None:
        await self._update_reseller(name, "enabled = ?", int(enabled))

    async def set_key_hash(self, name: str, key_hash: str) -> None:
        await self._update_reseller(name, "key_hash = ?", key_hash)

    async def _update_reseller(self, name: str, assignment: str, value: object) -> None:
        updated = await self.write(
            lambda db: (
                db.execute(
                    f"UPDATE resellers SET {assignment} WHERE name = ?", (value, name)
                ).rowcount
            )
        )
        if updated != 1:
            raise StoreError(f"no reseller named {name!r}")

    async def ledger(self, reseller_id: int) -> list[LedgerEntry]:
        rows = await self._reader.execute_fetchall(
            "SELECT id, reseller_id, order_id, kind, amount, note, created_at FROM ledger "
            "WHERE reseller_id = ? ORDER BY id",
            (reseller_id,),
        )
        return [LedgerEntry(*row) for row in rows]

    async def ledger_sum(self, reseller_id: int) -> int:
        rows = await self._reader.execute_fetchall(
            "SELECT coalesce(sum(amount), 0) FROM ledger WHERE reseller_id = ?", (reseller_id,)
        )
        return int(rows[0][0])  # type: ignore[index]


def _reseller(row: Any) -> Reseller:
    """A resellers row (id, name, enabled, balance): SQLite keeps `enabled` as 0 or 1."""
    reseller_id, name, enabled, balance = row
    return Reseller(reseller_id, name, bool(enabled), balance)
