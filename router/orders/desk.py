"""What every part of the order desk shares: its config, clients, plans and status."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from router import v2
from router.config import Config, Service
from router.fleet import Fleet
from router.metrics import Metrics
from router.routing import Plan
from router.store import Order, OrderStatus, Reseller, Store
from router.upstream import UpstreamClient

# Refill and cancel calls at once to one provider, over every reseller's requests: a reseller
# refilling hundreds of orders must not become hundreds of calls at an upstream.
FORWARD_CALLS_IN_FLIGHT: Final = 4


def reseller_status(order: Order | OrderStatus) -> str:
    """The v2 word a reseller sees: an order not yet placed upstream is Pending; a held order
    the operator canceled shows its Canceled."""
    return order.status if order.state in ("placed", "canceled") else v2.PENDING


class Placing(NamedTuple):
    """An `add` being placed by this process: what a repeat of its request ID waits for."""

    task: asyncio.Task[int]  # the placement (shielded: it ends however its request does)
    deadline: float  # loop time: the longest it may take (placement_bound) has passed


class DeskBase:
    """The order desk's state, its plans and its status lookups (see `OrderDesk`)."""

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
        # Orders this process is placing now (`add`) -> their placement: a repeat of one's
        # request ID waits for its end, to answer what the first request got. Each entry goes
        # when its placement ends, however it ends.
        self._placing: dict[int, Placing] = {}

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

    # --- status -------------------------------------------------------------------------------

    async def orders(self, reseller: Reseller, order_ids: Sequence[int]) -> dict[int, Order]:
        """The reseller's orders among `order_ids`; another reseller's look unknown."""
        return await self.store.orders_of(reseller.id, order_ids)

    async def statuses(
        self, reseller: Reseller, order_ids: Sequence[int]
    ) -> dict[int, OrderStatus]:
        """What `status` shows of the reseller's orders among `order_ids`; another reseller's
        look unknown."""
        return await self.store.order_statuses(reseller.id, order_ids)
