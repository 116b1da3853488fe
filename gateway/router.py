"""Health bookkeeping and per-service routers: where the pure core meets live state.

`HealthBook` keeps the two health machines (health.py) of every target key — local endpoints
(`local:<host:port>`) and remote cluster gateways (`remote:<cluster>`) — and bumps a version on
every change that can alter routing. A `Router` holds the candidates of one service (our own
endpoints of it, and the remote clusters that export it), turns them into `Target`s with a
`healthy` flag, groups them into tiers (balance.build_tiers), keeps the failover state
(balance.advance) and answers `plan()` with the ordered connect attempts for one connection.

Nothing here does I/O or reads a clock of its own: the clock and randomness are injected, so the
runtime and tests drive the same code. Tiers are rebuilt only when the book's version, the
candidates, or an ejection deadline changed; `advance` runs on each plan and on `tick()`.

`plan()` runs once per new connection, so its inputs are cached: `advance` is skipped while
its result cannot change (same tiers as its last run, and the active tier already the best
eligible one: a fixed point, whatever the clock says), and the candidate groups of
`balance.plan` (per tier, healthy first, deduplicated) are computed once per (tiers, state).
Each plan then only draws the weighted random order inside each group: the same list, and
the same calls to `random`, as `balance.plan` (test_l4's plan-cache test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from federation.model import Export, Locality, ServiceKey

from .balance import (
    FailoverState,
    Policy,
    Target,
    Tier,
    _weighted_order,
    advance,
    build_tiers,
    describe,
    plan,
)
from .health import ActiveHealth, HealthState, Outlier, connect_result, is_ejected, probe_result


@dataclass(frozen=True)
class OutlierRules:
    consecutive_failures: int = 2
    base_ejection: float = 2.0
    max_ejection: float = 60.0
    response_timeout: float | None = None  # watch the first answer of local endpoints (health.py)


def local_key(host: str, port: int) -> str:
    return f"local:[{host}]:{port}" if ":" in host else f"local:{host}:{port}"


def remote_key(cluster: str) -> str:
    return f"remote:{cluster}"


class HealthBook:
    def __init__(self, rules: OutlierRules) -> None:
        self.rules = rules
        self.active: dict[str, ActiveHealth] = {}
        self.outlier: dict[str, Outlier] = {}
        self.version = 0
        self.on_change: list[Callable[[str], None]] = []

    def _changed(self, key: str) -> None:
        self.version += 1
        for fn in self.on_change:
            fn(key)

    def probe(self, key: str, ok: bool, now: float, healthy_threshold: int, unhealthy_threshold: int) -> None:
        old = self.active.get(key, ActiveHealth())
        new = probe_result(old, ok, now, healthy_threshold, unhealthy_threshold)
        self.active[key] = new
        if new.state != old.state:
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
            self._changed(key)

    def state(self, key: str) -> HealthState:
        return self.active.get(key, ActiveHealth()).state

    def routable(self, key: str, now: float) -> bool:
        if self.state(key) == HealthState.UNHEALTHY:
            return False
        o = self.outlier.get(key)
        return o is None or not is_ejected(o, now)

    def ejected_until(self, key: str) -> float:
        o = self.outlier.get(key)
        return o.ejected_until if o is not None else 0.0

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for d in (self.active, self.outlier):
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


@dataclass(frozen=True)
class LocalEndpoint:
    host: str
    port: int
    weight: int = 1


class Router:
    """Candidates, tiers and failover state of one service, as seen by one caller."""

    def __init__(
        self,
        service: ServiceKey,
        caller: Locality,
        policy: Policy,
        book: HealthBook,
        clock: Callable[[], float],
        random: Callable[[], float],
        gateway_address: Callable[[str], tuple[str, int] | None] = lambda cluster: None,
    ) -> None:
        self.service = service
        self.caller = caller
        self.policy = policy
        self.book = book
        self.clock = clock
        self.random = random
        self.gateway_address = gateway_address  # cluster -> host, port of its inbound listener
        self.local: tuple[LocalEndpoint, ...] = ()
        self.remote: tuple[tuple[Locality, Export], ...] = ()
        self.tiers: tuple[Tier, ...] = ()
        self.state = FailoverState()
        self._built_version = -1
        self._next_expiry = float("inf")
        self._advanced: tuple[Tier, ...] | None = None  # the tiers `state` is a fixed point of
        self._groups_for: tuple[Any, Any] = (None, None)  # (tiers, state) of _groups
        self._groups: tuple[tuple[Target, ...], ...] = ()

    def set_local(self, endpoints: Sequence[LocalEndpoint]) -> None:
        self.local = tuple(endpoints)
        self._built_version = -1

    def set_remote(self, exports: Sequence[tuple[Locality, Export]]) -> None:
        """Remote clusters' exports of this service (live clusters only; own cluster excluded)."""
        self.remote = tuple(exports)
        self._built_version = -1

    def targets(self, now: float) -> list[Target]:
        book = self.book
        out = [
            Target(
                key=(k := local_key(e.host, e.port)),
                locality=self.caller,
                host=e.host,
                port=e.port,
                weight=e.weight,
                healthy=book.routable(k, now),
                remote=False,
            )
            for e in self.local
        ]
        for loc, export in self.remote:
            addr = self.gateway_address(loc.cluster)
            if addr is None:
                continue
            k = remote_key(loc.cluster)
            weight = export.healthy_weight()
            out.append(
                Target(
                    key=k,
                    locality=loc,
                    host=addr[0],
                    port=addr[1],
                    weight=max(1, weight),
                    healthy=weight > 0 and book.routable(k, now),
                    remote=True,
                )
            )
        return out

    def _rebuild(self, now: float) -> None:
        targets = self.targets(now)
        self.tiers = build_tiers(targets, self.caller, self.policy)
        self._built_version = self.book.version
        expiries = [u for t in targets if (u := self.book.ejected_until(t.key)) > now]
        self._next_expiry = min(expiries, default=float("inf"))

    def tick(self) -> None:
        now = self.clock()
        if self._built_version != self.book.version or now >= self._next_expiry:
            self._rebuild(now)
        tiers = self.tiers
        if self._advanced is tiers:
            return  # advance(state, tiers, now) == state for any now (see _fixed_point)
        self.state = state = advance(self.state, tiers, now, self.policy)
        self._advanced = tiers if _fixed_point(state, tiers) else None

    def plan(self) -> list[Target]:
        """balance.plan(tiers, state, random, max_attempts), from cached groups."""
        self.tick()
        tiers, state = self.tiers, self.state
        f_tiers, f_state = self._groups_for
        if f_tiers is not tiers or f_state is not state:
            self._groups = _plan_groups(tiers, state)
            self._groups_for = (tiers, state)
        return _plan_from_groups(self._groups, self.random, self.policy.max_attempts)

    def report(self, target: Target, ok: bool) -> None:
        self.book.connect(target.key, ok, self.clock())

    @property
    def response_timeout(self) -> float | None:
        """outlier_detection.response_timeout: how long a local endpoint may stay silent after
        the client's first bytes before it counts as failed (None: not watched)."""
        return self.book.rules.response_timeout

    def describe(self) -> dict[str, Any]:
        """For /status: the tiers, the active one, and the connect attempts a new connection
        would make now (one draw of the weighted pick)."""
        self.tick()
        would = plan(self.tiers, self.state, self.random, self.policy.max_attempts)
        return {
            "service": str(self.service),
            **describe(self.tiers, self.state),
            "would_try": [t.key for t in would],
        }


