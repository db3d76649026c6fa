"""Hot reload: SIGHUP and `smm-router reload` re-read the config; a bad one is refused whole.

The signal tests run `smm-router serve` in its own process against real simulators; the others
run the app in this process, reloading it from a file as SIGHUP does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from router import config as config_module
from router import reload, v2
from router.api import hash_key
from router.app import FLEET, LIVE, ORDER_SYNC, create_app, reload_config
from router.config import config_version
from router.sim import Fault
from router.store import Store
from tests.conftest import (
    SIM_KEY,
    Router,
    RouterTestServer,
    SimFactory,
    free_port,
    wait_for,
)

KEY = "reload-test-reseller-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent
WAIT_LIMIT = 30.0  # a process start-up on a slow, busy machine


@dataclass
class Setup:
    """A config file, rewritten by each test, and the ports it names."""

    folder: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)

    @property
    def path(self) -> Path:
        return self.folder / "router.yaml"

    @property
    def database(self) -> Path:
        return self.folder / "router.db"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def pid_file_written(self) -> bool:
        return reload.pid_path(self.database).exists()

    def write(
        self,
        providers: Mapping[str, str],
        services: Mapping[int, tuple[str, Iterable[tuple[str, int]]]],
        *,
        port: int | None = None,
        extra: str = "",
    ) -> str:
        """Write the config: services are ID -> (rate, route); return its text."""
        lines = [
            f"listen: {{host: 127.0.0.1, port: {port or self.port}}}",
            f"metrics: {{host: 127.0.0.1, port: {self.metrics_port}}}",
            "database: router.db",
            "currency: USD",
            "sync: {status_interval: 0.2, balance_interval: 0.2, catalogue_interval: 0.2}",
            "providers:",
            *(
                f'  {name}: {{url: "{url}", key: "{SIM_KEY}", timeout: 5}}'
                for name, url in providers.items()
            ),
            "services:",
        ]
        for service_id, (rate, route) in services.items():
            lines += [
                f"  {service_id}:",
                f"    name: Service {service_id}",
                "    category: Tests",
                "    type: Default",
                f'    rate: "{rate}"',
                "    min: 10",
                "    max: 10000",
                "    route:",
                *(f"      - {{provider: {name}, service: {upstream}}}" for name, upstream in route),
            ]
        text = "\n".join(lines) + "\n" + extra
        self.path.write_text(text)
        return text

    async def reseller(self, balance: str = "100") -> None:
        store = await Store.open(self.database)
        try:
            await store.create_reseller("acme", hash_key(KEY), v2.to_minor(Decimal(balance)))
        finally:
            await store.close()


@asynccontextmanager
async def server(setup: Setup, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m router serve` in its own process, answering; always stopped at the end."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "serve", "--config", str(setup.path),
            stdout=output, stderr=output, cwd=ROOT,
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:

                async def answers() -> bool:
                    assert process.returncode is None, f"the router exited: {log.read_text()}"
                    try:
                        async with http.get(f"{setup.base}/healthz") as response:
                            return response.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_for(answers, "the router to answer /healthz", within=WAIT_LIMIT)
                await wait_for(setup.pid_file_written, "the PID file", within=WAIT_LIMIT)
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


class Api:
    """The running router's v2 API and metrics, over one HTTP session."""

    def __init__(self, http: aiohttp.ClientSession, setup: Setup) -> None:
        self.http = http
        self.setup = setup

    async def call(self, **params: Any) -> Any:
        data = {"key": KEY, **{k: str(v) for k, v in params.items()}}
        async with self.http.post(f"{self.setup.base}/api/v2", data=data) as response:
            assert response.status == 200
            return await response.json()

    async def add(self, service: int = 1, quantity: int = 1000) -> Any:
        return await self.call(
            action="add", service=service, link="https://x.test/a", quantity=quantity
        )

    async def reloads(self) -> dict[str, float]:
        counts = await reload.reload_counts(self.http, self.setup.metrics_url)
        assert counts is not None, "the metrics listener did not answer"
        return counts

    async def wait_reloads(self, **expected: float) -> None:
        async def counted() -> bool:
            counts = await self.reloads()
            return all(counts.get(outcome) == count for outcome, count in expected.items())

        await wait_for(counted, f"reloads {expected}", within=WAIT_LIMIT)


