"""Pure health state machines for one endpoint: active probes and passive outlier detection.

Theory of operation
-------------------
Every endpoint (or remote cluster gateway) a gateway may send traffic to carries two small,
independent state machines. Both are frozen values; every function returns a new value. The
clock is passed in as ``now`` (monotonic seconds); nothing here sleeps, reads a clock or does I/O.

Active health (``ActiveHealth``, fed by ``probe_result`` after each health check, probes.py)

    UNKNOWN   --first success------------------------------->  HEALTHY
    UNKNOWN   --unhealthy_threshold consecutive failures---->  UNHEALTHY
    HEALTHY   --unhealthy_threshold consecutive failures---->  UNHEALTHY
    UNHEALTHY --healthy_threshold consecutive successes----->  HEALTHY

- ``successes`` / ``failures`` count *consecutive* results: a success resets ``failures`` to 0,
  a failure resets ``successes`` to 0. Both counters keep counting inside a state (they are
  informational there) and both reset to 0 on a transition, so each state starts afresh.
- Leaving UNHEALTHY needs ``healthy_threshold`` successes in a row while entering it needs
  ``unhealthy_threshold`` failures in a row: this asymmetry is the anti-flap hysteresis. An
  endpoint alternating ok/fail never leaves the state it is in (for thresholds >= 2).
- UNKNOWN (never probed, or probing disabled) counts as routable: an optimistic start. A wrong
  guess costs one failed connect, which connect-time failover to the next candidate covers.
- ``changed_at`` is the ``now`` of the last transition (None until the first one).
- Thresholds below 1 are a configuration bug and raise ``ValueError``.

Outlier detection (``Outlier``, fed by ``connect_result`` after each real connection attempt)

- A failure (connect refused, reset, timeout) adds one to ``consecutive_failures``; a success
  resets it to 0.
- When ``consecutive_failures`` reaches ``consecutive_limit`` while not ejected, the endpoint is
  ejected until ``now + min(base_ejection * 2**ejections, max_ejection)``; ``ejections`` grows
  by one, the failure counter resets to 0, and ``last_ejection_end`` records when this
  ejection ends. Repeat offenders are thus ejected for 1x, 2x, 4x ... base, capped at max.
- While ejected, failures are not counted: the endpoint only sees last-resort (panic) traffic,
  and it gets a fresh count when it comes back. Ejection is not shortened by a success either;
  it simply expires (``is_ejected`` is ``now < ejected_until``).
- Decay: a success while not ejected, at least ``max_ejection`` after ``last_ejection_end``,
  lowers ``ejections`` by one and restarts that quiet period from ``now``. A recovered endpoint
  therefore earns back short ejections one step per ``max_ejection`` of good behaviour.

An endpoint is ``routable`` when its active state is not UNHEALTHY and it is not ejected. The
shell combines this with leases and catalog health into ``balance.Target.healthy``.

Response timeout (``Response``, fed by the relay of one connection; opt-in)

A stopped or wedged process still completes TCP handshakes (its kernel fills the accept queue),
so a successful connect says nothing about the app. With ``outlier_detection.response_timeout``
set, a connection relayed to a *local* endpoint is watched instead (a remote gateway watches
the endpoint it relays to, with its own setting):

    QUIET    --the client's first bytes reach the upstream--->  WAITING (deadline now + timeout)
    QUIET    --upstream sends first (a banner)--------------->  ANSWERED
    WAITING  --upstream sends its first bytes---------------->  ANSWERED
    WAITING  --now >= deadline, nothing from the upstream---->  TIMED_OUT
    ANSWERED, TIMED_OUT: final; nothing moves them.

- Only the first answer is watched: once the upstream has said anything, later silences are
  the idle timeout's business. More client bytes while WAITING do not move the deadline. An
  EOF counts as bytes both ways: a client that half-closes has asked and waits for the reply;
  an upstream that closes its side answered (only a running process closes a connection).
- The outcome (``response_verdict``) is the connection's one result for outlier detection:
  ANSWERED is a success, TIMED_OUT a failure (``connect_result`` with ok False), anything else
  (the client left, or either side closed, before a verdict) is no result at all. The connect
  itself is NOT reported as a success for a watched connection: for a stopped process it would
  reset ``consecutive_failures`` between timeouts and keep the endpoint from ever being ejected.
- A timed-out connection is lost (L4 cannot replay the bytes the upstream already took): the
  shell resets both legs and counts it as a response timeout, not as served.

The health book (``HealthBook``: the state the gateway keeps; still pure, ``now`` passed in)

- It holds both machines of every target key (local endpoints ``local:<host:port>``, remote
  cluster gateways ``remote:<cluster>``), fed by ``probe`` and ``connect``, and bumps
  ``version`` (and calls ``on_change``) on every change that can alter routing, so a router
  rebuilds its tiers only then (or when an ejection it knows of runs out).
- ``routable(key, now)`` is ``routable`` above of the key's two machines; a key never probed and
  never failed is routable.
- A clean success (no failures counted, never ejected) changes nothing and records nothing:
  that is the per-connection hot path.
- Transitions are reported as values, never logged here: ``HealthEvent``s (a target turned
  unhealthy, or healthy again, by its probes; was ejected by outlier detection; came back when
  the ejection ran out, which ``take_events(now)`` notices). They are made only on transitions
  and bounded (``MAX_EVENTS``; the oldest go first, counted in ``dropped``); the runtime drains
  and logs them on its tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from federation.model import OutlierPolicy

__all__ = [
    "HealthState",
    "ActiveHealth",
    "probe_result",
    "Outlier",
    "connect_result",
    "is_ejected",
    "routable",
    "Wait",
    "Response",
    "client_sent",
    "upstream_sent",
    "expire",
    "response_verdict",
    "MAX_EVENTS",
    "HealthEvent",
    "HealthBook",
    "bounded_append",
]


class HealthState(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ActiveHealth:
    """Active-probe state of one target."""

    state: HealthState = HealthState.UNKNOWN
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    changed_at: float | None = None


def probe_result(
    h: ActiveHealth,
    ok: bool,
    now: float,
    healthy_threshold: int,
    unhealthy_threshold: int,
) -> ActiveHealth:
    """Fold one probe result into the active health state (see the module docstring)."""
    if healthy_threshold < 1:
        raise ValueError(f"healthy_threshold must be >= 1, got {healthy_threshold}")
    if unhealthy_threshold < 1:
        raise ValueError(f"unhealthy_threshold must be >= 1, got {unhealthy_threshold}")
    if ok:
        successes, failures = h.successes + 1, 0
        if h.state is HealthState.UNKNOWN or (
            h.state is HealthState.UNHEALTHY and successes >= healthy_threshold
        ):
            return ActiveHealth(HealthState.HEALTHY, 0, 0, now)
    else:
        successes, failures = 0, h.failures + 1
        if h.state is not HealthState.UNHEALTHY and failures >= unhealthy_threshold:
            return ActiveHealth(HealthState.UNHEALTHY, 0, 0, now)
    return replace(h, successes=successes, failures=failures)


@dataclass(frozen=True)
class Outlier:
    """Passive outlier-detection state of one target, from real traffic."""

    consecutive_failures: int = 0
    ejections: int = 0  # how many times ejected recently (drives the growing backoff)
    ejected_until: float = 0.0
    last_ejection_end: float = 0.0


def is_ejected(o: Outlier, now: float) -> bool:
    return now < o.ejected_until


def connect_result(
    o: Outlier,
    ok: bool,
    now: float,
    consecutive_limit: int,
    base_ejection: float,
    max_ejection: float,
) -> Outlier:
    """Fold one connection attempt's outcome into the outlier state (see the module docstring)."""
    if consecutive_limit < 1:
        raise ValueError(f"consecutive_limit must be >= 1, got {consecutive_limit}")
    if base_ejection < 0 or max_ejection < base_ejection:
        raise ValueError(
            f"need 0 <= base_ejection <= max_ejection, got {base_ejection} and {max_ejection}"
        )
    ejected = is_ejected(o, now)
    if ok:
        if not ejected and o.ejections > 0 and now - o.last_ejection_end >= max_ejection:
            return replace(
                o, consecutive_failures=0, ejections=o.ejections - 1, last_ejection_end=now
            )
        return replace(o, consecutive_failures=0)
    if ejected:
        return o
    failures = o.consecutive_failures + 1
    if failures < consecutive_limit:
        return replace(o, consecutive_failures=failures)
    # Cap the exponent too, so a long history cannot overflow the float.
    duration = min(base_ejection * 2 ** min(o.ejections, 64), max_ejection)
    until = now + duration
    return Outlier(
        consecutive_failures=0,
        ejections=o.ejections + 1,
        ejected_until=until,
        last_ejection_end=until,
    )


