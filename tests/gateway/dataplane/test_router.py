"""Router (over a HealthBook) driven by a fake clock and seeded randomness: tiers, ejection,
failback, and its plan cache."""

from __future__ import annotations

import json
import random

import pytest

from federation.model import Endpoint, Export, FailoverPolicy, Locality, OutlierPolicy, ServiceKey
from gateway.core import balance
from gateway.core.health import HealthBook, HealthEvent, HealthState
from gateway.dataplane.router import (
    Router,
    TierSwitch,
    local_key,
    remote_key,
)

SERVICE = ServiceKey("shop", "cart")
EAST_1 = Locality("us-east", "a", "east-1")  # the caller
EAST_2 = Locality("us-east", "b", "east-2")
WEST_1 = Locality("us-west", "a", "west-1")
GATEWAYS = {"east-2": ("10.2.0.1", 15443), "west-1": ("10.3.0.1", 15443)}

A = Endpoint("10.1.0.1", 8080)
B = Endpoint("10.1.0.2", 8080)
KA, KB = local_key(A.host, A.port), local_key(B.host, B.port)
KE2, KW1 = remote_key("east-2"), remote_key("west-1")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def export(cluster: str, *endpoints: Endpoint, allowed=None) -> Export:
    return Export(cluster, SERVICE.namespace, SERVICE.name, 8080, "tcp", endpoints, allowed)


def healthy_export(cluster: str, weight: int = 1) -> Export:
    return export(cluster, Endpoint("10.9.0.1", 8080, True, weight))


def make(
    local=(A, B),
    remote=None,
    policy: FailoverPolicy | None = None,
    rules: OutlierPolicy | None = None,
    seed: int = 7,
):
    clock = Clock()
    book = HealthBook(rules or OutlierPolicy(consecutive_failures=2, base_ejection=2.0))
    router = Router(
        SERVICE,
        EAST_1,
        policy or FailoverPolicy(failback_after=5.0, max_attempts=8),
        book,
        clock,
        random.Random(seed).random,
        gateway_address=GATEWAYS.get,
    )
    if remote is None:
        remote = ((EAST_2, healthy_export("east-2")), (WEST_1, healthy_export("west-1")))
    router.set_local(local)
    router.set_remote(remote)
    return router, book, clock


def keys(targets) -> list[str]:
    return [t.key for t in targets]


def by_key(router: Router, key: str):
    return next(t for tier in router.tiers for t in tier.targets if t.key == key)


def eject(router: Router, key: str) -> None:
    router.tick()
    target = by_key(router, key)
    for _ in range(router.book.rules.consecutive_failures):
        router.report(target, False)


# ------------------------------------------------------------------------------ tiers


def test_tiers_for_east_1_with_east_2_and_west_1():
    router, _, _ = make()
    router.tick()
    assert [(t.name, keys(t.targets)) for t in router.tiers] == [
        ("cluster", [KA, KB]),
        ("region", [KE2]),  # same region, other zone
        ("any", [KW1]),  # other region
    ]
    east2 = by_key(router, KE2)
    assert (east2.host, east2.port, east2.remote, east2.locality) == (
        "10.2.0.1",
        15443,
        True,
        EAST_2,
    )
    a = by_key(router, KA)
    assert (a.host, a.port, a.remote, a.locality) == ("10.1.0.1", 8080, False, EAST_1)


def test_region_preference_and_restricted_tiers():
    router, _, _ = make(policy=FailoverPolicy(tiers=("cluster", "region"), failback_after=1.0))
    router.tick()
    assert [t.name for t in router.tiers] == ["cluster", "region"]  # other regions never used
    assert KW1 not in keys(router.plan())

    router, _, _ = make(policy=FailoverPolicy(region_preference=("us-west",)))
    router.tick()
    assert [t.name for t in router.tiers] == ["cluster", "region", "any:us-west"]


def test_local_endpoints_come_first():
    router, _, _ = make()
    firsts = set()
    for _ in range(200):
        plan = router.plan()
        assert set(keys(plan[:2])) == {KA, KB}
        assert keys(plan[2:]) == [KE2, KW1]  # then the tiers in order
        firsts.add(plan[0].key)
    assert firsts == {KA, KB}  # the weighted pick really picks both
    assert router.describe()["active"] == "cluster"


def test_weighted_pick_follows_local_weights():
    heavy = Endpoint("10.1.0.3", 8080, weight=3)
    router, _, _ = make(local=(A, heavy), seed=11)
    n = 4000
    first_heavy = sum(router.plan()[0].host == heavy.host for _ in range(n))
    assert 0.70 < first_heavy / n < 0.80  # 3 / (1 + 3)


