"""The routing table: every rule with its exact path and message, ${VAR}, secrets, shipped files."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import (
    DEFAULT_UPSTREAM_TIMEOUT,
    INHERIT,
    Config,
    ConfigError,
    Health,
    Limits,
    Route,
    Routing,
    Secret,
    Strategy,
    Sync,
    default_config_path,
    load,
    parse,
)
from router.v2 import SERVICE_TYPES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
ENV = {"ALPHA_API_KEY": "alpha-s3cret-key", "BETA_API_KEY": "beta-s3cret-key"}
BASE_DIR = Path("/srv/router/config")
SUPPORTED = ", ".join(name for name in SERVICE_TYPES if name != "Subscriptions")


def base() -> dict[str, Any]:
    """A valid config as data: two providers (one billing in EUR), two services."""
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "metrics": {"host": "127.0.0.1", "port": 9464},
        "database": "../var/router.db",
        "currency": "USD",
        "providers": {
            "alpha": {"url": "https://alpha.example/api/v2", "key": "${ALPHA_API_KEY}"},
            "beta": {
                "url": "http://beta.example:8000/api/v2",
                "key": "${BETA_API_KEY}",
                "timeout": 7.5,
                "currency": "EUR",
            },
        },
        "fx": {"EUR": "1.08"},
        "services": {
            1: service(
                "Default",
                refill=True,
                cancel=True,
                dripfeed=True,
                route=[{"provider": "alpha", "service": 101}, {"provider": "beta", "service": 7}],
            ),
            12: service(
                "Package",
                rate="2.5",
                min=1,
                max=1,
                route=[{"provider": "beta", "service": 12}, {"provider": "alpha", "service": 300}],
            ),
        },
    }


def service(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": f"{kind} service",
        "category": "Instagram",
        "type": kind,
        "rate": "0.90",
        "min": 50,
        "max": 10000,
        "route": [{"provider": "alpha", "service": 101}],
    } | fields


def dump(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def check(data: object, env: dict[str, str] = ENV, base_dir: Path = BASE_DIR) -> Config:
    return parse(data if isinstance(data, str) else dump(data), base_dir=base_dir, env=env)


def errors(data: object, env: dict[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check(data, env)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# --- Edits of the base config, addressed by dotted paths ("services.1.route.0.provider") ----------

Edit = Callable[[dict[str, Any]], None]


def locate(data: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The container holding `path`'s last part, and that part (digits address ints)."""
    parts: list[Any] = [int(part) if part.isdigit() else part for part in path.split(".")]
    node: Any = data
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def put(path: str, value: object) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        node, key = locate(data, path)
        node[key] = value

    return edit


