"""Tests of router/v2.py: the wire format shared by both sides (pure functions)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from decimal import Decimal

import pytest

from router import v2

# --- Status words --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        # the canonical words pass unchanged
        ("Pending", v2.PENDING),
        ("In progress", v2.IN_PROGRESS),
        ("Processing", v2.PROCESSING),
        ("Completed", v2.COMPLETED),
        ("Partial", v2.PARTIAL),
        ("Canceled", v2.CANCELED),
        # V2.md: "Upstreams write these in other ways"
        ("Cancelled", v2.CANCELED),
        ("cancel", v2.CANCELED),
        ("Refunded", v2.CANCELED),
        ("Inprogress", v2.IN_PROGRESS),
        ("in_progress", v2.IN_PROGRESS),
        ("In Progress", v2.IN_PROGRESS),
        ("Fail", v2.CANCELED),
        ("Error", v2.CANCELED),
        # lower-case anything, and other harmless variants
        ("pending", v2.PENDING),
        ("PROCESSING", v2.PROCESSING),
        ("completed", v2.COMPLETED),
        ("partial", v2.PARTIAL),
        ("canceled", v2.CANCELED),
        ("in-progress", v2.IN_PROGRESS),
        ("  Completed ", v2.COMPLETED),
        # unknown words and non-strings are None: the order is left as it was
        ("On hold", None),
        ("", None),
        ("Completed!", None),
        (None, None),
        (1, None),
        ({"error": "Incorrect order ID"}, None),
    ],
)
def test_normalise_status(word: object, expected: str | None) -> None:
    assert v2.normalise_status(word) == expected


def test_normalised_words_are_only_the_six() -> None:
    words = ["pending", "inprogress", "In Progress", "cancelled", "refunded", "fail", "error"]
    assert {v2.normalise_status(word) for word in words} <= set(v2.ORDER_STATUSES)
    assert len(v2.ORDER_STATUSES) == 6
    assert "Cancelled" not in v2.ORDER_STATUSES  # one "l" only


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("Pending", v2.PENDING),
        ("In progress", v2.IN_PROGRESS),
        ("inprogress", v2.IN_PROGRESS),
        ("Processing", v2.IN_PROGRESS),
        ("Completed", v2.COMPLETED),
        ("Rejected", v2.REJECTED),
        ("rejected", v2.REJECTED),
        ("Canceled", v2.REJECTED),
        ("Cancelled", v2.REJECTED),
        ("Partial", None),
        ("Sleeping", None),
        ({"error": "Refill not found"}, None),
        (None, None),
    ],
)
def test_normalise_refill_status(word: object, expected: str | None) -> None:
    assert v2.normalise_refill_status(word) == expected


# --- Money ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.9"), "0.90"),
        (Decimal("0.90"), "0.90"),
        (Decimal("0.27819"), "0.27819"),
        (Decimal("100.84292"), "100.84292"),
        (Decimal("100.842920"), "100.84292"),
        (Decimal("1"), "1.00"),
        (Decimal("0"), "0.00"),
        (Decimal("12.5"), "12.50"),
        (Decimal("0.00001"), "0.00001"),
        (Decimal("0.278194"), "0.27819"),  # at most five decimals
        (Decimal("1E+3"), "1000.00"),  # never an exponent
        (Decimal("-3.5"), "-3.50"),
        (90000, "0.90"),  # an int is MINOR units
        (27819, "0.27819"),
        (10084292, "100.84292"),
        (0, "0.00"),
        (1, "0.00001"),
    ],
)
def test_format_money(amount: Decimal | int, text: str) -> None:
    assert v2.format_money(amount) == text


@pytest.mark.parametrize(
    ("amount", "minor"),
    [
        (Decimal("0.90"), 90000),
        (Decimal("0.27819"), 27819),
        (Decimal("100.84292"), 10084292),
        (Decimal("0"), 0),
        (Decimal("0.000004"), 0),
        (Decimal("0.000005"), 1),  # half-up
        (Decimal("0.000015"), 2),  # half-up, not half-even
        (Decimal("-0.5"), -50000),
        (Decimal("123456789.12345"), 12345678912345),
    ],
)
def test_to_minor(amount: Decimal, minor: int) -> None:
    assert v2.to_minor(amount) == minor


def test_from_minor_round_trips() -> None:
    assert v2.from_minor(27819) == Decimal("0.27819")
    assert str(v2.from_minor(90000)) == "0.90000"
    assert v2.from_minor(0) == Decimal(0)
    for minor in (0, 1, 99_999, 100_000, 10_084_292, 12_345_678_912_345):
        assert v2.to_minor(v2.from_minor(minor)) == minor
        assert v2.to_minor(Decimal(v2.format_money(minor))) == minor


def test_format_money_rounds_like_to_minor() -> None:
    for text in ("0.000005", "0.000015", "2.123455", "-0.000005"):
        amount = Decimal(text)
        assert v2.format_money(amount) == v2.format_money(v2.to_minor(amount))
    assert v2.format_money(Decimal("0.000025")) == "0.00003"  # half-up, not half-even


def test_huge_exponents_are_not_numbers() -> None:
    assert v2.parse_decimal("1e999999999") is None
    assert v2.parse_int("1e999999999") is None
    assert v2.parse_int("1e30") == 10**30
    assert v2.parse_decimal("1e31") is None


@pytest.mark.parametrize("char", ["\x00", "\x1f", "\x7f", "\x85", "\x9f", "\u2028", "\u2029"])
def test_links_refuse_control_characters(char: str) -> None:
    with pytest.raises(v2.V2Error):
        v2.check_link(f"https://x.example/{char}p")


# Each end of each range of invisible characters (zero-width, bidi), and its neighbours outside.
INVISIBLE = ["\u200b", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069", "\ufeff"]
VISIBLE_NEIGHBOURS = [
    "\u200a",
    "\u2010",
    "\u2027",
    "\u202f",
    "\u2065",
    "\u206a",
    "\ufefe",
    "\uff00",
]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_links_refuse_bidi_and_zero_width_characters(char: str) -> None:
    for link in (f"https://x.example/{char}p", f"{char}username", f"username{char}"):
        with pytest.raises(v2.V2Error) as caught:
            v2.check_link(link)
        assert caught.value.message == v2.INCORRECT_LINK


@pytest.mark.parametrize(
    "char", VISIBLE_NEIGHBOURS, ids=[f"U+{ord(c):04X}" for c in VISIBLE_NEIGHBOURS]
)
def test_links_keep_the_neighbours_of_those_ranges(char: str) -> None:
    assert v2.check_link(f"https://x.example/{char}p") == f"https://x.example/{char}p"


def test_order_charge() -> None:
    assert v2.order_charge(Decimal("0.90"), 1000) == 90000
    assert v2.order_charge(Decimal("0.90"), 50) == 4500
    assert v2.order_charge(Decimal("1.00"), 1) == 100
    assert v2.order_charge(Decimal("0.001"), 1) == 0  # 0.000001 rounds to zero
    assert v2.order_charge(Decimal("0.005"), 1) == 1  # 0.000005 rounds half-up
    assert v2.order_charge(Decimal("2.5"), 0) == 0


# --- Tolerant parsing of upstream values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.27819", Decimal("0.27819")),
        (" 12.5 ", Decimal("12.5")),
        (157, Decimal(157)),
        (0.08, Decimal("0.08")),
        (0.08011655652, Decimal("0.08011655652")),  # float via its shortest repr, exactly
        ("-12", Decimal(-12)),
        ("1e3", Decimal("1E+3")),
        ("Unknown", None),
        ("", None),
        ("NaN", None),
        ("Infinity", None),
        (float("inf"), None),
        (True, None),
        (None, None),
        ([1], None),
    ],
)
def test_parse_decimal(value: object, expected: Decimal | None) -> None:
    assert v2.parse_decimal(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("157", 157),
        (157, 157),
        (157.0, 157),
        ("157.0", 157),
        ("-12", -12),
        (" 3572 ", 3572),
        ("1.5", None),
        ("Unknown", None),
        (False, None),
        (None, None),
    ],
)
def test_parse_int(value: object, expected: int | None) -> None:
    assert v2.parse_int(value) == expected


@pytest.mark.parametrize(
    "body",
    [
        '{"order": 99}',
        '\ufeff{"order": 99}',  # UTF-8 BOM
        '  \n{"order": 99}\n',
        "<br />\n<b>Notice</b>:  Undefined index: u_id in /www/app/ev.php on line 28<br />\n"
        '{"order": 99}',
        "<b>Warning</b>: {oops} [here]<br />\n" + '{"order": 99}',  # stray brackets first
        '\ufeff<b>Notice</b>: x<br />{"order": 99}',
    ],
)
def test_extract_json_finds_the_answer(body: str) -> None:
    assert v2.extract_json(body) == {"order": 99}


def test_extract_json_other_documents() -> None:
    assert v2.extract_json('[{"refill": 1, "status": "Completed"}]') == [
        {"refill": 1, "status": "Completed"}
    ]
    assert v2.extract_json('<b>Notice</b>: x<br />\n{"error": "Incorrect service ID"}') == {
        "error": "Incorrect service ID"
    }
    assert v2.extract_json('{"a": {"b": [1, 2]}}') == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize(
    "body",
    [
        "",
        "   ",
        "\ufeff",
        '{"order": 23',  # truncated
        "<!DOCTYPE html><html><body>We'll be back soon</body></html>",
        "<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>",
        "Too Many Requests",
        '{"order": 99} <br /><b>Notice</b>',  # the JSON must end the body
    ],
)
def test_extract_json_refuses_non_json(body: str) -> None:
    with pytest.raises(ValueError):
        v2.extract_json(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('debug: x{"order": 5}', {"order": 5}),  # after text on the same line
        ('Notice: {"order": 5}', {"order": 5}),
        ('note {"s": "]\\"[{", "t": "\\\\"}', {"s": ']"[{', "t": "\\"}),  # brackets in strings
        ('x [1, "\\\\\\"]", {"a": []}]', [1, '\\"]', {"a": []}]),
        ("<b>Notice</b>: x<br />\n" * 3 + '[{"b": "<br />\\n{"}]', [{"b": "<br />\n{"}]),
        ("\n[x]" * 5000 + '\n{"order": 5}', {"order": 5}),  # more notice lines than guesses
        ("<br />\n" + "[" * 5000 + ' {"order": 5}', {"order": 5}),  # a guess too deep to read
        ("5", 5),  # a bare scalar parses as a whole body, as before
        ('"Incorrect order ID"', "Incorrect order ID"),
    ],
)
def test_extract_json_wherever_the_json_starts(body: str, expected: object) -> None:
    assert v2.extract_json(body) == expected


def _quadratic_extract_json(body: str) -> object:
    """extract_json as it was: a decoder call at every bracket, each able to read to the end."""
    text = body.lstrip("\ufeff").strip()
    if not text:
        raise ValueError("empty body")
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, end = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if not text[end:].strip():
            return value
    raise ValueError("no JSON document at the end of the body")


def _outcome(extract: Callable[[str], object], body: str) -> object:
    try:
        return ("value", extract(body))
    except ValueError:
        return ("ValueError",)


def test_extract_json_answers_as_the_quadratic_search_did() -> None:
    """On thousands of small bodies (random text, random JSON after random text), the same
    value or the same ValueError as the search that tried every bracket."""
    rng = random.Random(6)
    alphabet = '{}[]{}[]"""\\\\,:: \n>ab1'
    documents = ['{"order": 5}', '[1, "]"]', '{"a": "\\"}{["}', "[]", '{"x": [{"y": "\\\\"}]}']
    for _ in range(20_000):
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        body = noise + rng.choice(documents) if rng.random() < 0.5 else noise
        assert _outcome(v2.extract_json, body) == _outcome(_quadratic_extract_json, body), body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("{" * 3_000_000, ValueError, id="open braces"),
        pytest.param("x" + "[" * 3_000_000 + "]", [], id="brackets, the last one closed"),
        pytest.param("[] " * 1_000_000 + "x]", ValueError, id="empty arrays"),
        pytest.param("x[" + '"",' * 1_000_000 + "]", ValueError, id="empty strings"),
        pytest.param("<br />\n[" * 500_000 + '{"order": 5}', {"order": 5}, id="notice lines"),
        pytest.param("<b>N</b>: [" * 200_000 + '{"order": 5', ValueError, id="then truncated"),
        pytest.param('\n["' * 1_000_000 + "]", ValueError, id="a string at each line"),
    ],
)
def test_extract_json_tries_a_bounded_number_of_starts(body: str, expected: object) -> None:
    """A few MB built to make a search start at every bracket: a handful of decoder calls."""
    assert len(list(v2._json_starts(body))) <= v2.MAX_QUICK_STARTS + 1
    if expected is ValueError:
        with pytest.raises(ValueError):
            v2.extract_json(body)
    else:
        assert v2.extract_json(body) == expected


