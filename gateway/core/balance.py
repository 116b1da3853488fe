"""Pure load balancing: locality tiers, failover with hysteresis, and the connect-attempt order.

Theory of operation
-------------------
Failover is data. The shell turns the catalog and health state into ``Target`` values (local
endpoints and remote cluster gateways, each with a locality, a weight and a ``healthy`` flag),
and this module decides, with no I/O, clock or randomness of its own (``now`` and ``random`` are
passed in), where a new client connection should go.

Tiers (``build_tiers``)

- The tier kinds, relative to the caller's locality, nest: ``cluster`` (the caller's own
  cluster) within ``zone`` (same region and zone) within ``region`` (same region) within ``any``.
- ``FailoverPolicy.tiers`` (federation/model.py) lists the kinds in priority order (default:
  all four, best first). Each target goes to the FIRST listed kind whose predicate it
  satisfies; so with the default order ``zone`` effectively holds the other clusters of the
  caller's zone, ``region`` the other zones, and ``any`` the other regions. A target matching
  no listed kind is dropped: tiers ``("cluster", "region")`` never use other regions.
- ``any`` is split by ``FailoverPolicy.region_preference``: one tier ``any:<region>`` per listed
  region, in the listed order, then ``any`` for the rest.
- Empty tiers are omitted. Inside a tier, targets are sorted by key (deterministic output).
- A tier is *eligible* when it has at least one healthy target.

Failover (``advance``; call it on every health change and on a timer, e.g. every second)

- ``since[t]`` is the ``now`` at which tier ``t`` became eligible, as observed by successive
  ``advance`` calls; it is absent while ``t`` is not eligible, and any ineligible observation
  restarts it.
- Let B be the best (first) eligible tier.
- No active tier, or the active tier is gone or no longer eligible: switch to B at once.
  Failing over is immediate.
- A tier better than the active one takes over only once it has been eligible continuously for
  ``failback_after`` seconds. Failing back has hysteresis: a tier flapping faster than
  ``failback_after`` never pulls traffic back. If several better tiers qualify, the best of them
  wins; if B is still waiting but a tier between B and the active one qualifies, that one is
  taken (it is better than the active tier and trusted).
- Nothing eligible (panic): the active tier becomes the best tier overall, and traffic is tried
  anyway on unhealthy targets (health may be wrong; refusing all traffic certainly is). As soon
  as any tier becomes eligible, the rule "active no longer eligible" moves there at once.
- No tiers at all: active is None.
- ``switched_at`` is the ``now`` of the last change of ``active``.

Connect attempts for one client connection (``plan``)

1. the healthy targets of the active tier, in weighted random order: the first is a weighted
   random pick (probability weight / total weight), the next one is picked the same way among
   the rest, and so on;
2. the healthy targets of every other tier, in tier order (better tiers still waiting out
   ``failback_after`` included: they are healthy, just not yet trusted with first picks), each
   tier in weighted random order;
3. last resort (panic): the unhealthy targets, in the same tier sequence (active first, then the
   others in tier order), each tier in weighted random order.

The list is truncated to ``max_attempts`` and never holds a target key twice. ``random`` is
called once per pick among two or more candidates, and never after the list is full.

The hot path's forms (a router plans once per new connection; tests/gateway/core/
test_balance_cache.py proves them equal to the plain ones)

- ``plan_groups(tiers, state)``: the candidate groups of ``plan`` in order (steps 1-3, each
  group without the keys of earlier groups, first entry per key), computed once per
  (tiers, state); ``draw(groups, random, max_attempts)`` then returns exactly ``plan``'s list,
  with the same calls to ``random``. ``plan`` draws every group fully or fills the list and
  stops, so the keys it has seen before a group are exactly those of the earlier groups.
- ``is_fixed_point(state, tiers)``: for a ``state`` that ``advance`` returned over these same
  tiers, True when ``advance(state, tiers, now, policy)`` returns ``state`` again for every
  ``now`` (so the call can be skipped until the tiers change): ``since`` then holds exactly the
  eligible tiers, and nothing can move ``active``: it is already the best eligible tier (no
  failback pending), or the panic choice (best tier) with none eligible, or None without tiers.
  While a better tier waits out ``failback_after``, it is False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from federation.model import FailoverPolicy, Locality, TierKind

__all__ = [
    "Target",
    "Tier",
    "FailoverState",
    "build_tiers",
    "advance",
    "plan",
    "plan_groups",
    "draw",
    "is_fixed_point",
    "describe",
]

@dataclass(frozen=True)
class Target:
    """One place a connection can go: a local endpoint or a remote cluster's gateway."""

    key: str  # unique, e.g. "local:127.0.0.1:9001" or "remote:east-2"
    locality: Locality
    host: str
    port: int
    weight: int  # >= 1 (for a remote cluster: sum of its healthy endpoint weights)
    healthy: bool  # computed by the shell from health + leases + probes
    remote: bool

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"target {self.key!r}: weight must be >= 1, got {self.weight}")


