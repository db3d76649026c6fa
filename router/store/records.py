"""What the store returns: frozen dataclasses, one per kind of row."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final, NamedTuple


@dataclass(frozen=True, slots=True)
class Reseller:
    id: int
    name: str
    enabled: bool
    balance: int  # minor units


@dataclass(frozen=True, slots=True)
class ResellerSummary:
    id: int
    name: str
    enabled: bool
    balance: int
    orders: int
    ledger_sum: int


@dataclass(frozen=True, slots=True)
class NewOrder:
    reseller_id: int
    service: int
    link: str
    quantity: int
    charge: int
    params: Mapping[str, str]
    provider: str  # the first route to try, recorded before the call so a crash leaves a trace
    upstream_service: int
    request_id: str | None = None  # the reseller's own ID for this `add` (v2.check_request_id)
    config_version: str | None = None  # Config.version of the config that planned it


@dataclass(frozen=True, slots=True)
class Order:
    id: int
    reseller_id: int
    service: int
    state: str
    status: str
    link: str
    quantity: int
    charge: int
    params_json: str  # the type-specific parameters sent upstream, as stored
    provider: str | None
    upstream_service: int | None
    upstream_order: int | None
    start_count: int | None
    remains: int | None
    created_at: float
    refunded: int = 0  # minor units given back by the ledger (the status sync's refunds, ...)
    request_id: str | None = None  # the reseller's own ID for the `add` that made it
    config_version: str | None = None  # the config that planned it; None: before 0009

    @property
    def params(self) -> Mapping[str, str]:
        """Decoded when asked: `status` reads up to 100 orders and never needs them."""
        params: dict[str, str] = json.loads(self.params_json)
        return params


class OrderStatus(NamedTuple):
    """What a reseller's `status` shows of one of its orders (router.api.order_json).

    A named tuple rather than a frozen dataclass: `status` makes up to 100 per request straight
    from the rows of one index (Store.order_statuses), and a tuple is built in a fifth of the
    time a frozen dataclass' `__init__` takes.
    """

    id: int
    state: str
    status: str
    quantity: int
    charge: int
    refunded: int
    start_count: int | None
    remains: int | None
    runs: str | None  # a drip-feed order's runs, from its params (migration 0013)


@dataclass(frozen=True, slots=True)
class Attempt:
    rank: int
    provider: str
    upstream_service: int
    started_at: float
    latency: float
    outcome: str
    error: str | None = None
    upstream_order: int | None = None
    cost: int | None = None  # the order's upstream cost on this route as planned; None: unknown


@dataclass(frozen=True, slots=True)
class Refill:
    id: int
    order_id: int
    reseller_id: int
    provider: str
    upstream_refill: int
    status: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    reseller_id: int
    order_id: int | None
    kind: str
    amount: int
    note: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class HeldOrder:
    """A held order as the operator lists it (`smm-router orders held`)."""

    id: int
    reseller_id: int
    reseller: str
    service: int
    provider: str | None  # the route it was held on
    upstream_service: int | None
    charge: int
    created_at: float
    held_at: float
    error: str | None  # the held-on route's last answer; None when the process died mid-call


@dataclass(frozen=True, slots=True)
class HeldAges:
    """Held orders by age, for /metrics (Store.held_ages)."""

    count: int
    at_least: tuple[int, ...]  # how many are at least each of the asked ages old
    oldest_created_at: float | None  # unix time of the oldest one's `add`; None: none held


@dataclass(frozen=True, slots=True)
class OrderEvent:
    at: float
    kind: str
    status: str | None
    detail: str | None


# Status sync: what the status loop reads and writes (the Store's "Status sync" section).

_ACTIVE_ORDER: Final = "state = 'placed' AND status NOT IN ('Completed', 'Partial', 'Canceled')"
_OPEN_REFILL: Final = "status NOT IN ('Completed', 'Rejected')"


@dataclass(frozen=True, slots=True)
class ActiveOrder:
    """An order the status loop refreshes, as it was read before the upstream was asked."""

    id: int
    upstream_order: int
    quantity: int  # the charged quantity
    charge: int
    status: str
    created_at: float
    next_check_at: float
    sync_problem: str | None
    service: int  # local service ID
    cost: int | None = None  # recorded by an earlier answer; None: not yet
    estimated_cost: int | None = None  # as planned (counted in the day's spend until `cost`)


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """What one status answer says about one order, for `Store.record_statuses`."""

    order_id: int
    seen_status: str  # the status read before asking: the change applies only from it
    status: str | None  # the new v2 status; None when the answer could not be read
    next_check_at: float
    start_count: int | None = None
    remains: int | None = None
    cost: int | None = None  # minor units of the config's currency
    upstream_charge: str | None = None
    upstream_currency: str | None = None
    refund: int = 0  # minor units, paid when (and only when) this record ends the order
    detail: str | None = None  # JSON for the 'status' event
    problem: str | None = None  # what could not be read, for an 'unknown_status' event...
    seen_problem: str | None = None  # ...unless it is the one recorded last time


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status change `record_statuses` made, and the refund it paid (0: none)."""

    order_id: int
    status: str
    refunded: int
    refund_refused: bool = False  # a refund was due but the ledger already had one


