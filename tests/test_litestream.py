"""Litestream round trip: the real router placing orders while Litestream replicates its
database, both killed, the replica restored to a new path: the ledger is the original's exactly.

Needs the `litestream` binary: on PATH, or at $LITESTREAM (`.ci/run` installs the npm package
@flydotio/litestream-linux-x64 into .ci/tools/ and sets it)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import SIM_KEY, SimFactory, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "deploy" / "litestream.yml"
START_LIMIT = 30.0  # seconds for a process to come up on a slow, shared CI machine
CATCH_UP_LIMIT = 30.0  # seconds for the replica to hold the last write (sync-interval is 1 s)
COMMAND_LIMIT = 60.0  # seconds for one CLI or litestream command
ORDERS = 24
TOPUP_EVERY = 8  # a top-up through the CLI between every this many orders

ROUTER_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
metrics: {{host: 127.0.0.1, port: {metrics_port}}}
database: router.db
currency: USD
providers:
  alpha: {{url: "{url}", key: "{key}", timeout: 5}}
sync: {{status_interval: 0.2, balance_interval: 0.5, catalogue_interval: 5}}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "1.23"
    min: 10
    max: 10000
    route:
      - {{provider: alpha, service: 101}}
"""


def _litestream() -> str:
    binary = os.environ.get("LITESTREAM") or shutil.which("litestream")
    if not binary or not os.access(binary, os.X_OK):
        pytest.skip(
            "litestream not found: put it on PATH or set LITESTREAM to the binary "
            "(npm install @flydotio/litestream-linux-x64; .ci/run does it)"
        )
    return binary


def _litestream_config(folder: Path, database: Path, replica: Path) -> Path:
    """deploy/litestream.yml with the database and the file replica moved into `folder`."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    (db,) = config["dbs"]
    (file_replica,) = db["replicas"]  # the S3 example is commented out
    assert file_replica["type"] == "file"
    assert db["path"] == "/var/lib/smm-router/router.db"
    db["path"] = str(database)
    file_replica["path"] = str(replica)
    path = folder / "litestream.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO
    )
    output, _ = await asyncio.wait_for(process.communicate(), COMMAND_LIMIT)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def _cli(config: Path, *argv: str) -> str:
    code, output = await _run(sys.executable, "-m", "router", *argv, "--config", str(config))
    assert code == 0, f"smm-router {' '.join(argv)}: {output}"
    return output


@asynccontextmanager
async def _process(log: Path, *argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process writing to `log`; SIGKILLed at the end if it still runs."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=output, stderr=output, cwd=REPO
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def _kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    assert await process.wait() == -signal.SIGKILL


async def _wait_healthy(http: aiohttp.ClientSession, base: str, router: Any, log: Path) -> None:
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        assert router.returncode is None, f"the router exited: {log.read_text()}"
        try:
            async with http.get(f"{base}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router never answered /healthz: {log.read_text()}")


def _money_state(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every reseller, ledger row and order, in full, as the database file holds them."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            for table in ("resellers", "ledger", "orders")
        }
    finally:
        db.close()


def _has_refund(path: Path) -> bool:
    db = sqlite3.connect(path)
    try:
        return (
            db.execute("SELECT 1 FROM ledger WHERE kind = 'refund' LIMIT 1").fetchone() is not None
        )
    finally:
        db.close()


def _last_ledger_id(path: Path) -> int | None:
    db = sqlite3.connect(path)
    try:
        (last,) = db.execute("SELECT max(id) FROM ledger").fetchone()
        return int(last) if last is not None else None
    except sqlite3.DatabaseError:
        return None  # not a restored database yet
    finally:
        db.close()


async def _wait_for_replica(litestream: str, config: Path, database: Path, folder: Path) -> None:
    """Until a restore of the replica holds the database's last ledger row. WAL frames are
    replicated in order: with the last row there, everything before it is there too."""
    wanted = _last_ledger_id(database)
    assert wanted is not None
    deadline = time.monotonic() + CATCH_UP_LIMIT
    attempt = 0
    while True:
        attempt += 1
        probe = folder / f"probe-{attempt}.db"
        code, output = await _run(
            litestream, "restore", "-config", str(config), "-o", str(probe), str(database)
        )
        if code == 0 and _last_ledger_id(probe) == wanted:
            return
        assert time.monotonic() < deadline, f"the replica never caught up: {output}"
        await asyncio.sleep(0.2)


async def test_a_restored_replica_holds_the_ledger_exactly(
    start_sim: SimFactory, tmp_path: Path
) -> None:
    litestream = _litestream()
    # Orders complete quickly and every 3rd ends Partial: the status sync writes refunds too.
    alpha = await start_sim(progress_seconds=0.3, partial_every=3)
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        ROUTER_CONFIG.format(port=port, metrics_port=free_port(), url=alpha.url, key=SIM_KEY)
    )
    database = tmp_path / "router.db"
    replica = tmp_path / "replica"
    stream_config = _litestream_config(tmp_path, database, replica)
    base = f"http://127.0.0.1:{port}"
    serve = (sys.executable, "-m", "router", "serve", "--config", str(config))
    replicate = (litestream, "replicate", "-config", str(stream_config))

    async with (
        aiohttp.ClientSession() as http,
        _process(tmp_path / "router.log", *serve) as router,
    ):
        await _wait_healthy(http, base, router, tmp_path / "router.log")  # the database exists
        async with _process(tmp_path / "litestream.log", *replicate) as replicating:
            added = json.loads(await _cli(config, "clients", "add", "acme", "--json"))
            key = added["key"]
            await _cli(config, "clients", "topup", "acme", "100")
            for number in range(1, ORDERS + 1):
                add = {"key": key, "action": "add", "service": "1", "link": f"x/{number}",
                       "quantity": str(100 + number)}  # fmt: skip
                async with http.post(f"{base}/api/v2", data=add) as response:
                    assert "order" in await response.json()
                if number % TOPUP_EVERY == 0:
                    await _cli(config, "clients", "topup", "acme", f"0.{number:02d}")
            assert alpha.received_actions("add")
            await wait_for(lambda: _has_refund(database), "the status sync to refund a Partial")

            await _kill(router)  # the writer dies wherever it was, mid-sync or not
            # One last write, from the CLI: once the replica has it, it has all before it.
            await _cli(config, "clients", "topup", "acme", "7.77", "--note", "last write")
            await _wait_for_replica(litestream, stream_config, database, tmp_path)
            assert replicating.returncode is None, (tmp_path / "litestream.log").read_text()
            await _kill(replicating)

    restored = tmp_path / "restored" / "router.db"
    restored.parent.mkdir()
    code, output = await _run(
        litestream, "restore", "-config", str(stream_config), "-o", str(restored), str(database)
    )
    assert code == 0, output

    original = _money_state(database)
    assert _money_state(restored) == original
    # The run did what the test is about: charges, sync refunds, top-ups, for one reseller.
    kinds = {row[3] for row in original["ledger"]}
    assert {"topup", "charge", "refund"} <= kinds, kinds
    assert len(original["orders"]) == ORDERS
    ((_, _, _, _, balance, *_),) = original["resellers"]  # id, name, key_hash, enabled, balance
    assert balance == sum(row[4] for row in original["ledger"])
