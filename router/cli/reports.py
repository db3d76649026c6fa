"""The CLI's fleet reports: `providers` (orders, money, health per provider) and `routes` (the plan
a new order would get). The reports are assembled elsewhere (router.sync.providers,
router.fleet); here they are printed, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from router import v2
from router.cli.common import (
    CommandError,
    Commands,
    age,
    load_config,
    plain_int,
    positive_number,
    print_table,
    run,
    with_store,
)
from router.reports import REPORT_DAYS, when

if TYPE_CHECKING:
    from router.fleet import RouteReport
    from router.store import Store
    from router.sync.providers import ProviderReport

MAX_REPORT_DAYS = 100_000  # a longer `providers --days` is a typo

# --- providers -----------------------------------------------------------------------------------


def _instant(text: str) -> float:
    """An ISO date or date-time typed by the operator, as unix time (UTC unless it says)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _provider_json(row: ProviderReport, now: float) -> dict[str, Any]:
    balance = row.balance
    return {
        "provider": row.provider,
        "orders": row.money.orders,
        "cost": v2.format_money(row.money.cost),
        "revenue": v2.format_money(row.money.revenue),
        "margin": v2.format_money(row.money.margin),
        "cost_estimated_orders": row.money.estimated,  # no status yet: as planned, or catalogue
        "uncosted_orders": row.money.uncosted,  # neither: not in `cost`
        "add_attempts": row.add_attempts,
        "add_success_rate": row.add_success_rate,
        "calls": row.latency.calls,
        "latency_p50": row.latency.p50,
        "latency_p95": row.latency.p95,
        "state": row.state,
        "benched_until": when(row.benched_until),
        "benched_from": None if row.benched_from is None else v2.format_money(row.benched_from),
        "probe_at": when(row.probe_at),
        "catalogue_fetched_at": when(row.catalogue.fetched_at) if row.catalogue else None,
        "routes_gone": list(row.routes_gone),
        "balance": None
        if balance is None
        else {
            "amount": v2.format_money(balance.balance),
            "currency": balance.currency,
            "read_at": when(balance.read_at),
            "age_seconds": round(now - balance.read_at, 3),
        },
    }


def _provider_cells(row: ProviderReport, now: float) -> dict[str, str]:
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f}ms"

    rate = row.add_success_rate
    state = row.state
    if row.benched_until is not None and row.benched_from is not None:
        state = f"benched from {v2.format_money(row.benched_from)} until {when(row.benched_until)}"
    if row.probe_at is not None:
        state += f" (probed from {when(row.probe_at)})"
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
        f"({age(now - balance.read_at)} ago)",
    }


def cmd_providers(args: argparse.Namespace) -> int:
    from router.sync.providers import provider_report

    config = load_config(args)
    now = time.time()
    until = args.until
    # The last N days (REPORT_DAYS unless told) before the period's end: a report of all time
    # is `--since 1970-01-01`.
    days = REPORT_DAYS if args.days is None and args.since is None else args.days
    since = (now if until is None else until) - days * 86400 if days is not None else args.since
    rows = run(
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
            "since": when(since),
            "until": when(until),
            "providers": [_provider_json(row, now) for row in rows],
        }
        print(json.dumps(document))
        return 0
    cells = [_provider_cells(row, now) for row in rows]
    print_table(cells, list(cells[0]) if cells else ["provider"])
    if any(row.money.estimated for row in rows):
        print("* includes orders without a status yet, costed as planned or at the catalogue rate")
    if any(row.money.uncosted for row in rows):
        print("some orders have no cost yet and no catalogue rate: not in cost or margin")
    return 0


# --- routes --------------------------------------------------------------------------------------


def _drawn(strategy: str) -> str:
    """How a strategy that draws orders the first route, and what `routes` shows for it."""
    from router.routing import EXPLORE_SHARE

    return {
        "weighted": "each order draws its first route by weight; shown: the heaviest first",
        "quality": f"{EXPLORE_SHARE:.0%} of orders try another route first; shown: by score",
    }[strategy]


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
    from router.fleet import ReportRefused, route_report

    config = load_config(args)

    async def report(store: Store) -> RouteReport:
        return await route_report(config, store, args.service, quantity=args.quantity)

    try:
        found = run(with_store(config, report))
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
        print(f"{plan.strategy}: {_drawn(str(plan.strategy))}")
    if not plan.to_try:
        print("no route may take it now: an order gets `Service temporarily unavailable`")
    return 0


def add_report_commands(commands: Commands) -> None:
    """providers, routes."""
    providers = commands.add(
        "providers", cmd_providers, "per provider: orders, money, health, state, balance"
    )
    period = providers.add_mutually_exclusive_group()
    period.add_argument(
        "--since", type=_instant, help=f"ISO date or time (default: {REPORT_DAYS} days ago)"
    )
    period.add_argument(
        "--days",
        type=positive_number(MAX_REPORT_DAYS, "not a positive number of days"),
        help=f"the N days before --until (default: {REPORT_DAYS})",
    )
    providers.add_argument("--until", type=_instant, help="ISO date or time (default: now)")
    routes = commands.add(
        "routes", cmd_routes, "the plan a new order on SERVICE would get now, and why"
    )
    routes.add_argument(
        "service", type=plain_int(v2.MAX_ID), metavar="SERVICE", help="a local service ID"
    )
    routes.add_argument(
        "--quantity",
        type=plain_int(v2.MAX_QUANTITY),
        metavar="N",
        help="the order's quantity (default: its min)",
    )
