"""The hot reads: the key of every request and `status` of up to 100 orders.

Each is ONE statement, run on the event loop's own thread (no hop to aiosqlite's), and
`status` reads the covering index of migration 0013 alone, never the orders table. A database
locked against them sends the read to aiosqlite's thread, which waits there; a key the CLI
disabled or rotated is refused at once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from router import v2
from router.api import hash_key
from router.app import SQL_TRACE, create_app
from router.store import Store
from router.store.database import _connect_hot
from tests.conftest import build_config, free_port, service
from tests.test_at_scale import _kind, fill_orders, scans

ORDERS = 20_000
KEY = "key-of-acme"
DRIP_FEED_PARAMS = '{"runs":"7","interval":"30"}'
# Where a comment names `runs` (the custom comments of a Comments order), no runs.
COMMENT_PARAMS = '{"comments":"a \\"runs\\" b"}'

Trace = list[tuple[int, str]]  # (thread, statement) of every statement the store runs


@pytest.fixture
async def filled(tmp_path: Path) -> tuple[Path, int]:
    """A database of ORDERS orders (tests/test_at_scale.py's FILL) of the reseller of KEY,
    the last two a drip-feed order and one whose comments name `runs`; the reseller's ID."""
    database = tmp_path / "router.db"
    store = await Store.open(database)
    reseller = await store.create_reseller("acme", hash_key(KEY), 0)
    await fill_orders(store, reseller.id, ORDERS - 2)
    await store.write(
        lambda db: db.executemany(
            "INSERT INTO orders (reseller_id, service, state, status, link, quantity, "
            "charge, params, created_at, updated_at) "
            "VALUES (?, 1, 'placed', 'In progress', 'x', 700, 0, ?, 0, 0)",
            [(reseller.id, params) for params in (DRIP_FEED_PARAMS, COMMENT_PARAMS)],
        )
    )
    await store.close()
    return database, reseller.id


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Store]:
    """A store on `path`, closed however the test ends (its threads would keep pytest up)."""
    store = await Store.open(path)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def traced_router(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    database: Path,
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Trace]]:
    """The router on `database` (it calls no provider), and the trace of its statements."""
    url = f"http://127.0.0.1:{free_port()}/api/v2"
    config = build_config(database, {"alpha": url}, [service(1, [("alpha", 101)])])
    app = create_app(config, background=False, registry=CollectorRegistry())
    trace: Trace = []
    app[SQL_TRACE] = lambda statement: trace.append((threading.get_ident(), statement))
    yield await aiohttp_client(app), trace


def _expected(order_id: int) -> dict[str, str]:
    """What `status` shows of an order of FILL (charge 0, quantity 100)."""
    kind = _kind(order_id)
    if kind == "failed":  # never shown: the reseller was told there is no such order
        return {"error": v2.INCORRECT_ORDER}
    status = {"active": "In progress", "done": "Completed"}.get(kind, v2.PENDING)
    return {"charge": "0.00", "start_count": "0", "status": status, "remains": "100"}


async def test_status_of_100_orders_is_two_statements_on_the_event_loop(
    aiohttp_client: Any, filled: tuple[Path, int]
) -> None:
    database, _ = filled
    asked = [*range(1, 98), ORDERS - 1, ORDERS, ORDERS + 5]  # + the two, and an unknown ID
    async with traced_router(aiohttp_client, database) as (client, trace):
        await client.post("/api/v2", data={"key": KEY, "action": "balance"})  # warm, then:
        trace.clear()
        response = await client.post(
            "/api/v2", data={"key": KEY, "action": "status", "orders": ",".join(map(str, asked))}
        )
        answer = await response.json()
        statements = [(thread, sql) for thread, sql in trace if sql.lstrip().startswith("SELECT")]

    expected = {str(i): _expected(i) for i in range(1, 98)}
    for i in range(1, 98):
        if "error" not in expected[str(i)]:
            expected[str(i)]["currency"] = "USD"
    shown = {"charge": "0.00", "start_count": "0", "status": "In progress", "remains": "700"}
    expected[str(ORDERS - 1)] = {**shown, "currency": "USD", "runs": "7"}
    expected[str(ORDERS)] = {**shown, "currency": "USD"}
    expected[str(ORDERS + 5)] = {"error": v2.INCORRECT_ORDER}
    assert answer == expected

    # The key, then the 100 orders: one statement each, both on this (the loop's) thread.
    assert [thread for thread, _ in statements] == [threading.get_ident()] * 2, statements
    auth, status = (sql for _, sql in statements)
    assert "FROM resellers" in auth and "FROM orders" in status
    assert scans(database, [auth, status]) == {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {status}")]
    assert plan == ["SEARCH orders USING COVERING INDEX orders_status (reseller_id=? AND id=?)"]


async def test_the_plan_check_sees_a_read_of_the_table(filled: tuple[Path, int]) -> None:
    """The plan asserted above can fail: asking for one column more than the index holds
    (the link) reads the table for each order."""
    database, reseller_id = filled
    statement = (
        "SELECT id, link FROM orders INDEXED BY orders_status "
        f"WHERE reseller_id = {reseller_id} AND state <> 'failed' AND id IN (1, 2, 3)"
    )
    with contextlib.closing(sqlite3.connect(database)) as db:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}")]
    assert plan == ["SEARCH orders USING INDEX orders_status (reseller_id=? AND id=?)"]


