"""Tests of router/upstream.py against real servers on loopback (no mocks of aiohttp)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey
from pytest_aiohttp import AiohttpServer

from router import v2
from router.config import Provider, Secret
from router.upstream import (
    AddAnswer,
    AddResult,
    CallRecord,
    Outcome,
    OutcomeUnknown,
    StatusReading,
    UpstreamClient,
    UpstreamError,
    UpstreamNoFunds,
    UpstreamRefused,
    UpstreamService,
    UpstreamStatus,
    UpstreamTurnedAway,
    UpstreamUnreachable,
    classify_exception,
    parse_answer,
    parse_status_item,
    read_add,
    read_statuses,
)
from router.upstream.client import QUOTED_KEPT_CHARS, form_body

VECTORS = Path(__file__).resolve().parent / "vectors"  # copies of ../shared/vectors
ADD_CASES: list[dict[str, Any]] = json.loads((VECTORS / "upstream-add.json").read_text())["cases"]
STATUS_CASES: list[dict[str, Any]] = json.loads((VECTORS / "upstream-status.json").read_text())[
    "cases"
]
KEY = "sk-LEAK-CANARY-7f3a9c1e"  # must never show in an error
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested far deeper than the parser's recursion limit
JSON = "application/json"
ORDER = {"service": "101", "link": "https://instagram.com/someone", "quantity": "1000"}
WAF_PAGE = "<html><head><title>403 Forbidden</title></head><body>Access denied</body></html>"


def provider(url: str, *, timeout: float = 5.0) -> Provider:
    return Provider(name="alpha", url=url, key=Secret(KEY), timeout=timeout)


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_no_key(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text)
        assert KEY not in repr(text)


def body_of(case: dict[str, Any]) -> bytes:
    """A vector's body as sent: `body` as UTF-8, or `body_hex` for bytes that are not text."""
    if "body_hex" in case:
        return bytes.fromhex(case["body_hex"])
    body = case["body"]
    return (body if isinstance(body, str) else json.dumps(body)).encode()


def test_every_vector_is_loaded() -> None:
    """Each case has a body the tests can send and an expectation, so none is skipped."""
    for case in ADD_CASES:
        assert ("body" in case) != ("body_hex" in case), case["name"]
        assert case["outcome"] in set(Outcome), case["name"]
        assert isinstance(body_of(case), bytes)
    for case in STATUS_CASES:
        assert "body" in case and "expect" in case, case["name"]
    names = [case["name"] for case in ADD_CASES + STATUS_CASES]
    assert len(names) == len(set(names))  # ids of the parametrized tests


def assert_status(got: UpstreamStatus | None, expect: dict[str, Any] | None) -> None:
    if expect is None:
        assert got is None
        return
    assert got is not None
    assert got.status == expect["status"]
    assert got.remains == expect.get("remains")  # absent from `expect`: the upstream doesn't know
    if "start_count" in expect:
        assert got.start_count == expect["start_count"]
    if "charge" in expect:
        assert got.charge == Decimal(expect["charge"])


# --- A fake v2 provider on loopback --------------------------------------------------------------

Answer = tuple[int, str, bytes]


class FakeUpstream:
    """A v2 provider that answers each action with a canned (status, content type, body)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.received: list[dict[str, str]] = []
        self.content_types: list[str] = []

    def answer(self, action: str, data: object, status: int = 200, ctype: str = JSON) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.answers[action] = (status, ctype, body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.method == "POST"
        self.content_types.append(request.content_type)
        form = {name: str(value) for name, value in (await request.post()).items()}
        self.received.append(form)
        status, ctype, body = self.answers[form["action"]]
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})


Serve = Callable[[FakeUpstream], Awaitable[Provider]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> tuple[FakeUpstream, Provider]:
    upstream = FakeUpstream()
    app = web.Application()
    app.router.add_post("/api/v2", upstream.handle)
    server = await aiohttp_server(app)
    return upstream, provider(str(server.make_url("/api/v2")))


@pytest.fixture
def client(
    fake: tuple[FakeUpstream, Provider], session: aiohttp.ClientSession
) -> tuple[FakeUpstream, UpstreamClient]:
    upstream, config = fake
    return upstream, UpstreamClient(config, session)


# --- Raw TCP servers, for what no well-behaved HTTP server does ----------------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[int]:
    """A TCP server on loopback running `handler` per connection; yields its port."""
    tasks: list[asyncio.Task[None]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One whole HTTP request (head and form body): once read, the request was sent."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def until_client_leaves(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
    await reader.read()  # never answers; returns when the client gives up and closes


async def answer_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST


async def close_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def truncated_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n")
    writer.write(b'{"order": 23')
    await writer.drain()


async def huge_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    writer.write(b"Content-Length: 999999999\r\n\r\n[")
    await writer.drain()
    await reader.read()


async def tls_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)  # the TLS ClientHello
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await writer.drain()


class NoSuchHost(AbstractResolver):
    """A resolver that fails like getaddrinfo on an unknown name (no DNS traffic)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


# --- add: the vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ADD_CASES, ids=[case["name"] for case in ADD_CASES])
def test_read_add_of_the_vectors(case: dict[str, Any]) -> None:
    answer = read_add(case["status"], case["content_type"], body_of(case))
    assert answer.outcome == case["outcome"]
    assert answer.upstream_order == case.get("order")
    assert (answer.error is None) == (answer.outcome is Outcome.ACCEPTED)


