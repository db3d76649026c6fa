"""After an upstream accepted: the order is never lost and never placed twice.

The settle write outlasts a locked database; a process killed before it leaves the order held
with the upstream order ID in its log; one upstream order never becomes two local orders.
Real router, real simulators, a real second connection holding SQLite's write lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from router import v2
from router.api import hash_key
from router.cli import main, order_report
from router.config import load
from router.sim import Fault, SimProvider
from router.store import NewOrder, Store, WriteRetry
from router.store import database as store_module  # where Store.open reads its defaults
from tests.conftest import Router, RouterFactory, SimFactory, free_port, service, wait_for
from tests.test_held import router_process, wait_ready, write_config

QUICK_BUSY_TIMEOUT_MS = 50  # each try of a blocked write gives up this fast
QUICK_RETRY = WriteRetry(first=0.01, longest=0.05, give_up_after=60.0)
ORDER = {"action": "add", "service": "1", "link": "x", "quantity": "1000"}

Logs = list[dict[str, Any]]


@pytest.fixture
def quick_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores opened from now on wait 50 ms for a lock and retry a settle every 10-50 ms."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", QUICK_BUSY_TIMEOUT_MS)
    monkeypatch.setattr(store_module, "SETTLE_RETRY", QUICK_RETRY)


@contextmanager
def write_lock(database: Path) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock, held by another connection on the same file until the block ends."""
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        yield locker
        locker.execute("ROLLBACK")
    finally:
        locker.close()


def events(logs: Logs, name: str) -> Logs:
    return [entry for entry in logs if entry["event"] == name]


async def ledger_balances(router: Router, expected: str) -> None:
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    assert v2.format_money(reseller.balance) == expected
    assert await router.store.ledger_sum(reseller.id) == reseller.balance


async def add_while_locked(router: Router, sim: SimProvider, key: str) -> Any:
    """An `add` whose answer comes back while another connection holds the write lock (taken
    once the order is reserved and at the upstream), released once the reseller is answered."""
    sim.pause("add")
    adding = asyncio.create_task(router.call(key=key, **ORDER))
    await wait_for(lambda: sim.received_actions("add"), "the add to reach the provider")
    with write_lock(router.config.database):
        sim.resume("add")
        return await adding


async def two_routes(start_sim: SimFactory, start_router: RouterFactory) -> tuple[Any, ...]:
    alpha, beta = await start_sim(), await start_sim()
    router = await start_router(
        {"alpha": alpha.url, "beta": beta.url}, [service(1, [("alpha", 101), ("beta", 101)])]
    )
    return alpha, beta, router, await router.reseller("acme", "10")


