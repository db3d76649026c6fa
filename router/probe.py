"""`smm-router probe`: does a v2 server (an upstream about to be added) answer as V2.md says?

Usage::

    report = await probe("https://panel.example/api/v2", key)
    report.ok                  # no deviation from V2.md
    report.lines()             # one line per deviation
    report.document()          # {"url": ..., "ok": ..., "checks": [{"name", "ok", "detail"}]}

Only calls that read, or that every panel refuses, are made, in this order:
- `services`: a JSON array; in each entry `service` an int, `name` and `category` strings, `type`
  one of V2.md's, `rate`, `min` and `max` strings of numbers, `refill`, `cancel` and `dripfeed`
  booleans; the router's own reader (router.upstream.parse_catalogue) reads every entry.
- `balance`: `balance` a string of a number, `currency` a currency code.
- `status` of UNKNOWN_ORDER, an order ID no panel reaches: `{"error": ...}` (V2.md's is
  `Incorrect order ID`).
- `add` of REFUSED_ADD: `{"error": ...}`. It asks for service 0 (panels number services from 1:
  no panel has a service 0), a quantity of 0 (below every minimum, and it would cost nothing)
  and no link (every type but Subscriptions requires one): three reasons to refuse it, and one
  is enough. A server that accepts it anyway is reported with the order ID to cancel.
Each answer's transport is checked too: HTTP 200 (V2.md answers errors with 200 as well), a
JSON body with nothing around it (no PHP notice, no HTML page), labelled `application/json`
(JSON labelled `text/html` or `text/plain` is tolerated, as V2.md allows, and noted).

A deviation is one line; the API key never appears in one (the client redacts every answer).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from router import v2
from router.config import DEFAULT_UPSTREAM_TIMEOUT, Provider, Secret
from router.upstream import (
    Outcome,
    UpstreamClient,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnreachable,
    parse_answer,
    parse_balance,
    parse_catalogue,
    read_add,
)

UNKNOWN_ORDER: Final = 2**31 - 1  # the largest ID of a 32-bit column: no panel has got that far
REFUSED_ADD: Final = {"service": "0", "quantity": "0", "link": ""}
CHECKS: Final = ("services", "balance", "status", "add")
JSON_TYPE: Final = "application/json"
TOLERATED_TYPES: Final = ("text/html", "text/plain")  # V2.md: JSON labelled so is still JSON
_SNIPPET: Final = 60
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_FLAGS: Final = ("refill", "cancel", "dripfeed")
_NUMBER_FIELDS: Final = ("rate", "min", "max")
_NO_JSON: Final = object()


@dataclass(frozen=True, slots=True)
class Check:
    """One call's verdict: what deviates from V2.md, or what it answered."""

    name: str
    deviations: tuple[str, ...]
    seen: str  # what the answer said, when nothing deviates
    note: str = ""  # what V2.md tolerates in it, said either way

    @property
    def ok(self) -> bool:
        return not self.deviations

    @property
    def detail(self) -> str:
        return ("; ".join(self.deviations) if self.deviations else self.seen) + self.note


