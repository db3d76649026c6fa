"""Bad input: each gets its V2.md error over HTTP 200 JSON, and changes nothing."""

from __future__ import annotations

import io
import json
import logging
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import structlog

from router import logs, v2
from router.app import ORDER_SYNC
from router.metrics import ACTIONS, UNKNOWN_ACTION
from tests.conftest import SIM_KEY, Router, RouterFactory, SimFactory, service

GOOD = {"action": "add", "service": "1", "link": "https://instagram.com/x", "quantity": "100"}


@pytest.fixture
async def world(start_sim: SimFactory, start_router: RouterFactory) -> Any:
    sim = await start_sim()
    router = await start_router(
        {"alpha": sim.url},
        [
            service(1, [("alpha", 101)], rate="1.00", min=50, max=10000),
            service(2, [("alpha", 103)], type="Custom Comments", rate="10.00", min=1, max=100),
            service(3, [("alpha", 105)], type="Mentions", rate="2.00", min=10, max=1000),
            service(4, [("alpha", 107)], rate="1.00", min=50, max=10000, dripfeed=True),
        ],
    )
    key = await router.reseller("acme", "100")
    other_key = await router.reseller("other", "100")
    other_order = (await router.call(key=other_key, **GOOD))["order"]
    sim.received.clear()
    return sim, router, key, other_order


async def snapshot(router: Router) -> tuple[Any, ...]:
    acme = await router.store.reseller_by_name("acme")
    assert acme is not None
    return (
        acme.balance,
        await router.store.ledger_sum(acme.id),
        await router.store.count_orders(),
        len(await router.store.ledger(acme.id)),
    )


CASES: list[tuple[str, dict[str, str | None], str]] = [
    ("missing key", {"key": None}, v2.INVALID_KEY),
    ("wrong key", {"key": "not-a-key"}, v2.INVALID_KEY),
    ("empty key", {"key": ""}, v2.INVALID_KEY),
    ("unknown action", {"action": "transfer"}, v2.INCORRECT_REQUEST),
    ("missing action", {"action": None}, v2.INCORRECT_REQUEST),
    ("missing quantity", {"quantity": None}, v2.INCORRECT_REQUEST),
    ("non-numeric quantity", {"quantity": "lots"}, v2.INCORRECT_REQUEST),
    ("negative quantity", {"quantity": "-100"}, v2.INCORRECT_REQUEST),
    ("fractional quantity", {"quantity": "100.5"}, v2.INCORRECT_REQUEST),
    # Numbers are plain and at most 16 digits long, leading zeros included: never truncated.
    ("huge quantity", {"quantity": "9" * 40}, v2.INCORRECT_REQUEST),
    ("17-digit quantity", {"quantity": "9" * 17}, v2.INCORRECT_REQUEST),
    ("16-digit quantity", {"quantity": "9" * 16}, v2.quantity_above(10000)),
    ("zero-padded quantity", {"quantity": "0000000000000000000100000"}, v2.INCORRECT_REQUEST),
    ("zero-padded 17 digits", {"quantity": "0" * 14 + "100"}, v2.INCORRECT_REQUEST),
    ("exponent quantity", {"quantity": "1e3"}, v2.INCORRECT_REQUEST),
    ("hex quantity", {"quantity": "0x64"}, v2.INCORRECT_REQUEST),
    ("signed quantity", {"quantity": "+100"}, v2.INCORRECT_REQUEST),
    ("fullwidth quantity", {"quantity": "\uff11\uff10\uff10"}, v2.INCORRECT_REQUEST),
    (
        "zero-padded runs",
        {"service": "4", "runs": "0" * 18 + "3", "interval": "10"},
        v2.INCORRECT_REQUEST,
    ),
    (
        "zero-padded interval",
        {"service": "4", "runs": "3", "interval": "0" * 18 + "10"},
        v2.INCORRECT_REQUEST,
    ),
    (
        "drip-feed zero-padded quantity",
        {"service": "4", "runs": "3", "interval": "10", "quantity": "0" * 20 + "100"},
        v2.INCORRECT_REQUEST,
    ),
    ("too many runs", {"service": "4", "runs": "1001", "interval": "10"}, v2.INCORRECT_REQUEST),
    ("zero runs", {"service": "4", "runs": "0", "interval": "10"}, v2.INCORRECT_REQUEST),
    ("zero-padded service", {"service": "0" * 19 + "1"}, v2.INCORRECT_SERVICE),
    ("quantity below min", {"quantity": "49"}, v2.quantity_below(50)),
    ("zero quantity", {"quantity": "0"}, v2.quantity_below(50)),
    ("quantity above max", {"quantity": "10001"}, v2.quantity_above(10000)),
    ("unknown service", {"service": "999"}, v2.INCORRECT_SERVICE),
    ("non-numeric service", {"service": "one"}, v2.INCORRECT_SERVICE),
    ("missing service", {"service": None}, v2.INCORRECT_SERVICE),
    ("missing link", {"link": None}, v2.INCORRECT_LINK),
    ("empty link", {"link": "  "}, v2.INCORRECT_LINK),
    ("over-long link", {"link": "https://x.com/" + "a" * 2040}, v2.INCORRECT_LINK),
    ("control character in link", {"link": "https://x.com/\x00a"}, v2.INCORRECT_LINK),
    # Each end of each range of invisible characters (zero-width, bidi controls).
    *[
        (f"U+{ord(char):04X} in link", {"link": f"https://x.com/{char}a"}, v2.INCORRECT_LINK)
        for char in "\u200b\u200f\u202a\u202e\u2066\u2069\ufeff"
    ],
    ("bidi override around link", {"link": "\u202ehttps://x.com/a\u202c"}, v2.INCORRECT_LINK),
    ("comments missing", {"service": "2", "quantity": None}, v2.INCORRECT_REQUEST),
    ("comments blank", {"service": "2", "comments": "\n \r\n"}, v2.INCORRECT_REQUEST),
    ("usernames missing for mentions", {"service": "3"}, v2.INCORRECT_REQUEST),
    ("drip-feed without it", {"runs": "3", "interval": "10"}, v2.INCORRECT_REQUEST),
]


