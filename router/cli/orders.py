"""The CLI's `orders` commands: held orders, one order's whole story, and the operator's
resolutions and refunds."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from router import v2
from router.cli.common import (
    MAX_STORED_INT,
    CommandError,
    Commands,
    age,
    cell,
    load_config,
    operator,
    parse_amount,
    plain_int,
    print_table,
    run,
    with_store,
)

if TYPE_CHECKING:
    from router.config import Config
    from router.orders import OrderDesk
    from router.store import Order, Store


async def order_report(store: Store, order_id: int) -> dict[str, Any]:
    """`orders show`'s document (router.orders.report); no such order is a CommandError."""
    from router.orders.report import NoSuchOrder
    from router.orders.report import order_report as assemble

    try:
        return await assemble(store, order_id)
    except NoSuchOrder as exc:
        raise CommandError(str(exc)) from exc


@contextlib.asynccontextmanager
async def operator_desk(config: Config, store: Store) -> AsyncIterator[OrderDesk]:
    """An order desk with the operator's own HTTP session, for resolving held orders.

    It routes as the server does, on the fleet as the store shows it (router.fleet): breakers,
    funds benches, catalogue costs, spend caps. Its upstream calls are recorded like the
    server's (they count in provider statistics), and so are its breaker transitions.
    """
    import aiohttp
    from prometheus_client import CollectorRegistry

    from router.fleet import Fleet
    from router.metrics import Metrics
    from router.orders import OrderDesk
    from router.upstream import CallRecord, UpstreamClient

    calls: list[CallRecord] = []
    async with aiohttp.ClientSession(headers={"User-Agent": "smm-router"}) as session:
        clients = {
            name: UpstreamClient(provider, session, on_call=calls.append)
            for name, provider in config.providers.items()
        }
        metrics = Metrics(CollectorRegistry(), providers=config.providers)
        fleet = Fleet(config, store, metrics)
        await fleet.restore()
        try:
            yield OrderDesk(config, store, clients, metrics, fleet=fleet)
        finally:
            await store.record_calls(calls)


def cmd_orders_held(args: argparse.Namespace) -> int:
    from router.reports import held_report

    config = load_config(args)
    now = time.time()
    documents = run(with_store(config, lambda store: held_report(store, now)))
    if args.json:
        print(json.dumps(documents))
    elif not documents:
        print("no held orders")
    else:
        rows = [
            {
                **d,
                "held_on": f"{d['provider']} service {d['upstream_service']}",
                "age": age(d["age_seconds"]),
                "error": cell(d["error"] or "no answer recorded: the upstream may hold it"),
            }
            for d in documents
        ]
        print_table(rows, ["id", "reseller", "service", "held_on", "charge", "age", "error"])
    return 0


def cmd_orders_show(args: argparse.Namespace) -> int:
    config = load_config(args)
    report = run(with_store(config, lambda store: order_report(store, args.id)))
    if args.json:
        print(json.dumps(report))
        return 0
    o = report["order"]
    print(f"order {o['id']}: {o['state']}, the reseller sees {o['status']}")
    for label, value in (
        ("reseller", f"{o['reseller']} (id {o['reseller_id']})"),
        ("service", o["service"]),
        ("link", o["link"]),
        ("quantity", o["quantity"]),
        ("charge", o["charge"]),
        ("provider", o["provider"] or "-"),
        ("upstream", f"service {o['upstream_service']}, order {o['upstream_order'] or '-'}"),
        ("remains", "-" if o["remains"] is None else o["remains"]),
        ("created", o["created_at"]),
        ("request", o["request_id"] or "-"),
        ("config", o["config_version"] or "-"),
        *([("held", report["held"]["reason"])] if report["held"] else []),
    ):
        print(f"  {label:<9} {value}")
    attempt_columns = ["rank", "provider", "upstream_service", "started_at", "latency"]
    sections = (
        ("attempts", [*attempt_columns, "outcome", "upstream_order", "error"]),
        ("events", ["at", "kind", "status", "detail"]),
        ("ledger", ["id", "kind", "amount", "note", "at"]),
    )
    for name, columns in sections:
        print(f"\n{name}:")
        rows = [{c: cell(row[c]) for c in columns} for row in report[name]]
        if rows:
            print_table(rows, columns)
        else:
            print("  (none)")
    return 0


