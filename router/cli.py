"""The `smm-router` command line: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import math
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from prometheus_client import CollectorRegistry

from router import __version__, logs, probe, reload, v2
from router import config as config_module
from router.api import hash_key
from router.config import Config, ConfigError, ConfigUnreadable
from router.fleet import Fleet, ReportRefused, RouteReport, route_report
from router.listeners import ListenError
from router.metrics import Metrics
from router.orders import OrderDesk, ResolveRefused, held_reason, reseller_status
from router.routing import EXPLORE_SHARE
from router.store import DatabaseUnavailable, Order, Store, StoreError
from router.sync.providers import (
    REPORT_DAYS,
    Problem,
    ProviderReport,
    check_online,
    provider_report,
)
from router.upstream import CallRecord, UpstreamClient

T = TypeVar("T")

KEY_BYTES = 24
MAX_AMOUNT_DIGITS: Final = 12  # whole digits of an amount: below a trillion, far from overflow
_AMOUNT: Final = re.compile(r"-?(?P<whole>[0-9]+)(?:\.(?P<decimals>[0-9]+))?")
_SHOWN_CHARS: Final = 40  # of a refused amount, in its one-line error
MAX_PORT = 65535


class CommandError(Exception):
    """A command that cannot do what was asked: printed without a traceback, exit 1."""


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def parse_amount(text: str) -> int:
    """A money amount typed by the operator ("25", "10.50", "-3") in minor units.

    Only a plain decimal: digits, an optional leading minus and at most MONEY_PLACES decimals,
    below 10**MAX_AMOUNT_DIGITS. No exponent ("1e3"), NaN, Infinity, hex, nor "-0"; raise
    CommandError (one line) for anything else.
    """
    plain = text.strip()
    shown = repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")
    match = _AMOUNT.fullmatch(plain)
    if match is None:
        raise CommandError(f"not a plain decimal amount: {shown} (write it as 25 or -10.50)")
    whole, decimals = match.group("whole", "decimals")
    if len(decimals or "") > v2.MONEY_PLACES:
        raise CommandError(f"amount {shown} has more than {v2.MONEY_PLACES} decimals")
    if len(whole) > MAX_AMOUNT_DIGITS:
        raise CommandError(
            f"amount {shown} is too large: at most {MAX_AMOUNT_DIGITS} digits before the point"
        )
    amount = Decimal(plain)
    if amount == 0 and plain.startswith("-"):
        raise CommandError(f"not a plain decimal amount: {shown} (write 0, not -0)")
    return v2.to_minor(amount)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(row[c])) for row in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def config_path(args: argparse.Namespace) -> Path:
    """The config file a command reads: --config, else $SMM_ROUTER_CONFIG, else the default."""
    config: str | None = getattr(args, "config", None)  # `sim` has no config
    return Path(config) if config else config_module.default_config_path()


def load_config(args: argparse.Namespace) -> Config:
    path = config_path(args)
    try:
        return config_module.load(path)
    except ConfigUnreadable:
        raise  # main() says how the file was chosen
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
    run_until_signal(serve(config, config_path=config_path(args)))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running server to re-read its config, and say whether it applied it."""
    config = load_config(args)  # a config that fails `check` is refused here: nothing signalled
    try:
        result = asyncio.run(reload.request_reload(config))
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


def _orphaned_orders(config: Config) -> list[Problem]:
    """Open orders at providers the config no longer has: nothing syncs them any more.

    Read from the database as it is, when there is one (`check` never creates or migrates it).
    """
    if not config.database.exists():
        return []

    async def read() -> dict[str, int] | None:
        store = await Store.open(config.database, read_only=True)
        try:
            return await store.orphaned_orders(config.providers)
        finally:
            await store.close()

    orphaned = asyncio.run(read())
    if orphaned is None:
        print(
            f"note: database {config.database} is older than this version; "
            "orders of removed providers are checked once a server has started on it",
            file=sys.stderr,
        )
        return []
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
    online, probes = asyncio.run(check_online(config))
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
    try:
        report = asyncio.run(probe.probe(args.url, args.key, call_seconds=args.timeout))
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


# --- providers -----------------------------------------------------------------------------------


