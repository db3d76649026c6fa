"""What runs the router in production (deploy/): each file parsed and checked for what it must
do, and run through its own tool (promtool, systemd-analyze) where that tool is installed.
`.ci/run` installs them; a test that cannot find its tool skips and says how to get it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

from router import config as config_module
from router.metrics import Metrics
from tests.conftest import RouterFactory, SimFactory, free_port, service

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
TOOL_TIMEOUT = 60  # seconds: promtool and systemd-analyze answer in well under one


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


def test_the_log_lines_a_runbook_names_are_lines_the_router_logs() -> None:
    """A runbook that sends the operator to the log's `some_event` lines names an event the
    router logs (a string it passes to a logger), not one that was renamed or never was."""
    router = REPO / "router"
    source = "\n".join(path.read_text() for path in sorted(router.rglob("*.py")))
    named = {
        event
        for rule in _rules()
        for event in re.findall(r"`([a-z]+(?:_[a-z]+)+)` lines?", rule["annotations"]["runbook"])
    }
    assert named  # the runbooks do send the operator to the log
    missing = {event for event in named if f'"{event}"' not in source}
    assert not missing, f"runbooks name log lines the router never writes: {sorted(missing)}"


def test_alerts_use_the_design_metric_names_as_exposed() -> None:
    exposed = _exposed_names()
    used = {name for rule in _rules() for name in re.findall(r"\bsmm_router_\w+", rule["expr"])}
    assert used
    unknown = used - exposed
    assert not unknown, f"not a metric the router exposes: {sorted(unknown)}"
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


# --- the container image --------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"
SLIM_PYTHON = re.compile(r"^python:3\.11-slim(-\w+)?$")


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the instruction, continuation lines joined

    def exec_form(self) -> list[str]:
        """The JSON array form (`CMD ["a", "b"]`) as a list; fails on the shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def _dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and parser directives dropped, `\\` lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        name, _, args = whole.partition(" ")
        instructions.append(Instruction(name.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, instruction in enumerate(instructions) if instruction.name == "FROM"]
    assert starts and starts[0] == 0, "a Dockerfile starts with FROM"
    return instructions[starts[-1] :]


def _one(stage: list[Instruction], name: str) -> Instruction:
    found = [instruction for instruction in stage if instruction.name == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def _dockerignored() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_parser_reads_forms_and_continuations() -> None:
    parsed = _dockerfile('# syntax=docker/dockerfile:1\nFROM a AS b\nRUN x \\\n  # note\n  && y\n'
                         'CMD ["s", "t"]\n')  # fmt: skip
    assert parsed == [Instruction("FROM", "a AS b"), Instruction("RUN", "x && y"),
                      Instruction("CMD", '["s", "t"]')]  # fmt: skip
    assert parsed[2].exec_form() == ["s", "t"]


def test_the_image_is_slim_python_and_runs_as_its_own_user() -> None:
    instructions = _dockerfile(DOCKERFILE.read_text())
    for base in (i.args.split()[0] for i in instructions if i.name == "FROM"):
        assert base == "${PYTHON_IMAGE}" or SLIM_PYTHON.match(base), base
    final = _final_stage(instructions)
    assert SLIM_PYTHON.match(final[0].args.split()[0])
    user = _one(final, "USER").args.split(":")[0]
    assert user not in ("root", "0")
    run = " ".join(i.args for i in final if i.name == "RUN")
    assert f"useradd --system --uid {user}" in run  # the user exists, with a fixed UID


def test_the_image_installs_the_package_from_the_repository() -> None:
    instructions = _dockerfile(DOCKERFILE.read_text())
    copies = [i.args.split() for i in instructions if i.name == "COPY" and "--from" not in i.args]
    sources = {source.rstrip("/") for *found, _ in copies for source in found}
    assert {"pyproject.toml", "router"} <= sources
    ignored = _dockerignored()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    runs = [i.args for i in instructions if i.name == "RUN"]
    # The lock's exact versions, as `make` installs them; then the package, resolving nothing.
    assert "requirements.lock" in sources
    assert any("pip install --require-hashes -r requirements.lock" in run for run in runs), runs
    assert any("pip install --no-deps ." in run for run in runs), runs
    # The virtualenv built in the first stage is what the final one runs.
    final = _final_stage(instructions)
    assert any(i.name == "COPY" and i.args.startswith("--from=build ") for i in final)
    env = " ".join(i.args for i in final if i.name == "ENV")
    assert "PATH=/opt/smm-router/bin:$PATH" in env


def test_the_image_serves_with_its_config_and_data_volumes() -> None:
    final = _final_stage(_dockerfile(DOCKERFILE.read_text()))
    assert _one(final, "VOLUME").exec_form() == ["/etc/smm-router", "/var/lib/smm-router"]
    assert _one(final, "CMD").exec_form() == [
        "smm-router", "serve", "--config", "/etc/smm-router/router.yaml",
    ]  # fmt: skip
    assert _one(final, "STOPSIGNAL").args == "SIGTERM"
    compose_config = _yaml(DEPLOY / "router.compose.yaml")
    exposed = {int(port) for port in _one(final, "EXPOSE").args.split()}
    assert exposed == {compose_config["listen"]["port"], compose_config["metrics"]["port"]}


def _healthcheck_command() -> list[str]:
    check = _one(_final_stage(_dockerfile(DOCKERFILE.read_text())), "HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = Instruction("CMD", command).exec_form()
    assert argv[:2] == ["python", "-c"], "slim images have no curl: Python asks"
    assert "http://127.0.0.1:8080/healthz" in argv[2]
    return argv


async def test_the_healthcheck_passes_on_a_live_router_and_fails_without_one(
    start_sim: SimFactory, start_router: RouterFactory
) -> None:
    argv = _healthcheck_command()
    alpha = await start_sim()
    router = await start_router({"alpha": alpha.url}, [service(1, [("alpha", 101)])])
    for url, healthy in (
        (str(router.client.make_url("/healthz")), True),
        (f"http://127.0.0.1:{free_port()}/healthz", False),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv[1:],
            env={**os.environ, "SMM_ROUTER_HEALTH_URL": url},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        code = await asyncio.wait_for(process.wait(), TOOL_TIMEOUT)
        assert (code == 0) is healthy, (url, code)


# --- docker compose -------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = _yaml(COMPOSE)
    return compose


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts (short syntax) as {container path: source in the repository}."""
    binds: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            binds[target] = (DEPLOY / source).resolve()
    return binds


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    named: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if not source.startswith((".", "/")):
            named[target] = source
    return named


def test_compose_runs_router_prometheus_and_grafana() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"router", "prometheus", "grafana"} <= set(services)
    for name, entry in services.items():
        if "build" in entry:
            build = entry["build"]
            assert build["context"] == ".."  # the repository root, as deploy/Dockerfile wants
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert entry["image"] == services["router"]["image"], name
    for name, entry in services.items():
        for target, source in _binds(entry).items():
            assert source.exists(), f"{name} mounts {source} at {target}: not in the repository"
            assert source.is_relative_to(REPO), source
        for volume in _named_volumes(entry).values():
            assert volume in compose["volumes"], volume
        for dependency in entry.get("depends_on", []):
            assert dependency in services, dependency


def test_compose_router_gets_its_config_data_volume_and_port() -> None:
    router = _compose()["services"]["router"]
    assert _binds(router) == {"/etc/smm-router/router.yaml": DEPLOY / "router.compose.yaml"}
    assert _named_volumes(router) == {"/var/lib/smm-router": "router-data"}
    assert "127.0.0.1:8080:8080" in router["ports"]
    assert router["restart"] == "unless-stopped"
    grace = router["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > 60  # aiohttp's 60 s for requests in flight


def test_compose_router_config_listens_outside_the_container_and_reaches_the_sims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    environment = services["router"]["environment"]
    env: dict[str, str] = {}
    for name, value in environment.items():
        default = re.fullmatch(r"\$\{(\w+):-(.*)\}", value)
        assert default and default[1] == name, f"{name}: take it from the environment"
        env[name] = default[2]  # what compose passes when the operator sets nothing
    config = config_module.load(DEPLOY / "router.compose.yaml", env=env)
    assert config.listen.host == "0.0.0.0" and config.metrics.host == "0.0.0.0"
    assert config.database == Path("/var/lib/smm-router/router.db")
    for provider in config.providers.values():
        parts = urlsplit(provider.url)
        sim = services[parts.hostname]
        command = sim["command"]
        assert command[:2] == ["smm-router", "sim"] and "0.0.0.0" in command
        assert command[command.index("--port") + 1] == str(parts.port)
        assert command[command.index("--key") + 1] == provider.key.value
        assert parts.hostname in services["router"]["depends_on"]


def test_compose_prometheus_loads_the_shipped_config_and_rules() -> None:
    prometheus = _compose()["services"]["prometheus"]
    assert _binds(prometheus) == {
        "/etc/prometheus/prometheus.yml": PROMETHEUS / "prometheus.yml",
        "/etc/prometheus/alerts.yml": PROMETHEUS / "alerts.yml",  # rule_files: beside the config
    }
    assert _named_volumes(prometheus) == {"/prometheus": "prometheus-data"}
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    # It scrapes the router where compose puts it.
    (job,) = _yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in _compose()["services"]
    assert int(port) == _yaml(DEPLOY / "router.compose.yaml")["metrics"]["port"]


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboards_folder() -> None:
    grafana = _compose()["services"]["grafana"]
    binds = _binds(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = provisioning / "datasources" / "prometheus.yaml"
    dashboards = provisioning / "dashboards" / "smm-router.yaml"
    assert binds["/etc/grafana/provisioning/datasources/prometheus.yaml"] == datasources
    assert binds["/etc/grafana/provisioning/dashboards/smm-router.yaml"] == dashboards
    assert "127.0.0.1:3000:3000" in grafana["ports"]

    (source,) = _yaml(datasources)["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    (provider,) = _yaml(dashboards)["providers"]
    assert provider["type"] == "file"
    # The provider reads the folder that compose mounts from deploy/grafana/.
    assert binds[provider["options"]["path"]] == DEPLOY / "grafana"
