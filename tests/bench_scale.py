"""Benchmark at scale: the router's costs at 10k and at 1M orders, side by side.

    make bench-scale        # or: .venv/bin/python -m tests.bench_scale --sizes 10000,1000000

For each size, a fresh database: five resellers made with `smm-router clients add`, then the
orders filled with SQL through the real schema (tests/bench_fill.py: mostly Completed, 10%
active, some failed, Partial and Canceled with their refunds in the ledger, 0.1% held, at three
providers). One simulator (a separate process) is the upstream of all three providers and knows
every active order. Then, with the real server (`smm-router serve`) running:

- `status` of one ID (random orders of one reseller, one connection): p50 of every request;
- `status` of 100 IDs (random, 64 connections): answers per second;
- `smm-router providers`, `clients list`, `orders held` with `--json`, each a subprocess timed
  from its start to its exit (median of 3), beside `smm-router --help` (the interpreter and
  imports alone, for scale); their JSON is checked against what was filled;
- `/healthz` and a `/metrics` scrape: p50 of 40 one after another;
- start-up: from `smm-router serve`'s start until /healthz answers (median of 3 starts);
- the sync: every active order made due, the server started, and its memory read from
  /proc/PID/status while the first pass works through them all: VmRSS sampled every 20 ms
  (its peak) and VmHWM (the kernel's high-water mark of the process) when the pass ends.

Each figure at both sizes with the ratio and DESIGN.md's target. A missed target is printed,
not a failure; the ledger (every balance = its ledger sum = what was filled, before and after
the sync's refunds) and the reports' contents are checked, and a mismatch exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import aiohttp

from router import v2
from router.sim import SimProvider
from tests.bench import free_port, load_average, post, process
from tests.bench_fill import (
    NOT_DUE,
    PROVIDERS,
    QUANTITY,
    RESELLERS,
    SERVICE,
    TOPUP,
    UPSTREAM_SERVICE,
    Expected,
    active_count,
    fill,
    kind,
    ledger_check,
    make_active_due,
)
from tests.bench_load import GENERATORS, describe, measure, resolve, timed_gets

SIM_KEY: Final = "bench-scale-sim-key"
DEFAULT_SIZES: Final = (10_000, 1_000_000)
DEFAULT_SECONDS: Final = 5.0
STATUS_CONNECTIONS: Final = 64
STATUS_BODIES: Final = 200  # distinct requests cycled, each of random orders
REPORT_RUNS: Final = 3
START_RUNS: Final = 3
PROBES: Final = 40  # /healthz and /metrics requests
RSS_SAMPLE_SECONDS: Final = 0.02
SYNC_POLL_SECONDS: Final = 0.25
SYNC_TIMEOUT_SECONDS: Final = 600.0
CATALOGUE_WAIT_SECONDS: Final = 30.0
SEED: Final = 8
RSS_TARGET_KB: Final = 200 * 1024
CONFIG: Final = """\
listen: {{host: 127.0.0.1, port: {api}}}
metrics: {{host: 127.0.0.1, port: {metrics}}}
database: {database}
currency: USD
providers:
{providers}
sync: {{status_interval: 3600, balance_interval: 3600, catalogue_interval: 3600}}
limits: {{add: 1000000, status: 1000000, other: 1000000, in_flight: 10000}}
services:
  {service}:
    name: Scale Followers
    category: Bench
    type: Default
    rate: "1.00"
    min: 10
    max: 100000
    route:
{route}
"""


@dataclass
class Figures:
    """One size's measurements; seconds unless named otherwise."""

    orders: int
    active: int
    filled: float = 0.0
    status_p50: float = 0.0
    status_answers: int = 0
    status100_rate: float = 0.0
    reports: dict[str, float] = field(default_factory=dict)
    healthz_p50: float = 0.0
    metrics_p50: float = 0.0
    start_ups: list[float] = field(default_factory=list)
    sync_seconds: float = 0.0
    sync_changes: int = 0
    rss_ready: int = 0  # kB, VmRSS once /healthz answered (the pass has just begun)
    rss_peak: int = 0  # kB, the highest VmRSS sampled during the pass
    hwm: int = 0  # kB, VmHWM at the end of the pass
    problems: list[str] = field(default_factory=list)

    @property
    def start_up(self) -> float:
        return statistics.median(self.start_ups)


