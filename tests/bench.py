"""Benchmark: the router against the yardstick of DESIGN.md, a bare aiohttp pass-through proxy.

    make bench                      # or: .venv/bin/python -m tests.bench --seconds 8 --rounds 5

Starts, as separate processes on loopback, a simulated provider (answers at once), the router
(`smm-router serve` on a fresh SQLite file) and a bare proxy that forwards each request to the
simulator with one shared session. Then it measures both side by side, the proxy first and the
router right after, with the same load generator (tests/bench_load.py: wrk when it is on PATH,
else a Python one; the output names it): `add` over 64 connections and over one, `status` of
100 IDs, `services` and `balance`, with the CPU each server spent per answer. All of that is
done `--rounds` times in turn: this machine's speed drifts by tens of percent from one minute
to the next, a proxy-then-router pair much less. It prints every target of DESIGN.md
"Performance" as a ratio against the proxy of the same pair, in one table: each target's median
round, beside every round's ratio; a missed target is printed, not a failure. Latency
percentiles come from the generator's timing of each request.

Then it writes 300 orders one at a time through the store alone, on a copy of the database:
the floor under a one-connection `add` (two durable commits an order). And it prints the CPU an
`add` costs the machine (the server's and the simulator's) for proxy and router, with the most
of the proxy's rate the router could reach with every core busy: a ceiling no spreading of the
router over processes or threads could pass.

Then it checks the ledger: the balance must equal the sum of the ledger and the starting
balance less every placed order's charge, and every order must be placed. Exit 1 if not.

Figures depend on the machine and on what else runs on its cores (the load average is printed):
compare the two columns of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from router import v2
from router.store import Attempt, NewOrder, Store
from tests.bench_load import GENERATORS, WARM_UP_SECONDS, Load, describe, measure, resolve

SIM_KEY: Final = "bench-sim-key"
START_BALANCE: Final = 100_000_000  # the bench reseller's, in `currency`
CHARGE: Final = Decimal("0.1")  # quantity 100 at rate 1.00 per 1000
IDS_PER_STATUS: Final = v2.MAX_IDS_PER_REQUEST
DEFAULT_SECONDS: Final = 3.0
DEFAULT_ROUNDS: Final = 3
DEFAULT_CONNECTIONS: Final = 64
READY_POLL_SECONDS: Final = 0.01
READY_TIMEOUT_SECONDS: Final = 60.0
STOP_TIMEOUT_SECONDS: Final = 15.0
ADD_UNDER_LOAD: Final = "add, 64 connections"
FLOOR_ORDERS: Final = 300  # orders written one after another for the store's floor
CONFIG = """\
listen: {{host: 127.0.0.1, port: {api}}}
metrics: {{host: 127.0.0.1, port: {metrics}}}
database: {database}
currency: USD
providers:
  sim: {{url: "http://127.0.0.1:{sim}/api/v2", key: {key}, timeout: 10}}