def routable(active: ActiveHealth, outlier: Outlier, now: float) -> bool:
    """Not UNHEALTHY (UNKNOWN counts as routable) and not ejected."""
    return active.state is not HealthState.UNHEALTHY and not is_ejected(outlier, now)


class Wait(StrEnum):
    QUIET = "quiet"  # the client has sent the upstream nothing yet
    WAITING = "waiting"  # the client spoke; no answer yet
    ANSWERED = "answered"  # the upstream sent bytes (final)
    TIMED_OUT = "timed_out"  # nothing came back within the timeout (final)


@dataclass(frozen=True)
class Response:
    """Response-timeout state of one relayed connection (see the module docstring)."""

    wait: Wait = Wait.QUIET
    deadline: float | None = None  # set while WAITING


def client_sent(r: Response, now: float, timeout: float) -> Response:
    """The client's bytes reached the upstream at ``now``: the first ones start the clock."""
    if timeout <= 0:
        raise ValueError(f"response timeout must be > 0, got {timeout}")
    if r.wait is Wait.QUIET:
        return Response(Wait.WAITING, now + timeout)
    return r


def upstream_sent(r: Response) -> Response:
    """The upstream sent bytes: answered, unless the verdict is already in."""
    if r.wait in (Wait.QUIET, Wait.WAITING):
        return Response(Wait.ANSWERED)
    return r


