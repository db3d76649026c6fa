"""The simulator's catalogue and its orders and refills as they progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from router import v2
from router.sim.faults import PENDING_SHARE
from router.upstream import UpstreamService

_CATALOGUE: Final = (  # name, category, rate, min, max of each type, in v2.SERVICE_TYPES order
    ("Instagram Followers [Real, 30 days refill]", "Instagram Followers", "0.50", 10, 100000),
    ("Instagram Likes Package [1000 likes]", "Instagram Likes", "2.40", 1, 1),
    ("Instagram Custom Comments", "Instagram Comments", "12.00", 1, 10000),
    ("Instagram Custom Comments Package [10]", "Instagram Comments", "1.80", 1, 1),
    ("Instagram Mentions [Your usernames]", "Instagram Mentions", "3.00", 10, 50000),
    ("Instagram Mentions [With hashtags]", "Instagram Mentions", "3.50", 10, 50000),
    ("Instagram Mentions [Custom list]", "Instagram Mentions", "4.00", 1, 10000),
    ("Instagram Mentions [Users of a hashtag]", "Instagram Mentions", "2.80", 10, 50000),
    ("Instagram Mentions [Followers of a user]", "Instagram Mentions", "2.60", 10, 50000),
    ("Instagram Mentions [Likers of a post]", "Instagram Mentions", "2.60", 10, 50000),
    ("Instagram Comment Likes", "Instagram Comments", "1.20", 10, 20000),
    ("Instagram Comment Replies [Custom]", "Instagram Comments", "9.00", 1, 10000),
    ("Instagram Story Poll Votes", "Instagram Story", "0.80", 10, 100000),
    ("Website SEO Traffic [Keywords]", "Website Traffic", "5.00", 10, 10000),
    ("Telegram Members [Invites from groups]", "Telegram", "1.50", 10, 50000),
    ("Website Traffic [Worldwide, Google referrer]", "Website Traffic", "0.30", 10, 1000000),
)


SimService = UpstreamService  # a catalogue line is the same on both sides of the wire


def default_catalogue() -> list[SimService]:
    """One service per supported v2 type, IDs 101, 102, ... in v2.SERVICE_TYPES order."""
    types = [name for name in v2.SERVICE_TYPES if name not in v2.UNSUPPORTED_TYPES]
    return [
        SimService(
            service=101 + index,
            name=name,
            type=kind,
            category=category,
            rate=Decimal(rate),
            min=minimum,
            max=maximum,
            refill=True,
            cancel=True,
            dripfeed=v2.SERVICE_TYPES[kind].dripfeed,
        )
        for index, (kind, (name, category, rate, minimum, maximum)) in enumerate(
            zip(types, _CATALOGUE, strict=True)
        )
    ]


@dataclass
class Received:
    action: str
    params: dict[str, str]  # everything sent but the key
    at: float  # the simulator's clock (SimProvider.now())


@dataclass
class SimOrder:
    """One order; its status, remains and charge follow the simulator's clock."""

    id: int
    service: int
    link: str
    quantity: int  # the total charged quantity (runs x quantity for drip-feed)
    cost: Decimal  # the full charge taken at `add`
    created_at: float
    clock: Callable[[], float] = field(repr=False, compare=False)  # SimProvider.now
    duration: float = field(repr=False, compare=False)  # progress_seconds
    # What stays undelivered at the end: above 0 it ends Partial; 0 or below it ends Completed
    # (below 0: over-delivered, reported as negative remains as some panels do).
    partial_remains: int = 0
    canceled_at: float | None = None
    canceled_remains: int = 0

    @property
    def start_count(self) -> int:
        return (self.id * 7919) % 9000 + 100

    def snapshot(self, now: float) -> tuple[str, int, Decimal]:
        """(status, remains, charge) at `now`; the charge covers only what was delivered."""
        if self.canceled_at is not None:
            remains = self.canceled_remains
            word = v2.CANCELED if remains == self.quantity else v2.PARTIAL
            return word, remains, self.cost_of(self.quantity - remains)
        elapsed = now - self.created_at
        if elapsed < PENDING_SHARE * self.duration:
            return v2.PENDING, self.quantity, self.cost
        target = self.quantity - self.partial_remains
        if elapsed < self.duration:
            share = (elapsed - PENDING_SHARE * self.duration) / (
                (1 - PENDING_SHARE) * self.duration
            )
            return v2.IN_PROGRESS, self.quantity - int(target * share), self.cost
        if self.partial_remains > 0:
            return v2.PARTIAL, self.partial_remains, self.cost_of(max(target, 0))
        return v2.COMPLETED, self.partial_remains, self.cost

    def cost_of(self, delivered: int) -> Decimal:
        return self.cost if delivered == self.quantity else self.cost * delivered / self.quantity

    @property
    def status(self) -> str:
        return self.snapshot(self.clock())[0]

    @property
    def remains(self) -> int:
        return self.snapshot(self.clock())[1]

    @property
    def charge(self) -> Decimal:
        return self.snapshot(self.clock())[2]


@dataclass
class SimRefill:
    id: int
    order: int
    created_at: float

    def status_at(self, now: float, duration: float) -> str:
        elapsed = now - self.created_at
        if elapsed < PENDING_SHARE * duration:
            return v2.PENDING
        return v2.IN_PROGRESS if elapsed < duration else v2.COMPLETED


def _money(amount: Decimal) -> str:
    """v2.format_money, but exact when the amount has more decimals (as some panels send)."""
    if amount == amount.quantize(Decimal(1).scaleb(-v2.MONEY_PLACES)):
        return v2.format_money(amount)
    return f"{amount.normalize():f}"
