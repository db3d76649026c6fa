"""The aiohttp application: typed state, one cleanup context per resource, the two listeners.

Usage::

    app = create_app(config)                       # the reseller API (+ /healthz)
    runner = ApiRunner(app)                        # its listener: malformed HTTP answered in JSON
    await reload_config(app, path)                 # a hot reload: re-read, check, apply
    await serve(config, config_path=path)          # API and /metrics listeners until cancelled;
                                                   # SIGHUP reloads, `<database>.pid` names it
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from router import __version__, reload, v2
from router.api import V2Api, json_response
from router.call_log import CallLog
from router.config import Config, ConfigError
from router.config import load as load_config
from router.fleet import Fleet
from router.listeners import bind, start_sites
from router.metrics import Metrics
from router.orders import OrderDesk
from router.orders.placement import placement_bound
from router.store import SqlTrace, Store
from router.sync.orders import OrderSync
from router.sync.providers import ProviderWatcher
from router.upstream import UpstreamClient

log = structlog.get_logger("router.app")

CONNECTIONS_PER_PROVIDER: Final = 100
# An idle pooled connection is dropped before the upstream's server would close it (Apache's
# default is 5 s): an `add` written to a connection the server just closed fails with a reset,
# which is ambiguous and would hold the order.
UPSTREAM_KEEPALIVE_SECONDS: Final = 4.0
# aiohttp's parser refuses a request line or a header over 8 KiB by default: too little for a
# GET of 100 IDs (2 KiB) with a 2,048-character link percent-encoded (6 KiB in ASCII, 12 KiB in
# two-byte characters). Past these limits a request is malformed: a v2 JSON answer
# (V2RequestHandler).
MAX_REQUEST_LINE_BYTES: Final = 16 * 1024
MAX_HEADER_FIELD_BYTES: Final = 16 * 1024
API_PATHS: Final = ("/api/v2", "/api/v1", "/api/v2/", "/api/v1/")

CONFIG: Final = web.AppKey("config", Config)  # as the app was created; app[LIVE] after a reload
METRICS: Final = web.AppKey("metrics", Metrics)
STORE: Final = web.AppKey("store", Store)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
CLIENTS: Final = web.AppKey("clients", Mapping[str, UpstreamClient])  # at start; see LIVE
FLEET: Final = web.AppKey("fleet", Fleet)
DESK: Final = web.AppKey("desk", OrderDesk)
API: Final = web.AppKey("api", V2Api)
ORDER_SYNC: Final = web.AppKey("order_sync", OrderSync)
PROVIDER_WATCHER: Final = web.AppKey("provider_watcher", ProviderWatcher)
# Set before start-up to see every SQL statement the store runs (tests EXPLAIN them all).
SQL_TRACE: Final[web.AppKey[SqlTrace]] = web.AppKey("sql_trace")


@dataclass
class LiveConfig:
    """The config the app runs with now, and what is built from it.

    An app's state is frozen once it starts, so a reload (`apply_config`) replaces what this
    holds, never an app key. Until the first reload it holds what CONFIG and CLIENTS hold.
    """

    config: Config
    # The status sync's: `config` plus what it still needs of providers removed with open
    # orders (router.reload.sync_config), with their clients, and when each was removed.
    sync_config: Config
    clients: Mapping[str, UpstreamClient] = field(default_factory=dict)
    sync_clients: Mapping[str, UpstreamClient] = field(default_factory=dict)
    retiring: dict[str, float] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reload at a time


LIVE: Final = web.AppKey("live", LiveConfig)


CALLS: Final = web.AppKey("calls", CallLog)


def placing_bound(config: Config) -> float:
    """Seconds after which an order still `placing` on one route was interrupted for sure:
    longer than any upstream call may take (the bound a repeat of its request waits to)."""
    return placement_bound(config, 1)


async def hold_interrupted(store: Store, config: Config) -> None:
    """Hold what a dead process left `placing` (see Store.hold_interrupted_orders)."""
    held = await store.hold_interrupted_orders(stale_before=time.time() - placing_bound(config))
    if held:
        log.warning("interrupted_orders_held", count=held)


async def warn_orphaned(store: Store, config: Config) -> None:
    """Log the open orders of providers no longer in the config: nothing syncs them."""
    for provider, count in (await store.orphaned_orders(config.providers) or {}).items():
        log.warning("orphaned_orders", provider=provider, count=count)


@contextlib.asynccontextmanager
async def _running(name: str, *loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Each of `loops` as a task named `name` while the block runs; cancelled, and waited for,
    on the way out."""
    tasks = [asyncio.create_task(loop, name=name) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await Store.open(app[CONFIG].database, trace=app.get(SQL_TRACE))
    await hold_interrupted(store, app[CONFIG])
    await warn_orphaned(store, app[CONFIG])
    app[STORE] = store
    app[CALLS] = CallLog(store, app[METRICS])
    yield
    await store.close()
    commits, writes = store.commit_counts  # how many writes shared each commit
    batches, busy, cpu = store.writer_time
    log.info(
        "store_closed",
        commits=commits,
        writes=writes,
        batches=batches,
        writer_busy_seconds=round(busy, 3),
        writer_cpu_seconds=round(cpu, 3),
    )


async def _call_log_ctx(app: web.Application) -> AsyncIterator[None]:
    calls = app[CALLS]
    async with _running("call-log", calls.run()):
        yield
    await calls.flush()


def _call_rollup_ctx(
    background: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Call records rolled up and pruned (CallLog.tidy); only with `background` (tests call
    the store's steps)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with _running("call-rollup", *([app[CALLS].tidy()] if background else [])):
            yield

    return ctx


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0,
            limit_per_host=CONNECTIONS_PER_PROVIDER,
            keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS,
        ),
        timeout=aiohttp.ClientTimeout(total=config.longest_timeout),
        headers={"User-Agent": "smm-router"},
    )
    app[SESSION] = session
    on_call = app[CALLS].record
    app[CLIENTS] = {
        name: UpstreamClient(provider, session, on_call=on_call)
        for name, provider in config.providers.items()
    }
    live = app[LIVE]
    live.clients = live.sync_clients = app[CLIENTS]
    app[FLEET] = Fleet(config, app[STORE], app[METRICS])  # restored by the provider watcher
    desk = OrderDesk(config, app[STORE], app[CLIENTS], app[METRICS], fleet=app[FLEET])
    app[DESK] = desk
    app[API] = V2Api(desk, app[METRICS])
    yield
    await session.close()


def _placing_sweep_ctx(
    background: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Now and then, hold what another process (a CLI re-route, an older router) left
    `placing` when it died: start-up alone would leave those orders Pending until the next one."""

    async def sweep(app: web.Application) -> None:
        live, store = app[LIVE], app[STORE]
        while True:
            # The sync's config also has the providers removed with orders still being placed.
            await asyncio.sleep(placing_bound(live.sync_config))
            try:
                await hold_interrupted(store, live.sync_config)
            except Exception:
                log.exception("placing_sweep_failed")

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with _running("placing-sweep", *([sweep(app)] if background else [])):
            yield

    return ctx


def _order_sync_ctx(
    background: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The status sync; its loops run only with `background` (tests call `run_once`)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        sync = OrderSync(app[CONFIG], app[STORE], app[CLIENTS], app[METRICS], fleet=app[FLEET])
        app[ORDER_SYNC] = sync
        if background:
            sync.start()
        yield
        await sync.stop()

    return ctx


def _provider_watch_ctx(
    background: bool,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Provider balances, probes and catalogues: the fleet is restored from the store at start-up;
    the loops run only with `background` (tests call `balances_once`, `catalogues_once` and
    `refresh_once`)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        watcher = ProviderWatcher(app[CONFIG], app[STORE], app[CLIENTS], app[FLEET], app[METRICS])
        await watcher.restore()
        app[PROVIDER_WATCHER] = watcher
        loops = (
            [watcher.run_balances(), watcher.run_catalogues(), watcher.run_refresh()]
            if background
            else []
        )
        async with _running("provider-watch", *loops):
            yield

    return ctx


class V2RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses as the v2 API does.

    aiohttp answers a request it cannot parse (a request line or header over its limits, a bad
    method) itself, before any route or middleware, with a text page, and logs the parser's
    error, which quotes the request line: the reseller's key with it. There is no hook for
    either (aio-libs/aiohttp#3287), so this subclass overrides `handle_error`: HTTP 200
    `{"error": "Incorrect request"}` (the connection is closed, as aiohttp does), and a log line
    that names the error's class, never its message. A handler's own crash (5xx) keeps its
    status, with a JSON body.
    """

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: nothing sane to add
            raise ConnectionError("response already started, cannot send an error")
        reason = type(exc).__name__ if exc is not None else "unknown"
        # A log sink that fails (a closed or full stderr) must not cost the answer.
        with contextlib.suppress(Exception):
            if status >= 500:
                log.error("http_error", status=status, reason=reason, exc_info=exc)
            else:
                log.info("malformed_request", status=status, reason=reason, remote=request.remote)
        if status >= 500:
            response = json_response({"error": v2.UNAVAILABLE}, status=status)
        else:
            response = json_response({"error": v2.INCORRECT_REQUEST})
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body that fails to decompress, as aiohttp drains what is left of it once the
        answer (`Incorrect request`) is out: the client's error, logged as such; aiohttp would
        log it as an unhandled exception, with a traceback, at ERROR."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            with contextlib.suppress(Exception):
                log.info("malformed_request", status=400, reason=type(exc).__name__)
            return
        super().log_exception(*args, **kw)


class _V2Server(web.Server):
    """A `web.Server` whose connections are V2RequestHandlers."""

    def __call__(self) -> web.RequestHandler:
        return V2RequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """The runner of the reseller API's listener: an AppRunner whose connections answer
    malformed HTTP with v2 JSON (V2RequestHandler). `serve` and the tests both use it."""

    async def _make_server(self) -> web.Server:
        # The base class starts the app and builds the server with every handler argument
        # (the app's `handler_args`: the parser limits); the same server, with our handler.
        server = await super()._make_server()
        return _V2Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


async def _v2(request: web.Request) -> web.Response:
    return await request.app[API].handle(request)


async def _healthz(request: web.Request) -> web.Response:
    await request.app[STORE].count_held()  # the database answers
    return web.json_response({"status": "ok", "version": __version__})


def create_app(
    config: Config, *, background: bool = True, registry: CollectorRegistry | None = None
) -> web.Application:
    """The reseller API application. `background=False` leaves out the sync loops (tests)."""
    app = web.Application(
        client_max_size=v2.MAX_BODY_BYTES,
        # Handler arguments of the app itself, so that every runner of it parses alike.
        handler_args={
            "max_line_size": MAX_REQUEST_LINE_BYTES,
            "max_field_size": MAX_HEADER_FIELD_BYTES,
        },
    )
    app[CONFIG] = config
    app[LIVE] = LiveConfig(config=config, sync_config=config)
    app[METRICS] = Metrics(
        registry or CollectorRegistry(), providers=config.providers, currency=config.currency
    )
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_call_log_ctx)
    app.cleanup_ctx.append(_call_rollup_ctx(background))
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_placing_sweep_ctx(background))
    app.cleanup_ctx.append(_order_sync_ctx(background))
    app.cleanup_ctx.append(_provider_watch_ctx(background))
    for path in API_PATHS:  # with and without the trailing slash that some panels send
        app.router.add_route("GET", path, _v2)
        app.router.add_route("POST", path, _v2)
    app.router.add_get("/healthz", _healthz)
    return app


