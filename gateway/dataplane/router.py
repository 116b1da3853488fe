"""Per-service routers: where the pure core meets live state, as a thin cache over it.

A `Router` holds the candidates of one service (our own endpoints of it, and the remote
clusters that export it), turns them into `Target`s with a `healthy` flag from the health book
(core/health.py's `HealthBook`), groups them into tiers (balance.build_tiers), keeps the
failover state (balance.advance) and answers `plan()` with the ordered connect attempts for one
connection.

Nothing here does I/O or reads a clock of its own: the clock and randomness are injected, so the
runtime and tests drive the same code. Tiers are rebuilt only when the book's version, the
candidates, or an ejection deadline changed; `advance` runs on each plan and on `tick()`.

`plan()` runs once per new connection, so it uses the core's cached forms (balance.py, "The hot
path's forms"): `advance` is skipped while `balance.is_fixed_point` says its result cannot
change, and `balance.plan_groups` is computed once per (tiers, state); each plan then only
`balance.draw`s from those groups: the same list, and the same calls to `random`, as
`balance.plan` (tests/gateway/core/test_balance_cache.py checks it, through this router too).

What changed, for the operator: the router reports a `TierSwitch` whenever its active tier
changes (`take_switches`), made only on transitions (nothing per connection) and bounded
(MAX_EVENTS; the oldest go first, counted in `dropped`); the runtime drains and logs them, with
the book's `HealthEvent`s, on its tick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from federation.model import Endpoint, Export, FailoverPolicy, Locality, ServiceKey
from gateway.core.balance import (
    FailoverState,
    Groups,
    Target,
    Tier,
    advance,
    build_tiers,
    describe,
    draw,
    is_fixed_point,
    plan,
    plan_groups,
)
from gateway.core.health import HealthBook, bounded_append


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


def local_key(host: str, port: int) -> str:
    return f"local:[{host}]:{port}" if ":" in host else f"local:{host}:{port}"


def remote_key(cluster: str) -> str:
    return f"remote:{cluster}"


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
        self._groups: Groups = ()
        self.switches: list[TierSwitch] = []  # since the last take_switches
        self.dropped = 0
        self._panic = False  # of the last reported switch
        self._panic_of: tuple[Tier, ...] | None = None  # the tiers _panic_now was computed for
        self._panic_now = False

    def set_local(self, endpoints: Sequence[Endpoint]) -> None:
        self.local = tuple(endpoints)
        self._built_version = -1

    def set_policy(self, policy: FailoverPolicy) -> None:
        """A reloaded failover policy: the next plan (new connections) follows it."""
        self.policy = policy
        self._built_version = -1
        self._advanced = None

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
            return  # advance(state, tiers, now) == state for any now (is_fixed_point)
        old = self.state.active
        self.state = state = advance(self.state, tiers, now, self.policy)
        self._advanced = tiers if is_fixed_point(state, tiers) else None
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
        self.dropped += bounded_append(self.switches, switch)

    def take_switches(self) -> list[TierSwitch]:
        """The active-tier changes since the last call, oldest first."""
        out, self.switches = self.switches, []
        return out

    def plan(self) -> list[Target]:
        """balance.plan(tiers, state, random, max_attempts), drawn from cached groups."""
        self.tick()
        tiers, state = self.tiers, self.state
        f_tiers, f_state = self._groups_for
        if f_tiers is not tiers or f_state is not state:
            self._groups = plan_groups(tiers, state)
            self._groups_for = (tiers, state)
        return draw(self._groups, self.random, self.policy.max_attempts)

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

