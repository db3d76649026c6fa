"""The demo's story of the breaker, as the README tells it: five orders on service 1 open the
flaky provider's breaker, and `smm-router routes 1` shows it."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest

from router.cli import main
from tests.test_demo import _demo_config, running_demo


async def routes(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """`smm-router routes 1 --json` on the demo's config, in-process (in a thread)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["routes", "1", "--json", "--config", str(config)])
    assert code == 0
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return document


def states(document: dict[str, object]) -> list[tuple[str, str]]:
    rows = document["routes"]
    assert isinstance(rows, list)
    return [(row["provider"], row["state"]) for row in rows]


async def test_five_orders_open_the_flaky_providers_breaker_and_routes_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _demo_config(tmp_path)
    async with running_demo(config) as demo:
        curl = demo.curl
        found = re.search(r"curl -s (\S+) ", curl)
        assert found, curl
        params = dict(re.findall(r"-d (\w+)=(\S+)", curl))
        assert states(await routes(config, capsys)) == [("gamma", "healthy"), ("alpha", "healthy")]
        answers = []
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.post(found[1], data=params) as response:
                    answers.append(await response.json())
        assert [answer["order"] for answer in answers] == [1, 2, 3, 4, 5]  # held ones too
        assert states(await routes(config, capsys)) == [("alpha", "healthy"), ("gamma", "open")]