def test_same_seed_same_plans():
    r1, _, _ = make(seed=3)
    r2, _, _ = make(seed=3)
    assert [keys(r1.plan()) for _ in range(50)] == [keys(r2.plan()) for _ in range(50)]


def test_max_attempts_truncates_the_plan():
    router, _, _ = make(policy=FailoverPolicy(max_attempts=2))
    assert len(router.plan()) == 2


def test_cluster_without_gateway_address_is_skipped():
    lonely = Locality("eu-west", "a", "eu-1")
    router, _, _ = make(
        remote=((EAST_2, healthy_export("east-2")), (lonely, healthy_export("eu-1")))
    )
    router.tick()
    assert remote_key("eu-1") not in {t.key for tier in router.tiers for t in tier.targets}


# ------------------------------------------------------------------------------ ejection


def test_ejected_endpoint_is_skipped_until_the_ejection_expires():
    router, book, clock = make()
    eject(router, KA)
    until = book.ejected_until(KA)
    assert until == clock.t + 2.0
    for _ in range(100):
        plan = router.plan()
        assert plan[0].key == KB  # never picked first while ejected
        assert keys(plan) == [KB, KE2, KW1, KA]  # kept only as a last resort
        assert not plan[-1].healthy
    assert router.describe()["active"] == "cluster"  # B keeps the tier eligible

    clock.t = until - 0.001
    assert router.plan()[0].key == KB

    # Expiry alone brings it back: no probe, no report, no catalog change.
    version = book.version
    clock.t = until
    firsts = {router.plan()[0].key for _ in range(100)}
    assert book.version == version
    assert firsts == {KA, KB}
    assert by_key(router, KA).healthy


def test_one_failure_does_not_eject():
    router, book, clock = make()
    router.tick()
    router.report(by_key(router, KA), False)
    assert book.routable(KA, clock())
    router.tick()
    assert by_key(router, KA).healthy


def test_success_resets_the_failure_count():
    router, book, clock = make()
    router.tick()
    a = by_key(router, KA)
    router.report(a, False)
    router.report(a, True)
    router.report(a, False)
    assert book.routable(KA, clock.t)


def test_repeat_offender_is_ejected_longer():
    router, book, clock = make()
    router.tick()
    eject(router, KA)
    assert book.ejected_until(KA) == clock.t + 2.0
    clock.t += 2.0
    router.plan()
    eject(router, KA)
    assert book.ejected_until(KA) == clock.t + 4.0


def test_ejected_only_local_endpoint_fails_over_then_fails_back_after_hysteresis():
    router, book, clock = make(local=(A,))
    assert router.plan()[0].key == KA
    t0 = clock.t
    eject(router, KA)
    assert router.plan()[0].key == KE2  # failing over is immediate
    desc = router.describe()
    assert desc["active"] == "region"
    assert desc["switched_at"] == t0

    clock.t = book.ejected_until(KA)  # ejection over: cluster tier eligible again...
    assert router.plan()[0].key == KE2  # ...but not trusted yet
    assert by_key(router, KA).healthy
    back = clock.t

    clock.t = back + 4.999
    router.tick()
    assert router.describe()["active"] == "region"
    clock.t = back + 5.0  # failback_after
    router.tick()
    desc = router.describe()
    assert desc["active"] == "cluster"
    assert desc["switched_at"] == back + 5.0
    assert router.plan()[0].key == KA


def test_flapping_tier_never_pulls_traffic_back():
    router, book, clock = make(local=(A,), rules=OutlierPolicy(1, 2.0, 2.0))
    router.tick()
    eject(router, KA)
    router.tick()
    for _ in range(5):  # healthy for 2 s, then ejected again for 2 s: shorter than 5 s failback
        clock.t = book.ejected_until(KA)
        router.tick()
        assert router.describe()["active"] == "region"
        clock.t += 1.0
        router.tick()
        eject(router, KA)
        router.tick()
        assert router.describe()["active"] == "region"


# ------------------------------------------------------------------------------ remote targets


def test_remote_weight_is_the_healthy_endpoint_weight_of_the_export():
    exp = export(
        "east-2",
        Endpoint("10.2.1.1", 80, True, 3),
        Endpoint("10.2.1.2", 80, False, 5),
        Endpoint("10.2.1.3", 80, True, 2),
    )
    router, _, _ = make(remote=((EAST_2, exp),))
    router.tick()
    t = by_key(router, KE2)
    assert t.weight == 5
    assert t.healthy


@pytest.mark.parametrize(
    "endpoints",
    [(), (Endpoint("10.2.1.1", 80, False, 4), Endpoint("10.2.1.2", 80, False, 1))],
    ids=["no-endpoints", "all-unhealthy"],
)
def test_remote_without_healthy_endpoints_is_unhealthy(endpoints):
    router, _, _ = make(local=(), remote=((EAST_2, export("east-2", *endpoints)),))
    router.tick()
    t = by_key(router, KE2)
    assert not t.healthy
    assert t.weight == 1  # Target needs >= 1; health is what keeps it out
    assert router.describe()["panic"] is True


