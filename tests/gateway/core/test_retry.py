"""Tables and properties for retry decisions, full-jitter backoff, Retry-After and the budget."""

from __future__ import annotations

import random as stdlib_random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.retry import (
    BudgetBook,
    Outcome,
    RetryBudget,
    RetryPolicy,
    backoff,
    decide,
    parse_retry_after,
)

POLICY = RetryPolicy()
NOW_EPOCH = 1_800_000_000.0


def half() -> float:
    return 0.5


def ask(outcome: Outcome, method: str = "GET", retries_done: int = 0, policy=POLICY, **kw):
    kw.setdefault("budget", None)
    kw.setdefault("now", 0.0)
    kw.setdefault("random", half)
    return decide(policy, method=method, outcome=outcome, retries_done=retries_done, **kw)


CONNECT = Outcome("connect-failure")
RESET = Outcome("reset")
TIMEOUT = Outcome("timeout")


@pytest.mark.parametrize(
    "outcome, method, policy, expected",
    [
        (CONNECT, "GET", POLICY, "retry"),
        (CONNECT, "POST", POLICY, "retry"),  # nothing was sent: safe for any method
        (RESET, "GET", POLICY, "retry"),
        (RESET, "POST", POLICY, "method"),
        (RESET, "PATCH", POLICY, "method"),
        (TIMEOUT, "GET", POLICY, "condition"),  # not in the default retry_on
        (TIMEOUT, "GET", RetryPolicy(retry_on=frozenset({"timeout"})), "retry"),
        (Outcome.response(503), "GET", POLICY, "retry"),
        (Outcome.response(503), "DELETE", POLICY, "retry"),
        (Outcome.response(503), "POST", POLICY, "method"),
        (Outcome.response(500), "GET", POLICY, "condition"),
        (Outcome.response(500), "GET", RetryPolicy(retry_on=frozenset({"5xx"})), "retry"),
        (Outcome.response(599), "GET", RetryPolicy(retry_on=frozenset({"5xx"})), "retry"),
        (Outcome.response(404), "GET", RetryPolicy(retry_on=frozenset({"5xx"})), "condition"),
        (Outcome.response(429), "GET", RetryPolicy(codes=frozenset({429})), "retry"),
        (Outcome.response(503), "GET", RetryPolicy(codes=frozenset({429})), "condition"),
        (Outcome.response(503), "POST", RetryPolicy(methods=frozenset({"POST"})), "retry"),
        (Outcome.response(503), "get", POLICY, "retry"),  # methods compared uppercase
        (RESET, "GET", RetryPolicy(attempts=0), "attempts"),
    ],
)
def test_which_failures_are_retried(outcome, method, policy, expected):
    assert ask(outcome, method, policy=policy).reason == expected


def test_attempts_count_retries_after_the_first_try():
    policy = RetryPolicy(attempts=3)
    got = [ask(RESET, retries_done=n, policy=policy).retry for n in range(5)]
    assert got == [True, True, True, False, False]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("-1", None),
        ("1.5", None),
        ("", None),
        ("soon", None),
        ("9" * 65, None),  # too long to parse
        ("٣", None),  # a non-ASCII digit is not delay-seconds
        (format_datetime(datetime.fromtimestamp(NOW_EPOCH + 30, UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(NOW_EPOCH - 30, UTC), usegmt=True), 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:49:37", None),  # no zone: not an HTTP-date
        ("Sun, 32 Nov 1994 08:49:37 GMT", None),
    ],
)
def test_retry_after_parsing(value, expected):
    assert parse_retry_after(value, NOW_EPOCH) == expected


def test_retry_after_is_honoured_within_the_cap():
    policy = RetryPolicy(backoff_cap=2.0, codes=frozenset({503, 429}))
    within = ask(Outcome.response(429), policy=policy, retry_after="1", now_epoch=NOW_EPOCH)
    assert (within.retry, within.delay) == (True, 1.0)
    beyond = ask(Outcome.response(429), policy=policy, retry_after="3", now_epoch=NOW_EPOCH)
    assert (beyond.retry, beyond.reason) == (False, "retry-after")
    junk = ask(Outcome.response(429), policy=policy, retry_after="x", now_epoch=NOW_EPOCH)
    assert (junk.retry, junk.delay) == (True, 0.5 * 0.025)  # ignored: backoff instead


def test_no_retry_that_would_outlast_the_request_deadline():
    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0)
    assert ask(RESET, policy=policy, time_left=0.01, random=lambda: 1.0).reason == "deadline"
    assert ask(RESET, policy=policy, time_left=0.5, random=lambda: 1.0).retry


def test_budget_is_asked_last_and_only_for_retries_that_happen():
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # room for 1 retry
    assert ask(RESET, method="POST", budget=budget).reason == "method"
    assert budget.state(0.0).retries == 0
    assert ask(RESET, budget=budget).retry
    assert ask(RESET, budget=budget).reason == "budget"
    assert budget.state(0.0).retries == 1


# --- backoff ------------------------------------------------------------------------------


