"""Retries (pure): which failures are retried, how long to wait, and a retry budget.

Theory of operation
-------------------
After a try fails, the HTTP proxy asks ``decide`` whether to try again. The answer is a
``Decision`` (retry or not, the delay before the next try, and the reason, for logs and
metrics). The checks run in this order, and the first that says no wins:

1. **condition** — the outcome must be one the policy retries (``RetryPolicy.retry_on``):
   ``connect-failure`` (no connection to the backend), ``reset`` (the connection broke before
   a whole response arrived), ``timeout`` (the per-try timeout fired), ``5xx`` (any status
   500..599); or its status is listed in ``RetryPolicy.codes`` (default 503). Default:
   connect-failure, reset and 503.
2. **method** — a request that may have reached the backend is retried only when its method is
   in ``RetryPolicy.methods`` (default the idempotent ones: GET HEAD OPTIONS PUT DELETE TRACE).
   A connect failure is retried for every method: nothing was sent.
3. **attempts** — at most ``RetryPolicy.attempts`` retries after the first try.
4. **delay** — a ``Retry-After`` of the response (seconds, or an HTTP-date compared with the
   injected wall-clock ``now_epoch``) is honoured when it is at most ``backoff_cap``; a longer
   one means "no retry" (the backend asked for more patience than the policy has, so its
   answer goes back to the client). Without one: full-jitter exponential backoff,
   ``random() * min(cap, base * 2**n)`` for the n-th retry (n = 0, 1, ...), ``random`` injected.
5. **deadline** — when the caller passes the time left of the request timeout, a retry whose
   delay would use it all up is not made.
6. **budget** — ``RetryBudget.try_spend(now)`` last, so only retries that happen are counted.

The budget (one per route and backend, ``BudgetBook``) caps retries to a share of the traffic:
over a sliding window of ``window`` seconds, retries <= ``ratio`` x requests +
``min_per_second`` x window. The window is kept as ``buckets`` counters of window/buckets
seconds each, so memory is constant whatever the rate; a bucket older than the window is
dropped whole. ``record_request(now)`` counts one client request (not its retries). So under a
backend that fails every try, tries over any window <= (1 + ratio) x requests + the minimum
— 1.1x with the defaults, and the minimum keeps retries possible at low traffic. The clock
``now`` (monotonic seconds) is injected; a clock that goes back is read as not moving.
``state(now)`` exposes the counters for metrics.

Pure: no asyncio, socket, time or random.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from gateway.config.policy_values import CONDITIONS, IDEMPOTENT, RetryPolicy

__all__ = [
    "CONDITIONS", "IDEMPOTENT", "BudgetBook", "BudgetState", "Decision", "Outcome",
    "RetryBudget", "RetryPolicy", "backoff", "decide", "parse_retry_after",
]

CONNECT_FAILURE, RESET, TIMEOUT, STATUS = "connect-failure", "reset", "timeout", "status"
MAX_RETRY_AFTER_CHARS = 64  # longer header values are not parsed (an HTTP-date is 29)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one try ended: kind is connect-failure, reset, timeout or status (with `status`)."""

    kind: str
    status: int | None = None

    @classmethod
    def response(cls, status: int) -> Outcome:
        return cls(STATUS, status)


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay: float = 0.0
    reason: str = "retry"  # retry | condition | method | attempts | retry-after | deadline | budget


def retryable(policy: RetryPolicy, outcome: Outcome) -> bool:
    if outcome.kind != STATUS:
        return outcome.kind in policy.retry_on
    status = outcome.status
    if status is None:
        return False
    return status in policy.codes or ("5xx" in policy.retry_on and 500 <= status <= 599)


def backoff(policy: RetryPolicy, n: int, random: Callable[[], float]) -> float:
    """The full-jitter delay before retry number n (0-based): uniform in [0, min(cap, base*2^n)]."""
    ceiling = min(policy.backoff_cap, policy.backoff_base * 2.0 ** min(max(n, 0), 60))
    return random() * ceiling


