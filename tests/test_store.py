"""The store's own guarantees: writes that survive cancellation, one-statement settling,
migrations applied once and never edited, the held counter."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from router.store import Attempt, DuplicateRequest, NewOrder, StatusRecord, Store, StoreError
from router.upstream import CallRecord, Outcome


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    opened = await Store.open(tmp_path / "router.db")
    yield opened  # type: ignore[misc]
    await opened.close()


def _call() -> CallRecord:
    return CallRecord("alpha", "status", time.time(), 0.01, Outcome.ACCEPTED)


@pytest.mark.parametrize("yields", [1, 2, 3, 5, 8])
async def test_a_cancelled_transaction_never_leaves_one_open(store: Store, yields: int) -> None:
    """Cancelled at BEGIN, in its body or at COMMIT: the next transaction still works."""
    task = asyncio.create_task(store.record_calls([_call()]))
    for _ in range(yields):
        await asyncio.sleep(0)
    # On a fast machine the writer may have committed the batch and answered within the
    # yields: then there is nothing left to cancel, cancel() says so, and the batch is there.
    # Where the cancel took, the caller must see it.
    cancelled = task.cancel()
    if cancelled:
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await task
    await store.record_calls([_call(), _call()])  # "cannot start a transaction" if one is open
    # The cancelled batch is all there or not at all; one that had ended is there.
    assert await store.count_calls() in ((2, 3) if cancelled else (3,))


async def test_a_cancelled_caller_s_write_runs_to_its_end(store: Store) -> None:
    """Cancelled while its job runs in the writer's thread: the job ends and is committed (its
    outcome is known), and only then does the cancel reach the caller."""
    reseller = await store.create_reseller("acme", "hash", 0)
    inside, go_on = threading.Event(), threading.Event()

    def topup_then_wait(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO ledger (reseller_id, kind, amount, created_at) "
            "VALUES (?, 'topup', 500, 0)",
            (reseller.id,),
        )
        inside.set()
        go_on.wait()

    task = asyncio.create_task(store.write(topup_then_wait))
    await asyncio.to_thread(inside.wait)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # its job still runs: the caller waits for its end
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await store.reseller_by_name("acme")
    assert after is not None and after.balance == 500
    assert await store.ledger_sum(reseller.id) == 500


def _block_until_committed(writer: Any, committed: int) -> None:
    """Block the event loop (on purpose: nothing on it may run meanwhile) until the writer
    has committed past `committed` and handed the answer to the loop."""
    deadline = time.monotonic() + 10
    while writer.commits == committed and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # the answer is handed to the loop just after the commit count moves


async def test_a_cancel_that_crosses_the_job_s_answer_still_ends(store: Store) -> None:
    """The job's answer is already queued on the loop when its caller is cancelled: the
    answer reaches the cancelled future first. The caller must still get its cancel (the job
    is over and committed), not wait forever for an end that already came."""
    reseller = await store.create_reseller("acme", "hash", 0)
    go_on = threading.Event()

    def topup(db: sqlite3.Connection) -> None:
        go_on.wait()
        db.execute(
            "INSERT INTO ledger (reseller_id, kind, amount, created_at) "
            "VALUES (?, 'topup', 500, 0)",
            (reseller.id,),
        )

    writer = store._writer
    assert writer is not None
    committed = writer.commits
    task = asyncio.create_task(store.write(topup))
    await asyncio.sleep(0)  # the job is queued, its caller waits
    go_on.set()
    _block_until_committed(writer, committed)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert await store.ledger_sum(reseller.id) == 500


async def _placing(store: Store) -> tuple[int, int]:
    reseller = await store.create_reseller("acme", "hash", 1000)
    order_id = await store.reserve_order(
        NewOrder(reseller.id, 1, "https://x.example/p", 100, 300, {"quantity": "100"}, "a", 7)
    )
    assert order_id is not None
    return reseller.id, order_id


def _attempt(rank: int, provider: str, outcome: str, upstream_order: int | None = None) -> Attempt:
    return Attempt(rank, provider, 7, time.time(), 0.25, outcome, "refused: x", upstream_order)


async def test_settling_records_attempts_and_refunds_a_failure_once(store: Store) -> None:
    reseller_id, order_id = await _placing(store)
    attempts = [_attempt(0, "a", "refused"), _attempt(1, "b", "unreachable")]
    await store.settle_order(order_id, state="failed", attempts=attempts)
    order = await store.order(order_id)
    assert order is not None and order.state == "failed"
    assert await store.attempts(order_id) == attempts
    assert await store.ledger_sum(reseller_id) == 1000
    # Settling again (a bug, a replay) moves nothing and pays nothing twice.
    await store.settle_order(order_id, state="failed", attempts=[])
    assert await store.ledger_sum(reseller_id) == 1000
    assert [e.kind for e in await store.ledger(reseller_id)] == ["topup", "charge", "refund"]


async def test_settling_an_order_held_meanwhile_keeps_its_attempts(store: Store) -> None:
    """A restart held the order while its add was in flight: the accepted attempt, the only
    trace of the upstream order, is recorded; the order stays held for the operator."""
    reseller_id, order_id = await _placing(store)
    await _placed_by(store, order_id, _dead_owner())
    assert await store.hold_interrupted_orders(stale_before=0) == 1
    accepted = _attempt(0, "a", "accepted", upstream_order=4242)
    await store.settle_order(
        order_id, state="placed", attempts=[accepted], provider="a", upstream_order=4242
    )
    order = await store.order(order_id)
    assert order is not None and order.state == "held" and order.upstream_order is None
    assert await store.attempts(order_id) == [accepted]
    assert await store.ledger_sum(reseller_id) == 700


async def test_a_settle_retried_past_the_sweep_still_places_its_order(store: Store) -> None:
    """Its write waited out a locked database long enough for the sweep to hold the order
    (placing too long): nobody resolved it since, so the upstream order is stored."""
    reseller_id, order_id = await _placing(store)
    assert await store.hold_interrupted_orders(stale_before=time.time() + 1) == 1
    accepted = _attempt(0, "a", "accepted", upstream_order=4242)
    await store.settle_order(
        order_id, state="placed", attempts=[accepted], provider="a", upstream_order=4242
    )
    order = await store.order(order_id)
    assert order is not None and (order.state, order.upstream_order) == ("placed", 4242)
    assert await store.ledger_sum(reseller_id) == 700


async def test_a_settle_never_takes_over_what_another_process_placed(store: Store) -> None:
    """Held by the sweep, then re-routed by the operator (another process places it now):
    the late settle records its attempt and moves nothing."""
    _, order_id = await _placing(store)
    assert await store.hold_interrupted_orders(stale_before=time.time() + 1) == 1
    assert await store.begin_reroute(order_id, "b", 8, "reroute by ops")
    await _placed_by(store, order_id, "elsewhere.example:4242:feedface")
    late = _attempt(0, "a", "accepted", upstream_order=4242)
    for state in ("placed", "held", "failed"):
        await store.settle_order(
            order_id, state=state, attempts=[late], provider="a", upstream_order=4242
        )
    order = await store.order(order_id)
    assert order is not None and (order.state, order.provider) == ("placing", "b")
    assert order.upstream_order is None
    assert await store.attempts(order_id) == [late] * 3  # the trace of the upstream order


def _dead_owner() -> str:
    """The owner token of a process of this host that has ended."""
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its PID names no process now
    return f"{socket.gethostname()}:{ended.pid}:0123abcd"


async def _placed_by(store: Store, order_id: int, owner: str | None) -> None:
    await store.write(
        lambda db: db.execute("UPDATE orders SET placing_by = ? WHERE id = ?", (owner, order_id))
    )


async def test_start_up_holds_only_what_no_live_process_is_placing(store: Store) -> None:
    reseller = await store.create_reseller("acme", "hash", 10_000)
    owners = {
        "this process": store.owner,
        "a live process": f"{socket.gethostname()}:{os.getppid()}:feedface",
        "another host": "elsewhere.example:4242:00000000",
        "a dead process": _dead_owner(),
        "this PID, an earlier incarnation": f"{socket.gethostname()}:{os.getpid()}:00000000",
        "before owners were recorded": None,
    }
    orders: dict[str, int] = {}
    for name, owner in owners.items():
        order_id = await store.reserve_order(
            NewOrder(reseller.id, 1, "https://x.example/p", 100, 100, {}, "a", 7)
        )
        assert order_id is not None
        await _placed_by(store, order_id, owner)
        orders[name] = order_id

    assert await store.hold_interrupted_orders(stale_before=0) == 3

    async def state(name: str) -> str:
        order = await store.order(orders[name])
        assert order is not None
        return order.state

    assert {name: await state(name) for name in orders} == {
        "this process": "placing",
        "a live process": "placing",
        "another host": "placing",
        "a dead process": "held",
        "this PID, an earlier incarnation": "held",
        "before owners were recorded": "held",
    }
    # Placing for longer than any upstream call may take: held whoever placed it.
    assert await store.hold_interrupted_orders(stale_before=time.time() + 1) == 3
    assert {await state(name) for name in orders} == {"held"}
    assert await store.ledger_sum(reseller.id) == 10_000 - 6 * 100  # funds stay reserved


# --- Request IDs and open refills ----------------------------------------------------------------


def _new(reseller_id: int, charge: int = 100, request_id: str | None = None) -> NewOrder:
    return NewOrder(reseller_id, 1, "https://x.example/p", 100, charge, {}, "a", 7, request_id)


async def test_an_integrity_error_other_than_the_balance_is_no_lack_of_funds(store: Store) -> None:
    """A negative charge passes the funds WHERE clause and fails the orders CHECK: a bug to
    report (an internal error), not `Not enough funds on balance`."""
    reseller = await store.create_reseller("acme", "hash", 1000)
    with pytest.raises(StoreError, match="charge >= 0"):
        await store.reserve_order(_new(reseller.id, charge=-5))
    with pytest.raises(StoreError, match="CHECK"):  # the request ID CHECK of migration 0007
        await store.reserve_order(_new(reseller.id, request_id="has space"))
    assert await store.count_orders() == {}
    assert await store.ledger_sum(reseller.id) == 1000
    assert await store.reserve_order(_new(reseller.id, charge=5000)) is None  # short of funds


async def test_a_request_id_makes_one_order_per_reseller(store: Store) -> None:
    acme = await store.create_reseller("acme", "hash-a", 1000)
    other = await store.create_reseller("other", "hash-o", 1000)
    first = await store.reserve_order(_new(acme.id, request_id="r-1"))
    assert first is not None
    with pytest.raises(DuplicateRequest) as caught:
        await store.reserve_order(_new(acme.id, charge=300, request_id="r-1"))
    assert caught.value.first.id == first and caught.value.first.request_id == "r-1"
    # Short of funds now, but the ID was used: still the first order, not "no funds".
    with pytest.raises(DuplicateRequest):
        await store.reserve_order(_new(acme.id, charge=5000, request_id="r-1"))
    theirs = await store.reserve_order(_new(other.id, request_id="r-1"))
    assert theirs is not None and theirs != first
    assert await store.reserve_order(_new(acme.id, charge=5000, request_id="r-2")) is None
    assert await store.ledger_sum(acme.id) == 900
    assert await store.count_orders(acme.id) == {"placing": 1}


async def test_open_refills_of(store: Store) -> None:
    _, order_id = await _placing(store)
    await store.settle_order(order_id, state="placed", attempts=[], provider="a", upstream_order=9)
    order = await store.order(order_id)
    assert order is not None
    assert await store.open_refills_of([order_id]) == {}
    made = await store.create_refills([(order, 501)])
    assert list(made) == [order_id]
    assert await store.open_refills_of([order_id, 12345]) == {order_id: made[order_id]}
    [refill] = await store.open_refills("a")
    await store.record_refill_statuses([(refill, "Completed")])
    assert await store.open_refills_of([order_id]) == {}


async def _plans(store: Store, work: Callable[[], Awaitable[Any]]) -> list[str]:
    """The query plan of every statement the store's reader runs during `work`."""
    statements: list[str] = []
    reader = store._reader  # the statements as run, values bound
    await reader.set_trace_callback(statements.append)
    try:
        await work()
    finally:
        await reader.set_trace_callback(None)
    plans = []
    for statement in statements:
        rows = await reader.execute_fetchall(f"EXPLAIN QUERY PLAN {statement}")
        plans.append(" / ".join(str(row[3]) for row in rows))
    return plans