async def test_a_database_locked_against_the_event_loop_is_read_in_aiosqlites_thread(
    tmp_path: Path,
) -> None:
    """The hot connection never waits for a lock on the event loop: a locked database sends
    the read to aiosqlite's thread (which waits out the busy timeout there, not on the loop).

    A WAL database cannot be locked against its readers on purpose, so the hot connection is
    replaced by one (made as the store makes it) to a rollback-journal copy of the database
    that another connection holds EXCLUSIVE: a real lock, refused at once (busy timeout 0).
    """
    async with opened(tmp_path / "router.db") as store:
        reseller = await store.create_reseller("acme", hash_key(KEY), 0)
        await fill_orders(store, reseller.id, 3)
        locked_path = tmp_path / "locked.db"
        with contextlib.closing(sqlite3.connect(locked_path, isolation_level=None)) as holder:
            with contextlib.closing(sqlite3.connect(tmp_path / "router.db")) as source:
                source.backup(holder)  # the same schema: what a statement is prepared against
            holder.execute("PRAGMA journal_mode=DELETE").fetchall()
            locked = _connect_hot(locked_path)
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                locked.execute("SELECT count(*) FROM resellers").fetchall()
            assert store._hot is not None
            store._hot.close()
            store._hot = locked
            found = await store.reseller_by_key_hash(hash_key(KEY))
            statuses = await store.order_statuses(reseller.id, [1, 2, 3])
            holder.execute("COMMIT")
    assert found == reseller
    assert {i: s.status for i, s in statuses.items()} == {2: "In progress", 3: "Completed"}


async def test_a_key_the_cli_disabled_or_rotated_is_refused_on_its_next_lookup(
    tmp_path: Path,
) -> None:
    """The server's store and the CLI's are two connections to one file: what the CLI changes,
    the server's next lookup (each a read transaction of its own) sees."""
    path = tmp_path / "router.db"
    async with opened(path) as server, opened(path) as cli:
        reseller = await cli.create_reseller("acme", hash_key(KEY), 0)
        assert await server.reseller_by_key_hash(hash_key(KEY)) == reseller
        await cli.set_enabled("acme", False)
        assert await server.reseller_by_key_hash(hash_key(KEY)) is None
        await cli.set_enabled("acme", True)
        await cli.set_key_hash("acme", hash_key("rotated"))
        assert await server.reseller_by_key_hash(hash_key(KEY)) is None
        assert await server.reseller_by_key_hash(hash_key("rotated")) == reseller


async def test_runs_follow_the_params_and_the_migration_fills_them_in(tmp_path: Path) -> None:
    """A drip-feed order's runs come from its params (migration 0013's triggers), also for the
    orders of a database from before the migration; orders_status replaces orders_by_reseller."""
    path = tmp_path / "router.db"
    ids = [1, 2, 3, 4]
    async with opened(path) as store:
        reseller = await store.create_reseller("acme", "hash", 0)
        await store.write(
            lambda db: db.executemany(
                "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, "
                "params, created_at, updated_at) VALUES (?, 1, 'placed', 'x', 1, 0, ?, 0, 0)",
                [
                    (reseller.id, text)
                    for text in (DRIP_FEED_PARAMS, COMMENT_PARAMS, "{}", '{"runs":"3"}')
                ],
            )
        )
        assert await _runs(store, reseller.id, ids) == {1: "7", 2: None, 3: None, 4: "3"}

        def change(db: sqlite3.Connection) -> None:  # params never change today; if they did:
            db.execute('UPDATE orders SET params = \'{"runs":"9"}\' WHERE id = 3')
            db.execute("UPDATE orders SET runs = '5' WHERE id = 4")  # no: the params say 3

        await store.write(change)
        assert await _runs(store, reseller.id, ids) == {1: "7", 2: None, 3: "9", 4: "3"}

    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        # Undo 0013 as if it had never run: what a database from the release before has.
        db.execute("DROP TRIGGER order_runs_from_params")
        db.execute("DROP TRIGGER order_runs_follow_params")
        db.execute("DROP INDEX orders_status")
        db.execute("ALTER TABLE orders DROP COLUMN runs")
        db.execute("CREATE INDEX orders_by_reseller ON orders (reseller_id, id)")
        db.execute("DELETE FROM schema_migrations WHERE name = '0013_status_covering_index.sql'")

    async with opened(path) as store:
        assert await _runs(store, reseller.id, ids) == {1: "7", 2: None, 3: "9", 4: "3"}
    with contextlib.closing(sqlite3.connect(path)) as db:
        indexes = {row[0] for row in db.execute("SELECT name FROM pragma_index_list('orders')")}
    assert "orders_status" in indexes and "orders_by_reseller" not in indexes


async def _runs(store: Store, reseller_id: int, ids: list[int]) -> dict[int, str | None]:
    return {i: s.runs for i, s in (await store.order_statuses(reseller_id, ids)).items()}
