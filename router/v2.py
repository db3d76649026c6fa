"""The SMM panel API v2 wire format, shared by the server and the upstream client (no I/O).

Strict on what we emit (status words, error strings, money as strings with at most five
decimals, IDs as ints), tolerant on what we accept from upstreams (numbers as strings, ints or
floats; British spellings; PHP notices before the JSON).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final

# --- Error messages we emit (panels match on substrings: keep the spellings) -------------------

INVALID_KEY: Final = "Invalid API key"
INCORRECT_REQUEST: Final = "Incorrect request"
INCORRECT_SERVICE: Final = "Incorrect service ID"
INCORRECT_ORDER: Final = "Incorrect order ID"
NOT_ENOUGH_FUNDS: Final = "Not enough funds on balance"
INCORRECT_LINK: Final = "Incorrect link"
REFILL_DISABLED: Final = "Refill is disabled for this service"
CANCEL_DISABLED: Final = "Cancel is disabled for this service"
REFILL_NOT_FOUND: Final = "Refill not found"
TOO_MANY_IDS: Final = "Too many IDs: at most 100 per request"
UNAVAILABLE: Final = "Service temporarily unavailable"
TOO_MANY_REQUESTS: Final = "Too many requests"  # the only error not sent with HTTP 200: a 429


def quantity_below(minimum: int) -> str:
    return f"Quantity less than minimal {minimum}"


def quantity_above(maximum: int) -> str:
    return f"Quantity more than maximal {maximum}"


class V2Error(Exception):
    """A v2 error answer: `{"error": message}` on HTTP 200."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- Limits on input ----------------------------------------------------------------------------

MAX_IDS_PER_REQUEST: Final = 100
MAX_LINK_LENGTH: Final = 2048
MAX_ID: Final = 2**53 - 1  # IDs must survive JavaScript clients as numbers
MAX_QUANTITY: Final = 1_000_000_000
MAX_BODY_BYTES: Final = 1024 * 1024
MAX_DIGITS: Final = 30  # an upstream number with more integer digits than this is garbage
MAX_PLAIN_DIGITS: Final = 16  # a reseller's number with more digits is malformed, not big
MAX_PLAIN_INT: Final = 10**MAX_PLAIN_DIGITS - 1

# --- Status words --------------------------------------------------------------------------------

PENDING: Final = "Pending"
IN_PROGRESS: Final = "In progress"
PROCESSING: Final = "Processing"
COMPLETED: Final = "Completed"
PARTIAL: Final = "Partial"
CANCELED: Final = "Canceled"
ORDER_STATUSES: Final = (PENDING, IN_PROGRESS, PROCESSING, COMPLETED, PARTIAL, CANCELED)
FINAL_STATUSES: Final = frozenset({COMPLETED, PARTIAL, CANCELED})

REJECTED: Final = "Rejected"
REFILL_STATUSES: Final = (PENDING, IN_PROGRESS, COMPLETED, REJECTED)

_SPACES = re.compile(r"[\s_\-]+")

# Keys are upstream words folded by `_fold` (lower case, no spaces, underscores or dashes).
_ORDER_WORDS: Final[dict[str, str]] = {
    "pending": PENDING,
    "inprogress": IN_PROGRESS,
    "processing": PROCESSING,
    "completed": COMPLETED,
    "complete": COMPLETED,
    "partial": PARTIAL,
    "canceled": CANCELED,
    "cancelled": CANCELED,
    "cancel": CANCELED,
    "refunded": CANCELED,
    "fail": CANCELED,
    "failed": CANCELED,
    "error": CANCELED,
}
_REFILL_WORDS: Final[dict[str, str]] = {
    "pending": PENDING,
    "inprogress": IN_PROGRESS,
    "processing": IN_PROGRESS,
    "completed": COMPLETED,
    "complete": COMPLETED,
    "rejected": REJECTED,
    "canceled": REJECTED,
    "cancelled": REJECTED,
    "fail": REJECTED,
    "failed": REJECTED,
    "error": REJECTED,
}


def _fold(word: object) -> str:
    return _SPACES.sub("", str(word)).lower()


