"""The hot path and the sync read by index: EXPLAIN QUERY PLAN of every statement they run.

The router serves a database already holding orders (tests.test_at_scale's FILL), against real
simulated providers, and every statement its store runs is captured (`SQL_TRACE`) per phase:
each reseller action (`services`, `balance`, `add` with a failover, `status` of one ID and of
100, `refill`, `refill_status`, `cancel`), then a status-sync pass, a balance and catalogue
read, the call log's flush and prune. No plan may read a growing table whole. The plans do not
depend on the number of rows (the router never runs ANALYZE), so a modest fill is enough; the
million orders of tests/test_at_scale.py cover start-up, /healthz and /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from router.api import hash_key
from router.app import CALLS, ORDER_SYNC, PROVIDER_WATCHER, SQL_TRACE, create_app
from router.sim import Fault
from router.store import Store
from tests.conftest import SimFactory, build_config, service
from tests.test_at_scale import fill_orders, scans

FILLED = 20_000
KEY = "plans-key"
REFUSED_SERVICE = 101  # alpha refuses it: every add of service 1 fails over to beta


async def test_every_statement_of_the_hot_path_and_the_sync_uses_an_index(
    aiohttp_client: Any, start_sim: SimFactory, tmp_path: Path
) -> None:
    database = tmp_path / "router.db"
    store = await Store.open(database)
    reseller = await store.create_reseller("acme", hash_key(KEY), 10_000_000_000)
    await fill_orders(store, reseller.id, FILLED)  # its orders at alpha, beta and gone
    await store.close()

    alpha, beta = await start_sim(), await start_sim()
    alpha.set_fault(REFUSED_SERVICE, Fault.REFUSE)
    config = build_config(
        database,
        {"alpha": alpha.url, "beta": beta.url},
        [service(1, [("alpha", 101), ("beta", 101)]), service(2, [("beta", 101)])],
    )
    app = create_app(config, background=False, registry=CollectorRegistry())
    statements: list[str] = []
    app[SQL_TRACE] = statements.append
    client = await aiohttp_client(app)
    captured: dict[str, list[str]] = {}

    async def phase(name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        statements.clear()
        result = await work()
        captured[name] = list(statements)
        return result

    async def call(**params: Any) -> Any:
        response = await client.post("/api/v2", data={"key": KEY, **params})
        assert response.status == 200
        return await response.json()

    add = {"action": "add", "link": "https://example.com/a", "quantity": "100"}
    await phase("services", lambda: call(action="services"))
    await phase("balance", lambda: call(action="balance"))
    failed_over = await phase("add, failing over", lambda: call(service="1", **add))
    placed = await phase("add", lambda: call(service="2", **add))
    assert "order" in failed_over and "order" in placed, (failed_over, placed)
    await phase("status", lambda: call(action="status", order=str(placed["order"])))
    hundred = ",".join(str(i) for i in [placed["order"], *range(FILLED - 98, FILLED + 1)])
    answer = await phase("status of 100", lambda: call(action="status", orders=hundred))
    assert len(answer) == 100
    beta.advance(3600)  # the order is Completed there: a refill is possible
    refill = await phase("refill", lambda: call(action="refill", order=str(placed["order"])))
    if "refill" in refill:
        await phase("refill_status", lambda: call(action="refill_status", refill=refill["refill"]))
    await phase("cancel", lambda: call(action="cancel", orders=str(failed_over["order"])))

    now = time.time() + 10 * 86400  # every active order is due
    await phase("status sync", lambda: app[ORDER_SYNC].run_once(now=now))
    watcher = app[PROVIDER_WATCHER]
    await phase("balances", watcher.balances_once)
    await phase("catalogues", watcher.catalogues_once)
    await phase("call log flush", app[CALLS].flush)
    await phase("call prune", lambda: app[CALLS].store.prune_calls(time.time() - 60))

    assert alpha.received_actions("add") and beta.received_actions("add")  # it failed over
    for name, seen in captured.items():
        assert seen, f"the trace saw no statement of {name}"
        assert scans(database, seen) == {}, f"{name} scans a growing table"
    written = [s for s in captured["status sync"] if s.lstrip().upper().startswith("UPDATE")]
    assert written, "the sync pass recorded no status: it did not reach the filled orders"
