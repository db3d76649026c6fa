"""Upstream call records: counted in metrics at once, written to SQLite in batches, then
rolled up and pruned by a background task (the store's steps: router.store.calls).

Usage::

    calls = CallLog(store, metrics)
    client = UpstreamClient(provider, session, on_call=calls.record)
    flushing = asyncio.create_task(calls.run())    # writes what is recorded, every second
    tidying = asyncio.create_task(calls.tidy())    # rolls up and prunes, in batches
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog

from router.metrics import Metrics
from router.store import (
    CALL_BATCH_ROWS,
    CALL_RAW_RETENTION_SECONDS,
    CALL_RETENTION_SECONDS,
    Store,
)
from router.upstream import CallRecord

log = structlog.get_logger("router.call_log")

CALL_FLUSH_INTERVAL: Final = 1.0
CALL_FLUSH_BATCH: Final = 500
CALL_BACKLOG_LIMIT: Final = 50_000  # call records kept while the database cannot take them
CALL_ROLLUP_INTERVAL: Final = 60.0  # raw call records rolled up into their minutes
CALL_PRUNE_INTERVAL: Final = 3600.0
CALL_BATCH_PAUSE: Final = 0.01  # between two roll-up or prune batches: other writes go first


class CallLog:
    """Upstream call records: counted in metrics at once, written to SQLite in batches."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._pending: list[CallRecord] = []
        self._wake = asyncio.Event()

    def record(self, call: CallRecord) -> None:
        metrics = self.metrics
        metrics.series(
            metrics.upstream_requests, call.provider, call.action, str(call.outcome)
        ).inc()
        metrics.series(metrics.upstream_duration, call.provider, call.action).observe(call.latency)
        self._pending.append(call)
        if len(self._pending) >= CALL_FLUSH_BATCH:
            self._wake.set()

    async def flush(self) -> None:
        """Write what is pending; on failure (the database locked past its busy timeout) keep
        it for the next flush, up to CALL_BACKLOG_LIMIT records, the oldest dropped first."""
        batch, self._pending = self._pending, []
        try:
            await self.store.record_calls(batch)
        except BaseException:
            kept = (batch + self._pending)[-CALL_BACKLOG_LIMIT:]
            dropped = len(batch) + len(self._pending) - len(kept)
            self._pending = kept
            if dropped:
                log.warning("call_records_dropped", count=dropped)
            raise

    async def run(self) -> None:
        """Flush every CALL_FLUSH_INTERVAL, or at once when a batch fills."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CALL_FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("call_log_flush_failed")

    async def tidy(self) -> None:
        """Every CALL_ROLLUP_INTERVAL, roll the records written into their minutes' rollups;
        every CALL_PRUNE_INTERVAL, delete the raw ones past CALL_RAW_RETENTION_SECONDS and the
        rollups past CALL_RETENTION_SECONDS.

        All in batches of the store's CALL_BATCH_ROWS, each its own short statement or
        transaction, with a pause between two: a reserve or a settle waits for one batch at
        most, never for a backlog (a database upgraded with millions of raw rows).
        """
        pruned_at = -math.inf
        while True:
            await asyncio.sleep(CALL_ROLLUP_INTERVAL)
            try:
                await _in_batches(self.store.roll_up_calls)
                if time.monotonic() - pruned_at > CALL_PRUNE_INTERVAL:
                    now = time.time()
                    raw_before = now - CALL_RAW_RETENTION_SECONDS
                    await _in_batches(functools.partial(self.store.prune_raw_calls, raw_before))
                    before = now - CALL_RETENTION_SECONDS
                    await _in_batches(functools.partial(self.store.prune_calls, before))
                    pruned_at = time.monotonic()
            except Exception:
                log.exception("call_rollup_failed")


async def _in_batches(batch: Callable[[], Awaitable[int]]) -> int:
    """Run `batch` (a store method doing at most CALL_BATCH_ROWS rows) until it does fewer,
    pausing between two; how many rows in all."""
    total = 0
    while True:
        done = await batch()
        total += done
        if done < CALL_BATCH_ROWS:
            return total
        await asyncio.sleep(CALL_BATCH_PAUSE)
