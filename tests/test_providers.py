"""Provider balances, benches, catalogues, `providers` and `check --online`, against real sims."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from router import v2
from router.app import CALLS, FLEET, ORDER_SYNC, PROVIDER_WATCHER
from router.cli import main
from router.config import Sync, load
from router.health import ProviderHealth
from router.sim import CLOUDFLARE_502, Fault, SimProvider, default_catalogue
from router.sync.providers import ProviderWatcher, check_online
from tests.conftest import SIM_KEY, Router, RouterFactory, SimFactory, free_port, service


def watcher(router: Router) -> ProviderWatcher:
    return router.app[PROVIDER_WATCHER]


def health(router: Router, provider: str) -> ProviderHealth:
    return router.app[FLEET].health[provider]


def benched(router: Router, provider: str) -> bool:
    return health(router, provider).bench.active(router.app[FLEET].clock())


async def add(router: Router, key: str, quantity: int = 1000, service_id: int = 1) -> Any:
    return await router.call(
        key=key, action="add", service=service_id, link="https://x.test/p", quantity=quantity
    )


async def provider_of(router: Router, answer: Any) -> str | None:
    order = await router.store.order(answer["order"])
    assert order is not None and order.state == "placed"
    return order.provider


class CatalogueSim(SimProvider):
    """The simulator, answering `services` with a body the test sets (a provider's catalogue
    going wrong); every other action is the simulator's own."""

    def __init__(self, **kwargs: Any) -> None:
        self.catalogue_answer: web.Response | None = None
        super().__init__(**kwargs)

    def make_app(self) -> web.Application:
        @web.middleware
        async def services(request: web.Request, handler: Any) -> web.StreamResponse:
            params = {**request.query, **(await request.post())}
            if params.get("action") == "services" and self.catalogue_answer is not None:
                answer, self.catalogue_answer = self.catalogue_answer, None
                return answer  # one answer: a Response is sent only once
            response: web.StreamResponse = await handler(request)
            return response

        app = super().make_app()
        app.middlewares.append(services)
        return app

    def answer_catalogue(self, body: str, *, status: int = 200, kind: str = "json") -> None:
        self.catalogue_answer = web.Response(
            status=status, text=body, content_type=f"application/{kind}" if kind == "json" else kind
        )

    def answer_catalogue_without(self, *services: int) -> None:
        """A real catalogue, with `services` gone."""
        entries = [
            {**dataclasses.asdict(s), "rate": v2.format_money(s.rate), "min": str(s.min)}
            | {"max": str(s.max)}
            for s in default_catalogue()
            if s.service not in services
        ]
        self.answer_catalogue(json.dumps(entries))


async def start_catalogue_sim(**kwargs: Any) -> CatalogueSim:
    sim = CatalogueSim(key=SIM_KEY, **kwargs)
    await sim.start()
    return sim


# --- balances and benches ------------------------------------------------------------------------


async def test_no_funds_skips_the_provider_until_its_balance_recovers(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim(balance=Decimal("0.40"))  # service 101 costs 0.50 per 1000
    second = await start_sim()
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)], rate="2.00")],
    )
    key = await router.reseller("acme", "100")

    assert await provider_of(router, await add(router, key)) == "second"  # first: no funds
    assert await provider_of(router, await add(router, key)) == "second"
    assert len(first.received_actions("add")) == 1  # benched: not asked again
    assert router.metric("smm_router_provider_state", provider="first", state="benched") == 1

    await watcher(router).balances_once()  # still 0.40: no money came in
    assert await provider_of(router, await add(router, key)) == "second"
    assert len(first.received_actions("add")) == 1

    first.set_balance(Decimal("100"))
    await watcher(router).balances_once()  # 100 > 0.40: topped up
    assert router.metric("smm_router_provider_state", provider="first", state="healthy") == 1
    assert await provider_of(router, await add(router, key)) == "first"
    assert len(first.received_actions("add")) == 2
    assert len(second.received_actions("add")) == 3


