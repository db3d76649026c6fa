"""Hot reload: what a new config may change in a running server, and how the CLI asks for one.

Usage::

    problems = refusals(running, new)          # [] or why `new` needs a restart
    changes = compare(running, new)            # providers and services added, removed, changed
    write_pid_file(pid_path(config.database))  # `serve`, at start (remove_pid_file at exit)
    result = await request_reload(config)      # `smm-router reload`: SIGHUP through the PID file

A reload (SIGHUP, or `smm-router reload`) re-reads the config file. One that fails `check`, or
that changes what only a restart can change (RESTART_ONLY), is refused whole: the running config
stays, so what runs is always exactly one file. router.app.apply_config applies the others:
services, providers, fx, sync intervals, limits, health and routing.

The PID file `<database>.pid` names the `serve` process of that database while it runs. It is
how `smm-router reload` finds the server, and, reading the server's
`smm_router_config_reloads_total` before and after the signal, tells the operator whether the
reload was applied or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.config import Config, Listener, Provider

PID_SUFFIX: Final = ".pid"
RELOAD_ANSWER_SECONDS: Final = 10.0  # how long `smm-router reload` waits for the outcome
METRICS_READ_SECONDS: Final = 3.0
_POLL_SECONDS: Final = 0.05
RELOADS_METRIC: Final = "smm_router_config_reloads_total"
# The process names a PID file may belong to (`smm-router serve`, `python -m router serve`).
_SERVER_MARK: Final = b"router"
# Listeners on every address are reached on loopback by the CLI of the same host.
_ANY_ADDRESS: Final = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
# What only a restart can change: (Config field, what it is).
RESTART_ONLY: Final = (
    ("listen", "the reseller API listener"),
    ("metrics", "the metrics listener"),
    ("database", "the database"),
    ("currency", "the currency every stored balance and charge is in"),
)


def _listener(listener: Listener) -> str:
    return f"{listener.host}:{listener.port}"


def refusals(running: Config, new: Config) -> list[str]:
    """Why `new` cannot replace `running` without a restart, one problem per changed key."""
    problems = []
    for key, what in RESTART_ONLY:
        before, after = getattr(running, key), getattr(new, key)
        if before != after:
            if isinstance(before, Listener):
                before, after = _listener(before), _listener(after)
            problems.append(
                f"{key}: changed from {before} to {after}: {what} changes only with a restart"
            )
    return problems


@dataclass(frozen=True, slots=True)
class Changes:
    """What a new config changes, by provider and by service (for the log and the holders)."""

    providers_added: frozenset[str]
    providers_removed: frozenset[str]
    providers_changed: frozenset[str]  # any setting: url, key, timeout, currency, cap
    # Added, or a different server or account (url, key or currency): what was learnt of the
    # old one (health, funds, catalogue size) does not hold for it.
    providers_fresh: frozenset[str]
    services_added: frozenset[int]
    services_removed: frozenset[int]
    services_changed: frozenset[int]

    def summary(self) -> dict[str, list[str] | list[int]]:
        """The non-empty changes, sorted: the fields of the `config_reloaded` log line."""
        changes: dict[str, list[str] | list[int]] = {
            "providers_added": sorted(self.providers_added),
            "providers_removed": sorted(self.providers_removed),
            "providers_changed": sorted(self.providers_changed),
            "services_added": sorted(self.services_added),
            "services_removed": sorted(self.services_removed),
            "services_changed": sorted(self.services_changed),
        }
        return {name: values for name, values in changes.items() if values}


def _identity(provider: Provider) -> tuple[str, str, str]:
    """What makes a provider the same server and account: its health and funds carry over."""
    return provider.url, provider.key.value, provider.currency


def compare(running: Config, new: Config) -> Changes:
    old_p, new_p = running.providers, new.providers
    old_s, new_s = running.services, new.services
    kept = old_p.keys() & new_p.keys()
    added = frozenset(new_p.keys() - old_p.keys())
    return Changes(
        providers_added=added,
        providers_removed=frozenset(old_p.keys() - new_p.keys()),
        providers_changed=frozenset(name for name in kept if old_p[name] != new_p[name]),
        providers_fresh=added
        | {name for name in kept if _identity(old_p[name]) != _identity(new_p[name])},
        services_added=frozenset(new_s.keys() - old_s.keys()),
        services_removed=frozenset(old_s.keys() - new_s.keys()),
        services_changed=frozenset(
            service for service in old_s.keys() & new_s.keys() if old_s[service] != new_s[service]
        ),
    )


def sync_config(new: Config, previous: Config, retiring: Iterable[str]) -> Config:
    """The status sync's config: `new`, keeping from `previous` (the sync's config until now)
    the settings of the `retiring` providers (removed while they had open orders), the fx rates
    of their currencies, and the services gone from `new` (their open orders still end, and a
    package's is not refunded as a counted order would be)."""
    retiring = [name for name in retiring if name not in new.providers]
    providers = {**new.providers, **{name: previous.providers[name] for name in retiring}}
    kept_fx = {
        currency: rate
        for currency, rate in previous.fx.items()
        if currency not in new.fx
        and any(previous.providers[n].currency == currency for n in retiring)
    }
    services = {**new.services}
    services.update((key, s) for key, s in previous.services.items() if key not in new.services)
    return replace(
        new,
        providers=MappingProxyType(providers),
        fx=MappingProxyType({**new.fx, **kept_fx}),
        services=MappingProxyType(services),
    )


# --- The PID file --------------------------------------------------------------------------------


class NoServer(Exception):
    """No running server to signal: the message says what was found instead."""


def pid_path(database: Path) -> Path:
    """`<database>.pid`, next to the database: one server per database."""
    return database.with_name(database.name + PID_SUFFIX)


def write_pid_file(path: Path, pid: int | None = None) -> int | None:
    """Write this process's PID (or `pid`) to `path`, replacing what is there; the PID that was
    there when its process still runs (another server on this database), else None."""
    pid = os.getpid() if pid is None else pid
    previous = None
    with contextlib.suppress(NoServer):
        previous = running_server(path)
    if previous == pid:
        previous = None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(f"{pid}\n", encoding="ascii")
    partial.replace(path)  # whole or not at all: a reader never sees half a PID
    return previous


def remove_pid_file(path: Path, pid: int | None = None) -> None:
    """Remove `path` if it still names this process (or `pid`): another server may own it now."""
    pid = os.getpid() if pid is None else pid
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="ascii").strip()) == pid:
            path.unlink()


