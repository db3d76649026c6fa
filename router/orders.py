"""Orders: validate and place (reserve funds, try routes, record), status, refill and cancel.

Usage::

    desk = OrderDesk(config, store, clients, metrics, fleet=fleet)
    order_id = await desk.add(reseller, params)        # raises V2Error
    views = await desk.status(reseller, [1, 2, 3])

Each order is planned before anything is reserved (router.fleet: provider health, catalogue
costs, margin floors, spend caps, the service's strategy): when no route may take it, the
reseller is told `Service temporarily unavailable` and nothing is charged. Every route left out
of a plan is counted with its reason; every `add` outcome goes back to the fleet (the breaker,
the funds bench with the order's cost there, the day's spend of an accepted one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, TypeVar

import structlog

from router import routing, v2
from router.config import Config, Route, Service
from router.fleet import Fleet
from router.metrics import Metrics
from router.routing import Plan, Reason, Step
from router.store import (
    Attempt,
    DuplicateRequest,
    NewOrder,
    Order,
    Reseller,
    Store,
    UpstreamOrderTaken,
)
from router.upstream import Outcome, UpstreamClient, UpstreamError, UpstreamRefused

log = structlog.get_logger("router.orders")

MAX_RUNS: Final = 1000
MAX_INTERVAL_MINUTES: Final = 60 * 24 * 30
# Refill and cancel calls at once to one provider, over every reseller's requests: a reseller
# refilling hundreds of orders must not become hundreds of calls at an upstream.
FORWARD_CALLS_IN_FLIGHT: Final = 4

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AddRequest:
    """A validated `add`: what to charge and what to send upstream (service ID aside)."""

    service: Service
    link: str
    quantity: int  # charged quantity: runs x quantity for drip-feed, lines for counted types
    charge: int  # minor units
    upstream_params: Mapping[str, str]


def _required_text(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None or not value.strip():
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    return value


def _positive(params: Mapping[str, str], name: str, maximum: int) -> int:
    number = v2.parse_plain_int(params.get(name), maximum=maximum)
    if not number:
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    return number


def _quantity(params: Mapping[str, str], service: Service) -> int:
    # Any plain number up to the length bound is a quantity, so that one above the service's
    # maximum is told so; a longer one is malformed.
    number = v2.parse_plain_int(params.get("quantity"), maximum=v2.MAX_PLAIN_INT)
    if number is None:
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    if number < service.min:
        raise v2.V2Error(v2.quantity_below(service.min))
    if number > service.max:
        raise v2.V2Error(v2.quantity_above(service.max))
    return number


def validate_add(service: Service, params: Mapping[str, str]) -> AddRequest:
    """Check an `add` against its local service (V2.md's type table); raise V2Error."""
    kind = v2.SERVICE_TYPES[service.type]
    sent: dict[str, str] = {}
    link = v2.check_link(params.get("link"))
    sent["link"] = link
    for name in kind.params:
        sent[name] = _required_text(params, name)
    if kind.one_of:
        present = [name for name in kind.one_of if (params.get(name) or "").strip()]
        if not present:
            raise v2.V2Error(v2.INCORRECT_REQUEST)
        sent.update((name, params[name]) for name in present)
    sent.update((name, params[name]) for name in kind.optional if name in params)

    dripfeed = "runs" in params or "interval" in params
    if dripfeed and not (service.dripfeed and kind.dripfeed):
        raise v2.V2Error(v2.INCORRECT_REQUEST)

    if kind.quantity == "flat":
        return AddRequest(service, link, 1, v2.to_minor(service.rate), sent)
    if kind.quantity == "param":
        per_run = _quantity(params, service)
        sent["quantity"] = str(per_run)
        quantity = per_run
        if dripfeed:
            runs = _positive(params, "runs", MAX_RUNS)
            interval = _positive(params, "interval", MAX_INTERVAL_MINUTES)
            sent.update(runs=str(runs), interval=str(interval))
            quantity = runs * per_run
    else:
        quantity = len(v2.non_empty_lines(sent[kind.quantity]))
        if quantity == 0:
            raise v2.V2Error(v2.INCORRECT_REQUEST)
        if quantity < service.min:
            raise v2.V2Error(v2.quantity_below(service.min))
        if quantity > service.max:
            raise v2.V2Error(v2.quantity_above(service.max))
    return AddRequest(service, link, quantity, v2.order_charge(service.rate, quantity), sent)


def reseller_status(order: Order) -> str:
    """The v2 word a reseller sees: an order not yet placed upstream is Pending; a held order
    the operator canceled shows its Canceled."""
    return order.status if order.state in ("placed", "canceled") else v2.PENDING


@dataclass(frozen=True, slots=True)
class HeldReason:
    """Why an order is held, for the operator (`smm-router orders show`)."""

    interrupted: bool  # no answer recorded from the route it is held on: its process stopped
    reason: str


def held_reason(order: Order, attempts: Sequence[Attempt]) -> HeldReason | None:
    """Why `order` is held, from its attempts (oldest first); None when it is not held.

    Attempts are stored when a placement settles: a process that stopped mid-call, or before it
    could store the answer, leaves none for the route it was trying.
    """
    if order.state != "held":
        return None
    last = attempts[-1] if attempts else None
    route = f"{order.provider} (service {order.upstream_service})"
    if last is None or (last.provider, last.upstream_service) != (
        order.provider,
        order.upstream_service,
    ):
        return HeldReason(
            True,
            f"no answer recorded from {route}: the process placing it stopped during the call "
            f"or before it could store the answer, so {order.provider} may hold this order. "
            f"Look for the log line `order_accepted` with order_id {order.id} (it carries the "
            f"upstream_order), or ask {order.provider}; then `smm-router orders resolve "
            f"{order.id} --upstream-order N`, or if it has none, --reroute or --refund",
        )
    if last.outcome != Outcome.ACCEPTED:
        return HeldReason(False, f"{route} answered: {last.error or last.outcome}")
    if last.error is not None:  # its upstream order is another local order's
        return HeldReason(False, f"{route} accepted it, but {last.error}: ask {order.provider}")
    return HeldReason(  # accepted, but a restart had held it meanwhile
        False,
        f"{route} accepted it as upstream order {last.upstream_order} after it was held: "
        f"`smm-router orders resolve {order.id} --upstream-order {last.upstream_order}`",
    )


class ResolveRefused(Exception):
    """An operator's resolution of a held order that cannot be done; nothing was changed."""


class OrderDesk:
    """Business rules of the reseller API, over the store and the upstream clients."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clients: Mapping[str, UpstreamClient],
        metrics: Metrics,
        *,
        fleet: Fleet | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.metrics = metrics
        self.fleet = fleet if fleet is not None else Fleet(config, store, metrics)
        self.rng = rng or random.Random()  # the draws of `weighted` and `quality` plans
        self._forwarding = {name: asyncio.Semaphore(FORWARD_CALLS_IN_FLIGHT) for name in clients}
        # Orders whose refill is being asked upstream now -> what the asking request will get:
        # a second request for one of them waits for that answer instead of asking again.
        self._refilling: dict[int, asyncio.Future[int | str]] = {}

    def reconfigure(self, config: Config, clients: Mapping[str, UpstreamClient]) -> None:
        """Route and forward with `config` and `clients` from now on (a config reload). A
        request already past its routing keeps the clients it started with: an order being
        placed finishes on its plan, even on a provider the reload removed."""
        self.config = config
        self.clients = clients
        for name in clients:
            self._forwarding.setdefault(name, asyncio.Semaphore(FORWARD_CALLS_IN_FLIGHT))

    def plan(self, service: Service, *, quantity: int, charge: int) -> Plan:
        """The plan of one order; each route it leaves out is counted with its reason."""
        plan = self.fleet.plan(service, quantity=quantity, charge=charge, rng=self.rng)
        for step in plan.skipped:
            self.metrics.route_skipped.labels(
                service=str(service.id), provider=step.route.provider, reason=str(step.reason)
            ).inc()
        return plan

    def service(self, raw: str | None) -> Service:
        service_id = v2.parse_id(raw)
        service = self.config.services.get(service_id) if service_id else None
        if service is None:
            raise v2.V2Error(v2.INCORRECT_SERVICE)
        return service

    # --- add ----------------------------------------------------------------------------------

    async def add(self, reseller: Reseller, params: Mapping[str, str]) -> int:
        """Place an order and return its local ID; raise V2Error when it is refused.

        A `request_id` the reseller already used answers its first order (see `_repeat`) and
        places nothing.
        """
        request_id = v2.check_request_id(params.get("request_id"))
        if request_id is not None:
            structlog.contextvars.bind_contextvars(reseller_request_id=request_id)
        try:
            request = validate_add(self.service(params.get("service")), params)
            steps = self.plan(
                request.service, quantity=request.quantity, charge=request.charge
            ).to_try
            clients = self.clients  # with `steps`, this order's plan: a reload changes neither
            if not steps:
                raise v2.V2Error(v2.UNAVAILABLE)
        except v2.V2Error:
            # A repeat must not be told of an error its first order never had (the config or
            # the providers changed since): the panel would take a placed order for refused.
            # Looked up only here: on the usual path the reserving INSERT does it.
            if request_id is not None:
                first = await self.store.order_by_request_id(reseller.id, request_id)
                if first is not None:
                    return self._repeat(first)
            raise
        service = request.service
        first_route = steps[0].route
        try:
            order_id = await self.store.reserve_order(
                NewOrder(
                    reseller_id=reseller.id,
                    service=service.id,
                    link=request.link,
                    quantity=request.quantity,
                    charge=request.charge,
                    params=request.upstream_params,
                    provider=first_route.provider,
                    upstream_service=first_route.service,
                    request_id=request_id,
                    config_version=self.config.version or None,
                )
            )
        except DuplicateRequest as repeat:
            return self._repeat(repeat.first)
        if order_id is None:
            raise v2.V2Error(v2.NOT_ENOUGH_FUNDS)
        structlog.contextvars.bind_contextvars(order_id=order_id)
        # From here the order exists and its funds are reserved: finish it even if the request
        # is cancelled, or a restart finds it `placing` and holds it.
        # The shielded task runs in a copy of this context: what it binds for the request's log
        # line (the provider) is copied back when it ends.
        bound: dict[str, object] = {}

        async def place() -> int:
            try:
                return await self._place(order_id, request, steps, clients=clients)
            finally:
                bound.update(structlog.contextvars.get_contextvars())

        try:
            return await asyncio.shield(place())
        finally:
            structlog.contextvars.bind_contextvars(**bound)

    @staticmethod
    def _repeat(first: Order) -> int:
        """The answer to an `add` repeating `first`'s request ID: `first`'s ID, at once, even
        while it is still being placed; `failed` (no route took it, refunded) answers the
        error its reseller got then, never an ID it was never told of."""
        structlog.contextvars.bind_contextvars(order_id=first.id, repeated_request=True)
        if first.state == "failed":
            raise v2.V2Error(v2.UNAVAILABLE)
        return first.id

    async def _place(
        self,
        order_id: int,
        request: AddRequest,
        steps: Sequence[Step],
        *,
        clients: Mapping[str, UpstreamClient] | None = None,
        rerouted_by: str | None = None,
    ) -> int:
        """Try the plan's `steps` in turn (the first one's route is already recorded on the
        order) and settle. A later route whose breaker opened meanwhile is skipped.

        `clients` are those of the config that planned `routes` (default: the desk's).

        A held order re-routed by the operator (`rerouted_by`) is known to its reseller: when
        every route refuses it, it is canceled and refunded (not `failed`, which the reseller
        never sees), and how it ended is written to its history.
        """

        def event(text: str) -> str | None:
            return None if rerouted_by is None else f"reroute by {rerouted_by}: {text}"

        service = request.service
        clients = self.clients if clients is None else clients
        attempts: list[Attempt] = []
        for position, step in enumerate(steps):
            route = step.route
            if position:
                if not self.fleet.status(route.provider).takes_orders:
                    self.metrics.route_skipped.labels(
                        service=str(service.id), provider=route.provider, reason=Reason.OPEN
                    ).inc()
                    continue
                await self.store.note_route(order_id, route.provider, route.service)
            structlog.contextvars.bind_contextvars(provider=route.provider)
            started = time.time()
            result = await clients[route.provider].add(
                {"service": str(route.service), **request.upstream_params}
            )
            attempts.append(
                Attempt(
                    rank=step.rank,
                    provider=route.provider,
                    upstream_service=route.service,
                    started_at=started,
                    latency=result.latency,
                    outcome=str(result.outcome),
                    error=result.error,
                    upstream_order=result.upstream_order,
                    cost=step.upstream_cost,
                )
            )
            if result.outcome is Outcome.ACCEPTED:
                assert result.upstream_order is not None
                try:  # settled first: nothing may stand between the upstream ID and its log
                    state = await self._settle_accepted(
                        order_id, attempts, step, result.upstream_order, event, rerouted_by
                    )
                finally:
                    self.fleet.after_spend(route.provider, step.upstream_cost)
                    await self.fleet.after_add(route.provider, result, cost=step.upstream_cost)
                self.metrics.orders.labels(service=str(service.id), state=state).inc()
                return order_id
            await self.fleet.after_add(route.provider, result, cost=step.upstream_cost)
            if not routing.fails_over(result.outcome):
                await self._settle(
                    order_id,
                    "held",
                    attempts,
                    route=route,
                    event=event(
                        f"outcome unknown at {route.provider} (service {route.service}): "
                        f"{result.error}; held again"
                    ),
                    rerouted_by=rerouted_by,
                )
                self.metrics.orders.labels(service=str(service.id), state="held").inc()
                log.warning(
                    "order_held", order_id=order_id, provider=route.provider, error=result.error
                )
                return order_id
            self.metrics.failovers.labels(
                service=str(service.id), provider=route.provider, reason=str(result.outcome)
            ).inc()
        if rerouted_by is not None:
            await self._settle(
                order_id,
                "canceled",
                attempts,
                event=event("every route refused it; canceled and refunded"),
                rerouted_by=rerouted_by,
            )
            self.metrics.orders.labels(service=str(service.id), state="canceled").inc()
            return order_id
        stored = await self._settle(order_id, "failed", attempts)
        self.metrics.orders.labels(service=str(service.id), state="failed").inc()
        if not stored:
            # Its funds stay reserved under it until the operator refunds it (it will be held):
            # the reseller is told of the order rather than left with less money and no order.
            return order_id
        raise v2.V2Error(v2.UNAVAILABLE)

    async def _settle_accepted(
        self,
        order_id: int,
        attempts: list[Attempt],
        step: Step,
        upstream_order: int,
        event: Callable[[str], str | None],
        rerouted_by: str | None,
    ) -> str:
        """Store an order the upstream holds now; the state it ends in (placed, or held).

        Its upstream ID goes to the log before anything that can fail: if the settle is never
        stored (or the process dies first), the order is held on restart and that line is
        where the operator finds what to attach.
        """
        route = step.route
        with contextlib.suppress(Exception):  # a broken log sink must not stop the settle
            log.info(
                "order_accepted",
                order_id=order_id,
                provider=route.provider,
                upstream_service=route.service,
                upstream_order=upstream_order,
            )
        where = f"on {route.provider} (service {route.service}) as upstream order {upstream_order}"
        try:
            await self._settle(
                order_id,
                "placed",
                attempts,
                route=route,
                upstream_order=upstream_order,
                estimated_cost=step.upstream_cost,
                event=event(f"placed {where}"),
                rerouted_by=rerouted_by,
            )
            return "placed"
        except UpstreamOrderTaken as taken:
            # Another local order has this upstream order (an upstream that reuses IDs, or a
            # bug): a second one would charge twice for one delivery. Held for the operator;
            # the accepted attempt keeps the upstream ID and says why.
            attempts[-1] = replace(attempts[-1], error=str(taken))
            with contextlib.suppress(Exception):
                log.error(
                    "upstream_order_taken",
                    order_id=order_id,
                    provider=route.provider,
                    upstream_order=upstream_order,
                    holder=taken.holder,
                )
            await self._settle(
                order_id,
                "held",
                attempts,
                route=route,
                event=event(f"accepted {where}, but {taken}; held again"),
                rerouted_by=rerouted_by,
            )
            return "held"

    async def _settle(
        self,
        order_id: int,
        state: str,
        attempts: Sequence[Attempt],
        *,
        route: Route | None = None,
        upstream_order: int | None = None,
        estimated_cost: int | None = None,
        event: str | None = None,
        rerouted_by: str | None = None,
    ) -> bool:
        """Settle the placement (the store retries it until it is stored); whether it was.

        For a reseller's `add`, a settle that could not be stored is logged and the order left
        `placing`: the sweep or the next start-up holds it, and the reseller still gets its ID
        (an error would make its panel send the order again). An operator's re-route raises.
        """
        try:
            await self.store.settle_order(
                order_id,
                state=state,
                attempts=attempts,
                provider=None if route is None else route.provider,
                upstream_service=None if route is None else route.service,
                upstream_order=upstream_order,
                estimated_cost=estimated_cost,
                event=event,
            )
        except UpstreamOrderTaken:
            raise
        except Exception:
            if rerouted_by is not None:
                raise
            with contextlib.suppress(Exception):
                log.exception(
                    "order_not_stored",
                    order_id=order_id,
                    state=state,
                    provider=None if route is None else route.provider,
                    upstream_order=upstream_order,
                )
            return False
        return True

    # --- held orders: the operator's resolutions ----------------------------------------------

    async def attach(self, order_id: int, upstream_order: int, *, by: str) -> Order:
        """The operator found the order at the provider it was held on: it is placed there."""
        order = await self._held(order_id)
        if upstream_order < 1:
            raise ResolveRefused(f"not an upstream order ID: {upstream_order}")
        assert order.provider is not None
        detail = (
            f"attach by {by}: upstream order {upstream_order} at {order.provider} "
            f"(service {order.upstream_service})"
        )
        if not await self.store.attach_held(order_id, upstream_order, detail):
            taken = await self.store.upstream_order_taken(order.provider, upstream_order)
            if taken is not None:
                raise ResolveRefused(
                    f"upstream order {upstream_order} at {order.provider} already belongs to "
                    f"order {taken}"
                )
            raise await self._not_held(order_id)
        return await self._reread(order_id)

    async def refund_held(self, order_id: int, *, by: str) -> Order:
        """Cancel a held order and give its charge back: the reseller sees Canceled."""
        order = await self._held(order_id)
        detail = (
            f"refund by {by}: canceled, {v2.format_money(order.charge)} refunded "
            f"(held at {order.provider}, service {order.upstream_service})"
        )
        if not await self.store.refund_held(order_id, detail):
            raise await self._not_held(order_id)
        return await self._reread(order_id)

    async def refund_order(self, order_id: int, amount: int, *, by: str, note: str) -> Order:
        """Give back `amount` of an order that has ended upstream and was never refunded.

        For what the status sync does not decide: a package that ended Partial (its remains
        count units of a size we do not know), a goodwill gesture. The order's status stays;
        its reseller's `status` shows the charge less the refund.
        """
        order = await self.store.order(order_id)
        if order is None:
            raise ResolveRefused(f"no order {order_id}")
        if order.state != "placed" or order.status not in v2.FINAL_STATUSES:
            raise ResolveRefused(
                f"order {order_id} is {order.state}, {order.status}: only an order that has "
                "ended upstream (Completed, Partial, Canceled) can be refunded this way"
            )
        if order.refunded:
            raise ResolveRefused(
                f"order {order_id} was already refunded {v2.format_money(order.refunded)}"
            )
        if not 0 < amount <= order.charge:
            raise ResolveRefused(
                f"order {order_id}: a refund must be more than 0 and at most its charge, "
                f"{v2.format_money(order.charge)}"
            )
        refunded = v2.format_money(amount)
        detail = f"refund by {by}: {refunded} of {v2.format_money(order.charge)} ({note})"
        if not await self.store.refund_ended_order(order_id, amount, note, detail):
            raise ResolveRefused(f"order {order_id} changed meanwhile: nothing refunded")
        return await self._reread(order_id)

    async def reroute(self, order_id: int, *, by: str) -> Order:
        """Place a held order on the routes after the one it was held on, as `add` would.

        Those routes are planned as a service of their own (health, costs, floor, strategy);
        refusals fail over; an unknown outcome holds it again (on that route); no route taking
        it cancels and refunds it.
        """
        order = await self._held(order_id)
        service = self.config.services.get(order.service)
        if service is None:
            raise ResolveRefused(
                f"order {order_id}: service {order.service} is no longer in the config; "
                "use --upstream-order or --refund"
            )
        held_on = Route(order.provider or "", order.upstream_service or 0)
        if held_on not in service.route:
            raise ResolveRefused(
                f"order {order_id}: the route it was held on ({held_on.provider}, service "
                f"{held_on.service}) is no longer in service {service.id}'s routes; "
                "use --upstream-order or --refund"
            )
        held_rank = service.route.index(held_on)
        after = dataclasses.replace(service, route=service.route[held_rank + 1 :])
        plan = self.plan(after, quantity=order.quantity, charge=order.charge)
        steps = [step._replace(rank=step.rank + held_rank + 1) for step in plan.to_try]
        if not steps:
            out = "".join(f", {step.route.provider}: {step.reason}" for step in plan.skipped)
            raise ResolveRefused(
                f"order {order_id}: no route after {held_on.provider} (rank {held_rank}) in "
                f"service {service.id}{out}; use --upstream-order or --refund"
            )
        request = AddRequest(service, order.link, order.quantity, order.charge, order.params)
        first = steps[0].route
        tried = ", ".join(f"{s.route.provider} (service {s.route.service})" for s in steps)
        detail = f"reroute by {by}: from {held_on.provider} (service {held_on.service}) to {tried}"
        if not await self.store.begin_reroute(order_id, first.provider, first.service, detail):
            raise await self._not_held(order_id)
        try:
            await self._place(order_id, request, steps, rerouted_by=by)
        except BaseException:
            # Stopped mid-call (Ctrl-C, a bug): the order may exist where it was being sent.
            await self.store.hold_interrupted_reroute(
                order_id, f"reroute by {by}: interrupted; held on the route being tried"
            )
            raise
        return await self._reread(order_id)

    async def _held(self, order_id: int) -> Order:
        order = await self.store.order(order_id)
        if order is None:
            raise ResolveRefused(f"no order {order_id}")
        if order.state != "held":
            raise ResolveRefused(f"order {order_id} is {order.state}, not held: nothing changed")
        return order

    async def _not_held(self, order_id: int) -> ResolveRefused:
        """Why a resolution changed nothing: someone resolved the order in the meantime."""
        order = await self.store.order(order_id)
        state = order.state if order else "gone"
        return ResolveRefused(f"order {order_id} is {state}, not held: nothing changed")

    async def _reread(self, order_id: int) -> Order:
        order = await self.store.order(order_id)
        assert order is not None
        return order

    # --- status -------------------------------------------------------------------------------

    async def orders(self, reseller: Reseller, order_ids: Sequence[int]) -> dict[int, Order]:
        """The reseller's orders among `order_ids`; another reseller's look unknown."""
        return await self.store.orders_of(reseller.id, order_ids)

    # --- refill -------------------------------------------------------------------------------

    async def refill(self, reseller: Reseller, order_ids: Sequence[int]) -> dict[int, int | str]:
        """Ask the provider holding each order for a refill: local refill ID, or error text.

        An order whose refill is still open (Pending, In progress) answers that refill and
        nothing is sent; the others go upstream in multi-order calls (see `_forward`). The
        upstream's reason for refusing one passes through as it wrote it.
        """
        clients = self.clients  # those this request checks and calls, whatever a reload does
        errors, todo = await self._forwardable(
            reseller, order_ids, "refill", v2.REFILL_DISABLED, clients
        )
        results: dict[int, int | str] = dict(errors)
        # Claimed before the open refills are read, released once the new ones are stored: a
        # request that finds an order unclaimed reads after any earlier refill of it was stored.
        waiting = {o.id: self._refilling[o.id] for o in todo if o.id in self._refilling}
        loop = asyncio.get_running_loop()
        claimed = {o.id: loop.create_future() for o in todo if o.id not in waiting}
        self._refilling.update(claimed)
        try:
            mine = [order for order in todo if order.id in claimed]
            results.update(await self.store.open_refills_of([order.id for order in mine]))

            async def send(provider: str, batch: list[Order]) -> None:
                results.update(await self._refill_batch(clients[provider], batch))

            await self._forward([order for order in mine if order.id not in results], send)
        finally:
            for order_id, claim in claimed.items():
                claim.set_result(results.get(order_id, v2.UNAVAILABLE))
                del self._refilling[order_id]
        if waiting:
            log.info("refill_joins_another_request", orders=sorted(waiting))
        for order_id, claim in waiting.items():
            results[order_id] = await asyncio.shield(claim)
        return results

    async def _refill_batch(
        self, client: UpstreamClient, batch: list[Order]
    ) -> dict[int, int | str]:
        """One multi-order `refill` call; the refills it made are stored at once."""
        provider = client.name
        upstream_ids = [order.upstream_order for order in batch if order.upstream_order]
        answers: Mapping[int, int | UpstreamError]
        try:
            answers = await client.refill_many(upstream_ids)
        except UpstreamError as exc:
            if not isinstance(exc, UpstreamRefused):
                log.warning(
                    "refill_failed", provider=provider, orders=len(batch), error=exc.message
                )
            answers = dict.fromkeys(upstream_ids, exc)
        else:
            for upstream_id, item in answers.items():
                if isinstance(item, UpstreamError) and not isinstance(item, UpstreamRefused):
                    log.warning(
                        "refill_item_unreadable",
                        provider=provider,
                        upstream_order=upstream_id,
                        error=item.message,
                    )
        made = [(o, a) for o in batch if isinstance(a := answers.get(o.upstream_order or 0), int)]
        results: dict[int, int | str] = dict(await self.store.create_refills(made))
        for order in batch:
            answer = answers.get(order.upstream_order or 0)
            if isinstance(answer, UpstreamRefused):
                results[order.id] = answer.message
            elif order.id not in results:  # unreadable: a refill may exist, but we cannot tell
                results[order.id] = v2.UNAVAILABLE
        return results

    async def refill_status(
        self, reseller: Reseller, refill_ids: Sequence[int]
    ) -> dict[int, str | None]:
        """Each refill's status as the refill loop last read it, from SQLite only (no upstream
        call on the request path); None for an unknown refill."""
        refills = await self.store.refills_of(reseller.id, refill_ids)
        return {
            refill_id: refills[refill_id].status if refill_id in refills else None
            for refill_id in refill_ids
        }

    # --- cancel -------------------------------------------------------------------------------

    async def cancel(self, reseller: Reseller, order_ids: Sequence[int]) -> dict[int, str | None]:
        """Forward a cancel for each order: None when requested, else the error text."""
        clients = self.clients  # those this request checks and calls, whatever a reload does
        errors, todo = await self._forwardable(
            reseller, order_ids, "cancel", v2.CANCEL_DISABLED, clients
        )
        results: dict[int, str | None] = dict(errors)

        async def one_provider(provider: str, group: list[Order]) -> None:
            upstream_ids = [order.upstream_order for order in group if order.upstream_order]
            try:
                answers = await clients[provider].cancel(upstream_ids)
            except UpstreamError as exc:
                log.warning("cancel_failed", provider=provider, error=exc.message)
                answers = {upstream_id: v2.UNAVAILABLE for upstream_id in upstream_ids}
            for order in group:
                assert order.upstream_order is not None
                results[order.id] = answers.get(order.upstream_order, v2.UNAVAILABLE)

        await self._forward(todo, one_provider)
        await self.store.record_cancel_requests({order.id: results[order.id] for order in todo})
        return results

    async def _forward(
        self, orders: Sequence[Order], send: Callable[[str, list[Order]], Awaitable[None]]
    ) -> None:
        """`send(provider, batch)` for the orders of each provider, in batches of at most
        v2.MAX_IDS_PER_REQUEST, at most FORWARD_CALLS_IN_FLIGHT calls per provider at once."""
        size = v2.MAX_IDS_PER_REQUEST

        async def one(provider: str, batch: list[Order]) -> None:
            async with self._forwarding[provider]:
                await send(provider, batch)

        await asyncio.gather(
            *(
                one(provider, group[start : start + size])
                for provider, group in _group(orders, lambda order: order.provider or "").items()
                for start in range(0, len(group), size)
            )
        )

    async def _forwardable(
        self,
        reseller: Reseller,
        order_ids: Sequence[int],
        feature: str,
        disabled: str,
        clients: Mapping[str, UpstreamClient],
    ) -> tuple[dict[int, str], list[Order]]:
        """Split a refill or cancel request: (error text per order it cannot reach, orders to
        forward to their provider). Each ID once, in the order sent."""
        orders = await self.orders(reseller, order_ids)
        errors: dict[int, str] = {}
        todo: list[Order] = []
        for order_id in dict.fromkeys(order_ids):
            order = orders.get(order_id)
            if order is None:
                errors[order_id] = v2.INCORRECT_ORDER
            elif not self._offers(order, feature):
                errors[order_id] = disabled
            elif (
                order.state != "placed"
                or order.upstream_order is None
                or order.provider not in clients  # a provider removed from the config
            ):
                errors[order_id] = v2.UNAVAILABLE
            else:
                todo.append(order)
        return errors, todo

    def _offers(self, order: Order, feature: str) -> bool:
        service = self.config.services.get(order.service)
        return bool(service is not None and getattr(service, feature))


def _group(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    groups: dict[K, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)
