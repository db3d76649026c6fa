"""Upstream call records rolled up per minute and hour: exact, exactly once, pruned in batches,
indexed.

The rollups (migrations 0012 and 0014) must say what the raw rows said: per provider, minute
(and hour), action and outcome, the number of calls, the sum of their latencies and their
latency histogram. A crash
at any point of a roll-up neither loses nor double-counts a call, and every statement of the
roll-up, the pruning and `call_latency` reads by index.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import router.call_log
from router.call_log import CallLog
from router.metrics import Metrics
from router.store import (
    CALL_BATCH_ROWS,
    CALL_LATENCY_BUCKETS,
    CALL_RAW_RETENTION_SECONDS,
    CALL_RETENTION_SECONDS,
    CallLatency,
    Store,
)
from router.store.calls import BUCKET_COLUMNS, histogram_percentile
from router.upstream import CallRecord, Outcome
from tests.conftest import wait_for
from tests.test_at_scale import scans

PROVIDERS = ("alpha", "beta", "gamma")
ACTIONS = ("add", "status", "balance", "services")
# On every bound, just past it, inside each bucket, at zero and beyond the last bound.
LATENCIES = (
    0.0,
    *CALL_LATENCY_BUCKETS,
    *(b * 1.0001 for b in CALL_LATENCY_BUCKETS),
    *(b * 0.7 for b in CALL_LATENCY_BUCKETS),
    0.0031,
    0.0427,
    0.3141,
    45.0,
)
DEADLINE = 30.0
ACCEPTED = Outcome.ACCEPTED


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """Store.open, each store closed at the end even when the test fails (its connections'
    threads would keep the test process from exiting)."""
    opened: list[Store] = []

    async def open_one(path: Path, **options: Any) -> Store:
        opened.append(store := await Store.open(path, **options))
        return store

    yield open_one
    for store in opened:
        await store.close()  # a second close does nothing


def filled(now: float, count: int, *, minutes: int = 10) -> list[CallRecord]:
    """`count` calls over the `minutes` before `now`: every provider, action and outcome, and
    every latency of LATENCIES, in a mix that puts many keys in each minute."""
    outcomes = list(Outcome)
    return [
        CallRecord(
            provider=PROVIDERS[i % 3],
            action=ACTIONS[i % 4],
            started_at=now - minutes * 60 + i * minutes * 60 / count,
            latency=LATENCIES[i * 7 % len(LATENCIES)],
            outcome=outcomes[i % 5],
        )
        for i in range(count)
    ]


def bucket(latency: float) -> int:
    """The histogram bucket of `latency`: the first bound it does not exceed, else the last."""
    return bisect.bisect_left(CALL_LATENCY_BUCKETS, latency)


def expected_rollups(calls: Iterable[CallRecord]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """(provider, minute, action, outcome) -> (calls, latency_us, bucket counts...), counted in
    Python from the raw records."""
    found: dict[tuple[Any, ...], list[int]] = {}
    for call in calls:
        key = (call.provider, int(call.started_at) // 60 * 60, call.action, str(call.outcome))
        row = found.setdefault(key, [0] * (2 + len(BUCKET_COLUMNS)))
        row[0] += 1
        row[1] += math.floor(call.latency * 1_000_000 + 0.5)  # SQLite's round(), half up
        row[2 + bucket(call.latency)] += 1
    return {key: tuple(row) for key, row in found.items()}


def stored_rollups(
    database: Path, table: str = "upstream_call_minutes", start: str = "minute"
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """(provider, start of the minute, action, outcome) -> (calls, latency_us, buckets...) as
    stored; `table` and `start` name the hour rollups' instead (stored_hours)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            f"SELECT provider, {start}, action, outcome, calls, latency_us, "
            f"{', '.join(BUCKET_COLUMNS)} FROM {table}"
        ).fetchall()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}


def stored_hours(database: Path) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """The hour rollups of migration 0014, keyed as stored_rollups is (the hour's start)."""
    return stored_rollups(database, "upstream_call_hours", "hour")