@pytest.mark.parametrize(("name", "change", "error"), CASES, ids=[c[0] for c in CASES])
async def test_bad_add(world: Any, name: str, change: dict[str, str | None], error: str) -> None:
    sim, router, key, _ = world
    params: dict[str, str | None] = {"key": key, **GOOD, **change}
    before = await snapshot(router)
    answer = await router.call("form", **{k: v for k, v in params.items() if v is not None})
    assert answer == {"error": error}
    assert await snapshot(router) == before
    assert sim.received_actions("add") == []


async def test_disabled_key(world: Any) -> None:
    _, router, key, _ = world
    await router.store.set_enabled("acme", False)
    assert await router.call(key=key, action="balance") == {"error": v2.INVALID_KEY}


async def test_not_enough_funds(world: Any) -> None:
    sim, router, key, _ = world
    await router.store.adjust_balance(
        "acme", -v2.to_minor(Decimal("99.95")), kind="adjustment", note="leave 0.05"
    )
    before = await snapshot(router)
    answer = await router.call(key=key, **GOOD)  # 100 at 1.00 per 1000 costs 0.10
    assert answer == {"error": v2.NOT_ENOUGH_FUNDS}
    assert await snapshot(router) == before
    assert sim.received_actions("add") == []


@pytest.mark.parametrize("field", ["orders", "refills"])
async def test_more_than_100_ids(world: Any, field: str) -> None:
    _, router, key, _ = world
    action = {"orders": "status", "refills": "refill_status"}[field]
    ids = ",".join(str(i) for i in range(1, 102))
    assert await router.call(key=key, action=action, **{field: ids}) == {"error": v2.TOO_MANY_IDS}
    for other in ("refill", "cancel"):
        answer = await router.call(key=key, action=other, orders=ids)
        assert answer == {"error": v2.TOO_MANY_IDS}


async def test_non_numeric_ids(world: Any) -> None:
    _, router, key, _ = world
    assert await router.call(key=key, action="status", order="abc") == {"error": v2.INCORRECT_ORDER}
    answer = await router.call(key=key, action="status", orders="abc,-1,1e3")
    assert answer == {k: {"error": v2.INCORRECT_ORDER} for k in ("abc", "-1", "1e3")}
    assert await router.call(key=key, action="refill", order="x") == {"error": v2.INCORRECT_ORDER}
    assert await router.call(key=key, action="refill_status", refill="x") == {
        "error": v2.REFILL_NOT_FOUND
    }
    assert await router.call(key=key, action="cancel", orders="x") == [
        {"order": "x", "cancel": {"error": v2.INCORRECT_ORDER}}
    ]


