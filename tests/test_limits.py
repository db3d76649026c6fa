"""Per-key limits: the limiter on a hand-moved clock, then the real router refusing with 429."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from router import v2
from router.app import API
from router.config import Limits
from router.limits import WINDOW_SECONDS, Admission, RequestLimiter, action_class
from tests.conftest import Router, RouterFactory, SimFactory, service, wait_for

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, **limits: int) -> RequestLimiter:
    return RequestLimiter(Limits(**limits), clock=clock)


# --- The limiter ---------------------------------------------------------------------------------


def test_a_key_may_spend_its_minute_at_once_then_goes_on_at_the_rate(clock: Clock) -> None:
    limits = limiter(clock, add=3)
    admitted = [limits.admit("k", "add") for _ in range(3)]
    assert admitted == [
        Admission(True, 3, 2, 20, 0),
        Admission(True, 3, 1, 20, 0),
        Admission(True, 3, 0, 20, 0),
    ]
    assert limits.admit("k", "add") == Admission(False, 3, 0, 20, 20)
    clock.now += 19.5
    assert limits.admit("k", "add") == Admission(False, 3, 0, 1, 1)
    clock.now += 0.5
    assert limits.admit("k", "add") == Admission(True, 3, 0, 20, 0)


def test_a_refusal_counts_nothing(clock: Clock) -> None:
    limits = limiter(clock, add=2)
    for _ in range(2):
        limits.admit("k", "add")
    for _ in range(1000):
        assert not limits.admit("k", "add").admitted
    clock.now += 30  # one slot's worth (60 / 2): refusals did not push it further away
    assert limits.admit("k", "add").admitted
    assert not limits.admit("k", "add").admitted


def test_over_a_long_run_the_rate_is_the_limit(clock: Clock) -> None:
    limits = limiter(clock, status=7, in_flight=1)  # 60 / 7 is no round number of seconds
    admitted, start = 0, clock.now
    for step in range(60_001):  # ten minutes, a request every 10 ms, both ends included
        clock.now = start + step / 100
        if limits.admit("k", "status").admitted:
            admitted += 1
            limits.release("k")
    assert admitted == 7 + 7 * 10  # the first minute's burst, then 7 a minute


def test_remaining_and_reset_follow_the_refill(clock: Clock) -> None:
    limits = limiter(clock, other=6)  # a slot every 10 s
    for _ in range(4):
        limits.admit("k", "balance")
    clock.now += 25  # 2.5 slots back: 4 used, 2 left + 2 refilled
    assert limits.admit("k", "balance") == Admission(True, 6, 3, 5, 0)
    clock.now += 60  # all back
    assert limits.admit("k", "services") == Admission(True, 6, 5, 10, 0)


def test_action_classes_and_keys_are_counted_apart(clock: Clock) -> None:
    limits = limiter(clock, add=1, status=1, other=2)
    assert [action_class(a) for a in ("add", "status", "refill", "cancel", "nope", "")] == [
        "add",
        "status",
        "other",
        "other",
        "other",
        "other",
    ]
    assert limits.admit("a", "add").admitted and not limits.admit("a", "add").admitted
    assert limits.admit("a", "status").admitted and not limits.admit("a", "status").admitted
    assert limits.admit("a", "refill").admitted and limits.admit("a", "no-such-action").admitted
    assert not limits.admit("a", "balance").admitted  # refill, unknown, balance: one class
    assert limits.admit("b", "add").admitted  # another key is untouched


def test_requests_in_flight_are_limited_and_released(clock: Clock) -> None:
    limits = limiter(clock, other=100, in_flight=2)
    assert limits.admit("k", "balance").admitted and limits.admit("k", "services").admitted
    refused = limits.admit("k", "balance")
    assert not refused.admitted and refused.retry_after == 1
    assert refused.remaining == 98  # the refusal took no slot of the rate
    assert limits.admit("other-key", "balance").admitted
    limits.release("k")
    assert limits.admit("k", "balance").admitted


def test_idle_keys_are_forgotten(clock: Clock) -> None:
    limits = limiter(clock, other=60, in_flight=5)
    for n in range(100):
        limits.admit(f"key-{n}", "balance")
        limits.release(f"key-{n}")
    limits.admit("busy", "balance")  # still in flight
    assert len(limits) == 101
    clock.now += WINDOW_SECONDS
    limits.admit("new", "balance")
    assert len(limits) == 2  # "busy" (in flight) and "new"
    limits.release("busy")
    limits.release("new")
    clock.now += WINDOW_SECONDS
    limits.admit("last", "add")
    assert len(limits) == 1


# --- The router ----------------------------------------------------------------------------------


async def start(
    start_sim: SimFactory, start_router: RouterFactory, **changes: Any
) -> tuple[Any, Router]:
    sim = await start_sim(progress_seconds=1000.0)
    router = await start_router(
        {"alpha": sim.url}, [service(1, [("alpha", 101)], rate="1.00", min=10)], **changes
    )
    return sim, router


def rate_headers(response: aiohttp.ClientResponse) -> dict[str, int]:
    return {name: int(response.headers[name]) for name in RATE_HEADERS}


async def orders_of(router: Router, name: str) -> int:
    reseller = await router.store.reseller_by_name(name)
    assert reseller is not None
    return sum((await router.store.count_orders(reseller.id)).values())


async def add(router: Router, key: str, link: str = "https://x.test/a") -> aiohttp.ClientResponse:
    return await router.raw(key=key, action="add", service=1, link=link, quantity=100)


async def assert_too_many(response: aiohttp.ClientResponse, limit: int) -> None:
    assert response.status == 429
    assert response.content_type == "application/json"
    assert await response.json() == {"error": v2.TOO_MANY_REQUESTS}
    headers = rate_headers(response)
    assert headers["X-RateLimit-Limit"] == limit and headers["X-RateLimit-Remaining"] == 0
    assert 1 <= int(response.headers["Retry-After"]) <= WINDOW_SECONDS
    assert headers["X-RateLimit-Reset"] >= 1


async def test_a_flood_from_one_key_gets_429s_and_changes_nothing(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim, router = await start(start_sim, start_router, limits=Limits(add=3, other=10))
    flooder = await router.reseller("flooder", "100")
    neighbour = await router.reseller("neighbour", "100")

    flood = [add(router, flooder, f"https://x.test/{n}") for n in range(20)]
    calm = [add(router, neighbour, f"https://y.test/{n}") for n in range(3)]
    calm += [router.raw(key=neighbour, action="balance") for _ in range(5)]
    responses = await asyncio.gather(*flood, *calm)
    flooded, neighbours = responses[:20], responses[20:]

    assert [r.status for r in neighbours] == [200] * 8
    assert all("order" in answer for answer in [await r.json() for r in neighbours[:3]])
    assert all("balance" in answer for answer in [await r.json() for r in neighbours[3:]])
    placed = [r for r in flooded if r.status == 200]
    assert len(placed) == 3 and all("order" in a for a in [await r.json() for r in placed])
    for response in flooded:
        if response.status != 200:
            await assert_too_many(response, 3)

    # At its limit, more of the same changes nothing: no order, no charge, no upstream call.
    assert await orders_of(router, "flooder") == 3 and len(sim.received_actions("add")) == 6
    for n in range(10):
        await assert_too_many(await add(router, flooder, f"https://z.test/{n}"), 3)
    assert await orders_of(router, "flooder") == 3 and len(sim.received_actions("add")) == 6
    assert await router.call(key=flooder, action="balance") == {
        "balance": "99.70",
        "currency": "USD",
    }
    assert await router.call(key=neighbour, action="balance") == {
        "balance": "99.70",
        "currency": "USD",
    }
    # Another class of the same key is not limited by `add`'s.
    ok = await router.raw(key=flooder, action="status", order=(await placed[0].json())["order"])
    assert ok.status == 200 and (await ok.json())["status"] == "Pending"

    assert router.metric("smm_router_rate_limited_total", action="add") == 27
    assert router.metric("smm_router_requests_total", action="add", outcome="rate_limited") == 27
    assert router.metric("smm_router_requests_total", action="add", outcome="ok") == 6


async def test_every_answer_to_a_known_key_carries_the_rate_headers(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    _, router = await start(start_sim, start_router, limits=Limits(add=5, status=8, other=4))
    key = await router.reseller()

    balance = await router.raw(key=key, action="balance")
    assert balance.status == 200
    assert rate_headers(balance) == {
        "X-RateLimit-Limit": 4,
        "X-RateLimit-Remaining": 3,
        "X-RateLimit-Reset": 15,  # a slot of 4 a minute frees every 15 s
    }
    assert "Retry-After" not in balance.headers
    services = await router.raw("get", key=key, action="services")
    assert rate_headers(services)["X-RateLimit-Remaining"] == 2
    unknown = await router.raw(key=key, action="no-such-action")  # counted as `other`
    assert await unknown.json() == {"error": v2.INCORRECT_REQUEST}
    assert rate_headers(unknown)["X-RateLimit-Remaining"] == 1

    missing = await router.raw("json", key=key, action="status", order=12345)  # an error answer
    assert await missing.json() == {"error": v2.INCORRECT_ORDER}
    assert rate_headers(missing) == {
        "X-RateLimit-Limit": 8,
        "X-RateLimit-Remaining": 7,
        "X-RateLimit-Reset": 8,  # ceil(60 / 8)
    }
    placed = await add(router, key)
    assert "order" in await placed.json()
    assert rate_headers(placed)["X-RateLimit-Limit"] == 5

    stranger = await router.raw(key="not-a-key", action="balance")  # no key known: no headers
    assert await stranger.json() == {"error": v2.INVALID_KEY}
    assert not any(name in stranger.headers for name in RATE_HEADERS)


async def test_unknown_keys_leave_no_state(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    _, router = await start(start_sim, start_router, limits=Limits(other=2))
    limiter = router.app[API].limiter
    for _ in range(200):
        answer = await router.call(key=uuid.uuid4().hex, action="balance")
        assert answer == {"error": v2.INVALID_KEY}  # never a 429: random keys are not counted
    assert len(limiter) == 0
    key = await router.reseller()
    await router.call(key=key, action="balance")
    assert len(limiter) == 1


async def test_the_33rd_request_in_flight_of_one_key_gets_429(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim, router = await start(start_sim, start_router, upstream_timeout=60.0)
    key = await router.reseller("busy", "1000")
    other = await router.reseller("other", "100")
    sim.stall("add")
    stalled = [
        asyncio.create_task(add(router, key, f"https://x.test/{n}"))
        for n in range(Limits().in_flight)
    ]
    await wait_for(lambda: len(sim.received_actions("add")) == 32, "32 adds at the provider")

    refused = await add(router, key, "https://x.test/33")
    assert refused.status == 429 and await refused.json() == {"error": v2.TOO_MANY_REQUESTS}
    assert refused.headers["Retry-After"] == "1"
    assert rate_headers(refused)["X-RateLimit-Remaining"] >= 600 - 32  # refilling meanwhile
    also = await router.raw(key=key, action="balance")  # in flight counts every class
    assert also.status == 429
    assert await router.call(key=other, action="balance") == {
        "balance": "100.00",
        "currency": "USD",
    }
    assert len(sim.received_actions("add")) == 32 and await orders_of(router, "busy") == 32

    await sim.stop()  # the stalled adds end (as resets): their slots are free again
    await asyncio.gather(*stalled)
    balance = await router.raw(key=key, action="balance")
    assert balance.status == 200
    # 32 orders charged (held: the upstream may have them), the refused one never was.
    assert Decimal((await balance.json())["balance"]) == Decimal("1000") - 32 * Decimal("0.10")
    assert await orders_of(router, "busy") == 32
