"""The order desk's placement of an `add`: reserve, try the plan's routes, settle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final

import structlog

from router import routing, v2
from router.config import Config, Route
from router.orders.desk import DeskBase, Placing
from router.orders.validation import AddRequest, validate_add
from router.routing import Reason, Step
from router.store import Attempt, DuplicateRequest, NewOrder, Order, Reseller, UpstreamOrderTaken
from router.upstream import Outcome, UpstreamClient

log = structlog.get_logger("router.orders")

# Beyond its upstream calls, what a placement may take: its writes (a route noted, the settle
# and its first retries). The placing sweep (router.app) uses the same bound.
PLACEMENT_SLACK_SECONDS: Final = 60.0
# How often a repeat of a request ID reads its first order again while another process (a
# second router on the database, the CLI re-routing) places it: nothing here knows its end.
REPEAT_POLL_SECONDS: Final = 0.25


def placement_bound(config: Config, routes: int) -> float:
    """The longest, in seconds, a placement trying up to `routes` routes may take: a call to
    each, to the longest upstream timeout of `config`, and PLACEMENT_SLACK_SECONDS. For one
    route, the time after which the sweep (router.app) holds an order still placing."""
    return max(routes, 1) * config.longest_timeout + PLACEMENT_SLACK_SECONDS


class Placement(DeskBase):
    """The order desk's `add`: an order planned, reserved, placed on a route, settled."""

    async def add(self, reseller: Reseller, params: Mapping[str, str]) -> int:
        """Place an order and return its local ID; raise V2Error when it is refused.

        A `request_id` the reseller already used answers what its first order's request got
        (see `_repeat`) and places nothing.
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
                    return await self._repeat(first)
            raise
        service = request.service
        first_route = steps[0].route
        longest = placement_bound(self.config, len(steps))  # the config that planned `steps`
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
            return await self._repeat(repeat.first)
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

        task = asyncio.create_task(place())
        # Registered as soon as the order's ID is known, before anything awaits (a repeat that
        # read the order in between reads it again until it finds this). The callback runs
        # however the placement ends: an answer, an error, cancelled.
        self._placing[order_id] = Placing(task, asyncio.get_running_loop().time() + longest)
        task.add_done_callback(lambda _: self._placing.pop(order_id, None))
        try:
            return await asyncio.shield(task)
        finally:
            structlog.contextvars.bind_contextvars(**bound)

    async def _repeat(self, first: Order) -> int:
        """The answer to an `add` repeating `first`'s request ID: what `first`'s own request
        got. Its ID when it is placed or held (the reseller knows held orders: Pending);
        `failed` (no route took it, refunded) answers the error its reseller got then, never
        an ID it was never told of.

        While `first` is still being placed, its end is not known yet: the repeat waits for it
        (`_placement_end`). Placing past the longest a placement may take, it is as good as
        held (the sweep holds it): its ID.
        """
        structlog.contextvars.bind_contextvars(order_id=first.id, repeated_request=True)
        if first.state == "placing":
            first = await self._placement_end(first)
        if first.state == "failed":
            raise v2.V2Error(v2.UNAVAILABLE)
        return first.id

    async def _placement_end(self, first: Order) -> Order:
        """`first`, a `placing` order, as its placement left it; as it is at the bound.

        This process's own placement is awaited (never cancelled: the waiting request may
        be, its reseller hanging up); another process's is read again every
        REPEAT_POLL_SECONDS until the longest its service's routes may take has passed.
        """
        assert first.request_id is not None
        # A line of its own: the repeat's request line comes only when it is answered.
        log.info("repeat_waits", order_id=first.id, placing_here=first.id in self._placing)
        loop = asyncio.get_running_loop()
        service = self.config.services.get(first.service)
        deadline = loop.time() + placement_bound(self.config, len(service.route) if service else 1)
        order: Order | None = first
        while order is not None and order.state == "placing":
            placing = self._placing.get(order.id)
            if placing is not None:
                # asyncio.wait neither cancels what it waits for nor raises its error.
                await asyncio.wait((placing.task,), timeout=max(placing.deadline - loop.time(), 0))
                return await self.store.order(first.id) or first
            # Not ours, or ours between its reserving write and its registration: read again.
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(REPEAT_POLL_SECONDS, remaining))
            order = await self.store.order_by_request_id(first.reseller_id, first.request_id)
        return order or first

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
                self.metrics.series(self.metrics.orders, str(service.id), state).inc()
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