@pytest.mark.parametrize("case", ADD_CASES, ids=[case["name"] for case in ADD_CASES])
async def test_add_vectors_over_http(
    case: dict[str, Any], client: tuple[FakeUpstream, UpstreamClient]
) -> None:
    upstream, upstream_client = client
    upstream.answer("add", body_of(case), case["status"], case["content_type"])
    result = await upstream_client.add(ORDER)
    assert result.outcome == case["outcome"]
    assert result.upstream_order == case.get("order")
    assert (result.error is None) == (result.outcome is Outcome.ACCEPTED)
    assert result.latency >= 0
    assert upstream.received == [{**ORDER, "key": KEY, "action": "add"}]
    assert upstream.content_types == ["application/x-www-form-urlencoded"]


def test_add_error_texts() -> None:
    assert read_add(200, JSON, '{"error": "Incorrect service ID"}') == AddAnswer(
        Outcome.REFUSED, None, "Incorrect service ID"
    )
    assert read_add(200, JSON, '{"error": "NOT ENOUGH FUNDS on balance"}').outcome == "no_funds"
    assert read_add(429, "text/html", "Too Many Requests").error == "HTTP 429 Too Many Requests"
    answer = read_add(502, "text/html", "<html>502 Bad Gateway</html>")
    assert answer.outcome is Outcome.AMBIGUOUS
    assert answer.error is not None and answer.error.startswith("HTTP 502")


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, '{"order": 23501.0}', Outcome.ACCEPTED),
        (200, '{"order": " 42 "}', Outcome.ACCEPTED),
        (201, '{"order": 7}', Outcome.ACCEPTED),
        (200, '{"order": -5}', Outcome.AMBIGUOUS),
        (200, '{"order": "12abc"}', Outcome.AMBIGUOUS),
        (200, '{"order": true}', Outcome.AMBIGUOUS),
        (200, '{"order": 1.5}', Outcome.AMBIGUOUS),
        (200, '{"order": "1e999999"}', Outcome.AMBIGUOUS),  # and fast: no million-digit int
        (200, '{"order": 99999999999999999999}', Outcome.AMBIGUOUS),  # beyond SQLite INTEGER
        (200, '[{"order": 5}]', Outcome.AMBIGUOUS),
        (200, "null", Outcome.AMBIGUOUS),
        (200, '{"order": 5, "error": "Incorrect link"}', Outcome.AMBIGUOUS),  # contradictory
        (200, '{"order": 5, "error": null}', Outcome.ACCEPTED),
        (200, '{"error": ""}', Outcome.AMBIGUOUS),  # an empty error refuses nothing
        (200, '{"error": {"code": 3}}', Outcome.REFUSED),
        (404, '{"error": "Not found"}', Outcome.REFUSED),
        (404, "<html>Not found</html>", Outcome.REFUSED),  # turned away before the panel
        (413, "", Outcome.REFUSED),
        (400, '{"message": "Bad Request"}', Outcome.REFUSED),  # JSON, but no order in it
        (403, '{"order": 5}', Outcome.AMBIGUOUS),  # only a 2xx accepts; the order may exist
        (400, '<b>Notice</b>: x<br>{"order": "5"}', Outcome.AMBIGUOUS),  # an order, after a notice
        (403, '{"order": 5, "error": "Forbidden"}', Outcome.AMBIGUOUS),
        (408, '{"error": "Request Timeout"}', Outcome.AMBIGUOUS),  # the panel may have it
        (403, DEEP, Outcome.AMBIGUOUS),  # unreadable: whether it holds an order is unknown
        (200, DEEP, Outcome.AMBIGUOUS),
        (200, "[" * 100_000, Outcome.AMBIGUOUS),
        (200, '{"order": ' + "[" * 5000 + "]" * 5000 + "}", Outcome.AMBIGUOUS),
        (200, '{"error": ' + "[" * 500 + "]" * 500 + "}", Outcome.REFUSED),
        (302, "", Outcome.AMBIGUOUS),
        (503, '{"error": "Not enough funds on balance"}', Outcome.AMBIGUOUS),  # 5xx first
        (429, '{"error": "Slow down"}', Outcome.REFUSED),
    ],
)
def test_read_add_edges(status: int, body: str, outcome: Outcome) -> None:
    assert read_add(status, JSON, body).outcome is outcome
    assert read_add(status, JSON, body.encode()).outcome is outcome  # as the client reads it


@pytest.mark.parametrize(
    "body",
    [
        b'\xff\xfe{"order": 77}',  # what errors="replace" would have read as order 77
        b'{"order": 77, "note": "\xe9t\xe9"}',  # Latin-1 text beside a valid order
        b'{"order": 7\xff7}',
        '{"order": 77}'.encode("utf-16"),
        b"\xc3",  # a truncated multi-byte character
    ],
)
def test_add_answer_that_is_not_utf8_is_ambiguous(body: bytes) -> None:
    """JSON is UTF-8: bytes that are not mean the answer was mangled, so nothing in it is
    taken as an order ID, even where it would parse."""
    answer = read_add(200, JSON, body)
    assert (answer.outcome, answer.upstream_order) == (Outcome.AMBIGUOUS, None)
    assert answer.error is not None and "not UTF-8" in answer.error


def test_a_4xx_page_that_is_not_utf8_is_still_a_refusal() -> None:
    page = "<html><h1>403 Accès refusé</h1></html>".encode("latin-1")
    answer = read_add(403, "text/html", page)
    assert answer.outcome is Outcome.REFUSED
    assert answer.error is not None and answer.error.startswith("HTTP 403")


# The vectors whose refusal is not about the order, and so counts against the provider.
TURNED_AWAY_VECTORS = {"WAF 403 page", "404 page at a wrong URL"}
RATE_LIMITED_VECTORS = {"rate limited"}


@pytest.mark.parametrize("case", ADD_CASES, ids=[case["name"] for case in ADD_CASES])
def test_read_add_vectors_say_which_refusals_are_not_about_the_order(
    case: dict[str, Any],
) -> None:
    answer = read_add(case["status"], case["content_type"], body_of(case))
    assert answer.turned_away is (case["name"] in TURNED_AWAY_VECTORS)
    assert answer.rate_limited is (case["name"] in RATE_LIMITED_VECTORS)


