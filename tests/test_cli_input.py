"""Bad operator input, through the real command line (`python -m router`): one line on stderr,
exit 1, no traceback, nothing changed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from router import v2
from router.cli import CommandError, parse_amount
from router.cli.common import plain_int

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose `router` is run

CONFIG = """\
listen: {{host: 127.0.0.1, port: 18080}}
metrics: {{host: 127.0.0.1, port: 19464}}
database: router.db
currency: USD
providers:
  alpha: {{url: "http://127.0.0.1:9/api/v2", key: "sim-secret", timeout: 2}}
services:
  12:
    name: Followers
    category: Instagram
    type: Default
    rate: "{rate}"
    min: {min}
    max: 1000
    route:
      - {{provider: alpha, service: 101}}
"""


def write_config(path: Path, *, rate: str = "1.00", min: int = 10) -> Path:
    path.write_text(CONFIG.format(rate=rate, min=min))
    return path


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`smm-router ARGV --config CONFIG` in a child process, as an operator runs it."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "router", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one-line error of a refused command (exit 1, no traceback, nothing on stdout)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smm-router: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("rate", "min", "message"),
    [
        ("0", 10, "services.12.rate: must be greater than 0: a rate of 0 gives every order away"),
        (
            "0.00009",
            100,  # 100 x 0.00009 / 1000 = 0.000009: below 0.00001
            "services.12.rate: an order of min 100 at rate 0.00009 costs 0.000009, less than "
            "0.00001 (the least amount charged): it would be free; raise rate or min",
        ),
    ],
)
def test_check_refuses_a_free_service(tmp_path: Path, rate: str, min: int, message: str) -> None:
    result = cli(write_config(tmp_path / "router.yaml", rate=rate, min=min), "check")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[1:] == [message]
    good = write_config(tmp_path / "good.yaml", rate="0.0001", min=100)  # exactly 0.00001
    assert cli(good, "check").returncode == 0


# Amounts that are not plain decimals, and the message each gets.
NOT_PLAIN = "not a plain decimal amount"
TOO_LARGE = "is too large: at most 12 digits before the point"
BAD_AMOUNTS = [
    ("1E+30", NOT_PLAIN),
    ("NaN", NOT_PLAIN),
    ("Infinity", NOT_PLAIN),
    ("-0", "write 0, not -0"),
    ("1e3", NOT_PLAIN),
    ("0x10", NOT_PLAIN),
    ("0.000001", "has more than 5 decimals"),
    ("9" * 5000, TOO_LARGE),
]
MORE_BAD_AMOUNTS = [
    ("sNaN", NOT_PLAIN),
    ("-Infinity", NOT_PLAIN),
    ("-0.00", "write 0, not -0"),
    ("+5", NOT_PLAIN),
    ("1,50", NOT_PLAIN),
    ("1_000", NOT_PLAIN),
    (".5", NOT_PLAIN),
    ("5.", NOT_PLAIN),
    ("\u0665", NOT_PLAIN),  # an Arabic-Indic 5
    ("\uff15", NOT_PLAIN),  # a fullwidth 5
    ("", NOT_PLAIN),
    ("5 0", NOT_PLAIN),
    ("1" + "0" * 12, TOO_LARGE),
]


@pytest.mark.parametrize(("text", "message"), BAD_AMOUNTS + MORE_BAD_AMOUNTS)
def test_parse_amount_takes_only_plain_decimals(text: str, message: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_amount(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_parse_amount_reads_plain_decimals() -> None:
    assert parse_amount("25") == 25 * v2.MINOR_PER_UNIT
    assert parse_amount(" -10.50 ") == -1_050_000
    assert parse_amount("007.12345") == 712_345
    assert parse_amount("0") == 0
    assert parse_amount("999999999999.99999") == 10**17 - 1


def refusals(config: Path, commands: list[list[str]]) -> list[str]:
    """Run each command (a few at a time: each is a Python start-up) and return the one-line
    error of each; every one must have been refused."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda argv: cli(config, *argv), commands))
    return [refused(result) for result in results]


def balances(config: Path) -> list[tuple[str, str]]:
    listed = json.loads(cli(config, "clients", "list", "--json").stdout)
    return [(reseller["name"], reseller["balance"]) for reseller in listed]


def test_bad_amounts_are_one_line_errors_and_change_nothing(tmp_path: Path) -> None:
    """Every command that reads an amount, run as an operator runs it."""
    config = write_config(tmp_path / "router.yaml")
    assert cli(config, "clients", "add", "acme", "--balance", "5").returncode == 0
    cases = [(["clients", "topup", "acme", text], message) for text, message in BAD_AMOUNTS]
    cases += [
        (["clients", "add", "other", "--balance", "1E+30"], NOT_PLAIN),
        (["clients", "add", "other", "--balance", "-0"], "write 0, not -0"),
        # The amount is read before the order is looked up: no order 1 is needed.
        (["orders", "refund", "1", "NaN"], NOT_PLAIN),
        (["orders", "refund", "1", "0.000001"], "has more than 5 decimals"),
    ]
    lines = refusals(config, [argv for argv, _ in cases])
    for line, (argv, message) in zip(lines, cases, strict=True):
        assert message in line, (argv, line)
        assert len(line) < 200, line  # a 5,000-digit amount is not echoed whole
    assert balances(config) == [("acme", "5.00")]  # no top-up, no reseller "other"


