"""Reports: providers' money, margins, add outcomes (call latency: router.store.calls).

Money and outcomes over a period read whole UTC days from the rollups that migration 0011's
triggers keep (with 0015's planned costs), and only the partial days at the period's edges from
the rows themselves.
"""

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
# The same for a rollup row of migration 0011: its uncosted orders at the catalogue rate (those
# with no planned cost either, since 0015).
_RATE_TIMES_UNCOSTED: Final = (
    f"CASE WHEN c.type IN ({_placeholders(len(_FLAT_TYPES))}) THEN c.rate * 1000 * d.uncosted "
    "ELSE c.rate * d.uncosted_quantity END"
)
# An order with neither a recorded cost nor a planned one (migration 0015's `uncosted`).
_UNPLANNED: Final = "coalesce(o.cost, o.estimated_cost) IS NULL"
DAY_SECONDS: Final = 86400  # a UTC day, as migration 0011 numbers them: floor(t / 86400)
_NO_LAST_DAY: Final = 2**40  # a day number past any time (a period without an end)


def _whole_days(since: float, until: float) -> tuple[int, int]:
    """The UTC days that lie wholly inside [since, until), as day numbers [first, last)
    (first >= last: none). Exact: d * DAY_SECONDS is an integer, compared with the float."""
    since = max(since, 0.0)  # no order is older than 1970: the same period
    first = math.floor(since / DAY_SECONDS)
    while first * DAY_SECONDS < since:  # the division may round either way
        first += 1
    while (first - 1) * DAY_SECONDS >= since:
        first -= 1
    if math.isinf(until):
        return first, _NO_LAST_DAY
    last = math.floor(until / DAY_SECONDS)
    while last * DAY_SECONDS > until:
        last -= 1
    while (last + 1) * DAY_SECONDS <= until:
        last += 1
    return first, last


