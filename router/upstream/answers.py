"""Upstream answers, read purely: each classified into an Outcome or parsed into a dataclass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

import aiohttp
import structlog

from router import v2

log = structlog.get_logger(__name__)

MAX_ERROR_TEXT: Final = 300
MAX_UPSTREAM_INT: Final = 2**63 - 1  # fits an SQLite INTEGER
MAX_MONEY: Final = Decimal(10) ** 12  # anything above is garbage (and costly to convert)
_SNIPPET: Final = 80  # characters of a body quoted in an error text


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # the call got a usable answer (for `add`: the order exists upstream)
    REFUSED = "refused"
    NO_FUNDS = "no_funds"
    UNREACHABLE = "unreachable"
    AMBIGUOUS = "ambiguous"


class UpstreamError(Exception):
    """A failed upstream call. `message` is safe to log and show ops: never the API key."""

    outcome: Outcome = Outcome.AMBIGUOUS

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UpstreamRefused(UpstreamError):
    outcome = Outcome.REFUSED


class UpstreamNoFunds(UpstreamRefused):
    outcome = Outcome.NO_FUNDS


class UpstreamRateLimited(UpstreamRefused):
    """HTTP 429: the provider refuses load, not this order (nothing was created)."""


class UpstreamTurnedAway(UpstreamRefused):
    """An HTTP 4xx (but 408 and 429) with neither an order nor an `{"error": ...}` text in it: a
    firewall's page, a 404 at the API URL, a web server's 413. Turned away before the panel
    (nothing was created), and by the provider's side or our access to it, not for this order.
    """


class UpstreamUnreachable(UpstreamError):
    outcome = Outcome.UNREACHABLE


class OutcomeUnknown(UpstreamError):
    outcome = Outcome.AMBIGUOUS


@dataclass(frozen=True, slots=True)
class CallRecord:
    provider: str
    action: str
    started_at: float  # unix time
    latency: float  # seconds
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class AddResult:
    outcome: Outcome
    upstream_order: int | None  # set when outcome is ACCEPTED
    error: str | None  # what went wrong, for the attempt row and ops; None when accepted
    latency: float
    rate_limited: bool = False  # refused with HTTP 429 (UpstreamRateLimited): load, not the order
    turned_away: bool = False  # refused with a 4xx page (UpstreamTurnedAway): not about the order


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    status: str  # one of v2.ORDER_STATUSES
    remains: int | None  # at least 0, at most the quantity when one is given (counted orders);
    # None when the upstream does not know
    start_count: int | None
    charge: Decimal | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class UpstreamService:
    service: int
    name: str
    type: str
    category: str
    rate: Decimal
    min: int
    max: int
    refill: bool
    cancel: bool
    dripfeed: bool


# --- Pure classification -------------------------------------------------------------------------


def classify_exception(exc: BaseException) -> Outcome:
    """UNREACHABLE when aiohttp failed before sending anything, else AMBIGUOUS.

    Order matters: ConnectionTimeoutError is also a ServerTimeoutError and a TimeoutError, and
    ClientConnectorError (DNS, refused, TLS, certificate) is also a ClientOSError.
    """
    if isinstance(
        exc,
        aiohttp.ConnectionTimeoutError
        | aiohttp.ClientConnectorError
        | aiohttp.ServerFingerprintMismatch
        | aiohttp.InvalidURL
        | aiohttp.NonHttpUrlClientError,
    ):
        return Outcome.UNREACHABLE
    return Outcome.AMBIGUOUS  # read timeouts, resets, disconnects, bad payloads, the unforeseen


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _error_text(value: object) -> str:
    return _shorten(value if isinstance(value, str) else repr(value))


def _refusal(value: object) -> UpstreamRefused:
    """The exception for an `{"error": value}` answer."""
    text = _error_text(value)
    if "not enough funds" in text.lower():
        return UpstreamNoFunds(text)
    return UpstreamRefused(text)


def _item_error(item: object) -> object | None:
    """The error of an `{"error": ...}` object (a null or empty error is no error), else None."""
    if isinstance(item, dict):
        return item.get("error") or None
    return None


def _exception_text(exc: BaseException) -> str:
    return _shorten(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _snippet(body: str | bytes) -> str:
    """The start of a body, for an error text (bytes that are not UTF-8 shown as U+FFFD)."""
    if isinstance(body, bytes):
        return body[: 4 * _SNIPPET].decode("utf-8", errors="replace")[:_SNIPPET]
    return body[:_SNIPPET]


def provider_trouble(status: int) -> bool:
    """Whether an HTTP status says the provider is in trouble rather than answering: a request
    timeout (the panel may have taken it before the gateway gave up), rate limiting, any 5xx."""
    return status in (408, 429) or status >= 500


def _strict_text(status: int, body: str | bytes) -> str:
    """The body as text; a body that is not UTF-8 is unreadable.

    JSON is UTF-8 (RFC 8259), and PHP's json_encode escapes everything else: bytes that are
    not UTF-8 mean the answer was mangled on its way, so nothing in it is taken as an order ID
    or a status (decoding them as U+FFFD could still leave a well-formed `{"order": ...}`).
    """
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OutcomeUnknown(
            f"HTTP {status}: not UTF-8 (byte {exc.start}): {_snippet(body)!r}"
        ) from None


def _turned_away(status: int, content_type: str, body: str | bytes) -> UpstreamError:
    """What a 4xx (but 408 and 429) amounts to: turned away before the panel took the request,
    unless the body holds an order (then the order may exist) or cannot be read at all. With
    the panel's `{"error": ...}` in it, a refusal of the order like one on HTTP 200; without,
    UpstreamTurnedAway.

    The body is decoded leniently here: U+FFFD cannot forge an order, and a body that shows one
    keeps the outcome ambiguous anyway.
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        data = v2.extract_json(text)
    except ValueError:  # a firewall's or a web server's page: no order in it
        what = content_type or "no content type"
        return UpstreamTurnedAway(f"HTTP {status} ({what}): {_error_text(text[:_SNIPPET])}")
    if isinstance(data, dict) and data.get("order"):
        return OutcomeUnknown(f"HTTP {status} with an order in the answer: {_error_text(data)}")
    error = _item_error(data)
    if error is not None:
        return _refusal(error)
    return UpstreamTurnedAway(f"HTTP {status} without an order: {_error_text(text[:_SNIPPET])}")