def test_remote_weights_split_traffic_between_remote_clusters():
    west_2 = Locality("us-west", "b", "west-2")
    gateways = {**GATEWAYS, "west-2": ("10.4.0.1", 15443)}
    router, _, _ = make(
        local=(),
        remote=((WEST_1, healthy_export("west-1", 1)), (west_2, healthy_export("west-2", 4))),
        seed=5,
    )
    router.gateway_address = gateways.get
    router.set_remote(router.remote)
    n = 4000
    west2_first = sum(router.plan()[0].key == remote_key("west-2") for _ in range(n))
    assert 0.75 < west2_first / n < 0.85  # 4 / (1 + 4)


def test_remote_probe_unhealthy_makes_the_cluster_unhealthy():
    router, book, clock = make(local=())
    assert router.plan()[0].key == KE2
    for _ in range(3):
        book.probe(KE2, False, clock(), 2, 3)
    assert book.state(KE2) == HealthState.UNHEALTHY
    assert router.plan()[0].key == KW1  # immediate failover to the other region
    assert not by_key(router, KE2).healthy

    book.probe(KE2, True, clock(), 2, 3)
    router.tick()
    assert not by_key(router, KE2).healthy  # one success is not enough to leave UNHEALTHY
    book.probe(KE2, True, clock(), 2, 3)  # healthy_threshold reached
    router.tick()
    assert by_key(router, KE2).healthy
    assert router.describe()["active"] == "any"  # failback waits
    clock.t += 5.0
    assert router.plan()[0].key == KE2


def test_remote_export_change_is_picked_up():
    router, _, _ = make(local=())
    assert router.plan()[0].key == KE2
    router.set_remote(((EAST_2, export("east-2")), (WEST_1, healthy_export("west-1"))))
    assert router.plan()[0].key == KW1


# ------------------------------------------------------------------------------ failback, describe


def test_failback_only_after_failback_after_via_tick():
    router, book, clock = make(local=())
    for _ in range(3):
        book.probe(KE2, False, clock(), 1, 3)
    router.tick()
    assert router.describe()["active"] == "any"
    book.probe(KE2, True, clock(), 1, 3)
    start = clock.t
    for dt in (0.0, 1.0, 2.5, 4.9):
        clock.t = start + dt
        router.tick()
        assert router.describe()["active"] == "any", dt
    clock.t = start + 5.0
    router.tick()
    assert router.describe()["active"] == "region"


def test_all_unhealthy_is_panic_and_still_plans_everything():
    router, book, clock = make()
    for key in (KA, KB, KE2, KW1):
        for _ in range(3):
            book.probe(key, False, clock(), 1, 3)
    plan = router.plan()
    assert set(keys(plan)) == {KA, KB, KE2, KW1}
    assert set(keys(plan[:2])) == {KA, KB}  # best tier first even in panic
    desc = router.describe()
    assert desc["panic"] is True
    assert desc["active"] == "cluster"


def test_describe_is_json_serializable():
    router, book, clock = make()
    eject(router, KA)
    clock.t += 1.0
    router.tick()
    desc = router.describe()
    again = json.loads(json.dumps(desc))
    assert again == desc
    assert desc["service"] == "shop/cart"
    assert [t["name"] for t in desc["tiers"]] == ["cluster", "region", "any"]
    a = desc["tiers"][0]["targets"][0]
    assert a == {
        "key": KA,
        "address": "10.1.0.1:8080",
        "locality": "us-east/a/east-1",
        "healthy": False,
        "weight": 1,
        "remote": False,
    }
    json.dumps(book.snapshot(clock()))
    assert book.snapshot(clock())[KA]["routable"] is False
    assert book.snapshot(clock())[KA]["ejected_for"] == pytest.approx(1.0)


def test_describe_of_a_router_without_candidates():
    router, _, _ = make(local=(), remote=())
    desc = router.describe()
    assert desc["active"] is None
    assert desc["tiers"] == []
    assert router.plan() == []
    json.dumps(desc)


def test_ipv6_local_key():
    assert local_key("::1", 80) == "local:[::1]:80"
    assert local_key("127.0.0.1", 80) == "local:127.0.0.1:80"


# ------------------------------------------------------------------------------ transitions


def test_book_reports_ejection_then_its_return_once_it_runs_out():
    router, book, clock = make()
    eject(router, KA)
    t0 = clock.t
    assert book.take_events(clock.t) == [HealthEvent(KA, "ejected", t0, 2, t0 + 2.0)]
    assert book.take_events(clock.t) == []  # taken once
    clock.t = t0 + 1.999
    assert book.take_events(clock.t) == []
    clock.t = t0 + 7.0  # noticed late: the event says when it really ended
    assert book.take_events(clock.t) == [HealthEvent(KA, "returned", t0 + 2.0)]
    assert book.take_events(clock.t) == []


