"""Upstream call records: written raw in batches, rolled up per minute, pruned in batches.

Each call is first a raw row of `upstream_calls` (CallLog in router/call_log.py writes them in
batches). The server's background task (CallLog.tidy) rolls them up, in id order and
CALL_BATCH_ROWS at a time, into `upstream_call_minutes` (migration 0012): one row per provider,
minute, action and outcome, with a latency histogram over CALL_LATENCY_BUCKETS. A watermark
(the `upstream_calls_rolled_up` counter) moves in the same transaction, so a row is rolled up
exactly once whatever stops the process; the readers count the rollups and the raw rows above
the watermark, in one statement (one snapshot). Raw rows are deleted once rolled up and past
CALL_RAW_RETENTION_SECONDS, the rollups past CALL_RETENTION_SECONDS, each in batches of
CALL_BATCH_ROWS, one short statement per batch.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from router.store.database import Database
from router.store.records import CallLatency

if TYPE_CHECKING:  # the store's commands must not load aiohttp (router.upstream does)
    from router.upstream import CallRecord

# Upper bounds (seconds) of the latency histograms: the rollups' (migration 0012's columns, in
# this order, and one beyond the last) and the Prometheus histograms' (router.metrics). Fixed by
# the migration: a rollup cannot be split again.
CALL_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CALL_RAW_RETENTION_SECONDS: Final = 24 * 3600.0  # raw rows, once rolled up
CALL_BATCH_ROWS: Final = 1000  # rows per roll-up or prune statement


def _column(bound: float) -> str:
    """The rollup column of the bucket up to `bound`: b_5ms, b_2_5s."""
    if bound < 1:
        return f"b_{round(bound * 1000)}ms"
    return f"b_{bound:g}s".replace(".", "_")


BUCKET_COLUMNS: Final = (*(_column(b) for b in CALL_LATENCY_BUCKETS), "b_inf")


def _bucket_tests(latency: str) -> list[str]:
    """SQL: per bucket in column order, whether the `latency` expression falls in it."""
    bounds = CALL_LATENCY_BUCKETS
    tests = [f"{latency} <= {bounds[0]!r}"]
    tests += [
        f"{latency} > {lo!r} AND {latency} <= {hi!r}" for lo, hi in itertools.pairwise(bounds)
    ]
    tests.append(f"{latency} > {bounds[-1]!r}")
    return tests


_ROLLED_UP: Final = "upstream_calls_rolled_up"  # the watermark's name in `counters`
_MARK: Final = f"(SELECT value FROM counters WHERE name = '{_ROLLED_UP}')"
_MINUTE: Final = "CAST(started_at AS INTEGER) / 60 * 60"
_COLUMNS: Final = ", ".join(BUCKET_COLUMNS)

# The raw rows in (?1, ?2] by id, added into their minutes' rollups.
_ROLL_UP: Final = f"""
INSERT INTO upstream_call_minutes
    (provider, minute, action, outcome, calls, latency_us, {_COLUMNS})
SELECT provider, {_MINUTE}, action, outcome, count(*),
       sum(CAST(round(latency * 1000000) AS INTEGER)),
       {", ".join(f"sum({test})" for test in _bucket_tests("latency"))}
FROM upstream_calls WHERE id > ?1 AND id <= ?2
GROUP BY provider, {_MINUTE}, action, outcome
ON CONFLICT (provider, minute, action, outcome) DO UPDATE SET
    calls = calls + excluded.calls, latency_us = latency_us + excluded.latency_us,
    {", ".join(f"{c} = {c} + excluded.{c}" for c in BUCKET_COLUMNS)}