@dataclass(frozen=True, slots=True)
class Report:
    url: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def lines(self) -> list[str]:
        """One line per deviation, named by its check."""
        return [f"{check.name}: {line}" for check in self.checks for line in check.deviations]

    def document(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def check_url(url: str) -> str:
    """`url` if it is an http:// or https:// URL with a host; else raise ValueError."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"not an http:// or https:// URL: {url[:_SNIPPET]!r}")
    return url


async def probe(url: str, key: str, *, call_seconds: float = DEFAULT_UPSTREAM_TIMEOUT) -> Report:
    """Call the v2 server at `url` with `key` (see the module docstring) and judge each answer;
    each call may take `call_seconds`."""
    provider = Provider(name="probe", url=check_url(url), key=Secret(key), timeout=call_seconds)
    calls: tuple[tuple[str, dict[str, str], Callable[[Answer, str | None], Check]], ...] = (
        ("services", {}, lambda answer, _: _services(answer)),
        ("balance", {}, lambda answer, _: _balance(answer)),
        ("status", {"order": str(UNKNOWN_ORDER)}, _status),
        ("add", dict(REFUSED_ADD), _add),
    )
    key_refused: str | None = None  # how `balance` was refused: the key, most likely
    checks: list[Check] = []
    async with aiohttp.ClientSession(headers={"User-Agent": "smm-router"}) as session:
        client = UpstreamClient(provider, session)
        for action, fields, judge in calls:
            try:
                status, content_type, body = await client.answer(action, fields)
            except UpstreamUnreachable as exc:
                checks.append(Check(action, (f"unreachable: {exc.message}",), ""))
                if len(checks) == 1:  # nothing answers there: no point in asking again
                    skipped = (f"not checked: {url} is unreachable",)
                    checks += [Check(name, skipped, "") for name, _, _ in calls[1:]]
                    break
                continue
            except UpstreamError as exc:
                checks.append(Check(action, (f"no complete answer: {exc.message}",), ""))
                continue
            answer = Answer.read(status, content_type, body)
            checks.append(judge(answer, key_refused))
            if action == "balance":
                key_refused = answer.error()[0]
    return Report(url, tuple(checks))


# --- Reading one answer --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer as it came, its JSON if any, and what its transport does against V2.md."""

    status: int
    content_type: str
    body: bytes
    data: Any  # _NO_JSON when the body holds no JSON
    deviations: tuple[str, ...]
    note: str  # a tolerated label, said in the check's detail

    @property
    def json(self) -> bool:
        return self.data is not _NO_JSON

    @classmethod
    def read(cls, status: int, content_type: str, body: bytes) -> Answer:
        found: list[str] = []
        if status != 200:
            found.append(f"HTTP {status}: V2.md answers every action with HTTP 200, errors too")
        data: Any = _NO_JSON
        note = ""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            found.append(f"not UTF-8 text (byte {exc.start}): JSON is UTF-8")
            return cls(status, content_type, body, data, tuple(found), note)
        data, problem = _json_of(text)
        if problem:
            found.append(problem)
        media = content_type.split(";")[0].strip().lower()
        if data is not _NO_JSON and media != JSON_TYPE:
            if media in TOLERATED_TYPES:
                note = f" (JSON labelled {media}: tolerated, but V2.md serves {JSON_TYPE})"
            else:
                shown = media or "no content type"
                found.append(f"{shown}: V2.md labels its answers {JSON_TYPE}")
        return cls(status, content_type, body, data, tuple(found), note)

    def error(self) -> tuple[str | None, list[str]]:
        """The refusal this answer is (as the router reads it), and how its shape deviates
        from V2.md's `{"error": "<message>"}`; (None, []) when it is no refusal."""
        try:
            parse_answer(self.status, self.content_type, self.body)
        except UpstreamRefused as exc:
            found = []
            if isinstance(self.data, dict):
                if not isinstance(self.data.get("error"), str):
                    found.append(f"`error` is {_kind(self.data.get('error'))}: V2.md: a string")
                if extra := sorted(map(str, self.data.keys() - {"error"})):
                    found.append(f"keys besides `error`: {', '.join(extra)}")
            return exc.message, found
        except UpstreamError:
            return None, []
        return None, []


def _json_of(text: str) -> tuple[Any, str]:
    """(the JSON of a body or _NO_JSON, how it deviates: "" when it is exactly JSON)."""
    try:
        return json.loads(text), ""
    except ValueError:
        pass
    except RecursionError:
        return _NO_JSON, "JSON nested too deep to read"
    try:
        return v2.extract_json(text), f"text around the JSON (a PHP notice?): {_snippet(text)}"
    except (ValueError, RecursionError):
        return _NO_JSON, _not_json(text)


def _snippet(text: str) -> str:
    line = " ".join(text.split())
    return repr(line if len(line) <= _SNIPPET else line[:_SNIPPET] + "...")


def _not_json(text: str) -> str:
    if not text.strip():
        return "an empty body, not JSON"
    if text.lstrip().startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        shown = _snippet(title.group(1)) if title else _snippet(text)
        return f"an HTML page, not JSON: {shown}"
    return f"not JSON: {_snippet(text)}"


def _kind(value: object) -> str:
    """What a JSON value is, for a deviation line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "an array"


def _check(name: str, answer: Answer, found: Sequence[str], seen: str) -> Check:
    return Check(name, (*answer.deviations, *found), seen, answer.note)


# --- The checks ----------------------------------------------------------------------------------


class _Tally:
    """Deviations of catalogue entries, counted per kind: one line each, not one per entry."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, what: str, example: object = None, *, wanted: str = "") -> None:
        self.counts[what, wanted] += 1
        if example is not None:
            self.examples.setdefault((what, wanted), json.dumps(example)[:_SNIPPET])

    def lines(self) -> list[str]:
        lines = []
        for (what, wanted), count in self.counts.items():
            line = f"{what} in {count} of {self.entries} entries"
            if (what, wanted) in self.examples:
                line += f" (e.g. {self.examples[what, wanted]})"
            lines.append(line + (f"; V2.md: {wanted}" if wanted else ""))
        return lines


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_flag(value: object) -> bool:
    return isinstance(value, bool)


# Each field of a `services` entry, as V2.md types it, in its order.
_FIELDS: Final[tuple[tuple[str, str, Callable[[object], bool]], ...]] = (
    ("service", "an int", _is_int),
    ("name", "a string", _is_text),
    ("type", "a string", _is_text),
    ("category", "a string", _is_text),
    *((name, "a string", _is_text) for name in _NUMBER_FIELDS),
    *((name, "true or false", _is_flag) for name in _FLAGS),
)


def _entry(item: object, tally: _Tally) -> None:
    """Tally how one catalogue entry deviates from V2.md's fields and types."""
    if not isinstance(item, dict):
        tally.add(f"an entry is {_kind(item)}, not an object", item)
        return
    for name, wanted, right in _FIELDS:
        if name not in item:
            tally.add(f"no `{name}`")
            continue
        value = item[name]
        if not right(value):
            tally.add(f"`{name}` is {_kind(value)}", value, wanted=wanted)
        elif name == "type" and value not in v2.SERVICE_TYPES:
            tally.add("`type` is none of V2.md's types", value)
        elif name == "rate" and v2.parse_decimal(value) is None:
            tally.add("`rate` is not a number", value)
        elif name in ("min", "max") and v2.parse_int(value) is None:
            tally.add(f"`{name}` is not a whole number", value)
    low, high = v2.parse_int(item.get("min")), v2.parse_int(item.get("max"))
    if low is not None and high is not None and low > high:
        tally.add("`min` is greater than `max`", {"min": item.get("min"), "max": item.get("max")})


def _services(answer: Answer) -> Check:
    if not answer.json:
        return _check("services", answer, [], "")
    error, _ = answer.error()
    if error is not None:
        return _check("services", answer, [f"refused: {error!r}"], "")
    data = answer.data
    found: list[str] = []
    entries = data if isinstance(data, list) else []
    if isinstance(data, dict):
        found.append("an object, not an array: V2.md answers `services` with a JSON array")
        entries = list(data.values())
    elif not isinstance(data, list):
        found.append(f"{_kind(data)}, not an array of services")
    if not entries:
        return _check("services", answer, [*found, "no services listed"], "")
    tally = _Tally(len(entries))
    for item in entries:
        _entry(item, tally)
    found += tally.lines()
    ids = Counter(
        item.get("service") for item in entries if isinstance(item, dict) and "service" in item
    )
    if repeated := sorted(str(service) for service, count in ids.items() if count > 1):
        found.append(f"service IDs listed twice: {', '.join(repeated[:10])}")
    try:
        readable = len(parse_catalogue(data).services)
    except UpstreamError:
        readable = 0
    if readable < len(entries):
        found.append(f"the router cannot read {len(entries) - readable} of {len(entries)} entries")
    return _check("services", answer, found, f"{readable} services, each as V2.md types it")


def _balance(answer: Answer) -> Check:
    if not answer.json:
        return _check("balance", answer, [], "")
    error, _ = answer.error()
    if error is not None:
        return _check("balance", answer, [f"refused: {error!r}"], "")
    data = answer.data
    if not isinstance(data, dict):
        return _check("balance", answer, [f"{_kind(data)}, not an object"], "")
    found: list[str] = []
    balance, currency = data.get("balance"), data.get("currency")
    if "balance" not in data:
        found.append("no `balance`")
    elif not isinstance(balance, str):
        found.append(f'`balance` is {_kind(balance)}: V2.md: a string such as "100.84292"')
    elif v2.parse_decimal(balance) is None:
        found.append(f"`balance` is not a number: {_snippet(balance)}")
    if "currency" not in data:
        found.append("no `currency`")
    elif not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        found.append(f"`currency` is not a currency code of 3 capital letters: {currency!r}")
    seen = ""
    try:
        amount, code = parse_balance(data, "?")
        seen = f"balance {v2.format_money(amount)} {code}"
    except UpstreamError:
        pass
    return _check("balance", answer, found, seen)


def _refused_as_balance(error: str) -> str:
    return (
        f"refused with the error `balance` got ({error!r}): the key is refused, so this refusal "
        "says nothing"
    )


def _status(answer: Answer, key_refused: str | None) -> Check:
    if not answer.json:
        return _check("status", answer, [], "")
    error, shape = answer.error()
    if error is not None and error == key_refused:
        return _check("status", answer, [_refused_as_balance(error)], "")
    if error is not None:
        return _check("status", answer, shape, f"order {UNKNOWN_ORDER} refused: {error!r}")
    got = _snippet(json.dumps(answer.data))
    found = [
        f"order {UNKNOWN_ORDER}, which no panel has, was not refused: "
        f'V2.md answers {{"error": "{v2.INCORRECT_ORDER}"}}; got {got}'
    ]
    return _check("status", answer, found, "")


def _add(answer: Answer, key_refused: str | None) -> Check:
    read = read_add(answer.status, answer.content_type, answer.body)
    outcome, upstream_order, error = read.outcome, read.upstream_order, read.error
    if outcome is Outcome.ACCEPTED:
        found = [
            f"it ACCEPTED an order for service 0, quantity 0, without a link: upstream order "
            f"{upstream_order}; cancel it at the panel"
        ]
        return _check("add", answer, found, "")
    if outcome not in (Outcome.REFUSED, Outcome.NO_FUNDS):
        # The router would hold every order answered so: it may exist upstream.
        found = [] if answer.deviations else [f"no clear refusal: {error}"]
        return _check("add", answer, found, "")
    _, shape = answer.error()
    if error is not None and error == key_refused:
        return _check("add", answer, [_refused_as_balance(error)], "")
    return _check("add", answer, shape, f"refused: {error!r}")
