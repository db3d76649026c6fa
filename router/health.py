"""Provider health: the breaker per provider, the funds bench by amount, the daily spend cap.

Pure state and transitions: no I/O and no clock of its own. Each transition is told the time
(for one provider, always on one clock: the desk's monotonic one); the spend cap's day is a UTC
date that the caller takes from the wall clock (`utc_day`). Routing reads a `ProviderStatus`
snapshot and never changes health; health never decides a route.

Usage::

    health = ProviderHealth()
    health.after_add(result.outcome, rate_limited=..., turned_away=..., cost=cost, now=clock(),
                     rules=config.health, backoff=config.sync.no_funds_backoff)
    health.after_balance(balance, sent_at=sent, now=clock(), rules=config.health)
    health.after_balance_error(exc.outcome, turned_away=..., now=clock(), rules=config.health)
    health.after_spend(cost, day=utc_day(time.time()))
    status = health.status(now=clock(), day=utc_day(time.time()))   # what routing reads
    health.bench = replay_bench(refusals, reads, backoff=...)        # after a restart
    health.breaker.restore(opened_at, rules=config.health)           # likewise

The breaker, judged on the provider's `add` calls::

    healthy --(>= min_calls calls in the window, failed share >= failure_ratio)--> open
    open --(cooldown passes)--> half_open
    half_open --(a `balance` call answers)--> healthy, the window cleared
    half_open --(a `balance` call fails)--> open, for a new cooldown

Only the provider's own failures count against it: `unreachable`, `ambiguous`, HTTP 429 (it
refuses load, not the order) and an HTTP 4xx page without the panel's `{"error": ...}` text (a
firewall, a 404 at the API URL, a web server's limit: whatever turns the request away before the
panel turns every order away while it lasts; the order is still `refused` and fails over). A
refusal about the order (a bad link, a quantity, an active order on the link, `Not enough
funds`), on HTTP 200 or a 4xx, is a healthy answer. While open or half_open the provider gets
no orders: orders are never probes, since one sent to a provider that is still down costs a
connect timeout or becomes a held order. An `add` that was sent before the breaker opened and
ends after it says nothing new and is not counted. The window holds per-slice counts, 1/60 of
the window each, so its memory is the same at any rate; a call leaves it between 59/60 of
`window` and `window` seconds after it ended.

The funds bench: after `Not enough funds on balance` for an order costing C upstream (minor
units of the base currency), the provider is benched for orders costing C or more; cheaper ones
still go there. A second refusal at a lower cost lowers the threshold; a refusal of an order
whose cost is unknown benches every amount. The bench lasts `sync.no_funds_backoff`, or until a
balance read shows money came in: a read sent after the bench shows more than the read before
it (orders only ever lower a provider's balance, so a rise is a top-up, or refunds). That read
before may predate the bench (the balance was already low) or follow it (the first read after
the bench then sets the level to beat). An order whose own cost is unknown counts as benched
while any threshold stands: routing still tries it when nothing else is left.

The spend cap: `providers.NAME.daily_spend_cap` bounds what the provider is sent per UTC day,
counted from the recorded upstream cost of that day's orders. A provider at or past its cap gets
no new orders; neither does an order whose known cost would take it past the cap, so the cap is
a ceiling the spend never crosses by an order we can cost (a cheaper order still fits).

The state shown in `smm_router_provider_state`: `open` or `half_open` while the breaker is not
closed (it wins: no order goes there at all), else `benched` while any funds threshold stands,
else `healthy`. The spend cap and upstream services gone from the catalogue (`missing`) are
reasons a route is skipped, not provider states.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Final

from router import v2
from router.config import Health
from router.upstream import Outcome

BREAKER_SLICES: Final = 60  # the window slides by 1/60 of itself


class State(StrEnum):
    """A provider's state, as `smm_router_provider_state` and `routes` show it."""

    HEALTHY = "healthy"
    OPEN = "open"  # breaker open: no orders
    HALF_OPEN = "half_open"  # cooldown over: still no orders until a balance probe answers
    BENCHED = "benched"  # out of funds for orders of some cost or more