def drop(path: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        node, key = locate(data, path)
        del node[key]

    return edit


def edited(*edits: Edit) -> dict[str, Any]:
    data = base()
    for edit in edits:
        edit(data)
    return data


ZERO_RATE = "must be greater than 0: a rate of 0 gives every order away"


def free_order(low: int, rate: str, cost: str) -> str:
    return (
        f"an order of min {low} at rate {rate} costs {cost}, less than 0.00001 "
        "(the least amount charged): it would be free; raise rate or min"
    )


FLOAT_RATE = 'expected a decimal string such as "0.90", got a float (floats lose money)'
URL = "expected an http:// or https:// URL with a host"
PORT = "expected a port number from 1 to 65535"
QUANTITY = "expected a positive integer up to 1000000000"
SECONDS = "expected a positive number of seconds"
CURRENCY = "expected a currency code of 3 capital letters"
PER_MINUTE = "expected a positive integer up to 1000000"
SUBSCRIPTIONS = "type 'Subscriptions' is not supported yet (it needs per-post billing)"
STRATEGY = "(expected one of: ranked, cheapest, weighted, quality)"
MARGIN_NULL = 'expected a decimal string such as "0.10" (null, no floor, is for a service only)'
MARGIN_HIGH = "must be less than 1: a floor of 1 or more refuses every route that costs anything"
WEIGHT = "expected a positive integer weight up to 1000000"

RULES = [
    # top level
    (put("colour", "red"), "colour: unknown key"),
    (drop("listen"), "listen: required key is missing"),
    (drop("metrics"), "metrics: required key is missing"),
    (drop("database"), "database: required key is missing"),
    (drop("currency"), "currency: required key is missing"),
    (drop("providers"), "providers: required key is missing"),
    (drop("services"), "services: required key is missing"),
    # listen and metrics
    (put("listen", "127.0.0.1:8080"), "listen: expected a mapping, got a string"),
    (put("listen.tls", True), "listen.tls: unknown key"),
    (drop("metrics.host"), "metrics.host: required key is missing"),
    (put("listen.host", ""), "listen.host: must not be empty"),
    (put("listen.port", 70000), f"listen.port: {PORT}, got 70000"),
    (put("listen.port", 0), f"listen.port: {PORT}, got 0"),
    (put("metrics.port", "9464"), f"metrics.port: {PORT}, got a string"),
    (put("metrics.port", True), f"metrics.port: {PORT}, got a boolean"),
    (put("metrics.port", 8080), "metrics: same host and port as listen"),
    # database and currency
    (
        put("database", ":memory:"),
        "database: expected a file path: ':memory:' would lose every order on restart",
    ),
    (put("database", 5), "database: expected a string, got an integer"),
    (put("currency", "usd"), f"currency: {CURRENCY}"),
    (put("currency", "EUR"), "fx.EUR: EUR is the base currency: it needs no rate"),
    # providers
    (put("providers", {}), "providers: must not be empty"),
    (put("providers", ["alpha"]), "providers: expected a mapping, got a list"),
    (
        put("providers.Gamma", {"url": "https://gamma.example", "key": "k"}),
        "providers.Gamma: expected a name of a-z, 0-9, _ and - (it is a metric label)",
    ),
    (put("providers.alpha.colour", "red"), "providers.alpha.colour: unknown key"),
    (drop("providers.alpha.url"), "providers.alpha.url: required key is missing"),
    (put("providers.alpha.url", "ftp://alpha.example/api/v2"), f"providers.alpha.url: {URL}"),
    (put("providers.alpha.url", "https:///api/v2"), f"providers.alpha.url: {URL}"),
    (put("providers.alpha.url", "alpha.example/api/v2"), f"providers.alpha.url: {URL}"),
    (put("providers.alpha.url", "https://alpha.example:x/v2"), f"providers.alpha.url: {URL}"),
    (put("providers.alpha.url", "https://alpha.example/a b"), f"providers.alpha.url: {URL}"),
    (drop("providers.alpha.key"), "providers.alpha.key: required key is missing"),
    (put("providers.alpha.key", ""), "providers.alpha.key: must not be empty"),
    (put("providers.alpha.key", 12345), "providers.alpha.key: expected a string, got an integer"),
    (
        put("providers.alpha.key", "${GAMMA_API_KEY}"),
        "providers.alpha.key: environment variable GAMMA_API_KEY is not set",
    ),
    (
        put("providers.alpha.key", "${ALPHA_API_KEY"),
        "providers.alpha.key: malformed ${...} reference: write ${NAME}",
    ),
    (
        put("providers.alpha.key", "${ALPHA-API-KEY}"),
        "providers.alpha.key: malformed ${...} reference: write ${NAME}",
    ),
    (put("providers.alpha.timeout", 0), f"providers.alpha.timeout: {SECONDS}, got 0"),
    (put("providers.alpha.timeout", -1.5), f"providers.alpha.timeout: {SECONDS}, got -1.5"),
    (put("providers.alpha.timeout", "15"), f"providers.alpha.timeout: {SECONDS}, got a string"),
    (put("providers.alpha.currency", "dollar"), f"providers.alpha.currency: {CURRENCY}"),
    (put("providers.beta.currency", "GBP"), "providers.beta.currency: no fx rate for GBP"),
    (
        put("providers.alpha.daily_spend_cap", "0"),
        "providers.alpha.daily_spend_cap: must be greater than 0",
    ),
    (
        put("providers.alpha.daily_spend_cap", "-5"),
        "providers.alpha.daily_spend_cap: must be greater than 0",
    ),
    (
        put("providers.alpha.daily_spend_cap", 500.5),
        f"providers.alpha.daily_spend_cap: {FLOAT_RATE}",
    ),
    (
        put("providers.alpha.daily_spend_cap", None),
        'providers.alpha.daily_spend_cap: expected a decimal string such as "0.90", got nothing',
    ),
    (
        put("providers.alpha.daily_spend_cap", "0.000001"),
        "providers.alpha.daily_spend_cap: has 6 decimal places, at most 5 are allowed",
    ),
    (drop("fx"), "providers.beta.currency: no fx rate for EUR"),
    # fx
    (put("fx", ["EUR"]), "fx: expected a mapping, got a list"),
    (put("fx.EUR", 1.08), f"fx.EUR: {FLOAT_RATE}"),
    (put("fx.EUR", "0"), "fx.EUR: must be greater than 0"),
    (put("fx.EUR", "-1.08"), "fx.EUR: must be greater than 0"),
    (put("fx.eur", "1.1"), f"fx.eur: {CURRENCY}"),
    # sync
    (put("sync", None), "sync: expected a mapping, got nothing"),
    (put("sync", {"speed": 3}), "sync.speed: unknown key"),
    (put("sync", {"status_interval": 0}), f"sync.status_interval: {SECONDS}, got 0"),
    (put("sync", {"balance_interval": "60"}), f"sync.balance_interval: {SECONDS}, got a string"),
    (put("sync", {"old_order_age": -5}), f"sync.old_order_age: {SECONDS}, got -5"),
    (
        put("sync", {"calls_in_flight": 0}),
        "sync.calls_in_flight: expected an integer from 1 to 64, got 0",
    ),
    (
        put("sync", {"calls_in_flight": 1.5}),
        "sync.calls_in_flight: expected an integer from 1 to 64, got a float",
    ),
    # limits
    (put("limits", None), "limits: expected a mapping, got nothing"),
    (put("limits", {"refill": 60}), "limits.refill: unknown key"),
    (put("limits", {"add": 0}), f"limits.add: {PER_MINUTE}, got 0"),
    (put("limits", {"status": -1}), f"limits.status: {PER_MINUTE}, got -1"),
    (put("limits", {"other": "600"}), f"limits.other: {PER_MINUTE}, got a string"),
    (put("limits", {"add": 1.5}), f"limits.add: {PER_MINUTE}, got a float"),
    (put("limits", {"add": True}), f"limits.add: {PER_MINUTE}, got a boolean"),
    (put("limits", {"add": 10**7}), f"limits.add: {PER_MINUTE}, got 10000000"),
    (
        put("limits", {"in_flight": 0}),
        "limits.in_flight: expected a positive integer up to 10000, got 0",
    ),
    # health
    (put("health", None), "health: expected a mapping, got nothing"),
    (put("health", {"speed": 3}), "health.speed: unknown key"),
    (put("health", {"window": 0}), f"health.window: {SECONDS}, got 0"),
    (put("health", {"cooldown": "30"}), f"health.cooldown: {SECONDS}, got a string"),
    (
        put("health", {"min_calls": 0}),
        "health.min_calls: expected an integer from 1 to 10000, got 0",
    ),
    (
        put("health", {"min_calls": 2.5}),
        "health.min_calls: expected an integer from 1 to 10000, got a float",
    ),
    (put("health", {"failure_ratio": 0.5}), f"health.failure_ratio: {FLOAT_RATE}"),
    (put("health", {"failure_ratio": "0"}), "health.failure_ratio: must be greater than 0"),
    (
        put("health", {"failure_ratio": "1.5"}),
        "health.failure_ratio: must be at most 1 (a share of the calls in the window)",
    ),
    # routing
    (put("routing", "ranked"), "routing: expected a mapping, got a string"),
    (put("routing", {"colour": "red"}), "routing.colour: unknown key"),
    (
        put("routing", {"strategy": "fastest"}),
        f"routing.strategy: unknown strategy 'fastest' {STRATEGY}",
    ),
    (
        put("routing", {"strategy": "Ranked"}),
        f"routing.strategy: unknown strategy 'Ranked' {STRATEGY}",
    ),
    (put("routing", {"min_margin": None}), f"routing.min_margin: {MARGIN_NULL}"),
    (put("routing", {"min_margin": "1"}), f"routing.min_margin: {MARGIN_HIGH}"),
    (put("routing", {"min_margin": "-0.05"}), "routing.min_margin: must not be negative"),
    (put("routing", {"min_margin": 0.1}), f"routing.min_margin: {FLOAT_RATE}"),
    # services: IDs and keys
    (put("services", {}), "services: must not be empty"),
    (put("services", [service("Default")]), "services: expected a mapping, got a list"),
    (
        put("services.abc", service("Default")),
        "services.abc: expected a positive integer service ID, got 'abc'",
    ),
    (
        put("services.0", service("Default")),
        "services.0: expected a positive integer service ID, got 0",
    ),
    (
        put("services.-4", service("Default")),
        "services.-4: expected a positive integer service ID, got '-4'",
    ),
    (put("services.1", "Followers"), "services.1: expected a mapping, got a string"),
    (put("services.1.colour", "red"), "services.1.colour: unknown key"),
    (drop("services.1.name"), "services.1.name: required key is missing"),
    (drop("services.1.rate"), "services.1.rate: required key is missing"),
    (drop("services.1.route"), "services.1.route: required key is missing"),
    (put("services.1.name", "  "), "services.1.name: must not be empty"),
    (put("services.1.category", None), "services.1.category: expected a string, got nothing"),
    # type
    (
        put("services.3", service("Subscriptions")),
        f"services.3.type: {SUBSCRIPTIONS}",
    ),
    (
        put("services.12.type", "Likes"),
        f"services.12.type: unknown type 'Likes' (expected one of: {SUPPORTED})",
    ),
    # rate
    (put("services.1.rate", 0.9), f"services.1.rate: {FLOAT_RATE}"),
    (put("services.1.rate", "-0.90"), "services.1.rate: must not be negative"),
    (put("services.1.rate", -1), "services.1.rate: must not be negative"),
    (
        put("services.1.rate", "0.123456"),
        "services.1.rate: has 6 decimal places, at most 5 are allowed",
    ),
    (put("services.1.rate", "1e3"), 'services.1.rate: expected a decimal number such as "0.90"'),
    (put("services.1.rate", "0,90"), 'services.1.rate: expected a decimal number such as "0.90"'),
    (
        put("services.1.rate", True),
        'services.1.rate: expected a decimal string such as "0.90", got a boolean',
    ),
    (put("services.1.rate", "0"), f"services.1.rate: {ZERO_RATE}"),
    (put("services.1.rate", "0.00000"), f"services.1.rate: {ZERO_RATE}"),
    (put("services.12.rate", 0), f"services.12.rate: {ZERO_RATE}"),
    (
        [put("services.1.rate", "0.00019"), put("services.1.min", 50)],  # 0.0000095 per order
        f"services.1.rate: {free_order(50, '0.00019', '0.0000095')}",
    ),
    (
        put("services.3", service("Custom Comments", rate="0.00999", min=1)),
        f"services.3.rate: {free_order(1, '0.00999', '0.00000999')}",
    ),
    # min and max
    (
        [put("services.1.min", 500), put("services.1.max", 100)],
        "services.1.min: min 500 is greater than max 100",
    ),
    (put("services.1.min", 0), f"services.1.min: {QUANTITY}, got 0"),
    (put("services.1.max", 10**10), f"services.1.max: {QUANTITY}, got 10000000000"),
    (put("services.1.max", "100"), f"services.1.max: {QUANTITY}, got a string"),
    (put("services.12.min", 2.0), f"services.12.min: {QUANTITY}, got a float"),
    # flags
    (put("services.1.refill", "yes"), "services.1.refill: expected true or false, got a string"),
    (put("services.1.cancel", 1), "services.1.cancel: expected true or false, got an integer"),
    (
        put("services.12.dripfeed", True),
        "services.12.dripfeed: type 'Package' does not support drip-feed",
    ),
    # route
    (put("services.1.route", []), "services.1.route: must list at least one provider"),
    (
        put("services.1.route", {"provider": "alpha", "service": 1}),
        "services.1.route: expected a list of {provider, service}, got a mapping",
    ),
    (put("services.1.route.0", "alpha"), "services.1.route[0]: expected a mapping, got a string"),
    (put("services.1.route.0.weight", 0), f"services.1.route[0].weight: {WEIGHT}, got 0"),
    (put("services.1.route.0.weight", "70"), f"services.1.route[0].weight: {WEIGHT}, got a string"),
    (put("services.1.route.0.weight", 0.7), f"services.1.route[0].weight: {WEIGHT}, got a float"),
    (
        put("services.1.route.0.weight", 10**7),
        f"services.1.route[0].weight: {WEIGHT}, got 10000000",
    ),
    # strategy, min_margin and weights
    (
        put("services.1.strategy", "best"),
        f"services.1.strategy: unknown strategy 'best' {STRATEGY}",
    ),
    (put("services.1.strategy", None), "services.1.strategy: expected a string, got nothing"),
    (put("services.1.min_margin", "1.5"), f"services.1.min_margin: {MARGIN_HIGH}"),
    (put("services.1.min_margin", "-1"), "services.1.min_margin: must not be negative"),
    (put("services.1.min_margin", 0.2), f"services.1.min_margin: {FLOAT_RATE}"),
    (
        [put("services.12.strategy", "weighted"), put("services.12.route.0.weight", 3)],
        "services.12.route[1].weight: required key is missing (strategy: weighted)",
    ),
    (drop("services.1.route.0.service"), "services.1.route[0].service: required key is missing"),
    (
        put("services.12.route.1.provider", "gamma"),
        "services.12.route[1].provider: unknown provider 'gamma'",
    ),
    (
        put("services.12.route.1.provider", "beta"),
        "services.12.route[1].provider: provider 'beta' is already in this route",
    ),
    (
        put("services.1.route.0.service", 0),
        "services.1.route[0].service: expected a positive integer service ID, got 0",
    ),
    (
        put("services.1.route.0.service", "101"),
        "services.1.route[0].service: expected a positive integer service ID, got a string",
    ),
]


@pytest.mark.parametrize(("edits", "expected"), RULES, ids=[rule[1] for rule in RULES])
def test_each_rule_reports_its_path_and_message(edits: Edit | list[Edit], expected: str) -> None:
    """Each broken rule gives exactly one error: no cascade from one mistake into others."""
    assert errors(edited(*(edits if isinstance(edits, list) else [edits]))) == [expected]


def test_the_base_config_loads_into_typed_values() -> None:
    config = check(base())
    assert config.listen.port == 8080 and config.metrics.port == 9464
    assert config.database == Path("/srv/router/var/router.db")
    assert config.currency == "USD" and config.fx == {"EUR": Decimal("1.08")}
    alpha, beta = config.providers["alpha"], config.providers["beta"]
    assert alpha.key == Secret("alpha-s3cret-key") and alpha.timeout == DEFAULT_UPSTREAM_TIMEOUT
    assert alpha.currency == "USD" and beta.currency == "EUR" and beta.timeout == 7.5
    assert list(config.services) == [1, 12]
    followers, package = config.services[1], config.services[12]
    assert followers.rate == Decimal("0.90") and str(followers.rate) == "0.90"
    assert (followers.refill, followers.cancel, followers.dripfeed) == (True, True, True)
    assert (package.refill, package.cancel, package.dripfeed) == (False, False, False)
    assert followers.route == (Route("alpha", 101), Route("beta", 7))
    assert config.sync == Sync()
    assert config.limits == Limits(add=600, status=1200, other=600, in_flight=32)
    with pytest.raises(TypeError):
        config.services[2] = followers  # type: ignore[index]


def test_the_cheapest_order_may_cost_exactly_one_minor_unit() -> None:
    config = check(
        edited(
            put("services.1.rate", "0.0002"),  # 50 x 0.0002 / 1000 = 0.00001
            put("services.12.rate", "0.00001"),  # a package: the rate is the price of one order
        )
    )
    assert config.services[1].rate == Decimal("0.0002")
    assert config.services[12].rate == Decimal("0.00001")


def test_rates_may_be_written_as_integers() -> None:
    config = check(edited(put("services.1.rate", 1), put("fx.EUR", 2)))
    assert config.services[1].rate == Decimal(1) and config.fx["EUR"] == Decimal(2)


def test_a_service_id_may_be_a_quoted_integer_and_becomes_an_int() -> None:
    text = dump(base()).replace("\n  12:\n", "\n  '12':\n")
    assert "'12':" in text
    assert list(check(text).services) == [1, 12]


def test_the_same_id_as_int_and_string_is_a_duplicate() -> None:
    data = base()
    data["services"]["1"] = service("Default")
    assert errors(data) == ["services.1: service ID 1 is defined twice"]


def test_sync_intervals_take_decimals_and_keep_defaults() -> None:
    config = check(edited(put("sync", {"status_interval": 0.2, "catalogue_interval": 60})))
    assert config.sync == Sync(status_interval=0.2, catalogue_interval=60.0)


def test_limits_keep_the_defaults_of_the_keys_left_out() -> None:
    config = check(edited(put("limits", {"add": 30, "in_flight": 4})))
    assert config.limits == Limits(add=30, status=1200, other=600, in_flight=4)


def test_health_and_routing_default_when_left_out() -> None:
    config = check(base())
    assert config.health == Health(window=60.0, min_calls=5, failure_ratio=Decimal("0.5"))
    assert config.health.cooldown == 30.0
    assert config.routing == Routing(strategy=Strategy.RANKED, min_margin=Decimal(0))
    assert config.providers["alpha"].daily_spend_cap is None
    followers = config.services[1]
    assert followers.strategy is None and followers.min_margin is INHERIT
    assert all(route.weight is None for route in followers.route)


def test_health_routing_caps_overrides_and_weights_load() -> None:
    config = check(
        edited(
            put("health", {"window": 0.5, "min_calls": 3, "failure_ratio": "1", "cooldown": 0.2}),
            put("routing", {"strategy": "cheapest", "min_margin": "0.05"}),
            put("providers.alpha.daily_spend_cap", "500"),
            put("providers.beta.daily_spend_cap", 20),
            put("services.1.strategy", "weighted"),
            put("services.1.min_margin", "0.10"),
            put("services.1.route.0.weight", 70),
            put("services.1.route.1.weight", 30),
            put("services.12.min_margin", None),
        )
    )
    assert config.health == Health(window=0.5, min_calls=3, failure_ratio=Decimal(1), cooldown=0.2)
    assert config.routing == Routing(strategy=Strategy.CHEAPEST, min_margin=Decimal("0.05"))
    assert config.providers["alpha"].daily_spend_cap == Decimal(500)
    assert config.providers["beta"].daily_spend_cap == Decimal(20)
    followers, package = config.services[1], config.services[12]
    assert followers.strategy is Strategy.WEIGHTED and followers.strategy == "weighted"
    assert followers.min_margin == Decimal("0.10")
    assert followers.route == (Route("alpha", 101, weight=70), Route("beta", 7, weight=30))
    assert package.strategy is None  # takes routing.strategy
    assert package.min_margin is None  # null: no floor for this service


def test_a_weight_is_allowed_on_a_service_that_does_not_use_it() -> None:
    """Switching a service to `weighted` and back is then a one-line change."""
    config = check(edited(put("services.1.route.0.weight", 5)))
    assert config.services[1].strategy is None
    assert config.services[1].route[0] == Route("alpha", 101, weight=5)


def test_a_weighted_default_needs_a_weight_on_every_route_that_inherits_it() -> None:
    data = edited(
        put("routing", {"strategy": "weighted"}),
        put("services.1.route.0.weight", 1),
        put("services.12.strategy", "ranked"),  # its own strategy: no weights needed
    )
    assert errors(data) == [
        "services.1.route[1].weight: required key is missing (routing.strategy: weighted)"
    ]
    data["services"][1]["route"][1]["weight"] = 2
    assert check(data).services[1].route[1].weight == 2


def test_a_broken_routing_section_does_not_also_fail_every_weight() -> None:
    assert errors(edited(put("routing", {"strategy": "weighed"}))) == [
        f"routing.strategy: unknown strategy 'weighed' {STRATEGY}"
    ]


def test_every_problem_is_reported_at_once() -> None:
    data = edited(
        put("colour", "red"),
        put("listen.port", 0),
        put("providers.alpha.key", "${NOPE}"),
        put("fx.EUR", "0"),
        put("services.1.rate", 0.9),
        put("services.1.min", 20_000),
        put("services.12.route.1.provider", "gamma"),
        put("services.3", service("Subscriptions")),
    )
    assert sorted(errors(data)) == sorted(
        [
            "colour: unknown key",
            f"listen.port: {PORT}, got 0",
            "providers.alpha.key: environment variable NOPE is not set",
            "fx.EUR: must be greater than 0",
            f"services.1.rate: {FLOAT_RATE}",
            "services.1.min: min 20000 is greater than max 10000",
            "services.12.route[1].provider: unknown provider 'gamma'",
            f"services.3.type: {SUBSCRIPTIONS}",
        ]
    )


def test_a_broken_provider_does_not_also_fail_its_routes() -> None:
    assert errors(edited(put("providers.alpha.url", "nope"))) == [f"providers.alpha.url: {URL}"]


# --- ${VAR} substitution -------------------------------------------------------------------------


def test_env_references_are_substituted_in_any_string_even_inside_one() -> None:
    env = ENV | {"ALPHA_HOST": "alpha.internal", "ALPHA_PORT": "8443", "BRAND": "Acme"}
    data = edited(
        put("providers.alpha.url", "https://${ALPHA_HOST}:${ALPHA_PORT}/api/v2"),
        put("services.1.name", "${BRAND} Followers"),
        put("listen.host", "${ALPHA_HOST}"),
    )
    config = check(data, env)
    assert config.providers["alpha"].url == "https://alpha.internal:8443/api/v2"
    assert config.providers["alpha"].key.value == "alpha-s3cret-key"
    assert config.services[1].name == "Acme Followers"
    assert config.listen.host == "alpha.internal"


def test_a_substituted_value_is_not_expanded_again() -> None:
    config = check(base(), ENV | {"ALPHA_API_KEY": "pa$${BETA_API_KEY}"})
    assert config.providers["alpha"].key.value == "pa$${BETA_API_KEY}"


def test_every_missing_variable_is_named_with_its_path() -> None:
    data = edited(put("services.1.name", "${BRAND} ${LINE} Followers"))
    assert errors(data) == [
        "services.1.name: environment variable BRAND is not set",
        "services.1.name: environment variable LINE is not set",
    ]


def test_an_empty_variable_gives_an_empty_key() -> None:
    env = ENV | {"ALPHA_API_KEY": ""}
    assert errors(base(), env) == ["providers.alpha.key: must not be empty"]


def test_a_rate_may_come_from_the_environment() -> None:
    config = check(edited(put("services.1.rate", "${RATE}")), ENV | {"RATE": "1.25"})
    assert config.services[1].rate == Decimal("1.25")


def test_load_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "router.yaml"
    path.write_text(dump(base()))
    assert load(path).providers["beta"].key.value == "beta-s3cret-key"
    monkeypatch.delenv("BETA_API_KEY")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == ["providers.beta.key: environment variable BETA_API_KEY is not set"]


# --- Secrets -------------------------------------------------------------------------------------


def test_keys_never_show_in_reprs() -> None:
    config = check(base())
    provider = config.providers["alpha"]
    shown = [repr(config), repr(provider), str(provider), repr(provider.key), str(provider.key)]
    shown.append(f"{provider.key}")
    for text in shown:
        assert "s3cret" not in text
    assert "**********" in repr(provider)
    assert provider.key.value == "alpha-s3cret-key"


def test_keys_never_show_in_errors() -> None:
    env = ENV | {"LINE": "s3cret-too"}
    data = edited(
        put("providers.alpha.colour", "${ALPHA_API_KEY}"),
        put("providers.alpha.url", "https://${ALPHA_API_KEY}@/v2"),
        put("providers.beta.key", 123456789),
        put("providers.beta.timeout", "${BETA_API_KEY}"),
        put("services.1.rate", "${LINE}"),
    )
    found = errors(data, env)
    assert len(found) == 5
    for text in found:
        assert "s3cret" not in text and "123456789" not in text


# --- Duplicate keys ------------------------------------------------------------------------------


def line_of(text: str, needle: str, start: int = 0) -> int:
    """The 1-based number of the first line at or after line `start` that starts with `needle`."""
    lines = text.splitlines()
    return next(n for n in range(start, len(lines)) if lines[n].startswith(needle)) + 1


def test_a_duplicate_top_level_key_is_refused() -> None:
    text = dump(base()) + "currency: USD\n"
    first = line_of(text, "currency:")
    second = line_of(text, "currency:", first)
    assert errors(text) == [f"currency: duplicate key on line {second} (first on line {first})"]


def test_a_duplicate_key_in_a_service_is_refused() -> None:
    text = dump(base()).replace("    rate: '0.90'\n", "    rate: '0.90'\n    rate: '9.00'\n", 1)
    first = line_of(text, "    rate: '0.90'")
    assert errors(text) == [
        f"services.1.rate: duplicate key on line {first + 1} (first on line {first})"
    ]


def test_a_duplicate_service_id_is_refused() -> None:
    text = dump(base()).replace("\n  12:\n", "\n  1:\n")
    first = line_of(text, "  1:")
    second = line_of(text, "  1:", first)
    assert errors(text) == [f"services.1: duplicate key on line {second} (first on line {first})"]


def test_duplicates_come_with_every_other_problem() -> None:
    text = dump(edited(put("listen.port", 0))) + "listen: {host: 127.0.0.1, port: 9464}\n"
    assert errors(text) == [
        f"listen: duplicate key on line {text.count(chr(10))} (first on line 1)",
        "metrics: same host and port as listen",
    ]


def test_merge_keys_work_and_may_be_overridden() -> None:
    services = """\
services:
  1: &followers
    name: Followers
    category: Instagram
    type: Default
    rate: "0.90"
    min: 50
    max: 10000
    route: [{provider: alpha, service: 101}]
  2: {<<: *followers, name: Followers HQ, rate: "1.80"}
"""
    text = dump({key: value for key, value in base().items() if key != "services"}) + services
    config = check(text)
    assert config.services[1].rate == Decimal("0.90") and config.services[1].name == "Followers"
    assert config.services[2].rate == Decimal("1.80") and config.services[2].name == "Followers HQ"
    assert config.services[2].route == config.services[1].route


def test_yaml_scalars_that_are_not_strings_are_refused() -> None:
    text = dump(base()).replace("name: Default service", "name: 2024-01-01", 1)
    assert errors(text) == ["services.1.name: expected a string, got a date"]


# --- YAML and file errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "(top level): expected a mapping, got nothing"),
        ("- listen\n", "(top level): expected a mapping, got a list"),
        (
            "listen: [1\nmetrics: 2\n",
            "<string>: line 2, column 8: expected ',' or ']', but got ':'",
        ),
        ("a: 1\n---\nb: 2\n", "<string>: line 2, column 1: but found another document"),
        ("a: 1\n b: 2\n", "<string>: line 2, column 3: mapping values are not allowed here"),
        ("? [a]\n: 1\n", "<string>: line 1, column 3: found unhashable key"),
    ],
)
def test_yaml_problems_are_config_errors(text: str, expected: str) -> None:
    found = errors(text)
    assert len(found) == 1 and found[0].startswith(expected)