# --- the simulator -------------------------------------------------------------------------------


async def sim_main(port: int, key: str, active: int) -> None:
    """A provider that holds `active` orders (IDs from 1000), all ended by the time they are
    asked for: every 5th Partial with a quarter left, the rest Completed."""
    sim = SimProvider(key=key, balance=Decimal(10**9), progress_seconds=0.001)
    sim.create_orders(UPSTREAM_SERVICE, active, quantity=QUANTITY)
    await sim.start("127.0.0.1", port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


# --- what the server shows -----------------------------------------------------------------------


def status_kb(pid: int, field_name: str) -> int:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"no {field_name} in /proc/{pid}/status")
    return int(match.group(1))


def samples(text: str, name: str) -> dict[str, float]:
    """provider label -> value of the metric `name` in a Prometheus text page."""
    found = {}
    for match in re.finditer(rf'^{name}\{{[^}}]*provider="([^"]+)"[^}}]*\}} (\S+)$', text, re.M):
        found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(2))
    return found


async def watch_sync(pid: int, metrics_url: str, figures: Figures) -> None:
    """Sample the server's memory until every provider's first sync pass has ended."""
    figures.rss_ready = figures.rss_peak = status_kb(pid, "VmRSS")
    deadline = time.monotonic() + SYNC_TIMEOUT_SECONDS
    polled = 0.0
    async with aiohttp.ClientSession() as session:
        while True:
            figures.rss_peak = max(figures.rss_peak, status_kb(pid, "VmRSS"))
            if time.monotonic() - polled > SYNC_POLL_SECONDS:
                polled = time.monotonic()
                async with session.get(metrics_url) as response:
                    text = await response.text()
                passes = samples(text, "smm_router_sync_pass_duration_seconds_count")
                if all(passes.get(p, 0) >= 1 for p in PROVIDERS):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sync pass did not end in {SYNC_TIMEOUT_SECONDS:.0f} s")
            await asyncio.sleep(RSS_SAMPLE_SECONDS)
    figures.hwm = status_kb(pid, "VmHWM")
    figures.sync_seconds = max(samples(text, "smm_router_sync_pass_duration_seconds_sum").values())
    figures.sync_changes = int(sum(samples(text, "smm_router_order_status_changes_total").values()))


async def timed_command(argv: Sequence[str]) -> tuple[float, bytes]:
    """Wall seconds from a subprocess's start to its exit, and its stdout; it must exit 0."""
    started = time.perf_counter()
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await child.communicate()
    took = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}: {err.decode()[-2000:]}")
    return took, out


REPORTS: Final = {
    "providers": ("providers",),
    "clients list": ("clients", "list"),
    "orders held": ("orders", "held"),
}