def test_extract_json_of_json_nested_too_deep() -> None:
    """As json.loads: a RecursionError, which the upstream client reads as unreadable."""
    with pytest.raises(RecursionError):
        v2.extract_json("[" * 3_000_000 + "]")
    with pytest.raises(RecursionError):
        v2.extract_json('{"a":' * 600_000)
    with pytest.raises(RecursionError):
        v2.extract_json("<br />\n" + "[" * 5000 + "]" * 5000)


# --- Strict parsing of reseller input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("12", 12),
        ("007", 7),
        (" 12 ", 12),
        ("12\n", 12),
        ("1000", 1000),
        ("-1", None),
        ("+1", None),
        ("1e3", None),
        ("1.0", None),
        ("1,000", None),
        ("1_000", None),
        (" 1 2", None),
        ("12 34", None),
        ("0x10", None),
        ("\uff11\uff12", None),  # fullwidth digits
        ("\u0661\u0662", None),  # Arabic-Indic digits
        ("12\x00", None),
        ("", None),
        ("   ", None),
        (None, None),
        ("9" * 17, None),  # huge
        ("9" * 4300, None),
        ("1000001", None),  # above the maximum of this test
    ],
)
def test_parse_plain_int(text: str | None, expected: int | None) -> None:
    assert v2.parse_plain_int(text, maximum=1_000_000) == expected