def test_a_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("listen: {host: 127.0.0.1\n")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.errors[0].startswith(f"{path}: line 2, column 1: ")


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml", env={})
    assert info.value.errors == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    ]
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "latin1.yaml", env={})
    assert info.value.errors == [f"{tmp_path / 'latin1.yaml'}: cannot read: not UTF-8 text"]


# --- Paths ---------------------------------------------------------------------------------------


def test_a_relative_database_resolves_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "router"
    folder.mkdir(parents=True)
    path = folder / "router.yaml"
    path.write_text(dump(edited(put("database", "../../var/router.db"))))
    monkeypatch.chdir(tmp_path / "etc")
    assert load(path, env=ENV).database == (tmp_path / "var" / "router.db").resolve()
    relative = Path("router") / "router.yaml"  # a relative config path works as well
    assert load(relative, env=ENV).database == (tmp_path / "var" / "router.db").resolve()


def test_an_absolute_database_stays_as_written(tmp_path: Path) -> None:
    database = tmp_path / "db" / "router.db"
    config = check(edited(put("database", str(database))))
    assert config.database == database.resolve()


def test_the_default_config_path() -> None:
    assert default_config_path({}) == Path("config/router.yaml")
    assert default_config_path({"SMM_ROUTER_CONFIG": ""}) == Path("config/router.yaml")
    assert default_config_path({"SMM_ROUTER_CONFIG": "/etc/r.yaml"}) == Path("/etc/r.yaml")


