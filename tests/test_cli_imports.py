"""The CLI starts fast: a report command imports only what it reads with, never the server's
HTTP stack or its metrics (aiohttp and prometheus_client are most of a cold start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router import config as config_module
from router.cli import build_parser

# The server's packages: none of them has any business in a command that reads the database.
SERVER_ONLY = ("aiohttp", "prometheus_client", "router.api", "router.app", "router.upstream")

CONFIG = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: {database}
currency: USD
providers:
  alpha: {{url: "http://127.0.0.1:9/api/v2", key: sim-key}}
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

# Runs one command in a fresh interpreter, then names the server-only modules it loaded.
CHILD = """\
import contextlib, io, json, sys
from router.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as exit:  # --help, --version
        code = exit.code
loaded = sorted(
    name for name in sys.modules
    if any(name == root or name.startswith(root + ".") for root in json.loads(sys.argv[2]))
)
print(json.dumps({"code": code, "out": out.getvalue(), "loaded": loaded}))
"""


def run_alone(*argv: str) -> dict[str, Any]:
    """`smm-router ARGV` in a new interpreter: its exit code, its output, what it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(argv), json.dumps(SERVER_ONLY)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(database=tmp_path / "router.db"))
    added = subprocess.run(
        [sys.executable, "-m", "router", "clients", "add", "acme", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    return path


def test_help_and_version_load_no_server_module() -> None:
    for argv in (["--help"], ["--version"], ["clients", "--help"], ["orders", "held", "--help"]):
        result = run_alone(*argv)
        assert result["code"] == 0 and "smm-router" in result["out"], argv
        assert result["loaded"] == [], argv


def test_report_commands_load_no_server_module(config_file: Path) -> None:
    c = ("--config", str(config_file))
    listed = run_alone("clients", "list", "--json", *c)
    assert listed["code"] == 0
    assert [row["name"] for row in json.loads(listed["out"])] == ["acme"]
    held = run_alone("orders", "held", "--json", *c)
    assert held["code"] == 0 and json.loads(held["out"]) == []
    added = run_alone("clients", "add", "other", "--json", *c)
    assert added["code"] == 0 and json.loads(added["out"])["name"] == "other"
    rotated = run_alone("clients", "rotate-key", "other", *c)
    assert rotated["code"] == 0
    checked = run_alone("check", *c)
    assert checked["code"] == 0 and checked["out"].startswith("ok: 1 providers")
    for argv in (("clients", "list"), ("orders", "held")):
        table = run_alone(*argv, *c)
        assert table["code"] == 0 and table["out"], argv
        assert table["loaded"] == [], argv
    for result in (listed, held, added, rotated, checked):
        assert result["loaded"] == [], result


def test_options_added_when_their_command_is_chosen() -> None:
    """`probe` and `sim` add their options only when chosen: they still parse as before."""
    probe = build_parser().parse_args(["probe", "http://127.0.0.1:9/api/v2", "--key", "k"])
    assert probe.timeout == config_module.DEFAULT_UPSTREAM_TIMEOUT and probe.key == "k"
    sim = build_parser().parse_args(["sim", "--port", "0", "--fault", "101=flaky"])
    assert sim.port == 0 and sim.faults and sim.host == "127.0.0.1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["probe", "http://127.0.0.1:9/api/v2"])  # --key is required