def test_amounts_that_look_like_options_are_amounts(tmp_path: Path) -> None:
    """argparse takes `-Infinity` or `-1e3` for an unknown option (usage, exit 2): here they are
    amounts, refused as any bad amount is; a plain negative amount still works."""
    config = write_config(tmp_path / "router.yaml")
    assert cli(config, "clients", "add", "acme", "--balance", "5").returncode == 0
    cases = [
        ["clients", "topup", "acme", text] for text in ("-Infinity", "-1e3", "-NaN", "-\u0665")
    ]
    cases += [
        ["clients", "add", "other", "--balance", "-Infinity"],
        ["orders", "refund", "1", "-1E+30"],
    ]
    for line in refusals(config, cases):
        assert line.startswith(f"smm-router: {NOT_PLAIN}: '-"), line
    assert balances(config) == [("acme", "5.00")]
    assert cli(config, "clients", "topup", "acme", "-1.50").returncode == 0
    assert balances(config) == [("acme", "3.50")]
    result = cli(config, "clients", "topup", "acme", "-note", "x")  # an option's typo stays one
    assert result.returncode == 2 and "unrecognized arguments: -note" in result.stderr


NOT_INTEGERS = ["1_000", " 7 ", "7 ", "+5", "-5", "\u0663", "\uff17", "7.0", "1e3", "0x7", ""]


@pytest.mark.parametrize("text", NOT_INTEGERS)
def test_plain_int_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        plain_int(v2.MAX_ID)(text)
    assert str(caught.value) == f"not a plain decimal integer from 0 to {v2.MAX_ID}: {text!r}"


def test_plain_int_reads_plain_digits_within_its_bounds() -> None:
    assert plain_int(v2.MAX_ID)("7") == 7
    assert plain_int(v2.MAX_ID)("007") == 7
    assert plain_int(v2.MAX_ID)(str(v2.MAX_ID)) == v2.MAX_ID
    assert plain_int(2**63 - 1)("9223372036854775807") == 2**63 - 1  # past parse_plain_int's 16
    for text, refused_text in ((str(v2.MAX_ID + 1), str(v2.MAX_ID + 1)), ("9" * 5000, "9" * 40)):
        with pytest.raises(argparse.ArgumentTypeError) as caught:
            plain_int(v2.MAX_ID)(text)
        assert f"'{refused_text}" in str(caught.value) and len(str(caught.value)) < 120
    port = plain_int(65535, minimum=1, refusal="not a port from 1 to 65535")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^not a port from 1 to 65535: '0'$"):
        port("0")


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """argparse's refusal of a command line (exit 2, usage, no traceback): its error line."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    return result.stderr.splitlines()[-1]


def test_cli_integers_are_plain_digits(tmp_path: Path) -> None:
    """Every integer argument, run as an operator runs it: what `int()` would take is refused
    before anything runs; plain digits go through to the command."""
    config = write_config(tmp_path / "router.yaml")
    commands = [
        ["orders", "show", "1_000"],
        ["orders", "show", "\u0663"],
        ["orders", "resolve", "+5", "--refund"],
        ["orders", "resolve", "1", "--upstream-order", " 7 "],
        ["orders", "resolve", "1", "--upstream-order", str(2**63)],  # past an SQLite INTEGER
        ["orders", "refund", "-5", "1.00"],
        ["routes", "1_2"],
        ["routes", "12", "--quantity", "1e3"],
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda argv: cli(config, *argv), commands))
    for argv, result in zip(commands, results, strict=True):
        line = usage_error(result)
        assert "not a plain decimal integer from 0 to " in line, (argv, line)
    demo = usage_error(cli(config, "demo", "--port", "\u0668\u0660\u0668\u0660"))
    assert demo.endswith("argument --port: not a port from 1 to 65535: '\u0668\u0660\u0668\u0660'")
    assert refused(cli(config, "orders", "show", "007")) == "smm-router: no order 7"
    assert cli(config, "routes", "12", "--quantity", "0100", "--json").returncode == 0


def test_positive_numbers_keep_their_messages(tmp_path: Path) -> None:
    """`providers --days` and `probe --timeout`: one parser, each with its limit and words."""
    config = write_config(tmp_path / "router.yaml")
    for days in ("0", "-1", "nan", "inf", "100000", "x"):
        line = usage_error(cli(config, "providers", "--days", days))
        assert line.endswith(f"argument --days: not a positive number of days: {days!r}"), line
    for seconds in ("0", "3600", "-0.5", "nan"):
        line = usage_error(
            cli(config, "probe", "http://127.0.0.1:9/api/v2", "--key", "k", "--timeout", seconds)
        )
        assert line.endswith(f"argument --timeout: not a number of seconds below 3600: {seconds!r}")
    assert cli(config, "providers", "--days", "0.5", "--json").returncode == 0