def test_router_reports_each_tier_switch_with_the_clusters_it_moves_to():
    router, book, clock = make(local=(A,))
    router.plan()
    t0 = clock.t
    assert router.take_switches() == [TierSwitch(SERVICE, None, "cluster", t0, ("east-1",))]
    for _ in range(50):  # no change: no switch, however many plans
        router.plan()
    assert router.take_switches() == []
    eject(router, KA)
    router.plan()
    back = book.ejected_until(KA)
    clock.t = back
    router.tick()
    clock.t = back + 5.0  # failback_after
    router.tick()
    assert router.take_switches() == [
        TierSwitch(SERVICE, "cluster", "region", t0, ("east-2",)),
        TierSwitch(SERVICE, "region", "cluster", back + 5.0, ("east-1",)),
    ]


def test_router_reports_panic_and_losing_every_candidate():
    router, book, clock = make(local=(A,))
    router.tick()
    router.take_switches()
    for key in (KE2, KW1):
        book.probe(key, False, clock(), 1, 1)
    eject(router, KA)
    router.tick()
    t0 = clock.t
    panic = TierSwitch(SERVICE, "cluster", "cluster", t0, ("east-1",), panic=True)
    assert router.take_switches() == [panic]
    clock.t = book.ejected_until(KA)  # healthy targets again, in the same tier
    router.tick()
    healed = TierSwitch(SERVICE, "cluster", "cluster", clock.t, ("east-1",))
    assert router.take_switches() == [healed]
    router.set_local(())
    router.set_remote(())
    clock.t += 1.0
    router.tick()
    assert [(s.old, s.new) for s in router.take_switches()] == [("cluster", None)]


# ------------------------------------------------------------------------------ the plan cache
# Router.plan runs once per new connection, so it uses balance's cached forms (groups per
# tiers and state; `advance` skipped at a fixed point). It must stay exactly balance.plan +
# balance.advance: the same lists and the same calls to `random`
# (tests/gateway/core/test_balance_cache.py checks the forms themselves).


def _counting(seed: int):
    rng = random.Random(seed)
    calls = []

    def draw() -> float:
        calls.append(1)
        return rng.random()

    return draw, calls


def test_router_plan_and_state_equal_uncached_advance_and_plan_over_time():
    """Health flaps, ejections and failback waits, ticked on a moving clock: the cached
    router's state and plans equal those of advance + balance.plan recomputed every time."""
    rng = random.Random(11)
    now = [100.0]
    me = Locality("us-east", "b", "east-2")
    book = HealthBook(OutlierPolicy(consecutive_failures=1, base_ejection=0.7, max_ejection=3.0))
    policy = FailoverPolicy(failback_after=0.5, max_attempts=4)
    draw, _ = _counting(1)
    host = "127.0.0.1"
    r = Router(SERVICE, me, policy, book, lambda: now[0], draw,
               gateway_address={"east-1": (host, 1), "west-1": (host, 2)}.get)
    r.set_local([Endpoint(host, 18201, weight=1), Endpoint(host, 18202, weight=3)])

    def one(cluster: str, healthy: bool) -> Export:
        return Export(cluster, "shop", "cart", 80, "tcp", (Endpoint(host, 1, healthy, 2),), ())

    east1, west1 = Locality("us-east", "a", "east-1"), Locality("us-west", "a", "west-1")
    keys = ["local:127.0.0.1:18201", "local:127.0.0.1:18202", "remote:east-1", "remote:west-1"]
    shadow = balance.FailoverState()
    for step in range(4000):
        now[0] += rng.choice((0.0, 0.01, 0.1, 0.3, 0.6))
        action = rng.random()
        if action < 0.15:
            book.probe(rng.choice(keys), rng.random() < 0.5, now[0], 1, 1)
        elif action < 0.25:
            book.connect(rng.choice(keys), rng.random() < 0.4, now[0])
        elif action < 0.28:
            r.set_remote([(east1, one("east-1", rng.random() < 0.5)), (west1, one("west-1", True))])
        seed = rng.randint(0, 10**9)
        cached_draw, cached_calls = _counting(seed)
        plain_draw, plain_calls = _counting(seed)
        r.random = cached_draw
        got = r.plan()
        shadow = balance.advance(shadow, r.tiers, now[0], policy)
        assert r.state == shadow, f"step {step}"
        want = balance.plan(r.tiers, shadow, plain_draw, policy.max_attempts)
        assert got == want, f"step {step}"
        assert len(cached_calls) == len(plain_calls), f"step {step}"
