"""The command line: resellers managed from a shell, seen at once by a running server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from router import config as config_module
from router.app import create_app
from router.cli import main
from router.sim import SimProvider
from router.store import NewOrder, Store

CONFIG = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: {database}
currency: USD
providers:
  alpha: {{url: "{url}", key: "${{ALPHA_KEY}}", timeout: 2}}
services:
  1:
    name: Followers
    category: Instagram
    type: Default
    rate: "1.00"
    min: 10
    max: 1000
    route:
      - {{provider: alpha, service: 101}}
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALPHA_KEY", "sim-secret")
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(database="router.db", url="http://127.0.0.1:9/api/v2"))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_clients_life(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ("--config", str(config_file))
    code, out, _ = run(capsys, "clients", "add", "acme", "--balance", "25.5", "--json", *c)
    assert code == 0
    created = json.loads(out)
    assert created["name"] == "acme" and created["balance"] == "25.50"
    assert len(created["key"]) >= 32

    code, out, _ = run(capsys, "clients", "topup", "acme", "4.50", "--json", *c)
    topped = json.loads(out)
    assert code == 0 and topped["enabled"] is True  # a JSON boolean, as `add` and `list` write
    assert topped == {"id": created["id"], "name": "acme", "enabled": True, "balance": "30.00"}
    code, out, _ = run(capsys, "clients", "list", "--json", *c)
    assert json.loads(out) == [
        {"id": created["id"], "name": "acme", "enabled": True, "balance": "30.00", "orders": 0}
    ]
    code, _, err = run(capsys, "clients", "topup", "acme", "-31", *c)
    assert code == 1 and "below zero" in err
    code, _, err = run(capsys, "clients", "topup", "acme", "0.000001", *c)
    assert code == 1 and "decimals" in err
    code, _, err = run(capsys, "clients", "add", "acme", *c)
    assert code == 1 and "taken" in err
    code, _, err = run(capsys, "clients", "disable", "nobody", *c)
    assert code == 1 and "no reseller" in err

    code, out, _ = run(capsys, "clients", "list", *c)
    assert "acme" in out and "30.00" in out and created["key"] not in out

    code, out, _ = run(capsys, "clients", "disable", "acme", "--json", *c)
    disabled = json.loads(out)
    assert code == 0 and disabled["enabled"] is False
    assert disabled == {
        "id": created["id"],
        "name": "acme",
        "enabled": False,
        "balance": "30.00",
    }


def test_check(config_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "check", "--config", str(config_file))
    assert code == 0 and "1 services" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        config_file.read_text().replace('"1.00"', "1.5").replace("alpha, service", "gamma, service")
    )
    code, _, err = run(capsys, "check", "--config", str(bad))
    assert code == 1
    assert "services.1.rate" in err
    assert "services.1.route[0].provider" in err
    # With --json: the one document on stdout, every problem in it, for scripts.
    code, out, err = run(capsys, "check", "--json", "--config", str(bad))
    assert code == 1 and err == ""
    document = json.loads(out)
    assert document["ok"] is False
    paths = {problem["path"] for problem in document["problems"]}
    assert {"services.1.rate", "services.1.route[0].provider"} <= paths
    assert {problem["kind"] for problem in document["problems"]} == {"config"}
    assert all(problem["message"] for problem in document["problems"])
    missing = tmp_path / "missing.yaml"
    code, out, err = run(capsys, "check", "--json", "--config", str(missing))
    assert code == 1 and err == ""
    assert json.loads(out) == {
        "ok": False,
        "problems": [
            {"path": str(missing), "kind": "unreadable", "message": "No such file or directory"}
        ],
    }


async def test_running_server_sees_cli_changes_at_once(
    config_file: Path,
    aiohttp_client: Any,
) -> None:
    sim = SimProvider(key="sim-secret")
    await sim.start()
    try:
        config_file.write_text(CONFIG.format(database="router.db", url=sim.url))
        config = config_module.load(config_file, env={"ALPHA_KEY": "sim-secret"})
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(config, background=False)
        )

        async def cli(*argv: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router",
                *argv,
                "--config",
                str(config_file),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"ALPHA_KEY": "sim-secret", "PATH": "/usr/bin:/bin"},
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return out.decode()

        async def call(key: str, **params: str) -> Any:
            response = await client.post("/api/v2", data={"key": key, **params})
            return await response.json()

        key = json.loads(await cli("clients", "add", "acme", "--balance", "1", "--json"))["key"]
        assert await call(key, action="balance") == {"balance": "1.00", "currency": "USD"}
        await cli("clients", "topup", "acme", "2")
        assert await call(key, action="balance") == {"balance": "3.00", "currency": "USD"}
        answer = await call(key, action="add", service="1", link="x", quantity="1000")
        assert "order" in answer

        new_key = json.loads(await cli("clients", "rotate-key", "acme", "--json"))["key"]
        assert await call(key, action="balance") == {"error": "Invalid API key"}
        assert await call(new_key, action="balance") == {"balance": "2.00", "currency": "USD"}
        listed = json.loads(await cli("clients", "list", "--json"))
        assert listed[0]["orders"] == 1

        await cli("clients", "disable", "acme")
        assert await call(new_key, action="balance") == {"error": "Invalid API key"}
    finally:
        await sim.stop()


def test_version_is_the_package_metadata() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "router", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"smm-router {version('smm-router')}\n"


async def test_check_and_start_up_name_open_orders_of_removed_providers(
    config_file: Path, capsys: pytest.CaptureFixture[str], aiohttp_client: Any
) -> None:
    """Orders at a provider gone from the config are synced by nothing: `check` fails naming
    each such provider with its open orders (placing, held, placed and not final), and the
    server says so at start-up. A removed provider whose orders all ended is no problem."""
    c = ("--config", str(config_file))

    async def check(*argv: str) -> tuple[int, str, str]:  # in a thread: it runs its own loop
        return await asyncio.to_thread(run, capsys, "check", *argv, *c)

    database = config_file.parent / "router.db"
    assert (await check())[0] == 0
    assert not database.exists()  # `check` never creates the database

    store = await Store.open(database)
    reseller = await store.create_reseller("acme", "hash", 100_000_000)

    def order(provider: str) -> NewOrder:
        return NewOrder(reseller.id, 1, "x", 1000, 100_000, {"quantity": "1000"}, provider, 7)

    await store.reserve_order(order("gamma"))
    assert await store.hold_interrupted_orders(stale_before=time.time() + 1) == 1  # held
    await store.reserve_order(order("gamma"))  # placing
    await store.create_placed_orders([(order("gamma"), n) for n in (1, 2, 3)])
    await store.create_placed_orders([(order("beta"), 1), (order("alpha"), 1)])

    def ended(db: sqlite3.Connection) -> None:  # ended upstream: nothing left to sync
        db.execute("UPDATE orders SET status = 'Completed' WHERE upstream_order = 3")
        db.execute("UPDATE orders SET status = 'Partial' WHERE provider = 'beta'")

    await store.write(ended)
    await store.close()
    schema = database.read_bytes()

    code, out, _ = await check()
    assert code == 1
    assert out.splitlines() == [
        "providers.gamma: removed, but 4 open orders are still at it "
        "(they no longer sync; put the provider back or resolve them)",
        f"1 problems: 1 providers, 1 services, database {database}",
    ]
    code, out, _ = await check("--json")
    assert code == 1
    assert json.loads(out) == {
        "ok": False,
        "problems": [
            {
                "path": "providers.gamma",
                "kind": "orphaned",
                "message": "removed, but 4 open orders are still at it "
                "(they no longer sync; put the provider back or resolve them)",
            }
        ],
    }
    assert database.read_bytes() == schema  # read, never changed

    config = config_module.load(config_file)
    with structlog.testing.capture_logs() as logs:
        await aiohttp_client(create_app(config, background=False))
    warnings = [e for e in logs if e["event"] == "orphaned_orders"]
    assert [(e["provider"], e["count"], e["log_level"]) for e in warnings] == [
        ("gamma", 4, "warning")
    ]


def test_check_of_a_database_older_than_its_indexes(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database no server of this version has migrated lacks the indexes the check reads
    by: `check` says so rather than scan its orders, and changes nothing."""
    database = config_file.parent / "router.db"

    async def create() -> None:
        await (await Store.open(database)).close()

    asyncio.run(create())
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("DROP INDEX orders_held")  # as before migration 0008
        db.commit()
    before = database.read_bytes()

    code, out, err = run(capsys, "check", "--config", str(config_file))

    assert code == 0 and out.startswith("ok: ")
    assert "is older than this version" in err
    assert database.read_bytes() == before