STATES: Final = tuple(State)
# Members as module names for the per-order paths: reading an Enum class attribute costs about
# 0.2 us on Python 3.11, and routing reads a state per route of every order.
_HEALTHY: Final = State.HEALTHY
_OPEN: Final = State.OPEN
_HALF_OPEN: Final = State.HALF_OPEN
_BENCHED: Final = State.BENCHED


class Answer(StrEnum):
    """What one upstream call says of the provider's own health."""

    ANSWERED = "answered"  # accepted, or refused about the order (including no funds)
    UNREACHABLE = "unreachable"
    AMBIGUOUS = "ambiguous"
    RATE_LIMITED = "rate_limited"  # HTTP 429: a refusal of load, not of the order
    TURNED_AWAY = "turned_away"  # a 4xx page, no `{"error": ...}`: refused before the panel

    @property
    def failed(self) -> bool:
        return self is not Answer.ANSWERED

    @classmethod
    def of(
        cls, outcome: Outcome, *, rate_limited: bool = False, turned_away: bool = False
    ) -> Answer:
        """The answer an upstream outcome is; `rate_limited`: the refusal was an HTTP 429;
        `turned_away`: it was a 4xx page without the panel's error text (UpstreamTurnedAway)."""
        if outcome is Outcome.UNREACHABLE:
            return cls.UNREACHABLE
        if outcome is Outcome.AMBIGUOUS:
            return cls.AMBIGUOUS
        if rate_limited and outcome is Outcome.REFUSED:
            return cls.RATE_LIMITED
        if turned_away and outcome is Outcome.REFUSED:
            return cls.TURNED_AWAY
        return cls.ANSWERED


def utc_day(wall: float) -> date:
    """The UTC day of a unix time: the day a spend cap counts in."""
    return datetime.fromtimestamp(wall, UTC).date()


def spend_cap(cap: Decimal | None) -> int | None:
    """A configured `daily_spend_cap` in minor units (config-checked: at most MONEY_PLACES)."""
    return None if cap is None else v2.to_minor(cap)


def over_cap(cap: int | None, spent: int, cost: int | None) -> bool:
    """Whether an order costing `cost` (None: unknown) is over a cap with `spent` spent today.

    All in minor units of the base currency; `cap` None is no cap.
    """
    if cap is None:
        return False
    return spent >= cap or (cost is not None and spent + cost > cap)


# --- The breaker ---------------------------------------------------------------------------------


