"""Benchmark: the router against the yardstick of DESIGN.md, a bare aiohttp pass-through proxy.

    make bench                      # or: .venv/bin/python -m tests.bench --orders 5000

Starts, as separate processes on loopback, a simulated provider (answers at once), the router
(`smm-router serve` on a fresh SQLite file) and a bare proxy that forwards each request to the
simulator with one shared session. Then it fires `add`s at each with N concurrent connections
and prints orders per second, and the rates of `status` (100 IDs), `services` and `balance`,
which the router answers from SQLite and memory. It checks the ledger afterwards: the balance
must equal the sum of the ledger and every order must be accounted for.

Figures depend on the machine and on the load generator sharing its cores; compare the two
columns of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import aiohttp
from aiohttp import web

from router import v2
from router.store import Store

SIM_KEY = "bench-sim-key"
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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def process(*argv: str, ready_url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process, up once `ready_url` answers; killed at exit."""
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(ready_url) as response:
                        await response.read()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"{argv} did not come up")
        yield child
    finally:
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


async def hammer(
    url: str, requests: int, connections: int, fields: Callable[[int], dict[str, str]]
) -> tuple[float, list[object]]:
    """`requests` POSTs over `connections` concurrent connections: (requests/s, answers)."""
    answers: list[object] = [None] * requests
    next_index = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for index in next_index:
                async with session.post(url, data=fields(index)) as response:
                    answers[index] = json.loads(await response.read())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, answers


async def run(orders: int, connections: int) -> int:
    python = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        ports = {name: free_port() for name in ("sim", "api", "metrics", "proxy")}
        config = Path(folder) / "bench.yaml"
        config.write_text(CONFIG.format(database=Path(folder) / "bench.db", key=SIM_KEY, **ports))
        cli = [python, "-m", "router"]
        added = await asyncio.create_subprocess_exec(
            *cli, "clients", "add", "bench", "--balance", "100000000", "--json",
            "--config", str(config), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await added.communicate()
        key = json.loads(out)["key"]
        sim_url = f"http://127.0.0.1:{ports['sim']}/api/v2"
        sim = [*cli, "sim", "--port", str(ports["sim"]), "--key", SIM_KEY]
        sim += ["--balance", "100000000", "--progress-seconds", "3600"]
        api = f"http://127.0.0.1:{ports['api']}/api/v2"
        proxy = f"http://127.0.0.1:{ports['proxy']}/api/v2"
        add = {"action": "add", "service": "1", "link": "https://x.example/p", "quantity": "100"}

        def router_add(_: int) -> dict[str, str]:
            return {"key": key, **add}

        def proxy_add(_: int) -> dict[str, str]:
            return {"key": SIM_KEY, **add, "service": "101"}

        async with (
            process(*sim, ready_url=sim_url),
            process(*cli, "serve", "--config", str(config), ready_url=api.replace(
                "/api/v2", "/healthz")),
            process(python, "-m", "tests.bench", "--proxy", str(ports["proxy"]), sim_url,
                    ready_url=proxy),
        ):  # fmt: skip
            await hammer(proxy, 200, connections, proxy_add)  # warm both up
            await hammer(api, 200, connections, router_add)
            proxy_rate, _ = await hammer(proxy, orders, connections, proxy_add)
            router_rate, answers = await hammer(api, orders, connections, router_add)
            ids = [a["order"] for a in answers if isinstance(a, dict) and "order" in a]
            batch = ",".join(str(i) for i in ids[:100])
            reads: dict[str, Callable[[int], dict[str, str]]] = {
                "status (100 IDs)": lambda _: {"key": key, "action": "status", "orders": batch},
                "services": lambda _: {"key": key, "action": "services"},
                "balance": lambda _: {"key": key, "action": "balance"},
            }
            read_rates = {
                name: (await hammer(api, orders, connections, fields))[0]
                for name, fields in reads.items()
            }
        store = await Store.open(Path(folder) / "bench.db")
        try:
            reseller = await store.reseller_by_name("bench")
            assert reseller is not None
            ledger = await store.ledger_sum(reseller.id)
            placed = (await store.count_orders(reseller.id)).get("placed", 0)
        finally:
            await store.close()

    print(
        f"orders per run: {orders}, concurrent connections: {connections}, cores: {os.cpu_count()}"
    )
    print(f"{'':24}{'per second':>12}")
    print(f"{'bare proxy, add':24}{proxy_rate:12.0f}")
    print(f"{'router, add':24}{router_rate:12.0f}   ({router_rate / proxy_rate:.0%} of the proxy)")
    for name, rate in read_rates.items():
        print(f"{'router, ' + name:24}{rate:12.0f}")
    expected = Decimal(100_000_000) - Decimal("0.1") * placed
    exact = ledger == reseller.balance == v2.to_minor(expected)
    balance = v2.format_money(reseller.balance)
    print(f"orders placed: {placed} of {orders + 200} sent; balance {balance}"
          f" = ledger sum: {'yes' if exact else 'NO'}")  # fmt: skip
    return 0 if exact and placed == orders + 200 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=3000, help="requests per measurement")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--proxy", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(proxy_main(int(args.proxy[0]), args.proxy[1]))
        return 0
    return asyncio.run(run(args.orders, args.connections))


if __name__ == "__main__":
    sys.exit(main())
