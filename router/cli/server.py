"""The CLI's commands that run or check a server: serve, reload, check, probe, sim, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from router import v2
from router.cli.common import (
    CommandError,
    Commands,
    config_path,
    load_config,
    plain_int,
    positive_number,
    remedy,
    run,
)

if TYPE_CHECKING:
    from router.config import Config
    from router.sync.providers import Problem

MAX_PORT = 65535
MAX_CALL_SECONDS = 3600  # a `probe --timeout` at least this long is a typo


def cmd_serve(args: argparse.Namespace) -> int:
    from router import logs
    from router.app import serve

    config = load_config(args)
    logs.configure()
    run_until_signal(serve(config, config_path=config_path(args)), args)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running server to re-read its config, and say whether it applied it."""
    from router import reload

    config = load_config(args)  # a config that fails `check` is refused here: nothing signalled
    try:
        result = run(reload.request_reload(config))
    except reload.NoServer as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps({"pid": result.pid, "outcome": result.outcome}))
    elif result.outcome == "applied":
        print(f"reloaded: the server (pid {result.pid}) applied the config")
    elif result.outcome == "refused":
        print(
            f"smm-router: the server (pid {result.pid}) refused the config and keeps the one "
            "it runs: its log line `config_reload_refused` lists why",
            file=sys.stderr,
        )
    else:
        print(
            f"signalled the server (pid {result.pid}), but {result.why_unknown}: its log line "
            "`config_reloaded` or `config_reload_refused` tells the outcome"
        )
    return 1 if result.outcome == "refused" else 0


def run_until_signal(work: Awaitable[None], args: argparse.Namespace) -> None:
    """Run `work` until it ends, Ctrl-C or SIGTERM; then let it clean up. A port it cannot
    listen on is a CommandError saying which setting to change."""
    import asyncio

    from router.listeners import ListenError

    async def main() -> None:
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    except ListenError as exc:
        problem = f"{exc}; {remedy(exc.fix, exc.setting, args)}"
        if args.command == "demo" and args.port is None:
            problem += ", or pass --port N to move all the demo's ports"
        raise CommandError(problem) from exc


def cmd_check(args: argparse.Namespace) -> int:
    if args.json:  # one JSON document, for a config that cannot be used too
        config, refused = _config_or_problems(args)
        if config is None:
            print(json.dumps({"ok": False, "problems": refused}))
            return 1
    else:
        config = load_config(args)
    orphans = _orphaned_orders(config)
    if args.online:
        return _check_online(config, as_json=args.json, problems=orphans)
    if args.json:
        print(json.dumps({"ok": not orphans, "problems": [_problem_json(p) for p in orphans]}))
        return 1 if orphans else 0
    for problem in orphans:
        print(problem)
    verdict = f"{len(orphans)} problems" if orphans else "ok"
    print(
        f"{verdict}: {len(config.providers)} providers, {len(config.services)} services, "
        f"database {config.database}"
    )
    return 1 if orphans else 0


def _config_or_problems(args: argparse.Namespace) -> tuple[Config | None, list[dict[str, str]]]:
    """The config, or else every problem that makes it unusable, as `check --json` shows a
    problem (kind `config`, or `unreadable` for a file that cannot be read at all)."""
    from router import config as config_module

    path = config_path(args)
    try:
        return config_module.load(path), []
    except config_module.ConfigUnreadable as exc:
        return None, [{"path": str(path), "kind": "unreadable", "message": exc.reason}]
    except config_module.ConfigError as exc:
        problems = []
        for error in exc.errors:  # "<path>: <message>"
            where, _, message = error.partition(": ")
            problems.append({"path": where, "kind": "config", "message": message or where})
        return None, problems


def _orphaned_orders(config: Config) -> list[Problem]:
    """Open orders at providers the config no longer has: nothing syncs them any more.

    Read from the database as it is, when there is one (`check` never creates or migrates it).
    """
    from router.store import Store

    if not config.database.exists():
        return []

    async def read() -> dict[str, int] | None:
        store = await Store.open(config.database, read_only=True)
        try:
            return await store.orphaned_orders(config.providers)
        finally:
            await store.close()

    orphaned = run(read())
    if orphaned is None:
        print(
            f"note: database {config.database} is older than this version; "
            "orders of removed providers are checked once a server has started on it",
            file=sys.stderr,
        )
        return []
    if not orphaned:
        return []  # the usual case: the sync's module (and aiohttp) stay unloaded
    from router.sync.providers import Problem

    return [
        Problem(
            f"providers.{provider}",
            "orphaned",
            f"removed, but {count} open {'order is' if count == 1 else 'orders are'} still at it "
            "(they no longer sync; put the provider back or resolve them)",
        )
        for provider, count in orphaned.items()
    ]


