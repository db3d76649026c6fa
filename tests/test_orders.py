"""`add` for every service type of V2.md: required parameters, what reaches the upstream, the
charge rule. Real router, real simulator."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from router import v2
from router.sim import default_catalogue
from tests.conftest import Router, RouterFactory, SimFactory, service

UPSTREAM = {s.type: s.service for s in default_catalogue()}
COMMENTS = "great post\r\nlove it\n\n  nice  \n"  # three non-empty lines
USERNAMES = "alice\nbob\ncarol\ndave"  # four

# type -> (the add's type-specific parameters, the quantity it is charged for)
CASES: dict[str, tuple[dict[str, str], int]] = {
    "Default": ({"quantity": "150"}, 150),
    "Package": ({}, 1),
    "Custom Comments": ({"comments": COMMENTS}, 3),
    "Custom Comments Package": ({"comments": COMMENTS}, 1),
    "Mentions": ({"quantity": "150", "usernames": USERNAMES}, 150),
    "Mentions with Hashtags": (
        {"quantity": "150", "usernames": USERNAMES, "hashtags": "#a\n#b"},
        150,
    ),
    "Mentions Custom List": ({"usernames": USERNAMES}, 4),
    "Mentions Hashtag": ({"quantity": "150", "hashtag": "#smm"}, 150),
    "Mentions User Followers": ({"quantity": "150", "username": "someone"}, 150),
    "Mentions Media Likers": ({"quantity": "150", "media": "https://x.example/p/1"}, 150),
    "Comment Likes": ({"quantity": "150", "username": "commenter"}, 150),
    "Comment Replies": ({"username": "commenter", "comments": COMMENTS}, 3),
    "Poll": ({"quantity": "150", "answer_number": "2"}, 150),
    "SEO": ({"quantity": "150", "keywords": "smm panel\ncheap likes"}, 150),
    "Invites from Groups": ({"quantity": "150", "groups": "group1\ngroup2"}, 150),
    "Web Traffic": (
        {
            "quantity": "150",
            "country": "US",
            "device": "1",
            "type_of_traffic": "2",
            "referring_url": "https://ref.example",
        },
        150,
    ),
}
RATE = Decimal("3.333")


def test_every_supported_type_has_a_case() -> None:
    assert set(CASES) == set(v2.SERVICE_TYPES) - v2.UNSUPPORTED_TYPES


async def _world(start_sim: SimFactory, start_router: RouterFactory) -> tuple[Any, Router, str]:
    sim = await start_sim()
    services = [
        service(
            index + 1,
            [("alpha", UPSTREAM[kind])],
            type=kind,
            rate=str(RATE),
            min=1,
            max=1000,
            dripfeed=v2.SERVICE_TYPES[kind].dripfeed,
        )
        for index, kind in enumerate(CASES)
    ]
    router = await start_router({"alpha": sim.url}, services)
    return sim, router, await router.reseller("acme", "1000")


@pytest.mark.parametrize("kind", list(CASES))
async def test_add_of_each_type(
    start_sim: SimFactory, start_router: RouterFactory, kind: str
) -> None:
    sim, router, key = await _world(start_sim, start_router)
    local = list(CASES).index(kind) + 1
    params, charged = CASES[kind]
    link = "https://instagram.com/p/Cx1"

    answer = await router.call(
        key=key, action="add", service=local, link=link, junk="not forwarded", **params
    )

    assert isinstance(answer["order"], int)
    [received] = sim.received_actions("add")
    assert received.params == {
        "action": "add",
        "service": str(UPSTREAM[kind]),
        "link": link,
        **params,  # unchanged: newlines, spaces and all
    }
    order = await router.store.order(answer["order"])
    assert order is not None and order.quantity == charged
    kind_rule = v2.SERVICE_TYPES[kind].quantity
    expected = RATE if kind_rule == "flat" else RATE * charged / 1000
    assert order.charge == v2.to_minor(expected)
    reseller = await router.store.reseller_by_name("acme")
    assert reseller is not None
    assert reseller.balance == v2.to_minor(Decimal(1000)) - order.charge
    assert await router.store.ledger_sum(reseller.id) == reseller.balance


@pytest.mark.parametrize(
    "kind", [k for k, (params, _) in CASES.items() if set(params) - {"quantity"}]
)
async def test_each_required_parameter_is_required(
    start_sim: SimFactory, start_router: RouterFactory, kind: str
) -> None:
    sim, router, key = await _world(start_sim, start_router)
    local = list(CASES).index(kind) + 1
    params, _ = CASES[kind]
    for missing in set(params) - {"quantity"}:
        partial = {name: value for name, value in params.items() if name != missing}
        if kind == "Web Traffic" and missing == "referring_url":
            # one of google_keyword / referring_url: either will do, none will not
            ok = await router.call(
                key=key, action="add", service=local, link="x", google_keyword="k", **partial
            )
            assert "order" in ok
        answer = await router.call(key=key, action="add", service=local, link="x", **partial)
        assert answer == {"error": v2.INCORRECT_REQUEST}, missing
    expected_adds = 1 if kind == "Web Traffic" else 0
    assert len(sim.received_actions("add")) == expected_adds


async def test_counted_types_check_min_and_max_on_the_count(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url},
        [
            service(
                1, [("alpha", UPSTREAM["Custom Comments"])], type="Custom Comments", min=4, max=5
            )
        ],
    )
    key = await router.reseller()
    three = await router.call(key=key, action="add", service=1, link="x", comments=COMMENTS)
    assert three == {"error": v2.quantity_below(4)}
    six = "\n".join(f"c{i}" for i in range(6))
    assert await router.call(key=key, action="add", service=1, link="x", comments=six) == {
        "error": v2.quantity_above(5)
    }
    assert sim.received_actions("add") == []