async def test_request_id_and_open_refill_lookups_use_their_indexes(store: Store) -> None:
    reseller_id, order_id = await _placing(store)
    plans = await _plans(store, lambda: store.order_by_request_id(reseller_id, "r-1"))
    plans += await _plans(store, lambda: store.open_refills_of([order_id, 2, 3]))
    assert len(plans) == 2
    assert "orders USING INDEX orders_by_request_id" in plans[0]
    assert "refills USING INDEX refills_open_by_order" in plans[1]
    assert not [plan for plan in plans if "SCAN" in plan], plans


# --- Migrations ------------------------------------------------------------------------------

# Every released migration, with the SHA-256 of its file. A released migration is never edited:
# a schema change goes in a new file. A new migration adds its line here when it lands.
RELEASED_MIGRATIONS = {
    "0001_initial.sql": "c70fe8975b2b7bdec7408058a5426d0f2780a4291a0fb4755b7de7df8df52355",
    "0002_order_sync.sql": "6e5d66c9b533c01f137a4d7f0ec1e518d9ac979e41df31c8e6bd5fa4446e7fcd",
    "0003_providers.sql": "7840d02f071ba6e5b0f61cfc8c1417cc267e78f1cd22e78b00a1ab8477498676",
    "0004_settle_in_one_statement.sql": (
        "7438096607e4c92b1c5a476f6aec5ad5039bb9255886f3b8e6893135a91ed4cf"
    ),
    "0005_placing_owner.sql": "31488c889be2215fd325e41655ec1db0a038f88dee5ee300693f366b1c796e96",
    "0006_one_local_order_per_upstream_order.sql": (
        "6ed62be0ef79d2e519e7cc2771acc5a2509378b7c06b96898163389c493cd17f"
    ),
    "0007_request_ids_and_open_refills.sql": (
        "08d1e482367808fae773ebe96ed70c1d3b29f0829f584bf70d59b8245b660cd3"
    ),
    "0008_held_counter_and_indexes.sql": (
        "d916751870c20a47f1e86177fa7164672c2239ed0eb2bea6a958f9793450a75a"
    ),
    "0009_routing_records.sql": (
        "7e5a414f51b78ae73e39fa786b3a239afc55581df303db0cc77cf996e4fec29c"
    ),
    "0010_money_totals.sql": "c71b5d44060cd23d27dbb8d536ada05d2947ed65402b747a5584c2046d247163",
    "0011_report_rollups.sql": "0da8f8d27ae471a405cbfb010370f9fe7041511fcb5947d81d0661e96eaeaacb",
    "0013_status_covering_index.sql": (
        "57257bd65bd6a84532d3d14dc9a3559209a23a00c480b132f2da09d21f80d07e"
    ),
    "0012_call_rollups.sql": "3a43b561d06d270d107cfaf4e5dc1759f53d8c0960c323476b40b37ae0e9ebc4",
    "0014_call_hours.sql": "2928c4fcaa13dd6ebe6bdf2e7ed3f49ceaf41ff35950db687d5a3613986a05a6",
    "0015_planned_costs.sql": "269f00daaef982b9284aaa76d58e991c3a0ddbc86a9f1bb7847846ff8e98bd30",
    "0016_held_ages_from_the_index.sql": (
        "c808bcbda732976c6c17028fcdb8d989b8de8a2dae8061004b5de35f72099ce1"
    ),
}