@pytest.mark.parametrize(
    ("status", "ctype", "body", "outcome", "turned_away"),
    [
        (403, "text/html", WAF_PAGE, Outcome.REFUSED, True),  # a firewall in front of the panel
        (404, "text/html", "<html>Not found</html>", Outcome.REFUSED, True),
        (413, "text/html", "", Outcome.REFUSED, True),
        (400, JSON, '{"message": "Bad Request"}', Outcome.REFUSED, True),  # a gateway's JSON
        (403, JSON, '{"error": ""}', Outcome.REFUSED, True),  # an empty error says nothing
        (403, JSON, '{"error": "Forbidden"}', Outcome.REFUSED, False),  # the panel's own words
        (404, JSON, '{"error": "Not found"}', Outcome.REFUSED, False),
        (400, JSON, '{"error": "Incorrect link"}', Outcome.REFUSED, False),
        (403, "text/html", '<b>Notice</b><br>{"error": "Bad link"}', Outcome.REFUSED, False),
        (402, JSON, '{"error": "Not enough funds on balance"}', Outcome.NO_FUNDS, False),
        (200, JSON, '{"error": "Incorrect link"}', Outcome.REFUSED, False),
        (429, "text/html", "Too Many Requests", Outcome.REFUSED, False),  # rate_limited instead
        (403, JSON, '{"order": 5}', Outcome.AMBIGUOUS, False),
        (408, "text/html", WAF_PAGE, Outcome.AMBIGUOUS, False),
        (502, "text/html", WAF_PAGE, Outcome.AMBIGUOUS, False),
        (200, "text/html", WAF_PAGE, Outcome.AMBIGUOUS, False),
    ],
)
def test_a_4xx_page_is_turned_away_and_a_4xx_error_text_is_about_the_order(
    status: int, ctype: str, body: str, outcome: Outcome, turned_away: bool
) -> None:
    answer = read_add(status, ctype, body.encode())
    assert (answer.outcome, answer.turned_away) == (outcome, turned_away)
    if outcome is Outcome.REFUSED:
        raises = UpstreamTurnedAway if turned_away else UpstreamRefused
        with pytest.raises(raises) as caught:
            parse_answer(status, ctype, body.encode())
        assert isinstance(caught.value, UpstreamTurnedAway) is turned_away


async def test_add_over_http_says_it_was_turned_away(
    client: tuple[FakeUpstream, UpstreamClient],
) -> None:
    upstream, upstream_client = client
    upstream.answer("add", f"{WAF_PAGE} {KEY}".encode(), 403, "text/html")
    result = await upstream_client.add(ORDER)
    assert (result.outcome, result.turned_away, result.rate_limited) == (
        Outcome.REFUSED,
        True,
        False,
    )
    assert result.error is not None and result.error.startswith("HTTP 403 (text/html)")
    assert_no_key(result.error)
    upstream.answer("add", {"error": "Forbidden"}, 403)
    result = await upstream_client.add(ORDER)
    assert (result.outcome, result.turned_away, result.error) == (
        Outcome.REFUSED,
        False,
        "Forbidden",
    )
    upstream.answer("add", b"Too Many Requests", 429, "text/html")
    result = await upstream_client.add(ORDER)
    assert (result.outcome, result.turned_away, result.rate_limited) == (
        Outcome.REFUSED,
        False,
        True,
    )


def test_parse_answer_raises_only_upstream_errors() -> None:
    """What crashes the reader (RecursionError here) comes out as OutcomeUnknown."""
    for status, body in ((200, DEEP), (200, DEEP.encode()), (404, DEEP), (200, b"\xff")):
        with pytest.raises(OutcomeUnknown):
            parse_answer(status, JSON, body)


