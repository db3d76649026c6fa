"""The CLI's `clients` commands: resellers, their keys and their balances."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from router import v2
from router.cli.common import (
    CommandError,
    Commands,
    load_config,
    new_key,
    parse_amount,
    print_table,
    run,
    with_store,
)

if TYPE_CHECKING:
    from router.store import Reseller, Store


def _reseller_json(reseller: Reseller, key: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": reseller.id,
        "name": reseller.name,
        "enabled": reseller.enabled,
        "balance": v2.format_money(reseller.balance),
    }
    if key is not None:
        document["key"] = key
    return document


def cmd_clients_add(args: argparse.Namespace) -> int:
    from router.keys import hash_key

    config = load_config(args)
    balance = parse_amount(args.balance)
    if balance < 0:
        raise CommandError("the initial balance cannot be negative")
    key = new_key()
    reseller = run(
        with_store(config, lambda store: store.create_reseller(args.name, hash_key(key), balance))
    )
    if args.json:
        print(json.dumps(_reseller_json(reseller, key)))
    else:
        print(f"reseller {reseller.name} (id {reseller.id}), balance {v2.format_money(balance)}")
        print(f"API key (shown once, store it now): {key}")
    return 0


def cmd_clients_list(args: argparse.Namespace) -> int:
    from router.reports import clients_report

    config = load_config(args)
    documents = run(with_store(config, clients_report))
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
    reseller = run(
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

    async def disable(store: Store) -> Reseller | None:
        await store.set_enabled(args.name, False)
        return await store.reseller_by_name(args.name)

    reseller = run(with_store(config, disable))
    if args.json and reseller is not None:
        print(json.dumps(_reseller_json(reseller)))
    else:
        print(f"{args.name}: disabled; its key is refused from now on")
    return 0


def cmd_clients_rotate_key(args: argparse.Namespace) -> int:
    from router.keys import hash_key

    config = load_config(args)
    key = new_key()
    run(with_store(config, lambda store: store.set_key_hash(args.name, hash_key(key))))
    if args.json:
        print(json.dumps({"name": args.name, "key": key}))
    else:
        print(f"{args.name}: new API key (shown once; the old one is refused now): {key}")
    return 0


def add_client_commands(commands: Commands) -> None:
    """clients add, list, topup, disable, rotate-key."""
    clients = commands.group("clients", "manage resellers", dest="clients_command")
    add = clients.add("add", cmd_clients_add, "create a reseller; print its key once")
    add.add_argument("name")
    add.add_argument("--balance", default="0", help="initial balance, e.g. 25.00")
    clients.add("list", cmd_clients_list, "resellers with balance and orders")
    topup = clients.add("topup", cmd_clients_topup, "add to (or, negative, take from) a balance")
    topup.add_argument("name")
    topup.add_argument("amount")
    topup.add_argument("--note", default="top-up by the operator")
    clients.add("disable", cmd_clients_disable, "refuse a reseller's key").add_argument("name")
    rotate = clients.add("rotate-key", cmd_clients_rotate_key, "issue a new key")
    rotate.add_argument("name")
