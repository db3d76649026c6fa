"""Every action in every request encoding, against V2.md's shapes and JSON types."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from router import logs, v2
from router.api import hash_key, order_json, statuses_json
from router.app import STORE, serve
from router.config import Listener
from router.store import OrderStatus
from tests.conftest import (
    Router,
    RouterFactory,
    SimFactory,
    build_config,
    free_port,
    service,
)

ENCODINGS = ["get", "form", "multipart", "json"]

SERVICE_TYPES = {
    "service": int,
    "name": str,
    "type": str,
    "category": str,
    "rate": str,
    "min": str,
    "max": str,
    "refill": bool,
    "cancel": bool,
    "dripfeed": bool,
}
STATUS_TYPES = {"charge": str, "start_count": str, "status": str, "remains": str, "currency": str}


def assert_shape(document: Any, types: dict[str, type]) -> None:
    assert isinstance(document, dict)
    assert set(document) == set(types), document
    for name, kind in types.items():
        assert type(document[name]) is kind, (name, document[name])


@pytest.fixture
async def world(start_sim: SimFactory, start_router: RouterFactory) -> Any:
    sim = await start_sim(progress_seconds=100.0)
    router = await start_router(
        {"alpha": sim.url},
        [
            service(1, [("alpha", 101)], rate="0.90", min=50, max=10000, dripfeed=True),
            service(2, [("alpha", 101)], rate="0.50", refill=False, cancel=False),
        ],
    )
    key = await router.reseller("acme", "100")
    return sim, router, key


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_services(world: Any, encoding: str) -> None:
    _, router, key = world
    answer = await router.call(encoding, key=key, action="services")
    assert isinstance(answer, list) and len(answer) == 2
    for item in answer:
        assert_shape(item, SERVICE_TYPES)
    assert answer[0] == {
        "service": 1,
        "name": "Service 1",
        "type": "Default",
        "category": "Tests",
        "rate": "0.90",
        "min": "50",
        "max": "10000",
        "refill": True,
        "cancel": True,
        "dripfeed": True,
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_balance(world: Any, encoding: str) -> None:
    _, router, key = world
    answer = await router.call(encoding, key=key, action="balance")
    assert answer == {"balance": "100.00", "currency": "USD"}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_add_then_status(world: Any, encoding: str) -> None:
    sim, router, key = world
    link = "https://instagram.com/p/Bx_y-1 z?x=1&y=é"
    answer = await router.call(encoding, key=key, action="add", service=1, link=link, quantity=1000)
    assert set(answer) == {"order"} and type(answer["order"]) is int
    order_id = answer["order"]
    adds = sim.received_actions("add")
    assert len(adds) == 1
    assert adds[0].params["service"] == "101"
    assert adds[0].params["link"] == link.strip()
    assert adds[0].params["quantity"] == "1000"

    single = await router.call(encoding, key=key, action="status", order=order_id)
    assert_shape(single, STATUS_TYPES)
    assert single["charge"] == "0.90"
    assert single["status"] == "Pending"
    assert single["currency"] == "USD"
    assert single["remains"] == "1000"

    multi = await router.call(encoding, key=key, action="status", orders=f"{order_id},999999")
    assert list(multi) == [str(order_id), "999999"]
    assert_shape(multi[str(order_id)], STATUS_TYPES)
    assert multi["999999"] == {"error": v2.INCORRECT_ORDER}

    balance = await router.call(encoding, key=key, action="balance")
    assert balance["balance"] == "99.10"


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_refill_single_and_multi(world: Any, encoding: str) -> None:
    sim, router, key = world
    order_id = (await router.call(key=key, action="add", service=1, link="a", quantity=100))[
        "order"
    ]
    sim.advance(1000)  # the simulated order completes

    single = await router.call(encoding, key=key, action="refill", order=order_id)
    assert set(single) == {"refill"} and type(single["refill"]) is str
    refill_id = int(single["refill"])

    multi = await router.call(encoding, key=key, action="refill", orders=f"{order_id},424242")
    assert len(multi) == 2
    assert multi[0]["order"] == order_id and type(multi[0]["refill"]) is int
    assert multi[1] == {"order": 424242, "refill": {"error": v2.INCORRECT_ORDER}}

    status = await router.call(encoding, key=key, action="refill_status", refill=refill_id)
    assert set(status) == {"status"} and status["status"] in v2.REFILL_STATUSES

    statuses = await router.call(
        encoding, key=key, action="refill_status", refills=f"{refill_id},77777"
    )
    assert statuses[0]["refill"] == refill_id and statuses[0]["status"] in v2.REFILL_STATUSES
    assert statuses[1] == {"refill": 77777, "status": {"error": v2.REFILL_NOT_FOUND}}

    missing = await router.call(encoding, key=key, action="refill_status", refill=77777)
    assert missing == {"error": v2.REFILL_NOT_FOUND}


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_cancel_multi_and_single(world: Any, encoding: str) -> None:
    sim, router, key = world
    first = (await router.call(key=key, action="add", service=1, link="a", quantity=100))["order"]
    second = (await router.call(key=key, action="add", service=1, link="b", quantity=100))["order"]
    no_cancel = (await router.call(key=key, action="add", service=2, link="c", quantity=100))[
        "order"
    ]

    answer = await router.call(
        encoding, key=key, action="cancel", orders=f"{first},{no_cancel},31337"
    )
    assert answer == [
        {"order": first, "cancel": 1},
        {"order": no_cancel, "cancel": {"error": v2.CANCEL_DISABLED}},
        {"order": 31337, "cancel": {"error": v2.INCORRECT_ORDER}},
    ]
    single = await router.call(encoding, key=key, action="cancel", order=second)
    assert single == [{"order": second, "cancel": 1}]
    assert len(sim.received_actions("cancel")) == 2


async def test_refill_disabled_service(world: Any) -> None:
    _, router, key = world
    order_id = (await router.call(key=key, action="add", service=2, link="a", quantity=100))[
        "order"
    ]
    answer = await router.call(key=key, action="refill", order=order_id)
    assert answer == {"error": v2.REFILL_DISABLED}


async def test_api_v1_path_and_query_merge(world: Any) -> None:
    _, router, key = world
    response = await router.client.post(
        "/api/v1?action=services&key=wrong", data={"key": key, "action": "balance"}
    )
    assert response.status == 200
    assert await response.json() == {"balance": "100.00", "currency": "USD"}


async def test_json_lists_of_ids(world: Any) -> None:
    _, router, key = world
    order_id = (await router.call(key=key, action="add", service=1, link="a", quantity=50))["order"]
    response = await router.client.post(
        "/api/v2", json={"key": key, "action": "status", "orders": [order_id, 5]}
    )
    answer = await response.json()
    assert list(answer) == [str(order_id), "5"]


async def test_healthz(world: Any) -> None:
    _, router, _ = world
    response = await router.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "version": version("smm-router")}


async def test_dripfeed_charges_runs_times_quantity(world: Any) -> None:
    sim, router, key = world
    answer = await router.call(
        key=key, action="add", service=1, link="a", quantity=100, runs=5, interval=30
    )
    status = await router.call(key=key, action="status", order=answer["order"])
    assert status["charge"] == "0.45"  # 0.90 x 500 / 1000
    sent = sim.received_actions("add")[0].params
    assert (sent["quantity"], sent["runs"], sent["interval"]) == ("100", "5", "30")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("path", ["/api/v2/", "/api/v1/"])
async def test_a_trailing_slash_works_like_the_bare_path(
    world: Any, encoding: str, path: str
) -> None:
    sim, router, key = world
    assert await router.call(encoding, path, key=key, action="balance") == {
        "balance": "100.00",
        "currency": "USD",
    }
    answer = await router.call(
        encoding, path, key=key, action="add", service=1, link="a", quantity=50
    )
    status = await router.call(encoding, path, key=key, action="status", order=answer["order"])
    assert status["status"] == "Pending" and len(sim.received_actions("add")) == 1
    assert await router.call(encoding, path, key="wrong", action="balance") == {
        "error": v2.INVALID_KEY
    }


async def test_a_dripfeed_status_carries_its_runs(world: Any) -> None:
    _, router, key = world
    drip = await router.call(
        key=key, action="add", service=1, link="a", quantity=100, runs=7, interval=30
    )
    plain = await router.call(key=key, action="add", service=1, link="b", quantity=100)

    single = await router.call(key=key, action="status", order=drip["order"])
    assert_shape(single, {**STATUS_TYPES, "runs": str})
    assert single["runs"] == "7"
    multi = await router.call(key=key, action="status", orders=f"{drip['order']},{plain['order']}")
    assert multi[str(drip["order"])] == single
    assert_shape(multi[str(plain["order"])], STATUS_TYPES)  # no `runs` on other orders
    assert_shape(await router.call(key=key, action="status", order=plain["order"]), STATUS_TYPES)


async def test_a_comment_that_mentions_runs_is_no_dripfeed(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url}, [service(3, [("alpha", 103)], type="Custom Comments", min=1)]
    )
    key = await router.reseller()
    comments = 'a "runs" b\n"runs": 3'
    order = await router.call(key=key, action="add", service=3, link="a", comments=comments)
    assert_shape(await router.call(key=key, action="status", order=order["order"]), STATUS_TYPES)


async def test_a_get_of_100_ids_and_a_long_link_passes_the_parser(world: Any) -> None:
    _, router, key = world
    ids = ",".join(str(10**18 + n) for n in range(100))  # 100 IDs of 19 digits
    link = "https://example.com/" + "é" * 2000  # 12 KB percent-encoded: over aiohttp's 8 KiB
    answer = await router.call("get", key=key, action="status", orders=ids, link=link)
    assert len(answer) == 100
    assert all(item == {"error": v2.INCORRECT_ORDER} for item in answer.values())


async def send_raw(router: Router, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Bytes written to the router's socket as they are; (status, headers, body) read back
    until the router closes the connection."""
    server = router.client.server
    assert server.port is not None
    return await send_to(server.host, server.port, request)


