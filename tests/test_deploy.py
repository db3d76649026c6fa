"""What runs the router in production (deploy/): each file parsed and checked for what it must
do, and run through its own tool (promtool, systemd-analyze) where that tool is installed.
`.ci/run` installs them; a test that cannot find its tool skips and says how to get it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from router.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
TOOL_TIMEOUT = 60  # seconds: promtool and systemd-analyze answer in well under one

# DESIGN.md "Observability" names that metrics.py does not export yet (issue 9's metrics step
# adds them), as Prometheus exposes them: counters with `_total`.
COMING_METRICS = frozenset(
    {
        "smm_router_provider_state",  # exported today with state ok/benched; the breaker adds open
        "smm_router_route_skipped_total",
        "smm_router_revenue_total",
        "smm_router_upstream_cost_total",
        "smm_router_refunded_total",
        "smm_router_rate_limited_total",
        "smm_router_config_reloads_total",
        "smm_router_sync_lag_seconds",
        "smm_router_orders_held_oldest_age_seconds",
    }
)


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: {install}")
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- Prometheus: the scrape config and the alert rules -------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def _exposed_names() -> set[str]:
    """The sample names the router's registry exposes today."""
    metrics = Metrics(CollectorRegistry(), providers=["alpha"])
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_promtool_checks_the_rules() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    result = _run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_runs_the_alert_tests() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    result = _run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_checks_the_config_and_it_loads_the_rules() -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    result = _run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_prometheus_scrapes_the_router_metrics_listener() -> None:
    config = _yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "smm-router"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (targets,) = job["static_configs"]
    assert targets["targets"] == ["router:9464"]  # compose's service name, the metrics port


def test_every_alert_has_a_summary_a_runbook_and_a_severity() -> None:
    rules = _rules()
    assert rules and all("alert" in rule for rule in rules)  # alert rules only
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert "smm-router " in annotations["runbook"] or "systemctl" in annotations["runbook"], (
            f"{rule['alert']}: the runbook line names no command to run"
        )
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]


def test_alerts_use_the_design_metric_names_as_exposed() -> None:
    exposed = _exposed_names()
    used = {name for rule in _rules() for name in re.findall(r"\bsmm_router_\w+", rule["expr"])}
    assert used
    unknown = used - exposed - COMING_METRICS
    assert not unknown, f"not a metric the router exposes or DESIGN.md names: {sorted(unknown)}"
    # What the router exports today keeps the spelling the rules use (a Counter's `_total`).
    assert {"smm_router_requests_total", "smm_router_upstream_requests_total"} <= exposed
    assert {"smm_router_orders_held", "smm_router_provider_balance"} <= exposed


def test_the_alerts_issue_nine_asks_for_are_all_there() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _rules()}
    wanted = {
        "smm_router_provider_state",  # breaker open
        'outcome="unreachable"',  # provider unreachable
        "smm_router_orders_held > 0",  # held orders waiting
        "smm_router_orders_held_oldest_age_seconds",  # ... longer than a threshold
        "smm_router_provider_balance",  # balance below a threshold
        "smm_router_sync_lag_seconds",  # sync lagging
        'outcome=~"internal_error|unavailable"',  # failed reseller requests
        "smm_router_upstream_cost_total",  # negative margin
    }
    for fragment in wanted:
        assert any(fragment in expr for expr in exprs.values()), fragment


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {rule["alert"] for rule in _rules()}
    tests = _yaml(PROMETHEUS / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
            for expected in check["exp_alerts"]:  # the rendered text is checked too
                assert set(expected["exp_annotations"]) >= {"summary", "runbook"}
    assert firing == alerts, f"never seen firing: {sorted(alerts - firing)}"
    assert quiet == alerts, f"never seen quiet: {sorted(alerts - quiet)}"


# --- systemd ------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "smm-router.service"
INSTALLED_BINARY = "/opt/smm-router/bin/smm-router"  # where the unit's install steps put it
EXPOSURE_THRESHOLD = 20  # systemd-analyze security: exposure x 10; 2.0 and under reads "OK"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}}: keys may repeat, comments are dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key outside any section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _verifiable_unit(folder: Path) -> Path:
    """The shipped unit with its binary path pointing at this checkout's `smm-router`.

    `systemd-analyze verify` refuses a unit whose ExecStart is not an executable on this
    machine, and /opt/smm-router is where an operator installs, not where the tests run."""
    binary = shutil.which("smm-router", path=str(Path(sys.executable).parent)) or shutil.which(
        "smm-router"
    )
    if binary is None:
        pytest.skip("smm-router is not installed beside this Python: pip install -e .")
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    path = folder / UNIT.name
    path.write_text(text.replace(INSTALLED_BINARY, binary))
    return path


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "apt-get install systemd")
    unit = _verifiable_unit(tmp_path)
    result = _run(analyze, "verify", str(unit))
    # verify exits 0 on unknown keys and bad values too: it only warns, on stderr.
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_systemd_analyze_rates_the_sandbox_ok(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "apt-get install systemd")
    unit = _verifiable_unit(tmp_path)
    result = _run(
        analyze, "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD}", str(unit)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_the_unit_restarts_reloads_stops_and_is_hardened() -> None:
    unit = _unit(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["ExecStart"] == f"{INSTALLED_BINARY} serve --config /etc/smm-router/router.yaml"
    assert service["ExecStartPre"].startswith(f"{INSTALLED_BINARY} check ")
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 60  # aiohttp waits up to 60 s for requests in flight
    # Not root: a dynamic user, or a dedicated one.
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    assert service["StateDirectory"] == "smm-router"  # /var/lib/smm-router, writable
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["EnvironmentFile"] == "/etc/smm-router/env"  # provider keys, 0600 root
    assert service["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # The database lives where the unit lets it write.
    example = _yaml(REPO / "config" / "example.yaml")
    assert example["database"].startswith("/var/lib/smm-router/")
