"""Held orders: why each is held, and the operator's resolutions (attach, refund, reroute)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from router import v2
from router.config import Route
from router.orders.placement import Placement
from router.orders.validation import AddRequest
from router.store import Attempt, Order
from router.upstream import Outcome


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


class HeldOrders(Placement):
    """The operator's resolutions of held orders (a reroute places as `add` does)."""

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
