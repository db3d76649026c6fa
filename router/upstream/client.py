"""The client for one upstream provider: the calls, their timeouts, redaction of its key."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, TypeVar
from urllib.parse import quote_plus

import aiohttp
import structlog
from aiohttp.http_exceptions import HttpProcessingError

from router import v2
from router.config import Provider
from router.upstream.answers import (
    AddResult,
    CallRecord,
    Catalogue,
    Outcome,
    OutcomeUnknown,
    StatusReading,
    UpstreamError,
    UpstreamService,
    UpstreamStatus,
    UpstreamUnreachable,
    _exception_text,
    _shorten,
    classify_exception,
    parse_answer,
    parse_balance,
    parse_cancels,
    parse_catalogue,
    parse_refill,
    parse_refill_statuses,
    parse_refills,
    parse_services,
    provider_trouble,
    read_add,
    read_statuses,
    unusable_statuses,
)

log = structlog.get_logger(__name__)

# Connecting (pool wait, DNS, TCP, TLS) must give up strictly before the total timeout: then a
# slow connect surfaces as ConnectionTimeoutError (nothing sent) and not as the bare
# TimeoutError of the total timeout, which cannot tell whether the request went out.
CONNECT_TIMEOUT: Final = 5.0
MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024  # a big catalogue is a few MB; more is garbage
_REDACTED: Final = "**********"
_FORM_HEADERS: Final = {aiohttp.hdrs.CONTENT_TYPE: "application/x-www-form-urlencoded"}
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, HttpProcessingError, OSError)  # TimeoutError too

T = TypeVar("T")
# Form fields as `urlencode` quotes them (quote_plus, nothing safe), the recent short ones kept:
# names, the key, the action, service IDs and quantities repeat from call to call. A pure
# function of the text: nothing kept can go stale; at most about 1 MB kept.
QUOTED_KEPT: Final = 4096
QUOTED_KEPT_CHARS: Final = 64  # a longer field (a link, comments) is quoted each time
_quoted_short: Final = functools.lru_cache(maxsize=QUOTED_KEPT)(quote_plus)


@functools.lru_cache(maxsize=64)
def _standalone(key: str) -> re.Pattern[bytes]:
    """`key` where no ASCII letter or digit touches it on either side, in an answer's bytes."""
    return re.compile(rb"(?<![0-9A-Za-z])" + re.escape(key.encode("utf-8")) + rb"(?![0-9A-Za-z])")


@functools.lru_cache(maxsize=64)
def _standalone_text(key: str) -> re.Pattern[str]:
    """The same, in a text."""
    return re.compile(r"(?<![0-9A-Za-z])" + re.escape(key) + r"(?![0-9A-Za-z])")


def form_body(form: Mapping[str, str]) -> bytes:
    """`urlencode(form).encode()`, byte for byte. Encoded here: aiohttp's FormData machinery
    was a tenth of an `add`'s CPU time, and `urlencode` a tenth of what was left."""
    return "&".join(f"{_quoted(name)}={_quoted(value)}" for name, value in form.items()).encode()


def _quoted(text: str) -> str:
    return _quoted_short(text) if len(text) <= QUOTED_KEPT_CHARS else quote_plus(text)


def _batch(ids: Sequence[int]) -> list[int]:
    unique = list(dict.fromkeys(ids))
    if len(unique) > v2.MAX_IDS_PER_REQUEST:
        raise ValueError(f"at most {v2.MAX_IDS_PER_REQUEST} IDs per call, got {len(unique)}")
    return unique


def _joined(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids))


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    """The body as sent: decoding it is part of reading the answer (see parse_answer)."""
    if (response.content_length or 0) > MAX_ANSWER_BYTES:
        raise OutcomeUnknown(f"answer of {response.content_length} bytes: too large")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise OutcomeUnknown(f"answer over {MAX_ANSWER_BYTES} bytes: too large")
    return bytes(body)


# --- The client ----------------------------------------------------------------------------------