sync: {{status_interval: 3600, balance_interval: 3600, catalogue_interval: 3600}}
# One key at full speed is what is measured: its request limits must not be what stops it.
limits: {{add: 1000000, status: 1000000, other: 1000000, in_flight: 10000}}
services:
  1:
    name: Bench Followers
    category: Bench
    type: Default
    rate: "1.00"
    min: 10
    max: 100000
    route:
      - {{provider: sim, service: 101}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Running:
    """A child process and how long it took from its start until its ready URL answered."""

    child: asyncio.subprocess.Process
    ready_seconds: float


async def wait_ready(url: str) -> None:
    """Until a GET of `url` gets an HTTP answer (any status)."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{url} did not answer in {READY_TIMEOUT_SECONDS:.0f} s"
                    ) from None
                await asyncio.sleep(READY_POLL_SECONDS)


@asynccontextmanager
async def process(
    *argv: str,
    ready_url: str,
    stdout: int | None = asyncio.subprocess.DEVNULL,
    stderr: IO[bytes] | int = asyncio.subprocess.DEVNULL,
) -> AsyncIterator[Running]:
    """A child process, up once `ready_url` answers; stopped at exit."""
    started = time.perf_counter()
    child = await asyncio.create_subprocess_exec(*argv, stdout=stdout, stderr=stderr)
    try:
        await wait_ready(ready_url)
        yield Running(child, time.perf_counter() - started)
    finally:
        if child.returncode is None:  # SIGTERM: the router stops as it does in production
            child.terminate()
        try:
            await asyncio.wait_for(child.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            child.kill()
            await child.wait()


async def proxy_main(port: int, upstream: str) -> None:
    """The yardstick: forward each request's form to the upstream, answer with its body."""
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        form = await request.post()
        async with session.post(upstream, data=dict(form)) as response:
            body = await response.read()
        return web.Response(body=body, content_type="application/json")

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/api/v2", forward)
    app.router.add_get("/api/v2", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def form(**fields: str) -> str:
    return urlencode(fields)


async def post(url: str, body: str) -> object:
    """One request, its JSON answer: the bench looks at an answer before it times many."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as response,
    ):
        return json.loads(await response.read())


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user and system, every thread) the process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    """One server's load, and the CPU it spent per good answer (None where unknown)."""

    load: Load
    cpu_per_answer: float | None
    # The server's and the simulator's together: what each answer costs the machine's cores.
    pair_cpu_per_answer: float | None


async def measured(
    url: str,
    body: str,
    *,
    pid: int,
    upstream_pid: int,
    connections: int,
    seconds: float,
    check: bytes,
    generator: str,
) -> Measured:
    """`measure`, with the CPU the server `pid` (and it with its upstream, `upstream_pid`)
    spent over the measured seconds (the warm-up is run first, apart, so that its answers are
    not counted against it)."""

    def load_for(length: float) -> Awaitable[Load]:
        return measure(
            url, [body], connections=connections, seconds=length, check=check,
            generator=generator, warm_up=0,
        )  # fmt: skip

    def per_answer(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None or not good else (after - before) / good

    await load_for(WARM_UP_SECONDS)
    before, upstream_before = cpu_seconds(pid), cpu_seconds(upstream_pid)
    load = await load_for(seconds)
    after, upstream_after = cpu_seconds(pid), cpu_seconds(upstream_pid)
    good = load.answers - load.failed
    server = per_answer(before, after)
    upstream = per_answer(upstream_before, upstream_after)
    return Measured(load, server, None if server is None or upstream is None else server + upstream)


async def store_floor(database: Path, folder: Path) -> str:
    """What one order's two durable writes cost in the store alone, one order at a time: the
    reserve and the settle of `add`, through the store's writer, with nothing else running.
    On a copy of the bench's database (its schema, its triggers, its size), once the router
    has stopped. No router can answer one connection's `add` faster than this plus the
    pass-through's own time."""
    copy = folder / "floor.db"
    shutil.copyfile(database, copy)
    store = await Store.open(copy)
    reserve, settle = [], []
    try:
        reseller = await store.reseller_by_name("bench")
        assert reseller is not None
        for n in range(FLOOR_ORDERS):
            started = time.perf_counter()
            order_id = await store.reserve_order(
                NewOrder(
                    reseller.id,
                    1,
                    "https://x.example/p",
                    100,
                    v2.to_minor(CHARGE),
                    {"link": "https://x.example/p", "quantity": "100"},
                    "sim",
                    101,
                )
            )
            reserved = time.perf_counter()
            assert order_id is not None
            attempt = Attempt(1, "sim", 101, time.time(), 0.001, "accepted", None, 10**9 + n)
            await store.settle_order(
                order_id,
                state="placed",
                attempts=[attempt],
                provider="sim",
                upstream_service=101,
                upstream_order=10**9 + n,
            )
            reserve.append(reserved - started)
            settle.append(time.perf_counter() - reserved)
    finally:
        await store.close()
    total = [a + b for a, b in zip(reserve, settle, strict=True)]
    return (
        f"p50 {ms(statistics.median(total))} per order (reserve {ms(statistics.median(reserve))}"
        f", settle {ms(statistics.median(settle))}; {FLOOR_ORDERS} orders one at a time, two "
        "durable commits each, through the store's writer and nothing else)"
    )


@dataclass(frozen=True)
class Target:
    """One row of the closing table."""

    name: str
    measured: str
    baseline: str
    ratio: str
    met: bool
    score: float  # what `met` compares (a share, a multiple, milliseconds, a rate): rounds' median


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def per_second(rate: float) -> str:
    return f"{rate:,.0f}/s"


def targets(loads: dict[str, tuple[Load, Load]]) -> list[Target]:
    """DESIGN.md "Performance", each as measured against the proxy's figure of the same run."""
    proxy, router = loads[ADD_UNDER_LOAD]
    share, times = router.rate / proxy.rate, router.p99 / proxy.p99
    rows = [
        Target(
            "add rate (64 conn.) >= 50% of pass-through",
            per_second(router.rate),
            per_second(proxy.rate),
            f"{share:.0%}",
            share >= 0.5,
            share,
        ),
        Target(
            "add p99 (64 conn.) <= 2x pass-through",
            ms(router.p99),
            ms(proxy.p99),
            f"{times:.2f}x",
            times <= 2,
            times,
        ),
    ]
    proxy, router = loads["add, 1 connection"]
    extra = router.p50 - proxy.p50
    rows.append(
        Target(
            "add p50 (1 conn.) <= pass-through + 1 ms",
            ms(router.p50),
            ms(proxy.p50),
            f"{extra * 1000:+.2f} ms",
            extra <= 0.001,
            extra,
        )
    )
    proxy, router = loads["status, 100 IDs"]
    rows.append(
        Target(
            "status (100 IDs) >= 1,000/s",
            per_second(router.rate),
            f"{per_second(proxy.rate)} (for scale)",
            f"{router.rate / 1000:.0%} of 1,000/s",
            router.rate >= 1000,
            router.rate,
        )
    )
    for action in ("services", "balance"):
        proxy, router = loads[action]
        share = router.rate / proxy.rate
        rows.append(
            Target(
                f"{action} rate >= 50% of pass-through",
                per_second(router.rate),
                per_second(proxy.rate),
                f"{share:.0%}",
                share >= 0.5,
                share,
            )
        )
    return rows


def across_rounds(rounds: list[list[Target]]) -> list[tuple[Target, list[str]]]:
    """Each target's median round (by its score), with every round's ratio: the machine's
    speed drifts from one measurement to the next, a round's pair much less."""
    return [
        (sorted(each, key=lambda t: t.score)[len(each) // 2], [t.ratio for t in each])
        for each in zip(*rounds, strict=True)
    ]


def print_targets(rows: list[tuple[Target, list[str]]]) -> None:
    header = ("target (median round)", "measured", "baseline", "ratio", "met", "every round")
    cells = [
        header,
        *(
            (r.name, r.measured, r.baseline, r.ratio, "yes" if r.met else "no", " | ".join(each))
            for r, each in rows
        ),
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def print_load(name: str, who: str, measured: Measured) -> None:
    load = measured.load
    failed = f", {load.failed} FAILED" if load.failed else ""
    cpu = "" if measured.cpu_per_answer is None else f", CPU {ms(measured.cpu_per_answer)}/answer"
    print(
        f"  {name:<22} {who:<13} {load.rate:9,.0f}/s  p50 {ms(load.p50):>9}  "
        f"p90 {ms(load.p90):>9}  p99 {ms(load.p99):>9}  "
        f"({load.answers:,} answers in {load.seconds:.1f} s{failed}{cpu})"
    )


def cpu_ceiling(rounds: list[tuple[Measured, Measured]]) -> str:
    """The CPU an `add` costs the machine (server and simulator; the load generator's own is
    left out, so the bound is generous), proxy against router, and the most of the proxy's
    rate that the router could reach if it kept every core busy, spread over any number of
    processes: the cores divided by its CPU per add."""
    cores = os.cpu_count() or 1
    shares = [
        (proxy.pair_cpu_per_answer, router.pair_cpu_per_answer,
         cores / router.pair_cpu_per_answer / proxy.load.rate)
        for proxy, router in rounds
        if proxy.pair_cpu_per_answer and router.pair_cpu_per_answer and proxy.load.rate
    ]  # fmt: skip
    if not shares:
        return "CPU per add: unknown here (no /proc)"
    proxy_cpu, router_cpu, share = sorted(shares, key=lambda each: each[2])[len(shares) // 2]
    every = " | ".join(f"{each[2]:.0%}" for each in shares)
    return (
        f"CPU per add ({ADD_UNDER_LOAD}), server and simulator together: pass-through "
        f"{ms(proxy_cpu)}, router {ms(router_cpu)}. With all {cores} cores busy, in any number "
        f"of processes, the router's add rate could reach at most {share:.0%} of the "
        f"pass-through's (median round; every round: {every})"
    )


def store_closed(log: Path) -> dict[str, Any]:
    """The `store_closed` line the router logs as it stops (empty if there is none)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "store_closed":
                return entry
    return {}


def commits_of(closed: dict[str, Any]) -> str:
    """Writes per commit, from the `store_closed` line."""
    if "commits" not in closed:
        return "unknown (the router logged no store_closed line)"
    commits, writes = int(closed["commits"]), int(closed["writes"])
    return (
        f"{commits:,} commits for {writes:,} writes: {writes / max(commits, 1):.1f} writes per "
        f"commit (an order is two: its reserve and its settle)"
    )


def writer_of(closed: dict[str, Any]) -> str:
    """The writer's time per batch, from the same line: the wall time of a batch beyond its
    thread's CPU is waiting, for the disk (its commit) and for the GIL."""
    if "writer_busy_seconds" not in closed:
        return "unknown (the router logged no store_closed line with the writer's times)"
    batches = max(int(closed["batches"]), 1)
    busy, cpu = float(closed["writer_busy_seconds"]), float(closed["writer_cpu_seconds"])
    return (
        f"over the whole run (every load, one connection too), {batches:,} batches, "
        f"{1000 * busy / batches:.2f} ms each, of which {1000 * cpu / batches:.2f} ms is its "
        f"thread's CPU; the rest ({1 - cpu / max(busy, 1e-9):.0%}) is waiting: for each "
        f"commit's fsync, and for the GIL while the event loop's thread runs Python"
    )


def ledger_check(database: Path) -> tuple[bool, str]:
    """The bench reseller's balance against its ledger and its placed orders."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        [(balance, ledger, placed, orders)] = db.execute(
            "SELECT r.balance, (SELECT coalesce(sum(amount), 0) FROM ledger l "
            "WHERE l.reseller_id = r.id), (SELECT count(*) FROM orders o "
            "WHERE o.reseller_id = r.id AND o.state = 'placed'), (SELECT count(*) FROM orders o "
            "WHERE o.reseller_id = r.id) FROM resellers r WHERE r.name = 'bench'"
        ).fetchall()
    expected = v2.to_minor(Decimal(START_BALANCE) - CHARGE * placed)
    exact = balance == ledger == expected and placed == orders
    text = (
        f"orders: {orders:,}, placed: {placed:,}; balance {v2.format_money(balance)}, "
        f"ledger sum {v2.format_money(ledger)}, expected {v2.format_money(expected)}: "
        f"{'exact' if exact else 'NOT EXACT'}"
    )
    return exact, text


async def run(seconds: float, connections: int, generator: str, rounds_wanted: int) -> int:
    python = sys.executable
    generator = resolve(generator)
    with tempfile.TemporaryDirectory() as folder:
        ports = {name: free_port() for name in ("sim", "api", "metrics", "proxy")}
        config = Path(folder) / "bench.yaml"
        database = Path(folder) / "bench.db"
        router_log = Path(folder) / "router.log"
        router_err = router_log.open("wb")  # closed once the router has stopped
        config.write_text(CONFIG.format(database=database, key=SIM_KEY, **ports))
        cli = [python, "-m", "router"]
        made = [*cli, "clients", "add", "bench", "--balance", str(START_BALANCE), "--json"]
        added = await asyncio.create_subprocess_exec(
            *made, "--config", str(config), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await added.communicate()
        key = json.loads(out)["key"]
        sim_url = f"http://127.0.0.1:{ports['sim']}/api/v2"
        sim = [*cli, "sim", "--port", str(ports["sim"]), "--key", SIM_KEY]
        sim += ["--balance", "100000000", "--progress-seconds", "3600"]
        api = f"http://127.0.0.1:{ports['api']}/api/v2"
        proxy = f"http://127.0.0.1:{ports['proxy']}/api/v2"
        add = {"action": "add", "link": "https://x.example/p", "quantity": "100"}
        bodies: dict[str, tuple[str, str, bytes]] = {  # proxy's, router's, a good answer's text
            "add": (
                form(key=SIM_KEY, service="101", **add),
                form(key=key, service="1", **add),
                b'"order"',
            ),
            "services": (
                form(key=SIM_KEY, action="services"),
                form(key=key, action="services"),
                b'"service"',
            ),
            "balance": (
                form(key=SIM_KEY, action="balance"),
                form(key=key, action="balance"),
                b'"balance"',
            ),
        }
        print(
            f"load generator: {describe(generator)}; cores: {os.cpu_count()}; "
            f"load average before: {load_average()}; {seconds:.0f} s per measurement "
            f"after {WARM_UP_SECONDS:.0f} s of warm-up"
        )
        async with (
            process(*sim, ready_url=sim_url) as sim_process,
            process(
                *cli,
                "serve",
                "--config",
                str(config),
                ready_url=api.replace("/api/v2", "/healthz"),
                stderr=router_err,
            ) as router_process,
            process(
                python,
                "-m",
                "tests.bench",
                "--proxy",
                str(ports["proxy"]),
                sim_url,
                ready_url=proxy,
            ) as proxy_process,
        ):
            pids = {proxy: proxy_process.child.pid, api: router_process.child.pid}
            rounds: list[dict[str, tuple[Load, Load]]] = []
            add_cpu: list[tuple[Measured, Measured]] = []  # each round's 64-connection add

            async def pair(
                loads: dict[str, tuple[Load, Load]], name: str, action: str, conns: int
            ) -> None:
                """The proxy, then the router at once: the same load, a moment apart."""
                proxy_body, router_body, good = bodies[action]
                both = [
                    await measured(
                        url,
                        body,
                        pid=pids[url],
                        upstream_pid=sim_process.child.pid,
                        connections=conns,
                        seconds=seconds,
                        check=good,
                        generator=generator,
                    )
                    for url, body in ((proxy, proxy_body), (api, router_body))
                ]
                loads[name] = (both[0].load, both[1].load)
                if name == ADD_UNDER_LOAD:
                    add_cpu.append((both[0], both[1]))
                print_load(name, "pass-through", both[0])
                print_load(name, "router", both[1])

            # The first 100 orders of each: every add before was placed (the ledger check says).
            sim_ids = ",".join(str(1000 + n) for n in range(IDS_PER_STATUS))
            ids = ",".join(str(1 + n) for n in range(IDS_PER_STATUS))
            bodies["status"] = (
                form(key=SIM_KEY, action="status", orders=sim_ids),
                form(key=key, action="status", orders=ids),
                b'"remains"',
            )
            for number in range(1, rounds_wanted + 1):
                print(f"round {number} of {rounds_wanted}")
                loads: dict[str, tuple[Load, Load]] = {}
                await pair(loads, ADD_UNDER_LOAD, "add", connections)
                await pair(loads, "add, 1 connection", "add", 1)
                if number == 1:
                    for url, body in zip((proxy, api), bodies["status"][:2], strict=True):
                        answer = await post(url, body)
                        found = (
                            [v for v in answer.values() if "status" in v]
                            if isinstance(answer, dict)
                            else []
                        )
                        if len(found) != IDS_PER_STATUS:
                            print(
                                f"status of {IDS_PER_STATUS} IDs at {url} found "
                                f"{len(found)}: {answer}"
                            )
                            return 1
                await pair(loads, "status, 100 IDs", "status", connections)
                await pair(loads, "services", "services", connections)
                await pair(loads, "balance", "balance", connections)
                rounds.append(loads)
        exact, ledger = ledger_check(database)
        router_err.close()
        closed = store_closed(router_log)
        commits, writer = commits_of(closed), writer_of(closed)
        floor = await store_floor(database, Path(folder))
    print(f"load average after: {load_average()}")
    print()
    print_targets(across_rounds([targets(loads) for loads in rounds]))
    print()
    print(f"ledger: {ledger}")
    print(f"group commit: {commits}")
    print(f"the writer: {writer}")
    print(f"the store's floor: {floor}")
    print(cpu_ceiling(add_cpu))
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="length of each measurement (after 1 s of warm-up)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="times every pair is measured, in turn; the table shows each target's median round",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help="concurrent connections of the loaded measurements",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="auto",
        help="load generator: wrk (when on PATH), python, or auto",
    )
    parser.add_argument("--proxy", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(proxy_main(int(args.proxy[0]), args.proxy[1]))
        return 0
    return asyncio.run(run(args.seconds, args.connections, args.generator, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
