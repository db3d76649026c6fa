"""Every rule of the config: each raw YAML value checked and built into its dataclass, by path."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

from router import v2
from router.config.model import (
    MAX_IN_FLIGHT,
    MAX_MIN_CALLS,
    MAX_PER_MINUTE,
    MAX_WEIGHT,
    Config,
    Health,
    Limits,
    Listener,
    Provider,
    Route,
    Routing,
    Secret,
    Service,
    Strategy,
    Sync,
)

# --- Checking ------------------------------------------------------------------------------------
# A check takes a raw YAML value and returns it checked and converted, or raises _Invalid with
# every problem found inside it, each by its path relative to that value.

_Check = Callable[[Any], Any]
_Checks = Mapping[str, _Check]
_NO_CHECKS: Final[_Checks] = MappingProxyType({})
_FAILED: Final = object()  # stands for a string whose ${VAR} could not be substituted

_PROVIDER_NAME: Final = re.compile(r"[a-z0-9_-]+")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_DECIMAL: Final = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_PLAIN_INT: Final = re.compile(r"[0-9]+")
_ENV_REF: Final = re.compile(r"\$\{([^}]*)(\}?)")  # `${` to the next `}`, closed or not
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHY_UNSUPPORTED: Final = {"Subscriptions": "it needs per-post billing"}
_SUPPORTED_TYPES: Final = ", ".join(t for t in v2.SERVICE_TYPES if t not in v2.UNSUPPORTED_TYPES)
_SERVICE_FLAGS: Final = {"refill": False, "cancel": False, "dripfeed": False}
_SYNC_KEYS: Final = (
    "status_interval",
    "old_order_age",
    "old_order_interval",
    "balance_interval",
    "catalogue_interval",
    "no_funds_backoff",
)


class _Invalid(Exception):
    """A value failed its check: (path relative to the value, message) for each problem."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _fail(message: str) -> NoReturn:
    raise _Invalid([("", message)])


