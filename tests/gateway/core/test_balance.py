"""Tables and properties for tiers, failover with hysteresis, and connect-attempt plans."""

from __future__ import annotations

import json
from collections import Counter
from itertools import cycle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.model import FailoverPolicy, Locality, TierKind
from gateway.core.balance import (
    FailoverState,
    Target,
    Tier,
    advance,
    build_tiers,
    describe,
    plan,
)

CALLER = Locality("us-east", "a", "east-1")


def tgt(key: str, loc: str = "us-east/a/east-1", healthy: bool = True, weight: int = 1) -> Target:
    region, zone, cluster = loc.split("/")
    remote = cluster != CALLER.cluster
    return Target(key, Locality(region, zone, cluster), "10.0.0.1", 9000, weight, healthy, remote)


# One target per locality flavour, relative to CALLER.
OWN = tgt("a-own", "us-east/a/east-1")
SAME_ZONE = tgt("b-zone", "us-east/a/east-3")
SAME_REGION = tgt("c-region", "us-east/b/east-2")
WEST = tgt("d-west", "us-west/a/west-1")
EU = tgt("e-eu", "eu-central/a/eu-1")
ALL = (WEST, EU, SAME_REGION, SAME_ZONE, OWN)


def layout(tiers) -> list[tuple[str, list[str]]]:
    return [(t.name, [x.key for x in t.targets]) for t in tiers]


# --- build_tiers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, expected",
    [
        (
            FailoverPolicy(),
            [
                ("cluster", ["a-own"]),
                ("zone", ["b-zone"]),
                ("region", ["c-region"]),
                ("any", ["d-west", "e-eu"]),
            ],
        ),
        (
            FailoverPolicy(region_preference=("us-west",)),
            [
                ("cluster", ["a-own"]),
                ("zone", ["b-zone"]),
                ("region", ["c-region"]),
                ("any:us-west", ["d-west"]),
                ("any", ["e-eu"]),
            ],
        ),
        (
            FailoverPolicy(region_preference=("eu-central", "us-west")),
            [
                ("cluster", ["a-own"]),
                ("zone", ["b-zone"]),
                ("region", ["c-region"]),
                ("any:eu-central", ["e-eu"]),
                ("any:us-west", ["d-west"]),
            ],  # "any" for the rest is empty, so omitted
        ),
        (
            FailoverPolicy(region_preference=("ap-south",)),  # preferred region without targets
            [
                ("cluster", ["a-own"]),
                ("zone", ["b-zone"]),
                ("region", ["c-region"]),
                ("any", ["d-west", "e-eu"]),
            ],
        ),
        (
            FailoverPolicy(tiers=("cluster", "region")),  # other regions are never used
            [("cluster", ["a-own"]), ("region", ["b-zone", "c-region"])],
        ),
        (FailoverPolicy(tiers=("cluster",)), [("cluster", ["a-own"])]),
        (
            FailoverPolicy(tiers=("zone", "any")),  # own cluster shares the zone tier
            [("zone", ["a-own", "b-zone"]), ("any", ["c-region", "d-west", "e-eu"])],
        ),
        (
            FailoverPolicy(tiers=("any",)),
            [("any", ["a-own", "b-zone", "c-region", "d-west", "e-eu"])],
        ),
        (
            # Predicates nest: listing a wider kind first swallows the narrower ones.
            FailoverPolicy(tiers=("region", "cluster")),
            [("region", ["a-own", "b-zone", "c-region"])],
        ),
    ],
)
def test_build_tiers_table(policy, expected):
    assert layout(build_tiers(ALL, CALLER, policy)) == expected


def test_build_tiers_empty_and_sorted():
    assert build_tiers([], CALLER, FailoverPolicy()) == ()
    tiers = build_tiers([tgt("z"), tgt("m"), tgt("a")], CALLER, FailoverPolicy())
    assert layout(tiers) == [("cluster", ["a", "m", "z"])]


def test_build_tiers_same_cluster_name_other_zone_is_still_cluster():
    # Tier membership of "cluster" is by cluster name alone.
    tiers = build_tiers([tgt("x", "us-east/a/east-1")], CALLER, FailoverPolicy())
    assert layout(tiers)[0][0] == "cluster"


