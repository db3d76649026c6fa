"""A newcomer's first mistakes, as the real command prints them: a port that is taken, a
database that cannot be created, a config file that does not exist. Each is one line on stderr
naming the problem, the setting and the fix, exit 1, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from router.cli import main
from tests.conftest import free_block, free_port

TIMEOUT = 60  # seconds; each of these commands should fail at once
# The commands that open the database, with the arguments each needs to get that far.
DATABASE_COMMANDS = [
    ["serve"],
    ["demo"],
    ["providers"],
    ["clients", "add", "acme"],
    ["clients", "list"],
    ["clients", "topup", "acme", "1"],
    ["clients", "disable", "acme"],
    ["clients", "rotate-key", "acme"],
    ["orders", "held"],
    ["orders", "show", "1"],
    ["orders", "resolve", "1", "--refund"],
    ["orders", "refund", "1", "1"],
]

CONFIG = """\
listen: {{host: 127.0.0.1, port: {api}}}
metrics: {{host: 127.0.0.1, port: {metrics}}}
database: {database}
currency: USD
providers:
  alpha: {{url: "http://127.0.0.1:{alpha}/api/v2", key: sim-alpha-key, timeout: 2}}
  beta: {{url: "http://127.0.0.1:{beta}/api/v2", key: sim-beta-key, timeout: 2}}
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


def write_config(tmp_path: Path, *, database: str = "router.db", **ports: int) -> Path:
    """A config on free loopback ports (or the given ones), its database in tmp_path."""
    for name in ("api", "metrics", "alpha", "beta"):
        ports.setdefault(name, free_port())
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(database=database, **ports))
    return path


def _environ(env: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "SMM_ROUTER_CONFIG"}, **env}