async def test_add_does_not_follow_redirects(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    hits: list[str] = []

    async def moved(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        if request.path == "/api/v2":
            raise web.HTTPFound("/elsewhere")
        return web.json_response({"order": 1})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    server = await aiohttp_server(app)
    result = await UpstreamClient(provider(str(server.make_url("/api/v2"))), session).add(ORDER)
    assert result.outcome is Outcome.AMBIGUOUS
    assert hits == ["/api/v2"]


async def test_add_refuses_key_or_action_in_params(
    client: tuple[FakeUpstream, UpstreamClient],
) -> None:
    upstream, upstream_client = client
    with pytest.raises(ValueError, match="key and action"):
        await upstream_client.add({**ORDER, "key": "other"})
    assert upstream.received == []


# --- Network failures: real sockets --------------------------------------------------------------


async def test_connection_refused_is_unreachable(session: aiohttp.ClientSession) -> None:
    upstream_client = UpstreamClient(provider(f"http://127.0.0.1:{free_port()}/api/v2"), session)
    result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.UNREACHABLE
    assert result.upstream_order is None
    assert result.error is not None and "ClientConnectorError" in result.error
    with pytest.raises(UpstreamUnreachable) as caught:
        await upstream_client.balance()
    assert caught.value.outcome is Outcome.UNREACHABLE
    assert_no_key(result.error, caught.value, caught.value.message)


async def test_dns_failure_is_unreachable() -> None:
    connector = aiohttp.TCPConnector(resolver=NoSuchHost())
    async with aiohttp.ClientSession(connector=connector) as own_session:
        upstream_client = UpstreamClient(provider("http://alpha.invalid/api/v2"), own_session)
        result = await upstream_client.add(ORDER)
        assert result.outcome is Outcome.UNREACHABLE
        assert result.error is not None and "ClientConnectorDNSError" in result.error
        with pytest.raises(UpstreamUnreachable):
            await upstream_client.services()


async def test_tls_handshake_that_never_ends_is_a_connect_timeout(
    session: aiohttp.ClientSession,
) -> None:
    """The TLS handshake belongs to connecting: a timeout there means nothing was sent."""
    async with raw_server(until_client_leaves) as port:
        upstream_client = UpstreamClient(
            provider(f"https://127.0.0.1:{port}/api/v2", timeout=0.3), session
        )
        result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.UNREACHABLE
    assert result.error is not None and "ConnectionTimeoutError" in result.error
    assert result.latency < 0.3  # the connect timeout fired before the total one


async def test_tls_failure_is_unreachable(session: aiohttp.ClientSession) -> None:
    async with raw_server(tls_garbage) as port:
        upstream_client = UpstreamClient(provider(f"https://127.0.0.1:{port}/api/v2"), session)
        result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.UNREACHABLE
    assert result.error is not None and "SSL" in result.error


async def test_slow_answer_is_ambiguous(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    answer = asyncio.Event()  # set only once the client is done: only its timeout can end it

    async def slow(request: web.Request) -> web.StreamResponse:
        await answer.wait()
        return web.json_response({"order": 1})

    app = web.Application()
    app.router.add_post("/api/v2", slow)
    server = await aiohttp_server(app)
    config = provider(str(server.make_url("/api/v2")), timeout=0.3)
    try:
        result = await UpstreamClient(config, session).add(ORDER)
    finally:
        answer.set()
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.latency > 0.25  # the total timeout (0.3 s), not the connect one (0.15 s)
    assert result.error is not None and "TimeoutError" in result.error


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (answer_nothing, "TimeoutError"),
        (reset_after_request, "Connection reset"),
        (close_after_request, "ServerDisconnectedError"),
        (truncated_answer, "ClientPayloadError"),
    ],
    ids=["never answers", "connection reset", "closed without answer", "truncated body"],
)
async def test_failures_after_sending_are_ambiguous(
    handler: RawHandler, error: str, session: aiohttp.ClientSession
) -> None:
    async with raw_server(handler) as port:
        config = provider(f"http://127.0.0.1:{port}/api/v2", timeout=0.3)
        upstream_client = UpstreamClient(config, session)
        result = await upstream_client.add(ORDER)
        assert result.outcome is Outcome.AMBIGUOUS
        assert result.error is not None and error in result.error
        with pytest.raises(OutcomeUnknown, match=error) as caught:
            await upstream_client.status([1])
    assert_no_key(result.error, caught.value)


async def test_oversized_answer_is_ambiguous(session: aiohttp.ClientSession) -> None:
    async with raw_server(huge_answer) as port:
        upstream_client = UpstreamClient(provider(f"http://127.0.0.1:{port}/api/v2"), session)
        result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error is not None and "too large" in result.error


def connection_key() -> ConnectionKey:
    return ConnectionKey("alpha.example", 443, True, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (aiohttp.ConnectionTimeoutError("Connection timeout"), Outcome.UNREACHABLE),
        (
            aiohttp.ClientConnectorError(connection_key(), ConnectionRefusedError(111, "refused")),
            Outcome.UNREACHABLE,
        ),
        (
            aiohttp.ClientConnectorDNSError(connection_key(), OSError(-2, "unknown name")),
            Outcome.UNREACHABLE,
        ),
        (
            aiohttp.ClientConnectorCertificateError(connection_key(), OSError(1, "bad cert")),
            Outcome.UNREACHABLE,
        ),
        (
            aiohttp.ClientConnectorSSLError(connection_key(), OSError(1, "handshake")),
            Outcome.UNREACHABLE,
        ),
        (aiohttp.InvalidURL("alpha"), Outcome.UNREACHABLE),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), Outcome.AMBIGUOUS),
        (aiohttp.ServerTimeoutError("timeout"), Outcome.AMBIGUOUS),
        (TimeoutError(), Outcome.AMBIGUOUS),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), Outcome.AMBIGUOUS),
        (aiohttp.ClientConnectionResetError("reset"), Outcome.AMBIGUOUS),
        (aiohttp.ServerDisconnectedError(), Outcome.AMBIGUOUS),
        (aiohttp.ClientPayloadError("Response payload is not completed"), Outcome.AMBIGUOUS),
        (ConnectionResetError(104, "reset"), Outcome.AMBIGUOUS),
        (RuntimeError("unforeseen"), Outcome.AMBIGUOUS),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_classify_exception(exc: BaseException, outcome: Outcome) -> None:
    assert classify_exception(exc) is outcome


# --- status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", STATUS_CASES, ids=[case["name"] for case in STATUS_CASES])
def test_parse_status_item_vectors(case: dict[str, Any]) -> None:
    for order_id, expect in case["expect"].items():
        assert_status(parse_status_item(case["body"].get(order_id), case["quantity"]), expect)


@pytest.mark.parametrize("case", STATUS_CASES, ids=[case["name"] for case in STATUS_CASES])
async def test_status_vectors_over_http(
    case: dict[str, Any], client: tuple[FakeUpstream, UpstreamClient]
) -> None:
    upstream, upstream_client = client
    upstream.answer("status", case["body"])
    ids = [int(order_id) for order_id in case.get("asked", case["expect"])]
    got = await upstream_client.status(ids, {order_id: case["quantity"] for order_id in ids})
    assert set(got) == set(ids)
    for order_id in ids:
        assert_status(got[order_id], case["expect"][str(order_id)])
    assert upstream.received[0]["orders"] == ",".join(map(str, ids))