async def send_to(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def assert_incorrect_request(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": v2.INCORRECT_REQUEST}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/v2?key=%(key)s&action=balance&pad=" + b"a" * 20_000 + b" HTTP/1.1\r\n"
        b"Host: router\r\n\r\n",
        b"POST /api/v2 HTTP/1.1\r\nHost: router\r\nX-Pad: " + b"a" * 20_000 + b"\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"BREW /api/v2?key=%(key)s HTTP/1.1\r\nHost: router\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS spoken to plain HTTP\r\n\r\n",
    ],
    ids=["20KB-query", "20KB-header", "unknown-method", "tls-hello"],
)
async def test_malformed_http_is_answered_in_json(world: Any, request_bytes: bytes) -> None:
    _, router, key = world
    request = request_bytes.replace(b"%(key)s", key.encode())
    assert_incorrect_request(*await send_raw(router, request))
    # The connection is closed, the server is not: the next request is served.
    assert await router.call(key=key, action="balance") == {"balance": "100.00", "currency": "USD"}


async def test_a_20kb_get_from_aiohttps_client_is_json_incorrect_request(world: Any) -> None:
    _, router, key = world
    response = await router.client.get(
        "/api/v2", params={"key": key, "action": "balance", "pad": "a" * 20_000}
    )
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"error": v2.INCORRECT_REQUEST}


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the test configured it onto its captured stderr


