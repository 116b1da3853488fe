"""Pure health state machines for one endpoint: active probes and passive outlier detection.

Theory of operation
-------------------
Every endpoint (or remote cluster gateway) a gateway may send traffic to carries two small,
independent state machines. Both are frozen values; every function returns a new value. The
clock is passed in as ``now`` (monotonic seconds); nothing here sleeps, reads a clock or does I/O.

Active health (``ActiveHealth``, fed by ``probe_result`` after each TCP connect / HTTP GET probe)

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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = [
    "HealthState",
    "ActiveHealth",
    "probe_result",
    "Outlier",
    "connect_result",
    "is_ejected",
    "routable",
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
