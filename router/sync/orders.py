"""The status loop: active orders' statuses, costs and refunds, and open refills, per provider.

Usage::

    sync = OrderSync(config, store, clients, metrics)
    await sync.run_once()        # one pass over every provider (tests, tools)
    sync.start()                 # one background loop per provider (the app's cleanup context)
    sync.reconfigure(config, clients, retiring={"gone": removed_at})   # a config reload
    await sync.stop()

Each provider has its own loop, so a slow or dead provider delays only its own orders. A pass
reads the provider's due orders a page of 100 at a time (one multi-status call per page), with
at most `sync.calls_in_flight` pages per provider between their read and the recording of their
answers (each in one transaction): its memory is that many pages, however many orders are
active and however slow the writes. Orders younger than `sync.old_order_age` are due again
`sync.status_interval` after a check, older ones `sync.old_order_interval` after. Each recorded
cost corrects the fleet's spend of the day (router.fleet), which counted the order at its
planned cost until then.

A provider that a config reload removed while it still had open orders keeps its loop, its
client and its settings (`retiring`) until it has none left (Store.open_work), so that those
orders still end, and are refunded, as they would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Final

import structlog

from router import v2
from router.config import Config
from router.fleet import Fleet
from router.metrics import Metrics
from router.store import ActiveOrder, OpenRefill, StatusChange, StatusRecord, Store
from router.upstream import StatusReading, UpstreamClient, UpstreamError, UpstreamStatus

log = structlog.get_logger("router.sync.orders")

PAGE: Final = v2.MAX_IDS_PER_REQUEST  # due orders (or open refills) per upstream call
MISSING: Final = "missing from the answer"
PARTIAL_WITHOUT_REMAINS: Final = "Partial without a number of remains"
FLAT_PARTIAL: Final = (
    "none: a flat-priced order (package) ended Partial; the operator decides "
    "(smm-router orders refund)"
)


def refund_for(status: str, charge: int, quantity: int, remains: int) -> int:
    """What the reseller gets back, in minor units, when its order ends with `status`.

    - Canceled: the whole charge.
    - Partial: ``charge * remains / quantity``, rounded DOWN to the minor unit, with `remains`
      clamped to [0, quantity]. `quantity` is the charged quantity (runs * quantity for
      drip-feed, the number of lines for comment types), so this is
      `remains * rate / 1000` of what was actually charged; rounding down means we never give
      back more than was charged (at most one minor unit less than the exact share).
    - Anything else: nothing.

    A Partial whose remains the upstream does not know ("Unknown", missing) is not final for
    us: the order stays active and is refunded once a number arrives. A flat-priced order
    (a package) that ends Partial is not refunded at all: its remains count units of a package
    size we do not know; it is recorded for the operator (see `OrderSync`).
    """
    if status == v2.CANCELED:
        return charge
    if status != v2.PARTIAL or quantity <= 0:
        return 0
    return charge * min(max(remains, 0), quantity) // quantity


def cost_in_base(charge: Decimal, currency: str, config: Config) -> int | None:
    """An upstream charge in minor units of `config.currency` (half up); None without an fx rate."""
    if currency == config.currency:
        return v2.to_minor(charge)
    rate = config.fx.get(currency)
    return None if rate is None else v2.to_minor(charge * rate)


class OrderSync:
    """Keeps active orders and open refills in step with the providers that hold them."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clients: Mapping[str, UpstreamClient],
        metrics: Metrics,
        *,
        fleet: Fleet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.metrics = metrics
        self.fleet = fleet  # told each recorded cost (the day's spend); None: nobody to tell
        self.clock = clock
        # Providers removed from the config while they had open orders -> when (unix time).
        self.retiring: Mapping[str, float] = {}
        limit = config.sync.calls_in_flight
        self._in_flight = {name: asyncio.Semaphore(limit) for name in clients}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ended: list[asyncio.Task[None]] = []  # loops of providers gone, cancelled
        self._running = False
        self._woken = asyncio.Event()  # set (and replaced) to end every loop's pause at once

    # --- the loops ----------------------------------------------------------------------------

    def start(self) -> None:
        """One loop per provider, until `stop`."""
        self._running = True
        for name in self.clients:
            self._start(name)

    def _start(self, name: str) -> None:
        self._tasks[name] = asyncio.create_task(self.run(name), name=f"status-sync-{name}")

    async def stop(self) -> None:
        self._running = False
        tasks = [*self._tasks.values(), *self._ended]
        self._tasks, self._ended = {}, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reconfigure(
        self,
        config: Config,
        clients: Mapping[str, UpstreamClient],
        *,
        retiring: Mapping[str, float] | None = None,
    ) -> None:
        """Sync with `config` and `clients` from now on (a config reload).

        `clients` holds a client for every provider of `config` and for each of `retiring`
        (name -> when it was removed, unix time), whose settings `config` keeps too. A loop
        starts for each new provider and ends for each one gone; every loop ends its pause now,
        so that new intervals apply at once.
        """
        if config.sync.calls_in_flight != self.config.sync.calls_in_flight:
            self._in_flight = {}
        self.config, self.clients, self.retiring = config, clients, dict(retiring or {})
        for name in clients:
            self._in_flight.setdefault(name, asyncio.Semaphore(config.sync.calls_in_flight))
        if self._running:
            self._ended = [task for task in self._ended if not task.done()]
            for name in [name for name in self._tasks if name not in clients]:
                task = self._tasks.pop(name)
                task.cancel()
                self._ended.append(task)
            for name in clients:
                if name not in self._tasks:
                    self._start(name)
        self._woken.set()
        self._woken = asyncio.Event()

    async def run(self, provider: str) -> None:
        """Sync `provider`, pause `status_interval`, again; an error is logged, never fatal.
        A retiring provider's loop ends once it has nothing open left."""
        while True:
            try:
                await self.sync_provider(provider)
                if provider in self.retiring and await self._retire(provider):
                    return
            except Exception:
                log.exception("status_sync_failed", provider=provider)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.config.sync.status_interval)

    async def _retire(self, provider: str) -> bool:
        """Drop a removed provider's client once nothing may need it; whether it was dropped."""
        work = await self.store.open_work(provider, placing_before=self.retiring[provider])
        if not work.idle or provider not in self.retiring:  # re-added while we looked
            return False
        self.clients = {name: c for name, c in self.clients.items() if name != provider}
        self.retiring = {name: at for name, at in self.retiring.items() if name != provider}
        self._tasks.pop(provider, None)
        log.info("provider_retired", provider=provider)
        return True

    async def run_once(self, *, now: float | None = None) -> None:
        """One pass over every provider at once; `now` (default: the clock) decides what is due."""
        await asyncio.gather(*(self.sync_provider(name, now=now) for name in self.clients))

    async def sync_provider(self, provider: str, *, now: float | None = None) -> None:
        """One pass over `provider`: its due orders, then its open refills."""
        started = time.perf_counter()
        try:
            await self._sync_orders(provider, self.clock() if now is None else now)
            await self._sync_refills(provider)
        finally:
            self.metrics.sync_duration.labels(provider=provider).observe(
                time.perf_counter() - started
            )

    # --- orders -------------------------------------------------------------------------------

    async def _sync_orders(self, provider: str, due_by: float) -> None:
        """The due orders a page at a time, each page read only once a slot of the provider's
        gate is free, and that slot held until the page's answers are recorded: at most
        `calls_in_flight` pages are in memory, however many orders are active."""
        gate = self._in_flight[provider]
        failed = asyncio.Event()  # a call failed: the rest of the pass waits for the next one
        after: tuple[float, int] | None = None
        async with asyncio.TaskGroup() as group:
            while True:
                await gate.acquire()
                try:
                    page = (
                        []
                        if failed.is_set()
                        else await self.store.orders_due(
                            provider, due_by=due_by, after=after, limit=PAGE
                        )
                    )
                except BaseException:
                    gate.release()
                    raise
                if not page:
                    gate.release()
                    break
                after = (page[-1].next_check_at, page[-1].id)
                group.create_task(self._refresh(provider, page, gate, failed, due_by))
                del page  # the task holds it now, and frees it as soon as it is recorded

    async def _refresh(
        self,
        provider: str,
        page: Sequence[ActiveOrder],
        gate: asyncio.Semaphore,
        failed: asyncio.Event,
        due_by: float,
    ) -> None:
        """One multi-status call and its answers recorded, holding a slot of `gate` until then.

        The slot is released only once the page is recorded (or given up): answers waiting for
        the write lock hold their slots, so no new call goes out meanwhile, and the pass's
        memory stays at `calls_in_flight` pages, however slow the writes.

        An answer that came back unusable is recorded on each order of the page (its sync
        problem) and the pass goes on; when nothing usable came back (the provider is down or
        overloaded), the page's orders stay due and the rest of the pass waits for the next one.
        """
        try:
            # Remains are clamped to the quantity of counted orders only: a package's
            # (flat-priced) count units of a size we do not know, and its charged quantity is 1.
            quantities = {
                order.upstream_order: order.quantity
                for order in page
                if not self._flat_priced(order.service)
            }
            try:
                readings = await self.clients[provider].status_readings(
                    [order.upstream_order for order in page], quantities
                )
            except UpstreamError as exc:
                failed.set()
                log.warning("status_call_failed", provider=provider, error=exc.message)
                return
            except Exception:  # the client raises only UpstreamError; a bug must not end it
                log.exception("status_call_crashed", provider=provider)
                return
            try:
                await self.sync_page(provider, page, readings, checked_at=max(due_by, self.clock()))
            except Exception:  # one page's failure must not end the pass for the other pages
                log.exception("status_page_failed", provider=provider)
        finally:
            gate.release()

    async def sync_page(
        self,
        provider: str,
        page: Sequence[ActiveOrder],
        readings: Mapping[int, StatusReading],
        *,
        checked_at: float,
    ) -> list[StatusChange]:
        """Record one status answer for the orders of `page` (as read before asking)."""
        records = [
            self._record(
                provider, order, readings.get(order.upstream_order) or _missing(), checked_at
            )
            for order in page
        ]
        changes = await self.store.record_statuses(records, checked_at=checked_at)
        if self.fleet is not None:
            for order, record in zip(page, records, strict=True):
                if record.cost is not None:
                    counted = order.cost if order.cost is not None else order.estimated_cost
                    self.fleet.correct_spend(
                        provider, record.cost - (counted or 0), created_at=order.created_at
                    )
        for record in records:
            if record.status is None:
                self.metrics.status_unreadable.labels(provider=provider).inc()
                if record.problem != record.seen_problem:
                    log.warning(
                        "order_status_unreadable",
                        provider=provider,
                        order_id=record.order_id,
                        problem=record.problem,
                    )
        for change in changes:
            self.metrics.status_changes.labels(provider=provider, status=change.status).inc()
            if change.refunded:
                self.metrics.refunds.labels(provider=provider, status=change.status).inc()
                log.info(
                    "order_refunded",
                    provider=provider,
                    order_id=change.order_id,
                    status=change.status,
                    amount=v2.format_money(change.refunded),
                )
            if change.refund_refused:
                log.error("refund_already_in_ledger", provider=provider, order_id=change.order_id)
        return changes

    def _record(
        self, provider: str, order: ActiveOrder, reading: StatusReading, checked_at: float
    ) -> StatusRecord:
        sync = self.config.sync
        young = checked_at - order.created_at < sync.old_order_age
        next_check_at = checked_at + (sync.status_interval if young else sync.old_order_interval)
        status = reading.status
        if status is None:
            return StatusRecord(
                order_id=order.id,
                seen_status=order.status,
                status=None,
                next_check_at=next_check_at,
                problem=reading.problem or MISSING,
                seen_problem=order.sync_problem,
            )
        cost, raw_charge, currency = self._cost(provider, status)
        remains = status.remains
        flat = self._flat_priced(order.service)
        if remains is not None and not flat:
            remains = min(max(remains, 0), order.quantity)
        detail: dict[str, object] = {
            "start_count": status.start_count,
            "remains": remains,
            "charge": raw_charge,
            "currency": currency,
        }
        if status.status == v2.PARTIAL and remains is None:
            # Final upstream, but what to refund is unknown: keep it active and ask again.
            return StatusRecord(
                order_id=order.id,
                seen_status=order.status,
                status=None,
                next_check_at=next_check_at,
                start_count=status.start_count,
                cost=cost,
                upstream_charge=raw_charge,
                upstream_currency=currency,
                problem=PARTIAL_WITHOUT_REMAINS,
                seen_problem=order.sync_problem,
            )
        refund = 0
        if status.status != order.status:
            if status.status == v2.PARTIAL and flat:
                # A package's remains count units of a size we do not know: no share of the
                # flat charge can be derived from them. Recorded for the operator, never guessed.
                detail["refund"] = FLAT_PARTIAL
                log.warning("flat_priced_partial", provider=provider, order_id=order.id)
            else:
                refund = refund_for(status.status, order.charge, order.quantity, remains or 0)
            if refund:
                detail["refund"] = v2.format_money(refund)
        return StatusRecord(
            order_id=order.id,
            seen_status=order.status,
            status=status.status,
            next_check_at=next_check_at,
            start_count=status.start_count,
            remains=remains,
            cost=cost,
            upstream_charge=raw_charge,
            upstream_currency=currency,
            refund=refund,
            detail=json.dumps(detail, separators=(",", ":")),
        )

    def _flat_priced(self, service_id: int) -> bool:
        """Charged the rate once (Package, Custom Comments Package): `quantity` is 1 for us."""
        service = self.config.services.get(service_id)
        return service is not None and v2.SERVICE_TYPES[service.type].quantity == "flat"

    def _cost(self, provider: str, status: UpstreamStatus) -> tuple[int | None, str | None, str]:
        """(cost in base minor units, the charge as the upstream wrote it, its currency)."""
        currency = status.currency or self.config.providers[provider].currency
        if status.charge is None:
            return None, None, currency
        cost = cost_in_base(status.charge, currency, self.config)
        if cost is None:
            log.warning("no_fx_rate", provider=provider, currency=currency)
        return cost, f"{status.charge:f}", currency

    # --- refills ------------------------------------------------------------------------------

    async def _sync_refills(self, provider: str) -> None:
        """Open refills, a page of 100 per multi `refill_status` call."""
        client = self.clients[provider]
        after = 0
        while refills := await self.store.open_refills(provider, after=after, limit=PAGE):
            after = refills[-1].id
            try:
                async with self._in_flight[provider]:
                    words = await client.refill_status([r.upstream_refill for r in refills])
            except UpstreamError as exc:
                log.warning("refill_status_call_failed", provider=provider, error=exc.message)
                return
            changes: list[tuple[OpenRefill, str]] = []
            for refill in refills:
                word = words.get(refill.upstream_refill)
                if word is None:
                    log.warning("refill_status_unreadable", provider=provider, refill_id=refill.id)
                elif word != refill.status:
                    changes.append((refill, word))
            await self.store.record_refill_statuses(changes)


def _missing() -> StatusReading:
    return StatusReading(None, MISSING)