async def test_no_log_line_ever_holds_the_key(
    world: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    reset_logging: None,
) -> None:
    _, router, key = world
    logs.configure(json_lines=True, level=logging.DEBUG)  # what `serve` runs, on capfd's stderr
    # Every record of every logger, aiohttp's access log too (no connection is open yet: each
    # reads the level when it opens).
    caplog.set_level(logging.DEBUG)
    secret_query = f"/api/v2?key={key}&action=balance"
    assert_incorrect_request(
        *await send_raw(
            router,
            f"GET {secret_query}&pad={'a' * 20_000} HTTP/1.1\r\nHost: router\r\n\r\n".encode(),
        )
    )
    response = await router.client.get(secret_query)  # a good GET: the access log quotes it
    assert await response.json() == {"balance": "100.00", "currency": "USD"}

    out, err = capfd.readouterr()
    stdlib = "\n".join(
        [caplog.text] + [f"{vars(record)}" for record in caplog.records]  # extras included
    )
    assert key not in out + err + stdlib
    # What was logged: the router's own line for the malformed request, aiohttp's access line.
    assert any(
        json.loads(line).get("event") == "malformed_request" for line in err.splitlines() if line
    ), err
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("key=[redacted]&action=balance" in line for line in access), access


async def test_serve_parses_and_refuses_as_the_tests_do(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    """The real listener (`serve`): the raised parser limits, and JSON past them."""
    sim = await start_sim()
    config = dataclasses.replace(
        build_config(tmp_path / "router.db", {"alpha": sim.url}, [service(1, [("alpha", 101)])]),
        listen=Listener("127.0.0.1", free_port()),
        metrics=Listener("127.0.0.1", free_port()),
    )
    ready = asyncio.Event()

    async def on_ready(app: web.Application) -> None:
        await app[STORE].create_reseller("acme", hash_key("serve-key"), v2.to_minor(Decimal(5)))
        ready.set()

    task = asyncio.create_task(serve(config, ready=on_ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        host, port = config.listen.host, config.listen.port
        ids = ",".join(str(10**18 + n) for n in range(100))
        link = "%C3%A9" * 2000  # 12 KB: past aiohttp's default 8 KiB, within the router's
        good = f"GET /api/v2/?key=serve-key&action=status&orders={ids}&link={link} HTTP/1.1"
        status, headers, body = await send_to(
            host, port, f"{good}\r\nHost: r\r\nConnection: close\r\n\r\n".encode()
        )
        assert status == 200 and len(json.loads(body)) == 100
        assert headers["x-ratelimit-limit"] == "1200"
        too_long = f"GET /api/v2?key=serve-key&pad={'a' * 20_000} HTTP/1.1\r\nHost: r\r\n\r\n"
        assert_incorrect_request(*await send_to(host, port, too_long.encode()))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _view(order: OrderStatus, currency: str) -> dict[str, str]:
    """V2.md's `status` of one order, as a dict: what `order_json` must encode exactly."""
    view = {
        "charge": v2.format_money(order.charge - order.refunded),
        "start_count": str(order.start_count or 0),
        "status": order.status if order.state in ("placed", "canceled") else v2.PENDING,
        "remains": str(order.quantity if order.remains is None else order.remains),
        "currency": currency,
    }
    if order.runs is not None:
        view["runs"] = order.runs
    return view


STATUS_ORDERS = [
    OrderStatus(1, "placed", "In progress", 1000, 123456, 0, 150, 400, None),
    OrderStatus(2, "placing", "Pending", 10, 90, 0, None, None, None),
    OrderStatus(3, "placed", "Partial", 500, 100000, 25000, 0, 125, None),
    OrderStatus(4, "canceled", "Canceled", 100, 5, 5, None, 100, None),
    OrderStatus(5, "held", "In progress", 100, 5, 0, 7, 3, None),
    OrderStatus(6, "placed", "Completed", 100, 100, 0, 12, 0, "10"),
    OrderStatus(7, "placed", 'Odd "word"\\é', 100, 100, 0, -1, -5, 'x"\u2028'),
]


@pytest.mark.parametrize("currency", ["USD", "€uro", 'q"'])
def test_status_text_is_what_json_dumps_writes(currency: str) -> None:
    """Each order's status text, and a list of them with unknown, malformed and repeated IDs,
    byte for byte what `json.dumps` writes for the V2.md shapes."""
    currency_json = json.dumps(currency)
    for order in STATUS_ORDERS:
        assert order_json(order, currency_json) == json.dumps(_view(order, currency))
    orders = {order.id: order for order in STATUS_ORDERS}
    ids = [("3", 3), ("x", None), ("1", 1), ("99", 99), ("3", 3), ("é", None), ("7", 7)]
    ids += [(str(order.id), order.id) for order in STATUS_ORDERS]
    expected = {
        sent: _view(orders[i], currency) if i in orders else {"error": v2.INCORRECT_ORDER}
        for sent, i in ids
    }
    assert statuses_json(ids, orders, currency_json) == json.dumps(expected)