def test_parse_plain_int_bounds() -> None:
    assert v2.parse_plain_int(str(v2.MAX_QUANTITY), maximum=v2.MAX_QUANTITY) == v2.MAX_QUANTITY
    assert v2.parse_plain_int(str(v2.MAX_QUANTITY + 1), maximum=v2.MAX_QUANTITY) is None
    assert v2.parse_plain_int("9999999999999999", maximum=2**63) == 9999999999999999
    assert v2.parse_plain_int("10000000000000000", maximum=2**63) is None  # 17 digits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("23501", 23501),
        (str(v2.MAX_ID), v2.MAX_ID),
        (str(v2.MAX_ID + 1), None),
        ("0", None),
        ("-5", None),
        ("abc", None),
        (None, None),
    ],
)
def test_parse_id(text: str | None, expected: int | None) -> None:
    assert v2.parse_id(text) == expected


def test_parse_id_list() -> None:
    assert v2.parse_id_list("1,10,100") == [("1", 1), ("10", 10), ("100", 100)]
    assert v2.parse_id_list(" 1 , 2 ,") == [("1", 1), ("2", 2)]
    assert v2.parse_id_list("1,,2") == [("1", 1), ("2", 2)]
    assert v2.parse_id_list("1,abc,0,-3") == [("1", 1), ("abc", None), ("0", None), ("-3", None)]
    assert v2.parse_id_list("7") == [("7", 7)]