@dataclass(frozen=True)
class Tier:
    name: str  # "cluster", "zone", "region", "any" or "any:us-west" when split by preference
    targets: tuple[Target, ...]

    @property
    def eligible(self) -> bool:
        """Has at least one healthy target."""
        return any(t.healthy for t in self.targets)


def _matches(kind: TierKind, loc: Locality, caller: Locality) -> bool:
    if kind is TierKind.CLUSTER:
        return loc.cluster == caller.cluster
    if kind is TierKind.ZONE:
        return loc.region == caller.region and loc.zone == caller.zone
    if kind is TierKind.REGION:
        return loc.region == caller.region
    return True  # TierKind.ANY


def build_tiers(
    targets: Iterable[Target], caller: Locality, policy: FailoverPolicy
) -> tuple[Tier, ...]:
    """Group targets into priority tiers for this caller (see the module docstring)."""
    buckets: dict[str, list[Target]] = {}
    order: list[str] = []
    for kind in policy.tiers:
        if kind is TierKind.ANY:
            order.extend(f"any:{r}" for r in policy.region_preference)
        order.append(kind.value)
    for name in order:
        buckets[name] = []
    seen: set[str] = set()
    for t in targets:
        if t.key in seen:
            raise ValueError(f"target key {t.key!r} appears twice")
        seen.add(t.key)
        for kind in policy.tiers:
            if _matches(kind, t.locality, caller):
                name = kind.value
                if kind is TierKind.ANY and t.locality.region in policy.region_preference:
                    name = f"any:{t.locality.region}"
                buckets[name].append(t)
                break
    return tuple(
        Tier(name, tuple(sorted(buckets[name], key=lambda t: t.key)))
        for name in order
        if buckets[name]
    )


def _frozen(d: dict[str, float]) -> Mapping[str, float]:
    return MappingProxyType(d)


@dataclass(frozen=True)
class FailoverState:
    active: str | None = None  # name of the tier traffic goes to now
    # tier name -> time it became continuously eligible (absent when not eligible)
    since: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    switched_at: float | None = None


def advance(
    state: FailoverState, tiers: Sequence[Tier], now: float, policy: FailoverPolicy
) -> FailoverState:
    """Observe the tiers at ``now``; return the next failover state (see the module docstring)."""
    since = {t.name: state.since.get(t.name, now) for t in tiers if t.eligible}
    names = [t.name for t in tiers]
    eligible = [t.name for t in tiers if t.eligible]

    if not names:
        active = None
    elif not eligible:
        active = names[0]  # panic: try the best tier anyway
    elif state.active not in since:  # none, gone, or no longer eligible: fail over at once
        active = eligible[0]
    else:
        active = state.active
        for name in names[: names.index(state.active)]:
            if name in since and now - since[name] >= policy.failback_after:
                active = name  # fail back to the best tier that has earned trust
                break

    switched_at = now if active != state.active else state.switched_at
    return FailoverState(active=active, since=_frozen(since), switched_at=switched_at)


