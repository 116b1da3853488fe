"""Why would the next connection go there? A pure explanation of one import's routing now.

Theory of operation
-------------------
The router (dataplane/router.py) keeps, per imported service, the candidates it was given, the
tiers ``balance.build_tiers`` made of them and the ``FailoverState`` ``balance.advance`` keeps.
``explain`` reads the same values (nothing is recomputed by other rules: the order is
``balance.plan_groups`` itself) and says, for each candidate, where it stands and why:

Candidates the router never got (``excluded``, from the catalog; the shell's filter in
runtime.py ``_remote_of`` says the same in code):

    lease-expired         the cluster exports the service but holds no lease at the federation
                          (its endpoints are withdrawn everywhere)
    not-allowed           the export's ``allowed_consumers`` does not name us
    no-gateway            the catalog has no usable record or bundle of that cluster's gateway

Candidates the router got but no tier holds:

    no-tier               its locality matches none of the import's ``failover.tiers``

Candidates in a tier, in the order the next connection tries them (``plan_groups``: the
healthy targets of the active tier, then the healthy ones of the other tiers in tier order,
then every unhealthy one as a last resort; a weighted random draw inside each group), each
unhealthy one with what made it so:

    check-unhealthy       its active health check (local endpoint) is UNHEALTHY
    peer-probe-failed     the probe of that cluster's gateway is UNHEALTHY
    ejected               outlier detection ejected it after failed connects, until ``until``
    no-healthy-endpoints  the remote cluster publishes the export with no healthy endpoint

and what keeps a healthy one behind:

    tier-not-active       its tier is not the active one (tried after the active tier's)
    failback-wait         its tier is better than the active one but has been eligible for
                          less than ``failback_after``: it takes over at ``takes_over_at``
    beyond-max-attempts   the group starts at or after ``max_attempts``: never tried;
                          a group straddling the limit is ``partial`` (the draw picks some)

``Health`` carries each key's two machines as the HealthBook has them; ``now`` is the book's
clock (monotonic), and ``until``/``takes_over_at`` are on that clock too: the shell adds
``*_in`` seconds for people. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from federation.model import Catalog, FailoverPolicy, Locality, ServiceKey
from gateway.core.balance import FailoverState, Target, Tier, plan_groups
from gateway.core.health import HealthState

__all__ = ["Health", "Excluded", "Candidate", "Why", "explain", "excluded", "REASONS"]

REASONS = (
    "lease-expired", "not-allowed", "no-gateway", "no-tier", "check-unhealthy",
    "peer-probe-failed", "ejected", "no-healthy-endpoints", "tier-not-active", "failback-wait",
    "beyond-max-attempts",
)


@dataclass(frozen=True, slots=True)
class Health:
    """A target's health inputs: the active check (or peer probe) state, outlier ejection."""

    check: HealthState = HealthState.UNKNOWN
    ejected_until: float = 0.0
    consecutive_failures: int = 0


@dataclass(frozen=True, slots=True)
class Excluded:
    """A cluster exporting the service that the router never got as a candidate."""

    cluster: str
    reason: str  # lease-expired | not-allowed | no-gateway


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str
    cluster: str
    locality: str
    tier: str | None  # None: in no tier
    healthy: bool
    weight: int
    health: Health
    position: int | None  # first attempt slot of its group (1-based); None: not tried
    group: int | None  # 1-based group of plan_groups
    share: float  # chance to be first of its group (weight / group weight)
    reasons: tuple[str, ...]  # from REASONS
    partial: bool = False  # its group straddles max_attempts: the draw may leave it out
    until: float | None = None  # ejected until (book clock)
    takes_over_at: float | None = None  # failback-wait: when its tier takes over


