"""`smm-router demo` as `make demo` runs it: a real process, its printed key, a real order."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.conftest import free_block, free_port

REPO = Path(__file__).resolve().parents[1]
READY_WITHIN = 30.0


def _demo_config(tmp_path: Path) -> Path:
    """config/router.yaml on free ports, with its database in tmp_path."""
    text = (REPO / "config" / "router.yaml").read_text()
    for port in ("8080", "9464", "9101", "9102", "9103"):
        text = text.replace(f":{port}", f":{free_port()}").replace(
            f"port: {port}", f"port: {free_port()}"
        )
    text = text.replace("../var/router.db", str(tmp_path / "demo.db"))
    path = tmp_path / "router.yaml"
    path.write_text(text)
    return path


async def _read_until_curl(stdout: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    while not any("action=add" in line for line in lines):
        line = await stdout.readline()
        assert line, "demo exited before printing its curl line:\n" + "".join(lines)
        lines.append(line.decode())
    return lines


@dataclass
class Demo:
    """A running `smm-router demo` process and what it printed up to its curl line."""

    process: asyncio.subprocess.Process
    lines: list[str]

    @property
    def curl(self) -> str:
        """The printed `curl` line that places an order."""
        return next(line for line in self.lines if "action=add" in line)


@asynccontextmanager
async def running_demo(config: Path, *args: str) -> AsyncIterator[Demo]:
    """`python -m router demo --config CONFIG ARGS` until its curl line; Ctrl-C at the end (it
    must then exit 0, as `make demo` does)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "demo",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        lines = await asyncio.wait_for(_read_until_curl(process.stdout), READY_WITHIN)
        yield Demo(process, lines)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
    assert process.returncode == 0


async def test_demo_places_an_order_through_a_failover(tmp_path: Path) -> None:
    async with running_demo(_demo_config(tmp_path)) as demo:
        curl = demo.curl
        found = re.search(r"curl -s (\S+) -d key=(\S+) ", curl)
        assert found, curl
        api, key = found.groups()
        params = dict(re.findall(r"-d (\w+)=(\S+)", curl))
        async with aiohttp.ClientSession() as session:
            async with session.post(api, data=params) as response:
                placed = await response.json()
            assert placed == {"order": 1}
            async with session.post(api, data={"key": key, "action": "status", "order": "1"}) as r:
                status = await r.json()
            assert status["status"] == "Pending" and status["currency"] == "USD"
            async with session.post(api, data={"key": key, "action": "balance"}) as r:
                balance = await r.json()
            # 100 to start, minus service 1 at 0.90 per 1000 for its minimum of 50.
            assert balance == {"balance": "99.955", "currency": "USD"}


async def test_demo_port_moves_every_port_and_says_which(tmp_path: Path) -> None:
    base = free_block(5)  # the API, metrics, the three simulated providers
    async with running_demo(_demo_config(tmp_path), "--port", str(base)) as demo:
        printed = "".join(demo.lines)
        for name, port in (("alpha", base + 2), ("beta", base + 3), ("gamma", base + 4)):
            assert f"provider {name}: simulated at http://127.0.0.1:{port}/api/v2" in printed
        assert f"router API: http://127.0.0.1:{base}/api/v2" in printed
        assert f"metrics:    http://127.0.0.1:{base + 1}/metrics" in printed
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{base}/healthz") as response:
                assert (await response.json())["status"] == "ok"
            async with session.get(f"http://127.0.0.1:{base + 1}/metrics") as response:
                assert "smm_router_build_info" in await response.text()
            # The router reaches the simulators on their moved ports: an order is placed.
            found = re.search(r"-d key=(\S+) ", printed)
            assert found, printed
            params = {"key": found[1], "action": "add", "service": "1", "link": "x"}
            async with session.post(
                f"http://127.0.0.1:{base}/api/v2", data={**params, "quantity": "50"}
            ) as response:
                assert await response.json() == {"order": 1}
