"""The reseller endpoint: read parameters, authenticate, dispatch by action, shape v2 answers.

Every answer is HTTP 200 `application/json`; every refusal is `{"error": ...}` with a V2.md
message, but for a key past its request limits (`router.limits`): HTTP 429 with `Retry-After`.
Once the key is known, every answer carries the `X-RateLimit-*` headers of its action class.
Business rules live in `router.orders`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from router import v2
from router.config import Config
from router.keys import hash_key
from router.limits import Admission, RequestLimiter
from router.metrics import ACTIONS, UNKNOWN_ACTION, Metrics
from router.orders import OrderDesk, reseller_status
from router.store import OrderStatus, Reseller

log = structlog.get_logger("router.api")

JSON: Final = "application/json"
IDEMPOTENCY_KEY: Final = "Idempotency-Key"  # the header form of `add`'s `request_id`
REQUEST_ID_BYTES: Final = 8  # of a log line's `request_id`: 16 hex digits
TOO_MANY_REQUESTS_STATUS: Final = 429
# `status` formats up to 100 charges per request, most of them the same few amounts (one
# service, one quantity): formatted once each. A pure function of the integer: nothing it keeps
# can go stale.
MONEY_FORMATS_KEPT: Final = 4096
_format_charge: Final = functools.lru_cache(maxsize=MONEY_FORMATS_KEPT)(v2.format_money)

# Short, stable outcome labels for metrics and logs, one per V2.md error.
_OUTCOMES: Final[dict[str, str]] = {
    v2.INVALID_KEY: "invalid_key",
    v2.INCORRECT_REQUEST: "incorrect_request",
    v2.INCORRECT_SERVICE: "incorrect_service",
    v2.INCORRECT_ORDER: "incorrect_order",
    v2.NOT_ENOUGH_FUNDS: "not_enough_funds",
    v2.INCORRECT_LINK: "incorrect_link",
    v2.REFILL_DISABLED: "refill_disabled",
    v2.CANCEL_DISABLED: "cancel_disabled",
    v2.REFILL_NOT_FOUND: "refill_not_found",
    v2.TOO_MANY_IDS: "too_many_ids",
    v2.UNAVAILABLE: "unavailable",
    v2.TOO_MANY_REQUESTS: "rate_limited",
}


def _outcome(message: str) -> str:
    if message.startswith("Quantity"):
        return "incorrect_quantity"
    return _OUTCOMES.get(message, "error")


def json_response(payload: Any, *, status: int = 200) -> web.Response:
    return _json_text(json.dumps(payload), status=status)


def _json_text(text: str, *, status: int = 200) -> web.Response:
    return web.Response(body=text.encode(), status=status, content_type=JSON)


def rate_limit_headers(admission: Admission) -> dict[str, str]:
    """The `X-RateLimit-*` headers (Reset in delta seconds), and `Retry-After` on a refusal."""
    headers = {
        "X-RateLimit-Limit": str(admission.limit),
        "X-RateLimit-Remaining": str(admission.remaining),
        "X-RateLimit-Reset": str(admission.reset),
    }
    if not admission.admitted:
        headers["Retry-After"] = str(admission.retry_after)
    return headers


def _form_pairs(raw: bytes | str) -> list[tuple[str, str]]:
    """`a=1&b=2` decoded strictly as UTF-8; raise V2Error on bytes that are not."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise v2.V2Error(v2.INCORRECT_REQUEST) from exc


def _unicode(text: str) -> str:
    """`text`, if it is Unicode text: a lone surrogate (JSON's `"\\ud800"`) is malformed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise v2.V2Error(v2.INCORRECT_REQUEST) from exc
    return text


def _json_value(value: object) -> str:
    """A JSON body's value as the string a form would carry (lists of IDs become `1,2,3`)."""
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, bool) or value is None:
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        return ",".join(map(str, value))
    raise v2.V2Error(v2.INCORRECT_REQUEST)


