"""The `smm-router` command line: argument parsing and wiring only.

One module per command group: `server` (serve, reload, check, probe, sim, demo), `reports`
(providers, routes), `clients`, `orders`; `common` holds what they share. Building the parser
imports every group, so the groups import at their top only what is light (argparse, router.v2)
and each command imports what it runs when it runs: `--help`, `clients list` and `orders held`
never load aiohttp or prometheus_client (tests/test_cli_imports.py checks it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from router.cli.clients import add_client_commands
from router.cli.common import (
    KEY_BYTES,
    MAX_AMOUNT_DIGITS,
    CommandError,
    CommandParser,
    Commands,
    Handler,
    config_path,
    load_config,
    new_key,
    parse_amount,
    print_table,
    remedy,
    with_store,
)
from router.cli.orders import add_order_commands, operator_action, operator_desk, order_report
from router.cli.reports import add_report_commands, routes_json
from router.cli.server import MAX_PORT, add_demo_commands, add_server_commands, run_until_signal

if TYPE_CHECKING:
    from router.config import ConfigUnreadable

__all__ = [
    "KEY_BYTES",
    "MAX_AMOUNT_DIGITS",
    "MAX_PORT",
    "CommandError",
    "build_parser",
    "config_path",
    "load_config",
    "main",
    "new_key",
    "operator_action",
    "operator_desk",
    "order_report",
    "parse_amount",
    "print_table",
    "routes_json",
    "run_until_signal",
    "with_store",
]


class _Version(argparse.Action):
    """`--version`: the installed version, read only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        from router import __version__

        print(f"smm-router {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="smm-router", description="One SMM panel API v2 in front of ranked upstreams."
    )
    parser.add_argument("--version", action=_Version, help="show program's version number and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="the routing table (default: $SMM_ROUTER_CONFIG, else config/router.yaml)"
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    commands = Commands(
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common
    )
    add_server_commands(commands)
    add_report_commands(commands)
    add_client_commands(commands)
    add_order_commands(commands)
    add_demo_commands(commands)
    return parser


def _unreadable_config(exc: ConfigUnreadable, args: argparse.Namespace) -> str:
    from router import config as config_module

    if getattr(args, "config", None):
        source, fix = "--config", "pass --config the path of your config file"
    elif os.environ.get(config_module.CONFIG_ENV_VAR):
        source = f"${config_module.CONFIG_ENV_VAR}"
        fix = f"set {config_module.CONFIG_ENV_VAR} to the path of your config file"
    else:
        source = f"the default, with no --config and no ${config_module.CONFIG_ENV_VAR}"
        fix = (
            f"run smm-router from the folder that holds {config_module.DEFAULT_CONFIG_PATH}, "
            f"pass --config PATH or set {config_module.CONFIG_ENV_VAR}"
        )
    return f"cannot read the config file {exc.path} ({source}): {exc.reason.lower()}; {fix}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A failure the operator can fix (a command refused, a port taken, a
    database or config that cannot be read) is one line on stderr saying what to do, exit 1."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    # Every command but `probe` and `sim` reads the config and opens the database, so these
    # are loaded anyway; a port taken is the serving commands' CommandError (run_until_signal).
    from router.config import ConfigUnreadable
    from router.store import DatabaseUnavailable, StoreError

    try:
        return handler(args)
    except DatabaseUnavailable as exc:
        problem = (
            f"cannot open the database {exc.path} (database): {exc.reason}; "
            f"{remedy(exc.fix, 'database', args)}"
        )
    except ConfigUnreadable as exc:
        problem = _unreadable_config(exc, args)
    except (CommandError, StoreError) as exc:
        problem = str(exc)
    print(f"smm-router: {problem}", file=sys.stderr)
    return 1