def _instant(text: str) -> float:
    """An ISO date or date-time typed by the operator, as unix time (UTC unless it says)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not 0 < days < 100_000:
        raise argparse.ArgumentTypeError(f"not a positive number of days: {text!r}")
    return days


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 3600:
        raise argparse.ArgumentTypeError(f"not a number of seconds below 3600: {text!r}")
    return seconds


def _provider_json(row: ProviderReport, now: float) -> dict[str, Any]:
    balance = row.balance
    return {
        "provider": row.provider,
        "orders": row.money.orders,
        "cost": v2.format_money(row.money.cost),
        "revenue": v2.format_money(row.money.revenue),
        "margin": v2.format_money(row.money.margin),
        "cost_estimated_orders": row.money.estimated,  # no status yet: costed at catalogue rate
        "uncosted_orders": row.money.uncosted,  # neither: not in `cost`
        "add_attempts": row.add_attempts,
        "add_success_rate": row.add_success_rate,
        "calls": row.latency.calls,
        "latency_p50": row.latency.p50,
        "latency_p95": row.latency.p95,
        "state": row.state,
        "benched_until": _when(row.benched_until),
        "benched_from": None if row.benched_from is None else v2.format_money(row.benched_from),
        "probe_at": _when(row.probe_at),
        "catalogue_fetched_at": _when(row.catalogue.fetched_at) if row.catalogue else None,
        "routes_gone": list(row.routes_gone),
        "balance": None
        if balance is None
        else {
            "amount": v2.format_money(balance.balance),
            "currency": balance.currency,
            "read_at": _when(balance.read_at),
            "age_seconds": round(now - balance.read_at, 3),
        },
    }


def _provider_cells(row: ProviderReport, now: float) -> dict[str, str]:
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f}ms"

    rate = row.add_success_rate
    state = row.state
    if row.benched_until is not None and row.benched_from is not None:
        state = f"benched from {v2.format_money(row.benched_from)} until {_when(row.benched_until)}"
    if row.probe_at is not None:
        state += f" (probed from {_when(row.probe_at)})"
    if row.routes_gone:
        state += f"; gone: {', '.join(map(str, row.routes_gone))}"
    balance = row.balance
    return {
        "provider": row.provider,
        "orders": str(row.money.orders),
        "cost": v2.format_money(row.money.cost) + ("*" if row.money.estimated else ""),
        "revenue": v2.format_money(row.money.revenue),
        "margin": v2.format_money(row.money.margin),
        "add ok": "-" if rate is None else f"{rate:.1%} of {row.add_attempts}",
        "p50": ms(row.latency.p50),
        "p95": ms(row.latency.p95),
        "state": state,
        "balance": "-"
        if balance is None
        else f"{v2.format_money(balance.balance)} {balance.currency} "
        f"({_age(now - balance.read_at)} ago)",
    }


def cmd_providers(args: argparse.Namespace) -> int:
    config = load_config(args)
    now = time.time()
    until = args.until
    # The last N days (REPORT_DAYS unless told) before the period's end: a report of all time
    # is `--since 1970-01-01`.
    days = REPORT_DAYS if args.days is None and args.since is None else args.days
    since = (now if until is None else until) - days * 86400 if days is not None else args.since
    rows = asyncio.run(
        with_store(
            config,
            lambda store: provider_report(
                config,
                store,
                since=0.0 if since is None else since,
                until=math.inf if until is None else until,
                now=now,
            ),
        )
    )
    if args.json:
        document = {
            "currency": config.currency,
            "since": _when(since),
            "until": _when(until),
            "providers": [_provider_json(row, now) for row in rows],
        }
        print(json.dumps(document))
        return 0
    cells = [_provider_cells(row, now) for row in rows]
    print_table(cells, list(cells[0]) if cells else ["provider"])
    if any(row.money.estimated for row in rows):
        print("* includes orders without a status yet, costed at the catalogue rate")
    if any(row.money.uncosted for row in rows):
        print("some orders have no cost yet and no catalogue rate: not in cost or margin")
    return 0


# --- routes --------------------------------------------------------------------------------------

_DRAWN: Final = {
    "weighted": "each order draws its first route by weight; shown: the heaviest first",
    "quality": f"{EXPLORE_SHARE:.0%} of orders try another route first; shown: by score",
}


def _exact(amount: int | None) -> str | None:
    """Money to the minor unit ("0.45000"), as `routes` shows costs and margins."""
    return None if amount is None else str(v2.from_minor(amount))


def routes_json(report: RouteReport) -> dict[str, Any]:
    """`routes --json`: DESIGN.md's document, the routes in the order they would be tried."""
    return {
        "service": report.service.id,
        "strategy": str(report.plan.strategy),
        "config_version": report.config_version,
        "routes": [
            {
                "provider": step.route.provider,
                "service": step.route.service,
                "state": str(step.state),
                "upstream_cost": _exact(step.upstream_cost),
                "margin": _exact(step.margin),
                "eligible": step.eligible,
                "reason": None if step.reason is None else str(step.reason),
            }
            for step in report.plan.steps
        ],
    }