async def time_reports(
    cli: Sequence[str], with_config: Sequence[str]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Each report's JSON, and the seconds of each of its REPORT_RUNS runs; `--help` runs
    between them, so that the interpreter's own start is measured under the same load."""
    documents: dict[str, Any] = {}
    runs: dict[str, list[float]] = {name: [] for name in [*REPORTS, "--help"]}
    for _ in range(REPORT_RUNS):
        for name, argv in REPORTS.items():
            took, out = await timed_command([*cli, *argv, "--json", *with_config])
            runs[name].append(took)
            documents[name] = json.loads(out)
            took, _ = await timed_command([*cli, "--help"])
            runs["--help"].append(took)
    return documents, runs


def check_reports(
    documents: dict[str, Any], expected: Expected, names: dict[int, str]
) -> list[str]:
    """What each report printed, against what was filled (the sync has not run yet)."""
    problems = []
    held = documents["orders held"]
    if len(held) != expected.kinds.get("held", 0):
        problems.append(f"orders held lists {len(held)}, filled {expected.kinds.get('held', 0)}")
    listed = {row["name"]: row for row in documents["clients list"]}
    for rid, name in names.items():
        row = listed.get(name)
        want = (v2.format_money(expected.balances[rid]), expected.shown[rid])
        got = None if row is None else (row["balance"], row["orders"])
        if got != want:
            problems.append(f"clients list: {name} shows {got}, expected {want}")
    providers = {row["provider"]: row for row in documents["providers"]["providers"]}
    orders = sum(row["orders"] for row in providers.values())
    if sorted(providers) != sorted(PROVIDERS) or orders != expected.placed:
        problems.append(
            f"providers: {sorted(providers)} with {orders} orders, expected "
            f"{sorted(PROVIDERS)} with {expected.placed}"
        )
    return problems


def wait_for_catalogues(database: Path) -> None:
    """Until the server has stored every provider's catalogue (the report estimates the active
    orders' cost from it), as it does within a second of starting."""
    deadline = time.monotonic() + CATALOGUE_WAIT_SECONDS
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            [(stored,)] = db.execute("SELECT count(*) FROM provider_catalogues").fetchall()
        if stored >= len(PROVIDERS):
            return
        time.sleep(0.1)
    raise RuntimeError("the server did not store the providers' catalogues")


# --- one size ------------------------------------------------------------------------------------


async def one_size(folder: Path, count: int, generator: str, seconds: float) -> Figures:
    python = sys.executable
    ports = {name: free_port() for name in ("sim", "api", "metrics")}
    sim_url = f"http://127.0.0.1:{ports['sim']}/api/v2"
    database = folder / f"scale-{count}.db"
    config = folder / f"scale-{count}.yaml"
    config.write_text(
        CONFIG.format(
            database=database,
            service=SERVICE,
            api=ports["api"],
            metrics=ports["metrics"],
            providers="\n".join(
                f'  {p}: {{url: "{sim_url}", key: {SIM_KEY}, timeout: 10}}' for p in PROVIDERS
            ),
            route="\n".join(
                f"      - {{provider: {p}, service: {UPSTREAM_SERVICE}}}" for p in PROVIDERS
            ),
        )
    )
    cli = [python, "-m", "router"]
    with_config = ["--config", str(config)]
    figures = Figures(count, active_count(count))
    keys: dict[int, str] = {}
    names: dict[int, str] = {}
    for name in RESELLERS:
        _, out = await timed_command(
            [*cli, "clients", "add", name, "--balance", str(TOPUP), "--json", *with_config]
        )
        made = json.loads(out)
        keys[made["id"]], names[made["id"]] = made["key"], name
    expected = fill(database, count, sorted(keys), due_at=time.time() + NOT_DUE)
    figures.filled = expected.filled
    print(f"{count:,} orders: filled in {expected.filled:.1f} s", flush=True)
    ok, lines = ledger_check(database, expected)
    if not ok:
        figures.problems += [f"after the fill: {line}" for line in lines]

    # Status of one reseller's orders that it was told about (not failed), at random.
    first = min(keys)
    mine = [i for i in range(1, count + 1) if (i // 7) % len(keys) == 0 and kind(i) != "failed"]
    rng = random.Random(SEED)
    key = keys[first]
    single = [f"key={key}&action=status&order={rng.choice(mine)}" for _ in range(STATUS_BODIES)]
    hundred = [
        f"key={key}&action=status&orders=" + ",".join(map(str, rng.sample(mine, 100)))
        for _ in range(STATUS_BODIES)
    ]
    api = f"http://127.0.0.1:{ports['api']}/api/v2"
    healthz = f"http://127.0.0.1:{ports['api']}/healthz"
    metrics = f"http://127.0.0.1:{ports['metrics']}/metrics"
    serve = [*cli, "serve", *with_config]

    sim = [
        python,
        "-m",
        "tests.bench_scale",
        "--sim",
        str(ports["sim"]),
        SIM_KEY,
        str(figures.active),
    ]
    async with process(*sim, ready_url=sim_url):
        async with process(*serve, ready_url=healthz) as server:
            figures.start_ups.append(server.ready_seconds)
            await asyncio.to_thread(wait_for_catalogues, database)
            answer = await post(api, hundred[0])
            found = (
                [v for v in answer.values() if "status" in v] if isinstance(answer, dict) else []
            )
            if len(found) != 100:
                figures.problems.append(f"status of 100 IDs found {len(found)}: {answer}")
            figures.healthz_p50 = statistics.median(await timed_gets(healthz, PROBES))
            figures.metrics_p50 = statistics.median(await timed_gets(metrics, PROBES))
            load = await measure(
                api, single, connections=1, seconds=seconds, check=b'"status"', generator=generator
            )
            figures.status_p50, figures.status_answers = load.p50, load.answers
            if load.failed:
                figures.problems.append(f"status of one ID: {load.failed} failed answers")
            load = await measure(
                api,
                hundred,
                connections=STATUS_CONNECTIONS,
                seconds=seconds,
                check=b'"status"',
                generator=generator,
            )
            figures.status100_rate = load.rate
            if load.failed:
                figures.problems.append(f"status of 100 IDs: {load.failed} failed answers")
            documents, runs = await time_reports(cli, with_config)
            figures.reports = {name: statistics.median(took) for name, took in runs.items()}
            figures.problems += check_reports(documents, expected, names)
        for _ in range(START_RUNS - 1):
            async with process(*serve, ready_url=healthz) as server:
                figures.start_ups.append(server.ready_seconds)

        due = make_active_due(database)
        if due != figures.active:
            figures.problems.append(f"{due} active orders made due, filled {figures.active}")
        async with process(*serve, ready_url=healthz) as server:
            await watch_sync(server.child.pid, metrics, figures)
        ok, lines = ledger_check(database, expected, synced=True)
        if not ok:
            figures.problems += [f"after the sync: {line}" for line in lines]
    return figures


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    figure: str
    values: tuple[str, str]
    ratio: str
    target: str
    met: str


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def rows(small: Figures, large: Figures) -> list[Row]:
    """The table: each figure at both sizes, the ratio large / small, the target, met."""
    table: list[Row] = []

    def add(
        figure: str,
        read: Callable[[Figures], Any],
        show: Callable[[Any], str],
        target: str = "",
        met: Callable[[Any, Any, float], bool] | None = None,
        *,
        compare: bool = True,
    ) -> None:
        """`met` gets (small's value, large's value, their ratio); `compare`: print the
        ratio (not for a difference of two noisy figures)."""
        low, high = read(small), read(large)
        ratio = high / low if isinstance(low, int | float) and low else math.nan
        shown = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
        shown = shown if compare else ""
        verdict = "" if met is None else _yes(met(low, high, ratio))
        table.append(Row(figure, (show(low), show(high)), shown, target, verdict))

    count = "{:,}".format
    add("orders", lambda f: f.orders, count)
    add("  of them active", lambda f: f.active, count)
    add("fill (SQL, one transaction)", lambda f: f.filled, _s)
    add(
        "status, 1 ID: p50 (1 conn.)",
        lambda f: f.status_p50,
        _ms,
        "within 2x",
        lambda _low, _high, r: r <= 2,
    )
    add("  requests timed for that p50", lambda f: f.status_answers, count)
    add(
        f"status, 100 IDs: rate ({STATUS_CONNECTIONS} conn.)",
        lambda f: f.status100_rate,
        "{:,.0f}/s".format,
        "within 1.5x (>= 0.67x)",
        lambda _low, _high, r: r >= 1 / 1.5,
    )
    for name in REPORTS:
        add(
            f"smm-router {name} --json (wall)",
            lambda f, n=name: f.reports[n],
            _s,
            "< 1 s",
            lambda low, high, _r: max(low, high) < 1,
        )
        add(
            "  beyond --help",
            lambda f, n=name: f.reports[n] - f.reports["--help"],
            _s,
            compare=False,
        )
    add("smm-router --help (wall, for scale)", lambda f: f.reports["--help"], _s)
    for label, read in (("/healthz", _healthz), ("/metrics", _metrics)):
        add(
            f"{label}: p50 of {PROBES}",
            read,
            _ms,
            "< 20 ms",
            lambda low, high, _r: max(low, high) < 0.020,
        )
    add(
        f"start-up to /healthz (median of {START_RUNS})",
        lambda f: f.start_up,
        _s,
        "no scan: flat (within 1.25x)",
        lambda _low, _high, r: r <= 1.25,
    )
    add("sync pass over the active orders", lambda f: f.sync_seconds, _s)
    add("  statuses it changed", lambda f: f.sync_changes, count)
    add("sync RSS: VmRSS at /healthz (pass begun)", lambda f: f.rss_ready, _mb)
    add(
        "sync RSS: peak VmRSS sampled",
        lambda f: f.rss_peak,
        _mb,
        "<= 200 MB",
        lambda low, high, _r: max(low, high) <= RSS_TARGET_KB,
    )
    add(
        "sync RSS: VmHWM at the pass's end",
        lambda f: f.hwm,
        _mb,
        "<= 200 MB",
        lambda low, high, _r: max(low, high) <= RSS_TARGET_KB,
    )
    return table


def _healthz(figures: Figures) -> float:
    return figures.healthz_p50


def _metrics(figures: Figures) -> float:
    return figures.metrics_p50


def print_rows(table: list[Row], sizes: tuple[int, int]) -> None:
    header = ("figure", f"{sizes[0]:,} orders", f"{sizes[1]:,} orders", "ratio", "target", "met")
    cells = [header, *((r.figure, *r.values, r.ratio, r.target, r.met) for r in table)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


async def run(sizes: tuple[int, int], generator: str, seconds: float) -> int:
    generator = resolve(generator)
    print(
        f"load generator: {describe(generator)}; load average before: {load_average()}", flush=True
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        measured = [await one_size(Path(folder), size, generator, seconds) for size in sizes]
    print(f"load average after: {load_average()}; {time.perf_counter() - started:.0f} s in all")
    print()
    print_rows(rows(*measured), sizes)
    print(
        f"beyond --help: a report's wall time less the median of {REPORT_RUNS * len(REPORTS)} "
        "runs of `smm-router --help` between the reports' runs (the interpreter and imports)"
    )
    problems = [f"{f.orders:,} orders: {p}" for f in measured for p in f.problems]
    print()
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if not problems:
        print(
            "checks: every balance = its ledger sum = what was filled, before and after the "
            "sync's refunds; every report shows what was filled"
        )
    return 1 if problems else 0


def _sizes(text: str) -> tuple[int, int]:
    parts = [int(part.replace("_", "")) for part in text.split(",")]
    if len(parts) != 2 or min(parts) < 1000:
        raise argparse.ArgumentTypeError("two sizes of at least 1000, e.g. 10000,1000000")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="the two sizes, in orders (default: 10000,1000000)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="length of each status measurement (after 1 s of warm-up)",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="auto",
        help="load generator: wrk (when on PATH), python, or auto",
    )
    parser.add_argument("--sim", nargs=3, metavar=("PORT", "KEY", "ACTIVE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sim:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(sim_main(int(args.sim[0]), args.sim[1], int(args.sim[2])))
        return 0
    return asyncio.run(run(args.sizes, args.generator, args.seconds))


if __name__ == "__main__":
    sys.exit(main())