@given(n=st.integers(0, 200), r=st.floats(0.0, 1.0),
       base=st.floats(0.001, 1.0), factor=st.floats(1.0, 100.0))
def test_backoff_is_the_jittered_capped_exponential(n, r, base, factor):
    policy = RetryPolicy(backoff_base=base, backoff_cap=base * factor)
    delay = backoff(policy, n, lambda: r)
    assert delay == pytest.approx(r * min(base * factor, base * 2.0**n))
    assert 0.0 <= delay <= policy.backoff_cap


def test_backoff_spacing_doubles_up_to_the_cap():
    policy = RetryPolicy(backoff_base=0.025, backoff_cap=0.25)
    ceilings = [backoff(policy, n, lambda: 1.0) for n in range(6)]
    assert ceilings == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])


def test_full_jitter_spreads_a_thousand_clients_over_zero_to_cap():
    """Kolmogorov-Smirnov against uniform [0, cap]: D below the 1% critical value 1.63/sqrt(n)."""
    policy = RetryPolicy(backoff_base=0.1, backoff_cap=0.8)
    rng = stdlib_random.Random(7)
    n = 1000
    delays = sorted(backoff(policy, 5, rng.random) for _ in range(n))
    cap = policy.backoff_cap
    d = max(max((i + 1) / n - x / cap, x / cap - i / n) for i, x in enumerate(delays))
    assert d < 1.63 / n**0.5
    assert delays[0] < 0.01 * cap and delays[-1] > 0.99 * cap  # the whole range is used


# --- the budget ---------------------------------------------------------------------------


def test_budget_minimum_allows_retries_at_low_traffic():
    budget = RetryBudget(ratio=0.1, min_per_second=3.0, window=10.0)
    spent = sum(budget.try_spend(0.5) for _ in range(100))
    assert spent == 30  # 3/s over 10 s
    state = budget.state(0.5)
    assert (state.requests, state.retries, state.allowed, state.exhausted) == (0, 30, 30.0, True)


def test_budget_window_slides():
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0, buckets=10)
    assert sum(budget.try_spend(0.0) for _ in range(20)) == 10
    assert not budget.try_spend(9.9)  # still inside the window
    assert budget.try_spend(10.0)  # the bucket of t=0 has left the window
    assert budget.state(10.0).retries == 1


def test_budget_ratio_grows_with_requests():
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=1.0)
    for _ in range(50):
        budget.record_request(0.0)
    assert sum(budget.try_spend(0.0) for _ in range(50)) == 10


def test_a_clock_going_back_is_read_as_not_moving():
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10.0)
    assert sum(budget.try_spend(100.0) for _ in range(20)) == 10
    assert not budget.try_spend(50.0)


@settings(max_examples=50, deadline=None)
@given(
    rate=st.integers(100, 2000),
    seconds=st.integers(10, 40),
    attempts=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_under_a_failing_backend_tries_stay_within_the_budget(rate, seconds, attempts, seed):
    """Every try fails; over every bucket-aligned window of the budget, tries <= 1.1x
    requests + the minimum (3/s x 10 s), and at >= 300 requests/s that is <= 1.2x requests."""
    policy = RetryPolicy(attempts=attempts, retry_on=frozenset({"reset"}))
    budget = RetryBudget.for_policy(policy)
    rng = stdlib_random.Random(seed)
    per_second: list[list[int]] = []  # [requests, tries] per second
    for second in range(seconds):
        counts = [0, 0]
        for i in range(rate):
            now = second + i / rate
            budget.record_request(now)
            counts[0] += 1
            counts[1] += 1
            done = 0
            while decide(policy, method="GET", outcome=RESET, retries_done=done, budget=budget,
                         now=now, random=rng.random).retry:
                done += 1
                counts[1] += 1
        per_second.append(counts)
    window = int(policy.budget_window)
    minimum = policy.budget_min_per_second * policy.budget_window
    for start in range(0, seconds - window + 1):
        requests = sum(c[0] for c in per_second[start:start + window])
        tries = sum(c[1] for c in per_second[start:start + window])
        assert tries <= (1 + policy.budget_ratio) * requests + minimum
        if rate >= 300:
            assert tries <= 1.11 * requests
    # the budget does allow retries: not just the first try
    assert sum(c[1] for c in per_second) > sum(c[0] for c in per_second)


def test_budget_book_keeps_one_budget_per_key_and_forgets_the_oldest():
    book = BudgetBook(max_keys=2)
    a = book.budget(("route", "a"), POLICY)
    assert book.budget(("route", "a"), POLICY) is a
    book.budget(("route", "b"), POLICY)
    book.budget(("route", "a"), POLICY)  # a is now the most recent
    book.budget(("route", "c"), POLICY)
    assert set(book.states(0.0)) == {("route", "a"), ("route", "c")}
    changed = RetryPolicy(budget_ratio=0.5)
    assert book.budget(("route", "a"), changed) is not a  # a reload changed its settings


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry_on": frozenset({"sometimes"})},
        {"backoff_base": 0.0},
        {"backoff_cap": 0.0},
        {"attempts": -1},
        {"budget_window": 0.0},
    ],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