def normalise_status(word: object) -> str | None:
    """An upstream order status word as one of ORDER_STATUSES, or None when unknown."""
    if not isinstance(word, str):
        return None
    return _ORDER_WORDS.get(_fold(word))


def normalise_refill_status(word: object) -> str | None:
    """An upstream refill status word as one of REFILL_STATUSES, or None when unknown."""
    if not isinstance(word, str):
        return None
    return _REFILL_WORDS.get(_fold(word))


# --- Money ---------------------------------------------------------------------------------------
# Money lives in the database as integers of MINOR units (1e-5 of the currency), the precision
# panels display, so what a reseller sees is exactly what the ledger holds.

MONEY_PLACES: Final = 5
MINOR_PER_UNIT: Final = 10**MONEY_PLACES
_QUANTUM: Final = Decimal(1).scaleb(-MONEY_PLACES)


def to_minor(amount: Decimal) -> int:
    """Round an amount half-up to MINOR units."""
    return int((amount * MINOR_PER_UNIT).to_integral_value(rounding=ROUND_HALF_UP))


def from_minor(minor: int) -> Decimal:
    return (Decimal(minor) / MINOR_PER_UNIT).quantize(_QUANTUM)


def format_money(amount: Decimal | int) -> str:
    """Money as panels show it: a string with two to five decimals ("0.90", "0.27819").

    An int is taken as MINOR units.
    """
    minor = amount if isinstance(amount, int) else to_minor(amount)
    # Integer arithmetic: `status` formats up to 100 of these per request.
    whole, frac = divmod(abs(minor), MINOR_PER_UNIT)
    sign = "-" if minor < 0 else ""
    return f"{sign}{whole}.{f'{frac:0{MONEY_PLACES}d}'.rstrip('0').ljust(2, '0')}"


def order_charge(rate: Decimal, quantity: int) -> int:
    """What `quantity` units cost at `rate` per 1000, in MINOR units."""
    return to_minor(rate * quantity / 1000)


# --- Tolerant parsing of upstream values ---------------------------------------------------------