def test_build_tiers_rejects_duplicate_keys():
    with pytest.raises(ValueError, match="twice"):
        build_tiers([tgt("a"), tgt("a")], CALLER, FailoverPolicy())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tiers": ("cluster", "planet")},
        {"tiers": ("zone", "zone")},
        {"region_preference": ("us-west", "us-west")},
        {"failback_after": -1.0},
        {"max_attempts": 0},
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        FailoverPolicy(**kwargs)


def test_target_weight_must_be_positive():
    with pytest.raises(ValueError, match="weight"):
        tgt("a", weight=0)


# --- advance -------------------------------------------------------------------------------


def tiers_from(spec: str) -> tuple[Tier, ...]:
    """'1 0 1' -> tiers t0..t2, each with one target, healthy where the digit is 1."""
    return tuple(
        Tier(f"t{i}", (tgt(f"t{i}-x", healthy=c == "1"),)) for i, c in enumerate(spec.split())
    )


def run(steps: list[tuple[float, str]], policy: FailoverPolicy | None = None):
    policy = policy or FailoverPolicy(failback_after=2.0)
    state = FailoverState()
    actives = []
    for now, spec in steps:
        state = advance(state, tiers_from(spec), now, policy)
        actives.append(state.active)
    return state, actives


@pytest.mark.parametrize(
    "steps, expected",
    [
        # start: best eligible at once
        ([(0, "1 1 1")], ["t0"]),
        ([(0, "0 1 1")], ["t1"]),
        # failing over is immediate
        ([(0, "1 1 1"), (0.1, "0 1 1")], ["t0", "t1"]),
        ([(0, "1 1 1"), (0.1, "0 0 1")], ["t0", "t2"]),
        # failing back waits failback_after of continuous eligibility
        (
            [(0, "0 1"), (1, "1 1"), (2, "1 1"), (2.9, "1 1"), (3, "1 1")],
            ["t1", "t1", "t1", "t1", "t0"],
        ),
        # an interruption restarts the clock
        (
            [(0, "0 1"), (1, "1 1"), (2, "0 1"), (2.5, "1 1"), (4, "1 1"), (4.5, "1 1")],
            ["t1", "t1", "t1", "t1", "t1", "t0"],
        ),
        # active fails while a better tier is still waiting: go to the best eligible at once
        ([(0, "0 1 1"), (1, "1 1 1"), (1.5, "1 0 1")], ["t1", "t1", "t0"]),
        # a middle tier that has earned trust wins while the best one still waits
        (
            [(0, "0 0 1"), (1, "0 1 1"), (3, "0 1 1"), (3.5, "1 1 1"), (5.5, "1 1 1")],
            ["t2", "t2", "t1", "t1", "t0"],
        ),
        # panic: nothing eligible, best tier overall; recovery moves at once
        ([(0, "1 1"), (1, "0 0"), (2, "0 1")], ["t0", "t0", "t1"]),
        ([(0, "0 1"), (1, "0 0"), (2, "0 1")], ["t1", "t0", "t1"]),
        # no tiers at all
        ([(0, "")], [None]),
    ],
)
def test_advance_table(steps, expected):
    assert run(steps)[1] == expected


def test_advance_failback_zero_is_immediate():
    _, actives = run([(0, "0 1"), (1, "1 1")], FailoverPolicy(failback_after=0.0))
    assert actives == ["t1", "t0"]


def test_advance_tier_that_disappears():
    state = advance(FailoverState(), tiers_from("1 1"), 0.0, FailoverPolicy())
    assert state.active == "t0"
    only = (Tier("t1", (tgt("t1-x"),)),)
    state = advance(state, only, 1.0, FailoverPolicy())
    assert state.active == "t1" and set(state.since) == {"t1"}


def test_advance_records_since_and_switched_at():
    policy = FailoverPolicy(failback_after=2.0)
    s = advance(FailoverState(), tiers_from("0 1"), 10.0, policy)
    assert (s.active, dict(s.since), s.switched_at) == ("t1", {"t1": 10.0}, 10.0)
    s = advance(s, tiers_from("1 1"), 11.0, policy)
    assert (s.active, dict(s.since), s.switched_at) == ("t1", {"t0": 11.0, "t1": 10.0}, 10.0)
    s = advance(s, tiers_from("1 1"), 13.0, policy)
    assert (s.active, s.switched_at) == ("t0", 13.0)


