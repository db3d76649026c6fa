"""Providers: balances, refusals, breaker transitions, spend, catalogues."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence

from router.store.database import Database
from router.store.records import (
    BalanceRead,
    BreakerEvent,
    CatalogueFetch,
    FinalOutcomes,
    Refusal,
    RouteListing,
)


class ProviderStore(Database):
    # --- Providers: balances, catalogues, reports ----------------------------------------------

    async def record_balance(self, read: BalanceRead) -> None:
        await self.write(
            lambda db: db.execute(
                "INSERT INTO provider_balances (provider, balance, currency, read_at) "
                "VALUES (?, ?, ?, ?)",
                (read.provider, read.balance, read.currency, read.read_at),
            )
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
        return await self.write(
            lambda db: (
                db.execute(
                    "DELETE FROM provider_balances WHERE read_at < ? AND id NOT IN "
                    "(SELECT max(id) FROM provider_balances GROUP BY provider)",
                    (older_than,),
                ).rowcount
            )
        )

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
        await self.write(
            lambda db: db.execute(
                "INSERT INTO breaker_events (provider, at, state) VALUES (?, ?, ?)",
                (provider, at, state),
            )
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
        return await self.write(
            lambda db: (
                db.execute(
                    "DELETE FROM breaker_events WHERE at < ? AND id NOT IN "
                    "(SELECT max(id) FROM breaker_events GROUP BY provider)",
                    (older_than,),
                ).rowcount
            )
        )

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

        def record(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO provider_catalogues (provider, fetched_at, services) VALUES (?, ?, ?) "
                "ON CONFLICT (provider) DO UPDATE SET fetched_at = excluded.fetched_at, "
                "services = excluded.services",
                (provider, fetched_at, size),
            )
            db.executemany(
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
            db.executemany(
                "INSERT INTO route_catalogue (provider, service, present, checked_at) "
                "VALUES (?, ?, 0, ?) ON CONFLICT (provider, service) DO UPDATE SET present = 0, "
                "checked_at = excluded.checked_at",
                [(provider, r.service, fetched_at) for r in routes if not r.present],
            )

        await self.write(record)

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