async def read_params(request: web.Request) -> dict[str, str]:
    """Query and body merged (the body wins), from GET, form, multipart or JSON requests."""
    _, _, query = request.raw_path.partition("?")
    params = dict(_form_pairs(query))
    if request.method != "POST" or not request.body_exists:
        return _with_idempotency_key(params, request)
    try:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            for name, value in form.items():
                if not isinstance(value, str):
                    raise v2.V2Error(v2.INCORRECT_REQUEST)  # files have no place in v2
                params[name] = value
        elif request.content_type == JSON:
            try:
                data = json.loads((await request.read()).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise v2.V2Error(v2.INCORRECT_REQUEST) from exc
            if not isinstance(data, dict):
                raise v2.V2Error(v2.INCORRECT_REQUEST)
            params.update((_unicode(name), _json_value(value)) for name, value in data.items())
        else:  # form-urlencoded, and clients that send it without saying so
            params.update(_form_pairs(await request.read()))
    except web.HTTPRequestEntityTooLarge as exc:
        raise v2.V2Error(v2.INCORRECT_REQUEST) from exc
    # A broken multipart body (ValueError), a part in an unknown charset (LookupError) or
    # transfer encoding (aiohttp raises RuntimeError), a body whose Content-Encoding does not
    # decompress (RequestPayloadError): the request is malformed, nothing of ours failed.
    except (ValueError, LookupError, RuntimeError, web.RequestPayloadError) as exc:
        raise v2.V2Error(v2.INCORRECT_REQUEST) from exc
    return _with_idempotency_key(params, request)


def _with_idempotency_key(params: dict[str, str], request: web.Request) -> dict[str, str]:
    """An `add`'s `Idempotency-Key` header as its `request_id`. Both sent and different (or
    two different headers): `Incorrect request`, since either guess could place an order
    twice or answer one that was never asked for."""
    keys = set(request.headers.getall(IDEMPOTENCY_KEY, [])) - {""}
    if not keys or params.get("action") != "add":
        return params
    sent = params.get("request_id")
    if len(keys) > 1 or (sent and sent not in keys):
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    params["request_id"] = keys.pop()
    return params


_NO_ORDER_JSON: Final = json.dumps({"error": v2.INCORRECT_ORDER})
_json_word: Final = functools.lru_cache(maxsize=64)(json.dumps)  # a status word, as JSON


def _json_key(sent: str) -> str:
    """An ID as the reseller sent it, as a JSON string: plain digits have nothing to escape."""
    return f'"{sent}"' if sent.isascii() and sent.isdigit() else json.dumps(sent)


def order_json(order: OrderStatus, currency_json: str) -> str:
    """`status` of one order as V2.md shapes it (every value a string), as the JSON text that
    `json.dumps` writes for it, byte for byte. `currency_json` is the currency as JSON.

    `charge` is what the reseller finally paid: the charge less what the ledger gave back
    (a Partial's undelivered share, a Canceled order's whole charge), as panels expect.
    A drip-feed order also carries `runs`: SmartPanel-based panels refund wrongly without it.

    Written as text: a `status` of 100 orders spent a third of its time building their dicts
    and encoding them. Only the status word, the currency and `runs` can hold characters JSON
    escapes; the numbers cannot.
    """
    remains = order.quantity if order.remains is None else order.remains
    text = (
        f'{{"charge": "{_format_charge(order.charge - order.refunded)}", '
        f'"start_count": "{order.start_count or 0}", '
        f'"status": {_json_word(reseller_status(order))}, "remains": "{remains}", '
        f'"currency": {currency_json}'
    )
    if order.runs is not None:
        text += f', "runs": {json.dumps(order.runs)}'
    return text + "}"


def statuses_json(
    ids: Sequence[tuple[str, int | None]], orders: Mapping[int, OrderStatus], currency_json: str
) -> str:
    """The answer to `status` of a list: each ID as sent (once, where it first came) -> its
    order's `order_json`, or `{"error": "Incorrect order ID"}` for one it does not know."""
    entries: dict[str, str] = {}
    for sent, order_id in ids:
        if sent not in entries:
            order = orders.get(order_id) if order_id else None
            entries[sent] = _NO_ORDER_JSON if order is None else order_json(order, currency_json)
    return "{" + ", ".join(f"{_json_key(sent)}: {entry}" for sent, entry in entries.items()) + "}"


def services_body(config: Config) -> bytes:
    """The `services` answer, built once per config: it is the same for every reseller."""
    return json.dumps(
        [
            {
                "service": s.id,
                "name": s.name,
                "type": s.type,
                "category": s.category,
                "rate": v2.format_money(s.rate),
                "min": str(s.min),
                "max": str(s.max),
                "refill": s.refill,
                "cancel": s.cancel,
                "dripfeed": s.dripfeed,
            }
            for s in config.services.values()
        ]
    ).encode()


Handler = Callable[["V2Api", Reseller, Mapping[str, str]], Awaitable[Any]]


class V2Api:
    """The `/api/v2` handler: one instance per app, bound to its order desk and metrics."""

    def __init__(self, desk: OrderDesk, metrics: Metrics) -> None:
        self.desk = desk
        self.metrics = metrics
        self.limiter = RequestLimiter(desk.config.limits)
        self.currency = desk.config.currency
        self.currency_json = json.dumps(self.currency)
        self.services_body = services_body(desk.config)

    def reconfigure(self, config: Config) -> None:
        """Answer with `config` from now on (a config reload): its services and its request
        limits. The currency never changes on a reload (router.reload.refusals)."""
        self.limiter.set_limits(config.limits)
        self.services_body = services_body(config)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        # 16 random hex digits. From `random`, not `os.urandom`: a log line's ID needs no
        # secrecy, and the system call lets go of the GIL, which the store's writer thread
        # then held for a while at every request (py-spy: 6% of the loop under `add` load).
        structlog.contextvars.bind_contextvars(request_id=random.randbytes(REQUEST_ID_BYTES).hex())
        action = UNKNOWN_ACTION
        admission: Admission | None = None
        try:
            params = await read_params(request)
            raw_action = params.get("action", "")
            action = raw_action if raw_action in ACTIONS else UNKNOWN_ACTION
            structlog.contextvars.bind_contextvars(action=action)
            reseller, key_hash = await self._authenticate(params.get("key"))
            structlog.contextvars.bind_contextvars(client_id=reseller.id)
            # Limits count authenticated keys only: random keys create no state.
            admission = self.limiter.admit(key_hash, action)
            if not admission.admitted:
                self.metrics.rate_limited.labels(action=action).inc()
                raise v2.V2Error(v2.TOO_MANY_REQUESTS)
            try:
                handler = _HANDLERS.get(action)
                if handler is None:
                    raise v2.V2Error(v2.INCORRECT_REQUEST)
                payload = await handler(self, reseller, params)
            finally:
                self.limiter.release(key_hash)
            response = payload if isinstance(payload, web.Response) else json_response(payload)
            outcome = "ok"
        except v2.V2Error as exc:
            limited = exc.message == v2.TOO_MANY_REQUESTS
            response = json_response(
                {"error": exc.message}, status=TOO_MANY_REQUESTS_STATUS if limited else 200
            )
            outcome = _outcome(exc.message)
        except Exception:
            log.exception("request_failed")
            response = json_response({"error": v2.UNAVAILABLE})
            outcome = "internal_error"
        if admission is not None:
            response.headers.update(rate_limit_headers(admission))
        duration = time.perf_counter() - started
        self.metrics.series(self.metrics.requests, action, outcome).inc()
        self.metrics.series(self.metrics.request_duration, action).observe(duration)
        # A log sink that fails (a closed or full stderr) must not turn an answer into a 500.
        with contextlib.suppress(Exception):
            log.info("request", outcome=outcome, duration=round(duration, 6))
        return response

    async def _authenticate(self, key: str | None) -> tuple[Reseller, str]:
        """The key's reseller, and the key's hash (what the store and the limits know it by)."""
        if not key:
            raise v2.V2Error(v2.INVALID_KEY)
        key_hash = hash_key(key)
        reseller = await self.desk.store.reseller_by_key_hash(key_hash)
        if reseller is None:
            raise v2.V2Error(v2.INVALID_KEY)
        return reseller, key_hash

    # --- actions ------------------------------------------------------------------------------

    async def services(self, reseller: Reseller, params: Mapping[str, str]) -> web.Response:
        return web.Response(body=self.services_body, content_type=JSON)

    async def balance(self, reseller: Reseller, params: Mapping[str, str]) -> dict[str, str]:
        return {"balance": v2.format_money(reseller.balance), "currency": self.currency}

    async def add(self, reseller: Reseller, params: Mapping[str, str]) -> dict[str, int]:
        return {"order": await self.desk.add(reseller, params)}

    async def status(self, reseller: Reseller, params: Mapping[str, str]) -> web.Response:
        if "orders" in params:
            ids = v2.parse_id_list(params["orders"])
            orders = await self.desk.statuses(reseller, [i for _, i in ids if i])
            return _json_text(statuses_json(ids, orders, self.currency_json))
        order_id = _single_id(params.get("order"))
        order = (await self.desk.statuses(reseller, [order_id])).get(order_id)
        if order is None:
            raise v2.V2Error(v2.INCORRECT_ORDER)
        return _json_text(order_json(order, self.currency_json))

    async def refill(self, reseller: Reseller, params: Mapping[str, str]) -> Any:
        if "orders" in params:
            ids = v2.parse_id_list(params["orders"])
            results = await self.desk.refill(reseller, [i for _, i in ids if i])
            return [
                {"order": i or sent, "refill": _refill_item(results.get(i) if i else None)}
                for sent, i in ids
            ]
        order_id = _single_id(params.get("order"))
        result = (await self.desk.refill(reseller, [order_id]))[order_id]
        if isinstance(result, str):
            raise v2.V2Error(result)
        return {"refill": str(result)}

    async def refill_status(self, reseller: Reseller, params: Mapping[str, str]) -> Any:
        if "refills" in params:
            ids = v2.parse_id_list(params["refills"])
            statuses = await self.desk.refill_status(reseller, [i for _, i in ids if i])
            return [
                {
                    "refill": i or sent,
                    "status": _item(statuses.get(i) if i else None, missing=v2.REFILL_NOT_FOUND),
                }
                for sent, i in ids
            ]
        refill_id = v2.parse_id(params.get("refill"))
        status = None
        if refill_id:
            status = (await self.desk.refill_status(reseller, [refill_id]))[refill_id]
        if status is None:
            raise v2.V2Error(v2.REFILL_NOT_FOUND)
        return {"status": status}

    async def cancel(self, reseller: Reseller, params: Mapping[str, str]) -> Any:
        if "orders" in params:
            ids = v2.parse_id_list(params["orders"])
        else:
            ids = [(params.get("order") or "", _single_id(params.get("order")))]
        results = await self.desk.cancel(reseller, [i for _, i in ids if i])

        def answer(order_id: int | None) -> Any:
            error = results.get(order_id, v2.INCORRECT_ORDER) if order_id else v2.INCORRECT_ORDER
            return 1 if error is None else {"error": error}

        return [{"order": i or sent, "cancel": answer(i)} for sent, i in ids]


def _single_id(raw: str | None) -> int:
    """The `order` parameter: missing is a malformed request, anything else unknown or an ID."""
    if raw is None:
        raise v2.V2Error(v2.INCORRECT_REQUEST)
    order_id = v2.parse_id(raw)
    if order_id is None:
        raise v2.V2Error(v2.INCORRECT_ORDER)
    return order_id


def _item(result: str | None, *, missing: str) -> Any:
    """A per-item status in a list, or `{"error": missing}`."""
    return {"error": missing} if result is None else result


def _refill_item(result: int | str | None) -> Any:
    """`refill` per item: the local refill ID (int), or the error that stopped it."""
    if isinstance(result, int):
        return result
    return {"error": result or v2.INCORRECT_ORDER}


_HANDLERS: Final[dict[str, Handler]] = {
    "services": V2Api.services,
    "balance": V2Api.balance,
    "add": V2Api.add,
    "status": V2Api.status,
    "refill": V2Api.refill,
    "refill_status": V2Api.refill_status,
    "cancel": V2Api.cancel,
}
