"""The hot path's forms of balance.py ("The hot path's forms"): plan_groups + draw equal plan
(the same lists, the same calls to `random`), and is_fixed_point only says True where advance
really cannot move the state any more. The router's use of them is checked over time in
tests/gateway/dataplane/test_router.py."""

from __future__ import annotations

import random as _random

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.model import FailoverPolicy, Locality
from gateway.core import balance
from gateway.core.balance import Target


def _counting(seed: int):
    rng = _random.Random(seed)
    calls = []

    def draw() -> float:
        calls.append(1)
        return rng.random()

    return draw, calls


def test_plan_from_cached_groups_equals_balance_plan_on_hand_built_tiers():
    rng = _random.Random(7)
    locs = [Locality("r1", "z1", "c1"), Locality("r1", "z2", "c2"), Locality("r2", "z1", "c3")]
    for case in range(3000):
        tiers = []
        for ti in range(rng.randint(0, 4)):
            targets = tuple(
                Target(f"k{rng.randint(0, 6)}", rng.choice(locs), "127.0.0.1", 1000 + j,
                       rng.randint(1, 5), rng.random() < 0.6, rng.random() < 0.3)
                for j in range(rng.randint(1, 4))  # keys repeat within and across tiers
            )
            tiers.append(balance.Tier(f"t{ti}", targets))
        tiers = tuple(tiers)
        names = [t.name for t in tiers] + [None, "gone"]
        state = balance.FailoverState(active=rng.choice(names))
        limit = rng.randint(1, 6)
        seed = rng.randint(0, 10**9)
        want_rand, want_calls = _counting(seed)
        got_rand, got_calls = _counting(seed)
        want = balance.plan(tiers, state, want_rand, limit)
        got = balance.draw(balance.plan_groups(tiers, state), got_rand, limit)
        assert got == want, f"case {case}"
        assert len(got_calls) == len(want_calls), f"case {case}: random called differently"


@settings(max_examples=300, deadline=None)
@given(
    healthy=st.lists(st.lists(st.booleans(), min_size=1, max_size=3), max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.sampled_from(
        (0.0, 0.1, 0.5, 1.0, 3.0))), max_size=12),
    later=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=5),
)
def test_is_fixed_point_means_advance_cannot_move_the_state(healthy, flips, later):
    """Walk the failover state through health changes; whenever is_fixed_point says True, no
    later `now` moves it (advance returns an equal state), and whenever advance at a much later
    `now` would move it, is_fixed_point said False."""
    loc = Locality("r", "z", "c")
    policy = FailoverPolicy(failback_after=2.0)
    grid = [list(row) for row in healthy]

    def tiers() -> tuple[balance.Tier, ...]:
        return tuple(
            balance.Tier(f"t{i}", tuple(Target(f"t{i}k{j}", loc, "h", 1, 1, ok, False)
                                        for j, ok in enumerate(row)))
            for i, row in enumerate(grid)
        )

    state, now = balance.FailoverState(), 0.0
    for ti, tj, dt in [(0, 0, 0.0), *flips]:
        if grid and ti < len(grid) and tj < len(grid[ti]):
            grid[ti][tj] = not grid[ti][tj]
        now += dt
        ts = tiers()
        state = balance.advance(state, ts, now, policy)
        fixed = balance.is_fixed_point(state, ts)
        for extra in later:
            moved = balance.advance(state, ts, now + extra, policy) != state
            assert not (fixed and moved), (state, ts, extra)
        far = balance.advance(state, ts, now + 1e9, policy)
        if not fixed:
            assert far.active != state.active  # only a pending failback is not a fixed point