def test_flapping_tier_never_pulls_traffic_back():
    """The local tier flaps every 0.5 s; with failback_after 2 s traffic stays on the backup."""
    steps = []
    for i in range(200):
        now = i * 0.25
        up = (int(now / 0.5) % 2) == 0 and now > 0
        steps.append((now, f"{int(up)} 1"))
    _, actives = run(steps, FailoverPolicy(failback_after=2.0))
    assert actives[0] == "t1"
    assert set(actives) == {"t1"}
    # Contrast: without enough hysteresis the same flapping does move traffic back and forth.
    _, actives = run(steps, FailoverPolicy(failback_after=0.25))
    assert actives.count("t0") > 10 and actives.count("t1") > 10


# --- plan ----------------------------------------------------------------------------------


def fake_random(values):
    it = cycle(values)
    return lambda: next(it)


def test_plan_first_pick_follows_weights():
    tier = Tier("cluster", (tgt("a", weight=1), tgt("b", weight=3), tgt("c", weight=6)))
    state = FailoverState(active="cluster")
    # A uniform grid over [0, 1): the first pick should split 1 : 3 : 6 exactly.
    firsts = Counter(plan([tier], state, fake_random([i / 1000]), 1)[0].key for i in range(1000))
    assert firsts == {"a": 100, "b": 300, "c": 600}


@pytest.mark.parametrize(
    "r, expected",
    [
        ([0.0, 0.0], ["a", "b", "c"]),  # a (1/10), then b (3/9)
        ([0.05, 0.99], ["a", "c", "b"]),
        ([0.1, 0.0], ["b", "a", "c"]),  # r*10 = 1.0 falls on b
        ([0.4, 0.5], ["c", "b", "a"]),  # c, then among a,b (4): 2.0 -> b
        ([0.999999, 0.0], ["c", "a", "b"]),
    ],
)
def test_plan_weighted_order_table(r, expected):
    tier = Tier("cluster", (tgt("a", weight=1), tgt("b", weight=3), tgt("c", weight=6)))
    got = plan([tier], FailoverState(active="cluster"), fake_random(r), 10)
    assert [t.key for t in got] == expected


def test_plan_order_active_then_others_then_unhealthy():
    t0 = Tier("t0", (tgt("t0-a"), tgt("t0-b", healthy=False)))
    t1 = Tier("t1", (tgt("t1-a"), tgt("t1-b", healthy=False)))
    t2 = Tier("t2", (tgt("t2-a", healthy=False), tgt("t2-b")))
    state = FailoverState(active="t1")  # t0 is healthy but still waiting out failback_after
    got = [t.key for t in plan([t0, t1, t2], state, fake_random([0.0]), 10)]
    assert got == ["t1-a", "t0-a", "t2-b", "t1-b", "t0-b", "t2-a"]


@pytest.mark.parametrize("n, expected", [(1, ["h"]), (2, ["h", "u1"]), (3, ["h", "u1", "u2"])])
def test_plan_max_attempts(n, expected):
    tier = Tier("t", (tgt("u1", healthy=False), tgt("h"), tgt("u2", healthy=False)))
    got = plan([tier], FailoverState(active="t"), fake_random([0.0]), n)
    assert [t.key for t in got] == expected


def test_plan_stops_calling_random_when_full():
    calls = []

    def rnd():
        calls.append(1)
        return 0.0

    tier = Tier("t", tuple(tgt(f"k{i}") for i in range(10)))
    plan([tier], FailoverState(active="t"), rnd, 2)
    assert len(calls) == 2


def test_plan_panic_uses_unhealthy_targets():
    tiers = tiers_from("0 0")
    state = advance(FailoverState(), tiers, 0.0, FailoverPolicy())
    assert [t.key for t in plan(tiers, state, fake_random([0.0]), 4)] == ["t0-x", "t1-x"]


def test_plan_empty():
    assert plan([], FailoverState(), fake_random([0.0]), 4) == []


# --- describe ------------------------------------------------------------------------------


def test_describe_is_json_ready():
    tiers = build_tiers(ALL, CALLER, FailoverPolicy())
    state = advance(FailoverState(), tiers, 5.0, FailoverPolicy())
    d = describe(tiers, state)
    assert json.loads(json.dumps(d)) == d
    assert d["active"] == "cluster" and d["panic"] is False
    assert [t["name"] for t in d["tiers"]] == ["cluster", "zone", "region", "any"]
    assert d["tiers"][0]["targets"][0] == {
        "key": "a-own",
        "address": "10.0.0.1:9000",
        "locality": "us-east/a/east-1",
        "healthy": True,
        "weight": 1,
        "remote": False,
    }
    assert d["tiers"][0]["eligible_since"] == 5.0