def _shipped_migrations() -> dict[str, str]:
    folder = resources.files("router") / "migrations"
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }


def test_a_released_migration_is_never_edited() -> None:
    """Each shipped migration file is byte for byte the one released, and each is listed.

    A new migration adds its line to RELEASED_MIGRATIONS (the message below prints it); a
    released one is never changed: a database created before the edit would never see it.
    """
    shipped = _shipped_migrations()
    for name, digest in RELEASED_MIGRATIONS.items():
        assert name in shipped, f"released migration {name} is gone"
        assert shipped[name] == digest, f"released migration {name} was edited"
    unlisted = {name: digest for name, digest in shipped.items() if name not in RELEASED_MIGRATIONS}
    assert not unlisted, "add to RELEASED_MIGRATIONS:\n" + "\n".join(
        f'    "{name}": "{digest}",' for name, digest in sorted(unlisted.items())
    )


def _schema(path: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    return [tuple(row) for row in rows]


def _applied(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT name FROM schema_migrations ORDER BY name")]


@pytest.mark.parametrize("round", range(3))
async def test_stores_opening_a_new_database_at_once_apply_each_migration_once(
    tmp_path: Path, round: int
) -> None:
    """A server and CLIs starting together on a new file: all open it, the schema is whole,
    each migration is recorded once (the applied set is read again under the write lock)."""
    alone = await Store.open(tmp_path / "alone.db")
    await alone.close()
    path = tmp_path / "together.db"

    opened = await asyncio.gather(*(Store.open(path) for _ in range(4)), return_exceptions=True)
    stores = [store for store in opened if isinstance(store, Store)]
    if len(stores) < len(opened):
        for store in stores:
            await store.close()  # an open connection's thread would keep pytest from exiting
    assert [type(store) for store in opened] == [Store] * 4, opened

    reseller = await stores[0].create_reseller("acme", "hash", 100)
    for store in stores:
        assert await store.reseller_by_name("acme") == reseller
        assert await store.count_held() == 0
        await store.close()
    assert _applied(path) == sorted(_shipped_migrations())
    assert _schema(path) == _schema(tmp_path / "alone.db")


async def test_processes_starting_together_on_a_new_database(tmp_path: Path) -> None:
    """Other processes (CLIs) open the same new database while this one migrates it."""
    path = tmp_path / "router.db"
    script = (
        "import asyncio, sys\n"
        "from router.store import Store\n"
        "async def main():\n"
        "    store = await Store.open(sys.argv[1])\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    others = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path))
        for _ in range(3)
    ]
    store = await Store.open(path)
    assert [await other.wait() for other in others] == [0, 0, 0]
    await store.close()
    assert _applied(path) == sorted(_shipped_migrations())


async def test_a_read_only_store_never_creates_or_changes_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await Store.open(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()
    path = tmp_path / "router.db"
    await (await Store.open(path)).close()
    store = await Store.open(path, read_only=True)
    assert await store.count_held() == 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await store.create_reseller("acme", "hash", 0)
    await store.close()
    assert _applied(path) == sorted(_shipped_migrations())


# --- The held counter ------------------------------------------------------------------------


async def _held_by_count(store: Store) -> int:
    rows = await store.write(
        lambda db: db.execute("SELECT count(*) FROM orders WHERE state = 'held'").fetchall()
    )
    return int(next(iter(rows))[0])


async def test_the_held_counter_follows_every_way_in_and_out_of_held(store: Store) -> None:
    """The triggers of migration 0008 see inserts, updates of the state and deletes."""
    reseller = await store.create_reseller("acme", "hash", 10_000)
    order_id = await store.reserve_order(
        NewOrder(reseller.id, 1, "https://x.example/p", 100, 100, {}, "a", 7)
    )
    assert order_id is not None
    await _placed_by(store, order_id, _dead_owner())
    assert await store.hold_interrupted_orders(stale_before=0) == 1  # placing -> held
    assert await store.count_held() == await _held_by_count(store) == 1
    inside, checked = threading.Event(), threading.Event()

    def paths_no_code_takes(db: sqlite3.Connection) -> None:  # counted all the same
        db.execute(
            "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, params, "
            "created_at, updated_at) VALUES (?, 1, 'held', 'x', 1, 0, '{}', 0, 0)",
            (reseller.id,),
        )
        db.execute("UPDATE orders SET status = 'In progress' WHERE state = 'held'")
        inside.set()
        checked.wait()  # the writer's thread waits: the loop reads meanwhile

    writing = asyncio.create_task(store.write(paths_no_code_takes))
    await asyncio.to_thread(inside.wait)
    try:
        assert await store.count_held() == 1  # another connection: the insert is not committed
    finally:
        checked.set()
    await writing
    assert await store.count_held() == await _held_by_count(store) == 2
    await store.write(
        lambda db: db.execute("DELETE FROM orders WHERE state = 'held' AND id <> ?", (order_id,))
    )
    assert await store.count_held() == await _held_by_count(store) == 1
    assert await store.refund_held(order_id, "refund by ops")  # held -> canceled
    assert await store.count_held() == await _held_by_count(store) == 0


async def test_the_migration_counts_the_orders_already_held(tmp_path: Path) -> None:
    """A database from before migration 0008 starts its counter from the held orders it has."""
    path = tmp_path / "router.db"
    store = await Store.open(path)
    reseller = await store.create_reseller("acme", "hash", 0)
    await store.write(
        lambda db: db.executemany(
            "INSERT INTO orders (reseller_id, service, state, link, quantity, charge, params, "
            "created_at, updated_at) VALUES (?, 1, ?, 'x', 1, 0, '{}', 0, 0)",
            [(reseller.id, state) for state in ("held", "held", "placed", "failed", "held")],
        )
    )
    await store.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        # Undo 0008 as if it had never run: what a database from the release before has.
        for trigger in ("insert", "update", "delete"):
            db.execute(f"DROP TRIGGER order_held_counted_on_{trigger}")
        db.execute("DROP TABLE counters")
        db.execute("DROP INDEX orders_held")
        db.execute("DROP INDEX orders_placing")
        db.execute(
            "CREATE INDEX orders_unsettled ON orders (state) WHERE state IN ('placing', 'held')"
        )
        db.execute("DELETE FROM schema_migrations WHERE name = '0008_held_counter_and_indexes.sql'")

    store = await Store.open(path)
    assert await store.count_held() == 3
    await store.close()


async def test_routing_records_round_trip(store: Store) -> None:
    """The cost of each attempt, the planned cost and config version of an order, breaker
    transitions, the day's spend and final outcomes, as routing reads them back."""
    reseller = await store.create_reseller("acme", "hash", 10_000)
    new = NewOrder(reseller.id, 1, "x", 1000, 900, {}, "a", 7, config_version="abc123def456")
    order_id = await store.reserve_order(new)
    assert order_id is not None
    refused = Attempt(0, "b", 7, time.time() - 5, 0.5, "no_funds", "Not enough funds", cost=400)
    accepted = Attempt(1, "a", 7, time.time(), 0.1, "accepted", None, 55, cost=450)
    await store.settle_order(
        order_id,
        state="placed",
        attempts=[refused, accepted],
        provider="a",
        upstream_service=7,
        upstream_order=55,
        estimated_cost=450,
    )
    order = await store.order(order_id)
    assert order is not None and order.config_version == "abc123def456"
    assert await store.attempts(order_id) == [refused, accepted]
    [refusal] = await store.no_funds_refusals("b")
    assert (refusal.started_at, refusal.at, refusal.cost) == (
        refused.started_at,
        pytest.approx(refused.started_at + 0.5),
        400,
    )
    assert await store.no_funds_refusals("b", before=refused.started_at) == []
    assert await store.spend_since(["a", "b"], time.time() - 60) == {"a": 450, "b": 0}
    assert await store.spend_since(["a"], time.time() + 60) == {"a": 0}

    await store.record_breaker_event("a", 100.0, "open")
    await store.record_breaker_event("a", 200.0, "healthy")
    await store.record_breaker_event("b", 150.0, "open")
    last = await store.last_breaker_events(["a", "b", "c"])
    assert {name: (e.at, e.state) for name, e in last.items()} == {
        "a": (200.0, "healthy"),
        "b": (150.0, "open"),
    }
    assert await store.prune_breaker_events(older_than=1000.0) == 1  # a's first; the last stay
    assert set(await store.last_breaker_events(["a", "b"])) == {"a", "b"}

    page = await store.orders_due("a", due_by=time.time())
    assert [(o.cost, o.estimated_cost) for o in page] == [(None, 450)]
    [due] = page
    records = [StatusRecord(due.id, due.status, "Partial", time.time() + 60, remains=250, cost=300)]
    await store.record_statuses(records, checked_at=time.time())
    [outcome] = await store.final_outcomes(time.time() - 60)
    assert (outcome.provider, outcome.upstream_service) == ("a", 7)
    assert (outcome.completed, outcome.partial, outcome.canceled) == (0, 1, 0)
    assert outcome.partial_delivered == pytest.approx(0.75)
    assert await store.final_outcomes(time.time() + 60) == []
    assert await store.spend_since(["a"], time.time() - 60) == {"a": 300}  # recorded wins


async def test_routing_queries_use_their_indexes(store: Store) -> None:
    since = time.time() - 7 * 86400
    plans = await _plans(store, lambda: store.no_funds_refusals("b", before=time.time()))
    plans += await _plans(store, lambda: store.last_breaker_events(["a"]))
    plans += await _plans(store, lambda: store.spend_since(["a"], since))
    plans += await _plans(store, lambda: store.final_outcomes(since))
    assert len(plans) == 4
    assert "attempts USING INDEX attempts_by_provider" in plans[0]
    assert "breaker_events USING INDEX breaker_events_by_provider" in plans[1]
    assert "orders USING INDEX orders_by_provider" in plans[2]
    assert "orders USING COVERING INDEX orders_final" in plans[3]
    assert not [plan for plan in plans if "SCAN" in plan], plans
