"""Group commit: one writer commits every write queued as one transaction, a savepoint each
(but for a one-statement job: SQLite undoes a failed statement whole).

A batch is forced where it matters (a first job holds the writer's thread until the others
are queued) and observed by the batch each job reads (`Store.batch`) and the writer's counts
of commits and jobs (`Store.commit_counts`). The orders come through the real router app, or a
real `smm-router serve` process killed with SIGKILL, against a real simulator over loopback.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router import v2
from router.api import hash_key
from router.config import Limits
from router.store import Statement, Store
from router.store import writer as writer_module
from tests.conftest import RouterFactory, SimFactory, free_port, service, wait_for
from tests.test_held import router_process, wait_ready

CLIENT_CONNECTIONS = 100  # aiohttp's default limit, which the test client keeps
ADD = {"action": "add", "service": "1", "link": "x", "quantity": "1000"}  # 1.00 each


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "router.db")
    yield opened
    await opened.close()


@asynccontextmanager
async def writer_held(store: Store) -> AsyncIterator[asyncio.Task[None]]:
    """The writer's thread busy with one job until the block ends: whatever is submitted
    meanwhile waits in the queue, and goes in the batches after it."""
    inside, go_on = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        inside.set()
        go_on.wait()

    task = asyncio.ensure_future(store.write(hold))
    await asyncio.to_thread(inside.wait)  # the writer's thread is in it
    try:
        yield task
    finally:
        go_on.set()


def ledger_row(store: Store, reseller_id: int, amount: int) -> Callable[[sqlite3.Connection], int]:
    """A job adding a ledger row (the trigger moves the balance); the batch it ran in."""

    def job(db: sqlite3.Connection) -> int:
        batch = store.batch
        db.execute(
            "INSERT INTO ledger (reseller_id, kind, amount, created_at) "
            "VALUES (?, 'adjustment', ?, 0)",
            (reseller_id, amount),
        )
        return batch

    return job


async def queued(tasks: list[asyncio.Task[Any]]) -> None:
    """Until every task has submitted its job (each runs up to its wait for the answer)."""
    await asyncio.sleep(0)
    assert all(not task.done() for task in tasks)


async def test_a_failing_job_is_rolled_back_alone_and_its_batch_commits(store: Store) -> None:
    reseller = await store.create_reseller("acme", "hash", 1_000)
    ran_in: list[int] = []

    def debit_then_overdraw(db: sqlite3.Connection) -> None:
        ran_in.append(store.batch)
        ledger_row(store, reseller.id, -100)(db)  # its own first statement: undone with the rest
        ledger_row(store, reseller.id, -1_000_000)(db)  # below zero: the balance CHECK refuses

    commits_before, _ = store.commit_counts
    async with writer_held(store) as holder:
        good = [
            asyncio.create_task(store.write(ledger_row(store, reseller.id, 10))) for _ in range(3)
        ]
        bad = asyncio.create_task(store.write(debit_then_overdraw))
        good += [
            asyncio.create_task(store.write(ledger_row(store, reseller.id, 1))) for _ in range(3)
        ]
        await queued([*good, bad])
    await holder
    batches = await asyncio.gather(*good)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed: balance"):
        await bad

    assert len(set(batches)) == 1 and ran_in == batches[:1]  # all seven in one batch
    assert store.commit_counts[0] == commits_before + 2  # the holder's batch, then theirs
    after = await store.reseller_by_name("acme")
    assert after is not None and after.balance == 1_000 + 33
    assert await store.ledger_sum(reseller.id) == after.balance
    assert [e.amount for e in await store.ledger(reseller.id)] == [1_000, *[10] * 3, *[1] * 3]


async def test_a_failing_statement_is_undone_whole_without_a_savepoint(store: Store) -> None:
    """A Statement job runs without a savepoint: the one that fails after its first row took
    effect (two ledger rows, the second below zero) leaves nothing of itself, and the jobs of
    its batch, Statements and functions, commit with their answers."""
    reseller = await store.create_reseller("acme", "hash", 1_000)
    insert = "INSERT INTO ledger (reseller_id, kind, amount, created_at) VALUES "

    def statement(amount: int) -> Statement:
        return Statement(f"{insert}(?, 'topup', ?, 0) RETURNING amount", (reseller.id, amount))

    commits_before, _ = store.commit_counts
    async with writer_held(store) as holder:
        good = [asyncio.create_task(store.write(statement(10))) for _ in range(3)]
        bad = asyncio.create_task(
            store.write(
                Statement(
                    f"{insert}(?, 'topup', -100, 0), (?, 'topup', -1000000, 0)",
                    (reseller.id, reseller.id),
                )
            )
        )
        good.append(asyncio.create_task(store.write(ledger_row(store, reseller.id, 1))))
        good.append(asyncio.create_task(store.write(statement(2))))
        await queued([*good, bad])
    await holder
    answers = await asyncio.gather(*good)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed: balance"):
        await bad

    assert answers[:3] == [[(10,)]] * 3 and answers[4] == [(2,)]
    assert store.commit_counts[0] == commits_before + 2  # the holder's batch, then theirs
    after = await store.reseller_by_name("acme")
    assert after is not None and after.balance == 1_000 + 33
    assert [e.amount for e in await store.ledger(reseller.id)] == [1_000, *[10] * 3, 1, 2]


def test_no_migration_fails_a_statement_halfway() -> None:
    """A Statement job has no savepoint: it relies on SQLite undoing a failed statement whole.
    A conflict clause or trigger RAISE of FAIL stops a statement and KEEPS what it did so far;
    none may appear in the schema."""
    for migration in sorted(resources.files("router.migrations").iterdir(), key=str):
        if migration.name.endswith(".sql"):
            text = migration.read_text()
            assert not re.search(r"(?i)\bRAISE\s*\(\s*FAIL\b|\bON\s+CONFLICT\s+FAIL\b", text)
            assert not re.search(r"(?i)\bOR\s+FAIL\b", text), migration.name


async def test_a_commit_that_fails_fails_its_whole_batch_and_stores_none_of_it(
    store: Store,
) -> None:
    """A foreign key checked at COMMIT (deferred): the COMMIT fails, every caller of the batch
    gets its error, nothing of the batch is stored, and the writer goes on."""
    reseller = await store.create_reseller("acme", "hash", 1_000)

    def orphan_row(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA defer_foreign_keys = ON")  # this transaction's keys: at COMMIT
        db.execute(
            "INSERT INTO order_events (order_id, at, kind, status, detail) "
            "VALUES (987654, 0, 'status', 'Pending', 'no such order')"
        )

    async with writer_held(store) as holder:
        good = [
            asyncio.create_task(store.write(ledger_row(store, reseller.id, 10))) for _ in range(3)
        ]
        bad = asyncio.create_task(store.write(orphan_row))
        await queued([*good, bad])
    await holder
    outcomes = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes), outcomes
    assert all("FOREIGN KEY" in str(o) for o in outcomes)
    after = await store.reseller_by_name("acme")
    assert after is not None and after.balance == 1_000
    assert await store.ledger_sum(reseller.id) == 1_000
    await store.write(ledger_row(store, reseller.id, 5))  # the next batch commits as usual
    assert await store.ledger_sum(reseller.id) == 1_005


async def test_jobs_queued_together_share_one_commit_up_to_the_batch_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(writer_module, "MAX_BATCH", 5)
    store = await Store.open(tmp_path / "router.db")
    try:
        reseller = await store.create_reseller("acme", "hash", 0)
        commits, jobs = store.commit_counts
        ran, busy, cpu = store.writer_time
        async with writer_held(store) as holder:
            writes = [
                asyncio.create_task(store.write(ledger_row(store, reseller.id, 1)))
                for _ in range(12)
            ]
            await queued(writes)
        await holder
        batches = await asyncio.gather(*writes)
        assert [batches.count(b) for b in sorted(set(batches))] == [5, 5, 2]
        assert store.commit_counts == (commits + 1 + 3, jobs + 1 + 12)
        # The writer's own account of the same four batches: the holder's waited on the test,
        # so its wall time is more than its CPU; a thread's CPU never exceeds its wall time.
        ran_now, busy_now, cpu_now = store.writer_time
        assert ran_now == ran + 1 + 3
        assert 0 < cpu_now - cpu < busy_now - busy
        assert await store.ledger_sum(reseller.id) == 12
    finally:
        await store.close()


async def test_close_commits_every_write_queued_before_it(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "router.db")
    reseller = await store.create_reseller("acme", "hash", 0)
    async with writer_held(store) as holder:
        writes = [
            asyncio.create_task(store.write(ledger_row(store, reseller.id, 1))) for _ in range(20)
        ]
        await queued(writes)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
    await asyncio.gather(holder, *writes, closing)
    reopened = await Store.open(tmp_path / "router.db")
    try:
        assert await reopened.ledger_sum(reseller.id) == 20
    finally:
        await reopened.close()


async def test_1000_concurrent_adds_for_500_orders_worth_share_commits(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url},
        [service(1, [("alpha", 101)], rate="1.00")],
        limits=Limits(add=10_000, in_flight=1_000),  # all at once: the writer is under test
    )
    key = await router.reseller("acme", "500")
    commits, jobs = router.store.commit_counts

    # How many writes share a commit is the scheduler's to say (on a loaded machine, under two
    # a commit): so the first wave is forced to meet. The test client keeps 100 connections
    # (aiohttp's default), so 100 adds are in flight at once; the writer is held until all 100
    # wait at their reserve, and then runs them as one batch.
    writer = router.store._writer
    assert writer is not None
    async with writer_held(router.store) as holder:
        adds = [asyncio.create_task(router.call(key=key, **ADD)) for _ in range(1_000)]
        await wait_for(lambda: writer._queue.qsize() >= CLIENT_CONNECTIONS, "a wave queued")
    await holder
    answers = await asyncio.gather(*adds)

    placed = [a["order"] for a in answers if "order" in a]
    assert len(placed) == len(set(placed)) == 500
    assert [a for a in answers if "order" not in a] == [{"error": v2.NOT_ENOUGH_FUNDS}] * 500
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None and reseller.balance == 0
    assert await router.store.ledger_sum(reseller.id) == 0
    assert await router.store.count_orders(reseller.id) == {"placed": 500}
    assert len(sim.received_actions("add")) == 500
    # 1,000 reserves and 500 settles at least, and the holding job: a writer that committed
    # each alone would count as many commits as jobs. The first wave shared one commit; the
    # rest share as the scheduler lets them.
    commits, jobs = (
        now - before
        for now, before in zip(router.store.commit_counts, (commits, jobs), strict=True)
    )
    assert jobs >= 1_500  # and the call records, written in batches of their own
    assert commits <= jobs - (CLIENT_CONNECTIONS - 1), (commits, jobs)


# --- A SIGKILL among many adds ---------------------------------------------------------------

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
metrics: {{host: 127.0.0.1, port: {metrics_port}}}
database: router.db
currency: USD
providers:
  alpha: {{url: "{url}", key: "{key}", timeout: 10}}
sync: {{status_interval: 3600, balance_interval: 3600, catalogue_interval: 3600}}
limits: {{add: 1000000, status: 1000000, other: 1000000, in_flight: 10000}}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 10000
    route:
      - {{provider: alpha, service: 101}}
"""
KEY = "group-commit-kill-key-0123456789"
WORKERS = 48  # adds in flight at any time
ANSWERED_BEFORE_KILL = 300