class UpstreamClient:
    """One upstream provider's v2 API, over the app's shared session.

    Usage: `result = await UpstreamClient(provider, session, on_call=hook).add({"service": "7",
    "link": link, "quantity": "1000"})`; `hook` gets one CallRecord per call, failures too.
    """

    def __init__(
        self,
        provider: Provider,
        session: aiohttp.ClientSession,
        *,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> None:
        self.name = provider.name
        self._provider = provider
        self._session = session
        self._on_call = on_call
        connect = min(CONNECT_TIMEOUT, provider.timeout / 2)
        self._timeout = aiohttp.ClientTimeout(
            total=provider.timeout, connect=connect, sock_connect=connect
        )

    async def add(self, params: Mapping[str, str]) -> AddResult:
        """Place one order. Never raises for upstream or network failures: classifies them."""
        if "key" in params or "action" in params:
            raise ValueError("key and action are set by the client")
        started, start = time.time(), time.perf_counter()
        outcome = Outcome.AMBIGUOUS  # if cancelled mid-call, the order may exist upstream
        rate_limited = turned_away = False
        try:
            try:
                status, content_type, body = await self._exchange("add", params)
                answer = read_add(status, content_type, body)
                outcome, order, error = answer.outcome, answer.upstream_order, answer.error
                rate_limited, turned_away = answer.rate_limited, answer.turned_away
            except UpstreamError as exc:
                outcome, order, error = exc.outcome, None, exc.message
            except Exception as exc:  # unforeseen, perhaps after sending: the order may exist
                outcome, order = Outcome.AMBIGUOUS, None
                error = f"unexpected failure ({_exception_text(exc)})"
            latency = time.perf_counter() - start
            redacted = self._redact(error) if error else None
            return AddResult(
                outcome,
                order,
                redacted,
                latency,
                rate_limited=rate_limited,
                turned_away=turned_away,
            )
        finally:
            self._record("add", started, time.perf_counter() - start, outcome)

    async def status(
        self, order_ids: Sequence[int], quantities: Mapping[int, int] | None = None
    ) -> dict[int, UpstreamStatus | None]:
        """Status of up to 100 orders (none: no call); None for each one to leave as it was."""
        readings = await self.status_readings(order_ids, quantities)
        return {i: reading.status for i, reading in readings.items()}

    async def status_readings(
        self, order_ids: Sequence[int], quantities: Mapping[int, int] | None = None
    ) -> dict[int, StatusReading]:
        """Like `status`, with the raw text of each item that could not be read.

        An answer that came back but cannot be used as a whole (an error object, a 4xx page,
        not JSON, bytes that are not UTF-8, JSON nested too deep for the reader) is a reading
        per order that says so. It raises when nothing usable came back because of the
        provider: no answer, HTTP 408, 429 or 5xx.
        """
        if not (ids := _batch(order_ids)):
            return {}
        fields = {"orders": _joined(ids)}
        readings = await self._call(
            "status",
            fields,
            lambda d: read_statuses(d, ids, quantities or {}),
            unusable=lambda failure: unusable_statuses(ids, failure),
        )
        return {
            i: StatusReading(r.status, self._redact(r.problem)) if r.problem else r
            for i, r in readings.items()
        }

    async def refill(self, order_id: int) -> int:
        """Ask for a refill of one order; the upstream refill ID."""
        return await self._call("refill", {"order": str(order_id)}, parse_refill)

    async def refill_many(self, order_ids: Sequence[int]) -> dict[int, int | UpstreamError]:
        """Ask for refills of up to 100 orders in ONE call (none: no call): per order, the
        upstream refill ID or the error of its item (see parse_refills). A failure of the whole
        call raises, as every action does. A lone order is sent as `order`, the form every
        panel takes."""
        if not (ids := _batch(order_ids)):
            return {}
        fields = {"order": str(ids[0])} if len(ids) == 1 else {"orders": _joined(ids)}
        answers = await self._call("refill", fields, lambda d: parse_refills(d, ids))
        return {
            i: type(a)(self._redact(a.message)) if isinstance(a, UpstreamError) else a
            for i, a in answers.items()
        }

    async def refill_status(self, refill_ids: Sequence[int]) -> dict[int, str | None]:
        """Refill words (v2.REFILL_STATUSES) of up to 100 refills; None where unknown."""
        if not (ids := _batch(refill_ids)):
            return {}
        fields = {"refills": _joined(ids)}
        return await self._call("refill_status", fields, lambda d: parse_refill_statuses(d, ids))

    async def cancel(self, order_ids: Sequence[int]) -> dict[int, str | None]:
        """Ask to cancel up to 100 orders: None where accepted, else the upstream's reason."""
        if not (ids := _batch(order_ids)):
            return {}
        answers = await self._call(
            "cancel", {"orders": _joined(ids)}, lambda d: parse_cancels(d, ids)
        )
        return {i: self._redact(error) if error else None for i, error in answers.items()}

    async def balance(self) -> tuple[Decimal, str]:
        """(balance, currency) of our account at this provider."""
        return await self._call("balance", {}, lambda d: parse_balance(d, self._provider.currency))

    async def services(self) -> list[UpstreamService]:
        """The provider's catalogue; OutcomeUnknown when empty or unparseable (and, like every
        action, UpstreamRefused for an error answer)."""
        return await self._call("services", {}, parse_services)

    async def catalogue(self) -> Catalogue:
        """`services`, with the IDs of the entries that could not be read."""
        return await self._call("services", {}, parse_catalogue)

    async def answer(self, action: str, fields: Mapping[str, str]) -> tuple[int, str, bytes]:
        """One call's answer as it came: (HTTP status, content type, body with the key
        redacted), for checks of what a server sends (router.probe); raise UpstreamUnreachable
        or OutcomeUnknown when no complete answer came back. It classifies nothing, so it is
        not reported to `on_call`."""
        return await self._exchange(action, fields)

    async def _call(
        self,
        action: str,
        fields: Mapping[str, str],
        parse: Callable[[Any], T],
        *,
        unusable: Callable[[UpstreamError], T] | None = None,
    ) -> T:
        """One call, its answer parsed; raise the (redacted) UpstreamError it amounts to.

        With `unusable`, an answer that came back but cannot be used (refused, unreadable) is
        its result instead, unless the HTTP status says the provider is in trouble: then, as
        when nothing came back, the call raises.
        """
        started, start = time.time(), time.perf_counter()
        outcome = Outcome.AMBIGUOUS
        try:
            try:
                status, content_type, body = await self._exchange(action, fields)
            except UpstreamError as exc:
                failure = exc  # redacted by _exchange
            except Exception as exc:  # unforeseen: the client still only raises UpstreamError
                failure = OutcomeUnknown(self._redact(f"unexpected ({_exception_text(exc)})"))
            else:
                try:
                    result = parse(parse_answer(status, content_type, body))
                except UpstreamError as exc:
                    failure = type(exc)(self._redact(exc.message))
                except Exception as exc:  # a reader that crashed on this answer
                    failure = OutcomeUnknown(
                        self._redact(f"HTTP {status}: unreadable ({_exception_text(exc)})")
                    )
                else:
                    outcome = Outcome.ACCEPTED
                    return result
                if unusable is not None and not provider_trouble(status):
                    outcome = failure.outcome
                    return unusable(failure)
            outcome = failure.outcome
            raise failure  # outside the handler: a redacted error keeps no link to the original
        finally:
            self._record(action, started, time.perf_counter() - start, outcome)

    async def _exchange(self, action: str, fields: Mapping[str, str]) -> tuple[int, str, bytes]:
        """POST one action: (HTTP status, content type, body), or raise UpstreamUnreachable or
        OutcomeUnknown when no complete answer came back."""
        form = {**fields, "key": self._provider.key.value, "action": action}
        body = form_body(form)
        try:
            async with self._session.post(
                self._provider.url,
                data=body,
                headers=_FORM_HEADERS,
                timeout=self._timeout,
                allow_redirects=False,  # a redirected POST would be re-sent as a bare GET
                raise_for_status=False,
            ) as response:
                # Redacted whole, before any error text cuts it: a key split by the cut would
                # leave its first characters in the text.
                answer = self._redact_body(await _read_body(response))
                return response.status, response.headers.get(aiohttp.hdrs.CONTENT_TYPE, ""), answer
        except _TRANSPORT_ERRORS as exc:
            detail = str(exc) or f"no complete answer within {self._provider.timeout:g} s"
            unreachable = classify_exception(exc) is Outcome.UNREACHABLE
            failure = (UpstreamUnreachable if unreachable else OutcomeUnknown)(
                self._redact(_shorten(f"{type(exc).__name__}: {detail}"))
            )
        raise failure  # outside the handler: aiohttp's text may show the URL, ours is redacted

    def _redact(self, text: str) -> str:
        """The key out of an error text, where it stands alone (as in `_redact_body`)."""
        key = self._provider.key.value
        if not key or key not in text:
            return text
        return _standalone_text(key).sub(_REDACTED, text)

    def _redact_body(self, body: bytes) -> bytes:
        """The key out of the answer as sent, before it is decoded (see parse_answer): each
        place it stands alone, not inside a longer word or number. A key of a few characters
        ("k", "1234") would otherwise be cut out of the answer's own words and IDs ("Package",
        an order 12345), and the answer read wrong; a key that an error echoes stands between
        spaces, quotes or `=` and `&`."""
        key = self._provider.key.value
        if not key or key.encode("utf-8") not in body:  # nearly always: nothing to look at
            return body
        return _standalone(key).sub(_REDACTED.encode(), body)

    def _record(self, action: str, started: float, latency: float, outcome: Outcome) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(CallRecord(self.name, action, started, latency, outcome))
        except Exception:  # a broken metrics hook must not turn a placed order into an error
            log.exception("upstream_on_call_failed", provider=self.name, action=action)