# --- Hot reload ----------------------------------------------------------------------------------


async def apply_config(app: web.Application, new: Config) -> reload.Changes:
    """Make `new` the config of the started `app`: a hot reload (`reload_config` checks first
    that nothing in it needs a restart: router.reload.refusals).

    Every holder of config is updated here and nowhere else, after the last await, so that no
    request and no loop sees half of a change:
    - app[LIVE]: the config, the clients, the status sync's config and clients;
    - app[METRICS]: the label sets of new providers;
    - app[FLEET]: a provider removed, or now another server or account (URL, key or currency
      changed), starts fresh (health, rates, gauges); the others keep their state;
    - app[DESK]: new orders, refills and cancels (an order being placed keeps the routes and
      clients it started with: a removed provider's client stays usable while it is used);
    - app[API]: the `services` answer and the request limits;
    - app[ORDER_SYNC]: the providers of `new`, and those removed while they had open orders,
      with their old settings, until those orders end (`provider_removed_with_open_orders`);
    - app[PROVIDER_WATCHER]: balances and catalogues of `new`'s providers, read at once.
    Clients are made for new and changed providers only, on the app's one session.
    """
    live, store = app[LIVE], app[STORE]
    changes = reload.compare(live.config, new)
    removed_at = time.time()
    retiring = {**live.retiring, **dict.fromkeys(changes.providers_removed, removed_at)}
    keep: dict[str, float] = {}
    for name, since in retiring.items():
        if name in new.providers:
            continue  # back in the config
        work = await store.open_work(name, placing_before=since)
        if not work.idle:
            keep[name] = since
            if name in changes.providers_removed:
                log.warning(
                    "provider_removed_with_open_orders",
                    provider=name,
                    open_orders=work.orders,
                    open_refills=work.refills,
                    orders_being_placed=work.placing,  # anywhere: their plans may go there
                )
        elif name in live.retiring:
            log.info("provider_retired", provider=name)
    # Nothing below awaits.
    session, on_call = app[SESSION], app[CALLS].record
    clients = {
        name: live.clients[name]
        if name in live.clients and name not in changes.providers_changed
        else UpstreamClient(provider, session, on_call=on_call)
        for name, provider in new.providers.items()
    }
    sync_config = reload.sync_config(new, live.sync_config, keep)
    sync_clients = {**{name: live.sync_clients[name] for name in keep}, **clients}
    for name in changes.providers_added:
        app[METRICS].add_provider(name)
    app[FLEET].reconfigure(new, fresh=changes.providers_fresh)
    app[DESK].reconfigure(new, clients)
    app[API].reconfigure(new)
    app[ORDER_SYNC].reconfigure(sync_config, sync_clients, retiring=keep)
    app[PROVIDER_WATCHER].reconfigure(new, clients, fresh=changes.providers_fresh)
    live.config, live.clients = new, clients
    live.sync_config, live.sync_clients, live.retiring = sync_config, sync_clients, keep
    return changes


