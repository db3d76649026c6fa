"""The aiohttp application: typed state, one cleanup context per resource, the two listeners.

Usage::

    app = create_app(config)                       # the reseller API (+ /healthz)
    runner = ApiRunner(app)                        # its listener: malformed HTTP answered in JSON
    await serve(config)                            # API and /metrics listeners until cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router import v2
from router.api import V2Api, json_response
from router.config import Config
from router.fleet import Fleet
from router.metrics import Metrics
from router.orders import OrderDesk
from router.store import CALL_RETENTION_SECONDS, Store
from router.sync.orders import OrderSync
from router.sync.providers import ProviderWatcher
from router.upstream import CallRecord, UpstreamClient

log = structlog.get_logger("router.app")

CALL_FLUSH_INTERVAL: Final = 1.0
CALL_FLUSH_BATCH: Final = 500
CALL_PRUNE_INTERVAL: Final = 3600.0
CONNECTIONS_PER_PROVIDER: Final = 100
# An idle pooled connection is dropped before the upstream's server would close it (Apache's
# default is 5 s): an `add` written to a connection the server just closed fails with a reset,
# which is ambiguous and would hold the order.
UPSTREAM_KEEPALIVE_SECONDS: Final = 4.0
PLACING_SLACK_SECONDS: Final = 60.0  # beyond the longest upstream timeout (see placing_bound)
# aiohttp's parser refuses a request line or a header over 8 KiB by default: too little for a
# GET of 100 IDs (2 KiB) with a 2,048-character link percent-encoded (6 KiB in ASCII, 12 KiB in
# two-byte characters). Past these limits a request is malformed: a v2 JSON answer
# (V2RequestHandler).
MAX_REQUEST_LINE_BYTES: Final = 16 * 1024
MAX_HEADER_FIELD_BYTES: Final = 16 * 1024
API_PATHS: Final = ("/api/v2", "/api/v1", "/api/v2/", "/api/v1/")

CONFIG: Final = web.AppKey("config", Config)
METRICS: Final = web.AppKey("metrics", Metrics)
STORE: Final = web.AppKey("store", Store)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
CLIENTS: Final = web.AppKey("clients", Mapping[str, UpstreamClient])
FLEET: Final = web.AppKey("fleet", Fleet)
DESK: Final = web.AppKey("desk", OrderDesk)
API: Final = web.AppKey("api", V2Api)
ORDER_SYNC: Final = web.AppKey("order_sync", OrderSync)
PROVIDER_WATCHER: Final = web.AppKey("provider_watcher", ProviderWatcher)


class CallLog:
    """Upstream call records: counted in metrics at once, written to SQLite in batches."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._pending: list[CallRecord] = []
        self._wake = asyncio.Event()

    def record(self, call: CallRecord) -> None:
        self.metrics.upstream_requests.labels(
            provider=call.provider, action=call.action, outcome=str(call.outcome)
        ).inc()
        self.metrics.upstream_duration.labels(provider=call.provider, action=call.action).observe(
            call.latency
        )
        self._pending.append(call)
        if len(self._pending) >= CALL_FLUSH_BATCH:
            self._wake.set()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        await self.store.record_calls(batch)

    async def run(self) -> None:
        """Flush every CALL_FLUSH_INTERVAL (or at once when a batch fills); prune old records."""
        pruned_at = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CALL_FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() - pruned_at > CALL_PRUNE_INTERVAL:
                    await self.store.prune_calls(time.time() - CALL_RETENTION_SECONDS)
                    pruned_at = time.monotonic()
            except Exception:
                log.exception("call_log_flush_failed")


CALLS: Final = web.AppKey("calls", CallLog)


def placing_bound(config: Config) -> float:
    """Seconds after which an order still `placing` on one route was interrupted for sure:
    longer than any upstream call may take."""
    return max(p.timeout for p in config.providers.values()) + PLACING_SLACK_SECONDS


async def hold_interrupted(store: Store, config: Config) -> None:
    """Hold what a dead process left `placing` (see Store.hold_interrupted_orders)."""
    held = await store.hold_interrupted_orders(stale_before=time.time() - placing_bound(config))
    if held:
        log.warning("interrupted_orders_held", count=held)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await Store.open(app[CONFIG].database)
    await hold_interrupted(store, app[CONFIG])
    app[STORE] = store
    app[CALLS] = CallLog(store, app[METRICS])
    yield
    await store.close()


async def _call_log_ctx(app: web.Application) -> AsyncIterator[None]:
    calls = app[CALLS]
    task = asyncio.create_task(calls.run(), name="call-log")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await calls.flush()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0,
            limit_per_host=CONNECTIONS_PER_PROVIDER,
            keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS,
        ),
        timeout=aiohttp.ClientTimeout(total=max(p.timeout for p in config.providers.values())),
        headers={"User-Agent": "smm-router"},
    )
    app[SESSION] = session
    on_call = app[CALLS].record
    app[CLIENTS] = {
        name: UpstreamClient(provider, session, on_call=on_call)
        for name, provider in config.providers.items()
    }
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
        config, store = app[CONFIG], app[STORE]
        while True:
            await asyncio.sleep(placing_bound(config))
            try:
                await hold_interrupted(store, config)
            except Exception:
                log.exception("placing_sweep_failed")

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sweep(app), name="placing-sweep") if background else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        tasks = [asyncio.create_task(loop, name="provider-watch") for loop in loops]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
    return web.json_response({"status": "ok"})


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
    app[METRICS] = Metrics(registry or CollectorRegistry(), providers=config.providers)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_call_log_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_placing_sweep_ctx(background))
    app.cleanup_ctx.append(_order_sync_ctx(background))
    app.cleanup_ctx.append(_provider_watch_ctx(background))
    for path in API_PATHS:  # with and without the trailing slash that some panels send
        app.router.add_route("GET", path, _v2)
        app.router.add_route("POST", path, _v2)
    app.router.add_get("/healthz", _healthz)
    return app


def create_metrics_app(api: web.Application) -> web.Application:
    """The Prometheus listener's application, reading the API application's metrics."""

    async def metrics(request: web.Request) -> web.Response:
        registry = api[METRICS]
        registry.orders_held.set(await api[STORE].count_held())
        return web.Response(
            body=generate_latest(registry.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    config: Config,
    *,
    ready: Callable[[web.Application], Awaitable[None]] | None = None,
) -> None:
    """Run the API and metrics listeners until cancelled."""
    api = create_app(config)
    api_runner = ApiRunner(api, access_log=None)
    metrics_runner = web.AppRunner(create_metrics_app(api), access_log=None)
    await api_runner.setup()
    await metrics_runner.setup()
    try:
        await web.TCPSite(api_runner, config.listen.host, config.listen.port).start()
        await web.TCPSite(metrics_runner, config.metrics.host, config.metrics.port).start()
        log.info(
            "listening",
            api=f"http://{config.listen.host}:{config.listen.port}/api/v2",
            metrics=f"http://{config.metrics.host}:{config.metrics.port}/metrics",
        )
        if ready is not None:
            await ready(api)
        await asyncio.Event().wait()
    finally:
        await metrics_runner.cleanup()
        await api_runner.cleanup()