def cmd_routes(args: argparse.Namespace) -> int:
    config = load_config(args)

    async def report(store: Store) -> RouteReport:
        return await route_report(config, store, args.service, quantity=args.quantity)

    try:
        found = asyncio.run(with_store(config, report))
    except ReportRefused as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(routes_json(found)))
        return 0
    service, plan = found.service, found.plan
    print(
        f"service {service.id} ({service.name}): {plan.strategy}; {found.quantity} for "
        f"{v2.format_money(found.charge)} {config.currency}; config {found.config_version or '-'}"
    )
    rows = []
    for position, step in enumerate(plan.steps, start=1):
        key = (step.route.provider, step.route.service)
        rows.append(
            {
                "try": str(position) if step.eligible else "-",
                "provider": step.route.provider,
                "service": str(step.route.service),
                "state": str(step.state),
                "cost": _exact(step.upstream_cost) or "unknown",
                "margin": _exact(step.margin) or "-",
                "weight": "-" if step.route.weight is None else str(step.route.weight),
                "score": f"{found.scores[key]:.3f}" if key in found.scores else "-",
                "reason": "-" if step.reason is None else str(step.reason),
            }
        )
    columns = ["try", "provider", "service", "state", "cost", "margin", "reason"]
    if plan.strategy == "weighted":
        columns.insert(-1, "weight")
    if plan.strategy == "quality":
        columns.insert(-1, "score")
    print_table(rows, columns)
    if found.drawn:
        print(f"{plan.strategy}: {_DRAWN[str(plan.strategy)]}")
    if not plan.to_try:
        print("no route may take it now: an order gets `Service temporarily unavailable`")
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


# --- orders --------------------------------------------------------------------------------------


