"""Fixtures: real simulated providers and the real router app, on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client import CollectorRegistry

from router import v2
from router.api import hash_key
from router.app import STORE, ApiRunner, create_app
from router.config import Config, Listener, Provider, Route, Secret, Service, Sync
from router.sim import SimProvider
from router.store import Store

SIM_KEY = "sim-secret-key-0123456789"


def service(
    service_id: int,
    route: Iterable[tuple[str, int]],
    *,
    type: str = "Default",
    rate: str = "1.00",
    min: int = 10,
    max: int = 10000,
    refill: bool = True,
    cancel: bool = True,
    dripfeed: bool = False,
) -> Service:
    return Service(
        id=service_id,
        name=f"Service {service_id}",
        category="Tests",
        type=type,
        rate=Decimal(rate),
        min=min,
        max=max,
        refill=refill,
        cancel=cancel,
        dripfeed=dripfeed,
        route=tuple(Route(provider, upstream) for provider, upstream in route),
    )


def build_config(
    database: Path,
    providers: dict[str, str],
    services: Iterable[Service],
    *,
    timeout: float = 2.0,
) -> Config:
    """A config whose providers (name -> URL) all use SIM_KEY."""
    return Config(
        listen=Listener("127.0.0.1", 0),
        metrics=Listener("127.0.0.1", 0),
        database=database,
        currency="USD",
        providers=MappingProxyType(
            {
                name: Provider(name=name, url=url, key=Secret(SIM_KEY), timeout=timeout)
                for name, url in providers.items()
            }
        ),
        services=MappingProxyType({s.id: s for s in services}),
        sync=Sync(status_interval=0.2, balance_interval=0.2, catalogue_interval=0.2),
    )


@dataclass
class Router:
    """The router under test, with helpers to call its v2 API in any encoding."""

    client: TestClient[web.Request, web.Application]
    config: Config
    registry: CollectorRegistry
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[return-value]

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def reseller(self, name: str = "acme", balance: str = "100") -> str:
        key = f"key-of-{name}-{len(self.keys)}"
        await self.store.create_reseller(name, hash_key(key), v2.to_minor(Decimal(balance)))
        self.keys[name] = key
        return key

    async def call(self, encoding: str = "form", /, path: str = "/api/v2", **params: Any) -> Any:
        """One v2 request; returns the decoded JSON after checking HTTP 200 + JSON type."""
        response = await self.raw(encoding, path, **params)
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        return await response.json()

    async def raw(
        self, encoding: str = "form", /, path: str = "/api/v2", **params: Any
    ) -> aiohttp.ClientResponse:
        fields = {k: str(v) for k, v in params.items()}
        if encoding == "get":
            return await self.client.get(path, params=fields)
        if encoding == "form":
            return await self.client.post(path, data=fields)
        if encoding == "multipart":
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, value)
            form._is_multipart = True  # force multipart/form-data even without files
            return await self.client.post(path, data=form)
        if encoding == "json":
            return await self.client.post(
                path,
                data=json.dumps(fields),
                headers={"Content-Type": "application/json"},
            )
        raise ValueError(encoding)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class RouterTestServer(TestServer):
    """The test server of the router's app, run as `serve` runs it (ApiRunner)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ApiRunner(self.app, **kwargs)


SimFactory = Callable[..., Awaitable[SimProvider]]
RouterFactory = Callable[..., Awaitable[Router]]


@pytest.fixture
async def start_sim() -> AsyncIterator[SimFactory]:
    """Start simulated providers on ephemeral loopback ports; stopped at teardown."""
    sims: list[SimProvider] = []

    async def start(**kwargs: Any) -> SimProvider:
        kwargs.setdefault("key", SIM_KEY)
        sim = SimProvider(**kwargs)
        await sim.start()
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def start_router(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> RouterFactory:
    """Start the router app against the given providers (name -> URL) and services."""

    async def start(
        providers: dict[str, str],
        services: Iterable[Service],
        *,
        upstream_timeout: float = 2.0,
        background: bool = False,  # True: the app's background loops run too
        spend_caps: dict[str, str] | None = None,  # provider -> its daily_spend_cap
        **changes: Any,  # Config fields to replace, e.g. sync=Sync(...), fx={...}
    ) -> Router:
        config = build_config(tmp_path / "router.db", providers, services, timeout=upstream_timeout)
        if spend_caps:
            capped = {
                name: dataclasses.replace(p, daily_spend_cap=Decimal(spend_caps[name]))
                if name in spend_caps
                else p
                for name, p in config.providers.items()
            }
            config = dataclasses.replace(config, providers=MappingProxyType(capped))
        config = dataclasses.replace(config, **changes)
        registry = CollectorRegistry()
        app = create_app(config, background=background, registry=registry)
        client = await aiohttp_client(RouterTestServer(app))
        return Router(client, config, registry)

    return start


def free_port() -> int:
    """A loopback port with nothing listening on it (for `unreachable`)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def free_block(count: int) -> int:
    """The first of `count` consecutive loopback ports that are all free, below the range the
    system hands out to outgoing connections, where another process is less likely to take one."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20000, 32000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no block of free ports")


async def wait_for(check: Callable[[], Any], what: str, within: float = 15.0) -> None:
    """Poll `check` (sync or async) until it is true; fail after `within` seconds (a deadline
    for something that should happen soon, not a timing)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