def is_fixed_point(state: FailoverState, tiers: Sequence[Tier]) -> bool:
    """True when ``advance(state, tiers, now, policy)`` == ``state`` for every ``now``, given
    that ``state`` came from ``advance`` over these same tiers (see the module docstring)."""
    if not tiers:
        return state.active is None
    for t in tiers:
        if t.eligible:
            return state.active == t.name
    return state.active == tiers[0].name


def _weighted_order(
    targets: Sequence[Target], random: Callable[[], float], limit: int
) -> list[Target]:
    """Up to ``limit`` targets in weighted random order, without replacement."""
    pool = list(targets)
    out: list[Target] = []
    while pool and len(out) < limit:
        if len(pool) == 1:
            out.append(pool.pop())
            break
        total = sum(t.weight for t in pool)
        r = random() * total
        acc = 0
        index = len(pool) - 1  # guards against float edge cases (r == total)
        for i, t in enumerate(pool):
            acc += t.weight
            if r < acc:
                index = i
                break
        out.append(pool.pop(index))
    return out


def _active_first(tiers: Sequence[Tier], state: FailoverState) -> list[Tier]:
    ordered = list(tiers)
    for i, t in enumerate(ordered):
        if t.name == state.active:
            ordered.insert(0, ordered.pop(i))
            break
    return ordered


def plan(
    tiers: Sequence[Tier],
    state: FailoverState,
    random: Callable[[], float],
    max_attempts: int,
) -> list[Target]:
    """The ordered connect attempts for one client connection (see the module docstring)."""
    ordered = _active_first(tiers, state)
    out: list[Target] = []
    seen: set[str] = set()
    for want_healthy in (True, False):
        for tier in ordered:
            room = max_attempts - len(out)
            if room <= 0:
                return out
            candidates = [
                t for t in tier.targets if t.healthy is want_healthy and t.key not in seen
            ]
            # Several entries with one key (hand-built tiers): keep the first.
            unique: dict[str, Target] = {}
            for t in candidates:
                unique.setdefault(t.key, t)
            for t in _weighted_order(list(unique.values()), random, room):
                seen.add(t.key)
                out.append(t)
    return out


Groups = tuple[tuple[Target, ...], ...]


def plan_groups(tiers: Sequence[Tier], state: FailoverState) -> Groups:
    """``plan``'s candidate groups, in order, for ``draw`` (see the module docstring)."""
    groups: list[tuple[Target, ...]] = []
    seen: set[str] = set()
    ordered = _active_first(tiers, state)
    for want_healthy in (True, False):
        for tier in ordered:
            unique: dict[str, Target] = {}
            for t in tier.targets:
                if t.healthy is want_healthy and t.key not in seen:
                    unique.setdefault(t.key, t)
            if unique:
                groups.append(tuple(unique.values()))
                seen.update(unique)
    return tuple(groups)


def draw(groups: Groups, random: Callable[[], float], max_attempts: int) -> list[Target]:
    """``plan``'s list from ``plan_groups``: a weighted order inside each group, up to
    ``max_attempts`` in all; ``random`` is called exactly as ``plan`` calls it."""
    out: list[Target] = []
    for group in groups:
        room = max_attempts - len(out)
        if room <= 0:
            break
        if len(group) == 1:
            out.append(group[0])
        else:
            out.extend(_weighted_order(group, random, room))
    return out


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(tiers: Sequence[Tier], state: FailoverState) -> dict[str, Any]:
    """A JSON-ready view for ``/status``."""
    return {
        "active": state.active,
        "switched_at": state.switched_at,
        "panic": bool(tiers) and not any(t.eligible for t in tiers),
        "tiers": [
            {
                "name": t.name,
                "active": t.name == state.active,
                "eligible": t.eligible,
                "eligible_since": state.since.get(t.name),
                "targets": [
                    {
                        "key": x.key,
                        "address": _address(x.host, x.port),
                        "locality": str(x.locality),
                        "healthy": x.healthy,
                        "weight": x.weight,
                        "remote": x.remote,
                    }
                    for x in t.targets
                ],
            }
            for t in tiers
        ],
    }