def hours_of(
    minutes: dict[tuple[Any, ...], tuple[int, ...]],
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Minute rollups (or expected_rollups) summed into their hours."""
    found: dict[tuple[Any, ...], list[int]] = {}
    for (provider, minute, action, outcome), values in minutes.items():
        row = found.setdefault(
            (provider, minute // 3600 * 3600, action, outcome), [0] * len(values)
        )
        for i, value in enumerate(values):
            row[i] += value
    return {key: tuple(row) for key, row in found.items()}


def watermark(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as db:
        [(value,)] = db.execute(
            "SELECT value FROM counters WHERE name = 'upstream_calls_rolled_up'"
        ).fetchall()
    return int(value)


def raw_rows(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as db:
        [(count,)] = db.execute("SELECT count(*) FROM upstream_calls").fetchall()
    return int(count)


def nearest_rank(latencies: list[float], share: float) -> float:
    ranked = sorted(latencies)
    return ranked[max(math.ceil(share * len(ranked)), 1) - 1]


async def roll_up_all(store: Store, limit: int = CALL_BATCH_ROWS) -> int:
    total = 0
    while (done := await store.roll_up_calls(limit=limit)) > 0:
        total += done
    return total


async def test_the_rollups_equal_the_raw_calls(tmp_path: Path, open_store: OpenStore) -> None:
    """Counts by outcome per minute, latency sums and every bucket count, as the raw rows had
    them; rolled up in batches that split minutes, so that rows of a minute are added to it."""
    database = tmp_path / "router.db"
    store = await open_store(database)
    now = time.time()
    calls = filled(now, 3000)
    for start in range(0, len(calls), 250):  # as CallLog writes them: batch after batch
        await store.record_calls(calls[start : start + 250])
    before = {p: await store.call_latency(p) for p in PROVIDERS}

    assert await roll_up_all(store, limit=37) == len(calls)
    assert stored_rollups(database) == expected_rollups(calls)
    assert watermark(database) == len(calls)  # ids 1..3000
    assert await store.count_calls() == len(calls)
    assert await store.count_calls("beta", "status") == sum(
        c.provider == "beta" and c.action == "status" for c in calls
    )
    for provider in PROVIDERS:
        latency = await store.call_latency(provider)
        assert latency == before[provider]  # the same figures, raw or rolled up
        theirs = [c.latency for c in calls if c.provider == provider]
        assert latency.calls == len(theirs)
        for share, estimate in ((0.5, latency.p50), (0.95, latency.p95)):
            exact = nearest_rank(theirs, share)
            assert estimate is not None and bucket(estimate) == bucket(exact)
    await store.close()


async def test_call_latency_counts_the_minutes_of_its_period(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """A call counts when its minute overlaps [since, until): rolled up or raw alike."""
    store = await open_store(tmp_path / "router.db")
    minute = 1_800_000_000 // 60 * 60
    await store.record_calls(
        [
            CallRecord("alpha", "add", minute + 10, 0.2, Outcome.ACCEPTED),
            CallRecord("alpha", "add", minute + 70, 0.4, Outcome.REFUSED),
            CallRecord("alpha", "add", minute + 130, 0.8, Outcome.ACCEPTED),
            CallRecord("beta", "add", minute + 70, 3.0, Outcome.ACCEPTED),
        ]
    )
    periods = {
        (0.0, math.inf): 3,
        (minute + 60, minute + 120): 1,
        (minute + 100, minute + 101): 1,  # inside the second minute
        (minute + 119, minute + 121): 2,  # the second minute's end, the third's start
        (minute + 180, math.inf): 0,
    }
    for rolled in (False, True):
        for (since, until), calls in periods.items():
            latency = await store.call_latency("alpha", since=since, until=until)
            assert latency.calls == calls, (rolled, since, until)
        await roll_up_all(store)
    assert await store.call_latency("gamma") == CallLatency(0, None, None)
    await store.close()


async def test_the_hour_rollups_are_the_sum_of_their_minutes(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Migration 0014's hours follow their minutes in every statement that changes them: rolled
    up in batches that add to minutes already there, and pruned (an hour half pruned holds its
    remaining minutes; one with none left is gone)."""
    database = tmp_path / "router.db"
    store = await open_store(database)
    now = time.time()
    calls = filled(now, 4000, minutes=5 * 60)
    for start in range(0, len(calls), 400):
        await store.record_calls(calls[start : start + 400])
    await roll_up_all(store, limit=53)
    minutes = stored_rollups(database)
    assert minutes == expected_rollups(calls)
    hours = stored_hours(database)
    assert hours == hours_of(minutes)
    assert len(hours) < len(minutes) / 10  # the point of them

    # Prune to the middle of the third hour: minutes go, their hours shrink or go with them.
    middle = (now - 3 * 3600) // 3600 * 3600 + 1800
    while await store.prune_calls(middle, limit=97) == 97:
        pass
    pruned = stored_rollups(database)
    assert pruned and all(minute >= middle for (_, minute, _, _) in pruned)
    assert len(pruned) < len(minutes)
    assert stored_hours(database) == hours_of(pruned)
    while await store.prune_calls(now + 60):
        pass
    assert stored_rollups(database) == {} and stored_hours(database) == {}
    await store.close()


def _latency_of(
    calls: Iterable[CallRecord], provider: str, since: float, until: float
) -> CallLatency:
    """call_latency's answer from the raw records: the calls whose minute overlaps [since,
    until), through the same histogram."""
    counts = [0] * len(BUCKET_COLUMNS)
    for call in calls:
        minute = int(call.started_at) // 60 * 60
        if call.provider == provider and minute + 60 > since and minute < until:
            counts[bucket(call.latency)] += 1
    return CallLatency(
        sum(counts), histogram_percentile(counts, 0.5), histogram_percentile(counts, 0.95)
    )


async def test_call_latency_over_hours_is_what_its_minutes_say(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """A period with whole hours in it reads them from the hour rollups and the minutes around
    them from the minute rollups: the same figures as the calls themselves, for periods that
    start and end on, just off and between minute and hour boundaries, raw or rolled up."""
    store = await open_store(tmp_path / "router.db")
    base = 1_800_000_000 // 3600 * 3600
    calls = filled(base + 4 * 3600, 3000, minutes=4 * 60)  # four whole hours from `base`
    await store.record_calls(calls)
    edges = [
        base + hour * 3600 + offset
        for hour in range(5)
        for offset in (-61, -60, -1, 0, 1, 59, 60, 1799)
    ]
    periods = [(since, until) for since in edges for until in edges if since < until]
    periods += [(0.0, math.inf), (base + 1, math.inf), (0.0, base + 7201), (base - 3600, base)]
    for rolled in (False, True):
        for since, until in periods:
            for provider in ("alpha", "gamma"):
                expected = _latency_of(calls, provider, since, until)
                got = await store.call_latency(provider, since=since, until=until)
                assert got == expected, (rolled, provider, since - base, until - base)
        await roll_up_all(store)
    await store.close()


def test_a_percentile_from_a_histogram() -> None:
    """Nearest rank, interpolated in its bucket; beyond the last bound, the last bound."""
    empty = [0] * len(BUCKET_COLUMNS)
    assert histogram_percentile(empty, 0.5) is None
    tens = list(empty)
    tens[CALL_LATENCY_BUCKETS.index(0.1)] = 10  # ten calls in (0.05, 0.1]
    assert histogram_percentile(tens, 0.5) == pytest.approx(0.075)  # the 5th of 10
    assert histogram_percentile(tens, 0.95) == pytest.approx(0.1)
    split = list(empty)
    split[0], split[-1] = 1, 3
    assert histogram_percentile(split, 0.25) == pytest.approx(0.005)
    assert histogram_percentile(split, 0.5) == CALL_LATENCY_BUCKETS[-1]


async def test_the_rollups_and_the_metrics_share_their_buckets(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """The migration's histogram columns are CALL_LATENCY_BUCKETS' (and one beyond), and the
    Prometheus latency histograms use the same bounds."""
    database = tmp_path / "router.db"
    await (await open_store(database)).close()
    with contextlib.closing(sqlite3.connect(database)) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(upstream_call_minutes)")]
    assert [c for c in columns if c.startswith("b_")] == list(BUCKET_COLUMNS)
    metrics = Metrics(CollectorRegistry())
    sample = metrics.upstream_duration.labels(provider="alpha", action="add")
    sample.observe(0.3)
    bounds = [
        float(s.labels["le"])
        for family in metrics.registry.collect()
        if family.name == "smm_router_upstream_request_duration_seconds"
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]
    assert tuple(bounds) == CALL_LATENCY_BUCKETS


async def test_the_migration_rolls_up_the_calls_already_recorded(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """A database from before migration 0012: its raw calls are rolled up once, marked rolled
    up (not counted twice), and left for the pruning to delete in batches."""
    database = tmp_path / "router.db"
    store = await open_store(database)
    calls = filled(time.time(), 1500, minutes=90)
    await store.record_calls(calls)
    await store.close()
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        # Undo 0012 (and 0014, which builds on it) as if they had never run: what a database
        # from the release before has.
        db.execute("DROP TABLE upstream_call_minutes")
        db.execute("DROP TABLE upstream_call_hours")
        db.execute("DELETE FROM counters WHERE name = 'upstream_calls_rolled_up'")
        db.execute(
            "DELETE FROM schema_migrations "
            "WHERE name IN ('0012_call_rollups.sql', '0014_call_hours.sql')"
        )

    store = await open_store(database)
    assert stored_rollups(database) == expected_rollups(calls)
    assert stored_hours(database) == hours_of(stored_rollups(database))
    assert watermark(database) == len(calls) and raw_rows(database) == len(calls)
    assert await store.count_calls() == len(calls)
    assert (await store.call_latency("alpha")).calls == sum(c.provider == "alpha" for c in calls)
    assert await store.roll_up_calls() == 0  # nothing is rolled up twice
    await store.close()


# A roll-up killed inside its transaction: after the INSERT into the rollups, before the
# watermark moves and the transaction commits.
_KILLED_INSIDE = """
import asyncio, sys, time
from router.store import Store
from router.store.calls import _ROLL_UP

async def main():
    store = await Store.open(sys.argv[1])

    def inside(db):  # the writer's thread, mid-transaction, until killed
        db.execute(_ROLL_UP, (0, 10**9))
        print("inside", flush=True)
        time.sleep(3600)

    await store.write(inside)

asyncio.run(main())
"""

# Roll-ups of 3 rows at a time, one after the other, until killed.
_KILLED_BETWEEN = """
import asyncio, sys
from router.store import Store

async def main():
    store = await Store.open(sys.argv[1])
    print("started", flush=True)
    while await store.roll_up_calls(limit=3):
        pass
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _killed(
    database: Path, script: str, ready: bytes, until: Callable[[Path], bool] | None = None
) -> None:
    """Run `script` on `database` in a child process; SIGKILL it once it printed `ready` (and
    `until(database)` holds, polled)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(database), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), DEADLINE)).strip() == ready

        if until is not None:
            await wait_for(lambda: until(database), "the child's progress", DEADLINE)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL)
        await child.wait()


