"""Validation of an `add`: its parameters against its local service, what to charge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from router import v2
from router.config import Service

MAX_RUNS: Final = 1000
MAX_INTERVAL_MINUTES: Final = 60 * 24 * 30


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
