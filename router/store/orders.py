"""Orders: reserve, settle, look up; held counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from router.store.database import (
    _BALANCE_CHECK,
    Database,
    DuplicateRequest,
    NotStored,
    StoreError,
    T,
    UpstreamOrderTaken,
    _placeholders,
    _upstream_taken,
    log,
    owner_alive,
)
from router.store.records import (
    _ACTIVE_ORDER,
    _ORDER_COLUMNS,
    _STATUS_COLUMNS,
    Attempt,
    HeldAges,
    NewOrder,
    Order,
    OrderStatus,
    _order,
)
from router.store.writer import Statement


class OrderStore(Database):
    # --- Orders -------------------------------------------------------------------------------

    async def reserve_order(self, order: NewOrder) -> int | None:
        """Create the order in state `placing` and debit its charge, in ONE statement.

        None when the reseller's balance does not cover the charge (or it was disabled). Raise
        DuplicateRequest when the reseller already made an order with `order.request_id` (the
        UNIQUE index decides, also between two that arrive at once), StoreError when the
        database refuses the order for any other reason (a bug, not the reseller's funds).
        """
        now = time.time()
        args = (
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
        )

        reserve = Statement(
            "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
            "params, provider, upstream_service, created_at, updated_at, placing_by, "
            "request_id, config_version) "
            "SELECT id, ?, 'placing', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM resellers "
            "WHERE id = ? AND enabled = 1 AND balance >= ? "
            "ON CONFLICT (reseller_id, request_id) WHERE request_id IS NOT NULL "
            "DO NOTHING RETURNING id",
            args,
        )
        try:
            rows = await self.write(reserve)  # one statement, committed with the others queued
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
        args = (provider, upstream_service, time.time(), order_id)
        await self.write(
            lambda db: db.execute(
                "UPDATE orders SET provider = ?, upstream_service = ?, updated_at = ? "
                "WHERE id = ? AND state = 'placing'",
                args,
            )
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

        def settle_args(now: float) -> tuple[object, ...]:
            return (
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

        def settle(db: sqlite3.Connection) -> None:
            now = time.time()
            rows = db.execute(statement, settle_args(now)).fetchall()
            # Moved iff it was ours: no other writer can end in `state` from elsewhere here.
            settled = [row[0] for row in rows] == [state]
            if state == "canceled" and settled:
                self._refund_canceled(db, order_id, now, "no route took the re-routed order")
            if event is not None and settled:
                self._insert_resolve_event(db, order_id, now, event)

        async def write() -> object:
            if state != "canceled" and event is None:  # the hot path of `add`: one statement
                return await self.write(Statement(statement, settle_args(time.time())))
            return await self.write(settle)

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
            "SELECT id, placing_by, updated_at FROM orders INDEXED BY orders_placing "
            "WHERE state = 'placing'"
        )
        now = time.time()
        orphaned = [(now, row[0]) for row in rows if not owner_alive(row[1])]
        if not orphaned and all(row[2] >= stale_before for row in rows):
            return 0  # nothing to hold: no write lock (a start-up beside a busy server)

        def hold(db: sqlite3.Connection) -> int:
            held = max(
                db.executemany(
                    "UPDATE orders SET state = 'held', updated_at = ? "
                    "WHERE id = ? AND state = 'placing'",
                    orphaned,
                ).rowcount,
                0,
            )
            cursor = db.execute(
                "UPDATE orders INDEXED BY orders_placing SET state = 'held', updated_at = ? "
                "WHERE state = 'placing' AND updated_at < ?",
                (now, stale_before),
            )
            return held + cursor.rowcount

        return await self.write(hold)

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

    async def order_statuses(
        self, reseller_id: int, order_ids: Sequence[int]
    ) -> dict[int, OrderStatus]:
        """What `status` shows of the reseller's orders among `order_ids` (not `failed`): ONE
        read of the covering index orders_status (migration 0013), never of the table, on the
        event loop (Database._read_now)."""
        if not order_ids:
            return {}
        rows = await self._read_now(
            f"SELECT {_STATUS_COLUMNS} FROM orders INDEXED BY orders_status "
            "WHERE reseller_id = ? AND state <> 'failed' "
            f"AND id IN ({_placeholders(len(order_ids))})",
            (reseller_id, *order_ids),
        )
        return {row[0]: OrderStatus._make(row) for row in rows}

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

        One statement, from orders_held alone (it holds created_at since migration 0016): each
        held order is one entry of the index, and the table is not read.
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

    async def upstream_order_taken(self, provider: str, upstream_order: int) -> int | None:
        """The local order that already holds this upstream order at `provider`, if any (the
        oldest, where an older database had several: migration 0006)."""
        rows = await self._reader.execute_fetchall(
            "SELECT id FROM orders WHERE provider = ? AND upstream_order = ? "
            "ORDER BY upstream_duplicate LIMIT 1",
            (provider, upstream_order),
        )
        return int(rows[0][0]) if rows else None  # type: ignore[index]

    @staticmethod
    def _refund_canceled(db: sqlite3.Connection, order_id: int, now: float, note: str) -> None:
        """A canceled order shows Canceled with nothing delivered, and its charge comes back."""
        db.execute(
            "UPDATE orders SET status = 'Canceled', remains = quantity WHERE id = ?", (order_id,)
        )
        db.execute(
            "INSERT INTO ledger (reseller_id, order_id, kind, amount, note, created_at) "
            "SELECT reseller_id, id, 'refund', charge, ?, ? FROM orders WHERE id = ? "
            "AND charge > 0",
            (note, now, order_id),
        )

    @staticmethod
    def _insert_resolve_event(
        db: sqlite3.Connection, order_id: int, now: float, detail: str
    ) -> None:
        """An operator action in the order's history, with the order's status after it."""
        db.execute(
            "INSERT INTO order_events (order_id, at, kind, status, detail) "
            "SELECT id, ?, 'resolve', status, ? FROM orders WHERE id = ?",
            (now, detail, order_id),
        )


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
