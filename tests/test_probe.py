"""`smm-router probe`: a v2 conformance check of any server, with read-only or refused calls."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from router import probe
from tests.conftest import SIM_KEY, SimFactory, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "probe-secret-key-0123456789"


async def run(*argv: str) -> tuple[int, str, str]:
    """`smm-router ARGV` in a child process, as an operator runs it."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


Answer = Callable[[dict[str, str]], web.StreamResponse]


@asynccontextmanager
async def fake(answers: dict[str, Answer]) -> AsyncIterator[str]:
    """A v2 server on loopback that answers each action as `answers` says; its URL."""

    async def handle(request: web.Request) -> web.StreamResponse:
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        return answers[params.get("action", "")](params)

    app = web.Application()
    app.router.add_post("/api/v2", handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/api/v2"))


def json_answer(
    payload: Any, *, status: int = 200, content_type: str = "application/json"
) -> Answer:
    return lambda _: web.Response(
        body=json.dumps(payload).encode(), status=status, content_type=content_type
    )


def page(title: str, *, status: int = 200) -> Answer:
    html = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return lambda _: web.Response(text=html, status=status, content_type="text/html")


GOOD_SERVICE = {
    "service": 1,
    "name": "Followers",
    "type": "Default",
    "category": "Instagram",
    "rate": "0.90",
    "min": "50",
    "max": "10000",
    "refill": True,
    "cancel": True,
    "dripfeed": False,
}
GOOD: dict[str, Answer] = {
    "services": json_answer([GOOD_SERVICE]),
    "balance": json_answer({"balance": "100.84292", "currency": "USD"}),
    "status": json_answer({"error": "Incorrect order ID"}),
    "add": json_answer({"error": "Incorrect service ID"}),
}


async def test_probe_json_of_the_simulator_says_ok(tmp_path: Path) -> None:
    port = free_port()
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "sim", "--port", str(port), "--key", KEY,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        assert sim.stdout is not None
        line = await asyncio.wait_for(sim.stdout.readline(), 60)
        assert b"sim provider listening" in line
        url = f"http://127.0.0.1:{port}/api/v2"
        code, out, err = await run("probe", url, "--key", KEY, "--json")
    finally:
        sim.kill()
        await sim.wait()
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document == {
        "url": url,
        "ok": True,
        "checks": [
            {"name": "services", "ok": True, "detail": "16 services, each as V2.md types it"},
            {"name": "balance", "ok": True, "detail": "balance 1000.00 USD"},
            {
                "name": "status",
                "ok": True,
                "detail": "order 2147483647 refused: 'Incorrect order ID'",
            },
            {"name": "add", "ok": True, "detail": "refused: 'Incorrect service ID'"},
        ],
    }
    assert KEY not in out


async def test_probe_only_reads_or_asks_what_is_refused(start_sim: SimFactory) -> None:
    sim = await start_sim()
    report = await probe.probe(sim.url, SIM_KEY)
    assert report.ok, report.lines()
    assert [r.action for r in sim.received] == ["services", "balance", "status", "add"]
    assert sim.received[-1].params == {"action": "add", **probe.REFUSED_ADD}
    assert not sim.orders and sim.balance == 1000


async def test_probe_finds_every_deviation_of_a_deviating_fake() -> None:
    entry = {
        **GOOD_SERVICE,
        "service": "1",  # a string ID: clients comparing with == to an int break
        "type": "Followers",
        "rate": 0.9,
        "max": 10000,
        "refill": "1",
    }
    del entry["dripfeed"]
    answers: dict[str, Answer] = {
        "services": json_answer([entry, {**entry, "service": "2"}]),
        # JSON labelled text/html is tolerated; its number and lower-case currency are not.
        "balance": json_answer({"balance": 12.5, "currency": "usd"}, content_type="text/html"),
        "status": page("Maintenance"),
        "add": page("502 Bad Gateway", status=502),
    }
    async with fake(answers) as url:
        code, out, err = await run("probe", url, "--key", KEY)
        json_code, json_out, _ = await run("probe", url, "--key", KEY, "--json")
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        'services: `service` is a string in 2 of 2 entries (e.g. "1"); V2.md: an int',
        'services: `type` is none of V2.md\'s types in 2 of 2 entries (e.g. "Followers")',
        "services: `rate` is a number with a fraction in 2 of 2 entries (e.g. 0.9); "
        "V2.md: a string",
        "services: `max` is an integer in 2 of 2 entries (e.g. 10000); V2.md: a string",
        'services: `refill` is a string in 2 of 2 entries (e.g. "1"); V2.md: true or false',
        "services: no `dripfeed` in 2 of 2 entries",
        'balance: `balance` is a number with a fraction: V2.md: a string such as "100.84292"',
        "balance: `currency` is not a currency code of 3 capital letters: 'usd'",
        "status: an HTML page, not JSON: 'Maintenance'",
        "add: HTTP 502: V2.md answers every action with HTTP 200, errors too",
        "add: an HTML page, not JSON: '502 Bad Gateway'",
        f"11 deviations from V2.md at {url}",
    ]
    document = json.loads(json_out)
    assert json_code == 1 and document["ok"] is False
    assert [(c["name"], c["ok"]) for c in document["checks"]] == [
        ("services", False),
        ("balance", False),
        ("status", False),
        ("add", False),
    ]
    assert document["checks"][1]["detail"].endswith(
        "'usd' (JSON labelled text/html: tolerated, but V2.md serves application/json)"
    )


