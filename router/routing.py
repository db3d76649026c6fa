"""Which routes to try for one order, in which order: pure functions over config and state.

Usage::

    for rank, route in plan(service, states, now=time.monotonic()):
        ...
    states[name] = after_outcome(states.get(name), outcome, now=..., backoff=...)
    states[name] = after_balance(states.get(name), balance, read_at=...)

A provider that answered `Not enough funds on balance` is benched: it gets no new orders until a
balance read shows money came in, or until the configured back-off (`sync.no_funds_backoff`)
passes. Money came in when a read taken after the bench shows more than the read before it:
orders only ever lower a provider's balance, so a rise is a top-up (or refunds). The previous read
may predate the bench (the balance was already low) or follow it (the first read after the bench
then sets the level to beat). A route whose upstream service is gone from the provider's
catalogue is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

from router.config import Route, Service
from router.upstream import Outcome


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What routing knows of one provider. Times are on one clock (the desk's: monotonic)."""

    benched_until: float = 0.0  # no new orders before it (out of funds)
    benched_at: float = 0.0  # when the last `Not enough funds` came back
    last_balance: int | None = None  # the last balance read, minor units of its currency
    missing: frozenset[int] = frozenset()  # upstream services gone from its catalogue

    def benched(self, now: float) -> bool:
        return now < self.benched_until


HEALTHY: Final = ProviderState()


def plan(
    service: Service, states: Mapping[str, ProviderState], *, now: float
) -> list[tuple[int, Route]]:
    """The routes to try, as (rank in the route list, route), best first.

    A benched provider is skipped: sending it orders would only collect refusals. So is a
    route whose upstream service the provider's catalogue no longer lists.
    """
    routes = []
    for rank, route in enumerate(service.route):
        state = states.get(route.provider, HEALTHY)
        if not state.benched(now) and route.service not in state.missing:
            routes.append((rank, route))
    return routes


def fails_over(outcome: Outcome) -> bool:
    """Whether an `add` with this outcome may be tried on the next route.

    Only when nothing can exist upstream: an ambiguous outcome is never re-sent.
    """
    return outcome in (Outcome.REFUSED, Outcome.NO_FUNDS, Outcome.UNREACHABLE)


def after_outcome(
    state: ProviderState | None, outcome: Outcome, *, now: float, backoff: float
) -> ProviderState:
    """A provider's state once one of its `add` calls ended with `outcome`.

    `backoff` is `sync.no_funds_backoff`: the longest a provider stays benched without a
    balance read showing that money came in.
    """
    state = state or HEALTHY
    if outcome is Outcome.NO_FUNDS:
        return replace(state, benched_until=now + backoff, benched_at=now)
    return state


def after_balance(state: ProviderState | None, balance: int, *, read_at: float) -> ProviderState:
    """A provider's state once a balance read sent at `read_at` answered `balance` (minor units).

    A read sent before the bench says nothing about the money left after it, so it cannot lift
    the bench; it still becomes the level that a later read must beat.
    """
    state = state or HEALTHY
    rose = state.last_balance is not None and balance > state.last_balance
    if state.benched_until and read_at >= state.benched_at and rose:
        return replace(state, benched_until=0.0, benched_at=0.0, last_balance=balance)
    return replace(state, last_balance=balance)


def with_missing(state: ProviderState | None, missing: frozenset[int]) -> ProviderState:
    """A provider's state once its catalogue showed which routed upstream services are gone."""
    return replace(state or HEALTHY, missing=missing)