def log_lines(log: Path, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                lines.append(entry)
    return lines


def cli(setup: Setup, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "router", *argv, "--config", str(setup.path)],
        capture_output=True, text=True, env=env, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


async def run_cli(setup: Setup, *argv: str) -> subprocess.CompletedProcess[str]:
    """`cli` in a thread: the simulators of this event loop keep answering meanwhile."""
    return await asyncio.to_thread(cli, setup, *argv)


# --- SIGHUP on a real server ---------------------------------------------------------------------


async def test_sighup_applies_a_new_rate_and_route(start_sim: SimFactory, tmp_path: Path) -> None:
    alpha, beta = await start_sim(), await start_sim(first_order_id=5000)
    setup = Setup(tmp_path)
    first = setup.write({"alpha": alpha.url, "beta": beta.url}, {1: ("1.00", [("alpha", 101)])})
    await setup.reseller()
    log = tmp_path / "router.log"
    async with server(setup, log) as process, aiohttp.ClientSession() as http:
        api = Api(http, setup)
        assert await api.reloads() == {"applied": 0.0, "refused": 0.0}  # both pre-created
        assert "order" in await api.add()
        assert len(alpha.received_actions("add")) == 1
        [listed] = await api.call(action="services")
        assert listed["rate"] == "1.00"

        second = setup.write(
            {"alpha": alpha.url, "beta": beta.url},
            {1: ("2.50", [("beta", 101)]), 2: ("3.00", [("alpha", 102)])},
        )
        process.send_signal(signal.SIGHUP)
        await api.wait_reloads(applied=1, refused=0)

        services = await api.call(action="services")
        assert [(s["service"], s["rate"]) for s in services] == [(1, "2.50"), (2, "3.00")]
        order = await api.add()
        assert len(beta.received_actions("add")) == 1  # the new route
        assert len(alpha.received_actions("add")) == 1
        status = await api.call(action="status", order=order["order"])
        assert status["charge"] == "2.50"  # the new rate: 1000 at 2.50 per 1000
        assert await api.call(action="balance") == {"balance": "96.50", "currency": "USD"}
    [reloaded] = log_lines(log, "config_reloaded")
    assert reloaded["old_config_version"] == config_version(first)
    assert reloaded["new_config_version"] == config_version(second)
    assert reloaded["services_added"] == [2] and reloaded["services_changed"] == [1]
    assert not log_lines(log, "config_reload_refused")


async def test_a_bad_config_is_refused_whole_and_the_old_one_keeps_routing(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    alpha, beta = await start_sim(), await start_sim(first_order_id=5000)
    setup = Setup(tmp_path)
    providers = {"alpha": alpha.url, "beta": beta.url}
    first = setup.write(providers, {1: ("1.00", [("alpha", 101)])})
    await setup.reseller()
    log = tmp_path / "router.log"
    async with server(setup, log) as process, aiohttp.ClientSession() as http:
        api = Api(http, setup)
        # Two problems: an unknown provider and a rate that is no number. The good part of it
        # (service 1 moved to beta) is not applied either.
        setup.write(providers, {1: ("1.00", [("beta", 101)]), 2: ("lots", [("gamma", 101)])})
        process.send_signal(signal.SIGHUP)
        await api.wait_reloads(applied=0, refused=1)
        assert "order" in await api.add()
        assert len(alpha.received_actions("add")) == 1 and not beta.received_actions("add")
        assert [s["service"] for s in await api.call(action="services")] == [1]

        # A valid file that moves the API listener: only a restart can do that.
        setup.write(providers, {1: ("1.00", [("beta", 101)])}, port=free_port())
        process.send_signal(signal.SIGHUP)
        await api.wait_reloads(applied=0, refused=2)
        assert "order" in await api.add()
        assert len(alpha.received_actions("add")) == 2 and not beta.received_actions("add")

    bad, moved = log_lines(log, "config_reload_refused")
    assert bad["config_version"] == config_version(first)  # the one that keeps running
    assert bad["problems"] == [
        'services.2.rate: expected a decimal number such as "0.90"',
        "services.2.route[0].provider: unknown provider 'gamma'",
    ]
    [problem] = moved["problems"]
    assert problem.startswith(f"listen: changed from 127.0.0.1:{setup.port} to 127.0.0.1:")
    assert problem.endswith("changes only with a restart")
    assert not log_lines(log, "config_reloaded")


# --- `smm-router reload` through the PID file -----------------------------------------------------


async def test_reload_command_signals_the_server_through_its_pid_file(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    alpha = await start_sim()
    setup = Setup(tmp_path)
    setup.write({"alpha": alpha.url}, {1: ("1.00", [("alpha", 101)])})
    await setup.reseller()
    pid_file = tmp_path / "router.db.pid"
    async with server(setup, tmp_path / "router.log") as process, aiohttp.ClientSession() as http:
        api = Api(http, setup)
        assert pid_file.read_text() == f"{process.pid}\n"

        setup.write({"alpha": alpha.url}, {1: ("1.20", [("alpha", 101)])})
        done = await run_cli(setup, "reload")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"reloaded: the server (pid {process.pid}) applied the config\n"
        assert (await api.call(action="services"))[0]["rate"] == "1.20"

        # Refused by the command itself: the server is not even asked.
        setup.write({"alpha": alpha.url}, {1: ("1.20", [("gamma", 101)])})
        done = await run_cli(setup, "reload")
        assert done.returncode == 1 and "services.1.route[0].provider" in done.stderr
        assert await api.reloads() == {"applied": 1.0, "refused": 0.0}

        # Valid, but the server refuses it: a new API port needs a restart (`--json`: scripts).
        setup.write({"alpha": alpha.url}, {1: ("1.30", [("alpha", 101)])}, port=free_port())
        done = await run_cli(setup, "reload", "--json")
        assert done.returncode == 1
        assert json.loads(done.stdout) == {"pid": process.pid, "outcome": "refused"}
        assert await api.reloads() == {"applied": 1.0, "refused": 1.0}
        assert (await api.call(action="services"))[0]["rate"] == "1.20"

        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert not pid_file.exists()  # a clean exit removes it
    setup.write({"alpha": alpha.url}, {1: ("1.20", [("alpha", 101)])})
    done = await run_cli(setup, "reload")
    assert done.returncode == 1
    assert done.stderr == (
        f"smm-router: no PID file at {pid_file}: is `smm-router serve` running?\n"
    )

    gone = await asyncio.create_subprocess_exec("true")  # a PID whose process has ended
    await gone.wait()
    pid_file.write_text(f"{gone.pid}\n")
    done = await run_cli(setup, "reload")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"smm-router: stale PID file {pid_file}: process {gone.pid}")


# --- Orders in flight, and a removed provider's open orders ---------------------------------------


async def test_orders_in_flight_finish_on_their_plan_and_keep_syncing(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    """Two adds wait at the providers while a reload removes alpha: the one at alpha is placed
    there all the same; the one at beta, refused, fails over to alpha, the next route of the
    plan it started with. Both keep syncing from alpha until they end; new orders go to beta."""
    alpha = await start_sim(partial_every=0)
    beta = await start_sim(first_order_id=5000, partial_every=0)
    # 101 at both: 1,000 of it costs 0.50 of a 1.00 charge. (102, a package at 2.40 an order,
    # lost its margin as soon as the first catalogue read showed its rate: the add at beta then
    # answered Service temporarily unavailable whenever that read came before it.)
    beta.set_fault(101, Fault.REFUSE)
    setup = Setup(tmp_path)
    setup.write(
        {"alpha": alpha.url, "beta": beta.url},
        {1: ("1.00", [("alpha", 101)]), 2: ("1.00", [("beta", 101), ("alpha", 101)])},
    )
    await setup.reseller()
    log = tmp_path / "router.log"
    async with server(setup, log) as process, aiohttp.ClientSession() as http:
        api = Api(http, setup)
        alpha.pause("add")
        beta.pause("add")
        at_alpha = asyncio.create_task(api.add(1))
        at_beta = asyncio.create_task(api.add(2))
        await wait_for(lambda: alpha.received_actions("add"), "an add to reach alpha")
        await wait_for(lambda: beta.received_actions("add"), "an add to reach beta")

        setup.write(
            {"beta": beta.url}, {1: ("1.00", [("beta", 101)]), 2: ("1.00", [("beta", 101)])}
        )
        process.send_signal(signal.SIGHUP)
        await api.wait_reloads(applied=1)
        alpha.resume("add")
        beta.resume("add")
        orders = [(await at_alpha)["order"], (await at_beta)["order"]]
        assert sorted(o.service for o in alpha.orders.values()) == [101, 101]
        assert not beta.orders  # beta refused its add: the order went on to alpha
        beta.set_fault(101, None)

        assert "order" in await api.add(1)
        assert len(beta.orders) == 1 and len(alpha.orders) == 2  # the new routes

        alpha.advance(alpha.progress_seconds)

        async def completed() -> bool:
            views = await api.call(action="status", orders=",".join(map(str, orders)))
            return all(view["status"] == "Completed" for view in views.values())

        await wait_for(completed, "the removed provider's orders to sync", within=WAIT_LIMIT)
        await wait_for(lambda: log_lines(log, "provider_retired"), "alpha to retire")
    store = await Store.open(setup.database)
    try:
        for order_id in orders:
            order = await store.order(order_id)
            assert order is not None
            assert (order.provider, order.state) == ("alpha", "placed")
            assert order.upstream_order in alpha.orders
    finally:
        await store.close()
    [removed] = log_lines(log, "provider_removed_with_open_orders")
    assert (removed["provider"], removed["open_orders"]) == ("alpha", 1)  # the one placing there
    assert removed["orders_being_placed"] == 2  # and the one at beta, whose plan goes on to it
    assert [line["provider"] for line in log_lines(log, "provider_retired")] == ["alpha"]


@asynccontextmanager
async def app_from(
    setup: Setup, aiohttp_client: Any, *, background: bool = True
) -> AsyncIterator[Router]:
    """The router app in this process, from the setup's file (with its background loops)."""
    config = config_module.load(setup.path)
    registry = CollectorRegistry()
    app = create_app(config, background=background, registry=registry)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(RouterTestServer(app))
    router = Router(client, config, registry)
    await router.store.create_reseller("acme", hash_key(KEY), v2.to_minor(Decimal(100)))
    router.keys["acme"] = KEY
    yield router


async def test_a_removed_providers_open_orders_keep_syncing_until_they_end(
    start_sim: SimFactory, tmp_path: Path, aiohttp_client: Any
) -> None:
    alpha, beta = await start_sim(partial_every=0), await start_sim(first_order_id=5000)
    setup = Setup(tmp_path)
    setup.write({"alpha": alpha.url, "beta": beta.url}, {1: ("1.00", [("alpha", 101)])})
    async with app_from(setup, aiohttp_client) as router:
        add = {"key": KEY, "action": "add", "service": 1, "link": "x", "quantity": 1000}
        orders = [(await router.call(**add))["order"] for _ in range(2)]
        setup.write({"beta": beta.url}, {1: ("1.00", [("beta", 101)])})
        with capture_logs() as logs:
            assert await reload_config(router.app, setup.path)
        [removed] = [e for e in logs if e["event"] == "provider_removed_with_open_orders"]
        assert (removed["provider"], removed["open_orders"], removed["open_refills"]) == (
            "alpha",
            2,
            0,
        )
        sync = router.app[ORDER_SYNC]
        assert set(sync.clients) == {"alpha", "beta"} and set(sync.retiring) == {"alpha"}
        assert sync.config.providers["alpha"].url == alpha.url  # its old settings, kept
        assert set(router.app[LIVE].clients) == {"beta"}  # nothing new goes to alpha

        alpha.advance(alpha.progress_seconds)

        async def ended() -> bool:
            views = await router.call(key=KEY, action="status", orders=",".join(map(str, orders)))
            return all(view["status"] == "Completed" for view in views.values())

        await wait_for(ended, "alpha's orders to end")
        await wait_for(lambda: "alpha" not in sync.clients, "alpha to retire")
        assert sync.retiring == {}


async def test_health_state_metrics_and_limits_after_a_reload(
    start_sim: SimFactory, tmp_path: Path, aiohttp_client: Any
) -> None:
    """An unchanged provider keeps its state; one whose URL changed starts fresh; a new one has
    its label sets; a removed one loses its gauges; new limits apply to the next request."""
    alpha, beta, other = await start_sim(), await start_sim(), await start_sim()
    delta = await start_sim()
    setup = Setup(tmp_path)
    services = {1: ("1.00", [("alpha", 101)]), 2: ("1.00", [("beta", 101)])}
    setup.write({"alpha": alpha.url, "beta": beta.url, "gamma": other.url}, services)
    async with app_from(setup, aiohttp_client, background=False) as router:
        fleet = router.app[FLEET]
        fleet.set_catalogue("alpha", {}, frozenset({101}))
        fleet.set_catalogue("beta", {}, frozenset({102}))
        assert (
            router.registry.get_sample_value(
                "smm_router_provider_state", {"provider": "gamma", "state": "healthy"}
            )
            == 1.0
        )
        new_url = alpha.url.replace("/api/v2", "/api/v1")  # the same simulator, another URL
        setup.write(
            {"alpha": new_url, "beta": beta.url, "delta": delta.url},
            services,
            extra="limits: {add: 1}\n",
        )
        assert await reload_config(router.app, setup.path)

        # Another URL: what was learnt of the old one is gone; beta is unchanged.
        assert fleet.health["alpha"].missing == frozenset()
        assert fleet.health["beta"].missing == {102}
        labels = {"provider": "delta", "action": "add", "outcome": "accepted"}
        assert router.registry.get_sample_value("smm_router_upstream_requests_total", labels) == 0
        gauge = "smm_router_provider_state"
        delta_state = {"provider": "delta", "state": "healthy"}
        assert router.registry.get_sample_value(gauge, delta_state) == 1
        gamma_state = {"provider": "gamma", "state": "healthy"}
        assert router.registry.get_sample_value(gauge, gamma_state) is None
        assert router.metric("smm_router_config_reloads_total", outcome="applied") == 1

        add = {"key": KEY, "action": "add", "service": 2, "link": "x", "quantity": 100}
        assert "order" in await router.call(**add)
        response = await router.raw(**add)
        assert response.status == 429  # add: 1 per minute, from this reload on


# --- The pure parts ------------------------------------------------------------------------------


def _config(text: str, folder: Path) -> config_module.Config:
    return config_module.parse(text, base_dir=folder, env={})


def test_what_a_reload_changes_and_what_needs_a_restart(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    old = _config(
        setup.write(
            {"alpha": "http://a.test/api/v2", "beta": "http://b.test/api/v2"},
            {1: ("1.00", [("alpha", 101)]), 2: ("1.00", [("beta", 7)])},
        ),
        tmp_path,
    )
    new = _config(
        setup.write(
            {"alpha": "http://a2.test/api/v2", "gamma": "http://c.test/api/v2"},
            {1: ("1.10", [("alpha", 101)]), 3: ("1.00", [("gamma", 7)])},
        ),
        tmp_path,
    )
    changes = reload.compare(old, new)
    assert changes.summary() == {
        "providers_added": ["gamma"],
        "providers_removed": ["beta"],
        "providers_changed": ["alpha"],
        "services_added": [3],
        "services_removed": [2],
        "services_changed": [1],
    }
    assert changes.providers_fresh == {"alpha", "gamma"}
    assert reload.refusals(old, new) == []

    moved = _config(
        setup.path.read_text()
        .replace("database: router.db", "database: other.db")
        .replace("currency: USD", "currency: EUR"),
        tmp_path,
    )
    assert reload.refusals(new, moved) == [
        f"database: changed from {tmp_path / 'router.db'} to {tmp_path / 'other.db'}: the "
        "database changes only with a restart",
        "currency: changed from USD to EUR: the currency every stored balance and charge is in "
        "changes only with a restart",
    ]

    kept = reload.sync_config(new, old, ["beta"])
    assert list(kept.providers) == ["alpha", "gamma", "beta"]
    assert kept.providers["beta"] == old.providers["beta"]
    assert kept.providers["alpha"] == new.providers["alpha"]
    assert list(kept.services) == [1, 3, 2]  # service 2's open orders still end as they would


def test_the_pid_file_names_a_running_server_or_says_why_not(tmp_path: Path) -> None:
    path = reload.pid_path(tmp_path / "router.db")
    assert path.name == "router.db.pid"
    with pytest.raises(reload.NoServer, match="no PID file"):
        reload.running_server(path)
    assert reload.write_pid_file(path) is None
    assert path.read_text() == f"{os.getpid()}\n"
    path.write_text("0\n")
    with pytest.raises(reload.NoServer, match="holds no process ID"):
        reload.running_server(path)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    # One whose command line names the router (as `smm-router serve` does), one that does not.
    with subprocess.Popen([*sleep, "router"]) as router, subprocess.Popen(sleep) as other:
        try:
            path.write_text(f"{router.pid}\n")
            assert reload.running_server(path) == router.pid
            assert reload.write_pid_file(path) == router.pid  # replaced, and said so
            path.write_text(f"{other.pid}\n")
            with pytest.raises(reload.NoServer, match="is not smm-router"):
                reload.running_server(path)
        finally:
            router.kill()
            other.kill()
    reload.write_pid_file(path)
    reload.remove_pid_file(path, pid=os.getpid() + 1)  # another server's: left alone
    assert path.exists()
    reload.remove_pid_file(path)
    assert not path.exists()
