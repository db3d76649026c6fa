"""One order as the operator sees it (`orders show`): the order, why it is held, its attempts, its
history and its ledger rows, as one document read from the store.

Usage::

    report = await order_report(store, order_id)  # NoSuchOrder if there is none
"""

from __future__ import annotations

from typing import Any

from router import v2
from router.orders.desk import reseller_status
from router.orders.held import held_reason
from router.reports import when
from router.store import Order, Store


class NoSuchOrder(LookupError):
    """No order has this ID."""


def order_json(order: Order, reseller: str | None) -> dict[str, Any]:
    """An order as the CLI's documents show it, `reseller` its reseller's name."""
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
        "created_at": when(order.created_at),
        "request_id": order.request_id,  # the reseller's own ID for its `add`, or None
        "config_version": order.config_version,  # of the config that routed it
    }


async def order_report(store: Store, order_id: int) -> dict[str, Any]:
    """`orders show`: the order, why it is held (null unless held), its attempts, its
    history and its ledger rows."""
    order = await store.order(order_id)
    if order is None:
        raise NoSuchOrder(f"no order {order_id}")
    attempts = await store.attempts(order_id)
    held = held_reason(order, attempts)
    return {
        "order": order_json(order, await store.reseller_name(order.reseller_id)),
        "held": None if held is None else {"interrupted": held.interrupted, "reason": held.reason},
        "attempts": [
            {
                "rank": a.rank,
                "provider": a.provider,
                "upstream_service": a.upstream_service,
                "started_at": when(a.started_at),
                "latency": round(a.latency, 3),
                "outcome": a.outcome,
                "upstream_order": a.upstream_order,
                "error": a.error,
            }
            for a in attempts
        ],
        "events": [
            {"at": when(e.at), "kind": e.kind, "status": e.status, "detail": e.detail}
            for e in await store.order_history(order_id)
        ],
        "ledger": [
            {
                "id": entry.id,
                "kind": entry.kind,
                "amount": v2.format_money(entry.amount),
                "note": entry.note,
                "at": when(entry.created_at),
            }
            for entry in await store.order_ledger(order_id)
        ],
    }