# --- The shipped files ---------------------------------------------------------------------------


def env_for(path: Path) -> dict[str, str]:
    """A value for every ${VAR} the file names."""
    names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())
    return {name: f"{name.lower()}.example" for name in names}


def test_the_annotated_example_loads() -> None:
    path = CONFIG_DIR / "example.yaml"
    env = env_for(path)
    config = load(path, env=env)
    assert {"ALPHA_API_KEY", "BETA_API_KEY", "GAMMA_API_KEY"} <= env.keys()
    assert all(provider.key.value in env.values() for provider in config.providers.values())
    assert any(provider.currency in config.fx for provider in config.providers.values())
    assert "sync" in path.read_text() and config.fx
    assert len({service.type for service in config.services.values()}) >= 4
    assert any(len(service.route) > 1 for service in config.services.values())


def test_the_annotated_example_shows_health_strategies_floors_and_caps() -> None:
    path = CONFIG_DIR / "example.yaml"
    config = load(path, env=env_for(path))
    text = path.read_text()
    assert "health:" in text and "routing:" in text and config.health == Health()
    assert config.routing == Routing()
    services = config.services.values()
    assert {s.strategy for s in services} >= {
        Strategy.CHEAPEST,
        Strategy.WEIGHTED,
        Strategy.QUALITY,
    }
    assert any(s.min_margin is None for s in services)
    assert any(isinstance(s.min_margin, Decimal) for s in services)
    assert any(p.daily_spend_cap is not None for p in config.providers.values())


def test_the_local_config_loads() -> None:
    path = CONFIG_DIR / "router.yaml"
    config = load(path, env=env_for(path))
    assert config.providers and config.services
    assert config.database.is_absolute()


def test_the_version_follows_the_file_text(tmp_path: Path) -> None:
    """Each order records the version of the config that routed it: the same text gives the
    same version, any change another."""
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(base()))
    version = load(first, env=ENV).version
    assert len(version) == 12 and version == load(first, env=ENV).version
    first.write_text(first.read_text() + "\n# a comment is a change too\n")
    assert load(first, env=ENV).version not in ("", version)
