"""The config's model: frozen dataclasses for every section, their defaults, its errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum, StrEnum
from pathlib import Path
from typing import Final

DEFAULT_UPSTREAM_TIMEOUT: Final = 15.0
DEFAULT_STATUS_INTERVAL: Final = 60.0
DEFAULT_BALANCE_INTERVAL: Final = 300.0
DEFAULT_CATALOGUE_INTERVAL: Final = 3600.0
DEFAULT_OLD_ORDER_AGE: Final = 24 * 3600.0
DEFAULT_OLD_ORDER_INTERVAL: Final = 900.0
DEFAULT_CALLS_IN_FLIGHT: Final = 2
DEFAULT_NO_FUNDS_BACKOFF: Final = 600.0
DEFAULT_ADD_PER_MINUTE: Final = 600
DEFAULT_STATUS_PER_MINUTE: Final = 1200
DEFAULT_OTHER_PER_MINUTE: Final = 600
DEFAULT_IN_FLIGHT: Final = 32
MAX_PER_MINUTE: Final = 1_000_000
MAX_IN_FLIGHT: Final = 10_000
DEFAULT_HEALTH_WINDOW: Final = 60.0
DEFAULT_MIN_CALLS: Final = 5
DEFAULT_FAILURE_RATIO: Final = Decimal("0.5")
DEFAULT_COOLDOWN: Final = 30.0
DEFAULT_MIN_MARGIN: Final = Decimal(0)
MAX_MIN_CALLS: Final = 10_000
MAX_WEIGHT: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string whose repr and str never show it."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    url: str
    key: Secret
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    currency: str = "USD"
    daily_spend_cap: Decimal | None = None  # in Config.currency, per UTC day; None: no cap


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    service: int
    weight: int | None = None  # the `weighted` strategy's share; required for weighted services


class Strategy(StrEnum):
    """How a service orders the routes that remain eligible for an order."""

    RANKED = "ranked"  # as listed
    CHEAPEST = "cheapest"  # by this order's live upstream cost, ties by rank
    WEIGHTED = "weighted"  # the first at random by `weight`, the rest by rank
    QUALITY = "quality"  # by delivered share over the last days, exploring a few orders


class Inherit(Enum):
    """The marker of a per-service key left out: the `routing:` default applies."""

    INHERIT = "inherit"


INHERIT: Final = Inherit.INHERIT


@dataclass(frozen=True, slots=True)
class Service:
    id: int
    name: str
    category: str
    type: str
    rate: Decimal  # per 1000, in Config.currency
    min: int
    max: int
    refill: bool
    cancel: bool
    dripfeed: bool
    route: tuple[Route, ...]
    strategy: Strategy | None = None  # None: routing.strategy
    # A share of the charge: INHERIT takes routing.min_margin; None (YAML null): no floor.
    min_margin: Decimal | Inherit | None = INHERIT


@dataclass(frozen=True, slots=True)
class Sync:
    status_interval: float = DEFAULT_STATUS_INTERVAL  # how often an active order is re-checked
    old_order_age: float = DEFAULT_OLD_ORDER_AGE  # an active order older than this is "old"...
    old_order_interval: float = DEFAULT_OLD_ORDER_INTERVAL  # ...and re-checked only this often
    calls_in_flight: int = DEFAULT_CALLS_IN_FLIGHT  # sync calls at once, per provider
    balance_interval: float = DEFAULT_BALANCE_INTERVAL
    catalogue_interval: float = DEFAULT_CATALOGUE_INTERVAL
    # After `Not enough funds on balance`, no orders to that provider for this long, unless a
    # balance read shows it recovered first.
    no_funds_backoff: float = DEFAULT_NO_FUNDS_BACKOFF


@dataclass(frozen=True, slots=True)
class Limits:
    """Per reseller key: requests per minute by action class, and requests at once."""

    add: int = DEFAULT_ADD_PER_MINUTE
    status: int = DEFAULT_STATUS_PER_MINUTE
    other: int = DEFAULT_OTHER_PER_MINUTE  # every other action, unknown ones included
    in_flight: int = DEFAULT_IN_FLIGHT


@dataclass(frozen=True, slots=True)
class Health:
    """The breaker per provider, judged on its `add` calls."""

    window: float = DEFAULT_HEALTH_WINDOW  # seconds of recent outcomes
    min_calls: int = DEFAULT_MIN_CALLS  # no verdict on fewer calls than this in the window
    failure_ratio: Decimal = DEFAULT_FAILURE_RATIO  # the failed share that opens the breaker
    cooldown: float = DEFAULT_COOLDOWN  # seconds open before a `balance` call probes it


@dataclass(frozen=True, slots=True)
class Routing:
    """The defaults of every service; each may override them."""

    strategy: Strategy = Strategy.RANKED
    # A route whose upstream cost for an order > charge x (1 - min_margin) is skipped.
    min_margin: Decimal = DEFAULT_MIN_MARGIN


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listener
    metrics: Listener
    database: Path  # absolute, resolved against the config file's folder
    currency: str
    providers: Mapping[str, Provider]
    services: Mapping[int, Service]  # in the order of the file
    fx: Mapping[str, Decimal] = field(default_factory=dict)
    sync: Sync = field(default_factory=Sync)
    limits: Limits = field(default_factory=Limits)
    health: Health = field(default_factory=Health)
    routing: Routing = field(default_factory=Routing)
    # A short hash of the file it was read from: each order records the version that routed it,
    # and a reload shows which one runs. Empty for a config built in code.
    version: str = ""

    @property
    def longest_timeout(self) -> float:
        """The longest upstream call this config allows (the default with no provider)."""
        return max((p.timeout for p in self.providers.values()), default=DEFAULT_UPSTREAM_TIMEOUT)


class ConfigError(Exception):
    """The config cannot be used; `errors` holds every problem as `<path>: <message>`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class ConfigUnreadable(ConfigError):
    """The config file cannot be read at all: missing, a folder, not permitted, not text."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__([f"{path}: cannot read: {reason}"])
        self.path = path
        self.reason = reason
