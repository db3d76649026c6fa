"""Benchmark at scale: the router's costs at 10k and at 1M orders, side by side.

    make bench-scale        # or: .venv/bin/python -m tests.bench_scale --sizes 10000,1000000
    .venv/bin/python -m tests.bench_scale --sync-only --sizes 100000,1000000   # 10k, 100k active

For each size, a fresh database: five resellers made with `smm-router clients add`, then the
orders filled with SQL through the real schema (tests/bench_fill.py: mostly Completed, 10%
active, some failed, Partial and Canceled with their refunds in the ledger, 0.1% held, at three
providers). Each size has its simulator (a separate process), the upstream of all three
providers, which knows every active order, and its server (`smm-router serve`). Both servers
run at once, idle but for what is measured, and the sizes take turns, so that a burst of load
from elsewhere on the machine falls on both sides of a ratio rather than on one:

- `status` of one ID (random orders of one reseller, one connection): p50 of every request of a
  round, the median of ROUNDS rounds;
- `status` of 100 IDs (random, 64 connections): answers per second, the median of ROUNDS;
- `smm-router providers`, `clients list`, `orders held` with `--json`, each a subprocess timed
  from its start to its exit (median of 3), beside `smm-router --help` (the interpreter and
  imports alone, for scale); their JSON is checked against what was filled;
- `/healthz` and a `/metrics` scrape: p50 of 40 one after another;
- start-up: from `smm-router serve`'s start until /healthz answers (median of 3 starts, the
  other server stopped);
- the sync, one size after the other: every active order made due, the server started, and its
  memory read from /proc/PID/status while its first pass works through them all: VmRSS sampled
  every 20 ms (its peak) and VmHWM (the kernel's high-water mark of the process) at its end.

Each figure at both sizes with the ratio and DESIGN.md's target. A missed target is printed,
not a failure; the ledger (every balance = its ledger sum = what was filled, before and after
the sync's refunds) and the reports' contents are checked, and a mismatch exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
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
from tests.bench_scale_table import HELP, REPORTS, Figures, print_rows, rows, sync_rows

SIM_KEY: Final = "bench-scale-sim-key"
DEFAULT_SIZES: Final = (10_000, 1_000_000)
DEFAULT_SECONDS: Final = 3.0
ROUNDS: Final = 3
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


# --- one size: its database, simulator and server ------------------------------------------------


@dataclass
class Site:
    """One size: where its files and listeners are, what it must hold, what was measured."""

    count: int
    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)  # reseller ID -> API key
    names: dict[int, str] = field(default_factory=dict)
    expected: Expected | None = None
    single: list[str] = field(default_factory=list)  # status bodies: one ID, 100 IDs
    hundred: list[str] = field(default_factory=list)
    figures: Figures = field(init=False)

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in ("sim", "api", "metrics")}
        self.figures = Figures(self.count, active_count(self.count))

    @property
    def database(self) -> Path:
        return self.folder / f"scale-{self.count}.db"

    @property
    def config(self) -> Path:
        return self.folder / f"scale-{self.count}.yaml"

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    @property
    def cli(self) -> list[str]:
        return [sys.executable, "-m", "router"]

    def command(self, *words: str) -> list[str]:
        return [*self.cli, *words, "--config", str(self.config)]

    def sim(self) -> contextlib.AbstractAsyncContextManager[Any]:
        argv = [sys.executable, "-m", "tests.bench_scale", "--sim", str(self.ports["sim"])]
        argv += [SIM_KEY, str(self.figures.active)]
        return process(*argv, ready_url=self.url("sim", "/api/v2"))

    def server(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return process(*self.command("serve"), ready_url=self.url("api", "/healthz"))


async def prepare(folder: Path, count: int) -> Site:
    """A fresh database of `count` orders, its config and the status requests to time."""
    site = Site(count, folder)
    sim_url = site.url("sim", "/api/v2")
    site.config.write_text(
        CONFIG.format(
            database=site.database,
            service=SERVICE,
            api=site.ports["api"],
            metrics=site.ports["metrics"],
            providers="\n".join(
                f'  {p}: {{url: "{sim_url}", key: {SIM_KEY}, timeout: 10}}' for p in PROVIDERS
            ),
            route="\n".join(
                f"      - {{provider: {p}, service: {UPSTREAM_SERVICE}}}" for p in PROVIDERS
            ),
        )
    )
    for name in RESELLERS:
        _, out = await timed_command(
            site.command("clients", "add", name, "--balance", str(TOPUP), "--json")
        )
        made = json.loads(out)
        site.keys[made["id"]], site.names[made["id"]] = made["key"], name
    site.expected = fill(site.database, count, sorted(site.keys), due_at=time.time() + NOT_DUE)
    site.figures.filled = site.expected.filled
    print(f"{count:,} orders: filled in {site.expected.filled:.1f} s", flush=True)
    ok, lines = ledger_check(site.database, site.expected)
    if not ok:
        site.figures.problems += [f"after the fill: {line}" for line in lines]
    # Status of one reseller's orders that it was told about (not failed), at random.
    mine = [
        i for i in range(1, count + 1) if (i // 7) % len(site.keys) == 0 and kind(i) != "failed"
    ]
    rng = random.Random(SEED)
    key = site.keys[min(site.keys)]
    site.single = [
        f"key={key}&action=status&order={rng.choice(mine)}" for _ in range(STATUS_BODIES)
    ]
    site.hundred = [
        f"key={key}&action=status&orders=" + ",".join(map(str, rng.sample(mine, 100)))
        for _ in range(STATUS_BODIES)
    ]
    return site


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


async def time_reports(site: Site) -> dict[str, Any]:
    """One run of each report (its JSON), each followed by `--help`, so that the interpreter's
    own start is measured under the same load; the seconds go to the site's figures."""
    documents: dict[str, Any] = {}
    for name, words in REPORTS.items():
        took, out = await timed_command(site.command(*words, "--json"))
        site.figures.report_runs[name].append(took)
        documents[name] = json.loads(out)
        took, _ = await timed_command([*site.cli, HELP])
        site.figures.report_runs[HELP].append(took)
    return documents