def parse_decimal(value: object) -> Decimal | None:
    """A number sent as a string, int or float, as an exact Decimal; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = repr(value)  # the shortest string that round-trips: 0.08011655652 stays so
    if isinstance(value, int | str):
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation:
            return None
        # A finite number with a sane exponent: "1e999999999" would make int() run for ages.
        sane = result.is_finite() and result.adjusted() <= MAX_DIGITS
        return result if sane else None
    return None


def parse_int(value: object) -> int | None:
    """An integer sent as a string, int or integral float; None if it is not one."""
    number = parse_decimal(value)
    if number is None or number != number.to_integral_value():
        return None
    return int(number)


# Where the JSON that ends an upstream body may start (see extract_json). Each start costs one
# decoder call, which can read to the end of the body: only this many quick guesses are tried.
MAX_QUICK_STARTS: Final = 4
# How far from the end the exact backward scan looks, in characters: a Python loop, which costs
# about a tenth of a second per MiB on one core.
MAX_SCANNED_TAIL: Final = 1024 * 1024
# A bracket right after a line break or an HTML tag's `>` (spaces and tabs between): where PHP
# notices (`...<br />\n{"order": 99}`) and error pages leave the JSON.
_QUICK_START: Final = re.compile(r"[\n\r>][ \t]*([\[{])")
_DECODER: Final = json.JSONDecoder()


def extract_json(body: str) -> Any:
    """The JSON document of an upstream body, or raise ValueError.

    Survives a UTF-8 BOM and PHP notices printed before the JSON: the JSON that ends the body
    is the answer. That is the whole body when it parses (a bare number or string too); else
    an object or array whose closing bracket is the body's last non-space character, preceded
    by anything. At most one start can give such a document (see _scanned_start), so the
    first start that does is the answer, whatever order the starts are tried in.

    The cost is bounded whatever the body (upstream answers can be 32 MB): one decoder call
    on the whole text, then at most MAX_QUICK_STARTS + 1 more, each at a start from
    _json_starts. Raises RecursionError, as json.loads does, for JSON nested deeper than the
    decoder reads when no start gives a document.
    """
    text = body.lstrip("\ufeff").strip()
    if not text:
        raise ValueError("empty body")
    try:
        return json.loads(text)
    except ValueError:
        pass
    too_deep: RecursionError | None = None
    for start in _json_starts(text):
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            continue
        except RecursionError as exc:  # brackets in a notice, or the answer itself: read on
            too_deep = exc
            continue
        if end == len(text):  # the text is stripped: nothing but the JSON follows
            return value
    if too_deep is not None:
        raise too_deep
    raise ValueError("no JSON document at the end of the body")


def _json_starts(text: str) -> Iterator[int]:
    """Where the object or array that ends `text` (stripped, not JSON as a whole) may start.

    First the quick guesses: the first MAX_QUICK_STARTS brackets right after a line break or
    an HTML tag's `>`, where the JSON follows every PHP notice and page seen in the wild (a
    C-speed search). Then the one start that bracket matching back from the end finds in the
    last MAX_SCANNED_TAIL characters (_scanned_start), for JSON after text on the same line.
    So the only document missed is one that is not among the quick guesses (it follows text
    on its line, or more than MAX_QUICK_STARTS brackets start lines before it) and starts
    more than MAX_SCANNED_TAIL characters from the end: a catalogue of megabytes printed
    mid-line, which no upstream has been seen to send.
    """
    if text[-1] not in "]}":
        return
    tried: set[int] = set()
    for match in itertools.islice(_QUICK_START.finditer(text), MAX_QUICK_STARTS):
        tried.add(match.start(1))
        yield match.start(1)
    offset = max(0, len(text) - MAX_SCANNED_TAIL)
    start = _scanned_start(text[offset:])
    if start is not None and offset + start not in tried:
        yield offset + start


def _scanned_start(text: str) -> int | None:
    """The only index where an object or array ending `text` can start, or None.

    Bracket matching backwards from the last character, skipping JSON strings. Read backwards,
    a quote ends (or opens) a string unless an odd run of backslashes precedes it: a valid
    document has no backslash outside its strings, and inside one each backslash escapes the
    next character. So over any valid document that ends `text` this scan reads every string
    and bracket as the decoder does, and its depth first returns to zero at the document's
    opening bracket: two such documents cannot exist, and the scan finds the one that does.
    One pass: no backtracking, whatever precedes the document.
    """
    # Escaped backslashes, then escaped quotes, become plain characters (same length, left to
    # right, as the decoder pairs them), so a remaining quote always delimits a string.
    plain = text.replace("\\\\", "__").replace('\\"', "__")
    depth = 0
    in_string = False
    index = len(plain)
    for char in reversed(plain):
        index -= 1
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char == "]" or char == "}":
            depth += 1
        elif char == "[" or char == "{":
            depth -= 1
            if depth == 0:
                return index
    return None


# --- Strict parsing of reseller input ------------------------------------------------------------


def parse_plain_int(value: str | None, *, maximum: int) -> int | None:
    """A plain decimal integer from 0 to `maximum` (no sign, no spaces inside), else None.

    At most MAX_PLAIN_DIGITS digits, leading zeros included: a longer one is refused, never
    cut short (`"0000000000000000000100000"` is not 1, nor 100000).
    """
    if value is None:
        return None
    text = value.strip()
    # ASCII digits only (`isdigit` alone takes "²" and "٣"); the string methods, not a
    # regular expression: `status` reads up to 100 of these per request.
    if not (0 < len(text) <= MAX_PLAIN_DIGITS and text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= maximum else None


def parse_id(value: str | None) -> int | None:
    """A positive ID as sent by a reseller, or None."""
    number = parse_plain_int(value, maximum=MAX_ID)
    return number if number else None


def parse_id_list(value: str | None) -> list[tuple[str, int | None]]:
    """A comma-separated list of IDs: (the ID as sent, the ID or None when malformed).

    Raise V2Error for an empty list or more than MAX_IDS_PER_REQUEST.
    """
    if value is None or not value.strip():
        raise V2Error(INCORRECT_REQUEST)
    tokens = [token.strip() for token in value.split(",")]
    tokens = [token for token in tokens if token]
    if not tokens:
        raise V2Error(INCORRECT_REQUEST)
    if len(tokens) > MAX_IDS_PER_REQUEST:
        raise V2Error(TOO_MANY_IDS)
    return [(token, parse_id(token)) for token in tokens]


# Nothing a link may hold: C0, DEL and C1 controls, the line and paragraph separators
# (U+2028, U+2029), and the invisible characters that make a link read as something it is not:
# zero-width ones hide inside it (U+200B-U+200F, U+FEFF), bidi embeddings, overrides and
# isolates reorder how it is displayed (U+202A-U+202E, U+2066-U+2069).
_NOT_IN_LINK: Final = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]"
)


def check_link(link: str | None) -> str:
    """A link as resellers send it (a URL or a username), or raise V2Error(INCORRECT_LINK)."""
    if link is None:
        raise V2Error(INCORRECT_LINK)
    link = link.strip()
    too_long = len(link) > MAX_LINK_LENGTH
    if not link or too_long or _NOT_IN_LINK.search(link):
        raise V2Error(INCORRECT_LINK)
    return link


def non_empty_lines(text: str) -> list[str]:
    """Lines of a `comments` or `usernames` field (`\\n` or `\\r\\n`), blank ones dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