@dataclass(frozen=True)
class Why:
    service: str
    caller: str
    active: str | None
    panic: bool
    max_attempts: int
    failback_after: float
    tiers: tuple[dict[str, Any], ...]
    candidates: tuple[Candidate, ...]
    excluded: tuple[Excluded, ...] = field(default=())

    def to_json(self, now: float) -> dict[str, Any]:
        """JSON for /why: book-clock times become seconds from `now`."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, t - now), 3)

        return {
            "service": self.service,
            "from": self.caller,
            "active_tier": self.active,
            "panic": self.panic,
            "max_attempts": self.max_attempts,
            "failback_after": self.failback_after,
            "tiers": list(self.tiers),
            "order": [c.key for c in sorted(
                (c for c in self.candidates if c.position is not None),
                key=lambda c: (c.group, -c.share, c.key))],
            "candidates": [{
                "key": c.key, "cluster": c.cluster, "locality": c.locality, "tier": c.tier,
                "healthy": c.healthy, "weight": c.weight,
                "check": str(c.health.check),
                "consecutive_failures": c.health.consecutive_failures,
                "ejected_for": rel(c.until),
                "group": c.group, "position": c.position, "share": round(c.share, 4),
                "partial": c.partial,
                "reasons": list(c.reasons),
                "takes_over_in": rel(c.takes_over_at),
            } for c in self.candidates],
            "excluded": [{"cluster": e.cluster, "reasons": [e.reason]} for e in self.excluded],
        }


def excluded(catalog: Catalog, service: ServiceKey, me: str,
             gateways: Mapping[str, object]) -> tuple[Excluded, ...]:
    """Clusters exporting `service` whose export the router does not get, and why (the first
    reason that applies, in the order the shell filters: lease, consumer list, gateway)."""
    out = []
    for e in sorted(catalog.exports.values(), key=lambda e: e.cluster):
        if e.service != service or e.cluster == me:
            continue
        if e.cluster not in catalog.live:
            out.append(Excluded(e.cluster, "lease-expired"))
        elif not e.allows(me):
            out.append(Excluded(e.cluster, "not-allowed"))
        elif e.cluster not in gateways:
            out.append(Excluded(e.cluster, "no-gateway"))
    return tuple(out)


def _unhealthy(t: Target, h: Health, healthy_weight: int | None, now: float) -> list[str]:
    out = []
    if h.check is HealthState.UNHEALTHY:
        out.append("peer-probe-failed" if t.remote else "check-unhealthy")
    if now < h.ejected_until:
        out.append("ejected")
    if t.remote and healthy_weight is not None and healthy_weight <= 0:
        out.append("no-healthy-endpoints")
    return out


def explain(
    service: ServiceKey,
    caller: Locality,
    policy: FailoverPolicy,
    candidates: Sequence[Target],
    tiers: Sequence[Tier],
    state: FailoverState,
    health: Mapping[str, Health],
    now: float,
    healthy_weight: Mapping[str, int] | None = None,
    dropped: Sequence[Excluded] = (),
) -> Why:
    """The explanation of the router's current view (see the module docstring).
    `candidates`: what the router built its tiers from; `healthy_weight`: per remote key, the
    healthy weight its cluster publishes (for no-healthy-endpoints)."""
    weights = healthy_weight or {}
    tier_of = {t.key: tier.name for tier in tiers for t in tier.targets}
    names = [tier.name for tier in tiers]
    active = state.active
    # where each key stands in the plan: group index, first slot, share inside its group
    slot: dict[str, tuple[int, int, float, bool, bool]] = {}
    start = 1
    for g, group in enumerate(plan_groups(tiers, state), 1):
        total = sum(t.weight for t in group)
        beyond = start > policy.max_attempts
        partial = not beyond and start + len(group) - 1 > policy.max_attempts
        for t in group:
            slot[t.key] = (g, start, t.weight / total, beyond, partial)
        start += len(group)
    out = []
    for t in candidates:
        h = health.get(t.key, Health())
        tier = tier_of.get(t.key)
        reasons: list[str] = []
        takes_over = None
        position = group = None
        share, partial = 0.0, False
        if tier is None:
            reasons.append("no-tier")
        else:
            if not t.healthy:
                reasons += _unhealthy(t, h, weights.get(t.key), now)
            elif tier != active:
                reasons.append("tier-not-active")
                if active in names and names.index(tier) < names.index(active):
                    since = state.since.get(tier)
                    if since is not None:
                        reasons.append("failback-wait")
                        takes_over = since + policy.failback_after
            g, first, share, beyond, partial = slot[t.key]
            if beyond:
                reasons.append("beyond-max-attempts")
            else:
                position, group = first, g
        out.append(Candidate(
            key=t.key, cluster=t.locality.cluster, locality=str(t.locality), tier=tier,
            healthy=t.healthy, weight=t.weight, health=h, position=position, group=group,
            share=share if position is not None else 0.0, reasons=tuple(reasons), partial=partial,
            until=h.ejected_until if "ejected" in reasons else None, takes_over_at=takes_over,
        ))
    tier_rows = tuple({
        "name": tier.name, "active": tier.name == active, "eligible": tier.eligible,
        "targets": [t.key for t in tier.targets],
    } for tier in tiers)
    return Why(
        service=str(service), caller=str(caller), active=active,
        panic=bool(tiers) and not any(tier.eligible for tier in tiers),
        max_attempts=policy.max_attempts, failback_after=policy.failback_after,
        tiers=tier_rows, candidates=tuple(out), excluded=tuple(dropped),
    )