def check_reports(documents: dict[str, Any], site: Site) -> list[str]:
    """What each report printed, against what was filled (the sync has not run yet)."""
    expected = site.expected
    assert expected is not None
    problems = []
    held = documents["orders held"]
    if len(held) != expected.kinds.get("held", 0):
        problems.append(f"orders held lists {len(held)}, filled {expected.kinds.get('held', 0)}")
    listed = {row["name"]: row for row in documents["clients list"]}
    for rid, name in site.names.items():
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


# --- the phases, the sizes taking turns ----------------------------------------------------------


async def while_serving(sites: list[Site], generator: str, seconds: float) -> None:
    """Both servers up (the first start of each timed, one at a time): status, probes, reports."""
    async with contextlib.AsyncExitStack() as servers:
        for site in sites:
            started = await servers.enter_async_context(site.server())
            site.figures.start_ups.append(started.ready_seconds)
        for site in sites:
            await asyncio.to_thread(wait_for_catalogues, site.database)
            answer = await post(site.url("api", "/api/v2"), site.hundred[0])
            found = (
                [v for v in answer.values() if "status" in v] if isinstance(answer, dict) else []
            )
            if len(found) != 100:
                site.figures.problems.append(f"status of 100 IDs found {len(found)}: {answer}")
        for site in sites:
            figures = site.figures
            figures.healthz_p50 = statistics.median(
                await timed_gets(site.url("api", "/healthz"), PROBES)
            )
            figures.metrics_p50 = statistics.median(
                await timed_gets(site.url("metrics", "/metrics"), PROBES)
            )
        for _ in range(ROUNDS):
            for site in sites:
                figures, api = site.figures, site.url("api", "/api/v2")
                load = await measure(
                    api,
                    site.single,
                    connections=1,
                    seconds=seconds,
                    check=b'"status"',
                    generator=generator,
                )
                figures.status_p50s.append(load.p50)
                figures.status_answers += load.answers
                if load.failed:
                    figures.problems.append(f"status of one ID: {load.failed} failed answers")
                load = await measure(
                    api,
                    site.hundred,
                    connections=STATUS_CONNECTIONS,
                    seconds=seconds,
                    check=b'"status"',
                    generator=generator,
                )
                figures.status100_rates.append(load.rate)
                if load.failed:
                    figures.problems.append(f"status of 100 IDs: {load.failed} failed answers")
        documents: list[dict[str, Any]] = [{} for _ in sites]  # each site's last run's
        for _ in range(REPORT_RUNS):
            for index, site in enumerate(sites):
                documents[index] = await time_reports(site)
        for index, site in enumerate(sites):
            site.figures.problems += check_reports(documents[index], site)


