"""Benchmark of upstream call records: `call_latency` and `smm-router providers` at N calls.

    .venv/bin/python -m tests.bench_calls                 # 1,000,000 calls
    .venv/bin/python -m tests.bench_calls --calls 100000

A fresh database (the real schema), N calls filled with SQL over the last CALL_DAYS days at
three providers, in time order as the router records them: `add` and `status` (every 4th),
latencies spread from 20 ms to 1.5 s, one call in 20 refused and one in 50 ambiguous. Then:

- `Store.call_latency` of each provider over the whole period, in this process (median of
  RUNS), and `smm-router providers --json` as a subprocess, from its start to its exit (median
  of RUNS), beside `smm-router --help` (the interpreter and imports alone, for scale);
- first with every call still raw (as a database upgraded from before the rollups is until its
  server has rolled them up), then in the steady state: everything rolled up into the minute
  rollups by the router's own roll-up (Store.roll_up_calls), raw rows kept only for the last
  CALL_RAW_RETENTION_SECONDS (Store.prune_raw_calls).

The report's call counts are checked against the fill at each step; a mismatch exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from router.store import CALL_RAW_RETENTION_SECONDS, Store
from tests.bench_scale import timed_command

PROVIDERS: Final = ("alpha", "beta", "gamma")
DEFAULT_CALLS: Final = 1_000_000
CALL_DAYS: Final = 29  # inside the providers report's default period
RUNS: Final = 5
FILL_CACHE_KIB: Final = 512 * 1024
BATCH: Final = 100_000  # rows per roll-up or prune of the steady state
CONFIG: Final = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: {database}
currency: USD
providers:
{providers}
services:
  1:
    name: Followers
    category: Bench
    type: Default
    rate: "1.00"
    min: 10
    max: 10000
    route:
      - {{provider: alpha, service: 101}}
"""

# Call i (from 1) at PROVIDERS[i % 3], started at ?2 + i * ?3, in time order.
_CALLS: Final = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
INSERT INTO upstream_calls (provider, action, started_at, latency, outcome)
SELECT CASE i % 3 WHEN 0 THEN 'alpha' WHEN 1 THEN 'beta' ELSE 'gamma' END,
       CASE WHEN i % 4 = 0 THEN 'status' ELSE 'add' END,
       ?2 + i * ?3,
       0.020 + (i * 7919 % 1000) * 0.0015,
       CASE WHEN i % 20 = 1 THEN 'refused' WHEN i % 50 = 2 THEN 'ambiguous' ELSE 'accepted' END
FROM n
"""


def fill(database: Path, count: int) -> float:
    """Fill `count` calls (see _CALLS) in one transaction; the seconds it took."""
    start = time.time() - CALL_DAYS * 86400
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute(f"PRAGMA cache_size = -{FILL_CACHE_KIB}")
        db.execute("BEGIN IMMEDIATE")
        db.execute(_CALLS, (count, start, CALL_DAYS * 86400 / max(count, 1) * 0.999))
        db.execute("COMMIT")
    return time.perf_counter() - started


def expected_calls(count: int) -> dict[str, int]:
    return {p: sum(1 for i in range(1, count + 1) if PROVIDERS[i % 3] == p) for p in PROVIDERS}


async def time_latency(database: Path) -> tuple[float, dict[str, int]]:
    """Median milliseconds of one call_latency per provider (all three), and the counts."""
    store = await Store.open(database)
    took: list[float] = []
    counts: dict[str, int] = {}
    try:
        for _ in range(RUNS):
            started = time.perf_counter()
            for provider in PROVIDERS:
                counts[provider] = (await store.call_latency(provider)).calls
            took.append((time.perf_counter() - started) * 1000)
    finally:
        await store.close()
    return statistics.median(took), counts


async def time_report(config: Path) -> tuple[float, float, dict[str, int]]:
    """Median seconds of `providers --json` and of `--help`, and the report's call counts."""
    report: list[float] = []
    bare: list[float] = []
    counts: dict[str, int] = {}
    for _ in range(RUNS):
        took, out = await timed_command(
            [sys.executable, "-m", "router", "providers", "--json", "--config", str(config)]
        )
        report.append(took)
        counts = {row["provider"]: row["calls"] for row in json.loads(out)["providers"]}
        took, _ = await timed_command([sys.executable, "-m", "router", "--help"])
        bare.append(took)
    return statistics.median(report), statistics.median(bare), counts


async def steady_state(database: Path) -> float:
    """Roll every call up and prune the raw rows past their retention, with the store's own
    steps in large batches (the router's task does the same CALL_BATCH_ROWS at a time)."""
    started = time.perf_counter()
    store = await Store.open(database)
    try:
        while await store.roll_up_calls(limit=BATCH):
            pass
        older_than = time.time() - CALL_RAW_RETENTION_SECONDS
        while await store.prune_raw_calls(older_than, limit=BATCH):
            pass
    finally:
        await store.close()
    return time.perf_counter() - started


async def measure(folder: Path, count: int, label: str) -> bool:
    database, config = folder / "calls.db", folder / "calls.yaml"
    want = expected_calls(count)
    latency_ms, counts = await time_latency(database)
    report_s, bare_s, reported = await time_report(config)
    print(
        f"{label}: call_latency x3 providers {latency_ms:.1f} ms; `smm-router providers` "
        f"{report_s * 1000:.0f} ms (`--help` {bare_s * 1000:.0f} ms)",
        flush=True,
    )
    ok = counts == want == reported
    if not ok:
        print(f"  calls per provider: {counts} (store), {reported} (report), filled {want}")
    return ok


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as name:
        folder = Path(name)
        database = folder / "calls.db"
        (folder / "calls.yaml").write_text(
            CONFIG.format(
                database=database,
                providers="\n".join(
                    f'  {p}: {{url: "http://127.0.0.1:9/api/v2", key: k}}' for p in PROVIDERS
                ),
            )
        )
        await (await Store.open(database)).close()
        print(f"{args.calls:,} calls filled in {fill(database, args.calls):.1f} s", flush=True)
        ok = await measure(folder, args.calls, "all raw")
        took = await steady_state(database)
        print(f"rolled up and pruned in {took:.1f} s", flush=True)
        ok &= await measure(folder, args.calls, "rolled up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
