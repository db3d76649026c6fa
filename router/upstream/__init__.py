"""The client for upstream v2 providers: one call, one classified outcome.

Every failure of a call is one of these (what the failover loop of `orders.placement` does
with it):

    UpstreamError                 outcome      the failover loop
     ├── UpstreamRefused          refused      tries the next route: nothing was created upstream
     │    ├── UpstreamNoFunds     no_funds     tries the next route and benches this provider
     │    ├── UpstreamRateLimited refused      tries the next route; counts against its breaker
     │    └── UpstreamTurnedAway  refused      tries the next route; counts against its breaker
     ├── UpstreamUnreachable      unreachable  tries the next route: nothing was sent
     └── OutcomeUnknown           ambiguous    STOPS: the order may exist upstream (held for ops)

`refused`: an `{"error": ...}` answer (on HTTP 200 or 4xx), HTTP 429, or any other 4xx but 408
with no order in the body (a firewall's 403 page, a 404, a 413: turned away before the panel).
Two kinds are not about the order, and the provider's breaker counts them as failures of its
own (router.health): HTTP 429, a refusal of load (UpstreamRateLimited, `AddResult.rate_limited`),
and a 4xx without the panel's `{"error": ...}` text, a page from whatever stands in front of it
(UpstreamTurnedAway, `AddResult.turned_away`): while it lasts, every order is refused there.
A 4xx that carries an `{"error": ...}` text is the panel's refusal of the order, as on HTTP 200.
`unreachable`: DNS failure, connection refused, connect timeout (pool wait, DNS, TCP and TLS),
TLS failure. `ambiguous`: timeout after the request went out, connection reset or closed, HTTP
408 or 5xx, a 4xx with an order in the body, HTML, empty, truncated or otherwise unparseable
answers, bytes that are not UTF-8, and any answer that crashes the reader (JSON nested thousands
deep). `add` returns these as an `AddResult` instead of raising; `status_readings` turns an
answer that came back unusable into a reading per order; every other action raises them. No
call raises anything else for what an upstream sends.

`router.upstream.answers`: the pure reading of answers (this tree, the outcomes, the parsers).
`router.upstream.client`: UpstreamClient, the calls over aiohttp and the redaction of keys.
"""

from __future__ import annotations

from router.upstream.answers import (
    MAX_ERROR_TEXT,
    MAX_MONEY,
    MAX_UPSTREAM_INT,
    AddAnswer,
    AddResult,
    CallRecord,
    Catalogue,
    Outcome,
    OutcomeUnknown,
    StatusReading,
    UpstreamError,
    UpstreamNoFunds,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamService,
    UpstreamStatus,
    UpstreamTurnedAway,
    UpstreamUnreachable,
    classify_exception,
    parse_answer,
    parse_balance,
    parse_cancels,
    parse_catalogue,
    parse_refill,
    parse_refill_statuses,
    parse_refills,
    parse_services,
    parse_status_item,
    provider_trouble,
    read_add,
    read_statuses,
    unusable_statuses,
)
from router.upstream.client import (
    CONNECT_TIMEOUT,
    MAX_ANSWER_BYTES,
    UpstreamClient,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "MAX_ANSWER_BYTES",
    "MAX_ERROR_TEXT",
    "MAX_MONEY",
    "MAX_UPSTREAM_INT",
    "AddAnswer",
    "AddResult",
    "CallRecord",
    "Catalogue",
    "Outcome",
    "OutcomeUnknown",
    "StatusReading",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamNoFunds",
    "UpstreamRateLimited",
    "UpstreamRefused",
    "UpstreamService",
    "UpstreamStatus",
    "UpstreamTurnedAway",
    "UpstreamUnreachable",
    "classify_exception",
    "parse_answer",
    "parse_balance",
    "parse_cancels",
    "parse_catalogue",
    "parse_refill",
    "parse_refill_statuses",
    "parse_refills",
    "parse_services",
    "parse_status_item",
    "provider_trouble",
    "read_add",
    "read_statuses",
    "unusable_statuses",
]
