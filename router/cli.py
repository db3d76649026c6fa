"""The `smm-router` command line: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from router import config as config_module
from router import logs, v2
from router.api import hash_key
from router.config import Config, ConfigError
from router.store import Store, StoreError

T = TypeVar("T")

KEY_BYTES = 24


class CommandError(Exception):
    """A command that cannot do what was asked: printed without a traceback, exit 1."""


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def parse_amount(text: str) -> int:
    """A money amount typed by the operator ("25", "10.50") in minor units."""
    try:
        amount = Decimal(text)
    except InvalidOperation as exc:
        raise CommandError(f"not an amount: {text!r}") from exc
    if not amount.is_finite() or amount != amount.quantize(Decimal(1).scaleb(-v2.MONEY_PLACES)):
        raise CommandError(f"amount must be a number with at most {v2.MONEY_PLACES} decimals")
    return v2.to_minor(amount)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(row[c])) for row in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def load_config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if args.config else config_module.default_config_path()
    try:
        return config_module.load(path)
    except ConfigError as exc:
        raise CommandError(f"{path}: invalid config\n{exc}") from exc


async def with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    store = await Store.open(config.database)
    try:
        return await work(store)
    finally:
        await store.close()


# --- serve, check --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from router.app import serve

    config = load_config(args)
    logs.configure()
    run_until_signal(serve(config))
    return 0


def run_until_signal(work: Awaitable[None]) -> None:
    """Run `work` until it ends, Ctrl-C or SIGTERM; then let it clean up."""

    async def main() -> None:
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    print(
        f"ok: {len(config.providers)} providers, {len(config.services)} services, "
        f"database {config.database}"
    )
    return 0


# --- clients -------------------------------------------------------------------------------------


def _reseller_json(reseller: Any, key: str | None = None) -> dict[str, Any]:
    document = {
        "id": reseller.id,
        "name": reseller.name,
        "enabled": reseller.enabled,
        "balance": v2.format_money(reseller.balance),
    }
    if key is not None:
        document["key"] = key
    return document


def cmd_clients_add(args: argparse.Namespace) -> int:
    config = load_config(args)
    balance = parse_amount(args.balance)
    if balance < 0:
        raise CommandError("the initial balance cannot be negative")
    key = new_key()
    reseller = asyncio.run(
        with_store(config, lambda store: store.create_reseller(args.name, hash_key(key), balance))
    )
    if args.json:
        print(json.dumps(_reseller_json(reseller, key)))
    else:
        print(f"reseller {reseller.name} (id {reseller.id}), balance {v2.format_money(balance)}")
        print(f"API key (shown once, store it now): {key}")
    return 0


def cmd_clients_list(args: argparse.Namespace) -> int:
    config = load_config(args)
    rows = asyncio.run(with_store(config, lambda store: store.list_resellers()))
    documents = [
        {
            "id": r.id,
            "name": r.name,
            "enabled": r.enabled,
            "balance": v2.format_money(r.balance),
            "orders": r.orders,
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(documents))
    else:
        print_table(documents, ["id", "name", "enabled", "balance", "orders"])
    return 0


def cmd_clients_topup(args: argparse.Namespace) -> int:
    config = load_config(args)
    amount = parse_amount(args.amount)
    if amount == 0:
        raise CommandError("amount must not be zero")
    kind = "topup" if amount > 0 else "adjustment"
    reseller = asyncio.run(
        with_store(
            config,
            lambda store: store.adjust_balance(args.name, amount, kind=kind, note=args.note),
        )
    )
    if args.json:
        print(json.dumps(_reseller_json(reseller)))
    else:
        print(f"{reseller.name}: balance {v2.format_money(reseller.balance)}")
    return 0


def cmd_clients_disable(args: argparse.Namespace) -> int:
    config = load_config(args)
    asyncio.run(with_store(config, lambda store: store.set_enabled(args.name, False)))
    print(f"{args.name}: disabled; its key is refused from now on")
    return 0


def cmd_clients_rotate_key(args: argparse.Namespace) -> int:
    config = load_config(args)
    key = new_key()
    asyncio.run(with_store(config, lambda store: store.set_key_hash(args.name, hash_key(key))))
    if args.json:
        print(json.dumps({"name": args.name, "key": key}))
    else:
        print(f"{args.name}: new API key (shown once; the old one is refused now): {key}")
    return 0


# --- sim, demo -----------------------------------------------------------------------------------


def cmd_sim(args: argparse.Namespace) -> int:
    from router import sim

    run_until_signal(sim.serve_from_args(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from router import demo

    config = load_config(args)
    logs.configure()
    run_until_signal(demo.run(config))
    return 0


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smm-router", description="One SMM panel API v2 in front of ranked upstreams."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="the routing table (default: $SMM_ROUTER_CONFIG, else config/router.yaml)"
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=text, description=text
        )
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "serve", cmd_serve, "run the API, the metrics listener and the loops")
    command(commands, "check", cmd_check, "validate the config; print every problem")

    clients = commands.add_parser("clients", help="manage resellers").add_subparsers(
        dest="clients_command", required=True, metavar="ACTION"
    )
    add = command(clients, "add", cmd_clients_add, "create a reseller; print its key once")
    add.add_argument("name")
    add.add_argument("--balance", default="0", help="initial balance, e.g. 25.00")
    command(clients, "list", cmd_clients_list, "resellers with balance and orders")
    topup = command(
        clients, "topup", cmd_clients_topup, "add to (or, negative, take from) a balance"
    )
    topup.add_argument("name")
    topup.add_argument("amount")
    topup.add_argument("--note", default="top-up by the operator")
    command(clients, "disable", cmd_clients_disable, "refuse a reseller's key").add_argument("name")
    rotate = command(clients, "rotate-key", cmd_clients_rotate_key, "issue a new key")
    rotate.add_argument("name")

    sim_parser = commands.add_parser(
        "sim", help="run one simulated upstream provider", description="A simulated v2 provider."
    )
    from router import sim

    sim.add_arguments(sim_parser)
    sim_parser.set_defaults(handler=cmd_sim)
    command(commands, "demo", cmd_demo, "simulated providers + the router + a demo reseller")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (CommandError, StoreError) as exc:
        print(f"smm-router: {exc}", file=sys.stderr)
        return 1
