"""Which routes to try for one order, in which order: pure functions over config and state.

Usage::

    for rank, route in plan(service, states, now=time.monotonic()):
        ...
    states[route.provider] = after_outcome(states.get(route.provider), outcome, now=...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

from router.config import Route, Service
from router.upstream import Outcome

NO_FUNDS_BACKOFF: Final = 300.0
"""Seconds a provider that answered `Not enough funds on balance` gets no new orders."""


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What routing knows of one provider."""

    benched_until: float = 0.0  # monotonic time; no new orders before it (out of funds)

    def benched(self, now: float) -> bool:
        return now < self.benched_until


HEALTHY: Final = ProviderState()


def plan(
    service: Service, states: Mapping[str, ProviderState], *, now: float
) -> list[tuple[int, Route]]:
    """The routes to try, as (rank in the route list, route), best first.

    A benched provider is skipped: sending it orders would only collect refusals.
    """
    return [
        (rank, route)
        for rank, route in enumerate(service.route)
        if not states.get(route.provider, HEALTHY).benched(now)
    ]


def fails_over(outcome: Outcome) -> bool:
    """Whether an `add` with this outcome may be tried on the next route.

    Only when nothing can exist upstream: an ambiguous outcome is never re-sent.
    """
    return outcome in (Outcome.REFUSED, Outcome.NO_FUNDS, Outcome.UNREACHABLE)


def after_outcome(
    state: ProviderState | None, outcome: Outcome, *, now: float, backoff: float = NO_FUNDS_BACKOFF
) -> ProviderState:
    """A provider's state once one of its `add` calls ended with `outcome`."""
    state = state or HEALTHY
    if outcome is Outcome.NO_FUNDS:
        return replace(state, benched_until=now + backoff)
    return state
