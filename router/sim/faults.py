"""The simulator's faults: what a broken provider answers, and the canned pages."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

REFUSAL: Final = "You have active order with this link. Please wait until order being completed."
CANNOT_CANCEL: Final = "Order cannot be canceled: it is already final"
REFILL_UNAVAILABLE: Final = "Refill is available only for completed orders"
PACKAGE_UNITS: Final = 1000  # units a package (flat-priced) order delivers; remains count these
PENDING_SHARE: Final = 0.1  # the first 10% of progress_seconds an order (or refill) stays Pending
CLOUDFLARE_502: Final = """<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>cloudflare</center>
</body>
</html>
"""


class Fault(StrEnum):
    """What `add` does instead of its normal answer; "down" is SimProvider.stop().

    The answers that are not a v2 answer (html502, deep_json, not_utf8, waf403) can also replace
    any other action's answer: SimProvider.set_answer_fault().
    """

    REFUSE = "refuse"  # a definite refusal: nothing created
    NO_FUNDS = "no_funds"  # "Not enough funds on balance": nothing created
    HTML_502 = "html502"  # HTTP 502 with a CDN's HTML page: nothing created
    SLOW = "slow"  # sleeps slow_seconds, then creates the order: a client timeout is ambiguous
    RESET = "reset"  # TCP reset without an answer: nothing created
    FLAKY = "flaky"  # at random (seeded): normal, refuse, html502 or slow
    DEEP_JSON = "deep_json"  # creates the order, answers JSON nested DEEP_JSON_LEVELS deep
    NOT_UTF8 = "not_utf8"  # creates the order, answers its JSON after bytes that are not UTF-8
    WAF_403 = "waf403"  # HTTP 403 with a web firewall's HTML page: nothing created
    HTTP_429 = "http429"  # HTTP 429 Too Many Requests (a panel shedding load): nothing created


_FLAKY_CHOICES: Final = (None, Fault.REFUSE, Fault.HTML_502, Fault.SLOW)
_ANSWER_FAULTS: Final = frozenset({Fault.HTML_502, Fault.DEEP_JSON, Fault.NOT_UTF8, Fault.WAF_403})
DEEP_JSON_LEVELS: Final = 100_000
NOT_UTF8_PREFIX: Final = b"\xff\xfe"  # a UTF-16 byte order mark before UTF-8 JSON: a broken encoder
WAF_403: Final = """<html>
<head><title>403 Forbidden</title></head>
<body>
<h1>Access denied</h1>
<p>This request was blocked by the website's firewall. Reference #18.4e2c1b17.1717171717</p>
</body>
</html>
"""
