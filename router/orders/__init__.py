"""Orders: validate and place (reserve funds, try routes, record), status, refill and cancel.

Usage::

    desk = OrderDesk(config, store, clients, metrics, fleet=fleet)
    order_id = await desk.add(reseller, params)        # raises V2Error
    orders = await desk.orders(reseller, [1, 2, 3])    # id -> Order, the reseller's only

Each order is planned before anything is reserved (router.fleet: provider health, catalogue
costs, margin floors, spend caps, the service's strategy): when no route may take it, the
reseller is told `Service temporarily unavailable` and nothing is charged. Every route left out
of a plan is counted with its reason; every `add` outcome goes back to the fleet (the breaker,
the funds bench with the order's cost there, the day's spend of an accepted one).
"""

from router.orders.desk import FORWARD_CALLS_IN_FLIGHT, reseller_status
from router.orders.forwarding import Forwarding
from router.orders.held import HeldOrders, HeldReason, ResolveRefused, held_reason
from router.orders.validation import MAX_INTERVAL_MINUTES, MAX_RUNS, AddRequest, validate_add

__all__ = [
    "FORWARD_CALLS_IN_FLIGHT",
    "MAX_INTERVAL_MINUTES",
    "MAX_RUNS",
    "AddRequest",
    "HeldReason",
    "OrderDesk",
    "ResolveRefused",
    "held_reason",
    "reseller_status",
    "validate_add",
]


class OrderDesk(HeldOrders, Forwarding):
    """Business rules of the reseller API, over the store and the upstream clients."""
