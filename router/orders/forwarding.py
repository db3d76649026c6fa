"""Forwarding of refills and cancels to the provider holding each order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import structlog

from router import v2
from router.orders.desk import DeskBase
from router.store import Order, Reseller
from router.upstream import (
    UpstreamClient,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTurnedAway,
)

log = structlog.get_logger("router.orders")


def _panels_refusal(error: UpstreamError) -> bool:
    """The panel's own refusal, whose reason its reseller may read (`refill` passes it on); not
    an HTTP 429 or a firewall's 4xx page: those say nothing of the order, and their text is
    ours (an HTTP status, a page's first bytes), for the log."""
    return isinstance(error, UpstreamRefused) and not isinstance(
        error, (UpstreamRateLimited, UpstreamTurnedAway)
    )


K = TypeVar("K")
T = TypeVar("T")


class Forwarding(DeskBase):
    """The order desk's refills and cancels, sent on in batches per provider."""

    # --- refill -------------------------------------------------------------------------------

    async def refill(self, reseller: Reseller, order_ids: Sequence[int]) -> dict[int, int | str]:
        """Ask the provider holding each order for a refill: local refill ID, or error text.

        An order whose refill is still open (Pending, In progress) answers that refill and
        nothing is sent; the others go upstream in multi-order calls (see `_forward`). The
        panel's reason for refusing one passes through as it wrote it; an HTTP 429 or a 4xx
        page in front of the panel is `Service temporarily unavailable`.
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
            if not _panels_refusal(exc):
                log.warning(
                    "refill_failed", provider=provider, orders=len(batch), error=exc.message
                )
            answers = dict.fromkeys(upstream_ids, exc)
        else:
            for upstream_id, item in answers.items():
                if isinstance(item, UpstreamError) and not _panels_refusal(item):
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
            if isinstance(answer, UpstreamError) and _panels_refusal(answer):
                results[order.id] = answer.message
            elif order.id not in results:
                # Unreadable (a refill may exist, but we cannot tell), or turned away before
                # the panel saw it: not now, and nothing of the provider's page for the reseller.
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
