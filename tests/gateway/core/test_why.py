"""Tables for gateway/core/why.py: one case per reason, and the order is plan_groups' order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.model import (
    Catalog,
    ClusterRecord,
    Endpoint,
    Export,
    FailoverPolicy,
    Locality,
    ServiceKey,
)
from gateway.core.balance import FailoverState, Target, advance, build_tiers, plan
from gateway.core.health import HealthState
from gateway.core.why import REASONS, Excluded, Health, excluded, explain

ME = Locality("us-east", "a", "east-1")
SVC = ServiceKey("default", "echo")


def tgt(key: str, loc: str, healthy: bool = True, weight: int = 1) -> Target:
    region, zone, cluster = loc.split("/")
    return Target(key, Locality(region, zone, cluster), "127.0.0.1", 9000, weight, healthy,
                  cluster != ME.cluster)


OWN = tgt("local:127.0.0.1:9001", "us-east/a/east-1")
ZONE = tgt("remote:east-3", "us-east/a/east-3")
REGION = tgt("remote:east-2", "us-east/b/east-2")
WEST = tgt("remote:west-1", "us-west/a/west-1")


DEFAULT = FailoverPolicy()


def why(candidates, policy=DEFAULT, health=None, now=100.0, state=None, **kw):
    tiers = build_tiers(candidates, ME, policy)
    state = state if state is not None else advance(FailoverState(), tiers, now, policy)
    return explain(SVC, ME, policy, candidates, tiers, state, health or {}, now, **kw)


def by_key(w):
    return {c.key: c for c in w.candidates}


def test_all_healthy_own_cluster_first_and_the_rest_in_tier_order():
    w = why([WEST, REGION, OWN, ZONE])
    j = w.to_json(100.0)
    assert j["active_tier"] == "cluster" and not j["panic"]
    assert j["order"] == [OWN.key, ZONE.key, REGION.key, WEST.key]
    c = by_key(w)
    assert c[OWN.key].reasons == () and c[OWN.key].position == 1
    assert c[ZONE.key].reasons == ("tier-not-active",)
    assert [c[k].position for k in (ZONE.key, REGION.key, WEST.key)] == [2, 3, 4]


@pytest.mark.parametrize("target, health, weights, reasons", [
    (OWN, Health(HealthState.UNHEALTHY), None, ("check-unhealthy",)),
    (REGION, Health(HealthState.UNHEALTHY), None, ("peer-probe-failed",)),
    (OWN, Health(ejected_until=130.0, consecutive_failures=0), None, ("ejected",)),
    (REGION, Health(), {REGION.key: 0}, ("no-healthy-endpoints",)),
    (REGION, Health(HealthState.UNHEALTHY, ejected_until=101.0), None,
     ("peer-probe-failed", "ejected")),
])
def test_each_unhealthy_reason_is_named_and_the_target_is_a_last_resort(
        target, health, weights, reasons):
    sick = tgt(target.key, str(target.locality), healthy=False)
    others = [t for t in (OWN, REGION, WEST) if t.key != target.key]
    w = why([sick, *others], health={target.key: health}, healthy_weight=weights)
    c = by_key(w)[target.key]
    assert c.reasons == reasons
    assert c.position == 3  # after both healthy ones
    assert w.to_json(100.0)["order"][-1] == target.key
    if "ejected" in reasons:
        assert c.until == health.ejected_until
        assert w.to_json(100.0)["candidates"][0]["ejected_for"] == round(
            health.ejected_until - 100.0, 3)


def test_ejection_that_ran_out_is_no_reason():
    c = by_key(why([OWN], health={OWN.key: Health(ejected_until=99.0)}))[OWN.key]
    assert c.reasons == () and c.until is None


def test_no_tier_when_the_policy_leaves_its_locality_out():
    w = why([OWN, WEST], policy=FailoverPolicy(tiers=("cluster", "region")))
    c = by_key(w)[WEST.key]
    assert c.tier is None and c.position is None and c.reasons == ("no-tier",)
    assert w.to_json(100.0)["order"] == [OWN.key]


def test_beyond_max_attempts_and_partial_groups():
    a = tgt("remote:east-2", "us-east/b/east-2")
    b = tgt("remote:east-4", "us-east/b/east-4")
    w = why([OWN, a, b, WEST], policy=FailoverPolicy(max_attempts=2))
    c = by_key(w)
    assert c[OWN.key].position == 1
    assert c[a.key].partial and c[b.key].partial and c[a.key].share == 0.5
    assert c[WEST.key].reasons == ("tier-not-active", "beyond-max-attempts")
    assert c[WEST.key].position is None and WEST.key not in w.to_json(100.0)["order"]


def test_failback_wait_says_when_the_better_tier_takes_over():
    policy = FailoverPolicy(failback_after=2.0)
    sick = tgt(OWN.key, str(OWN.locality), healthy=False)
    state = advance(FailoverState(), build_tiers([sick, REGION], ME, policy), 10.0, policy)
    assert state.active == "region"
    state = advance(state, build_tiers([OWN, REGION], ME, policy), 11.0, policy)  # own back
    assert state.active == "region"
    w = why([OWN, REGION], policy=policy, state=state, now=11.5)
    c = by_key(w)[OWN.key]
    assert c.reasons == ("tier-not-active", "failback-wait")
    assert c.takes_over_at == 13.0
    assert w.to_json(11.5)["candidates"][0]["takes_over_in"] == 1.5
    assert w.to_json(11.5)["order"] == [REGION.key, OWN.key]


def test_panic_every_target_unhealthy_all_last_resort():
    sick = [tgt(t.key, str(t.locality), healthy=False) for t in (OWN, REGION)]
    w = why(sick, health={t.key: Health(HealthState.UNHEALTHY) for t in sick})
    assert w.panic and w.active == "cluster"
    assert w.to_json(100.0)["order"] == [OWN.key, REGION.key]


def test_order_matches_balance_plan_for_single_target_groups():
    cands = [OWN, ZONE, REGION, WEST]
    policy = FailoverPolicy(max_attempts=4)
    tiers = build_tiers(cands, ME, policy)
    state = advance(FailoverState(), tiers, 1.0, policy)
    w = explain(SVC, ME, policy, cands, tiers, state, {}, 1.0)
    assert w.to_json(1.0)["order"] == [t.key for t in plan(tiers, state, lambda: 0.0, 4)]


def _export(cluster, allowed=None):
    return Export(cluster=cluster, namespace="default", name="echo", port=80, protocol="tcp",
                  endpoints=(Endpoint("127.0.0.1", 1, True, 1),), allowed_consumers=allowed)


def test_excluded_candidates_from_the_catalog():
    exports = {e.key: e for e in (_export("east-1"), _export("east-2"),
                                  _export("west-1", ("edge-1",)), _export("gone"),
                                  _export("nogw"))}
    clusters = {n: ClusterRecord(n, "r", "z", f"{n}.td", "127.0.0.1:1")
                for n in ("east-1", "east-2", "west-1", "gone", "nogw")}
    cat = Catalog(revision=1, clusters=clusters, exports=exports,
                  live=frozenset({"east-1", "east-2", "west-1", "nogw"}))
    got = excluded(cat, SVC, "east-1", {"east-2": 1, "west-1": 1})
    assert got == (Excluded("gone", "lease-expired"), Excluded("nogw", "no-gateway"),
                   Excluded("west-1", "not-allowed"))
    w = why([OWN], dropped=got)
    assert w.to_json(100.0)["excluded"][0] == {"cluster": "gone", "reasons": ["lease-expired"]}


def test_every_reason_of_the_docstring_is_in_reasons():
    import gateway.core.why as mod

    for r in REASONS:
        assert r in mod.__doc__


# --- core/traffic.py: listener counters -> flows -------------------------------------------


def test_flows_sum_workers_and_name_destination_tier_result():
    from gateway.core.traffic import flows

    tiers = build_tiers([OWN, REGION], ME, DEFAULT)
    w0 = {"served_by": {OWN.key: 3, REGION.key: 2}, "failed": 1,
          "response_timeouts_by": {REGION.key: 1}}
    w1 = {"served_by": {REGION.key: 5, "remote:gone": 1}, "failed": 0}
    got = {(f.destination, f.tier, f.result): f.count
           for f in flows("east-1", "default/echo", tiers, [w0, w1])}
    assert got == {("east-1", "cluster", "served"): 3, ("east-2", "region", "served"): 7,
                   ("east-2", "region", "response_timeout"): 1, ("none", "none", "failed"): 1,
                   ("gone", "none", "served"): 1}


# --- property: the explained order is balance.plan's order ----------------------------------

LOCS = ["us-east/a/east-1", "us-east/a/east-3", "us-east/b/east-2", "us-west/a/west-1",
        "eu/a/eu-1"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LOCS), st.booleans(), st.integers(1, 5)),
                min_size=0, max_size=8),
       st.integers(1, 6), st.lists(st.floats(0, 0.999), min_size=40, max_size=40))
def test_order_and_positions_agree_with_plan(spec, max_attempts, draws):
    cands = [tgt(f"k{i}", loc, healthy, w) for i, (loc, healthy, w) in enumerate(spec)]
    policy = FailoverPolicy(max_attempts=max_attempts)
    tiers = build_tiers(cands, ME, policy)
    state = advance(FailoverState(), tiers, 1.0, policy)
    w = explain(SVC, ME, policy, cands, tiers, state, {}, 1.0)
    rnd = iter(draws)
    planned = plan(tiers, state, lambda: next(rnd), max_attempts)
    c = by_key(w)
    # every planned key is explained as tried, at a slot its group covers
    for i, t in enumerate(planned, 1):
        assert c[t.key].position is not None and c[t.key].position <= i
    # a target never tried is beyond max_attempts (or partial: the draw left it out)
    for k, cand in c.items():
        if k not in {t.key for t in planned}:
            assert cand.partial or "beyond-max-attempts" in cand.reasons
    # unhealthy targets always come after every healthy one
    order = w.to_json(1.0)["order"]
    healthy = [c[k].healthy for k in order]
    assert healthy == sorted(healthy, reverse=True)


def test_http_imports_count_requests_by_backend_cluster():
    from gateway.core.traffic import flows

    tiers = build_tiers([OWN, REGION], ME, DEFAULT)
    st = {"served_by": {}, "failed": 0, "http": {"routes": [
        {"route": "_default", "cluster": "east-2", "classes": [1, 0, 5, 1, 2, 3]},
        {"route": "api", "cluster": "", "classes": [0, 0, 0, 0, 0, 4]}]}}
    got = {(f.destination, f.tier, f.result, f.unit): f.count
           for f in flows("east-1", "default/web", tiers, [st, st])}
    assert got == {("east-2", "region", "served", "requests"): 16,
                   ("east-2", "region", "failed", "requests"): 8,
                   ("none", "none", "failed", "requests"): 8}