async def test_a_sigkill_among_many_adds_loses_no_answered_order(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    sim = await start_sim()
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG.format(port=port, metrics_port=free_port(), url=sim.url, key=sim.key))
    store = await Store.open(tmp_path / "router.db")
    await store.create_reseller("acme", hash_key(KEY), v2.to_minor(Decimal("100000")))
    await store.close()
    base = f"http://127.0.0.1:{port}"
    answered: list[int] = []
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    async with aiohttp.ClientSession() as http:
        async with router_process(config, first_log) as process:
            await wait_ready(http, base, process, first_log)

            async def keep_adding() -> None:
                while True:
                    try:
                        async with http.post(
                            f"{base}/api/v2", data={"key": KEY, **ADD}
                        ) as response:
                            answer = await response.json()
                    except aiohttp.ClientError:
                        return  # the router is gone
                    answered.append(answer["order"])  # any other answer fails the test

            workers = [asyncio.create_task(keep_adding()) for _ in range(WORKERS)]
            await wait_for(lambda: len(answered) >= ANSWERED_BEFORE_KILL, "answered adds", 60)
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            await asyncio.gather(*workers)
        known = list(answered)

        # Start-up holds what the kill left placing.
        async with router_process(config, second_log) as process:
            await wait_ready(http, base, process, second_log)
            store = await Store.open(tmp_path / "router.db")
            try:
                for order_id in known:
                    order = await store.order(order_id)
                    assert order is not None and order.state == "placed", (order_id, order)
                    kinds = [e.kind for e in await store.order_ledger(order_id)]
                    assert kinds == ["charge"], (order_id, kinds)
                reseller = await store.reseller_by_name("acme")
                assert reseller is not None
                assert await store.ledger_sum(reseller.id) == reseller.balance
                counts = await store.count_orders(reseller.id)
                assert counts.get("placing", 0) == 0
                # Every order still holds its charge: placed, or held for the operator.
                charged = counts.get("placed", 0) + counts.get("held", 0)
                spent = v2.to_minor(Decimal("100000")) - reseller.balance
                assert spent == charged * v2.to_minor(Decimal("1")), (counts, spent)
                assert len(sim.orders) >= counts.get("placed", 0) >= len(known)
            finally:
                await store.close()
