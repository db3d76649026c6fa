"""The routing table: YAML loaded into frozen dataclasses, every rule checked, errors by path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

DEFAULT_UPSTREAM_TIMEOUT: Final = 15.0
DEFAULT_STATUS_INTERVAL: Final = 60.0
DEFAULT_BALANCE_INTERVAL: Final = 300.0
DEFAULT_CATALOGUE_INTERVAL: Final = 3600.0


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


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    service: int


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


@dataclass(frozen=True, slots=True)
class Sync:
    status_interval: float = DEFAULT_STATUS_INTERVAL
    balance_interval: float = DEFAULT_BALANCE_INTERVAL
    catalogue_interval: float = DEFAULT_CATALOGUE_INTERVAL


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