async def test_leading_zeros_count_within_the_length_bound(world: Any) -> None:
    """A 16-character number may be zero-padded; past 16 characters it is malformed, never cut
    short to its first digits (an order ID stays unknown, an order stays unplaced)."""
    sim, router, key, _ = world
    answer = await router.call(key=key, **{**GOOD, "quantity": "0000000000000100"})
    assert "order" in answer
    assert sim.received_actions("add")[-1].params["quantity"] == "100"
    padded = str(answer["order"]).zfill(16)
    long_id = str(answer["order"]).zfill(17)
    view = await router.call(key=key, action="status", order=answer["order"])
    assert await router.call(key=key, action="status", order=padded) == view
    before = await snapshot(router)
    assert await router.call(key=key, action="status", order=long_id) == {
        "error": v2.INCORRECT_ORDER
    }
    assert await router.call(key=key, action="status", orders=f"{long_id},{padded}") == {
        long_id: {"error": v2.INCORRECT_ORDER},
        padded: view,
    }
    assert await router.call(key=key, action="cancel", orders=long_id) == [
        {"order": long_id, "cancel": {"error": v2.INCORRECT_ORDER}}
    ]
    assert await router.call(key=key, action="refill_status", refill="0" * 17 + "1") == {
        "error": v2.REFILL_NOT_FOUND
    }
    assert await snapshot(router) == before
    assert sim.received_actions("cancel") == []


async def test_another_resellers_order_looks_unknown(world: Any) -> None:
    sim, router, key, other_order = world
    unknown = other_order + 1000
    for action, field in [("status", "order"), ("refill", "order")]:
        theirs = await router.call(key=key, action=action, **{field: other_order})
        nobody = await router.call(key=key, action=action, **{field: unknown})
        assert theirs == nobody == {"error": v2.INCORRECT_ORDER}
    theirs = await router.call(key=key, action="status", orders=str(other_order))
    assert theirs == {str(other_order): {"error": v2.INCORRECT_ORDER}}
    theirs = await router.call(key=key, action="cancel", orders=str(other_order))
    assert theirs == [{"order": other_order, "cancel": {"error": v2.INCORRECT_ORDER}}]
    assert sim.received_actions("cancel") == []
    assert sim.received_actions("refill") == []