async def test_probe_reports_an_accepted_add_and_never_shows_the_key() -> None:
    def echo(params: dict[str, str]) -> web.Response:  # a PHP error page quoting the request
        return web.Response(
            text=f'<b>Notice</b>: key={KEY} {{"balance": "1"}}', content_type="text/html"
        )

    answers = {
        **GOOD,
        "services": json_answer({"1": GOOD_SERVICE}),  # keyed by ID, not a list
        "balance": echo,
        "status": json_answer({"status": "fail", "error": "Incorrect order ID"}),
        "add": json_answer({"order": 77}),
    }
    async with fake(answers) as url:
        report = await probe.probe(url, KEY)
    assert report.lines() == [
        "services: an object, not an array: V2.md answers `services` with a JSON array",
        "balance: text around the JSON (a PHP notice?): "
        '\'<b>Notice</b>: key=********** {"balance": "1"}\'',
        "balance: no `currency`",
        "status: keys besides `error`: status",
        "add: it ACCEPTED an order for service 0, quantity 0, without a link: upstream order 77; "
        "cancel it at the panel",
    ]
    assert KEY not in json.dumps(report.document())


async def test_probe_of_a_conforming_server_and_of_a_key_it_refuses() -> None:
    tolerated = {
        **GOOD,
        "balance": json_answer({"balance": "5", "currency": "EUR"}, content_type="text/plain"),
    }
    async with fake(tolerated) as url:
        report = await probe.probe(url, KEY)
    assert report.ok and report.lines() == []
    assert report.checks[1].detail == (
        "balance 5.00 EUR (JSON labelled text/plain: tolerated, but V2.md serves application/json)"
    )

    refused = json_answer({"error": "Invalid API key"})
    async with fake(dict.fromkeys(probe.CHECKS, refused)) as url:
        report = await probe.probe(url, "wrong")
    said = (
        "refused with the error `balance` got ('Invalid API key'): the key is refused, so this "
        "refusal says nothing"
    )
    assert report.lines() == [
        "services: refused: 'Invalid API key'",
        "balance: refused: 'Invalid API key'",
        f"status: {said}",
        f"add: {said}",
    ]


async def test_probe_of_nothing_listening() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v2"
    code, out, _ = await run("probe", url, "--key", KEY)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("services: unreachable: ")
    assert lines[1:] == [
        f"balance: not checked: {url} is unreachable",
        f"status: not checked: {url} is unreachable",
        f"add: not checked: {url} is unreachable",
        f"4 deviations from V2.md at {url}",
    ]
    code, _, err = await run("probe", "ftp://x.test/api", "--key", KEY)
    assert code == 1 and err == "smm-router: not an http:// or https:// URL: 'ftp://x.test/api'\n"