def run(*argv: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m router ARGV` as a shell would run it; a command that should fail at once
    and serves instead is killed by the timeout (and fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", "router", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=_environ(env),
        check=False,
    )


def assert_fails_with(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert "Traceback" not in done.stderr
    assert done.stderr == f"smm-router: {message}\n"
    assert done.returncode == 1


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys for main() run in this process; some commands (orders resolve) set up logging on
    the stderr capsys installed, which later tests must not write to."""
    yield capsys
    structlog.reset_defaults()


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- a port that is taken ----------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["listen", "metrics"])
def test_serve_on_a_taken_port(tmp_path: Path, taken: int, setting: str) -> None:
    config = write_config(tmp_path, **{"api" if setting == "listen" else "metrics": taken})
    done = run("serve", "--config", str(config))
    assert_fails_with(
        done,
        f"cannot listen on 127.0.0.1:{taken} ({setting}.port): address already in use; "
        f"stop what uses it or set {setting}.port in {config}",
    )
    # The ports are taken before anything else: the failed start changed nothing.
    assert not (tmp_path / "router.db").exists()


def test_demo_on_a_taken_port(tmp_path: Path, taken: int) -> None:
    config = write_config(tmp_path, api=taken)
    assert_fails_with(
        run("demo", "--config", str(config)),
        f"cannot listen on 127.0.0.1:{taken} (listen.port): address already in use; "
        f"stop what uses it or set listen.port in {config}, "
        "or pass --port N to move all the demo's ports",
    )


def test_demo_with_a_simulated_provider_on_a_taken_port(tmp_path: Path, taken: int) -> None:
    config = write_config(tmp_path, beta=taken)
    assert_fails_with(
        run("demo", "--config", str(config)),
        f"cannot listen on 127.0.0.1:{taken} (providers.beta.url): address already in use; "
        f"stop what uses it or set providers.beta.url in {config}, "
        "or pass --port N to move all the demo's ports",
    )


@pytest.mark.parametrize("offset", [0, 1, 3])  # the API, metrics, the second provider
def test_demo_port_names_the_port_it_derived(tmp_path: Path, offset: int) -> None:
    config = write_config(tmp_path)
    base = free_block(4)  # the API, metrics, alpha, beta
    shown = f"--port {base}" + (f" + {offset}" if offset else "")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + offset))
        taken.listen()
        done = run("demo", "--config", str(config), "--port", str(base))
    assert_fails_with(
        done,
        f"cannot listen on 127.0.0.1:{base + offset} ({shown}): address already in use; "
        "stop what uses it or pass another --port",
    )


def test_demo_port_past_the_last_port(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert_fails_with(
        run("demo", "--config", str(config), "--port", "65533"),
        "--port 65533: the demo needs ports 65533 to 65536; pass a --port of at most 65532",
    )


def test_sim_on_a_taken_port(taken: int) -> None:
    assert_fails_with(
        run("sim", "--port", str(taken)),
        f"cannot listen on 127.0.0.1:{taken} (--port): address already in use; "
        "stop what uses it or pass another --port",
    )


# --- a database that cannot be created ---------------------------------------------------------


def _under_a_file(tmp_path: Path) -> tuple[Path, str]:
    """A config whose database lies under a regular file, and what every command says of it.

    Under a regular file no folder can be made, whoever runs the test: a folder without write
    permission would not do, since root (as CI runs) ignores permission bits.
    """
    (tmp_path / "plain-file").write_text("not a folder\n")
    config = write_config(tmp_path, database="plain-file/var/router.db")
    database = tmp_path / "plain-file" / "var" / "router.db"
    return config, (
        f"cannot open the database {database} (database): {tmp_path / 'plain-file'} is a file, "
        f"not a folder; set database in {config}"
    )


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["clients", "list"]], ids=" ".join)
def test_database_under_a_file(tmp_path: Path, command: list[str]) -> None:
    config, message = _under_a_file(tmp_path)
    assert_fails_with(run(*command, "--config", str(config)), message)


def test_every_database_command_says_the_same(
    tmp_path: Path, in_process: pytest.CaptureFixture[str]
) -> None:
    # In-process (the same main() the subprocesses above run), to keep the suite fast: an
    # exception main() does not turn into its one line fails the test.
    config, message = _under_a_file(tmp_path)
    for command in DATABASE_COMMANDS[2:]:  # serve and demo would configure logging here
        assert main([*command, "--config", str(config)]) == 1, command
        assert in_process.readouterr().err == f"smm-router: {message}\n", command


def test_database_that_is_not_sqlite(tmp_path: Path) -> None:
    (tmp_path / "router.db").write_text("these are someone's notes, not a database\n" * 100)
    config = write_config(tmp_path)
    database = tmp_path / "router.db"
    assert_fails_with(
        run("clients", "list", "--config", str(config)),
        f"cannot open the database {database} (database): {database} is not an SQLite "
        f"database; move {database} away or set database in {config}",
    )
    assert "someone's notes" in database.read_text()


# --- a config file that does not exist ---------------------------------------------------------


@pytest.mark.parametrize("command", [["check"], ["serve"], ["demo"], ["providers"]], ids=" ".join)
def test_config_given_and_missing(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "routre.yaml"
    assert_fails_with(
        run(*command, "--config", str(missing)),
        f"cannot read the config file {missing} (--config): no such file or directory; "
        "pass --config the path of your config file",
    )


def test_every_config_command_says_the_same(
    tmp_path: Path, in_process: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "routre.yaml"
    for command in [["check", "--online"], *DATABASE_COMMANDS[2:]]:
        assert main([*command, "--config", str(missing)]) == 1, command
        assert in_process.readouterr().err == (
            f"smm-router: cannot read the config file {missing} (--config): no such file or "
            "directory; pass --config the path of your config file\n"
        ), command


def test_config_from_the_environment_missing(tmp_path: Path) -> None:
    missing = tmp_path / "gone.yaml"
    assert_fails_with(
        run("serve", SMM_ROUTER_CONFIG=str(missing)),
        f"cannot read the config file {missing} ($SMM_ROUTER_CONFIG): no such file or "
        "directory; set SMM_ROUTER_CONFIG to the path of your config file",
    )


def test_default_config_missing_outside_the_repository(tmp_path: Path) -> None:
    assert_fails_with(
        run("demo", cwd=tmp_path),
        "cannot read the config file config/router.yaml (the default, with no --config and "
        "no $SMM_ROUTER_CONFIG): no such file or directory; run smm-router from the folder "
        "that holds config/router.yaml, pass --config PATH or set SMM_ROUTER_CONFIG",
    )