MAX_REQUEST_ID_LENGTH: Final = 64
_REQUEST_ID: Final = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LENGTH}}}")  # 0x21-0x7E


def check_request_id(raw: str | None) -> str | None:
    """A reseller's request ID (`request_id`, `Idempotency-Key`) as sent, None when it sent
    none (an empty value is none), or raise V2Error(INCORRECT_REQUEST).

    Up to 64 printable ASCII characters, no spaces: not trimmed, so that two IDs are the same
    exactly when they are equal.
    """
    if not raw:
        return None
    if _REQUEST_ID.fullmatch(raw) is None:
        raise V2Error(INCORRECT_REQUEST)
    return raw


# --- Service types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceType:
    """What `add` takes for one service type, and how its quantity is counted.

    quantity: "param" (the `quantity` parameter), "flat" (charged the rate once), or the name of
    the parameter whose non-empty lines are counted.
    """

    name: str
    params: tuple[str, ...]  # required besides key, action, service, link
    quantity: str = "param"
    link: bool = True
    dripfeed: bool = False
    one_of: tuple[str, ...] = ()  # at least one of these is required too
    optional: tuple[str, ...] = ()


SERVICE_TYPES: Final[dict[str, ServiceType]] = {
    t.name: t
    for t in (
        ServiceType("Default", (), dripfeed=True),
        ServiceType("Package", (), quantity="flat"),
        ServiceType("Custom Comments", ("comments",), quantity="comments"),
        ServiceType("Custom Comments Package", ("comments",), quantity="flat"),
        ServiceType("Mentions", ("usernames",)),
        ServiceType("Mentions with Hashtags", ("usernames", "hashtags")),
        ServiceType("Mentions Custom List", ("usernames",), quantity="usernames"),
        ServiceType("Mentions Hashtag", ("hashtag",)),
        ServiceType("Mentions User Followers", ("username",)),
        ServiceType("Mentions Media Likers", ("media",)),
        ServiceType("Comment Likes", ("username",)),
        ServiceType("Comment Replies", ("username", "comments"), quantity="comments"),
        ServiceType("Poll", ("answer_number",)),
        ServiceType("SEO", ("keywords",)),
        ServiceType("Invites from Groups", ("groups",)),
        ServiceType(
            "Web Traffic",
            ("country", "device", "type_of_traffic"),
            dripfeed=True,
            one_of=("google_keyword", "referring_url"),
        ),
        ServiceType(
            "Subscriptions",
            ("username", "min", "max", "posts", "old_posts", "delay", "expiry"),
            quantity="flat",
            link=False,
        ),
    )
}
UNSUPPORTED_TYPES: Final = frozenset({"Subscriptions"})  # per-post billing: a later release