def _edges(since: float, until: float, first: int, last: int) -> list[tuple[float, float]]:
    """The parts of [since, until) outside the whole days [first, last): read from the rows."""
    if first >= last:
        return [(since, until)] if since < until else []
    edges = []
    if since < first * DAY_SECONDS:
        edges.append((since, float(first * DAY_SECONDS)))
    if last != _NO_LAST_DAY and last * DAY_SECONDS < until:
        edges.append((float(last * DAY_SECONDS), until))
    return edges


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
        An order without a recorded cost (no status yet) is costed at the cost its route was
        planned at when it was placed (`estimated_cost`, already in the config's currency):
        what the provider charged then, whatever its rates are now. Only an order without that
        either (imported, or from before it was recorded) is costed at its upstream rate in the
        stored catalogue; one without any of them is counted in `uncosted` and costs nothing
        here. `estimated` counts the orders costed by either estimate.

        The whole UTC days of the period are read from migration 0011's rollup (a row per day
        and route; its planned costs since 0015), the partial days at its edges from the orders
        themselves by their creation time (orders_by_provider): the same figures as summing
        every order of the period.
        """
        first, last = _whole_days(since, until)
        sums = [0] * 6
        if first < last:
            rows = await self._reader.execute_fetchall(
                f"SELECT coalesce(sum(d.orders), 0), coalesce(sum(d.revenue), 0), "
                f"coalesce(sum(d.cost + d.planned_cost), 0), "
                f"coalesce(sum(d.planned + CASE WHEN c.rate IS NOT NULL THEN d.uncosted "
                f"ELSE 0 END), 0), "
                f"coalesce(sum({_RATE_TIMES_UNCOSTED}), 0), "
                f"coalesce(sum(CASE WHEN c.rate IS NULL THEN d.uncosted END), 0) "
                f"FROM provider_order_days d LEFT JOIN route_catalogue c "
                f"ON c.provider = d.provider AND c.service = d.upstream_service "
                f"WHERE d.provider = ? AND d.day >= ? AND d.day < ?",
                (*_FLAT_TYPES, provider, first, last),
            )
            sums = [a + b for a, b in zip(sums, rows[0], strict=True)]  # type: ignore[index]
        for start, end in _edges(since, until, first, last):
            rows = await self._reader.execute_fetchall(
                f"SELECT count(*), coalesce(sum(o.charge - o.refunded), 0), "
                f"coalesce(sum(coalesce(o.cost, o.estimated_cost)), 0), "
                f"coalesce(sum(o.cost IS NULL "
                f"AND coalesce(o.estimated_cost, c.rate) IS NOT NULL), 0), "
                f"coalesce(sum(CASE WHEN {_UNPLANNED} THEN {_RATE_TIMES_QUANTITY} END), 0), "
                f"coalesce(sum({_UNPLANNED} AND c.rate IS NULL), 0) "
                f"FROM orders o INDEXED BY orders_by_provider LEFT JOIN route_catalogue c "
                f"ON c.provider = o.provider AND c.service = o.upstream_service "
                f"WHERE o.provider = ? AND o.created_at >= ? AND o.created_at < ? "
                f"AND o.state = 'placed'",
                (*_FLAT_TYPES, provider, start, end),
            )
            sums = [a + b for a, b in zip(sums, rows[0], strict=True)]  # type: ignore[index]
        orders, revenue, known, estimated, milli, uncosted = sums  # known: recorded or planned
        return ProviderMargin(
            provider=provider,
            orders=orders,
            revenue=revenue,
            cost=known + _estimate(milli, to_base),
            estimated=estimated,
            uncosted=uncosted,
        )

    async def order_margin(self, order_id: int, to_base: Decimal) -> OrderMargin | None:
        """One order's revenue (charge minus refunds), cost and margin; None if unknown.

        Its cost is the recorded one, else the one its route was planned at (`estimated_cost`),
        else its upstream rate in the stored catalogue (`cost_estimated` for either estimate).
        `to_base` converts the currency of the provider holding the order into the config's.
        """
        rows = await self._reader.execute_fetchall(
            f"SELECT o.id, o.provider, o.charge, o.refunded, o.cost, o.estimated_cost, "
            f"CASE WHEN c.rate IS NOT NULL THEN {_RATE_TIMES_QUANTITY} END "
            f"FROM orders o LEFT JOIN route_catalogue c "
            f"ON c.provider = o.provider AND c.service = o.upstream_service WHERE o.id = ?",
            (*_FLAT_TYPES, order_id),
        )
        if not rows:
            return None
        order, provider, charge, refunded, cost, planned, milli = rows[0]  # type: ignore[index]
        if cost is None and planned is None and milli is not None:
            planned = _estimate(milli, to_base)
        return OrderMargin(
            order_id=order,
            provider=provider,
            charge=charge,
            refunded=refunded,
            cost=planned if cost is None else cost,
            cost_estimated=cost is None and planned is not None,
        )

    async def add_outcomes(
        self, provider: str, *, since: float = 0.0, until: float = math.inf
    ) -> dict[str, int]:
        """A provider's `add` attempts started in [since, until), counted by outcome.

        Whole UTC days from migration 0011's rollup, the partial days at the edges from the
        attempts by outcome and start time (attempts_by_provider), as provider_margin does.
        """
        first, last = _whole_days(since, until)
        counts: dict[str, int] = {}
        if first < last:
            rows = await self._reader.execute_fetchall(
                "SELECT outcome, sum(attempts) FROM provider_attempt_days "
                "WHERE provider = ? AND day >= ? AND day < ? GROUP BY outcome",
                (provider, first, last),
            )
            for outcome, count in rows:
                counts[outcome] = counts.get(outcome, 0) + count
        for start, end in _edges(since, until, first, last):
            # One range of the index per outcome the provider ever had (the rollup knows them
            # all): a range on started_at alone would read every attempt of the provider.
            rows = await self._reader.execute_fetchall(
                "SELECT outcomes.outcome, (SELECT count(*) FROM attempts a "
                "INDEXED BY attempts_by_provider WHERE a.provider = ?1 "
                "AND a.outcome = outcomes.outcome AND a.started_at >= ?2 AND a.started_at < ?3) "
                "FROM (SELECT DISTINCT outcome FROM provider_attempt_days WHERE provider = ?1) "
                "outcomes",
                (provider, start, end),
            )
            for outcome, count in rows:
                counts[outcome] = counts.get(outcome, 0) + count
        return {outcome: count for outcome, count in counts.items() if count}