def test_parse_status_item_edges() -> None:
    item: dict[str, object] = {"status": "in_progress", "remains": "-3", "start_count": "-1"}
    assert parse_status_item(item | {"charge": "-2"}, None) == UpstreamStatus(
        v2.IN_PROGRESS, 0, None, None, None
    )
    item = {"status": "Partial", "remains": 5000, "charge": "1e999999", "currency": " usd "}
    assert parse_status_item(item, None) == UpstreamStatus(v2.PARTIAL, 5000, None, None, "USD")
    assert parse_status_item({"status": "Completed", "remains": "1e999999"}, 10) == UpstreamStatus(
        v2.COMPLETED, None, None, None, None
    )
    assert parse_status_item({"status": "Completed", "error": None}, 10) is not None
    assert parse_status_item({"status": None}, 10) is None
    assert parse_status_item(["Completed"], 10) is None
    assert parse_status_item(None, 10) is None


async def test_status_many_shapes(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    upstream.answer(
        "status",
        {
            "1": {"status": "Completed", "remains": "0", "charge": 0.9, "currency": "USD"},
            "2": "Incorrect order ID",
            "3": {"error": "Incorrect order ID"},
            "4": {"status": "Pending"},
        },
    )
    got = await upstream_client.status([1, 2, 3, 4, 5, 1])  # a duplicate is asked once
    assert upstream.received[-1]["orders"] == "1,2,3,4,5"
    assert got == {
        1: UpstreamStatus(v2.COMPLETED, 0, None, Decimal("0.9"), "USD"),
        2: None,
        3: None,
        4: UpstreamStatus(v2.PENDING, None, None, None, None),
        5: None,
    }
    upstream.answer("status", [])  # PHP's empty keyed array
    assert await upstream_client.status([7, 8]) == {7: None, 8: None}
    upstream.answer("status", {"status": "Partial", "remains": "5", "charge": "1"})  # single shape
    assert (await upstream_client.status([9], {9: 100}))[9] == UpstreamStatus(
        v2.PARTIAL, 5, None, Decimal("1"), None
    )


@pytest.mark.parametrize(
    ("answer", "status", "ctype", "problem"),
    [
        ({"error": "Incorrect request"}, 200, JSON, "whole answer: Incorrect request"),
        (b"<html>Maintenance</html>", 200, "text/html", "whole answer: HTTP 200 (text/html), not"),
        ("Completed", 200, JSON, "whole answer: not a list or an object: Completed"),
        (DEEP.encode(), 200, JSON, "whole answer: HTTP 200: unreadable (RecursionError"),
        (b'\xff{"1": {"status": "Completed"}}', 200, JSON, "whole answer: HTTP 200: not UTF-8"),
        (b"<html>403 Forbidden</html>", 403, "text/html", "whole answer: HTTP 403 (text/html)"),
        ({"error": "Not enough funds on balance"}, 402, JSON, "whole answer: Not enough funds"),
    ],
    ids=["error", "html", "a string", "deep JSON", "not UTF-8", "WAF 403", "402"],
)
async def test_status_answer_unusable_as_a_whole_is_read_per_order(
    client: tuple[FakeUpstream, UpstreamClient],
    answer: object,
    status: int,
    ctype: str,
    problem: str,
) -> None:
    """An answer that came back but cannot be used says nothing of any order: each one asked
    gets it as its problem (the sync records it), and the call does not raise."""
    upstream, upstream_client = client
    upstream.answer("status", answer, status=status, ctype=ctype)
    readings = await upstream_client.status_readings([1, 2])
    assert set(readings) == {1, 2}
    for reading in readings.values():
        assert reading.status is None
        assert reading.problem is not None and reading.problem.startswith(problem)
        assert len(reading.problem) <= 300
    assert await upstream_client.status([1, 2]) == {1: None, 2: None}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_status_call_fails_when_the_provider_is_in_trouble(
    client: tuple[FakeUpstream, UpstreamClient], status: int
) -> None:
    """No usable answer because of the provider: the call fails (the sync leaves the orders
    due and asks again later) instead of marking every order."""
    upstream, upstream_client = client
    upstream.answer("status", {"1": {"status": "Completed"}}, status=status)
    with pytest.raises(UpstreamError, match=f"HTTP {status}"):
        await upstream_client.status_readings([1])


class Exploding(dict[str, object]):
    """An item whose reading raises, as an unforeseen shape might."""

    def get(self, *args: object) -> object:
        raise RuntimeError("boom")


def test_status_item_that_crashes_the_reader_leaves_only_itself_unread() -> None:
    data = {"1": Exploding(), "2": {"status": "Completed", "remains": "0"}}
    readings = read_statuses(data, [1, 2], {2: 100})
    assert readings[1] == StatusReading(None, "unreadable item (RuntimeError: boom)")
    assert readings[2] == StatusReading(UpstreamStatus(v2.COMPLETED, 0, None, None, None), None)


@pytest.mark.parametrize(
    "answer", [DEEP.encode(), b"\xff\xfe{}", b"<html>403</html>"], ids=["deep", "utf8", "403"]
)
async def test_other_actions_raise_a_clean_upstream_error(
    client: tuple[FakeUpstream, UpstreamClient], answer: bytes
) -> None:
    upstream, upstream_client = client
    for action in ("balance", "services", "refill", "refill_status", "cancel"):
        upstream.answer(action, answer, status=403 if b"403" in answer else 200)
    calls: list[Awaitable[object]] = [
        upstream_client.balance(),
        upstream_client.services(),
        upstream_client.refill(1),
        upstream_client.refill_status([1]),
        upstream_client.cancel([1]),
    ]
    for call in calls:
        with pytest.raises(UpstreamError) as caught:
            await call
        assert_no_key(caught.value.message)


async def test_status_batches_are_bounded(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    with pytest.raises(ValueError, match="at most 100"):
        await upstream_client.status(list(range(1, 102)))
    assert await upstream_client.status([]) == {}
    assert upstream.received == []
    upstream.answer("status", {})
    assert len(await upstream_client.status(list(range(1, 101)))) == 100


# --- refill, refill_status, cancel, balance, services ---------------------------------------------


async def test_refill(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    upstream.answer("refill", {"refill": "1"})
    assert await upstream_client.refill(23501) == 1
    assert upstream.received[-1] == {"key": KEY, "action": "refill", "order": "23501"}
    upstream.answer("refill", {"refill": 77})
    assert await upstream_client.refill(23501) == 77
    upstream.answer("refill", {"error": "Refill is disabled for this service"})
    with pytest.raises(UpstreamRefused) as caught:
        await upstream_client.refill(23501)
    assert caught.value.message == "Refill is disabled for this service"
    upstream.answer("refill", {"refill": {"error": "Incorrect order ID"}})
    with pytest.raises(UpstreamRefused, match=r"^Incorrect order ID$"):
        await upstream_client.refill(23501)
    for garbage in ({"refill": 0}, {"refill": "soon"}, {"status": "ok"}, [1]):
        upstream.answer("refill", garbage)
        with pytest.raises(OutcomeUnknown):
            await upstream_client.refill(23501)


async def test_refill_many(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    """One call for many orders (V2.md's list shape and the odd ones), one item per order."""
    upstream, upstream_client = client
    upstream.answer(
        "refill",
        [
            {"order": 1, "refill": 11},
            {"order": "2", "refill": "12"},
            {"order": 3, "refill": {"error": "Incorrect order ID"}},
            {"order": 4, "refill": 0},
            {"order": 6, "error": "Refill is available only for completed orders"},
            "garbage",
        ],
    )
    got = await upstream_client.refill_many([1, 2, 3, 4, 5, 6])
    assert upstream.received[-1] == {"key": KEY, "action": "refill", "orders": "1,2,3,4,5,6"}
    assert (got[1], got[2]) == (11, 12)
    assert isinstance(got[3], UpstreamRefused) and got[3].message == "Incorrect order ID"
    assert isinstance(got[4], OutcomeUnknown)  # no usable refill ID: one may exist
    assert isinstance(got[5], OutcomeUnknown) and "missing" in got[5].message
    assert isinstance(got[6], UpstreamRefused) and "completed orders" in got[6].message

    # Keyed by the order IDs as sent, items bare or as objects.
    upstream.answer("refill", {"1": 21, "2": "22", "3": {"refill": 23}, "4": "Order not found"})
    got = await upstream_client.refill_many([1, 2, 3, 4])
    assert (got[1], got[2], got[3]) == (21, 22, 23)
    assert isinstance(got[4], UpstreamRefused) and got[4].message == "Order not found"

    # A lone order goes as `order`, and may come back in the single shape.
    upstream.answer("refill", {"refill": "31"})
    assert await upstream_client.refill_many([7]) == {7: 31}
    assert upstream.received[-1] == {"key": KEY, "action": "refill", "order": "7"}
    assert await upstream_client.refill_many([]) == {}
    assert len(upstream.received) == 3  # no call for no orders

    upstream.answer("refill", [])  # PHP's empty array: nothing readable
    assert all(
        isinstance(a, OutcomeUnknown) for a in (await upstream_client.refill_many([1, 2])).values()
    )
    upstream.answer("refill", {"error": f"Invalid API key {KEY}"})  # the whole call refused
    with pytest.raises(UpstreamRefused) as caught:
        await upstream_client.refill_many([1, 2])
    assert KEY not in caught.value.message
    upstream.answer("refill", [{"order": 1, "refill": {"error": f"key {KEY} here"}}])
    [(_, item)] = (await upstream_client.refill_many([1])).items()
    assert isinstance(item, UpstreamRefused) and item.message == "key ********** here"
    with pytest.raises(ValueError, match="at most 100"):
        await upstream_client.refill_many(list(range(1, 102)))


async def test_refill_status(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    upstream.answer(
        "refill_status",
        [
            {"refill": 1, "status": "Completed"},
            {"refill": "2", "status": "in progress"},
            {"refill": 3, "status": {"error": "Refill not found"}},
            {"refill": 4, "status": "Sleeping"},
        ],
    )
    got = await upstream_client.refill_status([1, 2, 3, 4, 5])
    assert got == {1: v2.COMPLETED, 2: v2.IN_PROGRESS, 3: None, 4: None, 5: None}
    assert upstream.received[-1]["refills"] == "1,2,3,4,5"
    upstream.answer("refill_status", {"1": {"status": "Rejected"}, "2": "Refill not found"})
    assert await upstream_client.refill_status([1, 2]) == {1: v2.REJECTED, 2: None}
    upstream.answer("refill_status", {"status": "Pending"})  # the single shape
    assert await upstream_client.refill_status([6]) == {6: v2.PENDING}
    upstream.answer("refill_status", {"error": "Incorrect request"})
    with pytest.raises(UpstreamRefused):
        await upstream_client.refill_status([1])


async def test_cancel(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    upstream.answer(
        "cancel",
        [
            {"order": 9, "cancel": {"error": "Incorrect order ID"}},
            {"order": 2, "cancel": 1},
            {"order": "3", "cancel": "1"},
            {"order": 4, "cancel": 0},
            {"order": 5, "cancel": "Cancel is disabled for this service"},
        ],
    )
    got = await upstream_client.cancel([9, 2, 3, 4, 5, 6])
    assert upstream.received[-1]["orders"] == "9,2,3,4,5,6"
    assert got[9] == "Incorrect order ID"
    assert got[2] is None and got[3] is None
    assert got[4] == "cancel not accepted: 0"
    assert got[5] == "Cancel is disabled for this service"
    assert got[6] == "missing from the answer"
    upstream.answer("cancel", {"cancel": True})  # the single shape
    assert await upstream_client.cancel([8]) == {8: None}
    upstream.answer("cancel", b"", ctype="text/html")
    with pytest.raises(OutcomeUnknown):
        await upstream_client.cancel([8])


async def test_balance(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    upstream.answer("balance", {"balance": "100.84292", "currency": "USD"})
    assert await upstream_client.balance() == (Decimal("100.84292"), "USD")
    assert upstream.received[-1] == {"key": KEY, "action": "balance"}
    upstream.answer("balance", {"balance": 0.1, "currency": "eur"})
    assert await upstream_client.balance() == (Decimal("0.1"), "EUR")
    upstream.answer("balance", {"balance": "-3.5"})  # credit; currency from the config
    assert await upstream_client.balance() == (Decimal("-3.5"), "USD")
    for garbage in ({"balance": "lots"}, {"currency": "USD"}, {"balance": "1e999"}, [1]):
        upstream.answer("balance", garbage)
        with pytest.raises(OutcomeUnknown):
            await upstream_client.balance()
    upstream.answer("balance", {"error": "Invalid API key"}, status=401)
    with pytest.raises(UpstreamRefused) as refused:
        await upstream_client.balance()
    assert not isinstance(refused.value, UpstreamTurnedAway)  # the panel's answer: it is up


async def test_a_balance_turned_away_by_a_4xx_page_raises_upstream_turned_away(
    client: tuple[FakeUpstream, UpstreamClient],
) -> None:
    upstream, upstream_client = client
    upstream.answer("balance", f"{WAF_PAGE} {KEY}".encode(), 403, "text/html")
    with pytest.raises(UpstreamTurnedAway) as caught:
        await upstream_client.balance()
    assert caught.value.outcome is Outcome.REFUSED
    assert caught.value.message.startswith("HTTP 403 (text/html)")
    assert_no_key(caught.value, caught.value.message)


SERVICE = {
    "service": 1,
    "name": "Followers",
    "type": "Default",
    "category": "First Category",
    "rate": "0.90",
    "min": "50",
    "max": "10000",
    "refill": True,
    "cancel": True,
    "dripfeed": False,
}


async def test_services(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    loose = {
        **SERVICE,
        "service": "2",
        "rate": 1.2,
        "min": 10,
        "max": 20,
        "refill": "0",
        "cancel": 1,
        "dripfeed": "true",
    }
    bare = {"service": 3, "name": "Views", "rate": "0.01", "min": "100", "max": "1000000"}
    broken = [
        {**SERVICE, "service": "x"},
        {**SERVICE, "rate": "free"},
        {**SERVICE, "min": "100", "max": "10"},
        {**SERVICE, "name": None},
        {**SERVICE, "rate": "-1"},
        "Followers",
    ]
    upstream.answer("services", [SERVICE, *broken, loose, bare])
    got = await upstream_client.services()
    assert upstream.received[-1] == {"key": KEY, "action": "services"}
    assert got == [
        UpstreamService(
            1,
            "Followers",
            "Default",
            "First Category",
            Decimal("0.90"),
            50,
            10000,
            refill=True,
            cancel=True,
            dripfeed=False,
        ),
        UpstreamService(
            2,
            "Followers",
            "Default",
            "First Category",
            Decimal("1.2"),
            10,
            20,
            refill=False,
            cancel=True,
            dripfeed=True,
        ),
        UpstreamService(
            3,
            "Views",
            "Default",
            "",
            Decimal("0.01"),
            100,
            1000000,
            refill=False,
            cancel=False,
            dripfeed=False,
        ),
    ]
    upstream.answer("services", {"1": SERVICE})  # keyed by ID
    assert [service.service for service in await upstream_client.services()] == [1]


@pytest.mark.parametrize(
    "catalogue",
    [[], {}, [{"service": "x"}, "Followers"], b'[{"service": 1, "name": ', b"<html></html>", 5],
    ids=["empty list", "empty object", "nothing valid", "truncated", "HTML", "a number"],
)
async def test_broken_catalogue(
    catalogue: object, client: tuple[FakeUpstream, UpstreamClient]
) -> None:
    upstream, upstream_client = client
    upstream.answer("services", catalogue)
    with pytest.raises(OutcomeUnknown):
        await upstream_client.services()


async def test_services_error_answer_is_refused(
    client: tuple[FakeUpstream, UpstreamClient],
) -> None:
    upstream, upstream_client = client
    upstream.answer("services", {"error": "Not enough funds on balance"})
    with pytest.raises(UpstreamNoFunds) as caught:
        await upstream_client.services()
    assert caught.value.outcome is Outcome.NO_FUNDS
    assert isinstance(caught.value, UpstreamRefused)


# --- on_call records ------------------------------------------------------------------------------


async def test_on_call_records_every_call(
    fake: tuple[FakeUpstream, Provider], session: aiohttp.ClientSession
) -> None:
    upstream, config = fake
    records: list[CallRecord] = []
    upstream_client = UpstreamClient(config, session, on_call=records.append)
    assert upstream_client.name == "alpha"
    upstream.answer("add", {"order": 5})
    upstream.answer("balance", {"error": "Not enough funds on balance"})
    upstream.answer("status", b"<html>", ctype="text/html")
    before = time.time()
    result = await upstream_client.add(ORDER)
    with pytest.raises(UpstreamNoFunds):
        await upstream_client.balance()
    assert await upstream_client.status([1]) == {1: None}  # unreadable: recorded per order
    assert [(r.provider, r.action, r.outcome) for r in records] == [
        ("alpha", "add", Outcome.ACCEPTED),
        ("alpha", "balance", Outcome.NO_FUNDS),
        ("alpha", "status", Outcome.AMBIGUOUS),
    ]
    assert before <= records[0].started_at <= records[1].started_at <= time.time()
    assert all(0 <= r.latency < 5 for r in records)
    assert records[0].latency == pytest.approx(result.latency, abs=0.01)


async def test_on_call_records_network_failures(session: aiohttp.ClientSession) -> None:
    records: list[CallRecord] = []
    config = provider(f"http://127.0.0.1:{free_port()}/api/v2")
    upstream_client = UpstreamClient(config, session, on_call=records.append)
    await upstream_client.add(ORDER)
    with pytest.raises(UpstreamUnreachable):
        await upstream_client.cancel([1])
    assert [(r.action, r.outcome) for r in records] == [
        ("add", Outcome.UNREACHABLE),
        ("cancel", Outcome.UNREACHABLE),
    ]


async def test_a_failing_hook_does_not_lose_the_order(
    fake: tuple[FakeUpstream, Provider], session: aiohttp.ClientSession
) -> None:
    upstream, config = fake

    def broken(record: CallRecord) -> None:
        raise RuntimeError("metrics down")

    upstream.answer("add", {"order": 5})
    result = await UpstreamClient(config, session, on_call=broken).add(ORDER)
    assert result == AddResult(Outcome.ACCEPTED, 5, None, result.latency)


# --- The key never leaks --------------------------------------------------------------------------


async def test_the_key_never_shows_in_errors(client: tuple[FakeUpstream, UpstreamClient]) -> None:
    upstream, upstream_client = client
    echo = {"error": f"Invalid API key {KEY}"}
    upstream.answer("add", echo)
    result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.REFUSED
    assert result.error == "Invalid API key **********"
    upstream.answer("add", f"<html>bad key {KEY}</html>".encode(), 502, "text/html")
    result = await upstream_client.add(ORDER)
    assert result.outcome is Outcome.AMBIGUOUS
    assert_no_key(result, result.error)
    errors: list[UpstreamError] = []
    for action in ("status", "refill", "refill_status", "cancel", "balance", "services"):
        upstream.answer(action, echo)
    upstream.answer("cancel", [{"order": 1, "cancel": {"error": f"key {KEY} not allowed"}}])
    assert await upstream_client.cancel([1]) == {1: "key ********** not allowed"}
    upstream.answer("cancel", echo)
    readings = await upstream_client.status_readings([1])  # the refusal, as each order's problem
    assert readings[1].problem == "whole answer: Invalid API key **********"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: upstream_client.refill(1),
        lambda: upstream_client.refill_status([1]),
        lambda: upstream_client.cancel([1]),
        upstream_client.balance,
        upstream_client.services,
    ]
    for call in calls:
        with pytest.raises(UpstreamRefused) as caught:
            await call()
        errors.append(caught.value)
    upstream.answer("balance", {"balance": f"{KEY}"})  # garbage that holds the key
    with pytest.raises(OutcomeUnknown) as garbage:
        await upstream_client.balance()
    errors.append(garbage.value)
    for error in errors:
        assert_no_key(error, error.message, error.args, error.__cause__, error.__context__)


async def test_a_short_key_is_redacted_only_where_it_stands_alone(
    fake: tuple[FakeUpstream, Provider], session: aiohttp.ClientSession
) -> None:
    """A key of a few characters is still cut out of what an answer echoes, and never out of
    the answer's own words and numbers: "k" is in "Package", "1234" in order 12345."""
    upstream, config = fake
    for key in ("k", "1234"):
        short = UpstreamClient(replace(config, key=Secret(key)), session)
        upstream.answer("add", {"order": 12345})
        assert (await short.add(ORDER)).upstream_order == 12345
        upstream.answer("services", [{**SERVICE, "name": "Package 1234 k", "type": "Package"}])
        [listed] = await short.services()
        assert listed.type == "Package"
        assert listed.name == "Package ********** k" if key == "1234" else "Package 1234 **********"
        upstream.answer("add", {"error": f"Invalid API key {key}"})
        assert (await short.add(ORDER)).error == "Invalid API key **********"
        upstream.answer("add", f"<b>Fatal</b> (action=add, key={key})".encode(), 500, "text/html")
        result = await short.add(ORDER)
        assert result.outcome is Outcome.AMBIGUOUS and result.error is not None
        assert f"key={key})" not in result.error and "key=**********)" in result.error


@contextmanager
def no_key_in_logs() -> Iterator[None]:
    import structlog.testing

    with structlog.testing.capture_logs() as logs:
        yield
    assert_no_key(logs)


async def test_the_key_never_shows_in_network_errors(session: aiohttp.ClientSession) -> None:
    with no_key_in_logs():
        async with raw_server(reset_after_request) as port:
            upstream_client = UpstreamClient(provider(f"http://127.0.0.1:{port}/api/v2"), session)
            result = await upstream_client.add(ORDER)
            with pytest.raises(OutcomeUnknown) as caught:
                await upstream_client.refill(1)
    assert result.outcome is Outcome.AMBIGUOUS
    assert_no_key(result.error, caught.value, caught.value.message)


@pytest.mark.parametrize(
    "form",
    [
        {"service": "7", "link": "https://x.example/p?a=1&b=2#c", "quantity": "100"},
        {"key": "k+y/=&?%", "action": "add", "comments": "one\ntwo\r\nthree é ~*'()"},
        {"orders": "1,2,3", "x y": "", "": "=", "runs": "10"},
        {"link": "https://x.example/" + "é%+&" * QUOTED_KEPT_CHARS},  # past what is kept
    ],
)
def test_a_form_body_is_what_urlencode_writes(form: dict[str, str]) -> None:
    """Twice each: the second time from the kept quotes."""
    for _ in range(2):
        assert form_body(form) == urlencode(form).encode()