class _Found:
    """The problems found so far inside one value, by relative path."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def check(self, path: str, check: _Check, value: object) -> Any:
        """check(value), or None after recording its problems under `path`."""
        if value is _FAILED:
            return None  # its ${VAR} problem is recorded already
        try:
            return check(value)
        except _Invalid as exc:
            self.problems += [(_join(path, inner), message) for inner, message in exc.problems]
            return None

    def done(self) -> None:
        if self.problems:
            raise _Invalid(self.problems)


def _join(path: str, inner: object) -> str:
    inner = str(inner)
    if not path or not inner:
        return path or inner
    return path + inner if inner.startswith("[") else f"{path}.{inner}"


def _kind(value: object) -> str:
    """What a YAML value is, for messages; never the value itself (it may be a secret)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "mapping", list: "list", str: "string", int: "integer"}
    name = names.get(type(value), type(value).__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _substitute(node: object, path: str, env: Mapping[str, str], found: _Found) -> None:
    """Replace `${VAR}` in every string value inside `node`, in place (_FAILED where unset)."""
    todo = [(node, path)]
    seen: set[int] = set()  # a node shared through a YAML alias is done once
    while todo:
        node, path = todo.pop()
        if id(node) in seen or not isinstance(node, dict | list):
            continue
        seen.add(id(node))
        slots = node.keys() if isinstance(node, dict) else range(len(node))
        for slot in list(slots):
            here = _join(path, f"[{slot}]" if isinstance(node, list) else slot)
            if not isinstance(node[slot], str):
                todo.append((node[slot], here))
                continue
            problems = len(found.problems)
            text = _ENV_REF.sub(partial(_expand, env=env, path=here, found=found), node[slot])
            node[slot] = text if len(found.problems) == problems else _FAILED


def _expand(match: re.Match[str], *, env: Mapping[str, str], path: str, found: _Found) -> str:
    name, closed = match.groups()
    if not closed or not _ENV_NAME.fullmatch(name):
        found.add(path, "malformed ${...} reference: write ${NAME}")
    elif name not in env:
        found.add(path, f"environment variable {name} is not set")
    else:
        return env[name]
    return ""


def _fields(
    value: object, found: _Found, required: _Checks, optional: _Checks = _NO_CHECKS
) -> dict[str, Any]:
    """The keys present in a mapping, each checked (None where it failed) into `found`."""
    table = _mapping(value)
    checks = {**required, **optional}
    for key in table:
        if key not in checks:
            found.add(str(key), "unknown key")
    for key in required:
        if key not in table:
            found.add(key, "required key is missing")
    return {
        key: found.check(key, check, table[key]) for key, check in checks.items() if key in table
    }


# --- Values --------------------------------------------------------------------------------------


def _mapping(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        _fail(f"expected a mapping, got {_kind(value)}")
    return value


def _table(value: object) -> dict[Any, Any]:
    table = _mapping(value)
    if not table:
        _fail("must not be empty")
    return table


def _text(value: object) -> str:
    if not isinstance(value, str):
        _fail(f"expected a string, got {_kind(value)}")
    if not value.strip():
        _fail("must not be empty")
    return value


def _url(value: object) -> str:
    text = _text(value)
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid or any(ch.isspace() for ch in text):
        _fail("expected an http:// or https:// URL with a host")
    return text


def _database(value: object) -> str:
    if _text(value) == ":memory:":
        _fail("expected a file path: ':memory:' would lose every order on restart")
    return str(value)


def _currency(value: object) -> str:
    if not _CURRENCY.fullmatch(_text(value)):
        _fail("expected a currency code of 3 capital letters")
    return str(value)


def _service_type(value: object) -> str:
    name = _text(value)
    if name in v2.UNSUPPORTED_TYPES:
        _fail(f"type '{name}' is not supported yet ({_WHY_UNSUPPORTED.get(name, 'not yet')})")
    if name not in v2.SERVICE_TYPES:
        _fail(f"unknown type '{name}' (expected one of: {_SUPPORTED_TYPES})")
    return name


def _decimal(value: object, *, positive: bool = False, places: int | None = None) -> Decimal:
    """A decimal written as a string ("0.90") or an int: a YAML float would lose money."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        why = " (floats lose money)" if isinstance(value, float) else ""
        _fail(f'expected a decimal string such as "0.90", got {_kind(value)}{why}')
    if not _DECIMAL.fullmatch(value):
        _fail('expected a decimal number such as "0.90"')
    number = Decimal(value)
    decimals = -int(number.as_tuple().exponent)
    if number < 0 or (positive and number == 0):
        _fail("must be greater than 0" if positive else "must not be negative")
    if places is not None and decimals > places:
        _fail(f"has {decimals} decimal places, at most {places} are allowed")
    return number


def _rate(value: object) -> Decimal:
    """A service's price per 1000: a decimal with at most MONEY_PLACES places, more than 0."""
    rate = _decimal(value, places=v2.MONEY_PLACES)
    if rate == 0:
        _fail("must be greater than 0: a rate of 0 gives every order away")
    return rate


def _integer(value: object, *, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"expected {what}, got {_kind(value)}")
    if not low <= value <= high:
        _fail(f"expected {what}, got {value}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"expected a positive number of seconds, got {_kind(value)}")
    if not 0 < value < math.inf:
        _fail(f"expected a positive number of seconds, got {value}")
    return float(value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        _fail(f"expected true or false, got {_kind(value)}")
    return value


_PORT: Final = partial(_integer, low=1, high=65535, what="a port number from 1 to 65535")
_QUANTITY: Final = partial(
    _integer, low=1, high=v2.MAX_QUANTITY, what=f"a positive integer up to {v2.MAX_QUANTITY}"
)
_UPSTREAM_ID: Final = partial(_integer, low=1, high=v2.MAX_ID, what="a positive integer service ID")
_RATE: Final = _rate
_MINOR_UNIT: Final = Decimal(1) / v2.MINOR_PER_UNIT  # the least amount the ledger can charge
_FX_RATE: Final = partial(_decimal, positive=True)
_SPEND_CAP: Final = partial(_decimal, positive=True, places=v2.MONEY_PLACES)
_WEIGHT: Final = partial(
    _integer, low=1, high=MAX_WEIGHT, what=f"a positive integer weight up to {MAX_WEIGHT}"
)
_MIN_CALLS: Final = partial(
    _integer, low=1, high=MAX_MIN_CALLS, what=f"an integer from 1 to {MAX_MIN_CALLS}"
)
_STRATEGIES: Final = ", ".join(Strategy)


def _strategy(value: object) -> Strategy:
    name = _text(value)
    try:
        return Strategy(name)
    except ValueError:
        _fail(f"unknown strategy '{name}' (expected one of: {_STRATEGIES})")


def _failure_ratio(value: object) -> Decimal:
    ratio = _decimal(value, positive=True)
    if ratio > 1:
        _fail("must be at most 1 (a share of the calls in the window)")
    return ratio


def _min_margin(value: object) -> Decimal:
    """A share of the charge in [0, 1). A loss is allowed only on purpose: `null` on a service."""
    if value is None:
        _fail('expected a decimal string such as "0.10" (null, no floor, is for a service only)')
    margin = _decimal(value)
    if margin >= 1:
        _fail("must be less than 1: a floor of 1 or more refuses every route that costs anything")
    return margin


def _service_min_margin(value: object) -> Decimal | None:
    return None if value is None else _min_margin(value)


# --- Sections ------------------------------------------------------------------------------------


def _config(raw: object, *, base_dir: Path, env: Mapping[str, str]) -> Config:
    found = _Found()
    _substitute(raw, "", env, found)
    required = {"listen": _listener, "metrics": _listener, "database": _database}
    required |= {"currency": _currency, "providers": _table, "services": _table}
    optional = {"fx": _fx, "sync": _sync, "limits": _limits, "health": _health, "routing": _routing}
    top = found.check("", lambda value: _fields(value, found, required, optional), raw) or {}
    if top.get("listen") and top.get("listen") == top.get("metrics"):
        found.add("metrics", "same host and port as listen")
    currency, fx = top.get("currency"), top.get("fx", {})
    if fx and currency in fx:
        found.add(f"fx.{currency}", f"{currency} is the base currency: it needs no rate")
    # Routes are checked against every provider declared, valid or not, so that one bad
    # provider does not also turn each of its routes into an error.
    declared = set(top.get("providers") or ()) or None
    if declared:
        check = partial(_providers, currency, fx)
        top["providers"] = found.check("providers", check, top["providers"])
    if top.get("services"):
        # A service without its own strategy takes routing's; unknown when `routing` is broken.
        routing = top.get("routing", Routing())
        default = routing.strategy if routing else None
        services = partial(_services, declared, default)
        top["services"] = found.check("services", services, top["services"])
    found.done()
    for key in ("providers", "services", "fx"):
        top[key] = MappingProxyType(top.get(key, {}))
    top["database"] = (base_dir / top["database"]).resolve()
    return Config(**top)


def _listener(value: object) -> Listener:
    found = _Found()
    fields = _fields(value, found, {"host": _text, "port": _PORT})
    found.done()
    return Listener(**fields)


def _sync(value: object) -> Sync:
    found = _Found()
    checks: dict[str, _Check] = dict.fromkeys(_SYNC_KEYS, _seconds)
    checks["calls_in_flight"] = partial(_integer, low=1, high=64, what="an integer from 1 to 64")
    fields = _fields(value, found, _NO_CHECKS, checks)
    found.done()
    return Sync(**fields)


def _limits(value: object) -> Limits:
    found = _Found()
    per_minute = partial(
        _integer, low=1, high=MAX_PER_MINUTE, what=f"a positive integer up to {MAX_PER_MINUTE}"
    )
    checks: dict[str, _Check] = dict.fromkeys(("add", "status", "other"), per_minute)
    checks["in_flight"] = partial(
        _integer, low=1, high=MAX_IN_FLIGHT, what=f"a positive integer up to {MAX_IN_FLIGHT}"
    )
    fields = _fields(value, found, _NO_CHECKS, checks)
    found.done()
    return Limits(**fields)


def _health(value: object) -> Health:
    found = _Found()
    checks: dict[str, _Check] = {"window": _seconds, "cooldown": _seconds}
    checks |= {"min_calls": _MIN_CALLS, "failure_ratio": _failure_ratio}
    fields = _fields(value, found, _NO_CHECKS, checks)
    found.done()
    return Health(**fields)


def _routing(value: object) -> Routing:
    found = _Found()
    fields = _fields(value, found, _NO_CHECKS, {"strategy": _strategy, "min_margin": _min_margin})
    found.done()
    return Routing(**fields)


def _fx(value: object) -> dict[str, Decimal]:
    found = _Found()
    rates: dict[str, Decimal] = {}
    for code, rate in _mapping(value).items():
        if not isinstance(code, str) or not _CURRENCY.fullmatch(code):
            found.add(str(code), "expected a currency code of 3 capital letters")
        rates[str(code)] = found.check(str(code), _FX_RATE, rate)
    found.done()
    return rates


def _providers(
    currency: str | None, fx: Mapping[str, Decimal] | None, table: dict[Any, Any]
) -> dict[str, Provider]:
    found = _Found()
    providers: dict[str, Provider] = {}
    for name, value in table.items():
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            found.add(str(name), "expected a name of a-z, 0-9, _ and - (it is a metric label)")
        check = partial(_provider, str(name), currency, fx)
        providers[str(name)] = found.check(str(name), check, value)
    found.done()
    return providers


def _provider(
    name: str, currency: str | None, fx: Mapping[str, Decimal] | None, value: object
) -> Provider:
    found = _Found()
    required = {"url": _url, "key": lambda key: Secret(_text(key))}
    optional: dict[str, _Check] = {"timeout": _seconds, "currency": _currency}
    optional["daily_spend_cap"] = _SPEND_CAP
    fields = _fields(value, found, required, optional)
    own = fields.setdefault("currency", currency)
    # Without a valid top-level currency and fx table there is nothing sound to compare.
    if own and currency and fx is not None and own != currency and own not in fx:
        found.add("currency", f"no fx rate for {own}")
    found.done()
    return Provider(name=name, **fields)


def _services(
    declared: set[Any] | None, default: Strategy | None, table: dict[Any, Any]
) -> dict[int, Service]:
    found = _Found()
    services: dict[int, Service] = {}
    for key, value in table.items():
        service_id = _service_id(key)
        if service_id is None:
            found.add(str(key), f"expected a positive integer service ID, got {key!r}")
        elif service_id in services:
            found.add(str(key), f"service ID {service_id} is defined twice")
        check = partial(_service, service_id or 0, declared, default)
        service = found.check(str(key), check, value)
        if service_id is not None:
            services.setdefault(service_id, service)
    found.done()
    return services


def _service_id(key: object) -> int | None:
    """A service ID written as a YAML int or a string of digits; None if it is not one."""
    if isinstance(key, str) and _PLAIN_INT.fullmatch(key):
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool) and 1 <= key <= v2.MAX_ID:
        return key
    return None


def _service(
    service_id: int, declared: set[Any] | None, default: Strategy | None, value: object
) -> Service:
    """One service; `default` is routing.strategy (None when that is broken: not checked)."""
    found = _Found()
    required: dict[str, _Check] = {"name": _text, "category": _text, "type": _service_type}
    required |= {"rate": _RATE, "min": _QUANTITY, "max": _QUANTITY}
    required["route"] = partial(_route, declared)
    optional: dict[str, _Check] = dict.fromkeys(_SERVICE_FLAGS, _flag)
    optional |= {"strategy": _strategy, "min_margin": _service_min_margin}
    fields = _fields(value, found, required, optional)
    low, high, kind = fields.get("min"), fields.get("max"), fields.get("type")
    if low and high and low > high:
        found.add("min", f"min {low} is greater than max {high}")
    rate = fields.get("rate")
    # A flat-priced type charges `rate` once: at most 5 places and more than 0, never free.
    if rate and low and kind and v2.SERVICE_TYPES[kind].quantity != "flat":
        cheapest = rate * low / 1000
        if cheapest < _MINOR_UNIT:
            found.add(
                "rate",
                f"an order of min {low} at rate {rate} costs {cheapest:f}, less than "
                f"{_MINOR_UNIT:f} (the least amount charged): it would be free; raise rate or min",
            )
    if fields.get("dripfeed") and kind and not v2.SERVICE_TYPES[kind].dripfeed:
        found.add("dripfeed", f"type '{kind}' does not support drip-feed")
    # A weighted draw over routes without weights would be a guess: say so where it is missing.
    strategy = fields.get("strategy", default)
    if strategy is Strategy.WEIGHTED:
        why = "strategy" if "strategy" in fields else "routing.strategy"
        for index, route in enumerate(fields.get("route") or ()):
            if route.weight is None:
                found.add(f"route[{index}].weight", f"required key is missing ({why}: weighted)")
    found.done()
    return Service(id=service_id, **{**_SERVICE_FLAGS, **fields})


def _route(declared: set[Any] | None, value: object) -> tuple[Route, ...]:
    """Ranked entries {provider, service, weight}: known providers, each at most once."""
    if not isinstance(value, list):
        _fail(f"expected a list of {{provider, service}}, got {_kind(value)}")
    if not value:
        _fail("must list at least one provider")
    found = _Found()
    earlier: list[str] = []
    check = partial(_hop, declared, earlier)
    routes = [found.check(f"[{index}]", check, item) for index, item in enumerate(value)]
    found.done()
    return tuple(routes)


def _hop(declared: set[Any] | None, earlier: list[str], value: object) -> Route:
    """One entry of a route; `earlier` collects the providers named before it."""
    found = _Found()
    fields = _fields(
        value, found, {"provider": _text, "service": _UPSTREAM_ID}, {"weight": _WEIGHT}
    )
    name = fields.get("provider")
    if name and declared is not None and name not in declared:
        found.add("provider", f"unknown provider '{name}'")
    elif name and name in earlier:
        found.add("provider", f"provider '{name}' is already in this route")
    if name:
        earlier.append(name)
    found.done()
    return Route(**fields)
