"""The simulated provider speaks strict v2 over real HTTP, and its faults do what they say."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from router import v2
from router.sim import (
    DEEP_JSON_LEVELS,
    NOT_UTF8_PREFIX,
    PACKAGE_UNITS,
    Fault,
    SimProvider,
    SimService,
    add_arguments,
    default_catalogue,
    parse_fault,
    serve_from_args,
)
from tests.conftest import wait_for

KEY = "test-key"
LINK = "https://instagram.com/someone"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    provider = SimProvider(key=KEY, slow_seconds=0.2)
    await provider.start()
    yield provider
    await provider.stop()


async def call(http: aiohttp.ClientSession, sim: SimProvider, **params: object) -> Any:
    """POST form-urlencoded, as nearly every panel does; every answer must be 200 JSON."""
    data = {"key": KEY, **{k: str(v) for k, v in params.items()}}
    async with http.post(sim.url, data=data) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        return await response.json()


async def add(http: aiohttp.ClientSession, sim: SimProvider, **params: object) -> Any:
    fields: dict[str, object] = {"service": 101, "link": LINK, "quantity": 1000, **params}
    return await call(http, sim, action="add", **fields)


def test_default_catalogue() -> None:
    services = default_catalogue()
    types = [name for name in v2.SERVICE_TYPES if name != "Subscriptions"]
    assert [s.type for s in services] == types
    assert [s.service for s in services] == list(range(101, 101 + len(types)))
    first = services[0]
    assert (first.rate, first.min, first.max) == (Decimal("0.50"), 10, 100000)
    assert first.refill and first.cancel and first.dripfeed
    by_type = {s.type: s for s in services}
    assert by_type["Web Traffic"].dripfeed
    assert (by_type["Package"].min, by_type["Package"].max) == (1, 1)
    for service in services:
        assert service.refill and service.cancel
        if v2.SERVICE_TYPES[service.type].quantity != "flat":
            assert 1 <= service.min <= 10 and service.max >= 10000


async def test_services_shape(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    services = await call(http, sim, action="services")
    assert len(services) == 16
    for item in services:
        assert list(item) == [
            "service", "name", "type", "category", "rate", "min", "max", "refill", "cancel",
            "dripfeed",
        ]  # fmt: skip
        assert type(item["service"]) is int
        assert all(type(item[k]) is str for k in ("name", "type", "category", "rate", "min"))
        assert all(type(item[k]) is bool for k in ("refill", "cancel", "dripfeed"))
    assert services[0] == {
        "service": 101,
        "name": services[0]["name"],
        "type": "Default",
        "category": services[0]["category"],
        "rate": "0.50",
        "min": "10",
        "max": "100000",
        "refill": True,
        "cancel": True,
        "dripfeed": True,
    }


async def test_key_and_action_checks(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    for data in ({"action": "balance"}, {"action": "balance", "key": "wrong"}):
        async with http.post(sim.url, data=data) as response:
            assert response.status == 200
            assert await response.json() == {"error": v2.INVALID_KEY}
    assert await call(http, sim, action="nonsense") == {"error": v2.INCORRECT_REQUEST}
    assert await call(http, sim) == {"error": v2.INCORRECT_REQUEST}
    assert sim.orders == {}


async def test_four_encodings_and_v1(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    fields = {"key": KEY, "action": "add", "service": "101", "link": LINK, "quantity": "100"}
    answers = []
    async with http.post(sim.url, data=fields) as response:
        answers.append(await response.json())
    multipart = aiohttp.FormData(fields, default_to_multipart=True)
    async with http.post(sim.url, data=multipart) as response:
        answers.append(await response.json())
    async with http.post(sim.url, json={**fields, "service": 101, "quantity": 100}) as response:
        answers.append(await response.json())
    async with http.get(sim.url, params=fields) as response:
        answers.append(await response.json())
    # query and body merged, the body winning
    async with http.post(
        sim.url, params={**fields, "service": "999"}, data={"service": "101"}
    ) as r:
        answers.append(await r.json())
    async with http.post(sim.url.replace("/api/v2", "/api/v1"), data=fields) as response:
        answers.append(await response.json())
    assert answers == [{"order": n} for n in range(1000, 1006)]

    status = {"key": KEY, "action": "status", "order": "1000"}
    async with http.get(sim.url, params=status) as response:
        expected = await response.json()
    async with http.post(sim.url, data=aiohttp.FormData(status, default_to_multipart=True)) as r:
        assert await r.json() == expected
    async with http.post(sim.url, json=status) as response:
        assert await response.json() == expected
    async with http.post(sim.url, data=status) as response:
        assert await response.json() == expected
    assert expected["status"] == v2.PENDING


async def test_add_and_status_shapes(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    answer = await add(http, sim, quantity=1000)
    assert answer == {"order": 1000} and type(answer["order"]) is int
    assert sim.balance == Decimal("999.50")
    status = await call(http, sim, action="status", order=1000)
    assert status == {
        "charge": "0.50",
        "start_count": status["start_count"],
        "status": "Pending",
        "remains": "1000",
        "currency": "USD",
    }
    assert all(type(value) is str for value in status.values())
    assert await call(http, sim, action="status", order=77) == {"error": v2.INCORRECT_ORDER}
    assert await call(http, sim, action="status", order="x") == {"error": v2.INCORRECT_ORDER}

    many = await call(http, sim, action="status", orders="1000, 0999,abc")
    assert list(many) == ["1000", "0999", "abc"]
    assert many["1000"] == status
    assert many["0999"] == many["abc"] == {"error": v2.INCORRECT_ORDER}
    too_many = ",".join(str(n) for n in range(1, 102))
    assert await call(http, sim, action="status", orders=too_many) == {"error": v2.TOO_MANY_IDS}


async def test_add_validation(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"service": 999}, v2.INCORRECT_SERVICE),
        ({"service": "abc"}, v2.INCORRECT_SERVICE),
        ({"link": ""}, v2.INCORRECT_LINK),
        ({"link": "a\x01b"}, v2.INCORRECT_LINK),
        ({"link": "x" * 2049}, v2.INCORRECT_LINK),
        ({"quantity": 9}, v2.quantity_below(10)),
        ({"quantity": 100001}, v2.quantity_above(100000)),
        ({"quantity": "1.5"}, v2.INCORRECT_REQUEST),
        ({"quantity": "-20"}, v2.INCORRECT_REQUEST),
        ({"quantity": ""}, v2.INCORRECT_REQUEST),
        ({"service": 105}, v2.INCORRECT_REQUEST),  # Mentions without usernames
        ({"service": 116, "country": "US", "device": "1", "type_of_traffic": "1"}, "one_of"),
        ({"service": 105, "usernames": "a\nb", "runs": 2, "interval": 5}, v2.INCORRECT_REQUEST),
        ({"runs": 2}, v2.INCORRECT_REQUEST),
        ({"runs": 0, "interval": 5}, v2.INCORRECT_REQUEST),
    ]
    for params, message in cases:
        expected = v2.INCORRECT_REQUEST if message == "one_of" else message
        assert await add(http, sim, **params) == {"error": expected}, params
    assert sim.orders == {}
    assert sim.balance == Decimal("1000")


async def test_quantity_by_type(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    comments = "nice!\r\n\r\ngreat\nwow\n"
    assert await add(http, sim, service=103, comments=comments, quantity="") == {"order": 1000}
    assert (sim.orders[1000].quantity, sim.orders[1000].cost) == (3, Decimal("0.036"))
    assert await add(http, sim, service=102, quantity="") == {"order": 1001}
    assert (sim.orders[1001].quantity, sim.orders[1001].cost) == (PACKAGE_UNITS, Decimal("2.40"))
    traffic = {"country": "US", "device": "1", "type_of_traffic": "2", "referring_url": LINK}
    assert await add(http, sim, service=116, quantity=500, **traffic) == {"order": 1002}
    assert sim.orders[1002].cost == Decimal("0.15")
    # drip-feed: quantity per run, charged for every run
    assert await add(http, sim, quantity=100, runs=3, interval=10) == {"order": 1003}
    assert (sim.orders[1003].quantity, sim.orders[1003].cost) == (300, Decimal("0.15"))
    assert sim.balance == Decimal(1000) - Decimal("0.036") - Decimal("2.40") - Decimal("0.30")
    status = await call(http, sim, action="status", order=1000)
    assert status["charge"] == "0.036"


async def test_real_out_of_funds(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    sim.set_balance(Decimal("0.10"))
    assert await add(http, sim, quantity=1000) == {"error": v2.NOT_ENOUGH_FUNDS}
    assert sim.orders == {}
    assert await add(http, sim, quantity=200) == {"order": 1000}
    assert await call(http, sim, action="balance") == {"balance": "0.00", "currency": "USD"}
    assert sim.balance == 0


async def test_progress_to_completed_and_partial(http: aiohttp.ClientSession) -> None:
    sim = SimProvider(key=KEY, partial_every=2, progress_seconds=100)
    await sim.start()
    try:
        assert await add(http, sim, quantity=1000) == {"order": 1000}
        assert await add(http, sim, quantity=1000) == {"order": 1001}  # the 2nd: Partial
        sim.advance(55)
        mid = await call(http, sim, action="status", orders="1000,1001")
        assert mid["1000"]["status"] == mid["1001"]["status"] == v2.IN_PROGRESS
        assert 400 < int(mid["1000"]["remains"]) < 600
        assert mid["1000"]["charge"] == "0.50"
        assert sim.balance == Decimal("999.00")
        sim.advance(50)
        done = await call(http, sim, action="status", orders="1000,1001")
        assert done["1000"] | {"start_count": "-"} == {
            "charge": "0.50",
            "start_count": "-",
            "status": "Completed",
            "remains": "0",
            "currency": "USD",
        }
        assert (done["1001"]["status"], done["1001"]["remains"]) == ("Partial", "250")
        assert done["1001"]["charge"] == "0.375"  # the delivered 750 only
        assert sim.balance == Decimal("999.125")  # the undelivered 250 refunded, once
        assert await call(http, sim, action="balance") == {"balance": "999.125", "currency": "USD"}
        assert sim.orders[1001].status == v2.PARTIAL
    finally:
        await sim.stop()


async def test_cancel(http: aiohttp.ClientSession) -> None:
    no_cancel = SimService(
        101, "Likes", "Default", "IG", Decimal("1"), 10, 1000, False, False, False
    )
    # A frozen clock: only advance() moves it, so "mid-way" is exactly 5.5 s in, however slow
    # the machine (on the real clock a loaded machine added its own seconds: a flaky test).
    sim = SimProvider(
        key=KEY,
        services=[*default_catalogue()[1:], no_cancel],
        progress_seconds=10,
        clock=lambda: 0.0,
    )
    await sim.start()
    try:
        order = (await add(http, sim, service=105, usernames="a\nb", quantity=100))["order"]
        stuck = (await add(http, sim, service=101, quantity=100))["order"]
        answer = await call(http, sim, action="cancel", orders=f"{order},{stuck},9")
        assert answer == [
            {"order": order, "cancel": 1},
            {"order": stuck, "cancel": {"error": v2.CANCEL_DISABLED}},
            {"order": 9, "cancel": {"error": v2.INCORRECT_ORDER}},
        ]
        status = await call(http, sim, action="status", order=order)
        assert (status["status"], status["remains"], status["charge"]) == (
            "Canceled",
            "100",
            "0.00",
        )
        assert sim.balance == Decimal(1000) - Decimal("0.1")
        again = await call(http, sim, action="cancel", order=order)  # single form, list shape
        assert again == [{"order": order, "cancel": {"error": again[0]["cancel"]["error"]}}]
        # canceled mid-way: the delivered part stays charged (Partial), the rest is refunded
        mid = (await add(http, sim, service=105, usernames="a", quantity=1000))["order"]
        sim.advance(5.5)
        assert await call(http, sim, action="cancel", order=mid) == [{"order": mid, "cancel": 1}]
        status = await call(http, sim, action="status", order=mid)
        assert (status["status"], status["remains"], status["charge"]) == ("Partial", "500", "1.50")
        assert sim.balance == Decimal(1000) - Decimal("0.1") - Decimal("1.5")
    finally:
        await sim.stop()


async def test_refill(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    order = (await add(http, sim))["order"]
    early = await call(http, sim, action="refill", order=order)
    assert set(early) == {"error"}
    assert await call(http, sim, action="refill", order=5) == {"error": v2.INCORRECT_ORDER}
    sim.advance(10)
    assert await call(http, sim, action="refill", order=order) == {"refill": "1"}
    answer = await call(http, sim, action="refill", orders=f"{order},3")
    assert answer == [
        {"order": order, "refill": 2},
        {"order": 3, "refill": {"error": v2.INCORRECT_ORDER}},
    ]
    assert await call(http, sim, action="refill_status", refill=1) == {"status": "Pending"}
    sim.advance(5)
    assert await call(http, sim, action="refill_status", refill=1) == {"status": "In progress"}
    sim.advance(5)
    assert await call(http, sim, action="refill_status", refills="1,3") == [
        {"refill": 1, "status": "Completed"},
        {"refill": 3, "status": {"error": v2.REFILL_NOT_FOUND}},
    ]
    assert await call(http, sim, action="refill_status", refill=9) == {"error": v2.REFILL_NOT_FOUND}


async def test_refill_disabled(http: aiohttp.ClientSession) -> None:
    plain = SimService(7, "Views", "Default", "IG", Decimal("0.01"), 10, 1000, False, True, False)
    sim = SimProvider(key=KEY, services=[plain], progress_seconds=0)
    await sim.start()
    try:
        assert await add(http, sim, service=7, quantity=10) == {"order": 1000}
        answer = await call(http, sim, action="refill", order=1000)
        assert answer == {"error": v2.REFILL_DISABLED}
        assert await call(http, sim, action="services") == [
            {
                "service": 7,
                "name": "Views",
                "type": "Default",
                "category": "IG",
                "rate": "0.01",
                "min": "10",
                "max": "1000",
                "refill": False,
                "cancel": True,
                "dripfeed": False,
            }
        ]
    finally:
        await sim.stop()


async def test_refuse_and_no_funds(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    sim.set_fault(101, Fault.REFUSE)
    refused = await add(http, sim)
    assert set(refused) == {"error"} and "active order" in refused["error"]
    assert await add(http, sim, service=105, usernames="a", quantity=10) == {"order": 1000}
    sim.set_fault(None, Fault.NO_FUNDS)
    assert await add(http, sim) == {"error": refused["error"]}  # its own fault wins
    assert await add(http, sim, service=105, usernames="a") == {"error": v2.NOT_ENOUGH_FUNDS}
    sim.set_fault(101, None)
    sim.set_fault(None, None)
    assert await add(http, sim) == {"order": 1001}
    assert len(sim.received_actions("add")) == 5


async def test_html_502(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    sim.set_fault(None, Fault.HTML_502)
    data = {"key": KEY, "action": "add", "service": "101", "link": LINK, "quantity": "100"}
    async with http.post(sim.url, data=data) as response:
        assert response.status == 502
        assert response.content_type == "text/html"
        assert "cloudflare" in await response.text()
    assert sim.orders == {}
    assert await call(http, sim, action="balance") == {"balance": "1000.00", "currency": "USD"}


async def _raw(http: aiohttp.ClientSession, sim: SimProvider, **params: str) -> tuple[int, bytes]:
    async with http.post(sim.url, data={"key": KEY, **params}) as response:
        return response.status, await response.read()


async def test_garbled_answers_to_add(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    """deep_json and not_utf8: the panel took the order, its answer cannot be read; waf403:
    turned away before the panel."""
    order = {"action": "add", "service": "101", "link": LINK, "quantity": "100"}
    sim.set_fault(101, Fault.DEEP_JSON)
    status, body = await _raw(http, sim, **order)
    assert status == 200 and body == b"[" * DEEP_JSON_LEVELS + b"]" * DEEP_JSON_LEVELS
    assert list(sim.orders) == [1000]
    sim.set_fault(101, Fault.NOT_UTF8)
    status, body = await _raw(http, sim, **order)
    assert (status, body) == (200, NOT_UTF8_PREFIX + b'{"order": 1001}')
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    sim.set_fault(101, Fault.WAF_403)
    status, body = await _raw(http, sim, **order)
    assert status == 403 and b"firewall" in body
    assert list(sim.orders) == [1000, 1001]


async def test_answer_faults_on_other_actions(
    http: aiohttp.ClientSession, sim: SimProvider
) -> None:
    [order_id] = sim.create_orders(101, 1)
    sim.set_answer_fault("status", Fault.NOT_UTF8)
    status, body = await _raw(http, sim, action="status", orders=str(order_id))
    assert status == 200 and body.startswith(NOT_UTF8_PREFIX)
    assert str(order_id) in json.loads(body[len(NOT_UTF8_PREFIX) :])  # the real answer, garbled
    sim.set_answer_fault("status", Fault.WAF_403)
    assert (await _raw(http, sim, action="status", orders=str(order_id)))[0] == 403
    assert await call(http, sim, action="balance") == {"balance": "999.50", "currency": "USD"}
    sim.set_answer_fault("status", None)
    assert str(order_id) in await call(http, sim, action="status", orders=str(order_id))
    for action, fault in (("add", Fault.DEEP_JSON), ("status", Fault.SLOW)):
        with pytest.raises(ValueError, match="not an answer fault"):
            sim.set_answer_fault(action, fault)


async def test_pause_holds_requests_until_resumed(
    http: aiohttp.ClientSession, sim: SimProvider
) -> None:
    sim.pause("add")
    adding = asyncio.create_task(add(http, sim))
    await wait_for(lambda: sim.received_actions("add"), "the add to reach the simulator")
    assert await call(http, sim, action="balance") == {"balance": "1000.00", "currency": "USD"}
    assert not adding.done() and sim.orders == {}  # received, not answered
    sim.resume("add")
    assert await adding == {"order": 1000}
    assert await add(http, sim) == {"order": 1001}  # resumed for good


async def test_slow_creates_the_order(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    sim.set_fault(101, Fault.SLOW)
    data = {"key": KEY, "action": "add", "service": "101", "link": LINK, "quantity": "100"}
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(sim.url, data=data, timeout=aiohttp.ClientTimeout(total=0.05)):
            pass
    assert sim.orders == {}
    await wait_for(lambda: sim.orders, "the slow order created after its sleep")
    assert list(sim.orders) == [1000]  # the client gave up, yet the order exists
    assert await add(http, sim, quantity=100) == {"order": 1001}


async def test_reset(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    sim.set_fault(101, Fault.RESET)
    data = {"key": KEY, "action": "add", "service": "101", "link": LINK, "quantity": "100"}
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        async with http.post(sim.url, data=data) as response:
            await response.read()
    assert sim.orders == {}
    assert len(sim.received_actions("add")) == 1
    assert await call(http, sim, action="balance") == {"balance": "1000.00", "currency": "USD"}


async def test_flaky_is_deterministic(http: aiohttp.ClientSession) -> None:
    async def outcomes(seed: int) -> list[str]:
        sim = SimProvider(key=KEY, slow_seconds=0.01, seed=seed)
        sim.set_fault(None, Fault.FLAKY)
        await sim.start()
        data = {"key": KEY, "action": "add", "service": "101", "link": LINK, "quantity": "100"}
        seen = []
        try:
            for _ in range(16):
                async with http.post(sim.url, data=data) as response:
                    seen.append(str(response.status) + (await response.text())[:12])
        finally:
            await sim.stop()
        return seen

    first = await outcomes(7)
    assert first == await outcomes(7)
    kinds = {"502" if s.startswith("502") else "order" if "order" in s else "error" for s in first}
    assert kinds == {"502", "order", "error"}


async def test_down_and_back(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    assert await add(http, sim) == {"order": 1000}
    url = sim.url
    await sim.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with http.post(url, data={"key": KEY, "action": "balance"}):
            pass
    await sim.start()
    assert sim.url == url
    assert await add(http, sim) == {"order": 1001}


async def test_pause_ends_in_a_reset_when_stopped(
    http: aiohttp.ClientSession, sim: SimProvider
) -> None:
    sim.pause("refill")
    waiting = asyncio.create_task(call(http, sim, action="refill", order=1))
    await wait_for(lambda: sim.received_actions("refill"), "the refill at the simulator")
    await sim.stop()
    with pytest.raises(aiohttp.ClientError):
        await waiting
    await sim.start()
    assert await call(http, sim, action="refill", order=1) == {"error": v2.INCORRECT_ORDER}


async def test_received_log(http: aiohttp.ClientSession, sim: SimProvider) -> None:
    await call(http, sim, action="balance")
    await add(http, sim, quantity=5)
    async with http.post(sim.url, data={"key": "nope", "action": "services"}):
        pass
    assert [r.action for r in sim.received] == ["balance", "add", "services"]
    assert all("key" not in r.params for r in sim.received)
    assert sim.received_actions("add")[0].params == {
        "action": "add",
        "service": "101",
        "link": LINK,
        "quantity": "5",
    }
    assert sim.received[0].at <= sim.received[2].at


def test_parse_fault() -> None:
    assert parse_fault("101=refuse") == (101, Fault.REFUSE)
    assert parse_fault("*=slow") == (None, Fault.SLOW)
    assert parse_fault(" html502 ") == (None, Fault.HTML_502)
    for spec, words in (("101=boom", "unknown fault 'boom'"), ("x=slow", "bad service 'x'")):
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_fault(spec)
    with pytest.raises(ValueError, match="refuse, no_funds, html502, slow, reset, flaky"):
        parse_fault("")


async def test_serve_from_args(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--key", KEY, "--fault", "101=refuse"])
    assert (args.host, args.balance, args.faults) == ("127.0.0.1", Decimal(1000), [(101, "refuse")])
    task = asyncio.create_task(serve_from_args(args))
    printed: list[str] = []

    def url() -> re.Match[str] | None:
        printed.append(capsys.readouterr().out)
        return re.search(r"http://\S+/api/v2", "".join(printed))

    await wait_for(url, "the simulator to print its URL")
    found = url()
    assert found
    async with http.post(found[0], data={"key": KEY, "action": "balance"}) as response:
        assert json.loads(await response.text()) == {"balance": "1000.00", "currency": "USD"}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "101=explode"])
    assert "unknown fault 'explode'" in capsys.readouterr().err