async def test_balance_is_stored_and_exported(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(balance=Decimal("123.45678"), currency="EUR")
    down = f"http://127.0.0.1:{free_port()}/api/v2"
    router = await start_router({"alpha": sim.url, "down": down}, [service(1, [("alpha", 101)])])
    assert (
        router.registry.get_sample_value(
            "smm_router_provider_balance", {"provider": "alpha", "currency": "EUR"}
        )
        is None
    )

    await watcher(router).balances_once()

    assert router.metric("smm_router_provider_balance", provider="alpha", currency="EUR") == (
        pytest.approx(123.45678)
    )
    last = await router.store.last_balances()
    assert set(last) == {"alpha"}  # an unreachable provider stores nothing
    assert (last["alpha"].balance, last["alpha"].currency) == (12345678, "EUR")


async def test_the_loops_run_in_the_background(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(balance=Decimal("7.5"))
    router = await start_router(
        {"alpha": sim.url}, [service(1, [("alpha", 101)])], background=True
    )  # sync intervals of 0.2 s (conftest)
    deadline = time.monotonic() + 10
    while len(sim.received_actions("balance")) < 2 or not sim.received_actions("services"):
        assert time.monotonic() < deadline, "the balance and catalogue loops did not run"
        await asyncio.sleep(0.02)
    assert router.metric("smm_router_provider_balance", provider="alpha", currency="USD") == 7.5
    while "alpha" not in await router.store.catalogue_fetches():
        assert time.monotonic() < deadline, "the catalogue was not stored"
        await asyncio.sleep(0.02)


async def test_bench_ends_when_the_backoff_passes(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_sim()
    second = await start_sim()
    first.set_fault(101, Fault.NO_FUNDS)
    router = await start_router(
        {"first": first.url, "second": second.url},
        [service(1, [("first", 101), ("second", 101)])],
        sync=Sync(no_funds_backoff=0.05),
    )
    key = await router.reseller()
    assert await provider_of(router, await add(router, key)) == "second"
    assert benched(router, "first")
    first.set_fault(101, None)
    await asyncio.sleep(0.1)  # the back-off passes; no balance read in between
    assert await provider_of(router, await add(router, key)) == "first"


async def test_a_restarted_router_keeps_benches_and_catalogues(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_catalogue_sim(balance=Decimal("0.40"))
    second = await start_sim()
    try:
        providers = {"first": first.url, "second": second.url}
        services = [
            service(1, [("first", 101), ("second", 101)]),
            # Above the upstream's 2.40 per package: the margin floor lets it through.
            service(2, [("first", 102), ("second", 102)], type="Package", rate="3.00", max=1),
        ]
        router = await start_router(providers, services)
        key = await router.reseller()
        first.answer_catalogue_without(102)
        await watcher(router).catalogues_once()
        await watcher(router).balances_once()  # 0.40
        assert await provider_of(router, await add(router, key)) == "second"  # no funds

        again = await start_router(providers, services)  # same database, fresh memory
        assert benched(again, "first")
        assert health(again, "first").missing == {102}
        assert await provider_of(again, await add(again, key)) == "second"
        assert len(first.received_actions("add")) == 1

        first.set_balance(Decimal("50"))
        await watcher(again).balances_once()  # above the 0.40 stored before the bench
        assert await provider_of(again, await add(again, key)) == "first"
        answer = await again.call(key=key, action="add", service=2, link="https://x.test/p")
        assert await provider_of(again, answer) == "second"  # 102 is gone at first
    finally:
        await first.stop()


# --- catalogues ----------------------------------------------------------------------------------

BROKEN_CATALOGUES = {
    "error": ('{"error": "Invalid API key"}', 200, "json"),
    "error-4xx": ('{"error": "Too many requests, slow down"}', 403, "json"),
    "empty-list": ("[]", 200, "json"),
    "empty-body": ("", 200, "json"),
    "html": (CLOUDFLARE_502, 502, "text/html"),
    "html-200": ("<html><body>Maintenance</body></html>", 200, "text/html"),
    "garbage": ('[{"service": 101, "rate": "0.5', 200, "json"),
    "no-valid-entry": ('[{"service": "x"}, {"name": "Followers"}]', 200, "json"),
    "not-a-list": ('"services"', 200, "json"),
}


@pytest.mark.parametrize("answer", BROKEN_CATALOGUES.values(), ids=BROKEN_CATALOGUES.keys())
async def test_a_broken_catalogue_changes_nothing(
    start_sim: SimFactory, start_router: RouterFactory, answer: tuple[str, int, str]
) -> None:
    first = await start_catalogue_sim()
    second = await start_sim()
    try:
        router = await start_router(
            {"first": first.url, "second": second.url},
            [
                service(1, [("first", 101), ("second", 101)]),
                service(  # above the upstream's 12.00: the margin floor lets it through
                    3, [("first", 103), ("second", 103)], type="Custom Comments", rate="15", min=1
                ),
            ],
        )
        first.answer_catalogue_without(103)
        await watcher(router).catalogues_once()
        stored = await router.store.route_catalogue()
        fetches = await router.store.catalogue_fetches()
        assert [(r.provider, r.service, r.present) for r in stored] == [
            ("first", 101, True),
            ("first", 103, False),
            ("second", 101, True),
            ("second", 103, True),
        ]

        first.answer_catalogue(answer[0], status=answer[1], kind=answer[2])
        await watcher(router).catalogues_once()

        assert first.catalogue_answer is None  # it was asked
        after = await router.store.route_catalogue()
        assert [r for r in after if r.provider == "first"] == stored[:2]  # second's is fresh
        assert (await router.store.catalogue_fetches())["first"] == fetches["first"]
        assert health(router, "first").missing == {103}
        assert health(router, "second").missing == frozenset()
        key = await router.reseller()
        assert await provider_of(router, await add(router, key)) == "first"
        comments = await router.call(
            key=key, action="add", service=3, link="https://x.test/p", comments="a\nb"
        )
        assert await provider_of(router, comments) == "second"
        accepted = router.metric(
            "smm_router_catalogue_fetches_total", provider="first", outcome="accepted"
        )
        assert accepted == 1
    finally:
        await first.stop()


async def test_a_gone_upstream_service_is_skipped_until_it_is_back(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_catalogue_sim()
    second = await start_sim()
    try:
        router = await start_router(
            {"first": first.url, "second": second.url},
            [service(1, [("first", 101), ("second", 101)])],
        )
        key = await router.reseller()
        first.answer_catalogue_without(101)
        await watcher(router).catalogues_once()
        assert router.metric("smm_router_provider_routes_missing", provider="first") == 1

        assert await provider_of(router, await add(router, key)) == "second"
        assert first.received_actions("add") == []
        (listing,) = [r for r in await router.store.route_catalogue() if r.provider == "first"]
        assert (listing.service, listing.present, listing.seen_at) == (101, False, None)

        await watcher(router).catalogues_once()  # the sim's own catalogue: 101 is back
        assert await provider_of(router, await add(router, key)) == "first"
        (listing,) = [r for r in await router.store.route_catalogue() if r.provider == "first"]
        assert (listing.present, listing.rate, listing.min, listing.max) == (
            True,
            50000,
            10,
            100000,
        )
        assert router.metric("smm_router_provider_routes_missing", provider="first") == 0
    finally:
        await first.stop()


async def test_an_unreadable_entry_is_not_a_gone_service(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """A routed service listed with a broken entry (rate "n/a") is still there: its route keeps
    its last known terms and keeps taking orders."""
    first = await start_catalogue_sim()
    try:
        router = await start_router({"first": first.url}, [service(1, [("first", 101)])])
        key = await router.reseller()
        await watcher(router).catalogues_once()  # the sim's own catalogue
        (before,) = await router.store.route_catalogue()
        entries = [
            {**dataclasses.asdict(s), "rate": v2.format_money(s.rate)} for s in default_catalogue()
        ]
        entries[0]["rate"] = "n/a"  # service 101
        first.answer_catalogue(json.dumps(entries))
        await watcher(router).catalogues_once()

        assert router.metric("smm_router_provider_routes_missing", provider="first") == 0
        (after,) = await router.store.route_catalogue()
        assert (after.present, after.rate, after.seen_at) == (True, 50000, before.seen_at)
        assert await provider_of(router, await add(router, key)) == "first"
    finally:
        await first.stop()


async def test_a_shrunken_catalogue_is_held_back_until_it_is_repeated(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    first = await start_catalogue_sim()
    try:
        router = await start_router({"first": first.url}, [service(1, [("first", 101)])])
        await watcher(router).catalogues_once()  # all 16 services
        every_other = [s.service for s in default_catalogue()][:15]  # only 116 is left
        first.answer_catalogue_without(*every_other)
        await watcher(router).catalogues_once()
        assert health(router, "first").missing == frozenset()
        assert (
            router.metric(
                "smm_router_catalogue_fetches_total", provider="first", outcome="held_back"
            )
            == 1
        )
        first.answer_catalogue_without(*every_other)  # the same again: it is real
        await watcher(router).catalogues_once()
        assert health(router, "first").missing == {101}
    finally:
        await first.stop()


# --- smm-router providers ------------------------------------------------------------------------

PROVIDERS_YAML = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: router.db
currency: USD
providers:
{providers}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "2.00"
    min: 10
    max: 10000
    route:
      - {{provider: first, service: 101}}
      - {{provider: second, service: 101}}
"""


def write_config(tmp_path: Path, providers: dict[str, str]) -> Path:
    lines = "\n".join(
        f'  {name}: {{url: "{url}", key: "${{SIM_KEY}}", timeout: 2}}'
        for name, url in providers.items()
    )
    path = tmp_path / "router.yaml"
    path.write_text(PROVIDERS_YAML.format(providers=lines))
    return path


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command line in a thread (it runs its own event loop), against our sims."""
    capsys.readouterr()  # the router's own log lines so far
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_providers_report(
    start_sim: SimFactory,
    start_router: RouterFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIM_KEY", SIM_KEY)
    first = await start_sim()  # 101: 0.50 per 1000
    catalogue = [dataclasses.replace(s, rate=Decimal("0.80")) for s in default_catalogue()]
    second = await start_sim(services=catalogue)
    providers = {
        "first": first.url,
        "second": second.url,
        "third": f"http://127.0.0.1:{free_port()}/api/v2",
    }
    config_file = write_config(tmp_path, providers)
    router = await start_router(
        providers, [service(1, [("first", 101), ("second", 101)], rate="2.00")]
    )
    key = await router.reseller("acme", "100")
    assert await provider_of(router, await add(router, key, 1000)) == "first"
    first.set_fault(101, Fault.REFUSE)
    assert await provider_of(router, await add(router, key, 500)) == "second"
    first.set_fault(101, None)
    assert await provider_of(router, await add(router, key, 2000)) == "first"

    code, out, _ = await run_cli(capsys, "providers", "--json", "--config", str(config_file))
    before = {row["provider"]: row for row in json.loads(out)["providers"]}
    assert code == 0
    assert (before["first"]["cost"], before["first"]["uncosted_orders"]) == ("0.00", 2)
    assert before["first"]["margin"] == "6.00"
    assert before["first"]["state"] == "catalogue missing"

    await watcher(router).catalogues_once()
    await watcher(router).balances_once()
    await router.app[CALLS].flush()

    code, out, _ = await run_cli(capsys, "providers", "--json", "--config", str(config_file))
    assert code == 0
    document = json.loads(out)
    rows = {row["provider"]: row for row in document["providers"]}
    assert list(rows) == ["first", "second", "third"]
    first_row = rows["first"]
    assert (first_row["orders"], first_row["revenue"], first_row["cost"]) == (2, "6.00", "1.50")
    assert (first_row["margin"], first_row["cost_estimated_orders"]) == ("4.50", 2)
    assert first_row["add_attempts"] == 3
    assert first_row["add_success_rate"] == pytest.approx(2 / 3)
    assert first_row["calls"] == 5  # 3 adds, services, balance
    assert 0 < first_row["latency_p50"] <= first_row["latency_p95"]
    assert first_row["state"] == "healthy" and first_row["benched_until"] is None
    assert first_row["balance"]["amount"] == "998.50"  # 1000 - 0.50 - 1.00
    assert first_row["balance"]["currency"] == "USD"
    second_row = rows["second"]
    assert (second_row["orders"], second_row["revenue"], second_row["cost"]) == (1, "1.00", "0.40")
    assert (second_row["margin"], second_row["add_success_rate"]) == ("0.60", 1.0)
    assert second_row["balance"]["amount"] == "999.60"
    third = rows["third"]
    assert (third["orders"], third["state"], third["balance"]) == (0, "catalogue missing", None)
    assert third["add_success_rate"] is None and third["latency_p50"] is not None

    code, out, _ = await run_cli(capsys, "providers", "--config", str(config_file))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["PROVIDER", "ORDERS", "COST", "REVENUE", "MARGIN"]
    assert lines[1].split()[:5] == ["first", "2", "1.50*", "6.00", "4.50"]
    assert "66.7% of 3" in lines[1] and "998.50 USD" in lines[1]
    assert lines[3].split()[:5] == ["third", "0", "0.00", "0.00", "0.00"]
    assert "catalogue missing" in lines[3]

    code, out, _ = await run_cli(
        capsys, "providers", "--json", "--since", "2999-01-01", "--config", str(config_file)
    )
    rows = {row["provider"]: row for row in json.loads(out)["providers"]}
    assert (rows["first"]["orders"], rows["first"]["calls"]) == (0, 0)
    assert rows["first"]["balance"]["amount"] == "998.50"  # the last read, whatever the period


async def test_providers_report_shows_the_last_30_days_unless_told(
    start_sim: SimFactory,
    start_router: RouterFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIM_KEY", SIM_KEY)
    sim = await start_sim()
    providers = {"first": sim.url, "second": f"http://127.0.0.1:{free_port()}/api/v2"}
    config_file = write_config(tmp_path, providers)
    router = await start_router(providers, [service(1, [("first", 101)], rate="2.00")])
    key = await router.reseller("acme", "100")
    old, new = [(await add(router, key, 1000))["order"] for _ in range(2)]

    def backdate(db: sqlite3.Connection) -> None:  # the first made 40 days ago
        db.execute("UPDATE orders SET created_at = created_at - 40 * 86400 WHERE id = ?", (old,))
        db.execute(
            "UPDATE attempts SET started_at = started_at - 40 * 86400 WHERE order_id = ?", (old,)
        )

    await router.store.write(backdate)

    started = time.time()
    code, out, _ = await run_cli(capsys, "providers", "--json", "--config", str(config_file))
    assert code == 0
    document = json.loads(out)
    since = datetime.fromisoformat(document["since"]).timestamp()
    assert started - 30 * 86400 - 1 <= since <= time.time() - 30 * 86400
    assert document["until"] is None
    row = document["providers"][0]
    assert (row["provider"], row["orders"], row["revenue"], row["add_attempts"]) == (
        "first",
        1,
        "2.00",
        1,
    )
    for period in (["--days", "41"], ["--since", "1970-01-01"]):
        code, out, _ = await run_cli(
            capsys, "providers", "--json", *period, "--config", str(config_file)
        )
        row = json.loads(out)["providers"][0]
        assert (row["orders"], row["revenue"], row["add_attempts"]) == (2, "4.00", 2), period
    # --until alone: the 30 days before it.
    until = datetime.fromtimestamp(time.time() - 35 * 86400, UTC).isoformat()
    code, out, _ = await run_cli(
        capsys, "providers", "--json", "--until", until, "--config", str(config_file)
    )
    document = json.loads(out)
    assert datetime.fromisoformat(document["since"]) == datetime.fromisoformat(
        document["until"]
    ) - timedelta(days=30)
    row = document["providers"][0]
    assert (row["orders"], row["add_attempts"]) == (1, 1)
    assert new != old


async def test_margins_use_recorded_costs_and_refunds(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim(partial_every=2, progress_seconds=10)
    router = await start_router({"first": sim.url}, [service(1, [("first", 101)], rate="2.00")])
    key = await router.reseller("acme", "100")
    ids = [(await add(router, key, 1000))["order"] for _ in range(2)]
    await watcher(router).catalogues_once()
    sim.advance(11)  # the first Completed (charge 0.50), the second Partial: 250 of 1000 left
    await router.app[ORDER_SYNC].run_once()
    third = (await add(router, key, 1000))["order"]  # no status yet: its cost is an estimate

    completed = await router.store.order_margin(ids[0], Decimal(1))
    partial = await router.store.order_margin(ids[1], Decimal(1))
    estimated = await router.store.order_margin(third, Decimal(1))
    assert completed is not None and partial is not None and estimated is not None
    assert (completed.revenue, completed.cost, completed.margin) == (200000, 50000, 150000)
    assert not completed.cost_estimated
    # refund 250 x 2.00 / 1000 = 0.50; the sim charged 750 x 0.50 / 1000 = 0.375
    assert (partial.revenue, partial.cost, partial.margin) == (150000, 37500, 112500)
    assert (estimated.cost, estimated.cost_estimated, estimated.margin) == (50000, True, 150000)

    total = await router.store.provider_margin("first", Decimal(1))
    assert (total.orders, total.revenue, total.cost, total.margin) == (3, 550000, 137500, 412500)
    assert total.estimated == 1
    assert v2.format_money(total.margin) == "4.125"
    later = await router.store.provider_margin("first", Decimal(1), since=9e18)
    assert (later.orders, later.margin) == (0, 0)


async def test_a_rate_change_leaves_the_cost_an_order_was_placed_at(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    """Until its status records a cost, an order counts at what its route was planned to cost
    when it was placed (what the provider charged), not at the rate the catalogue says now."""
    sim = await start_sim(partial_every=1, progress_seconds=10)  # each ends Partial: 250 left
    router = await start_router({"first": sim.url}, [service(1, [("first", 101)], rate="2.00")])
    key = await router.reseller("acme", "100")
    await watcher(router).catalogues_once()  # 101 at 0.50 per 1000
    placed = (await add(router, key, 1000))["order"]
    sim.set_rate(101, Decimal("0.90"))
    await watcher(router).catalogues_once()
    later = (await add(router, key, 1000))["order"]  # planned at the new rate

    first = await router.store.order_margin(placed, Decimal(1))
    second = await router.store.order_margin(later, Decimal(1))
    assert first is not None and second is not None
    assert (first.cost, first.cost_estimated, first.margin) == (50000, True, 150000)
    assert (second.cost, second.cost_estimated) == (90000, True)
    total = await router.store.provider_margin("first", Decimal(1))
    assert (total.orders, total.cost, total.estimated, total.uncosted) == (2, 140000, 2, 0)
    # A planned cost is in the config's currency already: `fx` does not move it again.
    assert (await router.store.provider_margin("first", Decimal("1.08"))).cost == 140000

    sim.advance(11)
    await router.app[ORDER_SYNC].run_once()  # Partial: charged 750 x 0.50 and 750 x 0.90
    first = await router.store.order_margin(placed, Decimal(1))
    assert first is not None
    assert (first.cost, first.cost_estimated, first.revenue) == (37500, False, 150000)
    total = await router.store.provider_margin("first", Decimal(1))
    assert (total.orders, total.cost, total.estimated) == (2, 37500 + 67500, 0)


# --- smm-router check --online -------------------------------------------------------------------

CHECK_YAML = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: router.db
currency: USD
fx: {{EUR: "1.10"}}
providers:
  alpha: {{url: "{alpha}", key: "${{SIM_KEY}}", timeout: 2}}
{more_providers}
services:
  1:
    name: Clean
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 100000
    refill: true
    route:
      - {{provider: alpha, service: 101}}
{more_services}
"""

PROBLEM_PROVIDERS = """\
  euro: {{url: "{euro}", key: "${{SIM_KEY}}", timeout: 2, currency: EUR}}
  down: {{url: "{down}", key: "${{SIM_KEY}}", timeout: 2}}
"""

PROBLEM_SERVICES = """\
  2:
    name: Gone upstream
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 1000
    route:
      - {provider: alpha, service: 999}
      - {provider: down, service: 101}
  3:
    name: Sold at a loss
    category: Instagram
    type: Default
    rate: "0.40"
    min: 10
    max: 1000
    route:
      - {provider: alpha, service: 101}
      - {provider: euro, service: 101}
  4:
    name: Limits too wide
    category: Instagram
    type: Default
    rate: "1.00"
    min: 5
    max: 200000
    route:
      - {provider: alpha, service: 101}
  5:
    name: A loss only after fx
    category: Instagram
    type: Default
    rate: "0.54"
    min: 10
    max: 1000
    route:
      - {provider: euro, service: 101}
"""


async def test_check_online(
    start_sim: SimFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIM_KEY", SIM_KEY)
    alpha = await start_sim()
    euro = await start_sim(currency="EUR")
    clean = tmp_path / "clean.yaml"
    clean.write_text(CHECK_YAML.format(alpha=alpha.url, more_providers="", more_services=""))
    code, out, err = await run_cli(capsys, "check", "--online", "--config", str(clean))
    assert (code, err) == (0, ""), out
    assert out.startswith("ok:")
    assert len(alpha.received_actions("services")) == 1
    assert len(alpha.received_actions("balance")) == 1

    extra = PROBLEM_PROVIDERS.format(euro=euro.url, down=f"http://127.0.0.1:{free_port()}/api/v2")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        CHECK_YAML.format(alpha=alpha.url, more_providers=extra, more_services=PROBLEM_SERVICES)
    )
    code, out, _ = await run_cli(capsys, "check", "--online", "--config", str(bad))
    assert code == 1
    lines = out.splitlines()
    assert "services.2.route[0]: upstream service 999 at alpha is gone" in lines
    assert any(
        line.startswith("services.2.route[1]: provider down is unreachable") for line in lines
    )
    assert any(line.startswith("providers.down: unreachable") for line in lines)
    assert any(
        line.startswith("services.3.route[0]: upstream service 101 at alpha costs 0.50 USD")
        and line.endswith("above our rate 0.40 USD: a loss")
        for line in lines
    )
    assert (
        "services.5.route[0]: upstream service 101 at euro costs 0.50 EUR (0.55 USD), "
        "above our rate 0.54 USD: a loss" in lines
    )
    assert (
        "services.4.route[0]: upstream service 101 at alpha takes at least 10, our min is 5"
        in lines
    )
    assert (
        "services.4.route[0]: upstream service 101 at alpha takes at most 100000, our max is 200000"
        in lines
    )
    assert lines[-1].startswith(f"{len(lines) - 1} problems")

    code, out, _ = await run_cli(capsys, "check", "--online", "--json", "--config", str(bad))
    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False
    kinds = {(p["path"], p["kind"]) for p in document["problems"]}
    assert kinds == {
        ("providers.down", "unreachable"),
        ("services.2.route[0]", "gone"),
        ("services.2.route[1]", "unreachable"),
        ("services.3.route[0]", "loss"),
        ("services.3.route[1]", "loss"),
        ("services.4.route[0]", "min"),
        ("services.4.route[0]", "max"),
        ("services.5.route[0]", "loss"),
    }
    assert document["providers"]["euro"] == {
        "services": 16,
        "balance": "1000.00",
        "currency": "EUR",
    }
    assert document["providers"]["down"]["services"] is None


async def test_check_online_sees_balance_currency_type_and_features(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    no_refill = [
        dataclasses.replace(s, refill=False) if s.service == 101 else s for s in default_catalogue()
    ]
    alpha = await start_sim(balance=Decimal("0"), currency="EUR", services=no_refill)
    more = """\
  2:
    name: Likes
    category: Instagram
    type: Default
    rate: "9.00"
    min: 1
    max: 1
    route:
      - {provider: alpha, service: 102}
"""
    path = tmp_path / "router.yaml"
    path.write_text(CHECK_YAML.format(alpha=alpha.url, more_providers="", more_services=more))
    config = load(path, env={"SIM_KEY": SIM_KEY})

    problems, _ = await check_online(config)

    assert [(p.path, p.kind) for p in problems] == [
        ("providers.alpha", "balance"),
        ("providers.alpha.currency", "currency"),
        ("services.1.route[0]", "refill"),
        ("services.2.route[0]", "type"),
    ]
    assert str(problems[0]) == "providers.alpha: balance is 0.00 EUR: it takes no orders"
    assert str(problems[1]) == "providers.alpha.currency: alpha bills in EUR, the config says USD"
    assert str(problems[2]) == (
        "services.1.route[0]: we offer refill, upstream service 101 at alpha does not"
    )
    assert str(problems[3]) == (
        "services.2.route[0]: upstream service 102 at alpha is of type 'Package', ours is 'Default'"
    )