def operator_action(config: Config, act: Callable[[OrderDesk], Awaitable[Order]]) -> dict[str, Any]:
    """Run one operator action on an order with the operator's desk: the order as JSON after it
    (with what it was refunded); a refused action is a CommandError."""
    from router.orders import ResolveRefused
    from router.orders.report import order_json

    async def act_on(store: Store) -> dict[str, Any]:
        async with operator_desk(config, store) as desk:
            order = await act(desk)
        document = order_json(order, await store.reseller_name(order.reseller_id))
        document["refunded"] = v2.format_money(order.refunded)
        return document

    try:
        return run(with_store(config, act_on))
    except ResolveRefused as exc:
        raise CommandError(str(exc)) from exc


def cmd_orders_resolve(args: argparse.Namespace) -> int:
    from router import logs

    config = load_config(args)
    logs.configure()  # a re-route logs as `add` does, on stderr: stdout stays the answer
    by = args.by or operator()

    async def resolve(desk: OrderDesk) -> Order:
        if args.upstream_order is not None:
            return await desk.attach(args.id, args.upstream_order, by=by)
        if args.reroute:
            return await desk.reroute(args.id, by=by)
        return await desk.refund_held(args.id, by=by)

    document = operator_action(config, resolve)
    if args.json:
        print(json.dumps(document))
    elif document["state"] == "placed":
        print(
            f"order {document['id']}: placed at {document['provider']} as upstream order "
            f"{document['upstream_order']}; the reseller sees {document['status']}"
        )
    elif document["state"] == "held":
        print(
            f"order {document['id']}: outcome unknown at {document['provider']}, held again "
            f"(see `smm-router orders show {document['id']}`)"
        )
    else:
        print(
            f"order {document['id']}: canceled, {document['charge']} refunded; "
            f"the reseller sees {document['status']}"
        )
    return 0


def cmd_orders_refund(args: argparse.Namespace) -> int:
    config = load_config(args)
    amount = parse_amount(args.amount)
    by = args.by or operator()

    async def refund(desk: OrderDesk) -> Order:
        return await desk.refund_order(args.id, amount, by=by, note=args.note)

    document = operator_action(config, refund)
    if args.json:
        print(json.dumps(document))
    else:
        print(
            f"order {document['id']}: {document['refunded']} of {document['charge']} refunded "
            f"to {document['reseller']}"
        )
    return 0


def add_order_commands(commands: Commands) -> None:
    """orders held, show, resolve, refund."""
    orders = commands.group("orders", "held orders and their resolution", dest="orders_command")
    orders.add("held", cmd_orders_held, "orders whose upstream outcome is unknown")
    show = orders.add("show", cmd_orders_show, "an order, its attempts, history and ledger rows")
    show.add_argument("id", type=plain_int(v2.MAX_ID), metavar="ID")
    resolve = orders.add("resolve", cmd_orders_resolve, "attach, re-route or refund a held order")
    resolve.add_argument("id", type=plain_int(v2.MAX_ID), metavar="ID")
    how = resolve.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--upstream-order",
        type=plain_int(MAX_STORED_INT),
        metavar="N",
        help="attach the order found at its provider",
    )
    how.add_argument("--reroute", action="store_true", help="place it now on the next routes")
    how.add_argument("--refund", action="store_true", help="cancel it and refund its charge")
    resolve.add_argument("--by", help="who resolves it, for its history (default: the OS user)")
    refund = orders.add(
        "refund",
        cmd_orders_refund,
        "refund part or all of an order that ended upstream (a package ended Partial, ...)",
    )
    refund.add_argument("id", type=plain_int(v2.MAX_ID), metavar="ID")
    refund.add_argument("amount", help="what to give back, e.g. 1.25")
    refund.add_argument("--note", default="refund by the operator", help="the ledger row's note")
    refund.add_argument("--by", help="who refunds it, for its history (default: the OS user)")