def _problem_json(problem: Problem) -> dict[str, str]:
    return {"path": problem.path, "kind": problem.kind, "message": problem.message}


def _check_online(config: Config, *, as_json: bool, problems: Sequence[Problem] = ()) -> int:
    """`check --online`: every route against what its provider answers now; 1 on any problem
    (`problems`: the offline check's, reported with them)."""
    from router.sync.providers import check_online

    online, probes = run(check_online(config))
    problems = [*problems, *online]
    if as_json:
        document = {
            "ok": not problems,
            "problems": [_problem_json(p) for p in problems],
            "providers": {
                name: {
                    "services": None if probe.catalogue is None else len(probe.catalogue),
                    "balance": None if probe.balance is None else v2.format_money(probe.balance),
                    "currency": probe.currency,
                }
                for name, probe in probes.items()
            },
        }
        print(json.dumps(document))
    else:
        for problem in problems:
            print(problem)
        routes = sum(len(service.route) for service in config.services.values())
        verdict = f"{len(problems)} problems" if problems else "ok"
        print(f"{verdict}: {len(config.providers)} providers, {routes} routes checked online")
    return 1 if problems else 0


def cmd_probe(args: argparse.Namespace) -> int:
    """`probe URL --key KEY`: one line per deviation from V2.md; exit 1 if any."""
    from router import probe

    try:
        report = run(probe.probe(args.url, args.key, call_seconds=args.timeout))
    except ValueError as exc:  # not an http(s) URL
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.document()))
    else:
        for line in report.lines():
            print(line)
        if report.ok:
            seen = "; ".join(f"{check.name}: {check.detail}" for check in report.checks)
            print(f"ok: {report.url} answers as V2.md says ({seen})")
        else:
            print(f"{len(report.lines())} deviations from V2.md at {report.url}")
    return 0 if report.ok else 1


def _probe_arguments(checker: argparse.ArgumentParser) -> None:
    """`probe`'s options, added once it is chosen: its default timeout is the config's."""
    from router import config as config_module

    checker.add_argument("url", metavar="URL", help="the server's v2 endpoint")
    checker.add_argument("--key", required=True, help="the API key of our account there")
    checker.add_argument(
        "--timeout",
        type=positive_number(MAX_CALL_SECONDS, f"not a number of seconds below {MAX_CALL_SECONDS}"),
        default=config_module.DEFAULT_UPSTREAM_TIMEOUT,
        help="seconds for each call (default: %(default)g)",
    )
    checker.add_argument("--json", action="store_true", help="print one JSON document")


def cmd_sim(args: argparse.Namespace) -> int:
    from router import sim

    run_until_signal(sim.serve_from_args(args), args)
    return 0


def _sim_arguments(parser: argparse.ArgumentParser) -> None:
    """`sim`'s options, added once it is chosen: they live with the simulator (aiohttp's)."""
    from router import sim

    sim.add_arguments(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    from router import demo, logs

    config = load_config(args)
    logs.configure()
    run_until_signal(demo.run(config, port=args.port), args)
    return 0


def add_server_commands(commands: Commands) -> None:
    """serve, reload, check, probe."""
    commands.add("serve", cmd_serve, "run the API, the metrics listener and the loops")
    commands.add(
        "reload",
        cmd_reload,
        "make the running server re-read its config (SIGHUP through <database>.pid)",
    )
    check = commands.add("check", cmd_check, "validate the config; print every problem")
    check.add_argument(
        "--online", action="store_true", help="then call every provider and check each route"
    )
    checker = commands.add_bare(
        "probe",
        help="check that a v2 server answers as V2.md says (read-only and refused calls)",
        description="Check that a v2 server (an upstream about to be added) answers services, "
        "balance, an unknown order's status and a refused add as V2.md says. It only reads, "
        "or asks for what every panel refuses. Exit 1 on any deviation.",
        populate=_probe_arguments,
    )
    checker.set_defaults(handler=cmd_probe)


def add_demo_commands(commands: Commands) -> None:
    """sim, demo."""
    sim_parser = commands.add_bare(
        "sim",
        help="run one simulated upstream provider",
        description="A simulated v2 provider.",
        populate=_sim_arguments,
    )
    sim_parser.set_defaults(handler=cmd_sim)
    demo = commands.add("demo", cmd_demo, "simulated providers + the router + a demo reseller")
    demo.add_argument(
        "--port",
        type=plain_int(MAX_PORT, minimum=1, refusal=f"not a port from 1 to {MAX_PORT}"),
        metavar="N",
        help="the router's API port; metrics then listen on N+1 and the simulated providers on "
        "N+2, N+3, ... (default: the config's ports)",
    )
