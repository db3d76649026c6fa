"""Every SQL statement of the router: resellers, ledger, orders, attempts, refills, call records.

Usage::

    store = await Store.open(config.database)
    order_id = await store.reserve_order(new_order)   # None: not enough funds
    await store.close()

One connection writes, behind one lock (aiosqlite serialises statements, not transactions: two
coroutines sharing a connection would share a transaction); another reads (WAL lets it). Money
is integer minor units (router.v2.MINOR_PER_UNIT). The invariants that matter (balance never
below zero, balance = sum of the ledger, one refund per order) are enforced by the schema
itself, so neither a race nor the CLI can break them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

import aiosqlite

from router.upstream import CallRecord

CALL_RETENTION_SECONDS: Final = 30 * 24 * 3600.0
BUSY_TIMEOUT_MS: Final = 10_000


class StoreError(Exception):
    """A domain rule the database refused (unknown reseller, balance below zero, ...)."""


@dataclass(frozen=True, slots=True)
class Reseller:
    id: int
    name: str
    enabled: bool
    balance: int  # minor units


@dataclass(frozen=True, slots=True)
class ResellerSummary:
    id: int
    name: str
    enabled: bool
    balance: int
    orders: int
    ledger_sum: int


@dataclass(frozen=True, slots=True)
class NewOrder:
    reseller_id: int
    service: int
    link: str
    quantity: int
    charge: int
    params: Mapping[str, str]
    provider: str  # the first route to try, recorded before the call so a crash leaves a trace
    upstream_service: int


@dataclass(frozen=True, slots=True)
class Order:
    id: int
    reseller_id: int
    service: int
    state: str
    status: str
    link: str
    quantity: int
    charge: int
    params: Mapping[str, str]
    provider: str | None
    upstream_service: int | None
    upstream_order: int | None
    start_count: int | None
    remains: int | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    rank: int
    provider: str
    upstream_service: int
    started_at: float
    latency: float
    outcome: str
    error: str | None = None
    upstream_order: int | None = None


@dataclass(frozen=True, slots=True)
class Refill:
    id: int
    order_id: int
    reseller_id: int
    provider: str
    upstream_refill: int
    status: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    reseller_id: int
    order_id: int | None
    kind: str
    amount: int
    note: str | None
    created_at: float


_ORDER_COLUMNS: Final = (
    "id, reseller_id, service, state, status, link, quantity, charge, params, provider, "
    "upstream_service, upstream_order, start_count, remains, created_at"
)


def _order(row: sqlite3.Row) -> Order:
    return Order(
        id=row[0],
        reseller_id=row[1],
        service=row[2],
        state=row[3],
        status=row[4],
        link=row[5],
        quantity=row[6],
        charge=row[7],
        params=json.loads(row[8]),
        provider=row[9],
        upstream_service=row[10],
        upstream_order=row[11],
        start_count=row[12],
        remains=row[13],
        created_at=row[14],
    )


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class Store:
    """The router's SQLite database. Open with `await Store.open(path)`."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        """Connect, switch to WAL, apply pending migrations."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        await writer.execute_fetchall("PRAGMA journal_mode=WAL")  # fetched: the statement ends
        store = cls(writer, await _connect(path))
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """`BEGIN IMMEDIATE` ... `COMMIT` on the write connection, under the write lock."""
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """The write connection for one autocommit statement, under the write lock."""
        async with self._write_lock:
            yield self._writer

    async def _migrate(self) -> None:
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {
            row[0]
            for row in await self._writer.execute_fetchall("SELECT name FROM schema_migrations")
        }
        folder = resources.files("router") / "migrations"
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".sql") or entry.name in done:
                continue
            async with self.transaction() as db:
                for statement in _split_sql(entry.read_text(encoding="utf-8")):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (entry.name, time.time()),
                )

    # --- Resellers ----------------------------------------------------------------------------

    async def create_reseller(self, name: str, key_hash: str, balance: int = 0) -> Reseller:
        now = time.time()
        try:
            async with self.transaction() as db:
                cursor = await db.execute(
                    "INSERT INTO resellers (name, key_hash, created_at) VALUES (?, ?, ?)",
                    (name, key_hash, now),
                )
                reseller_id = cursor.lastrowid
                assert reseller_id is not None
                if balance:
                    await db.execute(
                        "INSERT INTO ledger (reseller_id, kind, amount, note, created_at) "
                        "VALUES (?, 'topup', ?, 'initial balance', ?)",
                        (reseller_id, balance, now),
                    )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot create reseller {name!r}: {_reason(exc)}") from exc
        return Reseller(reseller_id, name, True, balance)

    async def reseller_by_key_hash(self, key_hash: str) -> Reseller | None:
        """The enabled reseller holding this key hash, or None."""
        rows = await self._reader.execute_fetchall(
            "SELECT id, name, enabled, balance FROM resellers WHERE key_hash = ? AND enabled = 1",
            (key_hash,),
        )
        return Reseller(*rows[0]) if rows else None  # type: ignore[index]

    async def reseller_by_name(self, name: str) -> Reseller | None:
        rows = await self._reader.execute_fetchall(
            "SELECT id, name, enabled, balance FROM resellers WHERE name = ?", (name,)
        )
        return Reseller(*rows[0]) if rows else None  # type: ignore[index]

    async def list_resellers(self) -> list[ResellerSummary]:
        rows = await self._reader.execute_fetchall(
            "SELECT r.id, r.name, r.enabled, r.balance, "
            "(SELECT count(*) FROM orders o WHERE o.reseller_id = r.id AND o.state <> 'failed'), "
            "(SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.reseller_id = r.id) "
            "FROM resellers r ORDER BY r.name"
        )
        return [ResellerSummary(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]

    async def adjust_balance(self, name: str, amount: int, *, kind: str, note: str) -> Reseller:
        """Add a ledger row of `kind` ('topup' or 'adjustment') for `amount` minor units."""
        reseller = await self.reseller_by_name(name)
        if reseller is None:
            raise StoreError(f"no reseller named {name!r}")
        try:
            async with self._write() as db:
                await db.execute(
                    "INSERT INTO ledger (reseller_id, kind, amount, note, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (reseller.id, kind, amount, note, time.time()),
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
        async with self._write() as db:
            cursor = await db.execute(
                f"UPDATE resellers SET {assignment} WHERE name = ?", (value, name)
            )
        if cursor.rowcount != 1:
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

    # --- Orders -------------------------------------------------------------------------------

    async def reserve_order(self, order: NewOrder) -> int | None:
        """Create the order in state `placing` and debit its charge, in ONE statement.

        None when the reseller's balance does not cover the charge (or it was disabled).
        """
        now = time.time()
        try:
            async with self._write() as db:
                cursor = await db.execute(
                    "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                    "params, provider, upstream_service, created_at, updated_at) "
                    "SELECT id, ?, 'placing', ?, ?, ?, ?, ?, ?, ?, ? FROM resellers "
                    "WHERE id = ? AND enabled = 1 AND balance >= ? RETURNING id",
                    (
                        order.service,
                        order.link,
                        order.quantity,
                        order.charge,
                        json.dumps(dict(order.params), separators=(",", ":")),
                        order.provider,
                        order.upstream_service,
                        now,
                        now,
                        order.reseller_id,
                        order.charge,
                    ),
                )
                row = await cursor.fetchone()
                await cursor.close()
        except sqlite3.IntegrityError:
            return None  # the balance CHECK: a backstop, the WHERE clause already decides
        return int(row[0]) if row else None

    async def note_route(self, order_id: int, provider: str, upstream_service: int) -> None:
        """Record the route about to be tried, before the call (a crash then leaves a trace)."""
        async with self._write() as db:
            await db.execute(
                "UPDATE orders SET provider = ?, upstream_service = ?, updated_at = ? "
                "WHERE id = ? AND state = 'placing'",
                (provider, upstream_service, time.time(), order_id),
            )

    async def settle_order(
        self,
        order_id: int,
        *,
        state: str,
        attempts: Sequence[Attempt],
        provider: str | None = None,
        upstream_service: int | None = None,
        upstream_order: int | None = None,
    ) -> None:
        """Finish placement: record the attempts and the order's new state.

        `placed` stores the upstream order; `held` keeps the funds reserved; `failed` refunds
        the charge in the same transaction.
        """
        assert state in ("placed", "held", "failed")
        now = time.time()
        async with self.transaction() as db:
            await self._insert_attempts(db, order_id, attempts)
            await db.execute(
                "UPDATE orders SET state = ?, provider = coalesce(?, provider), "
                "upstream_service = coalesce(?, upstream_service), upstream_order = ?, "
                "updated_at = ? WHERE id = ? AND state = 'placing'",
                (state, provider, upstream_service, upstream_order, now, order_id),
            )
            if state == "failed":
                await db.execute(
                    "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
                    "SELECT reseller_id, id, 'refund', charge, 'no upstream took the order', ? "
                    "FROM orders WHERE id = ? AND charge > 0",
                    (now, order_id),
                )

    @staticmethod
    async def _insert_attempts(
        db: aiosqlite.Connection, order_id: int, attempts: Iterable[Attempt]
    ) -> None:
        await db.executemany(
            "INSERT INTO attempts (order_id, rank, provider, upstream_service, started_at, "
            "latency, outcome, error, upstream_order) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    order_id,
                    a.rank,
                    a.provider,
                    a.upstream_service,
                    a.started_at,
                    a.latency,
                    a.outcome,
                    a.error,
                    a.upstream_order,
                )
                for a in attempts
            ],
        )

    async def hold_interrupted_orders(self) -> int:
        """Orders left `placing` by a process that died mid-call become `held` (at start-up)."""
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE orders SET state = 'held', updated_at = ? WHERE state = 'placing'",
                (time.time(),),
            )
        return cursor.rowcount

    async def order(self, order_id: int) -> Order | None:
        rows = await self._reader.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = ?", (order_id,)
        )
        return _order(rows[0]) if rows else None  # type: ignore[index]

    async def orders_of(self, reseller_id: int, order_ids: Sequence[int]) -> dict[int, Order]:
        """The reseller's orders among `order_ids` that it was told about (not `failed`)."""
        if not order_ids:
            return {}
        rows = await self._reader.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE reseller_id = ? AND state <> 'failed' "
            f"AND id IN ({_placeholders(len(order_ids))})",
            (reseller_id, *order_ids),
        )
        return {order.id: order for order in map(_order, rows)}

    async def attempts(self, order_id: int) -> list[Attempt]:
        rows = await self._reader.execute_fetchall(
            "SELECT rank, provider, upstream_service, started_at, latency, outcome, error, "
            "upstream_order FROM attempts WHERE order_id = ? ORDER BY id",
            (order_id,),
        )
        return [Attempt(*row) for row in rows]

    async def count_held(self) -> int:
        rows = await self._reader.execute_fetchall(
            "SELECT count(*) FROM orders WHERE state = 'held'"
        )
        return int(rows[0][0])  # type: ignore[index]

    async def count_orders(self, reseller_id: int | None = None) -> dict[str, int]:
        """Orders by state, for one reseller or all."""
        where, args = ("WHERE reseller_id = ?", (reseller_id,)) if reseller_id else ("", ())
        rows = await self._reader.execute_fetchall(
            f"SELECT state, count(*) FROM orders {where} GROUP BY state", args
        )
        return {row[0]: row[1] for row in rows}

    # --- Refills ------------------------------------------------------------------------------

    async def create_refill(self, order: Order, upstream_refill: int) -> int:
        assert order.provider is not None
        now = time.time()
        async with self._write() as db:
            cursor = await db.execute(
                "INSERT INTO refills (order_id, reseller_id, provider, upstream_refill, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (order.id, order.reseller_id, order.provider, upstream_refill, now, now),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def refills_of(self, reseller_id: int, refill_ids: Sequence[int]) -> dict[int, Refill]:
        if not refill_ids:
            return {}
        rows = await self._reader.execute_fetchall(
            "SELECT id, order_id, reseller_id, provider, upstream_refill, status FROM refills "
            f"WHERE reseller_id = ? AND id IN ({_placeholders(len(refill_ids))})",
            (reseller_id, *refill_ids),
        )
        return {row[0]: Refill(*row) for row in rows}

    async def set_refill_statuses(self, statuses: Mapping[int, str]) -> None:
        if not statuses:
            return
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE refills SET status = ?, updated_at = ? WHERE id = ?",
                [(status, now, refill_id) for refill_id, status in statuses.items()],
            )

    # --- Upstream call records ----------------------------------------------------------------

    async def record_calls(self, calls: Sequence[CallRecord]) -> None:
        """Write a batch of call records in one transaction."""
        if not calls:
            return
        async with self.transaction() as db:
            await db.executemany(
                "INSERT INTO upstream_calls (provider, action, started_at, latency, outcome) "
                "VALUES (?, ?, ?, ?, ?)",
                [(c.provider, c.action, c.started_at, c.latency, str(c.outcome)) for c in calls],
            )

    async def prune_calls(self, older_than: float) -> int:
        async with self._write() as db:
            cursor = await db.execute(
                "DELETE FROM upstream_calls WHERE started_at < ?", (older_than,)
            )
        return cursor.rowcount

    async def count_calls(self, provider: str | None = None, action: str | None = None) -> int:
        rows = await self._reader.execute_fetchall(
            "SELECT count(*) FROM upstream_calls WHERE (?1 IS NULL OR provider = ?1) "
            "AND (?2 IS NULL OR action = ?2)",
            (provider, action),
        )
        return int(rows[0][0])  # type: ignore[index]


async def _connect(path: Path | str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(str(path), isolation_level=None)
    await db.execute_fetchall(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    await db.execute_fetchall("PRAGMA foreign_keys=ON")
    await db.execute_fetchall(
        "PRAGMA synchronous=FULL"
    )  # a committed ledger row survives power loss
    return db


def _split_sql(script: str) -> list[str]:
    """A migration's statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].strip()
        if not stripped and not current:
            continue
        current.append(line)
        candidate = "\n".join(current)
        if stripped.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate.strip())
            current = []
    if "\n".join(current).strip():
        raise ValueError("migration ends inside a statement")
    return statements


def _reason(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "balance" in text:
        return "the balance would go below zero"
    if "UNIQUE" in text:
        return "that name or key is taken"
    return text