async def test_malformed_json(world: Any) -> None:
    _, router, key, _ = world
    before = await snapshot(router)
    for body in (
        b'{"key": "' + key.encode() + b'", "action": "add"',
        b"[1, 2]",
        b'"text"',
        b'{"key": {"nested": 1}}',
    ):
        response = await router.client.post(
            "/api/v2", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == {"error": v2.INCORRECT_REQUEST}
    assert await snapshot(router) == before


async def test_body_over_the_size_limit(world: Any) -> None:
    _, router, key, _ = world
    before = await snapshot(router)
    big = {"key": key, **GOOD, "comments": "x" * (v2.MAX_BODY_BYTES + 10)}
    body = io.BytesIO(urllib.parse.urlencode(big).encode())  # a stream: aiohttp warns on big bytes
    response = await router.client.post(
        "/api/v2", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 200
    assert await response.json() == {"error": v2.INCORRECT_REQUEST}
    assert await snapshot(router) == before


async def test_non_utf8_bytes(world: Any) -> None:
    _, router, key, _ = world
    before = await snapshot(router)
    body = f"key={key}&action=add&service=1&quantity=100&link=".encode() + b"\xff\xfe%FF"
    for headers in (
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/json"},
    ):
        response = await router.client.post("/api/v2", data=body, headers=headers)
        assert response.status == 200
        assert await response.json() == {"error": v2.INCORRECT_REQUEST}
    response = await router.client.get(f"/api/v2?key={key}&action=balance&x=%FF")
    assert await response.json() == {"error": v2.INCORRECT_REQUEST}
    assert await snapshot(router) == before


def _multipart(key: str, headers: str, raw: bytes) -> bytes:
    """A multipart body: `key`, then an `action` part with extra `headers` holding `raw`."""
    return (
        b'--BB\r\nContent-Disposition: form-data; name="key"\r\n\r\n' + key.encode() + b"\r\n"
        b'--BB\r\nContent-Disposition: form-data; name="action"\r\n' + headers.encode()
        + b"\r\n\r\n" + raw + b"\r\n--BB--\r\n"
    )  # fmt: skip


async def test_bodies_that_do_not_decode(world: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A part in an unknown charset or transfer encoding, a compressed body that does not
    decompress (brotli and zstd included, whether or not their decoders are installed), a JSON
    string with a lone surrogate: each malformed, none a crash, none logged as an error."""
    _, router, key, _ = world
    before = await snapshot(router)
    multipart = {"Content-Type": "multipart/form-data; boundary=BB"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    json_type = {"Content-Type": "application/json"}
    bodies = [
        (multipart, _multipart(key, "Content-Type: text/plain; charset=no-such", b"balance")),
        (multipart, _multipart(key, "Content-Type: text/plain; charset=rot13", b"balance")),
        (multipart, _multipart(key, "Content-Transfer-Encoding: no-such", b"balance")),
        (multipart, _multipart(key, "Content-Transfer-Encoding: base64", b"!!")),
        (form | {"Content-Encoding": "gzip"}, b"not gzip"),
        (form | {"Content-Encoding": "deflate"}, b"not deflate"),
        (form | {"Content-Encoding": "br"}, b"not brotli"),
        (form | {"Content-Encoding": "zstd"}, b"not zstd"),
        (json_type, b'{"key": "' + key.encode() + b'", "action": "balance", "x": "\\ud800"}'),
        (json_type, b'{"key": "\\udfff", "action": "balance"}'),
        (json_type, b'{"key": "' + key.encode() + b'", "action": "balance", "\\ud800": "1"}'),
    ]
    for headers, body in bodies:
        # A fresh connection each: aiohttp closes one whose body it could not read.
        response = await router.client.post(
            "/api/v2", data=body, headers=headers | {"Connection": "close"}
        )
        assert response.status == 200, (headers, body)
        assert response.content_type == "application/json"
        assert await response.json() == {"error": v2.INCORRECT_REQUEST}, (headers, body)
    assert internal_errors(router) == 0
    assert await snapshot(router) == before
    # aiohttp drains a body that failed to decompress after the answer: its error is the
    # client's, not an unhandled exception of the server's.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


LogSetUp = Callable[[bool], io.StringIO]


@pytest.fixture
def server_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogSetUp]:
    """`server_logs(json_lines)`: the server's own log pipeline (`logs.configure`, as `serve`
    calls it, every processor) writing into the buffer it returns; the previous structlog
    configuration is restored afterwards."""
    saved = structlog.get_config()

    def set_up(json_lines: bool) -> io.StringIO:
        stream = io.StringIO()
        # configure binds the stderr of the moment; set here, in the test, as pytest's own
        # capture swaps stderr between set-up and the test.
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure(json_lines=json_lines)
        return stream

    yield set_up
    structlog.configure(**saved)


def _fragments(secret: str, size: int = 6) -> set[str]:
    """Every piece of `secret` of `size` characters (a cut-off key leaks too), but the pieces
    of only digits: a timestamp or an ID may hold those by chance."""
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    return {piece for piece in pieces if not piece.isdigit()}


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "console"])
async def test_keys_never_in_answers_or_logs(
    start_sim: SimFactory,
    start_router: RouterFactory,
    server_logs: LogSetUp,
    json_lines: bool,
) -> None:
    """Through the real log pipeline: requests that carry the reseller key everywhere it could
    leak, and upstream errors that echo the upstream key (cut where an error text is cut)."""
    good, echoing = await start_sim(), await start_sim()
    router = await start_router(
        {"good": good.url, "echoing": echoing.url},
        [service(1, [("good", 101)], min=10), service(2, [("echoing", 101)], min=10)],
    )
    key = await router.reseller("acme", "100")
    log_stream = server_logs(json_lines)
    order = {"action": "add", "link": "https://x.com/a", "quantity": "100"}

    answers = [
        await router.call("form", key=key + "x", action="balance"),
        await router.call("get", key=key, **{**order, "service": "1", "quantity": "lots"}),
        await router.call("json", key=key, action="transfer", to=key),
        await router.call("multipart", key=key, **{**order, "service": "1", "link": "\u202ex"}),
        await router.call("form", key=key, **order, service="1"),
    ]
    placed = answers[-1]["order"]
    echoing.echo_key("add")  # an ambiguous answer: the order is held, its error logged
    held = (await router.call("form", key=key, **order, service="2"))["order"]
    good.echo_key("status")
    await router.app[ORDER_SYNC].run_once()
    good.echo_key("cancel")
    cancel = await router.call("form", key=key, action="cancel", orders=str(placed))
    # A future log call that passes a key by name, as a careless one would.
    structlog.get_logger("router.test").warning(
        "params_logged", key=key, params={"key": key, "inner": {"api_key": SIM_KEY}}
    )

    out = log_stream.getvalue()
    assert key not in str(answers) + str(cancel)
    assert key not in out
    assert not {piece for piece in _fragments(SIM_KEY) if piece in out}, out
    held_order = await router.store.order(held)
    assert held_order is not None and held_order.state == "held"
    (attempt,) = await router.store.attempts(held)  # what `orders show` prints
    assert attempt.error and "key=***" in attempt.error
    assert not {piece for piece in _fragments(SIM_KEY) if piece in attempt.error}
    events = ["request", "order_accepted", "order_held", "status_call_failed", "cancel_failed"]
    events.append("params_logged")
    if not json_lines:
        assert all(event in out for event in events)
        assert out.count(logs.REDACTED) >= 3
        return
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["event"] for line in lines} == set(events)
    outcomes = [line["outcome"] for line in lines if line["event"] == "request"]
    assert outcomes == ["invalid_key", "incorrect_request", "incorrect_request",
                        "incorrect_link", "ok", "ok", "ok"]  # fmt: skip
    for event in ("order_held", "status_call_failed", "cancel_failed"):
        (line,) = [line for line in lines if line["event"] == event]
        assert "HTTP 500" in line["error"] and "key=***" in line["error"], line
    (careless,) = [line for line in lines if line["event"] == "params_logged"]
    assert careless["key"] == logs.REDACTED
    assert careless["params"] == {"key": logs.REDACTED, "inner": {"api_key": logs.REDACTED}}


FUZZ_VALUES = [
    "",
    " ",
    "0",
    "-1",
    "1",
    "2",
    "3",
    "4",
    "101",
    "1e3",
    "0x10",
    "1.0",
    "NaN",
    "9" * 30,
    "1,2,3",
    ",,",
    "1," * 150,
    "[1,2]",
    '{"a":1}',
    "null",
    "\x00",
    "\u202e",
    "😀",
    "%FF",
    "x" * 3000,
    "https://instagram.com/p/1",
    "a\nb\r\nc",
    "0000000000000000000100000",
    "0000000000000100",
    "9999999999999999",
    "\u200bx",
    "x\ufeff",
    "\ud800",  # a lone surrogate: only JSON can carry one (sent as "\\ud800")
    "a\udfffb",
]
FUZZ_FIELDS = ["action", "service", "link", "quantity", "order", "orders", "refill", "refills",
               "comments", "usernames", "runs", "interval", "answer_number", "key"]  # fmt: skip
FUZZ_ACTIONS = ["services", "add", "status", "refill", "refill_status", "cancel", "balance", "x"]
KNOWN_ERRORS = {
    v2.INVALID_KEY, v2.INCORRECT_REQUEST, v2.INCORRECT_SERVICE, v2.INCORRECT_ORDER,
    v2.NOT_ENOUGH_FUNDS, v2.INCORRECT_LINK, v2.REFILL_DISABLED, v2.CANCEL_DISABLED,
    v2.REFILL_NOT_FOUND, v2.TOO_MANY_IDS, v2.UNAVAILABLE,
}  # fmt: skip


def _errors_in(answer: Any) -> list[str]:
    """Every error message anywhere in an answer (lists and maps of per-item answers too)."""
    if isinstance(answer, dict):
        found = [answer["error"]] if isinstance(answer.get("error"), str) else []
        return found + [e for value in answer.values() for e in _errors_in(value)]
    if isinstance(answer, list):
        return [e for item in answer for e in _errors_in(item)]
    return []


def _surrogates(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def internal_errors(router: Router) -> float:
    """Requests that ended in `V2Api.handle`'s catch-all for crashes, over every action."""
    return sum(
        router.metric("smm_router_requests_total", action=action, outcome="internal_error")
        for action in (*ACTIONS, UNKNOWN_ACTION)
    )


async def test_random_requests_never_break_the_api(world: Any) -> None:
    """Hundreds of random mixes of actions, fields, values and encodings: every answer is HTTP
    200 JSON, every error a V2.md message, none the catch-all for a crash, and the ledger still
    balances."""
    import random

    _, router, key, _ = world
    rng = random.Random(20261127)
    for _ in range(400):
        params: dict[str, str] = {"key": key, "action": rng.choice(FUZZ_ACTIONS)}
        for field in rng.sample(FUZZ_FIELDS, rng.randint(0, 5)):
            params[field] = rng.choice(FUZZ_VALUES)
        encoding = rng.choice(["get", "form", "multipart", "json"])
        if any(_surrogates(value) for value in params.values()):
            encoding = "json"  # the other encodings cannot carry one
        elif encoding == "get" and len(urllib.parse.urlencode(params)) > 6000:
            encoding = "form"  # a URL that long is refused by aiohttp's client before sending
        response = await router.raw(encoding, **params)
        assert response.status == 200, (params, await response.text())
        assert response.content_type == "application/json", params
        answer = await response.json()
        for message in _errors_in(answer):
            assert message in KNOWN_ERRORS or message.startswith("Quantity"), (params, answer)
        # `Service temporarily unavailable` is also what a crash answers: tell them apart.
        assert internal_errors(router) == 0, (encoding, params, answer)
    acme = await router.store.reseller_by_name("acme")
    assert acme is not None
    assert await router.store.ledger_sum(acme.id) == acme.balance >= 0
