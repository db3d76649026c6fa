"""`smm-router demo`: simulated providers, the router and a demo reseller, in one process.

The providers of the config whose URL points at this machine are started as simulators, in
the order of the file: the first healthy, the second out of funds on upstream service 101, the
third flaky (refusals, 502 pages and answers slower than the router waits for). The flaky one's
draws are seeded (FLAKY_SEED) so that the demo tells the same story each run: with
config/router.yaml, the first order on service 1 is refused by the flaky provider and fails
over; by the fifth, three of its answers were failures and its breaker opens (`smm-router
routes 1` shows it `open`); 30 s later a balance call probes it and it is `healthy` again.

Ports are the config's, or with `--port N`: the API on N, metrics on N+1 and the simulated
providers on N+2, N+3, ... in the order of the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from decimal import Decimal
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from router import v2
from router.app import serve
from router.cli import CommandError, new_key
from router.config import Config
from router.keys import hash_key
from router.listeners import ListenError
from router.sim import Fault, SimProvider
from router.store import Store

DEMO_RESELLER: Final = "demo"
DEMO_BALANCE: Final = Decimal("100")
DEMO_PROGRESS_SECONDS: Final = 120.0
LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
METRICS_PORT_OFFSET: Final = 1  # with --port N: metrics on N+1,
FIRST_PROVIDER_PORT_OFFSET: Final = 2  # the simulated providers on N+2, N+3, ...
MAX_PORT: Final = 65535
FLAKY_POSITION: Final = 2
# The flaky provider's first add answers: refuse, 502, accept, slow, slow, ... (see the docstring).
FLAKY_SEED: Final = 4


def local_providers(config: Config) -> list[tuple[str, int, str]]:
    """(name, port, key) of each provider this machine should simulate, in config order."""
    found = []
    for name, provider in config.providers.items():
        url = urlsplit(provider.url)
        if url.hostname in LOCAL_HOSTS and url.port:
            found.append((name, url.port, provider.key.value))
    return found


def with_ports(config: Config, port: int) -> Config:
    """The config with every port the demo opens following from `port` (see the docstring)."""
    local = [name for name, _, _ in local_providers(config)]
    last = port + FIRST_PROVIDER_PORT_OFFSET + len(local) - 1
    if last > MAX_PORT:
        raise CommandError(
            f"--port {port}: the demo needs ports {port} to {last}; "
            f"pass a --port of at most {MAX_PORT - last + port}"
        )
    providers = dict(config.providers)
    for offset, name in enumerate(local, start=FIRST_PROVIDER_PORT_OFFSET):
        url = urlsplit(providers[name].url)
        netloc = f"{url.hostname}:{port + offset}"
        if url.hostname and ":" in url.hostname:  # IPv6: [::1]:port
            netloc = f"[{url.hostname}]:{port + offset}"
        providers[name] = dataclasses.replace(
            providers[name], url=url._replace(netloc=netloc).geturl()
        )
    return dataclasses.replace(
        config,
        listen=dataclasses.replace(config.listen, port=port),
        metrics=dataclasses.replace(config.metrics, port=port + METRICS_PORT_OFFSET),
        providers=MappingProxyType(providers),
    )


def _faults(position: int, sim: SimProvider, slow_seconds: float) -> str:
    if position == 1:
        sim.set_fault(101, Fault.NO_FUNDS)
        return "out of funds on service 101"
    if position == FLAKY_POSITION:
        sim.set_fault(None, Fault.FLAKY)
        return f"flaky: refusals, 502 pages, answers after {slow_seconds:g}s"
    return "healthy"


async def ensure_demo_reseller(config: Config) -> tuple[str, str]:
    """Create the demo reseller (or give it a new key): (key, what happened)."""
    store = await Store.open(config.database)
    try:
        key = new_key()
        if await store.reseller_by_name(DEMO_RESELLER) is None:
            await store.create_reseller(DEMO_RESELLER, hash_key(key), v2.to_minor(DEMO_BALANCE))
            return key, f"created reseller '{DEMO_RESELLER}' with {DEMO_BALANCE} {config.currency}"
        await store.set_key_hash(DEMO_RESELLER, hash_key(key))
        return key, f"reseller '{DEMO_RESELLER}' exists; it has a new key for this run"
    finally:
        await store.close()


async def run(config: Config, *, port: int | None = None) -> None:
    """Start the simulators and the router; print how to place an order; serve until cancelled.

    `port` (the command's `--port`) moves every port the demo opens (see `with_ports`); a port
    that cannot be had is a ListenError naming the setting to change.
    """
    if port is None:
        await _run(config)
        return
    try:
        await _run(with_ports(config, port))
    except ListenError as exc:
        offset = exc.port - port
        source = f"--port {port}" + (f" + {offset}" if offset else "")
        raise exc.port_chosen_by("--port", source) from exc


async def _run(config: Config) -> None:
    sims: list[SimProvider] = []
    lines = []
    try:
        for position, (name, port, key) in enumerate(local_providers(config)):
            timeout = config.providers[name].timeout
            slow = timeout + 2
            seed = FLAKY_SEED if position == FLAKY_POSITION else position
            sim = SimProvider(
                key=key, progress_seconds=DEMO_PROGRESS_SECONDS, slow_seconds=slow, seed=seed
            )
            what = _faults(position, sim, slow)
            await sim.start(
                port=port,
                port_setting=f"providers.{name}.url",
                host_setting=f"providers.{name}.url",
            )
            sims.append(sim)
            lines.append(f"  provider {name}: simulated at {sim.url} ({what})")
        key, what = await ensure_demo_reseller(config)
        api = f"http://{config.listen.host}:{config.listen.port}/api/v2"
        first = next(iter(config.services.values()))

        async def ready(app: web.Application) -> None:
            print("smm-router demo is running. Ctrl-C stops it.")
            print("\n".join(lines))
            print(f"  router API: {api}")
            print(f"  metrics:    http://{config.metrics.host}:{config.metrics.port}/metrics")
            print(f"  {what}; API key: {key}")
            print("Place an order:")
            print(
                f"  curl -s {api} -d key={key} -d action=add -d service={first.id} "
                f"-d link=https://instagram.com/smm_router_demo -d quantity={first.min}"
            )
            print("Then ask for its status:")
            print(f"  curl -s {api} -d key={key} -d action=status -d order=1")
            print(
                f"Watch routing: place a few more (flaky providers get their breaker opened), "
                f"then: smm-router routes {first.id}"
            )

        await serve(config, ready=ready)
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.stop()
        await asyncio.sleep(0)