def parse_answer(status: int, content_type: str, body: str | bytes) -> Any:
    """The JSON of a usable answer, or raise the UpstreamError subclass it amounts to.

    It raises nothing else: an answer that crashes the reader (a RecursionError on JSON nested
    thousands deep, anything unforeseen) is OutcomeUnknown, like any unreadable answer.
    """
    try:
        return _parse_answer(status, content_type, body)
    except UpstreamError:
        raise
    except Exception as exc:
        raise OutcomeUnknown(f"HTTP {status}: unreadable ({_exception_text(exc)})") from None


def _parse_answer(status: int, content_type: str, body: str | bytes) -> Any:
    if status == 429:
        raise UpstreamRateLimited("HTTP 429 Too Many Requests")
    if provider_trouble(status):
        raise OutcomeUnknown(f"HTTP {status}: {_error_text(_snippet(body))}")
    if 400 <= status < 500:
        raise _turned_away(status, content_type, body)
    text = _strict_text(status, body)
    try:
        data = v2.extract_json(text)
    except ValueError:
        what = content_type or "no content type"
        raise OutcomeUnknown(f"HTTP {status} ({what}), not JSON: {text[:_SNIPPET]!r}") from None
    error = _item_error(data)
    if error is not None and status < 300:
        if isinstance(data, dict) and data.get("order"):
            raise OutcomeUnknown(f"both an order and an error: {_error_text(data)}")
        raise _refusal(error)
    if not 200 <= status < 300:
        raise OutcomeUnknown(f"HTTP {status} without an error: {_error_text(text[:_SNIPPET])}")
    return data


def _int(value: object, *, minimum: int = 0) -> int | None:
    """An upstream integer within [minimum, MAX_UPSTREAM_INT], else None.

    The bound is checked on the Decimal first: int(Decimal("1e999999")) takes seconds.
    """
    number = v2.parse_decimal(value)
    if number is None or not minimum <= number <= MAX_UPSTREAM_INT:
        return None
    return v2.parse_int(value)


def _money(value: object, *, signed: bool = False) -> Decimal | None:
    number = v2.parse_decimal(value)
    if number is None or abs(number) >= MAX_MONEY or (number < 0 and not signed):
        return None
    return number


def _flag(value: object) -> bool | None:
    """A boolean sent as true/false, 1/0 or their strings; None if it is neither."""
    if isinstance(value, bool):
        return value
    return {"1": True, "true": True, "0": False, "false": False, "": False}.get(
        str(value).strip().lower() if isinstance(value, int | str) else "?"
    )


@dataclass(frozen=True, slots=True)
class AddAnswer:
    """One answer to `add` as read: what an AddResult says of it, but the latency."""

    outcome: Outcome
    upstream_order: int | None  # set when outcome is ACCEPTED
    error: str | None  # None when accepted
    rate_limited: bool = False  # UpstreamRateLimited
    turned_away: bool = False  # UpstreamTurnedAway