async def reload_config(app: web.Application, path: Path) -> bool:
    """Re-read the config file at `path` and apply it; whether it was applied.

    A config that fails `check`, or that changes what needs a restart (router.reload), is
    refused whole: the running one stays. Either way it is logged (`config_reloaded` with the old
    and new versions, or `config_reload_refused` with every problem on one line) and counted in
    `smm_router_config_reloads_total{outcome}`.
    """
    live, metrics = app[LIVE], app[METRICS]
    async with live.lock:
        old = live.config
        try:
            new = load_config(path)
        except ConfigError as exc:
            problems = exc.errors
        else:
            problems = reload.refusals(old, new)
        if problems:
            metrics.config_reloads.labels(outcome="refused").inc()
            log.error(
                "config_reload_refused",
                path=str(path),
                config_version=old.version,
                problems=problems,
            )
            return False
        try:
            changes = await apply_config(app, new)
        except Exception:  # it awaits the store before it changes anything
            metrics.config_reloads.labels(outcome="refused").inc()
            log.exception("config_reload_failed", path=str(path), config_version=old.version)
            return False
        metrics.config_reloads.labels(outcome="applied").inc()
        log.info(
            "config_reloaded",
            path=str(path),
            old_config_version=old.version,
            new_config_version=new.version,
            **changes.summary(),
        )
        return True