@dataclass(frozen=True, slots=True)
class OpenRefill:
    id: int
    upstream_refill: int
    status: str


@dataclass(frozen=True, slots=True)
class OpenWork:
    """What may still need a provider's client (a provider removed by a config reload is
    synced until none is left: router.sync.orders)."""

    orders: int  # its orders not ended: placed and still active, being placed, or held
    refills: int  # its refills whose outcome is still open
    placing: int  # orders of any provider being placed since before the time asked: the
    # plans they started with may still go on to it

    @property
    def idle(self) -> bool:
        return not (self.orders or self.refills or self.placing)


@dataclass(frozen=True, slots=True)
class OrderSyncState:
    """The status loop's bookkeeping of one order."""

    checked_at: float | None
    next_check_at: float
    cost: int | None
    upstream_charge: str | None
    upstream_currency: str | None
    refunded: int
    sync_problem: str | None


_ORDER_COLUMNS: Final = (
    "id, reseller_id, service, state, status, link, quantity, charge, params, provider, "
    "upstream_service, upstream_order, start_count, remains, created_at, refunded, request_id, "
    "config_version"
)

# In orders_status's column order (migration 0013): the index alone answers.
_STATUS_COLUMNS: Final = "id, state, status, quantity, charge, refunded, start_count, remains, runs"


def _order(row: sqlite3.Row) -> Order:
    return Order(
        id=row[0],
        reseller_id=row[1],
        service=row[2],
        state=row[3],
        status=row[4],
        link=row[5],
        quantity=row[6],
        charge=row[7],
        params_json=row[8],
        provider=row[9],
        upstream_service=row[10],
        upstream_order=row[11],
        start_count=row[12],
        remains=row[13],
        created_at=row[14],
        refunded=row[15],
        request_id=row[16],
        config_version=row[17],
    )


# --- Providers: balances, catalogues, reports (records) ----------------------------------------


def _estimate(milli: int, to_base: Decimal) -> int:
    """`milli` (1000 x minor units of a provider's currency) in minor units of the base one."""
    return int((Decimal(milli) * to_base / 1000).to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class BalanceRead:
    provider: str
    balance: int  # minor units of `currency`
    currency: str
    read_at: float  # unix time the read was sent


@dataclass(frozen=True, slots=True)
class Refusal:
    """A `Not enough funds` answer to an `add` (Store.no_funds_refusals)."""

    started_at: float  # unix time the call was sent
    at: float  # unix time the answer came back
    cost: int | None  # the order's upstream cost there, as planned; None: unknown


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    provider: str
    at: float  # unix time
    state: str  # 'open' (opened or reopened) or 'healthy' (a probe closed it)


@dataclass(frozen=True, slots=True)
class FinalOutcomes:
    """The final outcomes of one (provider, upstream service) over a period."""

    provider: str
    upstream_service: int
    completed: int
    partial: int
    canceled: int
    partial_delivered: float  # the sum, over the Partial ones, of their delivered share


@dataclass(frozen=True, slots=True)
class CatalogueFetch:
    provider: str
    fetched_at: float  # unix time of the last usable catalogue
    services: int  # its size


@dataclass(frozen=True, slots=True)
class RouteListing:
    """What a provider's catalogue says of one upstream service that a route points at."""

    provider: str
    service: int
    present: bool  # False: the last usable catalogue did not list it (terms: the last known)
    name: str | None = None
    type: str | None = None
    rate: int | None = None  # per 1000 (per order for flat types), minor units, its currency
    min: int | None = None
    max: int | None = None
    refill: bool | None = None
    cancel: bool | None = None
    dripfeed: bool | None = None
    seen_at: float | None = None
    checked_at: float | None = None


@dataclass(frozen=True, slots=True)
class ProviderMargin:
    provider: str
    orders: int  # placed at the provider
    revenue: int  # what resellers paid: charges minus refunds, minor units
    cost: int  # recorded upstream costs, else planned ones, else catalogue estimates
    estimated: int  # orders whose cost is an estimate: as planned, or at the catalogue rate
    uncosted: int  # orders with no recorded, planned or catalogue cost (not in `cost`)

    @property
    def margin(self) -> int:
        return self.revenue - self.cost


@dataclass(frozen=True, slots=True)
class ProviderTotals:
    """A provider's money since its first order, minor units of `currency`; each only grows.

    Over the orders placed at it: `revenue`, their charges; `refunded`, the ledger's refunds of
    them (revenue - refunded is what resellers paid); `cost`, the rises of their recorded
    upstream cost, `cost_returned` its falls (cost - cost_returned is the sum of their costs).
    """

    provider: str
    revenue: int
    refunded: int
    cost: int
    cost_returned: int


@dataclass(frozen=True, slots=True)
class OrderMargin:
    order_id: int
    provider: str | None
    charge: int
    refunded: int
    cost: int | None  # recorded, else as planned, else at the catalogue rate; None: none
    cost_estimated: bool

    @property
    def revenue(self) -> int:
        return self.charge - self.refunded

    @property
    def margin(self) -> int | None:
        return None if self.cost is None else self.revenue - self.cost


@dataclass(frozen=True, slots=True)
class CallLatency:
    calls: int
    p50: float | None  # seconds
    p95: float | None
