"""Every SQL statement of the router: resellers, ledger, orders, attempts, refills, call records.

Usage::

    store = await Store.open(config.database)
    order_id = await store.reserve_order(new_order)   # None: not enough funds
    await store.close()

Three connections. Transactions of several statements run on one, behind one lock (aiosqlite
serialises statements, not transactions: two coroutines sharing a connection would share a
transaction). Writes of ONE statement (the hot path: reserving an order, settling it) go to a
second connection without any lock: aiosqlite queues them to its thread, which runs them back
to back without waiting for the event loop in between; SQLite itself serialises them with the
transactions (a DML statement takes the write lock before it reads, and busy_timeout waits for
it). A third connection reads (WAL lets it). Money
is integer minor units (router.v2.MINOR_PER_UNIT). The invariants that matter (balance never
below zero, balance = sum of the ledger, one refund per order) are enforced by the schema
itself, so neither a race nor the CLI can break them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import quote

import aiosqlite
import structlog

from router import v2
from router.upstream import CallRecord

T = TypeVar("T")
SqlTrace = Callable[[str], object]  # called with each statement run, values filled in

log = structlog.get_logger("router.store")

CALL_RETENTION_SECONDS: Final = 30 * 24 * 3600.0
_BALANCE_CHECK: Final = "CHECK constraint failed: balance"  # resellers.balance >= 0 (0001)
BUSY_TIMEOUT_MS: Final = 10_000  # a statement's wait for the write lock (Store.open's default)


@dataclass(frozen=True, slots=True)
class WriteRetry:
    """How a write that must land (an order's settle: the upstream may hold the order) is
    retried on an error that may pass (the database locked past the busy timeout, an I/O error,
    a full disk): after `first` seconds, doubling up to `longest`, until `give_up_after` seconds
    have passed. Each try also waits up to the busy timeout for the lock."""

    first: float = 0.05
    longest: float = 5.0
    give_up_after: float = 3600.0


SETTLE_RETRY: Final = WriteRetry()  # Store.open's default
WAL_RETRY_SECONDS: Final = 0.01


class StoreError(Exception):
    """A domain rule the database refused (unknown reseller, balance below zero, ...)."""


class DuplicateRequest(StoreError):
    """The reseller already made an order with this request ID: `first` is that order."""

    def __init__(self, first: Order) -> None:
        super().__init__(f"request ID already used by order {first.id}")
        self.first = first


class UpstreamOrderTaken(StoreError):
    """An upstream order that another local order already holds: nothing was stored.

    The database has one local order per (provider, upstream order): a second one would be a
    second charge for one delivery (or an upstream that reuses its IDs).
    """

    def __init__(self, provider: str, upstream_order: int, holder: int | None) -> None:
        held_by = f"order {holder}" if holder is not None else "another order"
        super().__init__(
            f"upstream order {upstream_order} at {provider} already belongs to {held_by}"
        )
        self.provider = provider
        self.upstream_order = upstream_order
        self.holder = holder


class NotStored(StoreError):
    """A write that must land could not be stored within its WriteRetry."""


class DatabaseUnavailable(StoreError):
    """The database file cannot be opened or created: `reason` says why, `fix` what to do
    about it on this machine (the command line adds which setting points here)."""

    def __init__(self, path: Path, cause: OSError | sqlite3.Error) -> None:
        self.path = path = path.absolute()  # once, on the way out: a blocking call is fine
        self.cause = cause
        folder = path.parent
        blocking = next((p for p in (*reversed(folder.parents), folder) if p.is_file()), None)
        self.fix: str | None = f"make {folder} a folder this user can write"
        if blocking is not None:
            self.reason = f"{blocking} is a file, not a folder"
            self.fix = None  # that file is someone's: only another path helps
        elif isinstance(cause, OSError):
            why = (cause.strerror or str(cause)).lower()
            self.reason = f"cannot create {cause.filename or folder}: {why}"
        elif path.is_dir():
            self.reason = f"{path} is a folder, not a file"
            self.fix = None  # only another path helps
        elif isinstance(cause, sqlite3.DatabaseError) and "not a database" in str(cause):
            self.reason = f"{path} is not an SQLite database"
            self.fix = f"move {path} away"
        elif not os.access(folder, os.W_OK):
            self.reason = f"{folder} is not writable by this user"
        elif path.exists() and not os.access(path, os.W_OK):
            self.reason = f"{path} is not writable by this user"
            self.fix = f"make {path} writable by this user"
        else:
            self.reason = str(cause)
        super().__init__(f"cannot open the database {path}: {self.reason}")


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
    request_id: str | None = None  # the reseller's own ID for this `add` (v2.check_request_id)
    config_version: str | None = None  # Config.version of the config that planned it


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
    params_json: str  # the type-specific parameters sent upstream, as stored
    provider: str | None
    upstream_service: int | None
    upstream_order: int | None
    start_count: int | None
    remains: int | None
    created_at: float
    refunded: int = 0  # minor units given back by the ledger (the status sync's refunds, ...)
    request_id: str | None = None  # the reseller's own ID for the `add` that made it
    config_version: str | None = None  # the config that planned it; None: before 0009

    @property
    def params(self) -> Mapping[str, str]:
        """Decoded when asked: `status` reads up to 100 orders and never needs them."""
        params: dict[str, str] = json.loads(self.params_json)
        return params


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
    cost: int | None = None  # the order's upstream cost on this route as planned; None: unknown


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


@dataclass(frozen=True, slots=True)
class HeldOrder:
    """A held order as the operator lists it (`smm-router orders held`)."""

    id: int
    reseller_id: int
    reseller: str
    service: int
    provider: str | None  # the route it was held on
    upstream_service: int | None
    charge: int
    created_at: float
    held_at: float
    error: str | None  # the held-on route's last answer; None when the process died mid-call


@dataclass(frozen=True, slots=True)
class HeldAges:
    """Held orders by age, for /metrics (Store.held_ages)."""

    count: int
    at_least: tuple[int, ...]  # how many are at least each of the asked ages old
    oldest_created_at: float | None  # unix time of the oldest one's `add`; None: none held


@dataclass(frozen=True, slots=True)
class OrderEvent:
    at: float
    kind: str
    status: str | None
    detail: str | None


# Status sync: what the status loop reads and writes (the Store's "Status sync" section).

_ACTIVE_ORDER: Final = "state = 'placed' AND status NOT IN ('Completed', 'Partial', 'Canceled')"
_OPEN_REFILL: Final = "status NOT IN ('Completed', 'Rejected')"


@dataclass(frozen=True, slots=True)
class ActiveOrder:
    """An order the status loop refreshes, as it was read before the upstream was asked."""

    id: int
    upstream_order: int
    quantity: int  # the charged quantity
    charge: int
    status: str
    created_at: float
    next_check_at: float
    sync_problem: str | None
    service: int  # local service ID
    cost: int | None = None  # recorded by an earlier answer; None: not yet
    estimated_cost: int | None = None  # as planned (counted in the day's spend until `cost`)


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """What one status answer says about one order, for `Store.record_statuses`."""

    order_id: int
    seen_status: str  # the status read before asking: the change applies only from it
    status: str | None  # the new v2 status; None when the answer could not be read
    next_check_at: float
    start_count: int | None = None
    remains: int | None = None
    cost: int | None = None  # minor units of the config's currency
    upstream_charge: str | None = None
    upstream_currency: str | None = None
    refund: int = 0  # minor units, paid when (and only when) this record ends the order
    detail: str | None = None  # JSON for the 'status' event
    problem: str | None = None  # what could not be read, for an 'unknown_status' event...
    seen_problem: str | None = None  # ...unless it is the one recorded last time


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status change `record_statuses` made, and the refund it paid (0: none)."""

    order_id: int
    status: str
    refunded: int
    refund_refused: bool = False  # a refund was due but the ledger already had one


@dataclass(frozen=True, slots=True)
class OpenRefill:
    id: int
    upstream_refill: int
    status: str


@dataclass(frozen=True, slots=True)
class OpenWork:
    """What may still need a provider's client (a provider removed by a config reload is
    synced until none is left: router.sync.orders)."""

    orders: int  # its orders not ended: placed and still active, being placed, or held
    refills: int  # its refills whose outcome is still open
    placing: int  # orders of any provider being placed since before the time asked: the
    # plans they started with may still go on to it

    @property
    def idle(self) -> bool:
        return not (self.orders or self.refills or self.placing)


@dataclass(frozen=True, slots=True)
class OrderSyncState:
    """The status loop's bookkeeping of one order."""

    checked_at: float | None
    next_check_at: float
    cost: int | None
    upstream_charge: str | None
    upstream_currency: str | None
    refunded: int
    sync_problem: str | None


_ORDER_COLUMNS: Final = (
    "id, reseller_id, service, state, status, link, quantity, charge, params, provider, "
    "upstream_service, upstream_order, start_count, remains, created_at, refunded, request_id, "
    "config_version"
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
        params_json=row[8],
        provider=row[9],
        upstream_service=row[10],
        upstream_order=row[11],
        start_count=row[12],
        remains=row[13],
        created_at=row[14],
        refunded=row[15],
        request_id=row[16],
        config_version=row[17],
    )


_INCARNATION: Final = secrets.token_hex(4)  # tells this process from an earlier one with its PID


def process_owner() -> str:
    """This process, as the `placing_by` of the orders it places: "host:pid:incarnation"."""
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that wrote `placing_by` may still be placing the order.

    Known only on this host: another host's process counts as alive (the staleness bound in
    `hold_interrupted_orders` settles it); an order from before owners were recorded does not.
    A restarted container often gets its old PID (and host name) back: the incarnation tells.
    """
    host, pid_text, incarnation = [*(owner or "").split(":"), "", "", ""][:3]
    if not owner or not pid_text.isdecimal():
        return False
    if host != socket.gethostname():
        return True
    if int(pid_text) == os.getpid():
        return incarnation == _INCARNATION
    try:
        os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


async def _to_the_end(call: Awaitable[T]) -> T:
    """Await a database call to its end even if cancelled meanwhile, then let the cancel go on.

    The call runs in aiosqlite's thread whatever happens to the awaiting task: the connection's
    transaction state is only known once it has ended.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _attempts_json(attempts: Iterable[Attempt]) -> str:
    """Attempts as the settling UPDATE carries them (see migration 0004)."""
    return json.dumps(
        [
            {
                "rank": a.rank,
                "provider": a.provider,
                "upstream_service": a.upstream_service,
                "started_at": a.started_at,
                "latency": a.latency,
                "outcome": a.outcome,
                "error": a.error,
                "upstream_order": a.upstream_order,
                "cost": a.cost,
            }
            for a in attempts
        ],
        separators=(",", ":"),
    )


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class Store:
    """The router's SQLite database. Open with `await Store.open(path)`."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        statements: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        *,
        settle_retry: WriteRetry | None = None,
    ) -> None:
        self._writer = writer  # transactions, under _write_lock
        self._statements = statements  # single autocommit statements, no lock
        self._reader = reader
        self._write_lock = asyncio.Lock()
        self._settle_retry = settle_retry or SETTLE_RETRY
        self.owner = process_owner()  # written on the orders this process is placing

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        busy_timeout_ms: int | None = None,
        settle_retry: WriteRetry | None = None,
        read_only: bool = False,
        trace: SqlTrace | None = None,
    ) -> Store:
        """Connect, switch to WAL, apply pending migrations; DatabaseUnavailable if it cannot.

        `busy_timeout_ms` (default BUSY_TIMEOUT_MS) and `settle_retry` (default SETTLE_RETRY)
        are read when the store opens: tests that lock the database shorten them.
        `read_only`: one read-only connection, no migration; an existing database is read as
        it is and never changed (`smm-router check`). `trace` sees every statement the store's
        connections run, with its values, from the first one on (tests EXPLAIN them).
        """
        busy = BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
        if read_only:
            try:
                reader = await _connect(path, busy, read_only=True, trace=trace)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot read the database {path}: {exc}") from exc
            try:
                await reader.execute_fetchall("SELECT count(*) FROM sqlite_master")
            except sqlite3.DatabaseError as exc:
                await reader.close()
                raise StoreError(f"cannot read the database {path}: {exc}") from exc
            return cls(reader, reader, reader)
        opened: list[aiosqlite.Connection] = []
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            opened.append(writer := await _connect(path, busy, trace=trace))
            await _use_wal(writer, busy)
            opened.append(statements := await _connect(path, busy, trace=trace))
            opened.append(reader := await _connect(path, busy, trace=trace))
            store = cls(writer, statements, reader, settle_retry=settle_retry or SETTLE_RETRY)
            await store._migrate()
        except BaseException as exc:
            for db in opened:  # each runs a thread that would keep the process from exiting
                with suppress(sqlite3.Error):
                    await db.close()
            if isinstance(exc, OSError | sqlite3.Error):
                raise DatabaseUnavailable(Path(path), exc) from exc
            raise
        return store

    async def close(self) -> None:
        for db in dict.fromkeys((self._reader, self._statements, self._writer)):
            await db.close()  # each connection once: a read-only store has one in three roles

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """`BEGIN IMMEDIATE` ... `COMMIT` on the write connection, under the write lock."""
        db = self._writer
        async with self._write_lock:
            try:
                await _to_the_end(db.execute("BEGIN IMMEDIATE"))
                yield db
                await _to_the_end(db.execute("COMMIT"))
            except BaseException:
                # Also when cancelled (a loop stopping, Ctrl-C): the lock must never be let go
                # with a transaction open, or every later transaction fails.
                if db.in_transaction:
                    await _to_the_end(db.execute("ROLLBACK"))
                raise

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for ONE autocommit statement: atomic on its own, so no lock.

        Never run two statements through it that must be atomic together: use transaction().
        """
        yield self._statements

    async def _migrate(self) -> None:
        """Apply the migrations not recorded yet, all in one transaction with their records.

        The applied set is read again under the write lock (BEGIN IMMEDIATE): two processes
        starting at once (a server and a CLI) never apply one twice, the second finds them
        applied. A start-up with nothing to apply takes no write lock.
        """
        migrations = _migrations()
        if migrations.keys() <= await self._applied_migrations(self._writer):
            return
        async with self.transaction() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            applied = await self._applied_migrations(db)
            for name, script in migrations.items():
                if name in applied:
                    continue
                for statement in _split_sql(script):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, time.time()),
                )

    @staticmethod
    async def _applied_migrations(db: aiosqlite.Connection) -> set[str]:
        """The migrations recorded in the database (none in a new one)."""
        if not await db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ):
            return set()
        return {row[0] for row in await db.execute_fetchall("SELECT name FROM schema_migrations")}

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

        None when the reseller's balance does not cover the charge (or it was disabled). Raise
        DuplicateRequest when the reseller already made an order with `order.request_id` (the
        UNIQUE index decides, also between two that arrive at once), StoreError when the
        database refuses the order for any other reason (a bug, not the reseller's funds).
        """
        now = time.time()
        try:
            async with self._write() as db:  # one statement: one hop to the database thread
                rows = await db.execute_fetchall(
                    "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                    "params, provider, upstream_service, created_at, updated_at, placing_by, "
                    "request_id, config_version) "
                    "SELECT id, ?, 'placing', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM resellers "
                    "WHERE id = ? AND enabled = 1 AND balance >= ? "
                    "ON CONFLICT (reseller_id, request_id) WHERE request_id IS NOT NULL "
                    "DO NOTHING RETURNING id",
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
                        self.owner,
                        order.request_id,
                        order.config_version,
                        order.reseller_id,
                        order.charge,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            if _BALANCE_CHECK in str(exc):
                return None  # a backstop: the WHERE clause already decides
            raise StoreError(f"order refused by the database: {exc}") from exc
        if rows:
            return int(next(iter(rows))[0])
        if order.request_id is not None:  # skipped as a repeat, or short of funds
            first = await self.order_by_request_id(order.reseller_id, order.request_id)
            if first is not None:
                raise DuplicateRequest(first)
        return None

    async def order_by_request_id(self, reseller_id: int, request_id: str) -> Order | None:
        """The reseller's order made with `request_id`, whatever its state."""
        rows = await self._reader.execute_fetchall(
            f"SELECT {_ORDER_COLUMNS} FROM orders INDEXED BY orders_by_request_id "
            "WHERE reseller_id = ? AND request_id = ?",
            (reseller_id, request_id),
        )
        return _order(rows[0]) if rows else None  # type: ignore[index]

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
        estimated_cost: int | None = None,
        event: str | None = None,
    ) -> None:
        """Finish placement: record the attempts and the order's new state.

        `placed` stores the upstream order (and `estimated_cost`, what its route was planned
        to cost); `held` keeps the funds reserved; `failed` refunds
        the charge in the same transaction; `canceled` (a held order the operator re-routed and
        no route took) refunds it too, and its reseller sees Canceled. `event` (an operator's
        re-route) becomes a 'resolve' row of the order's history, in the same transaction.

        The upstream may hold the order by now, so the write is retried until it is stored (see
        WriteRetry); NotStored when it never was. UpstreamOrderTaken when `placed` would give
        the upstream order a second local order: then nothing is stored.
        """
        assert state in ("placed", "held", "failed", "canceled")
        # One statement records the attempts whatever the order's state (an attempt may have
        # created an upstream order: it must never be lost) and moves the order only if this
        # process is still placing it. A restart (or the sweep, while this write was retried)
        # may have held it meanwhile: the operator resolves it, except that an upstream order
        # found for it is stored if nobody resolved it since (it is still held, and still
        # ours: a re-route would have taken it over).
        # The triggers of migration 0004 write the attempt rows and a failed order's refund.
        moves = "placing_by IS ?8 AND (state = 'placing' OR (state = 'held' AND ?2 = 'placed'))"
        statement = (
            "UPDATE orders SET settling_attempts = ?1, "
            f"state = CASE WHEN {moves} THEN ?2 ELSE state END, "
            f"provider = CASE WHEN {moves} THEN coalesce(?3, provider) ELSE provider END, "
            f"upstream_service = CASE WHEN {moves} "
            "THEN coalesce(?4, upstream_service) ELSE upstream_service END, "
            f"upstream_order = CASE WHEN {moves} THEN ?5 ELSE upstream_order END, "
            f"estimated_cost = CASE WHEN {moves} THEN ?9 ELSE estimated_cost END, "
            "updated_at = ?6 WHERE id = ?7 RETURNING state"
        )
        attempts_json = _attempts_json(attempts)

        async def write() -> None:
            now = time.time()
            args = (
                attempts_json,
                state,
                provider,
                upstream_service,
                upstream_order,
                now,
                order_id,
                self.owner,
                estimated_cost,
            )
            if state != "canceled" and event is None:
                async with self._write() as db:  # the hot path of `add`: one hop
                    await db.execute_fetchall(statement, args)
                return
            async with self.transaction() as db:
                rows = await db.execute_fetchall(statement, args)
                # Moved iff it was ours: no other writer can end in `state` from elsewhere here.
                settled = [row[0] for row in rows] == [state]
                if state == "canceled" and settled:
                    await self._refund_canceled(
                        db, order_id, now, "no route took the re-routed order"
                    )
                if event is not None and settled:
                    await self._insert_resolve_event(db, order_id, now, event)

        try:
            await self._until_stored(write, f"settle order {order_id} as {state}")
        except sqlite3.IntegrityError as exc:
            if provider is None or upstream_order is None or not _upstream_taken(exc):
                raise
            holder = await self.upstream_order_taken(provider, upstream_order)
            raise UpstreamOrderTaken(provider, upstream_order, holder) from exc

    async def _until_stored(self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """`write()`, tried again on errors that may pass until it lands or `_settle_retry`
        gives up (NotStored). A constraint (IntegrityError) or a misuse of the connection
        (ProgrammingError) is raised at once: trying again changes nothing."""
        policy = self._settle_retry
        deadline = time.monotonic() + policy.give_up_after
        delay = policy.first
        tries = 0
        while True:
            tries += 1
            try:
                return await write()
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
                raise
            except sqlite3.DatabaseError as exc:  # locked past the busy timeout, I/O, disk full
                if time.monotonic() + delay > deadline:
                    raise NotStored(f"{what}: not stored after {tries} tries: {exc}") from exc
                with contextlib.suppress(Exception):  # a broken log sink must not stop it
                    log.warning(
                        "write_retried", what=what, tries=tries, error=str(exc), retry_in=delay
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.longest)

    async def hold_interrupted_orders(self, *, stale_before: float) -> int:
        """Orders whose placement was interrupted become `held`; how many.

        Interrupted: the process placing it is gone (killed mid-call), or it has been placing
        since before `stale_before` (unix time; longer than any upstream call may take: its
        process is hung, or on another host). A process still running on this database (an
        older router during a rolling restart, the CLI re-routing) finishes its own orders.
        """
        rows = await self._reader.execute_fetchall(
            "SELECT id, placing_by FROM orders INDEXED BY orders_placing WHERE state = 'placing'"
        )
        now = time.time()
        orphaned = [(now, row[0]) for row in rows if not owner_alive(row[1])]
        async with self.transaction() as db:
            cursor = await db.executemany(
                "UPDATE orders SET state = 'held', updated_at = ? "
                "WHERE id = ? AND state = 'placing'",
                orphaned,
            )
            held = max(cursor.rowcount, 0)
            cursor = await db.execute(
                "UPDATE orders INDEXED BY orders_placing SET state = 'held', updated_at = ? "
                "WHERE state = 'placing' AND updated_at < ?",
                (now, stale_before),
            )
            held += cursor.rowcount
        return held

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
            "upstream_order, cost FROM attempts WHERE order_id = ? ORDER BY id",
            (order_id,),
        )
        return [Attempt(*row) for row in rows]

    async def count_held(self) -> int:
        """Held orders, from the counter that migration 0008's triggers keep: one row read
        whatever the size of the orders table (/healthz and every /metrics scrape ask)."""
        rows = await self._reader.execute_fetchall(
            "SELECT value FROM counters WHERE name = 'orders_held'"
        )
        return int(rows[0][0])  # type: ignore[index]

    async def held_ages(self, ages: Sequence[float], *, now: float) -> HeldAges:
        """Held orders by age at `now` (unix time): how many are at least each of `ages`
        (seconds) old, and when the oldest came in. The age of a held order runs from its
        reseller's `add` (created_at), as `smm-router orders held` shows it: the reseller has
        seen Pending, and its funds have been reserved, since then.

        One statement through orders_held: held orders are few, each is read once.
        """
        older = "".join(", coalesce(sum(created_at <= ?), 0)" for _ in ages)
        rows = await self._reader.execute_fetchall(
            f"SELECT count(*), min(created_at){older} FROM orders INDEXED BY orders_held "
            "WHERE state = 'held'",
            [now - age for age in ages],
        )
        count, oldest, *at_least = rows[0]  # type: ignore[index]
        return HeldAges(count, tuple(at_least), oldest)

    async def orphaned_orders(self, providers: Iterable[str]) -> dict[str, int] | None:
        """Open orders (placing, held, or placed and not final) per provider NOT in
        `providers`: a provider removed from the config leaves them unsynced.

        By index only: one step through orders_due per provider with active orders, a count
        of the removed ones' orders, and the few held and placing orders. None when the
        database predates those indexes (a server start migrates it).
        """
        known = sorted(set(providers))
        rows = await self._reader.execute_fetchall(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' "
            "AND name IN ('orders_due', 'orders_held', 'orders_placing')"
        )
        if int(rows[0][0]) != 3:  # type: ignore[index]
            return None
        # A skip-scan: each step finds the next provider in orders_due, not each of its orders.
        active = await self._reader.execute_fetchall(
            "WITH RECURSIVE seen(name) AS ("
            f"SELECT min(provider) FROM orders INDEXED BY orders_due WHERE {_ACTIVE_ORDER} "
            "UNION ALL SELECT (SELECT min(provider) FROM orders INDEXED BY orders_due "
            f"WHERE provider > seen.name AND {_ACTIVE_ORDER}) FROM seen WHERE name IS NOT NULL) "
            "SELECT name, (SELECT count(*) FROM orders INDEXED BY orders_due "
            f"WHERE provider = seen.name AND {_ACTIVE_ORDER}) FROM seen "
            f"WHERE name IS NOT NULL AND name NOT IN ({_placeholders(len(known))})",
            known,
        )
        unsettled = [
            *await self._reader.execute_fetchall(
                "SELECT provider, count(*) FROM orders INDEXED BY orders_held "
                "WHERE state = 'held' GROUP BY provider"
            ),
            *await self._reader.execute_fetchall(
                "SELECT provider, count(*) FROM orders INDEXED BY orders_placing "
                "WHERE state = 'placing' GROUP BY provider"
            ),
        ]
        orphaned: dict[str, int] = {}
        for provider, count in [*active, *unsettled]:
            if provider is not None and provider not in known:
                orphaned[provider] = orphaned.get(provider, 0) + count
        return dict(sorted(orphaned.items()))

    async def count_orders(self, reseller_id: int | None = None) -> dict[str, int]:
        """Orders by state, for one reseller or all."""
        where, args = ("WHERE reseller_id = ?", (reseller_id,)) if reseller_id else ("", ())
        rows = await self._reader.execute_fetchall(
            f"SELECT state, count(*) FROM orders {where} GROUP BY state", args
        )
        return {row[0]: row[1] for row in rows}

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
        try:
            async with self.transaction() as db:
                cursor = await db.execute(
                    "UPDATE orders SET state = 'placed', upstream_order = ?1, updated_at = ?2 "
                    "WHERE id = ?3 AND state = 'held'",
                    (upstream_order, now, order_id),
                )
                if cursor.rowcount != 1:
                    return False
                await self._insert_resolve_event(db, order_id, now, event)
        except sqlite3.IntegrityError as exc:
            if _upstream_taken(exc):
                return False
            raise
        return True

    async def upstream_order_taken(self, provider: str, upstream_order: int) -> int | None:
        """The local order that already holds this upstream order at `provider`, if any (the
        oldest, where an older database had several: migration 0006)."""
        rows = await self._reader.execute_fetchall(
            "SELECT id FROM orders WHERE provider = ? AND upstream_order = ? "
            "ORDER BY upstream_duplicate LIMIT 1",
            (provider, upstream_order),
        )
        return int(rows[0][0]) if rows else None  # type: ignore[index]

    async def refund_ended_order(self, order_id: int, amount: int, note: str, event: str) -> bool:
        """The operator's refund of `amount` for an order that has ended upstream and was not
        refunded yet (a package that ended Partial, a goodwill gesture): the order's one refund
        row, so no later refund can pay twice. False (nothing changed) otherwise."""
        now = time.time()
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
                "SELECT reseller_id, id, 'refund', ?1, ?2, ?3 FROM orders WHERE id = ?4 "
                "AND state = 'placed' AND status IN ('Completed', 'Partial', 'Canceled') "
                "AND refunded = 0 AND ?1 > 0 AND ?1 <= charge ON CONFLICT DO NOTHING",
                (amount, note, now, order_id),
            )
            if cursor.rowcount != 1:
                return False
            await self._insert_resolve_event(db, order_id, now, event)
        return True

    async def refund_held(self, order_id: int, event: str) -> bool:
        """Held -> canceled: status Canceled, nothing delivered, the charge refunded in full.

        False (nothing changed) when the order is not held.
        """
        now = time.time()
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE orders SET state = 'canceled', updated_at = ? "
                "WHERE id = ? AND state = 'held'",
                (now, order_id),
            )
            if cursor.rowcount != 1:
                return False
            await self._refund_canceled(db, order_id, now, "held order canceled by the operator")
            await self._insert_resolve_event(db, order_id, now, event)
        return True

    async def begin_reroute(
        self, order_id: int, provider: str, upstream_service: int, event: str
    ) -> bool:
        """Held -> placing on the first route to try; then `settle_order` ends it as an add.

        False (nothing changed) when the order is not held: only one re-route at a time.
        """
        now = time.time()
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE orders SET state = 'placing', provider = ?, upstream_service = ?, "
                "updated_at = ?, placing_by = ? WHERE id = ? AND state = 'held'",
                (provider, upstream_service, now, self.owner, order_id),
            )
            if cursor.rowcount != 1:
                return False
            await self._insert_resolve_event(db, order_id, now, event)
        return True

    async def hold_interrupted_reroute(self, order_id: int, event: str) -> None:
        """A re-route stopped mid-call (Ctrl-C, error): held again on the route being tried."""
        now = time.time()
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE orders SET state = 'held', updated_at = ? "
                "WHERE id = ? AND state = 'placing'",
                (now, order_id),
            )
            if cursor.rowcount == 1:
                await self._insert_resolve_event(db, order_id, now, event)

    @staticmethod
    async def _refund_canceled(
        db: aiosqlite.Connection, order_id: int, now: float, note: str
    ) -> None:
        """A canceled order shows Canceled with nothing delivered, and its charge comes back."""
        await db.execute(
            "UPDATE orders SET status = 'Canceled', remains = quantity WHERE id = ?", (order_id,)
        )
        await db.execute(
            "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
            "SELECT reseller_id, id, 'refund', charge, ?, ? FROM orders WHERE id = ? "
            "AND charge > 0",
            (note, now, order_id),
        )

    @staticmethod
    async def _insert_resolve_event(
        db: aiosqlite.Connection, order_id: int, now: float, detail: str
    ) -> None:
        """An operator action in the order's history, with the order's status after it."""
        await db.execute(
            "INSERT INTO order_events (order_id, at, kind, status, detail) "
            "SELECT id, ?, 'resolve', status, ? FROM orders WHERE id = ?",
            (now, detail, order_id),
        )

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
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "INSERT INTO refills (order_id, reseller_id, provider, upstream_refill, "
                "created_at, updated_at) VALUES "
                + ",".join(["(?, ?, ?, ?, ?, ?)"] * len(refills))
                + " RETURNING order_id, id",
                values,
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
        changes: list[StatusChange] = []
        async with self.transaction() as db:
            await db.executemany(
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
            await db.executemany(
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
            await db.executemany(
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
                change = await self._change_status(db, record, checked_at)
                if change is not None:
                    changes.append(change)
        return changes

    @staticmethod
    async def _change_status(
        db: aiosqlite.Connection, record: StatusRecord, now: float
    ) -> StatusChange | None:
        assert record.status is not None
        cursor = await db.execute(
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
        await db.execute(
            "INSERT INTO order_events (order_id, at, kind, status, detail) "
            "VALUES (?, ?, 'status', ?, ?)",
            (record.order_id, now, record.status, record.detail),
        )
        if record.refund <= 0:
            return StatusChange(record.order_id, record.status, 0)
        cursor = await db.execute(
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
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE refills SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                [(word, now, refill.id, refill.status) for refill, word in changes],
            )

    async def record_cancel_requests(self, outcomes: Mapping[int, str | None]) -> None:
        """Forwarded cancels in their orders' history: None when the upstream took it."""
        if not outcomes:
            return
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "INSERT INTO order_events (order_id, at, kind, status, detail) "
                "SELECT id, ?, 'cancel', status, ? FROM orders WHERE id = ?",
                [
                    (now, "requested" if error is None else f"refused: {error}", order_id)
                    for order_id, error in outcomes.items()
                ],
            )

    async def create_placed_orders(self, orders: Sequence[tuple[NewOrder, int]]) -> range:
        """Orders already placed upstream (NewOrder, upstream order ID), debited, in ONE
        transaction; their local IDs. For imports and tests that need thousands at once."""
        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
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
            rows = await db.execute_fetchall("SELECT max(id) FROM orders")
        last = int(rows[0][0] or 0)  # type: ignore[index]
        # Under the write lock, rowids of one transaction's inserts are consecutive.
        return range(last - len(orders) + 1, last + 1)

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

    # --- Providers: balances, catalogues, reports ----------------------------------------------

    async def record_balance(self, read: BalanceRead) -> None:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO provider_balances (provider, balance, currency, read_at) "
                "VALUES (?, ?, ?, ?)",
                (read.provider, read.balance, read.currency, read.read_at),
            )

    async def last_balances(self) -> dict[str, BalanceRead]:
        """Each provider's latest balance read."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, balance, currency, max(read_at) FROM provider_balances "
            "GROUP BY provider"
        )
        return {row[0]: BalanceRead(*row) for row in rows}

    async def balance_reads(self, provider: str, since: float) -> list[BalanceRead]:
        """A provider's balance reads from `since` on, preceded by the last one before it."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, balance, currency, read_at FROM provider_balances "
            "WHERE provider = ?1 AND read_at >= coalesce(("
            "  SELECT max(read_at) FROM provider_balances WHERE provider = ?1 AND read_at < ?2"
            "), ?2) ORDER BY read_at, id",
            (provider, since),
        )
        return [BalanceRead(*row) for row in rows]

    async def prune_balances(self, older_than: float) -> int:
        """Forget balance reads older than `older_than`, but never a provider's last one."""
        async with self._write() as db:
            cursor = await db.execute(
                "DELETE FROM provider_balances WHERE read_at < ? AND id NOT IN "
                "(SELECT max(id) FROM provider_balances GROUP BY provider)",
                (older_than,),
            )
        return cursor.rowcount

    async def no_funds_refusals(
        self, provider: str, *, before: float = math.inf, limit: int = 100
    ) -> list[Refusal]:
        """The provider's `Not enough funds` answers to `add` sent before `before` (unix
        time), the latest first, at most `limit`: the funds bench is replayed from them."""
        rows = await self._reader.execute_fetchall(
            "SELECT started_at, started_at + latency, cost FROM attempts "
            "INDEXED BY attempts_by_provider WHERE provider = ? AND outcome = 'no_funds' "
            "AND started_at < ? ORDER BY started_at DESC LIMIT ?",
            (provider, before, limit),
        )
        return [Refusal(*row) for row in rows]

    # --- Routing: breaker transitions, the day's spend, quality outcomes -----------------------

    async def record_breaker_event(self, provider: str, at: float, state: str) -> None:
        """A transition of the provider's breaker at `at` (unix time): 'open' or 'healthy'."""
        async with self._write() as db:
            await db.execute(
                "INSERT INTO breaker_events (provider, at, state) VALUES (?, ?, ?)",
                (provider, at, state),
            )

    async def last_breaker_events(self, providers: Iterable[str]) -> dict[str, BreakerEvent]:
        """Each provider's last breaker transition; none for a provider without any."""
        found: dict[str, BreakerEvent] = {}
        for provider in providers:
            rows = await self._reader.execute_fetchall(
                "SELECT provider, at, state FROM breaker_events WHERE provider = ? "
                "ORDER BY at DESC, id DESC LIMIT 1",
                (provider,),
            )
            if rows:
                found[provider] = BreakerEvent(*rows[0])  # type: ignore[index]
        return found

    async def prune_breaker_events(self, older_than: float) -> int:
        """Forget transitions older than `older_than`, but never a provider's last one."""
        async with self._write() as db:
            cursor = await db.execute(
                "DELETE FROM breaker_events WHERE at < ? AND id NOT IN "
                "(SELECT max(id) FROM breaker_events GROUP BY provider)",
                (older_than,),
            )
        return cursor.rowcount

    async def spend_since(self, providers: Iterable[str], since: float) -> dict[str, int]:
        """What each provider costs for the orders it holds created from `since` (unix time)
        on: the recorded cost, else the cost planned when it was placed (minor units of
        `currency`). An order with neither counts nothing until its status records a cost."""
        found: dict[str, int] = {}
        for provider in providers:
            rows = await self._reader.execute_fetchall(
                "SELECT coalesce(sum(coalesce(cost, estimated_cost)), 0) FROM orders "
                "INDEXED BY orders_by_provider WHERE provider = ? AND created_at >= ? "
                "AND state = 'placed'",
                (provider, since),
            )
            found[provider] = int(rows[0][0])  # type: ignore[index]
        return found

    async def final_outcomes(self, since: float) -> list[FinalOutcomes]:
        """The final statuses the status sync read from `since` (unix time) on, counted per
        (provider, upstream service), with the delivered share of the Partial ones.

        The share is (quantity - remains) / quantity within [0, 1]; a package's remains count
        units of a size we do not know (its quantity is 1), so a package ending Partial counts
        as nothing delivered.
        """
        rows = await self._reader.execute_fetchall(
            "SELECT provider, upstream_service, sum(status = 'Completed'), "
            "sum(status = 'Partial'), sum(status = 'Canceled'), "
            "coalesce(sum(CASE WHEN status = 'Partial' AND quantity > 0 THEN "
            "max(0.0, min(1.0, (quantity - coalesce(remains, quantity)) * 1.0 / quantity)) "
            "END), 0.0) FROM orders INDEXED BY orders_final "
            "WHERE state = 'placed' AND status IN ('Completed', 'Partial', 'Canceled') "
            "AND checked_at >= ? GROUP BY provider, upstream_service",
            (since,),
        )
        return [FinalOutcomes(*row) for row in rows]

    async def record_catalogue(
        self, provider: str, fetched_at: float, size: int, routes: Sequence[RouteListing]
    ) -> None:
        """Store a usable catalogue: its size, and what it says of each routed service.

        A service it does not list keeps its last known terms, marked not present.
        """
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO provider_catalogues (provider, fetched_at, services) VALUES (?, ?, ?) "
                "ON CONFLICT (provider) DO UPDATE SET fetched_at = excluded.fetched_at, "
                "services = excluded.services",
                (provider, fetched_at, size),
            )
            await db.executemany(
                "INSERT INTO route_catalogue (provider, service, present, name, type, rate, min, "
                "max, refill, cancel, dripfeed, seen_at, checked_at) "
                "VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (provider, service) DO UPDATE SET present = 1, name = excluded.name, "
                "type = excluded.type, rate = excluded.rate, min = excluded.min, "
                "max = excluded.max, refill = excluded.refill, cancel = excluded.cancel, "
                "dripfeed = excluded.dripfeed, seen_at = excluded.seen_at, "
                "checked_at = excluded.checked_at",
                [
                    (
                        provider,
                        r.service,
                        r.name,
                        r.type,
                        r.rate,
                        r.min,
                        r.max,
                        r.refill,
                        r.cancel,
                        r.dripfeed,
                        fetched_at,
                        fetched_at,
                    )
                    for r in routes
                    if r.present
                ],
            )
            await db.executemany(
                "INSERT INTO route_catalogue (provider, service, present, checked_at) "
                "VALUES (?, ?, 0, ?) ON CONFLICT (provider, service) DO UPDATE SET present = 0, "
                "checked_at = excluded.checked_at",
                [(provider, r.service, fetched_at) for r in routes if not r.present],
            )

    async def catalogue_fetches(self) -> dict[str, CatalogueFetch]:
        """When each provider's last usable catalogue came, and its size."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, fetched_at, services FROM provider_catalogues"
        )
        return {row[0]: CatalogueFetch(*row) for row in rows}

    async def route_catalogue(self) -> list[RouteListing]:
        """What the stored catalogues say of every routed upstream service seen so far."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, service, present, name, type, rate, min, max, refill, cancel, "
            "dripfeed, seen_at, checked_at FROM route_catalogue ORDER BY provider, service"
        )
        return [
            RouteListing(
                row[0],
                row[1],
                bool(row[2]),
                *row[3:8],
                *(None if flag is None else bool(flag) for flag in row[8:11]),
                *row[11:],
            )
            for row in rows
        ]

    async def provider_totals(self) -> dict[str, ProviderTotals]:
        """Each provider's money since the first order, from the totals that migration 0010's
        triggers keep as the ledger and the orders move (one row per provider ever used)."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, revenue, refunded, cost, cost_returned FROM provider_totals"
        )
        return {row[0]: ProviderTotals(*row) for row in rows}

    async def provider_margin(
        self, provider: str, to_base: Decimal, *, since: float = 0.0, until: float = math.inf
    ) -> ProviderMargin:
        """Orders placed at `provider` created in [since, until): revenue, cost and margin.

        `to_base` converts the provider's currency into the config's (`fx`; 1 for the same).
        An order without a recorded cost (no status yet) is costed at its upstream rate in the
        stored catalogue; one without either is counted in `uncosted` and costs nothing here.
        """
        rows = await self._reader.execute_fetchall(
            f"SELECT count(*), coalesce(sum(o.charge - o.refunded), 0), "
            f"coalesce(sum(o.cost), 0), "
            f"coalesce(sum(o.cost IS NULL AND c.rate IS NOT NULL), 0), "
            f"coalesce(sum(CASE WHEN o.cost IS NULL THEN {_RATE_TIMES_QUANTITY} END), 0), "
            f"coalesce(sum(o.cost IS NULL AND c.rate IS NULL), 0) "
            f"FROM orders o LEFT JOIN route_catalogue c "
            f"ON c.provider = o.provider AND c.service = o.upstream_service "
            f"WHERE o.provider = ? AND o.created_at >= ? AND o.created_at < ? "
            f"AND o.state = 'placed'",
            (*_FLAT_TYPES, provider, since, until),
        )
        orders, revenue, recorded, estimated, milli, uncosted = rows[0]  # type: ignore[index]
        return ProviderMargin(
            provider=provider,
            orders=orders,
            revenue=revenue,
            cost=recorded + _estimate(milli, to_base),
            estimated=estimated,
            uncosted=uncosted,
        )

    async def order_margin(self, order_id: int, to_base: Decimal) -> OrderMargin | None:
        """One order's revenue (charge minus refunds), cost and margin; None if unknown.

        `to_base` converts the currency of the provider holding the order into the config's.
        """
        rows = await self._reader.execute_fetchall(
            f"SELECT o.id, o.provider, o.charge, o.refunded, o.cost, "
            f"CASE WHEN c.rate IS NOT NULL THEN {_RATE_TIMES_QUANTITY} END "
            f"FROM orders o LEFT JOIN route_catalogue c "
            f"ON c.provider = o.provider AND c.service = o.upstream_service WHERE o.id = ?",
            (*_FLAT_TYPES, order_id),
        )
        if not rows:
            return None
        order, provider, charge, refunded, cost, milli = rows[0]  # type: ignore[index]
        estimated = cost is None and milli is not None
        return OrderMargin(
            order_id=order,
            provider=provider,
            charge=charge,
            refunded=refunded,
            cost=_estimate(milli, to_base) if estimated else cost,
            cost_estimated=estimated,
        )

    async def add_outcomes(
        self, provider: str, *, since: float = 0.0, until: float = math.inf
    ) -> dict[str, int]:
        """A provider's `add` attempts started in [since, until), counted by outcome."""
        rows = await self._reader.execute_fetchall(
            "SELECT outcome, count(*) FROM attempts WHERE provider = ? AND started_at >= ? "
            "AND started_at < ? GROUP BY outcome",
            (provider, since, until),
        )
        return {row[0]: row[1] for row in rows}

    async def call_latency(
        self, provider: str, *, since: float = 0.0, until: float = math.inf
    ) -> CallLatency:
        """Median and 95th percentile (nearest rank) of a provider's calls in [since, until)."""
        where = "WHERE provider = ? AND started_at >= ? AND started_at < ?"
        args = (provider, since, until)
        rows = await self._reader.execute_fetchall(
            f"SELECT count(*) FROM upstream_calls {where}", args
        )
        count = int(rows[0][0])  # type: ignore[index]
        if not count:
            return CallLatency(0, None, None)
        ranked: list[float] = []
        for share in (0.5, 0.95):
            rows = await self._reader.execute_fetchall(
                f"SELECT latency FROM upstream_calls {where} ORDER BY latency LIMIT 1 OFFSET ?",
                (*args, max(math.ceil(share * count) - 1, 0)),
            )
            ranked.append(float(rows[0][0]))  # type: ignore[index]
        return CallLatency(count, ranked[0], ranked[1])