def test_parse_id_list_holds_at_most_100() -> None:
    hundred = ",".join(str(i) for i in range(1, 101))
    assert len(v2.parse_id_list(hundred)) == 100
    with pytest.raises(v2.V2Error) as caught:
        v2.parse_id_list(hundred + ",101")
    assert caught.value.message == v2.TOO_MANY_IDS == "Too many IDs: at most 100 per request"


@pytest.mark.parametrize("value", [None, "", "  ", ",", " , ,"])
def test_parse_id_list_refuses_empty(value: str | None) -> None:
    with pytest.raises(v2.V2Error) as caught:
        v2.parse_id_list(value)
    assert caught.value.message == v2.INCORRECT_REQUEST


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        ("https://instagram.com/p/abc", "https://instagram.com/p/abc"),
        ("  https://instagram.com/p/abc ", "https://instagram.com/p/abc"),
        ("someusername", "someusername"),
        ("https://例え.jp/ユーザー", "https://例え.jp/ユーザー"),
        ("x" * v2.MAX_LINK_LENGTH, "x" * v2.MAX_LINK_LENGTH),
    ],
)
def test_check_link_accepts(link: str, expected: str) -> None:
    assert v2.check_link(link) == expected


@pytest.mark.parametrize(
    "link",
    [
        None,
        "",
        "   ",
        "x" * (v2.MAX_LINK_LENGTH + 1),
        "https://a.com/\x00",
        "https://a.com/\nb",
        "https://a.com/\tb",
        "https://a.com/\x7f",
        "https://a.com/\x1b[31m",
    ],
)
def test_check_link_refuses(link: str | None) -> None:
    with pytest.raises(v2.V2Error) as caught:
        v2.check_link(link)
    assert caught.value.message == v2.INCORRECT_LINK == "Incorrect link"


