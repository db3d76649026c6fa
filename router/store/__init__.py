"""Every SQL statement of the router, by noun: one `Store` is the entry point to all of it.

Usage::

    store = await Store.open(config.database)
    order_id = await store.reserve_order(new_order)   # None: not enough funds
    await store.close()

The modules: `database` (connections, migrations, `write`: the write path), `writer` (the
one writer: its thread group-commits every write queued), `records` (the dataclasses
the store returns), `resellers` (resellers and the ledger), `orders` (reserve, settle, look up),
`held` (the operator's resolutions), `sync` (refills and the status sync), `calls` (upstream
call records, their rollups, latency), `providers` (balances, breaker transitions, spend,
catalogues), `reports` (providers' money, margins). Money is integer minor units
(router.v2.MINOR_PER_UNIT).
The invariants that matter (balance never below zero, balance = sum of the ledger, one refund
per order) are enforced by the schema itself, so neither a race nor the CLI can break them.
"""

from __future__ import annotations

from router.store.calls import (
    CALL_BATCH_ROWS,
    CALL_LATENCY_BUCKETS,
    CALL_RAW_RETENTION_SECONDS,
    CallStore,
)
from router.store.database import (
    BUSY_TIMEOUT_MS,
    CALL_RETENTION_SECONDS,
    SETTLE_RETRY,
    DatabaseUnavailable,
    DuplicateRequest,
    NotStored,
    SqlTrace,
    StoreError,
    UpstreamOrderTaken,
    WriteRetry,
    owner_alive,
    process_owner,
)
from router.store.held import HeldStore
from router.store.providers import ProviderStore
from router.store.records import (
    ActiveOrder,
    Attempt,
    BalanceRead,
    BreakerEvent,
    CallLatency,
    CatalogueFetch,
    FinalOutcomes,
    HeldAges,
    HeldOrder,
    LedgerEntry,
    NewOrder,
    OpenRefill,
    OpenWork,
    Order,
    OrderEvent,
    OrderMargin,
    OrderStatus,
    OrderSyncState,
    ProviderMargin,
    ProviderTotals,
    Refill,
    Refusal,
    Reseller,
    ResellerSummary,
    RouteListing,
    StatusChange,
    StatusRecord,
)
from router.store.reports import ReportStore
from router.store.resellers import ResellerStore
from router.store.sync import SyncStore
from router.store.writer import MAX_BATCH, WAL_RETRY_SECONDS, Job, Statement, WriterClosed

__all__ = [
    "BUSY_TIMEOUT_MS",
    "CALL_BATCH_ROWS",
    "CALL_LATENCY_BUCKETS",
    "CALL_RAW_RETENTION_SECONDS",
    "CALL_RETENTION_SECONDS",
    "MAX_BATCH",
    "SETTLE_RETRY",
    "WAL_RETRY_SECONDS",
    "ActiveOrder",
    "Attempt",
    "BalanceRead",
    "BreakerEvent",
    "CallLatency",
    "CatalogueFetch",
    "DatabaseUnavailable",
    "DuplicateRequest",
    "FinalOutcomes",
    "HeldAges",
    "HeldOrder",
    "Job",
    "LedgerEntry",
    "NewOrder",
    "NotStored",
    "OpenRefill",
    "OpenWork",
    "Order",
    "OrderEvent",
    "OrderMargin",
    "OrderStatus",
    "OrderSyncState",
    "ProviderMargin",
    "ProviderTotals",
    "Refill",
    "Refusal",
    "Reseller",
    "ResellerSummary",
    "RouteListing",
    "SqlTrace",
    "Statement",
    "StatusChange",
    "StatusRecord",
    "Store",
    "StoreError",
    "UpstreamOrderTaken",
    "WriteRetry",
    "WriterClosed",
    "owner_alive",
    "process_owner",
]


class Store(ResellerStore, HeldStore, SyncStore, CallStore, ProviderStore, ReportStore):
    """The router's SQLite database. Open with `await Store.open(path)`."""
