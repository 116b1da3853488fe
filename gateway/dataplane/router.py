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

What changed, for the operator: both report transitions as values and never log. The book
keeps `HealthEvent`s (a target turned unhealthy or healthy again by its checks or probes, was
ejected by outlier detection, or came back when the ejection ran out: `take_events(now)`
notices that), the router a `TierSwitch` whenever its active tier changes (`take_switches`).
They are made only on transitions (nothing per connection) and bounded (MAX_EVENTS; the oldest
go first, counted in `dropped`); the runtime drains and logs them on its tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from federation.model import (
    Endpoint,
    Export,
    FailoverPolicy,
    Locality,
    OutlierPolicy,
    ServiceKey,
)
from gateway.core.balance import (
    FailoverState,
    Target,
    Tier,
    _weighted_order,
    advance,
    build_tiers,
    describe,
    plan,
)
from gateway.core.health import (
    ActiveHealth,
    HealthState,
    Outlier,
    connect_result,
    is_ejected,
    probe_result,
)

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


@dataclass(frozen=True, slots=True)
class TierSwitch:
    """At `at`, a router's active tier changed (None: no tier at all), or it entered or left
    panic with the same tier (old == new). `clusters` are the clusters of the new tier's healthy
    targets; `panic`: no tier has any, so the unhealthy ones of the best tier are tried
    (balance.py), and `clusters` are theirs."""

    service: ServiceKey
    old: str | None
    new: str | None
    at: float
    clusters: tuple[str, ...] = ()
    panic: bool = False


def _bounded_append(items: list[Any], item: Any) -> int:
    """Append, dropping the oldest beyond MAX_EVENTS; returns how many were dropped."""
    items.append(item)
    if len(items) > MAX_EVENTS:
        del items[0]
        return 1
    return 0


def local_key(host: str, port: int) -> str:
    return f"local:[{host}]:{port}" if ":" in host else f"local:{host}:{port}"


def remote_key(cluster: str) -> str:
    return f"remote:{cluster}"


class HealthBook:
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
        old = self.active.get(key, ActiveHealth())
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
        self.dropped += _bounded_append(self.events, ev)

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


class Router:
    """Candidates, tiers and failover state of one service, as seen by one caller."""

    def __init__(
        self,
        service: ServiceKey,
        caller: Locality,
        policy: FailoverPolicy,
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
        self.local: tuple[Endpoint, ...] = ()  # as configured: `healthy` is the book's to say
        self.remote: tuple[tuple[Locality, Export], ...] = ()
        self.tiers: tuple[Tier, ...] = ()
        self.state = FailoverState()
        self._built_version = -1
        self._next_expiry = float("inf")
        self._advanced: tuple[Tier, ...] | None = None  # the tiers `state` is a fixed point of
        self._groups_for: tuple[Any, Any] = (None, None)  # (tiers, state) of _groups
        self._groups: tuple[tuple[Target, ...], ...] = ()
        self.switches: list[TierSwitch] = []  # since the last take_switches
        self.dropped = 0
        self._panic = False  # of the last reported switch
        self._panic_of: tuple[Tier, ...] | None = None  # the tiers _panic_now was computed for
        self._panic_now = False

    def set_local(self, endpoints: Sequence[Endpoint]) -> None:
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
        old = self.state.active
        self.state = state = advance(self.state, tiers, now, self.policy)
        self._advanced = tiers if _fixed_point(state, tiers) else None
        if self._panic_of is not tiers:  # once per rebuild, not per plan while failback waits
            self._panic_of = tiers
            self._panic_now = bool(tiers) and not any(t.eligible for t in tiers)
        if state.active != old or self._panic_now != self._panic:
            self._panic = self._panic_now
            self._switched(old, state.active, tiers, now)

    def _switched(self, old: str | None, new: str | None, tiers: tuple[Tier, ...],
                  now: float) -> None:
        tier = next((t for t in tiers if t.name == new), None)
        panic = self._panic
        targets = tier.targets if tier is not None else ()
        clusters = tuple(sorted({t.locality.cluster for t in targets if t.healthy or panic}))
        switch = TierSwitch(self.service, old, new, now, clusters, panic)
        self.dropped += _bounded_append(self.switches, switch)

    def take_switches(self) -> list[TierSwitch]:
        """The active-tier changes since the last call, oldest first."""
        out, self.switches = self.switches, []
        return out

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


def _plan_from_groups(
    groups: tuple[tuple[Target, ...], ...], random: Callable[[], float], limit: int
) -> list[Target]:
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
