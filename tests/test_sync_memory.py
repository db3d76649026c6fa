"""The status sync's memory is bounded: a call's slot is held until its page is recorded, and a
pass reads the due orders a page at a time, never the whole set of active orders at once.

Each test watches the pass through what it asks of the store (each page read, each page
recorded, counted by a thin wrapper that calls the real method) and through the simulator's
count of status calls: no mock of the sync, the client or the database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from router.app import SQL_TRACE, create_app
from router.config import Sync
from router.sim import Fault, SimProvider
from router.store import ActiveOrder, NewOrder, StatusChange, StatusRecord, Store
from router.sync.orders import PAGE
from tests.conftest import (
    Router,
    RouterFactory,
    RouterTestServer,
    SimFactory,
    build_config,
    service,
    wait_for,
)
from tests.test_at_scale import scans
from tests.test_sync import STEP, SteppedClock, open_router, syncer

IN_FLIGHT = 2  # sync.calls_in_flight of these tests


@dataclass
class Watched:
    """What the pass asked of the store: each page read and each page recorded, in order."""

    reads: list[list[int]] = field(default_factory=list)  # order IDs of each page read
    limits: list[float] = field(default_factory=list)  # the `limit` of each read
    entered: int = 0  # record_statuses calls begun
    recorded: int = 0  # record_statuses calls ended
    outstanding: list[int] = field(default_factory=list)  # at each read: pages not yet recorded
    live: list[int] = field(default_factory=list)  # at each read: ActiveOrder objects alive

    def watch(self, monkeypatch: pytest.MonkeyPatch, store: Store, *, count_live: bool) -> None:
        orders_due, record_statuses = store.orders_due, store.record_statuses

        async def reading(provider: str, **kwargs: Any) -> list[ActiveOrder]:
            page = await orders_due(provider, **kwargs)
            if page:
                self.outstanding.append(len(self.reads) - self.recorded)
                self.reads.append([order.id for order in page])
            self.limits.append(kwargs.get("limit", math.inf))
            if count_live:
                self.live.append(sum(isinstance(o, ActiveOrder) for o in gc.get_objects()))
            return page

        async def recording(
            records: Sequence[StatusRecord], *, checked_at: float
        ) -> list[StatusChange]:
            self.entered += 1
            try:
                return await record_statuses(records, checked_at=checked_at)
            finally:
                self.recorded += 1

        monkeypatch.setattr(store, "orders_due", reading)
        monkeypatch.setattr(store, "record_statuses", recording)


async def active_orders(router: Router, sim: SimProvider, count: int) -> range:
    """`count` active orders at `alpha` (created in the simulator, then in the store in one
    transaction), all due at the next pass."""
    await router.reseller("acme", "1000")
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    new = NewOrder(
        reseller_id=reseller.id,
        service=1,
        link="https://x.test/a",
        quantity=100,
        charge=100,
        params={"link": "https://x.test/a", "quantity": "100"},
        provider="alpha",
        upstream_service=101,
    )
    upstream_ids = sim.create_orders(101, count, quantity=100)
    return await router.store.create_placed_orders([(new, i) for i in upstream_ids])


@contextlib.contextmanager
def write_lock_held(database: object) -> Iterator[None]:
    """The database's write lock, taken by a second connection (as the CLI would) and held
    until the block ends: the router's writes wait for it (busy_timeout)."""
    db = sqlite3.connect(str(database), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def test_a_call_slot_is_held_until_its_page_is_recorded(
    start_sim: SimFactory, start_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the answers cannot be written (the write lock is held elsewhere), the pass stops
    at `calls_in_flight` pages: no further page is read and no further call goes out; once
    the lock is free the pass goes on and every order is recorded once."""
    pages = 5
    sim = await start_sim(balance=Decimal(100000), progress_seconds=36000, partial_every=0)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"alpha": sim.url},
        [service(1, [("alpha", 101)])],
        sync=Sync(calls_in_flight=IN_FLIGHT),
    )
    ids = await active_orders(router, sim, pages * PAGE)
    watched = Watched()
    watched.watch(monkeypatch, router.store, count_live=False)
    gate = syncer(router)._in_flight["alpha"]
    before = len(sim.received_actions("status"))
    clock.now += STEP

    with write_lock_held(router.config.database):
        sync = asyncio.create_task(syncer(router).run_once())
        # Both calls answered and their pages waiting to be written, and the pass waiting for
        # a free slot: where it stays as long as the lock is held. A slot released before its
        # page is written would have let the pass read a third page to get here.
        await wait_for(
            lambda: watched.entered >= IN_FLIGHT and gate.locked(),
            "both pages waiting to be recorded, the pass waiting for a slot",
        )
        assert len(watched.reads) == IN_FLIGHT
        assert len(sim.received_actions("status")) - before == IN_FLIGHT
        assert watched.recorded == 0 and not sync.done()

    await asyncio.wait_for(sync, 30)
    assert len(sim.received_actions("status")) - before == pages
    assert sorted(i for page in watched.reads for i in page) == list(ids)  # each once
    assert watched.recorded == pages
    assert max(watched.outstanding) < IN_FLIGHT  # a page read only when a slot was free
    monkeypatch.undo()
    assert await router.store.orders_due("alpha", due_by=clock.now) == []


async def test_a_pass_reads_the_due_orders_a_page_at_a_time(
    start_sim: SimFactory, start_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over 12 pages of due orders, each read asks for one page (keyset pagination: each order
    read once), and at no read are more than `calls_in_flight` pages of orders alive in the
    process (counted among every object the garbage collector tracks)."""
    count = 12 * PAGE - 30
    sim = await start_sim(balance=Decimal(100000), progress_seconds=36000, partial_every=0)
    clock = SteppedClock()
    router = await open_router(
        start_router,
        clock,
        {"alpha": sim.url},
        [service(1, [("alpha", 101)])],
        sync=Sync(calls_in_flight=IN_FLIGHT),
    )
    ids = await active_orders(router, sim, count)
    watched = Watched()
    watched.watch(monkeypatch, router.store, count_live=True)
    gc.collect()
    alive_before = sum(isinstance(o, ActiveOrder) for o in gc.get_objects())
    before = len(sim.received_actions("status"))
    clock.now += STEP

    await syncer(router).run_once()

    pages = math.ceil(count / PAGE)
    assert [len(page) for page in watched.reads] == [PAGE] * (pages - 1) + [count % PAGE]
    assert all(limit <= PAGE for limit in watched.limits)
    assert sorted(i for page in watched.reads for i in page) == list(ids)  # each once
    assert len(sim.received_actions("status")) - before == pages
    assert max(watched.live) - alive_before <= IN_FLIGHT * PAGE
    assert max(watched.outstanding) < IN_FLIGHT
    assert watched.recorded == pages
    monkeypatch.undo()
    assert await router.store.orders_due("alpha", due_by=clock.now) == []


async def test_every_statement_of_a_pass_reads_by_index(
    start_sim: SimFactory, aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    """Every statement two passes run (an unreadable answer, then Completed and Partial ones
    with their refunds), EXPLAINed: no scan of a growing table; each page of due orders is a
    seek into orders_due at the keyset, in the index's order (no step over the orders before
    it, no sort of every due order to find the next page)."""
    sim = await start_sim(balance=Decimal(100000), progress_seconds=10, partial_every=3)
    config = build_config(
        tmp_path / "router.db", {"alpha": sim.url}, [service(1, [("alpha", 101)])]
    )
    config = dataclasses.replace(config, sync=Sync(calls_in_flight=IN_FLIGHT))
    registry = CollectorRegistry()
    app = create_app(config, background=False, registry=registry)
    statements: list[str] = []
    app[SQL_TRACE] = statements.append
    router = Router(await aiohttp_client(RouterTestServer(app)), config, registry)
    await active_orders(router, sim, 2 * PAGE + 1)
    clock = SteppedClock()
    syncer(router).clock = clock
    sim.advance(sim.progress_seconds)  # every order has ended upstream
    statements.clear()

    sim.set_answer_fault("status", Fault.DEEP_JSON)
    clock.now += STEP
    await syncer(router).run_once()
    sim.set_answer_fault("status", None)
    clock.now += STEP
    await syncer(router).run_once()

    assert router.metric("smm_router_refunds_total", provider="alpha", status="Partial") > 0
    assert scans(config.database, statements) == {}
    pages = [s for s in statements if "INDEXED BY orders_due" in s and "LIMIT" in s]
    assert len(pages) == 2 * 4  # 3 pages and the empty read that ends each pass
    with contextlib.closing(sqlite3.connect(config.database)) as db:
        for statement in pages:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}")]
            seeks = [step for step in plan if step.startswith("SEARCH")]
            assert seeks == [
                # the rest of the orders due at the keyset's time: a seek to the keyset's ID
                "SEARCH orders USING INDEX orders_due (provider=? AND next_check_at=? AND rowid>?)",
                # those due later, up to the pass's time
                "SEARCH orders USING INDEX orders_due "
                "(provider=? AND next_check_at>? AND next_check_at<?)",
            ], plan
            assert not any("TEMP B-TREE" in step for step in plan), plan  # merged, not sorted
