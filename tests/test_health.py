"""Provider health as pure transitions on a fake clock: the breaker, the funds bench, spend caps."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from router.config import Health
from router.health import (
    BREAKER_SLICES,
    STATES,
    Answer,
    Breaker,
    DailySpend,
    FundsBench,
    ProviderHealth,
    ProviderStatus,
    State,
    over_cap,
    replay_bench,
    spend_cap,
    utc_day,
)
from router.upstream import Outcome

RULES = Health()  # window 60, min_calls 5, failure_ratio 0.5, cooldown 30
BACKOFF = 600.0
DAY = date(2026, 12, 1)


def feed(breaker: Breaker, answers: str, *, at: float = 0.0, rules: Health = RULES) -> None:
    """One `add` per letter, 0.1 s apart from `at`: `o` answered, `x` unreachable."""
    for index, letter in enumerate(answers):
        answer = Answer.ANSWERED if letter == "o" else Answer.UNREACHABLE
        breaker.record(answer, now=at + index / 10, rules=rules)


def opened(at: float = 0.0) -> Breaker:
    breaker = Breaker()
    feed(breaker, "xxxxx", at=at)
    assert breaker.state(at + 1) is State.OPEN
    return breaker


# --- What counts against a provider --------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "rate_limited", "answer"),
    [
        (Outcome.ACCEPTED, False, Answer.ANSWERED),
        (Outcome.REFUSED, False, Answer.ANSWERED),
        (Outcome.NO_FUNDS, False, Answer.ANSWERED),
        (Outcome.UNREACHABLE, False, Answer.UNREACHABLE),
        (Outcome.AMBIGUOUS, False, Answer.AMBIGUOUS),
        (Outcome.REFUSED, True, Answer.RATE_LIMITED),
    ],
)
def test_only_the_providers_own_failures_count(
    outcome: Outcome, rate_limited: bool, answer: Answer
) -> None:
    assert Answer.of(outcome, rate_limited=rate_limited) is answer
    assert answer.failed is (answer is not Answer.ANSWERED)


@pytest.mark.parametrize(
    ("outcome", "answer"),
    [
        (Outcome.REFUSED, Answer.TURNED_AWAY),  # a firewall's page, a 404 at the API URL
        (Outcome.ACCEPTED, Answer.ANSWERED),  # the flag means nothing on other outcomes
        (Outcome.NO_FUNDS, Answer.ANSWERED),
        (Outcome.UNREACHABLE, Answer.UNREACHABLE),
        (Outcome.AMBIGUOUS, Answer.AMBIGUOUS),
    ],
)
def test_a_refusal_by_a_4xx_page_counts_against_the_provider(
    outcome: Outcome, answer: Answer
) -> None:
    assert Answer.of(outcome, turned_away=True) is answer
    assert Answer.TURNED_AWAY.failed


def test_the_metric_states_are_the_designs() -> None:
    assert [str(state) for state in STATES] == ["healthy", "open", "half_open", "benched"]


# --- The breaker ---------------------------------------------------------------------------------


def test_no_verdict_below_min_calls() -> None:
    breaker = Breaker()
    feed(breaker, "xxxx")
    assert breaker.state(1.0) is State.HEALTHY
    assert breaker.window(1.0, RULES) == (4, 4)


def test_the_failure_ratio_reached_opens_it() -> None:
    breaker = Breaker()
    feed(breaker, "ooxx")
    assert breaker.state(1.0) is State.HEALTHY  # 4 calls: no verdict yet
    feed(breaker, "x", at=1.0)  # 3 of 5 failed
    assert breaker.state(1.0) is State.OPEN
    assert breaker.opened_at == 1.0 and breaker.probe_at == 31.0


def test_exactly_the_ratio_opens_it_and_less_does_not() -> None:
    breaker = Breaker()
    feed(breaker, "oooxx")  # 2 of 5 < 0.5
    assert breaker.state(1.0) is State.HEALTHY
    feed(breaker, "x", at=1.0)  # 3 of 6 = 0.5
    assert breaker.state(1.0) is State.OPEN


def test_the_ratio_is_compared_exactly() -> None:
    rules = Health(min_calls=3, failure_ratio=Decimal("0.3334"))
    breaker = Breaker()
    feed(breaker, "oox", rules=rules)  # 1/3 = 0.33333... < 0.3334
    assert breaker.state(1.0) is State.HEALTHY
    rules = Health(min_calls=3, failure_ratio=Decimal("0.3333"))
    breaker = Breaker()
    feed(breaker, "oox", rules=rules)
    assert breaker.state(1.0) is State.OPEN


@pytest.mark.parametrize("outcome", [Outcome.REFUSED, Outcome.NO_FUNDS, Outcome.ACCEPTED])
def test_answers_about_the_order_never_open_it(outcome: Outcome) -> None:
    health = ProviderHealth()
    for second in range(200):
        health.after_add(outcome, cost=100, now=second / 10, rules=RULES, backoff=BACKOFF)
    assert health.breaker.state(20.0) is State.HEALTHY
    assert health.breaker.window(20.0, RULES) == (200, 0)


def test_rate_limited_answers_open_it() -> None:
    health = ProviderHealth()
    for second in range(5):
        health.after_add(
            Outcome.REFUSED, rate_limited=True, cost=1, now=second, rules=RULES, backoff=BACKOFF
        )
    assert health.state(5.0) is State.OPEN


def test_refusals_by_a_4xx_page_open_it_and_refusals_about_the_order_do_not() -> None:
    health = ProviderHealth()
    for second in range(2):  # "Incorrect link", on HTTP 200 or a 4xx: healthy answers
        health.after_add(Outcome.REFUSED, cost=1, now=second, rules=RULES, backoff=BACKOFF)
    for second in range(2, 4):
        state = health.after_add(
            Outcome.REFUSED, turned_away=True, cost=1, now=second, rules=RULES, backoff=BACKOFF
        )
        assert state is State.HEALTHY  # 4 calls: no verdict yet
    assert health.breaker.window(3.0, RULES) == (4, 2)
    state = health.after_add(
        Outcome.REFUSED, turned_away=True, cost=1, now=4, rules=RULES, backoff=BACKOFF
    )
    assert state is State.OPEN  # 3 of 5 turned away
    assert health.bench.threshold is None  # nothing about funds


def test_a_probe_turned_away_by_a_4xx_page_keeps_it_open() -> None:
    health = ProviderHealth()
    health.breaker = opened()
    state = health.after_balance_error(Outcome.REFUSED, turned_away=True, now=31.0, rules=RULES)
    assert state is State.OPEN and health.breaker.probe_at == 61.0
    state = health.after_balance_error(Outcome.REFUSED, now=61.0, rules=RULES)  # a refused key
    assert state is State.HEALTHY


def test_ambiguous_answers_open_it() -> None:
    health = ProviderHealth()
    for second in range(5):
        state = health.after_add(
            Outcome.AMBIGUOUS, cost=1, now=second, rules=RULES, backoff=BACKOFF
        )
    assert state is State.OPEN


def test_the_cooldown_turns_it_half_open_and_orders_do_not_probe_it() -> None:
    breaker = opened()
    assert breaker.state(0.4 + 29.9) is State.OPEN
    assert breaker.state(0.4 + 30) is State.HALF_OPEN
    feed(breaker, "ooooooooooo", at=31)  # late answers of orders sent before: no news
    assert breaker.state(40.0) is State.HALF_OPEN
    assert breaker.window(40.0, RULES) == (0, 0)


def test_a_probe_that_answers_closes_it_with_an_empty_window() -> None:
    breaker = opened()
    breaker.probe(Answer.ANSWERED, now=31.0, rules=RULES)
    assert breaker.state(31.0) is State.HEALTHY and breaker.opened_at is None
    assert breaker.probe_at is None
    feed(breaker, "xxxx", at=31.0)  # the failures that opened it are gone: 4 < min_calls
    assert breaker.state(32.0) is State.HEALTHY


@pytest.mark.parametrize(
    "answer", [Answer.UNREACHABLE, Answer.AMBIGUOUS, Answer.RATE_LIMITED, Answer.TURNED_AWAY]
)
def test_a_probe_that_fails_reopens_it_for_a_new_cooldown(answer: Answer) -> None:
    breaker = opened()
    breaker.probe(answer, now=45.0, rules=RULES)
    assert breaker.state(45.0) is State.OPEN
    assert breaker.opened_at == 45.0 and breaker.probe_at == 75.0
    assert breaker.state(74.9) is State.OPEN and breaker.state(75.0) is State.HALF_OPEN


def test_a_probe_before_the_cooldown_or_while_closed_changes_nothing() -> None:
    breaker = opened()
    breaker.probe(Answer.ANSWERED, now=10.0, rules=RULES)
    breaker.probe(Answer.UNREACHABLE, now=11.0, rules=RULES)
    assert breaker.state(10.0) is State.OPEN and breaker.probe_at == 30.4
    closed = Breaker()
    feed(closed, "xxxx")
    closed.probe(Answer.UNREACHABLE, now=1.0, rules=RULES)
    closed.probe(Answer.ANSWERED, now=1.0, rules=RULES)
    assert closed.state(1.0) is State.HEALTHY and closed.window(1.0, RULES) == (4, 4)


def test_the_window_forgets_old_failures() -> None:
    breaker = Breaker()
    feed(breaker, "xxxx")  # at 0.0 .. 0.3
    feed(breaker, "x", at=59.0)
    assert breaker.state(59.0) is State.OPEN  # still in the window: 5 of 5

    breaker = Breaker()
    feed(breaker, "xxxx")
    assert breaker.window(59.9, RULES) == (4, 4)
    assert breaker.window(60.0, RULES) == (0, 0)  # their slice [0, 1) has left the window
    feed(breaker, "x", at=60.5)
    assert breaker.state(60.5) is State.HEALTHY
    assert breaker.window(60.5, RULES) == (1, 1)


def test_the_window_memory_is_flat_at_any_rate() -> None:
    breaker = Breaker()
    rules = Health(min_calls=10**4)
    for call in range(20_000):  # 200 calls a second for 100 s
        breaker.record(Answer.ANSWERED, now=call / 200, rules=rules)
    assert len(breaker._slices) <= BREAKER_SLICES
    assert breaker.window(99.995, rules) == (12_000, 0)  # the slices 40 .. 99


def test_a_shorter_window_after_a_reload_applies_at_once() -> None:
    breaker = Breaker()
    feed(breaker, "xxxx")
    short = Health(window=10.0)
    feed(breaker, "x", at=20.0, rules=short)
    assert breaker.state(20.0) is State.HEALTHY and breaker.window(20.0, short) == (1, 1)


def test_decimal_windows_work() -> None:
    rules = Health(window=0.5, cooldown=0.2)
    breaker = Breaker()
    feed(breaker, "xxxx", rules=rules)  # 0.0 .. 0.3
    feed(breaker, "x", at=0.9, rules=rules)  # the others left the window
    assert breaker.state(0.9) is State.HEALTHY
    feed(breaker, "xxxx", at=1.0, rules=rules)
    assert breaker.state(1.3) is State.OPEN and breaker.state(1.5) is State.HALF_OPEN


# --- The funds bench -----------------------------------------------------------------------------


def test_a_funds_refusal_benches_that_cost_and_more_only() -> None:
    bench = FundsBench().after_no_funds(5000, now=100.0, backoff=BACKOFF)
    assert bench.threshold == 5000 and bench.active(100.0)
    assert not bench.blocks(4999, 101.0)  # cheaper orders still go there
    assert bench.blocks(5000, 101.0) and bench.blocks(9000, 101.0)
    assert bench.blocks(None, 101.0)  # an order we cannot cost might be dearer


def test_a_refusal_of_an_unknown_cost_benches_every_amount() -> None:
    bench = FundsBench().after_no_funds(None, now=0.0, backoff=BACKOFF)
    assert bench.threshold == 0 and bench.blocks(1, 1.0) and bench.blocks(0, 1.0)


def test_a_lower_refusal_lowers_the_threshold_a_higher_one_keeps_it() -> None:
    bench = FundsBench().after_no_funds(5000, now=0.0, backoff=BACKOFF)
    bench = bench.after_no_funds(2000, now=10.0, backoff=BACKOFF)
    assert bench.threshold == 2000 and bench.blocks(2000, 11.0) and not bench.blocks(1999, 11.0)
    bench = bench.after_no_funds(8000, now=20.0, backoff=BACKOFF)
    assert bench.threshold == 2000
    assert bench.until == 620.0  # the latest refusal restarts the back-off


def test_the_back_off_lifts_the_bench() -> None:
    bench = FundsBench().after_no_funds(5000, now=0.0, backoff=BACKOFF)
    assert bench.blocks(5000, 599.9)
    assert not bench.active(600.0) and not bench.blocks(10**9, 600.0)
    # A refusal after the back-off starts afresh: the old, lower threshold is over.
    bench = bench.after_no_funds(7000, now=700.0, backoff=BACKOFF)
    assert bench.threshold == 7000


def test_a_balance_rise_after_the_bench_lifts_it() -> None:
    bench = FundsBench().after_balance(1000, read_at=50.0)
    bench = bench.after_no_funds(5000, now=100.0, backoff=BACKOFF)
    same = bench.after_balance(1000, read_at=110.0)
    assert same.blocks(5000, 111.0)  # no money came in
    lower = bench.after_balance(800, read_at=110.0)
    assert lower.blocks(5000, 111.0) and lower.last_balance == 800
    risen = lower.after_balance(900, read_at=120.0)  # above the read before: a top-up
    assert not risen.blocks(5000, 121.0) and risen.threshold is None
    assert risen.last_balance == 900


def test_a_read_sent_before_the_bench_cannot_lift_it_but_sets_the_level() -> None:
    bench = FundsBench().after_balance(1000, read_at=50.0)
    bench = bench.after_no_funds(5000, now=100.0, backoff=BACKOFF)
    early = bench.after_balance(2000, read_at=99.0)  # sent before, answered after the bench
    assert early.blocks(5000, 101.0) and early.last_balance == 2000
    assert early.after_balance(2000, read_at=130.0).blocks(5000, 131.0)
    assert not early.after_balance(2500, read_at=130.0).blocks(5000, 131.0)


def test_the_first_read_after_a_bench_sets_the_level_to_beat() -> None:
    bench = FundsBench().after_no_funds(5000, now=100.0, backoff=BACKOFF)
    first = bench.after_balance(300, read_at=110.0)
    assert first.blocks(5000, 111.0)
    assert not first.after_balance(301, read_at=120.0).blocks(5000, 121.0)


def test_provider_health_benches_by_the_refused_orders_cost() -> None:
    health = ProviderHealth()
    health.after_add(Outcome.NO_FUNDS, cost=5000, now=0.0, rules=RULES, backoff=BACKOFF)
    status = health.status(now=1.0, day=DAY)
    assert status.bench_from == 5000 and status.state is State.BENCHED and status.takes_orders
    assert status.benched(5000) and not status.benched(4999)
    health.after_balance(100, sent_at=2.0, now=2.5, rules=RULES)
    health.after_balance(200, sent_at=3.0, now=3.5, rules=RULES)
    assert health.status(now=4.0, day=DAY) == ProviderStatus()
    assert health.state(4.0) is State.HEALTHY


# --- States shown ------------------------------------------------------------------------------


def test_an_open_breaker_wins_over_a_bench() -> None:
    health = ProviderHealth()
    health.after_add(Outcome.NO_FUNDS, cost=5000, now=0.0, rules=RULES, backoff=BACKOFF)
    for second in range(5):
        health.after_add(Outcome.UNREACHABLE, cost=1, now=1 + second, rules=RULES, backoff=1e6)
    assert health.state(6.0) is State.OPEN
    assert health.status(now=6.0, day=DAY).state is State.OPEN
    assert not health.status(now=6.0, day=DAY).takes_orders
    assert health.state(35.0) is State.HALF_OPEN
    health.after_balance_error(Outcome.UNREACHABLE, now=40.0, rules=RULES)
    assert health.state(40.0) is State.OPEN
    health.after_balance(10, sent_at=70.0, now=70.5, rules=RULES)
    assert health.state(70.5) is State.BENCHED  # closed; the bench still stands
    assert health.status(now=70.5, day=DAY).bench_from == 5000
    assert health.state(600.0) is State.HEALTHY  # the back-off passed


def test_a_balance_error_answer_is_still_an_answer() -> None:
    health = ProviderHealth()
    for second in range(5):
        health.after_add(Outcome.AMBIGUOUS, cost=1, now=second, rules=RULES, backoff=BACKOFF)
    health.after_balance_error(Outcome.REFUSED, now=40.0, rules=RULES)
    assert health.state(40.0) is State.HEALTHY


def test_missing_upstream_services_are_part_of_the_status() -> None:
    health = ProviderHealth()
    health.missing = frozenset({101})
    status = health.status(now=0.0, day=DAY)
    assert status.missing == {101} and status.state is State.HEALTHY


# --- The daily spend cap -------------------------------------------------------------------------


def test_the_cap_is_a_ceiling_an_order_we_can_cost_never_crosses() -> None:
    assert not over_cap(None, 10**12, 10**12)
    assert not over_cap(50_000, 40_000, 10_000)  # exactly to the cap: it fits
    assert over_cap(50_000, 40_000, 10_001)  # past it
    assert not over_cap(50_000, 40_000, 9_000)  # a cheaper order still fits
    assert over_cap(50_000, 50_000, 0) and over_cap(50_000, 60_000, None)
    assert not over_cap(50_000, 49_999, None)  # unknown cost: only spend at the cap stops it


def test_the_spend_counts_per_utc_day() -> None:
    assert utc_day(0.0) == date(1970, 1, 1) and utc_day(86_399.9) == date(1970, 1, 1)
    assert utc_day(86_400.0) == date(1970, 1, 2)
    spend = DailySpend().plus(300, day=DAY).plus(200, day=DAY)
    assert spend.on(DAY) == 500
    tomorrow = date(2026, 12, 2)
    assert spend.on(tomorrow) == 0 and spend.plus(100, day=tomorrow) == DailySpend(tomorrow, 100)


def test_provider_health_carries_the_days_spend() -> None:
    health = ProviderHealth()
    health.set_spend(40_000, day=DAY)
    health.after_spend(2_500, day=DAY)
    assert health.status(now=0.0, day=DAY).spent_today == 42_500
    assert health.status(now=0.0, day=date(2026, 12, 2)).spent_today == 0


def test_a_configured_cap_in_minor_units() -> None:
    assert spend_cap(None) is None
    assert spend_cap(Decimal("500")) == 50_000_000 and spend_cap(Decimal("0.00001")) == 1


# --- Restored from what the store keeps ----------------------------------------------------------


def test_a_restored_breaker_is_open_until_its_cooldown_passes_since_it_opened() -> None:
    breaker = Breaker()
    breaker.restore(100.0, RULES)
    assert (breaker.state(110.0), breaker.probe_at) == (State.OPEN, 130.0)
    assert breaker.state(130.0) is State.HALF_OPEN
    breaker.probe(Answer.ANSWERED, now=131.0, rules=RULES)
    assert breaker.state(131.0) is State.HEALTHY


def test_a_replayed_bench_is_the_one_the_live_transitions_left() -> None:
    """The same refusals and reads, in time order, as the live bench saw them."""
    refusals = [(10.0, 500), (20.0, 300), (700.0, None)]
    reads = [(5.0, 1000), (15.0, 900), (30.0, 900)]
    live = FundsBench().after_balance(1000, read_at=5.0)
    live = live.after_no_funds(500, now=10.0, backoff=BACKOFF)
    live = live.after_balance(900, read_at=15.0)
    live = live.after_no_funds(300, now=20.0, backoff=BACKOFF)
    live = live.after_balance(900, read_at=30.0)
    live = live.after_no_funds(None, now=700.0, backoff=BACKOFF)
    replayed = replay_bench(refusals, reads, backoff=BACKOFF)
    assert replayed == live
    assert (replayed.threshold, replayed.until) == (0, 700.0 + BACKOFF)  # unknown: every cost


def test_a_replayed_read_that_rose_after_the_bench_lifts_it() -> None:
    replayed = replay_bench([(10.0, 500)], [(5.0, 100), (12.0, 100), (20.0, 5000)], backoff=BACKOFF)
    assert replayed == FundsBench(last_balance=5000)
    assert not replayed.blocks(10**9, now=21.0)


def test_a_read_sent_as_the_refusal_came_back_is_taken_after_it() -> None:
    replayed = replay_bench([(10.0, 500)], [(5.0, 100), (10.0, 200)], backoff=BACKOFF)
    assert replayed.threshold is None and replayed.last_balance == 200