def test_non_empty_lines() -> None:
    assert v2.non_empty_lines("nice\r\n\r\ngreat \n  \nwow") == ["nice", "great", "wow"]
    assert v2.non_empty_lines("") == []


# --- Error strings and service types -------------------------------------------------------------


def test_error_spellings() -> None:
    """Panels match on substrings: these must not drift from V2.md."""
    assert v2.INVALID_KEY == "Invalid API key"
    assert v2.INCORRECT_REQUEST == "Incorrect request"
    assert v2.INCORRECT_SERVICE == "Incorrect service ID"
    assert v2.INCORRECT_ORDER == "Incorrect order ID"
    assert v2.NOT_ENOUGH_FUNDS == "Not enough funds on balance"
    assert v2.REFILL_DISABLED == "Refill is disabled for this service"
    assert v2.CANCEL_DISABLED == "Cancel is disabled for this service"
    assert v2.REFILL_NOT_FOUND == "Refill not found"
    assert v2.UNAVAILABLE == "Service temporarily unavailable"
    assert v2.quantity_below(50) == "Quantity less than minimal 50"
    assert v2.quantity_above(10000) == "Quantity more than maximal 10000"
    assert str(v2.V2Error(v2.INCORRECT_LINK)) == "Incorrect link"


def test_service_types_cover_v2_md() -> None:
    assert set(v2.SERVICE_TYPES) == {
        "Default",
        "Package",
        "Custom Comments",
        "Custom Comments Package",
        "Mentions",
        "Mentions with Hashtags",
        "Mentions Custom List",
        "Mentions Hashtag",
        "Mentions User Followers",
        "Mentions Media Likers",
        "Comment Likes",
        "Comment Replies",
        "Poll",
        "SEO",
        "Invites from Groups",
        "Web Traffic",
        "Subscriptions",
    }
    assert set(v2.UNSUPPORTED_TYPES) == {"Subscriptions"}
    assert v2.SERVICE_TYPES["Package"].quantity == "flat"
    assert v2.SERVICE_TYPES["Custom Comments"].quantity == "comments"
    assert v2.SERVICE_TYPES["Mentions Custom List"].quantity == "usernames"
    assert v2.SERVICE_TYPES["Web Traffic"].one_of == ("google_keyword", "referring_url")
    assert not v2.SERVICE_TYPES["Subscriptions"].link
    assert {name for name, t in v2.SERVICE_TYPES.items() if t.dripfeed} == {
        "Default",
        "Web Traffic",
    }


@pytest.mark.parametrize(
    "raw", ["a", "order-1234", "x" * v2.MAX_REQUEST_ID_LENGTH, "!~", "550e8400-e29b-41d4", "a:b/c"]
)
def test_check_request_id_accepts(raw: str) -> None:
    assert v2.check_request_id(raw) == raw


@pytest.mark.parametrize("raw", [None, ""])
def test_check_request_id_absent(raw: str | None) -> None:
    assert v2.check_request_id(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "x" * (v2.MAX_REQUEST_ID_LENGTH + 1),
        "a b",  # spaces are refused, not trimmed
        " a",
        "a\n",
        "a\x00",
        "a\x7f",
        "caf\u00e9",
        "\u0430bc",  # Cyrillic a: looks ASCII, is not
        "a\u200bb",
    ],
)
def test_check_request_id_refuses(raw: str) -> None:
    with pytest.raises(v2.V2Error) as caught:
        v2.check_request_id(raw)
    assert caught.value.message == v2.INCORRECT_REQUEST
