"""Upstream call records."""

from __future__ import annotations

from collections.abc import Sequence

from router.store.database import Database
from router.upstream import CallRecord


class CallStore(Database):
    # --- Upstream call records ----------------------------------------------------------------

    async def record_calls(self, calls: Sequence[CallRecord]) -> None:
        """Write a batch of call records in one transaction."""
        if not calls:
            return
        rows = [(c.provider, c.action, c.started_at, c.latency, str(c.outcome)) for c in calls]
        await self.write(
            lambda db: db.executemany(
                "INSERT INTO upstream_calls (provider, action, started_at, latency, outcome) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        )

    async def prune_calls(self, older_than: float) -> int:
        return await self.write(
            lambda db: (
                db.execute(
                    "DELETE FROM upstream_calls WHERE started_at < ?", (older_than,)
                ).rowcount
            )
        )

    async def count_calls(self, provider: str | None = None, action: str | None = None) -> int:
        rows = await self._reader.execute_fetchall(
            "SELECT count(*) FROM upstream_calls WHERE (?1 IS NULL OR provider = ?1) "
            "AND (?2 IS NULL OR action = ?2)",
            (provider, action),
        )
        return int(rows[0][0])  # type: ignore[index]