def _when(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _age(seconds: float) -> str:
    """An age a person reads at a glance: 3d4h, 2h5m, 7m12s, 40s."""
    total = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if total >= size:
            return f"{total // size}{unit}{total % size // sub_size}{sub}"
    return f"{total // 60}m{total % 60}s" if total >= 60 else f"{total}s"


def _cell(value: object) -> str:
    """A table cell on one line (upstream error texts can be whole HTML pages)."""
    return "-" if value is None else " ".join(str(value).split())


def _operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment or the password database
        return "operator"


def _order_json(order: Order, reseller: str | None) -> dict[str, Any]:
    return {
        "id": order.id,
        "reseller_id": order.reseller_id,
        "reseller": reseller,
        "service": order.service,
        "state": order.state,
        "status": reseller_status(order),  # what the reseller's `status` answers
        "link": order.link,
        "quantity": order.quantity,
        "charge": v2.format_money(order.charge),
        "provider": order.provider,
        "upstream_service": order.upstream_service,
        "upstream_order": order.upstream_order,
        "start_count": order.start_count,
        "remains": order.remains,
        "created_at": _when(order.created_at),
        "request_id": order.request_id,  # the reseller's own ID for its `add`, or None
        "config_version": order.config_version,  # of the config that routed it
    }


async def order_report(store: Store, order_id: int) -> dict[str, Any]:
    """`orders show`: the order, why it is held (null unless held), its attempts, its
    history and its ledger rows."""
    order = await store.order(order_id)
    if order is None:
        raise CommandError(f"no order {order_id}")
    attempts = await store.attempts(order_id)
    held = held_reason(order, attempts)
    return {
        "order": _order_json(order, await store.reseller_name(order.reseller_id)),
        "held": None if held is None else {"interrupted": held.interrupted, "reason": held.reason},
        "attempts": [
            {
                "rank": a.rank,
                "provider": a.provider,
                "upstream_service": a.upstream_service,
                "started_at": _when(a.started_at),
                "latency": round(a.latency, 3),
                "outcome": a.outcome,
                "upstream_order": a.upstream_order,
                "error": a.error,
            }
            for a in attempts
        ],
        "events": [
            {"at": _when(e.at), "kind": e.kind, "status": e.status, "detail": e.detail}
            for e in await store.order_history(order_id)
        ],
        "ledger": [
            {
                "id": entry.id,
                "kind": entry.kind,
                "amount": v2.format_money(entry.amount),
                "note": entry.note,
                "at": _when(entry.created_at),
            }
            for entry in await store.order_ledger(order_id)
        ],
    }


@contextlib.asynccontextmanager
async def operator_desk(config: Config, store: Store) -> AsyncIterator[OrderDesk]:
    """An order desk with the operator's own HTTP session, for resolving held orders.

    It routes as the server does, on the fleet as the store shows it (router.fleet): breakers,
    funds benches, catalogue costs, spend caps. Its upstream calls are recorded like the
    server's (they count in provider statistics), and so are its breaker transitions.
    """
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
    config = load_config(args)
    held = asyncio.run(with_store(config, lambda store: store.held_orders()))
    now = time.time()
    documents = [
        {
            "id": h.id,
            "reseller_id": h.reseller_id,
            "reseller": h.reseller,
            "service": h.service,
            "provider": h.provider,
            "upstream_service": h.upstream_service,
            "charge": v2.format_money(h.charge),
            "created_at": _when(h.created_at),
            "held_at": _when(h.held_at),
            "age_seconds": max(int(now - h.created_at), 0),
            "error": h.error,
        }
        for h in held
    ]
    if args.json:
        print(json.dumps(documents))
    elif not documents:
        print("no held orders")
    else:
        rows = [
            {
                **d,
                "held_on": f"{h.provider} service {h.upstream_service}",
                "age": _age(now - h.created_at),
                "error": _cell(h.error or "no answer recorded: the upstream may hold it"),
            }
            for h, d in zip(held, documents, strict=True)
        ]
        print_table(rows, ["id", "reseller", "service", "held_on", "charge", "age", "error"])
    return 0


def cmd_orders_show(args: argparse.Namespace) -> int:
    config = load_config(args)
    report = asyncio.run(with_store(config, lambda store: order_report(store, args.id)))
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
        rows = [{c: _cell(row[c]) for c in columns} for row in report[name]]
        if rows:
            print_table(rows, columns)
        else:
            print("  (none)")
    return 0


def operator_action(config: Config, act: Callable[[OrderDesk], Awaitable[Order]]) -> dict[str, Any]:
    """Run one operator action on an order with the operator's desk: the order as JSON after it
    (with what it was refunded); a refused action is a CommandError."""

    async def run(store: Store) -> dict[str, Any]:
        async with operator_desk(config, store) as desk:
            order = await act(desk)
        document = _order_json(order, await store.reseller_name(order.reseller_id))
        document["refunded"] = v2.format_money(order.refunded)
        return document

    try:
        return asyncio.run(with_store(config, run))
    except ResolveRefused as exc:
        raise CommandError(str(exc)) from exc


def cmd_orders_resolve(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.configure()  # a re-route logs as `add` does, on stderr: stdout stays the answer
    by = args.by or _operator()

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
    by = args.by or _operator()

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


# --- sim, demo -----------------------------------------------------------------------------------


def cmd_sim(args: argparse.Namespace) -> int:
    from router import sim

    run_until_signal(sim.serve_from_args(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from router import demo

    config = load_config(args)
    logs.configure()
    run_until_signal(demo.run(config, port=args.port))
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"not a port from 1 to {MAX_PORT}: {text!r}")
    return port


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smm-router", description="One SMM panel API v2 in front of ranked upstreams."
    )
    parser.add_argument("--version", action="version", version=f"smm-router {__version__}")
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
    command(
        commands,
        "reload",
        cmd_reload,
        "make the running server re-read its config (SIGHUP through <database>.pid)",
    )
    check = command(commands, "check", cmd_check, "validate the config; print every problem")
    check.add_argument(
        "--online", action="store_true", help="then call every provider and check each route"
    )
    checker = commands.add_parser(
        "probe",
        help="check that a v2 server answers as V2.md says (read-only and refused calls)",
        description="Check that a v2 server (an upstream about to be added) answers services, "
        "balance, an unknown order's status and a refused add as V2.md says. It only reads, "
        "or asks for what every panel refuses. Exit 1 on any deviation.",
    )
    checker.add_argument("url", metavar="URL", help="the server's v2 endpoint")
    checker.add_argument("--key", required=True, help="the API key of our account there")
    checker.add_argument(
        "--timeout",
        type=_seconds,
        default=config_module.DEFAULT_UPSTREAM_TIMEOUT,
        help="seconds for each call (default: %(default)g)",
    )
    checker.add_argument("--json", action="store_true", help="print one JSON document")
    checker.set_defaults(handler=cmd_probe)
    providers = command(
        commands, "providers", cmd_providers, "per provider: orders, money, health, state, balance"
    )
    period = providers.add_mutually_exclusive_group()
    period.add_argument(
        "--since", type=_instant, help=f"ISO date or time (default: {REPORT_DAYS} days ago)"
    )
    period.add_argument(
        "--days", type=_days, help=f"the N days before --until (default: {REPORT_DAYS})"
    )
    providers.add_argument("--until", type=_instant, help="ISO date or time (default: now)")
    routes = command(
        commands, "routes", cmd_routes, "the plan a new order on SERVICE would get now, and why"
    )
    routes.add_argument("service", type=int, metavar="SERVICE", help="a local service ID")
    routes.add_argument(
        "--quantity", type=int, metavar="N", help="the order's quantity (default: its min)"
    )

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

    orders = commands.add_parser("orders", help="held orders and their resolution")
    order_commands = orders.add_subparsers(dest="orders_command", required=True, metavar="ACTION")
    command(order_commands, "held", cmd_orders_held, "orders whose upstream outcome is unknown")
    show = command(
        order_commands, "show", cmd_orders_show, "an order, its attempts, history and ledger rows"
    )
    show.add_argument("id", type=int, metavar="ID")
    resolve = command(
        order_commands, "resolve", cmd_orders_resolve, "attach, re-route or refund a held order"
    )
    resolve.add_argument("id", type=int, metavar="ID")
    how = resolve.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--upstream-order", type=int, metavar="N", help="attach the order found at its provider"
    )
    how.add_argument("--reroute", action="store_true", help="place it now on the next routes")
    how.add_argument("--refund", action="store_true", help="cancel it and refund its charge")
    resolve.add_argument("--by", help="who resolves it, for its history (default: the OS user)")
    refund = command(
        order_commands,
        "refund",
        cmd_orders_refund,
        "refund part or all of an order that ended upstream (a package ended Partial, ...)",
    )
    refund.add_argument("id", type=int, metavar="ID")
    refund.add_argument("amount", help="what to give back, e.g. 1.25")
    refund.add_argument("--note", default="refund by the operator", help="the ledger row's note")
    refund.add_argument("--by", help="who refunds it, for its history (default: the OS user)")

    sim_parser = commands.add_parser(
        "sim", help="run one simulated upstream provider", description="A simulated v2 provider."
    )
    from router import sim

    sim.add_arguments(sim_parser)
    sim_parser.set_defaults(handler=cmd_sim)
    demo = command(commands, "demo", cmd_demo, "simulated providers + the router + a demo reseller")
    demo.add_argument(
        "--port",
        type=_port,
        metavar="N",
        help="the router's API port; metrics then listen on N+1 and the simulated providers on "
        "N+2, N+3, ... (default: the config's ports)",
    )
    return parser


def _remedy(fix: str | None, setting: str, args: argparse.Namespace) -> str:
    """What to do about a failure: `fix` it, or change the setting that led to it."""
    if setting.startswith("--"):
        change = f"pass another {setting}"
    else:
        change = f"set {setting} in {config_path(args)}"
    return f"{fix} or {change}" if fix else change


def _unreadable_config(exc: ConfigUnreadable, args: argparse.Namespace) -> str:
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
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ListenError as exc:
        problem = f"{exc}; {_remedy(exc.fix, exc.setting, args)}"
        if args.command == "demo" and args.port is None:
            problem += ", or pass --port N to move all the demo's ports"
    except DatabaseUnavailable as exc:
        problem = (
            f"cannot open the database {exc.path} (database): {exc.reason}; "
            f"{_remedy(exc.fix, 'database', args)}"
        )
    except ConfigUnreadable as exc:
        problem = _unreadable_config(exc, args)
    except (CommandError, StoreError) as exc:
        problem = str(exc)
    print(f"smm-router: {problem}", file=sys.stderr)
    return 1