def _fixed_point(state: FailoverState, tiers: tuple[Tier, ...]) -> bool:
    """True when advance(state, tiers, now) returns `state` again for every `now`, given that
    `state` came from advance over these same tiers: `since` then holds exactly the eligible
    tiers (kept as they are), and nothing can move `active`: it is already the best eligible
    tier (so no failback is pending), or the panic choice (best tier) with none eligible, or
    None without tiers. While a better tier waits out failback_after, this is False."""
    if not tiers:
        return state.active is None
    for t in tiers:
        if t.eligible:
            return state.active == t.name
    return state.active == tiers[0].name


def _plan_groups(tiers: tuple[Tier, ...], state: FailoverState) -> tuple[tuple[Target, ...], ...]:
    """balance.plan's candidate groups, in order: healthy targets of the active tier, of the
    other tiers in tier order, then the unhealthy ones the same way; each without keys seen in
    an earlier group, first entry per key. balance.plan draws each group fully (or fills the
    list and stops), so the keys it has seen before a group are exactly the earlier groups'."""
    ordered = list(tiers)
    for i, t in enumerate(ordered):
        if t.name == state.active:
            ordered.insert(0, ordered.pop(i))
            break
    groups: list[tuple[Target, ...]] = []
    seen: set[str] = set()
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


def _plan_from_groups(groups: tuple[tuple[Target, ...], ...], random: Callable[[], float], limit: int) -> list[Target]:
    """balance.plan's list from its groups (_plan_groups): a weighted order inside each group,
    up to `limit` in all; `random` is called exactly as balance.plan calls it."""
    out: list[Target] = []
    for group in groups:
        room = limit - len(out)
        if room <= 0:
            break
        if len(group) == 1:
            out.append(group[0])
        else:
            out.extend(_weighted_order(group, random, room))  # type: ignore[arg-type]
    return out