async def test_a_roll_up_killed_at_any_point_loses_and_doubles_nothing(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """SIGKILL inside a roll-up's transaction (its INSERT done), then in the middle of a run of
    roll-ups; then a roll-up done and its raw rows not deleted yet: every call counted once."""
    database = tmp_path / "router.db"
    store = await open_store(database)
    now = time.time()
    calls = filled(now, 1200, minutes=30)
    await store.record_calls(calls)
    await store.close()
    want = expected_rollups(calls)

    await _killed(database, _KILLED_INSIDE, b"inside")
    assert stored_rollups(database) == {} and watermark(database) == 0  # as if never begun

    await _killed(
        database, _KILLED_BETWEEN, b"started", until=lambda db: watermark(db) >= len(calls) // 3
    )
    store = await open_store(database)
    assert await store.count_calls() == len(calls)
    assert (await store.call_latency("alpha")).calls == sum(c.provider == "alpha" for c in calls)
    await roll_up_all(store)
    assert stored_rollups(database) == want

    # Rolled up, raw rows still there (deleted later, or never: the process died): skipped.
    assert raw_rows(database) == len(calls)
    assert await store.count_calls() == len(calls)
    while await store.prune_raw_calls(now + 1, limit=100) == 100:
        pass
    assert raw_rows(database) == 1  # the largest id stays (see prune_raw_calls)
    assert await store.count_calls() == len(calls)
    assert stored_rollups(database) == want
    await store.close()


async def test_a_call_after_the_raw_rows_are_pruned_is_counted(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """The largest id is never deleted: SQLite would number the next row from 1 again, under
    the watermark, and that call would never be counted."""
    store = await open_store(tmp_path / "router.db")
    now = time.time()
    await store.record_calls(filled(now - 3 * CALL_RAW_RETENTION_SECONDS, 5))
    await roll_up_all(store)
    assert await store.prune_raw_calls(now) == 4
    await store.record_calls([CallRecord("alpha", "add", now, 0.1, Outcome.ACCEPTED)])
    assert await store.count_calls() == 6
    assert await roll_up_all(store) == 1
    assert await store.count_calls() == 6
    await store.close()


async def test_the_background_task_rolls_up_and_prunes_in_batches(
    tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CallLog.tidy, as the server runs it: every raw row rolled up, the raw rows past their
    retention and the rollups past theirs deleted, CALL_BATCH_ROWS per statement (seen in the
    store's SQL trace), with what is left counted exactly."""
    monkeypatch.setattr(router.call_log, "CALL_ROLLUP_INTERVAL", 0.01)
    database = tmp_path / "router.db"
    statements: list[str] = []
    store = await open_store(database, trace=statements.append)
    now = time.time()
    # 1,200 calls in distinct minutes past the retention, 2,500 past the raw retention only,
    # 10 fresh ones.
    expired = [
        CallRecord("alpha", "add", now - CALL_RETENTION_SECONDS - 3600 - i * 60, 0.2, ACCEPTED)
        for i in range(1200)
    ]
    aged = filled(now - CALL_RAW_RETENTION_SECONDS - 3600, 2500)
    fresh = filled(now, 10)
    await store.record_calls([*expired, *aged, *fresh])
    statements.clear()

    calls = CallLog(store, Metrics(CollectorRegistry()))
    task = asyncio.create_task(calls.tidy())

    def tidied() -> bool:
        expired_left = any(
            minute < now - CALL_RETENTION_SECONDS for _, minute, _, _ in stored_rollups(database)
        )
        return raw_rows(database) == len(fresh) and not expired_left

    try:
        await wait_for(tidied, "the records rolled up and pruned", DEADLINE)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await store.count_calls() == len(aged) + len(fresh)
    assert stored_rollups(database) == expected_rollups([*aged, *fresh])

    # The trace repeats a statement once more per step of each trigger it fires (0014's on the
    # minute rollups): a statement is a run of equal lines.
    run_by_run = [statement for statement, _ in itertools.groupby(statements)]
    kinds = Counter(
        " ".join(s.split()[:3])
        for s in run_by_run
        if s.split()[:2] in (["INSERT", "INTO"], ["DELETE", "FROM"])
    )
    # 3,710 rows rolled up and 3,700 raw rows deleted in four statements each (1,000, 1,000,
    # 1,000, then the rest), 1,200 expired rollups in two.
    assert kinds == {
        "INSERT INTO upstream_call_minutes": 4,
        "DELETE FROM upstream_calls": 4,
        "DELETE FROM upstream_call_minutes": 2,
    }
    assert all(
        f"LIMIT {CALL_BATCH_ROWS}" in s for s in statements if s.lstrip().startswith("DELETE")
    )
    await store.close()


async def test_roll_up_prune_and_latency_read_by_index(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """EXPLAIN QUERY PLAN of every statement that records, rolls up, prunes and reads the
    calls' latency: no SCAN of upstream_calls or of the rollups."""
    database = tmp_path / "router.db"
    statements: list[str] = []
    store = await open_store(database, trace=statements.append)
    now = time.time()
    statements.clear()
    await store.record_calls(filled(now - 2 * CALL_RAW_RETENTION_SECONDS, 50))
    await store.roll_up_calls()
    await store.record_calls(filled(now, 50))
    await store.call_latency("alpha")
    await store.call_latency("beta", since=now - 3600, until=now)
    await store.prune_raw_calls(now - CALL_RAW_RETENTION_SECONDS)
    await store.prune_calls(now - CALL_RETENTION_SECONDS)
    await store.close()
    seen = " ".join(statements)
    for kind in (
        "INSERT INTO upstream_calls",
        "INSERT INTO upstream_call_minutes",
        "UPDATE counters",
        "DELETE FROM upstream_calls",
        "DELETE FROM upstream_call_minutes",
        "FROM upstream_call_minutes WHERE provider",
        "FROM upstream_call_hours WHERE provider",
    ):
        assert kind in seen  # the trace saw it
    assert scans(database, statements) == {}
    # The check can fail: a sort of every call and a sum over every minute do scan.
    unindexed = [
        "SELECT latency FROM upstream_calls ORDER BY latency LIMIT 1 OFFSET 5",
        "SELECT sum(calls) FROM upstream_call_minutes WHERE action = 'add'",
    ]
    assert list(scans(database, unindexed)) == unindexed