# --- Providers: balances, catalogues, reports (records) ----------------------------------------

# An order's upstream cost at its catalogue rate, times 1000 (in minor units of the provider's
# currency): rate x quantity, or rate x 1000 for the flat types, which cost `rate` per order.
_FLAT_TYPES: Final = tuple(n for n, kind in v2.SERVICE_TYPES.items() if kind.quantity == "flat")
_RATE_TIMES_QUANTITY: Final = (
    f"CASE WHEN c.type IN ({_placeholders(len(_FLAT_TYPES))}) THEN c.rate * 1000 "
    "ELSE c.rate * o.quantity END"
)


def _estimate(milli: int, to_base: Decimal) -> int:
    """`milli` (1000 x minor units of a provider's currency) in minor units of the base one."""
    return int((Decimal(milli) * to_base / 1000).to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class BalanceRead:
    provider: str
    balance: int  # minor units of `currency`
    currency: str
    read_at: float  # unix time the read was sent


@dataclass(frozen=True, slots=True)
class Refusal:
    """A `Not enough funds` answer to an `add` (Store.no_funds_refusals)."""

    started_at: float  # unix time the call was sent
    at: float  # unix time the answer came back
    cost: int | None  # the order's upstream cost there, as planned; None: unknown


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    provider: str
    at: float  # unix time
    state: str  # 'open' (opened or reopened) or 'healthy' (a probe closed it)


@dataclass(frozen=True, slots=True)
class FinalOutcomes:
    """The final outcomes of one (provider, upstream service) over a period."""

    provider: str
    upstream_service: int
    completed: int
    partial: int
    canceled: int
    partial_delivered: float  # the sum, over the Partial ones, of their delivered share


@dataclass(frozen=True, slots=True)
class CatalogueFetch:
    provider: str
    fetched_at: float  # unix time of the last usable catalogue
    services: int  # its size


@dataclass(frozen=True, slots=True)
class RouteListing:
    """What a provider's catalogue says of one upstream service that a route points at."""

    provider: str
    service: int
    present: bool  # False: the last usable catalogue did not list it (terms: the last known)
    name: str | None = None
    type: str | None = None
    rate: int | None = None  # per 1000 (per order for flat types), minor units, its currency
    min: int | None = None
    max: int | None = None
    refill: bool | None = None
    cancel: bool | None = None
    dripfeed: bool | None = None
    seen_at: float | None = None
    checked_at: float | None = None


@dataclass(frozen=True, slots=True)
class ProviderMargin:
    provider: str
    orders: int  # placed at the provider
    revenue: int  # what resellers paid: charges minus refunds, minor units
    cost: int  # recorded upstream costs, plus catalogue estimates where none is recorded yet
    estimated: int  # orders whose cost is a catalogue estimate
    uncosted: int  # orders with neither a recorded cost nor a catalogue rate (not in `cost`)

    @property
    def margin(self) -> int:
        return self.revenue - self.cost


@dataclass(frozen=True, slots=True)
class ProviderTotals:
    """A provider's money since its first order, minor units of `currency`; each only grows.

    Over the orders placed at it: `revenue`, their charges; `refunded`, the ledger's refunds of
    them (revenue - refunded is what resellers paid); `cost`, the rises of their recorded
    upstream cost, `cost_returned` its falls (cost - cost_returned is the sum of their costs).
    """

    provider: str
    revenue: int
    refunded: int
    cost: int
    cost_returned: int


@dataclass(frozen=True, slots=True)
class OrderMargin:
    order_id: int
    provider: str | None
    charge: int
    refunded: int
    cost: int | None  # None: neither recorded nor estimable
    cost_estimated: bool

    @property
    def revenue(self) -> int:
        return self.charge - self.refunded

    @property
    def margin(self) -> int | None:
        return None if self.cost is None else self.revenue - self.cost


@dataclass(frozen=True, slots=True)
class CallLatency:
    calls: int
    p50: float | None  # seconds
    p95: float | None


async def _connect(
    path: Path | str,
    busy_timeout_ms: int,
    *,
    read_only: bool = False,
    trace: SqlTrace | None = None,
) -> aiosqlite.Connection:
    if read_only:  # mode=ro: SQLite itself refuses any write, and never creates the file
        db = await aiosqlite.connect(
            f"file:{quote(os.fspath(path))}?mode=ro", uri=True, isolation_level=None
        )
    else:
        db = await aiosqlite.connect(str(path), isolation_level=None)
    try:
        if trace is not None:
            await db.set_trace_callback(trace)
        await db.execute_fetchall(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute_fetchall("PRAGMA foreign_keys=ON")
        await db.execute_fetchall(
            "PRAGMA synchronous=FULL"
        )  # a committed ledger row survives power loss
    except BaseException:
        await db.close()  # its thread would keep the process from exiting
        raise
    return db


async def _use_wal(db: aiosqlite.Connection, busy_timeout_ms: int) -> None:
    """Switch the database to WAL, waiting out another process doing the same.

    Two processes opening a new database at once (a server and a CLI) both ask: SQLite answers
    one of them "locked" at once, without the busy timeout (both hold a read lock, and waiting
    could deadlock), so that one asks again until the busy timeout has passed.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            await db.execute_fetchall("PRAGMA journal_mode=WAL")  # fetched: the statement ends
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(WAL_RETRY_SECONDS)


def _migrations() -> dict[str, str]:
    """The shipped migrations (name -> SQL), in the order they apply."""
    folder = resources.files("router") / "migrations"
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql")
    }


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


def _upstream_taken(exc: sqlite3.IntegrityError) -> bool:
    """Whether the error is the one-local-order-per-upstream-order index (migration 0006)."""
    return "orders.provider, orders.upstream_order" in str(exc)


def _reason(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "balance" in text:
        return "the balance would go below zero"
    if "UNIQUE" in text:
        return "that name or key is taken"
    return text
