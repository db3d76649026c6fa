"""Every action in every request encoding, against V2.md's shapes and JSON types."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import pytest

from router import v2
from tests.conftest import RouterFactory, SimFactory, service

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