def decide(
    policy: RetryPolicy,
    *,
    method: str,
    outcome: Outcome,
    retries_done: int,
    budget: RetryBudget | None,
    now: float,
    random: Callable[[], float],
    retry_after: str | None = None,
    now_epoch: float | None = None,
    time_left: float | None = None,
) -> Decision:
    """Retry after this failed try? See the module docstring for the order of the checks."""
    if not retryable(policy, outcome):
        return Decision(False, reason="condition")
    if outcome.kind != CONNECT_FAILURE and method.upper() not in policy.methods:
        return Decision(False, reason="method")
    if retries_done >= policy.attempts:
        return Decision(False, reason="attempts")
    asked = None
    if retry_after is not None and now_epoch is not None:
        asked = parse_retry_after(retry_after, now_epoch)
    if asked is not None and asked > policy.backoff_cap:
        return Decision(False, delay=asked, reason="retry-after")
    delay = asked if asked is not None else backoff(policy, retries_done, random)
    if time_left is not None and delay >= time_left:
        return Decision(False, delay=delay, reason="deadline")
    if budget is not None and not budget.try_spend(now):
        return Decision(False, delay=delay, reason="budget")
    return Decision(True, delay=delay)


def parse_retry_after(value: str, now_epoch: float) -> float | None:
    """Seconds to wait from a Retry-After value: delay-seconds (digits) or an HTTP-date
    (RFC 9110 section 10.2.3) measured from `now_epoch` (a date in the past: 0). None when
    the value is neither (the header is then ignored)."""
    text = value.strip()
    if not text or len(text) > MAX_RETRY_AFTER_CHARS:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # a date without a zone is not an HTTP-date
        return None
    return max(0.0, when.timestamp() - now_epoch)


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The budget's counters over the current window, for metrics."""

    requests: int
    retries: int
    allowed: float
    window: float

    @property
    def exhausted(self) -> bool:
        return self.retries + 1 > self.allowed


@dataclass(slots=True)
class _Bucket:
    slot: int
    requests: int = 0
    retries: int = 0


@dataclass(slots=True)
class RetryBudget:
    ratio: float = 0.1
    min_per_second: float = 3.0
    window: float = 10.0
    buckets: int = 10
    _ring: deque[_Bucket] = field(default_factory=deque, repr=False)
    _last: float = field(default=-math.inf, repr=False)

    @classmethod
    def for_policy(cls, policy: RetryPolicy) -> RetryBudget:
        return cls(policy.budget_ratio, policy.budget_min_per_second, policy.budget_window)

    def record_request(self, now: float) -> None:
        self._current(now).requests += 1

    def try_spend(self, now: float) -> bool:
        """Count one retry if the window has room for it; False (nothing counted) if not."""
        bucket = self._current(now)
        requests, retries = self._sums()
        if retries + 1 > self._allowed(requests):
            return False
        bucket.retries += 1
        return True

    def state(self, now: float) -> BudgetState:
        self._current(now)
        requests, retries = self._sums()
        return BudgetState(requests, retries, self._allowed(requests), self.window)

    def _allowed(self, requests: int) -> float:
        return self.ratio * requests + self.min_per_second * self.window

    def _sums(self) -> tuple[int, int]:
        return sum(b.requests for b in self._ring), sum(b.retries for b in self._ring)

    def _current(self, now: float) -> _Bucket:
        now = max(now, self._last)
        self._last = now
        slot = math.floor(now * self.buckets / self.window)
        ring = self._ring
        while ring and ring[0].slot <= slot - self.buckets:
            ring.popleft()
        if not ring or ring[-1].slot != slot:
            ring.append(_Bucket(slot))
        return ring[-1]


class BudgetBook:
    """One RetryBudget per key (route and backend), at most `max_keys` of them: the least
    recently used is forgotten first (it starts again with a fresh window if it comes back).
    A key whose policy's budget settings changed (a reload) gets a fresh budget."""

    def __init__(self, max_keys: int = 4096):
        self.max_keys = max_keys
        self._budgets: OrderedDict[Hashable, RetryBudget] = OrderedDict()

    def budget(self, key: Hashable, policy: RetryPolicy) -> RetryBudget:
        found = self._budgets.get(key)
        wanted = (policy.budget_ratio, policy.budget_min_per_second, policy.budget_window)
        if found is not None and (found.ratio, found.min_per_second, found.window) == wanted:
            self._budgets.move_to_end(key)
            return found
        made = RetryBudget.for_policy(policy)
        self._budgets[key] = made
        if len(self._budgets) > self.max_keys:
            self._budgets.popitem(last=False)
        return made

    def states(self, now: float) -> dict[Hashable, BudgetState]:
        return {key: b.state(now) for key, b in self._budgets.items()}
