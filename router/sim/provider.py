"""SimProvider: one simulated upstream v2 provider on loopback."""

from __future__ import annotations

import asyncio
import heapq
import hmac
import json
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from decimal import Decimal

from aiohttp import web

from router import v2
from router.listeners import bind, start_sites
from router.sim.catalogue import (
    Received,
    SimOrder,
    SimRefill,
    SimService,
    _money,
    default_catalogue,
)
from router.sim.faults import (
    _ANSWER_FAULTS,
    _FLAKY_CHOICES,
    CANNOT_CANCEL,
    CLOUDFLARE_502,
    DEEP_JSON_LEVELS,
    NOT_UTF8_PREFIX,
    PACKAGE_UNITS,
    REFILL_UNAVAILABLE,
    REFUSAL,
    WAF_403,
    Fault,
)
from router.v2 import V2Error


class SimProvider:
    """A v2 provider on loopback that tests steer and inspect.

    Usage: `sim = SimProvider(key="k"); await sim.start(); ...sim.url...; await sim.stop()`.
    """

    def __init__(
        self,
        *,
        key: str,
        services: Sequence[SimService] | None = None,
        balance: Decimal = Decimal("1000"),
        currency: str = "USD",
        progress_seconds: float = 10.0,
        partial_every: int = 5,
        slow_seconds: float = 30.0,
        seed: int = 0,
        first_order_id: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self._clock = clock  # a test's frozen clock: then only advance() moves time
        self.services = {
            s.service: s for s in (default_catalogue() if services is None else services)
        }
        self.currency = currency
        self.progress_seconds = progress_seconds
        self.partial_every = partial_every
        self.slow_seconds = slow_seconds
        self.received: list[Received] = []
        self.orders: dict[int, SimOrder] = {}
        self.refills: dict[int, SimRefill] = {}
        self._balance = balance
        self._first_order_id = first_order_id
        self._next_order_id = first_order_id
        self._offset = 0.0
        self._rng = random.Random(seed)
        self._echoing: set[str] = set()
        self._faults: dict[int | None, Fault] = {}
        self._answer_faults: dict[str, Fault] = {}
        self._stalled: set[str] = set()
        self._paused: dict[str, asyncio.Event] = {}
        self._partials: list[tuple[float, int]] = []  # heap of (end, order id) awaiting refund
        self._catalogue = self._listing()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._actions: dict[str, Callable[[dict[str, str]], object]] = {
            "services": lambda _params: self._catalogue,
            "status": self._status,
            "cancel": self._cancel,
            "refill": self._refill,
            "refill_status": self._refill_status,
            "balance": lambda _params: {"balance": _money(self._balance), "currency": currency},
        }
        self.app = self.make_app()

    def _listing(self) -> list[dict[str, object]]:
        """The `services` answer, as panels write it (strings for numbers)."""
        return [
            {**asdict(s), "rate": _money(s.rate), "min": str(s.min), "max": str(s.max)}
            for s in self.services.values()
        ]

    def make_app(self) -> web.Application:
        app = web.Application()
        for path in ("/api/v2", "/api/v1"):
            app.router.add_get(path, self._handle)
            app.router.add_post(path, self._handle)
        return app

    # --- steering and inspection -----------------------------------------------------------------

    def now(self) -> float:
        """The simulator's clock: its `clock` (time.monotonic()) shifted by every advance()."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward: orders and refills progress without sleeping."""
        if seconds < 0:
            raise ValueError("the simulator's clock only moves forward")
        self._offset += seconds
        self._settle(self.now())

    def set_fault(self, service: int | None, fault: Fault | None) -> None:
        """Make `add` on `service` (None: every service without its own fault) misbehave."""
        if fault is None:
            self._faults.pop(service, None)
        else:
            self._faults[service] = fault

    def set_answer_fault(self, action: str, fault: Fault | None) -> None:
        """Answer every `action` request (one that is not `add`) with `fault`, an answer that
        is not a v2 answer (html502, deep_json, not_utf8, waf403); None: answer normally."""
        if fault is None:
            self._answer_faults.pop(action, None)
        elif fault not in _ANSWER_FAULTS or action == "add":
            raise ValueError(f"{fault} is not an answer fault for {action!r}: use set_fault")
        else:
            self._answer_faults[action] = fault

    def pause(self, action: str) -> None:
        """Hold every `action` request, once received, until resume(action); then answer it as
        usual. Tests use it to act while a call is at the provider."""
        self._paused.setdefault(action, asyncio.Event())

    def resume(self, action: str) -> None:
        gate = self._paused.pop(action, None)
        if gate is not None:
            gate.set()

    def echo_key(self, action: str, echoing: bool = True) -> None:
        """Answer every `action` request with an HTTP 500 page that quotes the key it was sent,
        as a PHP error page dumping the request does; nothing is created."""
        if echoing:
            self._echoing.add(action)
        else:
            self._echoing.discard(action)

    def end_with_remains(self, order_id: int, remains: int) -> None:
        """Make an order end with `remains` undelivered: Partial (refunded its undelivered
        share) above 0, Completed at 0, Completed and over-delivered below 0."""
        order = self.orders[order_id]
        if remains > 0 >= order.partial_remains:
            heapq.heappush(self._partials, (order.created_at + order.duration, order_id))
        order.partial_remains = remains

    def set_rate(self, service: int, rate: Decimal) -> None:
        """Change a service's rate: its catalogue entry and what its next orders cost."""
        self.services[service] = replace(self.services[service], rate=rate)
        self._catalogue = self._listing()

    def set_balance(self, amount: Decimal) -> None:
        self._balance = amount

    def stall(self, action: str, stalled: bool = True) -> None:
        """Leave every `action` request unanswered until the simulator stops (then reset it):
        a provider that hangs."""
        if stalled:
            self._stalled.add(action)
        else:
            self._stalled.discard(action)

    def create_orders(
        self, service: int, count: int, *, quantity: int = 1000, link: str = "https://x.test/a"
    ) -> list[int]:
        """`count` orders placed at once as `add` places them (balance debited, every
        `partial_every`-th ending Partial), without HTTP: for tests that need thousands."""
        params = {"link": link, "quantity": str(quantity)}
        return [self._place(service, params) for _ in range(count)]

    @property
    def balance(self) -> Decimal:
        self._settle(self.now())
        return self._balance

    def received_actions(self, action: str) -> list[Received]:
        return [r for r in self.received if r.action == action]

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the simulator has not been started")
        return f"http://127.0.0.1:{self._port}/api/v2"

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        port_setting: str = "--port",
        host_setting: str = "--host",
    ) -> int:
        """Listen and return the port; port 0 is ephemeral, or the previous one on a restart.
        A port or host that cannot be had is a ListenError naming the given setting."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping = asyncio.Event()
        sockets = bind(
            host, port or self._port or 0, port_setting=port_setting, host_setting=host_setting
        )
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await start_sites(runner, sockets)
        except BaseException:
            await runner.cleanup()
            for sock in sockets:  # those not yet served
                sock.close()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        """Stop listening (the provider is "down"); the state stays for a restart."""
        if self._runner is None:
            return
        self._stopping.set()  # slow answers in flight end as a reset
        for action in list(self._paused):  # paused ones end as a reset too
            self.resume(action)
        runner, self._runner = self._runner, None
        await runner.cleanup()
        # Let clients on this loop see their pooled connections closed, so that "down" means
        # "connection refused" on their next call, not a write to a stale connection.
        await asyncio.sleep(0.01)

    # --- the v2 endpoint -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        params = await _read_params(request)
        key = params.pop("key", "")
        action = params.get("action", "")
        now = self.now()
        self.received.append(Received(action, dict(params), now))
        if action in self._stalled:
            await self._stopping.wait()
            return _reset(request)
        if (gate := self._paused.get(action)) is not None:
            await gate.wait()
            if self._stopping.is_set():
                return _reset(request)
            now = self.now()
        try:
            if not hmac.compare_digest(key.encode(), self.key.encode()):
                raise V2Error(v2.INVALID_KEY)
            if action in self._echoing:
                page = (
                    "<b>Fatal error</b>: Uncaught PDOException in api.php:42 "
                    f"(action={action}, key={key})"
                )
                return web.Response(status=500, text=page, content_type="text/html")
            self._settle(now)
            if action == "add":
                return await self._add(request, params)
            handler = self._actions.get(action)
            if handler is None:
                raise V2Error(v2.INCORRECT_REQUEST)
            if (fault := self._answer_faults.get(action)) is not None:
                return _spoiled(fault, handler(params))
            return web.json_response(handler(params))
        except V2Error as error:
            return web.json_response({"error": error.message})

    async def _add(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        service_id = v2.parse_id(params.get("service"))
        fault = self._faults.get(service_id, self._faults.get(None))
        if fault is Fault.FLAKY:
            fault = self._rng.choice(_FLAKY_CHOICES)
        if fault is Fault.REFUSE:
            raise V2Error(REFUSAL)
        if fault is Fault.NO_FUNDS:
            raise V2Error(v2.NOT_ENOUGH_FUNDS)
        if fault is Fault.HTML_502:
            return web.Response(status=502, text=CLOUDFLARE_502, content_type="text/html")
        if fault is Fault.RESET:
            return _reset(request)
        if fault is Fault.WAF_403:
            return _spoiled(fault, None)
        if fault is Fault.HTTP_429:
            return web.json_response(
                {"error": "Too many requests"}, status=429, headers={"Retry-After": "1"}
            )
        if fault in (Fault.DEEP_JSON, Fault.NOT_UTF8):  # the panel took it; its answer is garbled
            return _spoiled(fault, {"order": self._place(service_id, params)})
        if fault is Fault.SLOW:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.slow_seconds)
            except TimeoutError:
                self._settle(self.now())  # refunds due while sleeping count for the funds check
            else:
                return _reset(request)  # going down mid-request: nothing created
        return web.json_response({"order": self._place(service_id, params)})

    def _place(self, service_id: int | None, params: dict[str, str]) -> int:
        """Validate an `add` as a strict panel does, debit the balance and create the order."""
        service = self.services.get(service_id) if service_id else None
        if service is None:
            raise V2Error(v2.INCORRECT_SERVICE)
        kind = v2.SERVICE_TYPES[service.type]
        link = v2.check_link(params.get("link")) if kind.link else ""
        for name in kind.params:
            if not params.get(name, "").strip():
                raise V2Error(v2.INCORRECT_REQUEST)
        if kind.one_of and not any(params.get(name, "").strip() for name in kind.one_of):
            raise V2Error(v2.INCORRECT_REQUEST)
        if kind.quantity == "flat":
            quantity = 1
        elif kind.quantity == "param":
            parsed = v2.parse_plain_int(params.get("quantity"), maximum=v2.MAX_QUANTITY)
            if parsed is None:
                raise V2Error(v2.INCORRECT_REQUEST)
            quantity = parsed
        else:
            quantity = len(v2.non_empty_lines(params[kind.quantity]))
        if quantity < service.min:
            raise V2Error(v2.quantity_below(service.min))
        if quantity > service.max:
            raise V2Error(v2.quantity_above(service.max))
        runs, interval = params.get("runs", "").strip(), params.get("interval", "").strip()
        total = quantity
        if runs or interval:  # drip-feed: `quantity` is per run
            run_count = v2.parse_plain_int(runs, maximum=1000)
            if not (kind.dripfeed and service.dripfeed and run_count and v2.parse_id(interval)):
                raise V2Error(v2.INCORRECT_REQUEST)
            total = run_count * quantity
        cost = service.rate if kind.quantity == "flat" else service.rate * total / 1000
        if kind.quantity == "flat":
            total = PACKAGE_UNITS  # what a package delivers, counted as a real panel counts it
        if cost > self._balance:
            raise V2Error(v2.NOT_ENOUGH_FUNDS)
        self._balance -= cost
        order_id = self._next_order_id
        self._next_order_id += 1
        index = order_id - self._first_order_id + 1
        now, duration = self.now(), self.progress_seconds
        order = SimOrder(order_id, service.service, link, total, cost, now, self.now, duration)
        if self.partial_every > 0 and index % self.partial_every == 0:
            order.partial_remains = total // 4  # 0 for tiny orders: they complete
        self.orders[order_id] = order
        if order.partial_remains:
            heapq.heappush(self._partials, (now + duration, order_id))
        return order_id

    def _settle(self, now: float) -> None:
        """Refund the provider balance for every order that has just ended Partial."""
        while self._partials and self._partials[0][0] <= now:
            _, order_id = heapq.heappop(self._partials)
            order = self.orders[order_id]
            if order.canceled_at is None:  # a cancel refunded it already
                self._balance += order.cost - order.snapshot(now)[2]

    def _order(self, order_id: int | None) -> SimOrder:
        order = self.orders.get(order_id) if order_id else None
        if order is None:
            raise V2Error(v2.INCORRECT_ORDER)
        return order

    def _status(self, params: dict[str, str]) -> object:
        now = self.now()

        def item(order_id: int | None) -> dict[str, str]:
            order = self._order(order_id)
            word, remains, charge = order.snapshot(now)
            return {
                "charge": _money(charge),
                "start_count": str(order.start_count),
                "status": word,
                "remains": str(remains),
                "currency": self.currency,
            }

        if "orders" in params:
            return {token: _try(item, order) for token, order in v2.parse_id_list(params["orders"])}
        return item(v2.parse_id(params.get("order")))

    def _cancel(self, params: dict[str, str]) -> object:
        now = self.now()

        def one(order_id: int | None) -> int:
            """Nothing delivered yet ends Canceled; something delivered ends Partial."""
            order = self._order(order_id)
            if not self.services[order.service].cancel:
                raise V2Error(v2.CANCEL_DISABLED)
            word, remains, _ = order.snapshot(now)
            if word in v2.FINAL_STATUSES:
                raise V2Error(CANNOT_CANCEL)
            order.canceled_at, order.canceled_remains = now, remains
            self._balance += order.cost - order.cost_of(order.quantity - remains)
            return 1

        ids = _id_items(params.get("orders", params.get("order")))
        return [{"order": shown, "cancel": _try(one, order)} for shown, order in ids]

    def _refill(self, params: dict[str, str]) -> object:
        now = self.now()

        def one(order_id: int | None) -> int:
            order = self._order(order_id)
            if not self.services[order.service].refill:
                raise V2Error(v2.REFILL_DISABLED)
            if order.snapshot(now)[0] not in (v2.COMPLETED, v2.PARTIAL):
                raise V2Error(REFILL_UNAVAILABLE)
            refill = SimRefill(id=len(self.refills) + 1, order=order.id, created_at=now)
            self.refills[refill.id] = refill
            return refill.id

        if "orders" in params:
            ids = _id_items(params["orders"])
            return [{"order": shown, "refill": _try(one, order)} for shown, order in ids]
        return {"refill": str(one(v2.parse_id(params.get("order"))))}

    def _refill_status(self, params: dict[str, str]) -> object:
        now = self.now()

        def status(refill_id: int | None) -> str:
            refill = self.refills.get(refill_id) if refill_id else None
            if refill is None:
                raise V2Error(v2.REFILL_NOT_FOUND)
            return refill.status_at(now, self.progress_seconds)

        if "refills" in params:
            ids = _id_items(params["refills"])
            return [{"refill": shown, "status": _try(status, refill)} for shown, refill in ids]
        return {"status": status(v2.parse_id(params.get("refill")))}


def _spoiled(fault: Fault, payload: object) -> web.Response:
    """An answer that is not a v2 answer; `payload` is the JSON it garbles, if any."""
    if fault is Fault.HTML_502:
        return web.Response(status=502, text=CLOUDFLARE_502, content_type="text/html")
    if fault is Fault.WAF_403:
        return web.Response(status=403, text=WAF_403, content_type="text/html")
    if fault is Fault.DEEP_JSON:
        body = ("[" * DEEP_JSON_LEVELS + "]" * DEEP_JSON_LEVELS).encode()
    else:
        body = NOT_UTF8_PREFIX + json.dumps(payload).encode()
    return web.Response(body=body, content_type="application/json")


def _try(answer: Callable[[int | None], object], item: int | None) -> object:
    """One item of a list answer: its value, or its `{"error": ...}` inline."""
    try:
        return answer(item)
    except V2Error as error:
        return {"error": error.message}


def _id_items(value: str | None) -> list[tuple[int | str, int | None]]:
    """(the ID to show in the answer, the ID or None) for each ID of a comma-separated list."""
    return [(parsed or token, parsed) for token, parsed in v2.parse_id_list(value)]


async def _read_params(request: web.Request) -> dict[str, str]:
    """Query and body merged, the body winning: form, multipart or a JSON object."""
    params = dict(request.query)
    if request.method != "POST" or not request.body_exists:
        return params
    try:
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(
                    {str(k): str(v) for k, v in body.items() if isinstance(v, str | int | float)}
                )
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
    except ValueError:
        pass  # an unreadable body sends nothing: the key check answers it
    return params


def _reset(request: web.Request) -> web.StreamResponse:
    """Reset the TCP connection; aiohttp then drops the returned response quietly."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response()