def read_add(status: int, content_type: str, body: str | bytes) -> AddAnswer:
    """One answer to `add`, read. Never raises: what cannot be read is ambiguous (the order may
    exist)."""
    try:
        data = parse_answer(status, content_type, body)
        order = _int(data.get("order"), minimum=1) if isinstance(data, dict) else None
    except UpstreamError as exc:
        return AddAnswer(
            exc.outcome,
            None,
            exc.message,
            rate_limited=isinstance(exc, UpstreamRateLimited),
            turned_away=isinstance(exc, UpstreamTurnedAway),
        )
    except Exception as exc:
        return AddAnswer(Outcome.AMBIGUOUS, None, f"unreadable answer ({_exception_text(exc)})")
    if order is None:
        error = f"no order ID in the answer: {_error_text(_snippet(body))}"
        return AddAnswer(Outcome.AMBIGUOUS, None, error)
    return AddAnswer(Outcome.ACCEPTED, order, None)


def parse_status_item(raw: object, quantity: int | None) -> UpstreamStatus | None:
    """One order's status; None leaves the order as it was (error, unknown word, garbage)."""
    if not isinstance(raw, dict) or _item_error(raw) is not None:
        return None
    status = v2.normalise_status(raw.get("status"))
    if status is None:
        return None
    remains = _int(raw.get("remains"), minimum=-MAX_UPSTREAM_INT)
    if remains is not None:  # negative means over-delivered
        remains = max(remains, 0) if quantity is None else min(max(remains, 0), quantity)
    currency = raw.get("currency")
    return UpstreamStatus(
        status=status,
        remains=remains,
        start_count=_int(raw.get("start_count")),
        charge=_money(raw.get("charge")),
        currency=currency.strip().upper() or None if isinstance(currency, str) else None,
    )


def _garbage(what: str, data: Any) -> OutcomeUnknown:
    return OutcomeUnknown(f"{what}: {_error_text(data)}")


def _by_id(data: Any, ids: Sequence[int], *, field: str, single: str) -> dict[int, object]:
    """Per-ID items of a multi answer: an object keyed by the IDs as sent, or a list of objects
    naming their ID in `field`. A lone ID may also be answered in the single shape (`single`).
    """
    if isinstance(data, list):  # also [], which is how PHP encodes an empty keyed array
        items: dict[int, object] = {}
        for item in data:
            item_id = _int(item.get(field), minimum=1) if isinstance(item, dict) else None
            if item_id is not None:
                items.setdefault(item_id, item)
        return items
    if not isinstance(data, dict):
        raise _garbage("not a list or an object", data)
    if len(ids) == 1 and str(ids[0]) not in data and single in data:
        return {ids[0]: data}
    return {item_id: data[str(item_id)] for item_id in ids if str(item_id) in data}


@dataclass(frozen=True, slots=True)
class StatusReading:
    """One order's item in a multi `status` answer: its status, or the text we could not read."""

    status: UpstreamStatus | None
    problem: str | None  # set when status is None: the per-item error or the unreadable item


def read_statuses(
    data: Any, ids: Sequence[int], quantities: Mapping[int, int]
) -> dict[int, StatusReading]:
    """The answer to a multi `status` per asked ID, keeping what could not be read (the status
    sync records it for ops instead of guessing a state)."""
    items = _by_id(data, ids, field="order", single="status")
    readings: dict[int, StatusReading] = {}
    for i in ids:
        if i not in items:
            readings[i] = StatusReading(None, "missing from the answer")
            continue
        try:
            readings[i] = _read_status_item(items[i], quantities.get(i))
        except Exception as exc:  # one item that crashes the reader leaves only itself unread
            readings[i] = StatusReading(None, f"unreadable item ({_exception_text(exc)})")
    return readings


def _read_status_item(raw: object, quantity: int | None) -> StatusReading:
    status = parse_status_item(raw, quantity)
    if status is not None:
        return StatusReading(status, None)
    error = _item_error(raw)
    return StatusReading(None, _error_text(raw if error is None else error))


def unusable_statuses(ids: Sequence[int], failure: UpstreamError) -> dict[int, StatusReading]:
    """The reading of each asked ID when the answer as a whole could not be used (refused,
    unreadable): nothing about any of them, and why."""
    problem = _shorten(f"whole answer: {failure.message}")
    return {i: StatusReading(None, problem) for i in ids}


def parse_refill(data: Any) -> int:
    """The upstream refill ID in the answer to `refill`."""
    value = data.get("refill") if isinstance(data, dict) else None
    if (error := _item_error(value)) is not None:
        raise _refusal(error)
    if (refill := _int(value, minimum=1)) is None:
        raise _garbage("no refill ID in the answer", data)
    return refill


