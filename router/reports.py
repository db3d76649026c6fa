"""The operator's reports on resellers and held orders, as documents read from the store.

Each function returns what `--json` prints (DESIGN.md's shapes); the CLI prints the same rows as
a table. Usage::

    rows = await clients_report(store)        # `smm-router clients list`
    held = await held_report(store, time.time())  # `smm-router orders held`

Light on purpose: a report command imports this, the config and the store, never aiohttp.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from router import v2

if TYPE_CHECKING:
    from router.store import Store


REPORT_DAYS: Final = 30  # `smm-router providers` without --since or --days: the last 30 days


def when(at: float | None) -> str | None:
    """A moment as reports show it: ISO 8601 in UTC, to the second (None stays None)."""
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


async def clients_report(store: Store) -> list[dict[str, Any]]:
    """`clients list`: every reseller with its balance and its number of orders."""
    return [
        {
            "id": r.id,
            "name": r.name,
            "enabled": r.enabled,
            "balance": v2.format_money(r.balance),
            "orders": r.orders,
        }
        for r in await store.list_resellers()
    ]


async def held_report(store: Store, now: float) -> list[dict[str, Any]]:
    """`orders held`: every order whose upstream outcome is unknown, its age as of `now`."""
    return [
        {
            "id": h.id,
            "reseller_id": h.reseller_id,
            "reseller": h.reseller,
            "service": h.service,
            "provider": h.provider,
            "upstream_service": h.upstream_service,
            "charge": v2.format_money(h.charge),
            "created_at": when(h.created_at),
            "held_at": when(h.held_at),
            "age_seconds": max(int(now - h.created_at), 0),
            "error": h.error,
        }
        for h in await store.held_orders()
    ]