async def test_the_settle_outlasts_a_locked_database(
    quick_store: None, start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """The write lock is taken while the add is at the upstream and kept past the busy
    timeout: the upstream order ID is logged at once, the settle is retried until the lock
    goes, and the reseller gets its order."""
    alpha, beta, router, key = await two_routes(start_sim, start_router)
    alpha.pause("add")
    with capture_logs() as logs:
        adding = asyncio.create_task(router.call(key=key, **ORDER))
        await wait_for(lambda: alpha.received_actions("add"), "the add to reach alpha")
        with write_lock(router.config.database):
            alpha.resume("add")
            await wait_for(lambda: len(events(logs, "write_retried")) >= 3, "settle retries")
            [accepted] = events(logs, "order_accepted")  # logged before the write, not after
            assert not adding.done()
        answer = await adding

    [upstream_order] = alpha.orders
    assert answer == {"order": accepted["order_id"]}
    assert (accepted["provider"], accepted["upstream_order"]) == ("alpha", upstream_order)
    assert all("database is locked" in e["error"] for e in events(logs, "write_retried"))
    assert len(alpha.received_actions("add")) == 1 and beta.received_actions("add") == []
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placed"
    assert (order.provider, order.upstream_order) == ("alpha", upstream_order)
    [attempt] = await router.store.attempts(order.id)
    assert (attempt.outcome, attempt.upstream_order) == ("accepted", upstream_order)
    await ledger_balances(router, "9.00")
    assert (await router.call(key=key, action="status", order=order.id))["status"] == "Pending"
    assert router.metric("smm_router_requests_total", action="add", outcome="ok") == 1
    assert (await order_report(router.store, order.id))["held"] is None


async def test_an_accepted_order_never_stored_is_still_answered_and_held_later(
    monkeypatch: pytest.MonkeyPatch, start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """The retries are bounded: once they give up, the reseller still gets its order ID, the
    log keeps the upstream order, and the order (left placing) is held for the operator."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", QUICK_BUSY_TIMEOUT_MS)
    monkeypatch.setattr(store_module, "SETTLE_RETRY", WriteRetry(0.01, 0.05, give_up_after=0.3))
    alpha, beta, router, key = await two_routes(start_sim, start_router)
    with capture_logs() as logs:
        answer = await add_while_locked(router, alpha, key)
    [upstream_order] = alpha.orders
    [lost] = events(logs, "order_not_stored")
    assert (lost["order_id"], lost["state"], lost["upstream_order"]) == (
        answer["order"],
        "placed",
        upstream_order,
    )
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placing" and order.upstream_order is None
    assert beta.received_actions("add") == []

    assert await router.store.hold_interrupted_orders(stale_before=time.time() + 1) == 1
    report = await order_report(router.store, order.id)
    assert report["held"]["interrupted"] is True
    assert "order_accepted" in report["held"]["reason"]
    assert report["order"]["state"] == "held" and report["attempts"] == []
    await ledger_balances(router, "9.00")  # still reserved, under an order the reseller knows


async def test_a_refusal_never_stored_leaves_the_funds_under_a_known_order(
    monkeypatch: pytest.MonkeyPatch, start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """Every route refused, and the refund cannot be stored: the reseller is told of the order
    that holds its money (not "unavailable" with less money and no order)."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", QUICK_BUSY_TIMEOUT_MS)
    monkeypatch.setattr(store_module, "SETTLE_RETRY", WriteRetry(0.01, 0.05, give_up_after=0.3))
    alpha = await start_sim()
    alpha.set_fault(None, Fault.REFUSE)
    router = await start_router({"alpha": alpha.url}, [service(1, [("alpha", 101)])])
    key = await router.reseller("acme", "10")
    answer = await add_while_locked(router, alpha, key)
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placing"
    assert (await router.call(key=key, action="status", order=order.id))["status"] == "Pending"


async def test_an_upstream_order_already_taken_holds_the_order(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """An upstream that answers with an order ID another local order holds (it reuses IDs,
    or returns the earlier order): the second order is held for the operator, not placed on
    top of the first, nor lost."""
    alpha, beta, router, key = await two_routes(start_sim, start_router)
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    earlier = NewOrder(reseller.id, 1, "x", 1000, 100000, {"link": "x"}, "alpha", 101)
    [first] = await router.store.create_placed_orders([(earlier, 1000)])  # alpha's next ID

    with capture_logs() as logs:
        answer = await router.call(key=key, **ORDER)

    assert set(answer) == {"order"} and answer["order"] != first
    assert list(alpha.orders) == [1000] and beta.received_actions("add") == []
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "held" and order.upstream_order is None
    [attempt] = await router.store.attempts(order.id)
    assert (attempt.outcome, attempt.upstream_order) == ("accepted", 1000)
    assert attempt.error == f"upstream order 1000 at alpha already belongs to order {first}"
    [taken] = events(logs, "upstream_order_taken")
    assert (taken["order_id"], taken["holder"]) == (order.id, first)
    report = await order_report(router.store, order.id)
    assert report["held"] == {
        "interrupted": False,
        "reason": f"alpha (service 101) accepted it, but {attempt.error}: ask alpha",
    }
    untouched = await router.store.order(first)
    assert (
        untouched is not None and untouched.state == "placed" and untouched.upstream_order == 1000
    )
    await ledger_balances(router, "8.00")
    assert router.metric("smm_router_orders_total", service="1", state="held") == 1


# --- the database: one local order per upstream order ----------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "router.db")
    yield opened
    await opened.close()


async def _held(store: Store, reseller_id: int) -> int:
    order_id = await store.reserve_order(NewOrder(reseller_id, 1, "x", 10, 100, {}, "alpha", 7))
    assert order_id is not None
    await store.settle_order(order_id, state="held", attempts=[], provider="alpha")
    return order_id


async def test_one_local_order_per_upstream_order_is_the_databases_rule(
    store: Store, tmp_path: Path
) -> None:
    reseller = await store.create_reseller("acme", "hash", 10_000)
    new = NewOrder(reseller.id, 1, "x", 10, 100, {}, "alpha", 7)
    [placed] = await store.create_placed_orders([(new, 555)])
    held = await _held(store, reseller.id)

    assert await store.attach_held(held, 555, "attach by ops") is False  # the index refuses
    assert await store.upstream_order_taken("alpha", 555) == placed
    still = await store.order(held)
    assert still is not None and still.state == "held" and still.upstream_order is None
    assert await store.order_history(held) == []
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        await store.create_placed_orders([(new, 555)])

    raw = sqlite3.connect(tmp_path / "router.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # around the store's code
            raw.execute(
                "UPDATE orders SET state = 'placed', upstream_order = 555 WHERE id = ?", (held,)
            )
        for statement, args in (
            ("UPDATE orders SET upstream_order = 556 WHERE id = ?", (placed,)),
            ("UPDATE orders SET provider = 'beta' WHERE id = ?", (placed,)),
            ("UPDATE orders SET upstream_duplicate = 1 WHERE id = ?", (held,)),
        ):
            with pytest.raises(sqlite3.IntegrityError):
                raw.execute(statement, args)
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM orders WHERE provider = ? AND upstream_order = ? "
            "ORDER BY upstream_duplicate LIMIT 1",
            ("alpha", 555),
        ).fetchall()
    finally:
        raw.close()
    assert any("orders_one_per_upstream_order" in row[-1] for row in plan), plan
    assert not any("SCAN" in row[-1] or "TEMP B-TREE" in row[-1] for row in plan), plan

    [elsewhere] = await store.create_placed_orders(
        [(dataclasses.replace(new, provider="beta"), 555)]
    )
    assert await store.upstream_order_taken("beta", 555) == elsewhere  # per provider
    assert await store.attach_held(held, 557, "attach by ops") is True


def _released_schema(path: Path) -> sqlite3.Connection:
    """A database as the last release left it: migrations 0001-0005 applied, not 0006."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    folder = resources.files("router") / "migrations"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql") and entry.name < "0006":
            db.executescript(entry.read_text(encoding="utf-8"))
            db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (entry.name,))
    return db


async def test_the_migration_keeps_duplicates_an_older_version_made(tmp_path: Path) -> None:
    """Start-up never fails on them; each later copy is numbered and told to the operator,
    and no new order can join them."""
    path = tmp_path / "router.db"
    db = _released_schema(path)
    try:
        db.execute("INSERT INTO resellers (name, key_hash, created_at) VALUES ('acme', 'h', 0)")
        db.execute(
            "INSERT INTO ledger (reseller_id, kind, amount, created_at) "
            "VALUES (1, 'topup', 1000, 0)"
        )
        for upstream in (5, 5, 6, 5, None):
            db.execute(
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                "params, provider, upstream_service, upstream_order, created_at, updated_at) "
                "VALUES (1, 1, 'placed', 'x', 10, 100, '{}', 'alpha', 7, ?, 0, 0)",
                (upstream,),
            )
    finally:
        db.close()

    store = await Store.open(path)
    try:
        assert await store.upstream_order_taken("alpha", 5) == 1
        for order_id in (2, 4):
            [event] = await store.order_history(order_id)
            assert event.kind == "duplicate" and event.detail is not None
            assert event.detail.startswith("upstream order 5 at alpha is order 1's too")
        for order_id in (1, 3, 5):
            assert await store.order_history(order_id) == []
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            new = NewOrder(1, 1, "x", 10, 0, {}, "alpha", 7)
            await store.create_placed_orders([(new, 5)])
        reseller = await store.reseller_by_name("acme")
        assert reseller is not None and reseller.balance == 1000 - 5 * 100  # no money moved
    finally:
        await store.close()


# --- a real process killed before its settle ------------------------------------------------


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def test_killed_before_the_settle_the_order_is_held_and_its_upstream_id_logged(
    start_sim: SimFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha = await start_sim()
    path = write_config(
        tmp_path, {"alpha": alpha.url}, port=(port := free_port()), metrics_port=free_port()
    )
    config = load(path)
    key = "killed-before-settle-key-0123"
    store = await Store.open(config.database)
    await store.create_reseller("acme", hash_key(key), v2.to_minor(Decimal("10")))
    await store.close()
    base, first_log = f"http://127.0.0.1:{port}", tmp_path / "first.log"

    async with aiohttp.ClientSession() as http:
        async with router_process(path, first_log) as process:
            await wait_ready(http, base, process, first_log)
            alpha.pause("add")
            request = asyncio.create_task(http.post(f"{base}/api/v2", data={"key": key, **ORDER}))
            await wait_for(lambda: alpha.received_actions("add"), "the add to reach alpha")
            with write_lock(config.database):  # the settle cannot land
                alpha.resume("add")
                await wait_for(
                    lambda: events(_log_lines(first_log), "order_accepted"), "order_accepted"
                )
                process.send_signal(signal.SIGKILL)
                assert await process.wait() == -signal.SIGKILL
            with pytest.raises(aiohttp.ClientError):
                await request
        [accepted] = events(_log_lines(first_log), "order_accepted")
        [upstream_order] = alpha.orders
        assert accepted["upstream_order"] == upstream_order  # the only trace of it

        second_log = tmp_path / "second.log"
        async with router_process(path, second_log) as process:
            await wait_ready(http, base, process, second_log)  # start-up held it

            def cli(*argv: str) -> tuple[int, str]:
                capsys.readouterr()
                code = main([*argv, "--config", str(path)])
                return code, capsys.readouterr().out

            order_id = accepted["order_id"]
            code, out = await asyncio.to_thread(cli, "orders", "show", str(order_id), "--json")
            assert code == 0
            report = json.loads(out)
            assert report["order"]["state"] == "held" and report["attempts"] == []
            assert report["held"]["interrupted"] is True
            assert "alpha may hold this order" in report["held"]["reason"]
            assert f"`order_accepted` with order_id {order_id}" in report["held"]["reason"]
            code, out = await asyncio.to_thread(cli, "orders", "show", str(order_id))
            assert code == 0 and "held      no answer recorded from alpha" in out

            code, out = await asyncio.to_thread(
                cli, "orders", "resolve", str(order_id), "--upstream-order", str(upstream_order)
            )
            structlog.reset_defaults()  # `resolve` configured logging onto capsys's stderr
            assert code == 0 and "placed at alpha" in out
            assert len(alpha.received_actions("add")) == 1  # never placed twice
    store = await Store.open(config.database)
    try:
        order = await store.order(order_id)
        assert order is not None and order.state == "placed"
        assert order.upstream_order == upstream_order
        reseller = await store.reseller_by_name("acme")
        assert reseller is not None and reseller.balance == v2.to_minor(Decimal("9"))
        assert await store.ledger_sum(reseller.id) == reseller.balance
    finally:
        await store.close()