def _refill_item(item: object) -> int | UpstreamError:
    """One order's item in a multi `refill` answer: `{"order": 1, "refill": 5}`, `{"refill":
    {"error": ...}}`, a bare refill ID or a bare error string (keyed by order ID)."""
    value = item.get("refill") if isinstance(item, dict) and "refill" in item else item
    error = _item_error(value)
    if error is None and value is not item:
        error = _item_error(item)  # {"order": 1, "refill": null, "error": "..."}
    if error is not None:
        return _refusal(error)
    if (refill := _int(value, minimum=1)) is not None:
        return refill
    if isinstance(value, str) and value.strip() and v2.parse_decimal(value) is None:
        return _refusal(value)  # a bare error string
    return _garbage("no refill ID in the item", item)


def parse_refills(data: Any, ids: Sequence[int]) -> dict[int, int | UpstreamError]:
    """The answer to a multi `refill`, per asked order: the upstream refill ID, or the error of
    its item (UpstreamRefused when the upstream said why, OutcomeUnknown when the item is
    missing or unreadable: a refill may have been made)."""
    items = _by_id(data, ids, field="order", single="refill")
    return {
        i: _refill_item(items[i]) if i in items else OutcomeUnknown("missing from the answer")
        for i in ids
    }


def parse_refill_statuses(data: Any, ids: Sequence[int]) -> dict[int, str | None]:
    """The answer to a multi `refill_status`: a refill word per asked ID, None if unknown."""
    items = _by_id(data, ids, field="refill", single="status")
    words = {i: item.get("status") if isinstance(item, dict) else item for i, item in items.items()}
    return {i: v2.normalise_refill_status(words.get(i)) for i in ids}


def _cancel_error(item: object) -> str | None:
    value = item.get("cancel") if isinstance(item, dict) else item
    if (error := _item_error(value)) is not None:
        return _error_text(error)
    if _flag(value):
        return None
    if isinstance(value, str) and value.strip():
        return _error_text(value)  # a bare error string
    return f"cancel not accepted: {_error_text(value)}"


def parse_cancels(data: Any, ids: Sequence[int]) -> dict[int, str | None]:
    """The answer to a multi `cancel`: None where accepted, else why not, per asked ID."""
    items = _by_id(data, ids, field="order", single="cancel")
    return {i: _cancel_error(items.get(i, "missing from the answer")) for i in ids}


def parse_balance(data: Any, default_currency: str) -> tuple[Decimal, str]:
    balance = _money(data.get("balance"), signed=True) if isinstance(data, dict) else None
    if balance is None:
        raise _garbage("no balance in the answer", data)
    currency = data.get("currency")
    if isinstance(currency, str) and currency.strip():
        return balance, currency.strip().upper()
    return balance, default_currency


def _parse_service(item: object) -> UpstreamService | None:
    if not isinstance(item, dict):
        return None
    service, rate = _int(item.get("service"), minimum=1), _money(item.get("rate"))
    low, high = _int(item.get("min")), _int(item.get("max"))
    name, kind, category = item.get("name"), item.get("type", "Default"), item.get("category", "")
    if service is None or rate is None or low is None or high is None or low > high:
        return None
    if not isinstance(name, str) or not isinstance(kind, str) or not isinstance(category, str):
        return None
    flags = {f: _flag(item.get(f, False)) is True for f in ("refill", "cancel", "dripfeed")}
    return UpstreamService(service, name, kind, category, rate, low, high, **flags)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """A provider's `services` answer as read."""

    services: list[UpstreamService]  # the entries we could read
    unreadable: frozenset[int]  # IDs of entries listed but not readable: there, not gone


def parse_catalogue(data: Any) -> Catalogue:
    """The catalogue: malformed entries skipped (their IDs kept when readable); none valid is an
    error (never a partial one)."""
    items = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise _garbage("empty or malformed catalogue", data)
    services: list[UpstreamService] = []
    unreadable: set[int] = set()
    for item in items:
        service = _parse_service(item)
        if service is not None:
            services.append(service)
        elif isinstance(item, dict) and (number := _int(item.get("service"), minimum=1)):
            unreadable.add(number)
    if not services:
        raise OutcomeUnknown(f"none of the {len(items)} catalogue entries is valid")
    if len(services) < len(items):
        log.warning("upstream_services_skipped", skipped=len(items) - len(services))
    return Catalogue(services, frozenset(unreadable) - {s.service for s in services})


def parse_services(data: Any) -> list[UpstreamService]:
    """The readable entries of a catalogue (see parse_catalogue)."""
    return parse_catalogue(data).services