async def start_ups(sites: list[Site]) -> None:
    """The other starts of each server, the sizes taking turns, one server up at a time."""
    for _ in range(START_RUNS - 1):
        for site in sites:
            async with site.server() as started:
                site.figures.start_ups.append(started.ready_seconds)


async def sync_pass(site: Site) -> None:
    """Every active order due, a fresh server, its memory until its first pass has ended."""
    due = make_active_due(site.database)
    if due != site.figures.active:
        site.figures.problems.append(f"{due} active orders made due, filled {site.figures.active}")
    async with site.server() as started:
        await watch_sync(started.child.pid, site.url("metrics", "/metrics"), site.figures)
    assert site.expected is not None
    ok, lines = ledger_check(site.database, site.expected, synced=True)
    if not ok:
        site.figures.problems += [f"after the sync: {line}" for line in lines]


async def run(sizes: tuple[int, int], generator: str, seconds: float, *, sync_only: bool) -> int:
    generator = resolve(generator)
    print(
        f"load generator: {describe(generator)}; load average before: {load_average()}", flush=True
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        sites = [await prepare(Path(folder), size) for size in sizes]
        async with contextlib.AsyncExitStack() as sims:
            for site in sites:
                await sims.enter_async_context(site.sim())
            if not sync_only:
                await while_serving(sites, generator, seconds)
                await start_ups(sites)
            for site in sites:
                await sync_pass(site)
    print(f"load average after: {load_average()}; {time.perf_counter() - started:.0f} s in all")
    print()
    small, large = (site.figures for site in sites)
    if sync_only:
        print_rows(sync_rows(small, large), sizes)
    else:
        print_rows(rows(small, large, rounds=ROUNDS, probes=PROBES, starts=START_RUNS), sizes)
        print(
            f"beyond --help: a report's wall time less the median of {REPORT_RUNS * len(REPORTS)} "
            "runs of `smm-router --help` between the reports' runs (the interpreter and imports)"
        )
    problems = [f"{site.count:,} orders: {p}" for site in sites for p in site.figures.problems]
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
    if len(parts) != 2 or min(parts) < 1000 or parts[0] == parts[1]:
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
        help=f"length of each of the {ROUNDS} rounds of a status measurement (after 1 s warm-up)",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="auto",
        help="load generator: wrk (when on PATH), python, or auto",
    )
    parser.add_argument(
        "--sync-only",
        action="store_true",
        help="measure only the sync pass and its memory (the fill, then each size's pass)",
    )
    parser.add_argument("--sim", nargs=3, metavar=("PORT", "KEY", "ACTIVE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sim:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(sim_main(int(args.sim[0]), args.sim[1], int(args.sim[2])))
        return 0
    return asyncio.run(run(args.sizes, args.generator, args.seconds, sync_only=args.sync_only))


if __name__ == "__main__":
    sys.exit(main())
