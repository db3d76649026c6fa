"""Reports: providers' money, margins, add outcomes."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Final

from router import v2
from router.store.database import Database, _placeholders
from router.store.records import OrderMargin, ProviderMargin, ProviderTotals, _estimate

# An order's upstream cost at its catalogue rate, times 1000 (in minor units of the provider's
# currency): rate x quantity, or rate x 1000 for the flat types, which cost `rate` per order.
_FLAT_TYPES: Final = tuple(n for n, kind in v2.SERVICE_TYPES.items() if kind.quantity == "flat")
_RATE_TIMES_QUANTITY: Final = (
    f"CASE WHEN c.type IN ({_placeholders(len(_FLAT_TYPES))}) THEN c.rate * 1000 "
    "ELSE c.rate * o.quantity END"
)


class ReportStore(Database):
    async def provider_totals(self) -> dict[str, ProviderTotals]:
        """Each provider's money since the first order, from the totals that migration 0010's
        triggers keep as the ledger and the orders move (one row per provider ever used)."""
        rows = await self._reader.execute_fetchall(
            "SELECT provider, revenue, refunded, cost, cost_returned FROM provider_totals"
        )
        return {row[0]: ProviderTotals(*row) for row in rows}

    async def provider_margin(
        self, provider: str, to_base: Decimal, *, since: float = 0.0, until: float = math.inf
    ) -> ProviderMargin:
        """Orders placed at `provider` created in [since, until): revenue, cost and margin.

        `to_base` converts the provider's currency into the config's (`fx`; 1 for the same).
        An order without a recorded cost (no status yet) is costed at its upstream rate in the
        stored catalogue; one without either is counted in `uncosted` and costs nothing here.
        """
        rows = await self._reader.execute_fetchall(
            f"SELECT count(*), coalesce(sum(o.charge - o.refunded), 0), "
            f"coalesce(sum(o.cost), 0), "
            f"coalesce(sum(o.cost IS NULL AND c.rate IS NOT NULL), 0), "
            f"coalesce(sum(CASE WHEN o.cost IS NULL THEN {_RATE_TIMES_QUANTITY} END), 0), "
            f"coalesce(sum(o.cost IS NULL AND c.rate IS NULL), 0) "
            f"FROM orders o LEFT JOIN route_catalogue c "
            f"ON c.provider = o.provider AND c.service = o.upstream_service "
            f"WHERE o.provider = ? AND o.created_at >= ? AND o.created_at < ? "
            f"AND o.state = 'placed'",
            (*_FLAT_TYPES, provider, since, until),
        )
        orders, revenue, recorded, estimated, milli, uncosted = rows[0]  # type: ignore[index]
        return ProviderMargin(
            provider=provider,
            orders=orders,
            revenue=revenue,
            cost=recorded + _estimate(milli, to_base),
            estimated=estimated,
            uncosted=uncosted,
        )

    async def order_margin(self, order_id: int, to_base: Decimal) -> OrderMargin | None:
        """One order's revenue (charge minus refunds), cost and margin; None if unknown.

        `to_base` converts the currency of the provider holding the order into the config's.
        """
        rows = await self._reader.execute_fetchall(
            f"SELECT o.id, o.provider, o.charge, o.refunded, o.cost, "
            f"CASE WHEN c.rate IS NOT NULL THEN {_RATE_TIMES_QUANTITY} END "
            f"FROM orders o LEFT JOIN route_catalogue c "
            f"ON c.provider = o.provider AND c.service = o.upstream_service WHERE o.id = ?",
            (*_FLAT_TYPES, order_id),
        )
        if not rows:
            return None
        order, provider, charge, refunded, cost, milli = rows[0]  # type: ignore[index]
        estimated = cost is None and milli is not None
        return OrderMargin(
            order_id=order,
            provider=provider,
            charge=charge,
            refunded=refunded,
            cost=_estimate(milli, to_base) if estimated else cost,
            cost_estimated=estimated,
        )

    async def add_outcomes(
        self, provider: str, *, since: float = 0.0, until: float = math.inf
    ) -> dict[str, int]:
        """A provider's `add` attempts started in [since, until), counted by outcome."""
        rows = await self._reader.execute_fetchall(
            "SELECT outcome, count(*) FROM attempts WHERE provider = ? AND started_at >= ? "
            "AND started_at < ? GROUP BY outcome",
            (provider, since, until),
        )
        return {row[0]: row[1] for row in rows}