def running_server(path: Path) -> int:
    """The PID in `path` if its process runs and is smm-router; raise NoServer otherwise."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise NoServer(f"no PID file at {path}: is `smm-router serve` running?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoServer(f"cannot read the PID file {path}: {exc}") from None
    if not text.isdecimal() or int(text) == 0:  # kill(0) would signal our own process group
        raise NoServer(f"the PID file {path} holds no process ID: {text[:40]!r}")
    pid = int(text)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        raise NoServer(
            f"stale PID file {path}: process {pid} is gone (the server is not running; "
            "a server that stops cleanly removes it)"
        ) from None
    except PermissionError:
        raise NoServer(
            f"process {pid} (from {path}) belongs to another user: run this as the server's user"
        ) from None
    cmdline = Path(f"/proc/{pid}/cmdline")
    with contextlib.suppress(OSError):  # no /proc (not Linux): the signal-0 check must do
        if _SERVER_MARK not in cmdline.read_bytes():
            raise NoServer(
                f"stale PID file {path}: process {pid} is not smm-router (its PID was reused)"
            )
    return pid


# --- `smm-router reload` -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadResult:
    pid: int
    outcome: str | None  # applied, refused; None when the server's metrics did not tell
    why_unknown: str = ""  # when `outcome` is None


def metrics_url(config: Config) -> str:
    host = _ANY_ADDRESS.get(config.metrics.host, config.metrics.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.metrics.port}/metrics"


async def reload_counts(http: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """`smm_router_config_reloads_total` by outcome from a metrics listener; None when it does
    not answer with them."""
    try:
        async with http.get(url) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    counts = {
        sample.labels.get("outcome", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == RELOADS_METRIC
    }
    return counts or None


async def request_reload(
    config: Config, *, within: float = RELOAD_ANSWER_SECONDS, url: str | None = None
) -> ReloadResult:
    """Signal the server of `config`'s database to reload (raise NoServer when none runs),
    then wait up to `within` seconds for its metrics to count the outcome."""
    pid = running_server(pid_path(config.database))
    url = url or metrics_url(config)
    timeout = aiohttp.ClientTimeout(total=METRICS_READ_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        before = await reload_counts(http, url)
        os.kill(pid, signal.SIGHUP)
        if before is None:  # another metrics address, or not reachable from here
            return ReloadResult(pid, None, f"its metrics at {url} did not answer")
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_SECONDS)
            after = await reload_counts(http, url) or {}
            for outcome in ("refused", "applied"):
                if after.get(outcome, 0.0) > before.get(outcome, 0.0):
                    return ReloadResult(pid, outcome)
    return ReloadResult(pid, None, f"its metrics at {url} counted no reload within {within:g} s")
