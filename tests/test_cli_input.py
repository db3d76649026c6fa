"""Bad operator input, through the real command line (`python -m router`): one line on stderr,
exit 1, no traceback, nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.getcwd()}
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
