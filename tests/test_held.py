"""Held orders: listed, shown and resolved by the operator; a router killed mid-`add` holds it.

Held orders come from the real path (a simulator answering 502, resetting, or too slow), the
resolutions from the real command line, against the running router and real simulators.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from router import config as config_module
from router import v2
from router.api import hash_key
from router.app import ORDER_SYNC, create_app, create_metrics_app
from router.cli import build_parser, main, operator_desk
from router.sim import Fault, SimProvider
from router.store import NewOrder, Store
from tests.conftest import SIM_KEY, Router, SimFactory, free_port, wait_for

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
metrics: {{host: 127.0.0.1, port: {metrics_port}}}
database: router.db
currency: USD
providers:
{providers}
sync: {{status_interval: 0.2, balance_interval: 0.2, catalogue_interval: 0.2}}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 10000
    refill: true
    cancel: true
    route:
{route}
  2:
    name: Followers, one route
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 10000
    route:
      - {{provider: {first}, service: 101}}
"""

WAIT_LIMIT = 15.0  # seconds before a wait for something that should happen soon fails

AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def write_config(
    folder: Path,
    providers: Mapping[str, str],
    *,
    timeouts: Mapping[str, float] | None = None,
    port: int = 18080,  # only the process test listens: it passes free ports
    metrics_port: int = 19464,
) -> Path:
    """A YAML config: service 1 routes through `providers` in their order, service 2 the first."""
    timeouts = timeouts or {}
    path = folder / "router.yaml"
    path.write_text(
        CONFIG.format(
            port=port,
            metrics_port=metrics_port,
            providers="\n".join(
                f'  {name}: {{url: "{url}", key: "{SIM_KEY}", timeout: {timeouts.get(name, 2)}}}'
                for name, url in providers.items()
            ),
            route="\n".join(f"      - {{provider: {name}, service: 101}}" for name in providers),
            first=next(iter(providers)),
        )
    )
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """Run `smm-router ARGV` in-process (in a thread: it runs its own event loop)."""

    async def run(config: Path, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # only what this command prints
        code = await asyncio.to_thread(main, [*argv, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    structlog.reset_defaults()  # `resolve` configured logging onto capsys's stderr


class Setup:
    """Three simulated providers, the router app on a YAML config, a reseller with 10.00."""

    def __init__(self, router: Router, path: Path, sims: dict[str, SimProvider], key: str):
        self.router = router
        self.path = path
        self.sims = sims
        self.key = key

    async def held_order(self, service: int = 1, quantity: int = 1000) -> int:
        answer = await self.router.call(
            key=self.key, action="add", service=service, link="x", quantity=quantity
        )
        order = await self.router.store.order(answer["order"])
        assert order is not None and order.state == "held"
        return order.id

    async def status(self, order_id: int) -> dict[str, str]:
        answer: dict[str, str] = await self.router.call(
            key=self.key, action="status", order=order_id
        )
        return answer

    async def assert_balance(self, expected: str) -> None:
        """The balance is `expected`, equals the ledger sum, and the reseller's API says so."""
        reseller = await self.router.store.reseller_by_name("acme")
        assert reseller is not None
        assert v2.format_money(reseller.balance) == expected
        assert await self.router.store.ledger_sum(reseller.id) == reseller.balance
        answer = await self.router.call(key=self.key, action="balance")
        assert answer["balance"] == expected

    def adds(self) -> dict[str, int]:
        return {name: len(sim.received_actions("add")) for name, sim in self.sims.items()}


@pytest.fixture
async def setup(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path
) -> AsyncIterator[Setup]:
    """alpha answers `add` with a CDN's 502 page; beta and gamma take orders."""
    sims = {"alpha": await start_sim(), "beta": await start_sim(), "gamma": await start_sim()}
    sims["alpha"].set_fault(101, Fault.HTML_502)
    yield await start_setup(aiohttp_client, tmp_path, sims)


async def start_setup(
    aiohttp_client: AppClient,
    folder: Path,
    sims: dict[str, SimProvider],
    timeouts: Mapping[str, float] | None = None,
) -> Setup:
    path = write_config(folder, {name: sim.url for name, sim in sims.items()}, timeouts=timeouts)
    config = config_module.load(path)
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(config, background=False, registry=registry))
    router = Router(client, config, registry)
    return Setup(router, path, sims, await router.reseller("acme", "10"))


async def test_held_orders_listed_and_shown(setup: Setup, cli: Cli) -> None:
    order_id = await setup.held_order()

    code, out, _ = await cli(setup.path, "orders", "held", "--json")
    assert code == 0
    [held] = json.loads(out)
    assert held["id"] == order_id and held["reseller"] == "acme" and held["service"] == 1
    assert (held["provider"], held["upstream_service"]) == ("alpha", 101)
    assert held["charge"] == "1.00" and held["age_seconds"] >= 0
    assert "HTTP 502" in held["error"]

    code, out, _ = await cli(setup.path, "orders", "held")
    assert code == 0
    assert "alpha service 101" in out and "HTTP 502" in out and "acme" in out

    code, out, _ = await cli(setup.path, "orders", "show", str(order_id), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["order"]["state"] == "held" and shown["order"]["status"] == "Pending"
    assert shown["order"]["reseller"] == "acme" and shown["order"]["charge"] == "1.00"
    assert [(a["rank"], a["provider"], a["outcome"]) for a in shown["attempts"]] == [
        (0, "alpha", "ambiguous")
    ]
    assert shown["events"] == []
    assert [(e["kind"], e["amount"]) for e in shown["ledger"]] == [("charge", "-1.00")]
    assert shown["held"]["interrupted"] is False  # alpha's answer is recorded: why it is held
    assert shown["held"]["reason"].startswith("alpha (service 101) answered: HTTP 502")

    code, out, _ = await cli(setup.path, "orders", "show", str(order_id))
    assert code == 0
    assert f"order {order_id}: held, the reseller sees Pending" in out
    assert "attempts:" in out and "ambiguous" in out and "events:\n  (none)" in out
    assert "  held      alpha (service 101) answered: HTTP 502" in out

    code, _, err = await cli(setup.path, "orders", "show", "999")
    assert code == 1 and "no order 999" in err


async def test_orders_show_names_the_request_id(setup: Setup, cli: Cli) -> None:
    answer = await setup.router.call(
        key=setup.key, action="add", service=1, link="x", quantity=100, request_id="panel-77"
    )
    code, out, _ = await cli(setup.path, "orders", "show", str(answer["order"]), "--json")
    assert code == 0 and json.loads(out)["order"]["request_id"] == "panel-77"
    code, out, _ = await cli(setup.path, "orders", "show", str(answer["order"]))
    assert code == 0 and "  request   panel-77\n" in out
    plain = await setup.held_order()
    code, out, _ = await cli(setup.path, "orders", "show", str(plain))
    assert code == 0 and "  request   -\n" in out


async def test_refund_cancels_and_refunds_once(setup: Setup, cli: Cli) -> None:
    order_id = await setup.held_order()
    await setup.assert_balance("9.00")

    code, out, _ = await cli(
        setup.path, "orders", "resolve", str(order_id), "--refund", "--by", "ops", "--json"
    )

    assert code == 0
    resolved = json.loads(out)
    assert resolved["state"] == "canceled" and resolved["status"] == "Canceled"
    # The running server sees it at once: its `status` answers from SQLite.
    status = await setup.status(order_id)
    assert status["status"] == "Canceled" and status["remains"] == "1000"
    await setup.assert_balance("10.00")
    ledger = await setup.router.store.order_ledger(order_id)
    assert [(e.kind, e.amount) for e in ledger] == [("charge", -100000), ("refund", 100000)]
    [event] = await setup.router.store.order_history(order_id)
    assert event.kind == "resolve" and event.status == "Canceled"
    assert event.detail is not None and event.detail.startswith("refund by ops")
    assert await setup.router.store.held_orders() == []

    code, _, err = await cli(setup.path, "orders", "resolve", str(order_id), "--refund")
    assert code == 1 and "canceled, not held" in err
    await setup.assert_balance("10.00")
    assert len(await setup.router.store.order_history(order_id)) == 1
    assert setup.adds() == {"alpha": 1, "beta": 0, "gamma": 0}


async def test_attach_places_the_order_found_upstream(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path, cli: Cli
) -> None:
    alpha = await start_sim(slow_seconds=0.6)  # creates the order after the router gave up
    alpha.set_fault(101, Fault.SLOW)
    setup = await start_setup(aiohttp_client, tmp_path, {"alpha": alpha}, {"alpha": 0.3})
    router, path = setup.router, setup.path
    order_id = await setup.held_order()
    await wait_for(lambda: alpha.orders, "the slow simulator to create the order")
    [upstream_order] = alpha.orders

    code, out, _ = await cli(
        path, "orders", "resolve", str(order_id), "--upstream-order", str(upstream_order)
    )

    assert code == 0 and f"upstream order {upstream_order}" in out
    order = await router.store.order(order_id)
    assert order is not None and order.state == "placed"
    assert (order.provider, order.upstream_order) == ("alpha", upstream_order)
    assert (await setup.status(order_id))["status"] == "Pending"
    await setup.assert_balance("9.00")  # the order is placed: its charge stays taken
    [event] = await router.store.order_history(order_id)
    assert event.kind == "resolve" and event.detail is not None
    assert f"upstream order {upstream_order} at alpha" in event.detail
    assert [a.outcome for a in await router.store.attempts(order_id)] == ["ambiguous"]

    # The same upstream order cannot be attached to a second held order.
    alpha.set_fault(101, Fault.HTML_502)
    second = await setup.held_order()
    code, _, err = await cli(
        path, "orders", "resolve", str(second), "--upstream-order", str(upstream_order)
    )
    assert code == 1 and f"already belongs to order {order_id}" in err
    still = await router.store.order(second)
    assert still is not None and still.state == "held" and still.upstream_order is None
    assert await router.store.order_history(second) == []
    await setup.assert_balance("8.00")


async def test_reroute_fails_over_to_the_route_that_accepts(setup: Setup, cli: Cli) -> None:
    setup.sims["beta"].set_fault(101, Fault.REFUSE)
    order_id = await setup.held_order()

    code, out, _ = await cli(
        setup.path, "orders", "resolve", str(order_id), "--reroute", "--by", "ops", "--json"
    )

    assert code == 0
    resolved = json.loads(out)
    [gamma_order] = setup.sims["gamma"].orders
    assert resolved["state"] == "placed" and resolved["status"] == "Pending"
    assert (resolved["provider"], resolved["upstream_order"]) == ("gamma", gamma_order)
    assert setup.adds() == {"alpha": 1, "beta": 1, "gamma": 1}  # alpha never sent it again
    attempts = await setup.router.store.attempts(order_id)
    assert [(a.rank, a.provider, a.outcome) for a in attempts] == [
        (0, "alpha", "ambiguous"),
        (1, "beta", "refused"),
        (2, "gamma", "accepted"),
    ]
    assert setup.sims["gamma"].received_actions("add")[0].params["quantity"] == "1000"
    events = await setup.router.store.order_history(order_id)
    assert [e.kind for e in events] == ["resolve", "resolve"]
    assert events[-1].detail is not None and "placed on gamma" in events[-1].detail
    assert (await setup.status(order_id))["status"] == "Pending"
    await setup.assert_balance("9.00")
    assert await setup.router.store.count_calls("gamma", "add") == 1  # the CLI's calls recorded


async def test_reroute_skips_a_provider_benched_for_lack_of_funds(setup: Setup, cli: Cli) -> None:
    """Each `resolve` is a new process: it routes with the benches the database remembers."""
    first = await setup.held_order()
    second = await setup.held_order()
    setup.sims["beta"].set_fault(101, Fault.NO_FUNDS)

    for order_id in (first, second):
        code, _, _ = await cli(setup.path, "orders", "resolve", str(order_id), "--reroute")
        assert code == 0

    assert setup.adds() == {"alpha": 2, "beta": 1, "gamma": 2}  # beta asked once, then skipped
    second_attempts = await setup.router.store.attempts(second)
    assert [(a.rank, a.provider, a.outcome) for a in second_attempts] == [
        (0, "alpha", "ambiguous"),
        (2, "gamma", "accepted"),
    ]


async def test_reroute_with_unknown_outcome_holds_it_again(setup: Setup, cli: Cli) -> None:
    setup.sims["beta"].set_fault(101, Fault.RESET)
    order_id = await setup.held_order()

    code, out, _ = await cli(setup.path, "orders", "resolve", str(order_id), "--reroute")

    assert code == 0 and "held again" in out
    order = await setup.router.store.order(order_id)
    assert order is not None and order.state == "held" and order.provider == "beta"
    assert setup.adds() == {"alpha": 1, "beta": 1, "gamma": 0}  # never sent on after beta
    assert (await setup.status(order_id))["status"] == "Pending"
    await setup.assert_balance("9.00")
    [held] = await setup.router.store.held_orders()
    assert held.provider == "beta" and held.error is not None

    # Re-routed again, it goes on after beta, the route it is now held on.
    code, _, _ = await cli(setup.path, "orders", "resolve", str(order_id), "--reroute")
    assert code == 0
    order = await setup.router.store.order(order_id)
    assert order is not None and order.state == "placed" and order.provider == "gamma"
    attempts = await setup.router.store.attempts(order_id)
    assert [(a.rank, a.outcome) for a in attempts] == [
        (0, "ambiguous"),
        (1, "ambiguous"),
        (2, "accepted"),
    ]
    await setup.assert_balance("9.00")


async def test_reroute_interrupted_holds_it_on_the_route_being_tried(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path
) -> None:
    sims = {"alpha": await start_sim(), "beta": await start_sim(), "gamma": await start_sim()}
    sims["alpha"].set_fault(101, Fault.HTML_502)
    sims["beta"].set_fault(101, Fault.SLOW)  # answers after 30 s: the re-route is stopped first
    setup = await start_setup(aiohttp_client, tmp_path, sims, {"beta": 60})
    order_id = await setup.held_order()
    config, store = setup.router.config, setup.router.store

    async def reroute() -> None:
        async with operator_desk(config, store) as desk:
            await desk.reroute(order_id, by="ops")

    task = asyncio.create_task(reroute())
    await wait_for(lambda: sims["beta"].received_actions("add"), "the re-route to reach beta")
    task.cancel()  # what Ctrl-C does to the command
    with pytest.raises(asyncio.CancelledError):
        await task

    order = await store.order(order_id)
    assert order is not None and order.state == "held" and order.provider == "beta"
    assert setup.adds() == {"alpha": 1, "beta": 1, "gamma": 0}
    events = await store.order_history(order_id)
    assert events[-1].detail is not None and "interrupted" in events[-1].detail
    await setup.assert_balance("9.00")
    assert await store.count_calls("beta", "add") == 1  # the cut call is recorded too


async def test_reroute_refused_everywhere_cancels_and_refunds(setup: Setup, cli: Cli) -> None:
    setup.sims["beta"].set_fault(101, Fault.REFUSE)
    setup.sims["gamma"].set_fault(101, Fault.NO_FUNDS)
    order_id = await setup.held_order()

    code, out, _ = await cli(setup.path, "orders", "resolve", str(order_id), "--reroute")

    assert code == 0 and "canceled, 1.00 refunded" in out
    order = await setup.router.store.order(order_id)
    assert order is not None and order.state == "canceled"
    status = await setup.status(order_id)
    assert status["status"] == "Canceled" and status["remains"] == "1000"
    await setup.assert_balance("10.00")
    ledger = await setup.router.store.order_ledger(order_id)
    assert [e.kind for e in ledger] == ["charge", "refund"]
    attempts = await setup.router.store.attempts(order_id)
    assert [(a.rank, a.outcome) for a in attempts] == [
        (0, "ambiguous"),
        (1, "refused"),
        (2, "no_funds"),
    ]
    events = await setup.router.store.order_history(order_id)
    assert events[-1].status == "Canceled"


async def test_resolve_refused_unless_held(setup: Setup, cli: Cli) -> None:
    setup.sims["alpha"].set_fault(101, None)
    answer = await setup.router.call(
        key=setup.key, action="add", service=1, link="x", quantity=1000
    )
    placed_id = answer["order"]
    before = await setup.router.store.order(placed_id)
    assert before is not None and before.state == "placed"
    setup.sims["alpha"].set_fault(101, Fault.HTML_502)
    lonely = await setup.held_order(service=2)  # its only route is the one it is held on

    for flags in (["--refund"], ["--reroute"], ["--upstream-order", "77"]):
        code, _, err = await cli(setup.path, "orders", "resolve", str(placed_id), *flags)
        assert code == 1 and "placed, not held" in err
        code, _, err = await cli(setup.path, "orders", "resolve", "999", *flags)
        assert code == 1 and "no order 999" in err
    code, _, err = await cli(setup.path, "orders", "resolve", str(lonely), "--reroute")
    assert code == 1 and "no route after alpha" in err

    assert await setup.router.store.order(placed_id) == before
    lonely_order = await setup.router.store.order(lonely)
    assert lonely_order is not None and lonely_order.state == "held"
    for order_id in (placed_id, lonely):
        assert await setup.router.store.order_history(order_id) == []
        assert [e.kind for e in await setup.router.store.order_ledger(order_id)] == ["charge"]
    assert setup.adds() == {"alpha": 2, "beta": 0, "gamma": 0}
    await setup.assert_balance("8.00")

    parser = build_parser()
    for argv in (["--refund", "--reroute"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(["orders", "resolve", str(lonely), *argv])


# --- a real process, a real kill -----------------------------------------------------------------


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


@asynccontextmanager
async def router_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m router serve` in its own process; always killed at the end."""
    with _log_file(log) as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "serve", "--config", str(config),
            stdout=output, stderr=output,
        )  # fmt: skip
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def wait_ready(
    http: aiohttp.ClientSession, base: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + 2 * WAIT_LIMIT  # a process start-up on a slow CI
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise AssertionError(f"the router exited: {log.read_text()}")
        try:
            async with http.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router never answered /healthz: {log.read_text()}")


async def test_sigkill_during_add_restarts_with_the_order_held(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    alpha = await start_sim()  # slow: answers after 30 s, long after the kill
    alpha.set_fault(101, Fault.SLOW)
    port = free_port()
    path = write_config(
        tmp_path, {"alpha": alpha.url}, timeouts={"alpha": 60}, port=port, metrics_port=free_port()
    )
    config = config_module.load(path)
    key = "sigkill-test-key-0123456789"
    store = await Store.open(config.database)
    await store.create_reseller("acme", hash_key(key), v2.to_minor(Decimal("10")))
    await store.close()
    base = f"http://127.0.0.1:{port}"
    add = {"key": key, "action": "add", "service": "1", "link": "x", "quantity": "1000"}

    async with aiohttp.ClientSession() as http:
        async with router_process(path, tmp_path / "first.log") as process:
            await wait_ready(http, base, process, tmp_path / "first.log")
            request = asyncio.create_task(http.post(f"{base}/api/v2", data=add))
            await wait_for(lambda: alpha.received_actions("add"), "the add to reach the provider")
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            with pytest.raises(aiohttp.ClientError):
                await request

        store = await Store.open(config.database)
        try:
            order_id = 1  # the first order of a new database
            order = await store.order(order_id)
            assert order is not None and order.state == "placing"  # as the kill left it

            async with router_process(path, tmp_path / "second.log") as process:
                await wait_ready(http, base, process, tmp_path / "second.log")
                order = await store.order(order_id)
                assert order is not None and order.state == "held"
                reseller = await store.reseller_by_name("acme")
                assert reseller is not None
                assert reseller.balance == v2.to_minor(Decimal("9"))  # still reserved
                assert await store.ledger_sum(reseller.id) == reseller.balance

                async def call(**params: str) -> Any:
                    async with http.post(f"{base}/api/v2", data={"key": key, **params}) as response:
                        return await response.json()

                status = await call(action="status", order=str(order_id))
                assert status["status"] == "Pending" and status["charge"] == "1.00"
                assert await call(action="balance") == {"balance": "9.00", "currency": "USD"}

                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "router", "orders", "held", "--json",
                    "--config", str(path),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await cli.communicate()
                assert cli.returncode == 0, err.decode()
                [held] = json.loads(out)
                assert (held["id"], held["provider"], held["error"]) == (order_id, "alpha", None)
                assert len(alpha.received_actions("add")) == 1  # nothing re-sent on restart
        finally:
            await store.close()


async def test_refund_of_an_order_that_ended_upstream(
    start_sim: SimFactory, aiohttp_client: AppClient, tmp_path: Path, cli: Cli
) -> None:
    """`orders refund`: part of an ended order given back once, shown in the reseller's
    `status`; an order still running, a second refund or too much are refused."""
    sim = await start_sim(partial_every=0)
    setup = await start_setup(aiohttp_client, tmp_path, {"beta": sim})
    answer = await setup.router.call(
        key=setup.key, action="add", service=1, link="x", quantity=1000
    )
    order_id = answer["order"]
    refund = ("orders", "refund", str(order_id))

    code, _, err = await cli(setup.path, *refund, "0.40")
    assert code == 1 and "ended upstream" in err  # still Pending

    sim.advance(sim.progress_seconds)
    await setup.router.app[ORDER_SYNC].run_once()
    assert (await setup.status(order_id))["status"] == "Completed"
    code, _, err = await cli(setup.path, *refund, "1.01")
    assert code == 1 and "at most its charge, 1.00" in err

    code, out, _ = await cli(setup.path, *refund, "0.40", "--by", "ops", "--json")
    assert code == 0 and json.loads(out)["refunded"] == "0.40"
    status = await setup.status(order_id)
    assert (status["status"], status["charge"]) == ("Completed", "0.60")
    await setup.assert_balance("9.40")
    history = await setup.router.store.order_history(order_id)
    assert history[-1].kind == "resolve"
    assert history[-1].detail == "refund by ops: 0.40 of 1.00 (refund by the operator)"

    code, _, err = await cli(setup.path, *refund, "0.10")
    assert code == 1 and "already refunded 0.40" in err
    await setup.assert_balance("9.40")


async def test_the_held_gauge_stays_exact_through_every_resolution(setup: Setup, cli: Cli) -> None:
    """smm_router_orders_held comes from a counter the schema keeps (migration 0008): after
    holds, a refund, re-routes that place, hold again and cancel, an attach, an interrupted
    placement and orders imported as placed, it still equals a count of the held orders."""
    store, beta, gamma = setup.router.store, setup.sims["beta"], setup.sims["gamma"]

    async def assert_held(expected: int) -> None:
        rows = await store.write(
            lambda db: db.execute("SELECT count(*) FROM orders WHERE state = 'held'").fetchall()
        )
        assert (await store.count_held(), next(iter(rows))[0]) == (expected, expected)

    # Five: alpha's breaker (min_calls 5) would send a sixth order elsewhere.
    held = [await setup.held_order() for _ in range(5)]  # placing -> held
    await assert_held(5)
    assert (await cli(setup.path, "orders", "resolve", str(held[0]), "--refund"))[0] == 0
    await assert_held(4)  # held -> canceled
    assert (await cli(setup.path, "orders", "resolve", str(held[1]), "--reroute"))[0] == 0
    await assert_held(3)  # held -> placing -> placed
    beta.set_fault(101, Fault.RESET)
    assert (await cli(setup.path, "orders", "resolve", str(held[2]), "--reroute"))[0] == 0
    await assert_held(3)  # held -> placing -> held
    beta.set_fault(101, Fault.REFUSE)
    gamma.set_fault(101, Fault.NO_FUNDS)
    assert (await cli(setup.path, "orders", "resolve", str(held[3]), "--reroute"))[0] == 0
    await assert_held(2)  # held -> placing -> canceled
    attach = ("orders", "resolve", str(held[4]), "--upstream-order", "4242")
    assert (await cli(setup.path, *attach))[0] == 0
    await assert_held(1)  # held -> placed

    reseller = await store.reseller_by_name("acme")
    assert reseller is not None
    new = NewOrder(reseller.id, 1, "x", 100, 10_000, {"quantity": "100"}, "alpha", 101)
    assert await store.reserve_order(new) is not None
    await assert_held(1)
    assert await store.hold_interrupted_orders(stale_before=time.time() + 1) == 1
    await assert_held(2)  # placing -> held, by the start-up sweep
    await store.create_placed_orders([(new, 9000 + n) for n in range(3)])
    await assert_held(2)

    async with TestClient(TestServer(create_metrics_app(setup.router.app))) as metrics:
        text = await (await metrics.get("/metrics")).text()
    assert "\nsmm_router_orders_held 2.0\n" in text
    await setup.assert_balance("6.60")  # 10 - 5 x 1.00 + 2 x 1.00 refunded - 4 x 0.10