# --- properties ----------------------------------------------------------------------------

localities = st.builds(
    Locality,
    st.sampled_from(["us-east", "us-west", "eu"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["east-1", "c2", "c3"]),
)


@st.composite
def target_sets(draw):
    n = draw(st.integers(0, 12))
    return [
        Target(
            f"k{i}",
            draw(localities),
            "10.0.0.1",
            9000 + i,
            draw(st.integers(1, 20)),
            draw(st.booleans()),
            draw(st.booleans()),
        )
        for i in range(n)
    ]


policies = st.builds(
    FailoverPolicy,
    tiers=st.lists(st.sampled_from(tuple(TierKind)), unique=True, min_size=1).map(tuple),
    region_preference=st.lists(st.sampled_from(["us-west", "eu", "ap"]), unique=True).map(tuple),
    failback_after=st.floats(0, 5),
    max_attempts=st.integers(1, 15),
)


@given(target_sets(), policies, st.lists(st.floats(0, 1, exclude_max=True), min_size=1), st.data())
def test_plan_properties(targets, policy, randoms, data):
    tiers = build_tiers(targets, CALLER, policy)
    state = advance(FailoverState(), tiers, 0.0, policy)
    # Sometimes an arbitrary active tier (e.g. one with better tiers not yet failed back to).
    if tiers and data.draw(st.booleans()):
        state = FailoverState(active=data.draw(st.sampled_from([t.name for t in tiers])))
    got = plan(tiers, state, fake_random(randoms), policy.max_attempts)
    keys = [t.key for t in got]
    assert len(keys) == len(set(keys))
    assert len(keys) <= policy.max_attempts
    in_tiers = sum(len(t.targets) for t in tiers)
    assert len(keys) == min(in_tiers, policy.max_attempts)
    # Every healthy target of the active tier comes before any target of another tier.
    active = next((t for t in tiers if t.name == state.active), None)
    if active is not None:
        mine = {t.key for t in active.targets if t.healthy}
        positions = [i for i, k in enumerate(keys) if k in mine]
        others = [i for i, k in enumerate(keys) if k not in {t.key for t in active.targets}]
        if positions and others:
            assert max(positions) < min(others)
        assert len(positions) == min(len(mine), policy.max_attempts)
    # No unhealthy target precedes a healthy one.
    health = [t.healthy for t in got]
    assert health == sorted(health, reverse=True)


@given(target_sets(), policies)
def test_build_tiers_properties(targets, policy):
    tiers = build_tiers(targets, CALLER, policy)
    placed = [x.key for t in tiers for x in t.targets]
    assert len(placed) == len(set(placed))
    assert all(t.targets for t in tiers)
    for t in tiers:
        assert [x.key for x in t.targets] == sorted(x.key for x in t.targets)
    if "any" in policy.tiers:
        assert sorted(placed) == sorted(x.key for x in targets)


@settings(max_examples=200)
@given(
    st.integers(1, 5),
    st.floats(0, 3),
    st.lists(
        st.tuples(st.floats(0.01, 1.5), st.lists(st.booleans(), min_size=5, max_size=5)),
        max_size=60,
    ),
)
def test_advance_properties(n_tiers, failback_after, steps):
    """Random eligibility over time: never an ineligible tier while an eligible one exists, and
    a move to a better tier only after it was observed eligible for >= failback_after."""
    policy = FailoverPolicy(failback_after=failback_after)
    state, now = FailoverState(), 0.0
    eligible_since: dict[str, float] = {}  # the test's own bookkeeping, independent of `since`
    for dt, flags in steps:
        now += dt
        spec = " ".join("1" if f else "0" for f in flags[:n_tiers])
        tiers = tiers_from(spec)
        names = [t.name for t in tiers]
        eligible = [t.name for t in tiers if t.eligible]
        eligible_since = {n: eligible_since.get(n, now) for n in eligible}
        new = advance(state, tiers, now, policy)
        if eligible:
            assert new.active in eligible
        else:
            assert new.active == names[0]
        old = state.active
        if old in eligible and new.active != old:
            # the old active tier is still fine: this can only be a failback
            assert names.index(new.active) < names.index(old)
            assert now - eligible_since[new.active] >= failback_after
        if old not in eligible and eligible:
            assert new.active == eligible[0]  # failover goes to the best eligible, at once
        state = new