def expire(r: Response, now: float) -> Response:
    """The clock says ``now``: WAITING past its deadline times out; anything else stays."""
    if r.wait is Wait.WAITING and r.deadline is not None and now >= r.deadline:
        return Response(Wait.TIMED_OUT)
    return r


def response_verdict(r: Response) -> bool | None:
    """The connection's result for outlier detection: True, False, or None (no result)."""
    if r.wait is Wait.ANSWERED:
        return True
    if r.wait is Wait.TIMED_OUT:
        return False
    return None


# ---------------------------------------------------------------------------------------------
# The health book


MAX_EVENTS = 256  # transitions held between two drains; beyond that the oldest are dropped


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """A target's routability changed. kind: "unhealthy" (after `count` failed checks/probes),
    "healthy" (again, after `count` good ones; a first success from UNKNOWN is not an event),
    "ejected" (after `count` failed connects, until `until`), "returned" (its ejection ran out,
    at `at` = the ejection's end)."""

    key: str
    kind: str
    at: float
    count: int = 0
    until: float = 0.0


def bounded_append(items: list[Any], item: Any) -> int:
    """Append, dropping the oldest beyond MAX_EVENTS; returns how many were dropped."""
    items.append(item)
    if len(items) > MAX_EVENTS:
        del items[0]
        return 1
    return 0


_UNKNOWN = ActiveHealth()  # the state of a key never probed
_CLEAN = Outlier(ejected_until=float("-inf"))  # of a key that never failed a connect


class HealthBook:
    """The health machines of every target key and what changed (see "The health book")."""

    def __init__(self, rules: OutlierPolicy) -> None:
        self.rules = rules
        self.active: dict[str, ActiveHealth] = {}
        self.outlier: dict[str, Outlier] = {}
        self.version = 0
        self.on_change: list[Callable[[str], None]] = []
        self.events: list[HealthEvent] = []  # since the last take_events
        self.dropped = 0  # events lost to the MAX_EVENTS bound
        self._ejected: dict[str, float] = {}  # key -> ejected_until, until take_events sees it end

    def _changed(self, key: str) -> None:
        self.version += 1
        for fn in self.on_change:
            fn(key)

    def probe(
        self, key: str, ok: bool, now: float, healthy_threshold: int, unhealthy_threshold: int
    ) -> None:
        old = self.active.get(key, _UNKNOWN)
        new = probe_result(old, ok, now, healthy_threshold, unhealthy_threshold)
        self.active[key] = new
        if new.state != old.state:
            if new.state is HealthState.UNHEALTHY:
                self._event(HealthEvent(key, "unhealthy", now, unhealthy_threshold))
            elif old.state is HealthState.UNHEALTHY:
                self._event(HealthEvent(key, "healthy", now, healthy_threshold))
            self._changed(key)

    def connect(self, key: str, ok: bool, now: float) -> None:
        r = self.rules
        old = self.outlier.get(key)
        if ok and (old is None or (old.consecutive_failures == 0 and old.ejections == 0)):
            return  # the hot path: connect_result would give back the same clean state
        old = old or Outlier()
        new = connect_result(old, ok, now, r.consecutive_failures, r.base_ejection, r.max_ejection)
        self.outlier[key] = new
        if new.ejected_until != old.ejected_until:
            self._ejected[key] = new.ejected_until
            self._event(HealthEvent(key, "ejected", now, r.consecutive_failures, new.ejected_until))
            self._changed(key)

    def _event(self, ev: HealthEvent) -> None:
        self.dropped += bounded_append(self.events, ev)

    def take_events(self, now: float) -> list[HealthEvent]:
        """The transitions since the last call, oldest first, with a "returned" event for every
        ejection that has run out by `now`."""
        for key, until in list(self._ejected.items()):
            if until <= now:
                del self._ejected[key]
                self._event(HealthEvent(key, "returned", until))
        out, self.events = self.events, []
        return out

    def state(self, key: str) -> HealthState:
        return self.active.get(key, _UNKNOWN).state

    def routable(self, key: str, now: float) -> bool:
        """health.routable of the key's two machines (never probed, never failed: routable)."""
        return routable(self.active.get(key, _UNKNOWN), self.outlier.get(key, _CLEAN), now)

    def ejected_until(self, key: str) -> float:
        o = self.outlier.get(key)
        return o.ejected_until if o is not None else 0.0

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for d in (self.active, self.outlier, self._ejected):
            for k in [k for k in d if k not in keep]:
                del d[k]

    def snapshot(self, now: float) -> dict[str, Any]:
        keys = sorted(set(self.active) | set(self.outlier))
        return {
            k: {
                "state": str(self.state(k)),
                "ejected_for": round(max(0.0, self.ejected_until(k) - now), 3),
                "routable": self.routable(k, now),
            }
            for k in keys
        }