"""

# A provider's calls whose minute overlaps [since, until): calls and bucket counts, one row
# from the hour rollups of the hours wholly inside (?4, ?5: [first, end) of those hours), one
# from the minute rollups of the minutes before and after them (?2 to ?4, ?5 to ?3: ?2 is the
# first minute that overlaps, ?3 is `until`), and one from the raw rows not rolled up yet. One
# statement: a roll-up committing between two would count its rows twice or never. The raw
# rows: NOT INDEXED, since those above the watermark are the last seconds' (a range of ids);
# the provider's index would read all of its raw retention.
_SUMS: Final = ", ".join(f"coalesce(sum({c}), 0)" for c in ("calls", *BUCKET_COLUMNS))
_LATENCY: Final = f"""
SELECT {_SUMS} FROM upstream_call_hours WHERE provider = ?1 AND hour >= ?4 AND hour < ?5
UNION ALL
SELECT {_SUMS} FROM upstream_call_minutes WHERE provider = ?1 AND minute >= ?2 AND minute < ?4
UNION ALL
SELECT {_SUMS} FROM upstream_call_minutes WHERE provider = ?1 AND minute >= ?5 AND minute < ?3
UNION ALL
SELECT count(*), {", ".join(f"coalesce(sum({test}), 0)" for test in _bucket_tests("latency"))}
FROM upstream_calls NOT INDEXED
WHERE id > {_MARK} AND provider = ?1 AND {_MINUTE} >= ?2 AND {_MINUTE} < ?3
"""


def latency_bounds(since: float, until: float) -> tuple[int, float, float, float]:
    """`call_latency`'s bounds for [since, until): the first minute that overlaps it, `until`
    itself, and the whole hours inside as [first, end) (empty when there are none): an hour is
    whole when its last minute starts before `until`. Minutes and hours are multiples of 60 and
    3600 seconds."""
    first_minute = math.floor(since / 60) * 60
    if until == math.inf:
        return first_minute, until, math.ceil(first_minute / 3600) * 3600, until
    # No whole hour (then the minutes before them are all the period's) before `until`.
    first_hour = min(math.ceil(first_minute / 3600) * 3600, until)
    # The first hour that is not whole: its last minute, hour + 3540, is not before `until`.
    # It may lie up to a minute past `until`: no minute of the period starts there.
    end = max(first_hour, math.ceil((until - 3540) / 3600) * 3600)
    return first_minute, until, first_hour, end


def histogram_percentile(counts: Sequence[int], share: float) -> float | None:
    """The nearest-rank `share` percentile (0.5: the median) of the calls counted per bucket of
    CALL_LATENCY_BUCKETS (`counts`: one more than the bounds); None for no calls.

    The call of that rank is known to lie in its bucket (lower, upper]; its latency is taken
    as if the bucket's calls were spread evenly over it: the j-th of n at lower + (upper -
    lower) x j / n. So the answer is in the same bucket as the exact percentile, off by less
    than that bucket's width. Beyond the last bound it is the last bound (a lower bound).
    """
    total = sum(counts)
    if not total:
        return None
    rank = max(math.ceil(share * total), 1)
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(CALL_LATENCY_BUCKETS):
                return CALL_LATENCY_BUCKETS[-1]
            lower = CALL_LATENCY_BUCKETS[index - 1] if index else 0.0
            upper = CALL_LATENCY_BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    raise ValueError("a histogram whose buckets do not add up")  # unreachable: rank <= total


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

    async def roll_up_calls(self, *, limit: int = CALL_BATCH_ROWS) -> int:
        """Add the next `limit` raw call records above the watermark (by id) into the minute
        rollups and move the watermark past them, in one transaction: a call is rolled up
        exactly once, whatever stops the process. How many were rolled up; fewer than `limit`:
        none was left.

        Ids only grow (SQLite numbers a new row after the largest id there is, and
        prune_raw_calls keeps the largest), so a row committed later is always above the mark.
        """

        def roll_up(db: sqlite3.Connection) -> int:
            (mark,) = db.execute(
                f"SELECT value FROM counters WHERE name = '{_ROLLED_UP}'"
            ).fetchone()
            ids = db.execute(
                "SELECT id FROM upstream_calls WHERE id > ? ORDER BY id LIMIT ?", (mark, limit)
            ).fetchall()
            if ids:
                last = ids[-1][0]
                db.execute(_ROLL_UP, (mark, last))
                db.execute("UPDATE counters SET value = ? WHERE name = ?", (last, _ROLLED_UP))
            return len(ids)

        return await self.write(roll_up)

    async def prune_raw_calls(self, older_than: float, *, limit: int = CALL_BATCH_ROWS) -> int:
        """Delete up to `limit` raw call records started before `older_than` and rolled up
        already, the oldest first: one statement. How many it deleted; `limit`: there may be
        more.

        The row with the largest id stays whatever its age: SQLite numbers a new row after the
        largest id there is, and a new row numbered at or below the watermark would be taken
        for one rolled up already, and never counted.
        """
        return await self.write(
            lambda db: (
                db.execute(
                    f"DELETE FROM upstream_calls WHERE id IN (SELECT id FROM upstream_calls "
                    f"INDEXED BY upstream_calls_by_time WHERE started_at < ? AND id <= {_MARK} "
                    f"AND id < (SELECT max(id) FROM upstream_calls) ORDER BY started_at LIMIT ?)",
                    (older_than, limit),
                ).rowcount
            )
        )

    async def prune_calls(self, older_than: float, *, limit: int = CALL_BATCH_ROWS) -> int:
        """Delete up to `limit` minute rollups of minutes that started before `older_than`,
        the oldest first: one statement. How many it deleted; `limit`: there may be more."""
        return await self.write(
            lambda db: (
                db.execute(
                    "DELETE FROM upstream_call_minutes WHERE "
                    "(provider, minute, action, outcome) IN "
                    "(SELECT provider, minute, action, outcome FROM upstream_call_minutes "
                    "WHERE minute < ? ORDER BY minute LIMIT ?)",
                    (older_than, limit),
                ).rowcount
            )
        )

    async def count_calls(self, provider: str | None = None, action: str | None = None) -> int:
        """The calls recorded (and not pruned yet): rolled up, and raw above the watermark."""
        rows = await self._reader.execute_fetchall(
            "SELECT (SELECT coalesce(sum(calls), 0) FROM upstream_call_minutes "
            "WHERE (?1 IS NULL OR provider = ?1) AND (?2 IS NULL OR action = ?2)) + "
            f"(SELECT count(*) FROM upstream_calls WHERE id > {_MARK} "
            "AND (?1 IS NULL OR provider = ?1) AND (?2 IS NULL OR action = ?2))",
            (provider, action),
        )
        return int(rows[0][0])  # type: ignore[index]

    async def call_latency(
        self, provider: str, *, since: float = 0.0, until: float = math.inf
    ) -> CallLatency:
        """How many calls `provider` answered in [since, until), their median and 95th
        percentile latency (seconds; None without calls).

        To the minute: a call counts when its minute (UTC) overlaps [since, until), so up to a
        minute's calls beyond each end may count. The percentiles come from the histograms of
        the hour rollups of the whole hours inside the period (migration 0014), of the minute
        rollups of the minutes around them, and of the raw rows not rolled up yet (a call
        shows at once), with
        histogram_percentile: in the bucket of the exact nearest-rank percentile, interpolated
        within it. (Before the rollups, migration 0012, they were exact, from a sort of every
        call of the period; this reads one row per hour, action and outcome instead, and one
        per minute for the first and the last hour.)
        """
        rows = await self._reader.execute_fetchall(
            _LATENCY, (provider, *latency_bounds(since, until))
        )
        calls, *counts = (sum(part) for part in zip(*rows, strict=True))
        return CallLatency(
            calls, histogram_percentile(counts, 0.5), histogram_percentile(counts, 0.95)
        )