@contextlib.asynccontextmanager
async def reloads_on_sighup(app: web.Application, path: Path) -> AsyncIterator[None]:
    """While in it: SIGHUP reloads the config file at `path` (one reload at a time; signals
    that arrive during one make one more), and `<database>.pid` names this process."""
    wanted = asyncio.Event()

    async def reloads() -> None:
        while True:
            await wanted.wait()
            wanted.clear()
            try:
                await reload_config(app, path)
            except Exception:  # a bug: the next SIGHUP must still be heard
                log.exception("config_reload_crashed", path=str(path))

    task = asyncio.create_task(reloads(), name="config-reload")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, wanted.set)
    pid_file = reload.pid_path(app[LIVE].config.database)
    other = reload.write_pid_file(pid_file)
    if other is not None:
        log.warning("pid_file_replaced", path=str(pid_file), other_pid=other)
    try:
        yield
    finally:
        reload.remove_pid_file(pid_file)
        loop.remove_signal_handler(signal.SIGHUP)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_metrics_app(api: web.Application) -> web.Application:
    """The Prometheus listener's application, reading the API application's metrics."""

    async def metrics(request: web.Request) -> web.Response:
        registry = api[METRICS]
        registry.orders_held.set(await api[STORE].count_held())
        await registry.stored.read(api[STORE])  # money, held ages, sync lag: from the database
        return web.Response(
            body=registry.exposition.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    config: Config,
    *,
    config_path: Path | None = None,
    ready: Callable[[web.Application], Awaitable[None]] | None = None,
) -> None:
    """Run the API and metrics listeners until cancelled; ListenError if one cannot listen.
    With `config_path`, the file `config` was read from, SIGHUP reloads it and the PID file
    names this process (reloads_on_sighup)."""
    with contextlib.ExitStack() as held:
        # Both ports first: one that is taken fails before the database or a loop is touched.
        sockets: dict[str, list[socket.socket]] = {}
        for key, listener in (("listen", config.listen), ("metrics", config.metrics)):
            bound = bind(
                listener.host,
                listener.port,
                port_setting=f"{key}.port",
                host_setting=f"{key}.host",
            )
            sockets[key] = [held.enter_context(sock) for sock in bound]
        api = create_app(config)
        api_runner = ApiRunner(api, access_log=None)
        metrics_runner = web.AppRunner(create_metrics_app(api), access_log=None)
        await api_runner.setup()
        await metrics_runner.setup()
        try:
            await start_sites(api_runner, sockets["listen"])
            await start_sites(metrics_runner, sockets["metrics"])
            log.info(
                "listening",
                api=f"http://{config.listen.host}:{config.listen.port}/api/v2",
                metrics=f"http://{config.metrics.host}:{config.metrics.port}/metrics",
                config_version=config.version,
            )
            async with contextlib.AsyncExitStack() as stack:
                if config_path is not None:
                    await stack.enter_async_context(reloads_on_sighup(api, config_path))
                if ready is not None:
                    await ready(api)
                await asyncio.Event().wait()
        finally:
            await metrics_runner.cleanup()
            await api_runner.cleanup()