class _Slice:
    __slots__ = ("calls", "failures", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.calls = 0
        self.failures = 0


class Breaker:
    """The breaker of one provider. Mutable: its window would cost a copy per call otherwise."""

    __slots__ = ("_calls", "_failures", "_opened_at", "_probe_at", "_slices")

    def __init__(self) -> None:
        self._slices: deque[_Slice] = deque()
        self._calls = 0
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at = 0.0

    @property
    def opened_at(self) -> float | None:
        """When it last opened; None while closed."""
        return self._opened_at

    @property
    def probe_at(self) -> float | None:
        """When it turns half_open (a `balance` call may probe it); None while closed."""
        return None if self._opened_at is None else self._probe_at

    def state(self, now: float) -> State:
        if self._opened_at is None:
            return _HEALTHY
        return _HALF_OPEN if now >= self._probe_at else _OPEN

    def window(self, now: float, rules: Health) -> tuple[int, int]:
        """(calls, failures) in the window at `now`; (0, 0) while open."""
        cutoff = now - rules.window
        kept = [s for s in self._slices if s.start > cutoff]
        return sum(s.calls for s in kept), sum(s.failures for s in kept)

    def record(self, answer: Answer, *, now: float, rules: Health) -> None:
        """An `add` call ended at `now` with `answer`."""
        if self._opened_at is not None:
            return  # sent before it opened: no news
        self._forget(now, rules.window)
        width = rules.window / BREAKER_SLICES
        start = math.floor(now / width) * width
        if not self._slices or start > self._slices[-1].start:
            self._slices.append(_Slice(start))
        last = self._slices[-1]  # a clock that stepped back counts in the newest slice
        last.calls += 1
        self._calls += 1
        if answer.failed:
            last.failures += 1
            self._failures += 1
        # failures / calls >= ratio, exactly: ratio = numerator / denominator.
        numerator, denominator = rules.failure_ratio.as_integer_ratio()
        if self._calls >= rules.min_calls and self._failures * denominator >= (
            numerator * self._calls
        ):
            self._open(now, rules)

    def probe(self, answer: Answer, *, now: float, rules: Health) -> None:
        """A `balance` call ended at `now` with `answer`: it closes or reopens a half-open breaker.

        A closed breaker is judged on orders, not balances; an open one is not probed yet.
        """
        if self.state(now) is not _HALF_OPEN:
            return
        if answer.failed:
            self._open(now, rules)
        else:
            self._opened_at = None
            self._clear()

    def restore(self, opened_at: float, rules: Health) -> None:
        """Open as it opened at `opened_at` (a stored transition, after a restart): half_open
        once its cooldown has passed since then, and probed like any open breaker."""
        self._open(opened_at, rules)

    def _open(self, now: float, rules: Health) -> None:
        self._opened_at = now
        self._probe_at = now + rules.cooldown
        self._clear()

    def _clear(self) -> None:
        self._slices.clear()
        self._calls = self._failures = 0

    def _forget(self, now: float, window: float) -> None:
        cutoff = now - window
        while self._slices and self._slices[0].start <= cutoff:
            old = self._slices.popleft()
            self._calls -= old.calls
            self._failures -= old.failures


# --- The funds bench and the day's spend ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FundsBench:
    """The funds bench of one provider; costs and balances in minor units."""

    threshold: int | None = None  # orders costing this or more are benched (0: all); None: none
    until: float = 0.0  # the back-off: the bench ends then at the latest
    benched_at: float = 0.0  # when the last `Not enough funds` came back
    last_balance: int | None = None  # the last balance read, in the provider's currency

    def active(self, now: float) -> bool:
        return self.threshold is not None and now < self.until

    def blocks(self, cost: int | None, now: float) -> bool:
        """Whether an order costing `cost` (None: unknown) is benched at `now`."""
        if self.threshold is None or now >= self.until:
            return False
        return cost is None or cost >= self.threshold

    def after_no_funds(self, cost: int | None, *, now: float, backoff: float) -> FundsBench:
        """`Not enough funds` for an order costing `cost` (None: unknown, benches every amount).

        `backoff` is `sync.no_funds_backoff`. A standing threshold below this cost stays.
        """
        threshold = 0 if cost is None else max(cost, 0)
        if self.threshold is not None and self.active(now):
            threshold = min(threshold, self.threshold)
        return replace(self, threshold=threshold, until=now + backoff, benched_at=now)

    def after_balance(self, balance: int, *, read_at: float) -> FundsBench:
        """A balance read sent at `read_at` answered `balance`.

        A read sent before the bench says nothing about the money left after it, so it cannot
        lift the bench; it still becomes the level that a later read must beat.
        """
        rose = self.last_balance is not None and balance > self.last_balance
        if self.threshold is not None and read_at >= self.benched_at and rose:
            return FundsBench(last_balance=balance)
        return replace(self, last_balance=balance)


def replay_bench(
    refusals: Sequence[tuple[float, int | None]],
    reads: Sequence[tuple[float, int]],
    *,
    backoff: float,
) -> FundsBench:
    """The bench that `refusals` and balance `reads` leave, replayed in time order.

    `refusals`: when each `Not enough funds` came back, and the order's cost (None: unknown);
    `reads`: when each balance read was sent, and the balance. One clock for both; a read sent
    at the moment a refusal came back is taken after it.
    """
    events = sorted(
        [(at, 0, cost) for at, cost in refusals] + [(at, 1, balance) for at, balance in reads],
        key=lambda event: (event[0], event[1]),
    )
    bench = FundsBench()
    for at, is_read, value in events:
        if not is_read:
            bench = bench.after_no_funds(value, now=at, backoff=backoff)
        else:
            assert value is not None
            bench = bench.after_balance(value, read_at=at)
    return bench


@dataclass(frozen=True, slots=True)
class DailySpend:
    """What a provider was sent on one UTC day, in minor units of the base currency."""

    day: date | None = None
    spent: int = 0

    def on(self, day: date) -> int:
        """The spend of `day`: nothing yet on a day not recorded (a new day starts at 0)."""
        return self.spent if day == self.day else 0

    def plus(self, cost: int, *, day: date) -> DailySpend:
        return DailySpend(day, self.on(day) + cost)


# --- One provider --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """What routing needs of one provider at one moment (ProviderHealth.status)."""

    breaker: State = _HEALTHY  # healthy, open or half_open
    bench_from: int | None = None  # the standing funds threshold; None: not benched
    spent_today: int = 0  # minor units of the base currency
    missing: frozenset[int] = frozenset()  # upstream services gone from its catalogue

    @property
    def state(self) -> State:
        if self.breaker is not _HEALTHY:
            return self.breaker
        return _HEALTHY if self.bench_from is None else _BENCHED

    @property
    def takes_orders(self) -> bool:
        """False while the breaker is open or half_open."""
        return self.breaker is _HEALTHY

    def benched(self, cost: int | None) -> bool:
        """Whether an order costing `cost` (None: unknown) is benched."""
        return self.bench_from is not None and (cost is None or cost >= self.bench_from)


HEALTHY: Final = ProviderStatus()


class ProviderHealth:
    """Everything health knows of one provider, changed only through its transitions."""

    __slots__ = ("bench", "breaker", "missing", "spend")

    def __init__(self) -> None:
        self.breaker = Breaker()
        self.bench = FundsBench()
        self.spend = DailySpend()
        self.missing: frozenset[int] = frozenset()

    def state(self, now: float) -> State:
        """The state for `smm_router_provider_state`."""
        breaker = self.breaker.state(now)
        if breaker is not _HEALTHY:
            return breaker
        return _BENCHED if self.bench.active(now) else _HEALTHY

    def status(self, *, now: float, day: date) -> ProviderStatus:
        return ProviderStatus(
            breaker=self.breaker.state(now),
            bench_from=self.bench.threshold if self.bench.active(now) else None,
            spent_today=self.spend.on(day),
            missing=self.missing,
        )

    def after_add(
        self,
        outcome: Outcome,
        *,
        rate_limited: bool = False,
        turned_away: bool = False,
        cost: int | None,
        now: float,
        rules: Health,
        backoff: float,
    ) -> State:
        """An `add` of an order costing `cost` (None: unknown) ended at `now` with `outcome`.

        `rate_limited`: the refusal was an HTTP 429; `turned_away`: a 4xx page (see Answer.of).
        Returns the state after it.
        """
        answer = Answer.of(outcome, rate_limited=rate_limited, turned_away=turned_away)
        self.breaker.record(answer, now=now, rules=rules)
        if outcome is Outcome.NO_FUNDS:
            self.bench = self.bench.after_no_funds(cost, now=now, backoff=backoff)
        return self.state(now)

    def after_balance(self, balance: int, *, sent_at: float, now: float, rules: Health) -> State:
        """A `balance` call sent at `sent_at` answered `balance` (minor units) at `now`."""
        self.breaker.probe(Answer.ANSWERED, now=now, rules=rules)
        self.bench = self.bench.after_balance(balance, read_at=sent_at)
        return self.state(now)

    def after_balance_error(
        self,
        outcome: Outcome,
        *,
        rate_limited: bool = False,
        turned_away: bool = False,
        now: float,
        rules: Health,
    ) -> State:
        """A `balance` call ended at `now` without a balance, with `outcome`.

        An error answer (a refused key) is still an answer: the provider is up. A 4xx page
        (`turned_away`) is not: what stands in front of the panel is refusing us.
        """
        answer = Answer.of(outcome, rate_limited=rate_limited, turned_away=turned_away)
        self.breaker.probe(answer, now=now, rules=rules)
        return self.state(now)

    def after_spend(self, cost: int, *, day: date) -> None:
        """An order costing `cost` was placed on `day`: it counts against the cap at once."""
        self.spend = self.spend.plus(cost, day=day)

    def set_spend(self, spent: int, *, day: date) -> None:
        """The spend of `day` as recorded (the store's sum of that day's upstream costs)."""
        self.spend = DailySpend(day, spent)
