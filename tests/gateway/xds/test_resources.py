"""gateway/core/priorities.py and gateway/xds/resources.py (pure): tiers -> priorities ->
Envoy API messages that parse back and follow gRPC's rules (weights > 0, no priority gaps)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from federation.model import FailoverPolicy, Locality, ServiceKey, TierKind
from gateway.core.balance import Target, build_tiers
from gateway.core.priorities import priorities
from gateway.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsService, snapshot

ME = Locality("us-east", "a", "east-1")
SVC = ServiceKey("default", "grpc")
LISTEN = ("127.0.0.1", 16001)


def target(key: str, loc: Locality, healthy: bool = True, remote: bool = False,
           weight: int = 1) -> Target:
    return Target(key, loc, "127.0.0.1", 9000 + len(key), weight, healthy, remote)


def tiers(*targets: Target, policy: FailoverPolicy | None = None):
    return build_tiers(list(targets), ME, policy or FailoverPolicy())


LOCAL = [target("local:a", ME), target("local:bb", ME, weight=3)]
EAST2 = target("remote:east-2", Locality("us-east", "b", "east-2"), remote=True)
WEST = target("remote:west-1", Locality("us-west", "a", "west-1"), healthy=False, remote=True)


def test_local_endpoints_first_then_the_gateway_listener():
    got = priorities(tiers(*LOCAL, EAST2, WEST), ME, LISTEN)
    assert [[t.key for t in p.targets] for p in got] == [
        ["local:a", "local:bb"], ["listener:127.0.0.1:16001"]]
    assert got[1].targets[0].healthy  # east-2 is healthy beyond the local tier


def test_the_listener_is_unhealthy_when_nothing_beyond_is():
    got = priorities(tiers(*LOCAL, WEST), ME, LISTEN)
    assert not got[1].targets[0].healthy


def test_without_a_cluster_tier_the_listener_is_priority_0():
    policy = FailoverPolicy((TierKind.REGION, TierKind.ANY))
    got = priorities(tiers(*LOCAL, EAST2, policy=policy), ME, LISTEN)
    assert [p.targets[0].key for p in got] == ["listener:127.0.0.1:16001"]


def test_nothing_beyond_no_listener():
    assert [len(p.targets) for p in priorities(tiers(*LOCAL), ME, LISTEN)] == [2]


def _unpack(any_msg, cls):
    out = cls()
    assert any_msg.Unpack(out)
    return out


def test_snapshot_resources_parse_back_and_follow_grpcs_rules():
    local = [target("local:a", ME, healthy=False), target("local:bb", ME, weight=3)]
    snap = snapshot([XdsService(SVC, priorities(tiers(*local, EAST2), ME, LISTEN))])
    name = "grpc.default.svc.clusterset.local"
    assert all(list(snap.resources[t]) == [name] for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT))
    lis = _unpack(snap.resources[LISTENER][name], listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    assert lis.api_listener.api_listener.Unpack(hcm)
    assert hcm.rds.route_config_name == name
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
    cl = _unpack(snap.resources[CLUSTER][name], cluster_pb2.Cluster)
    assert cl.type == cluster_pb2.Cluster.EDS and cl.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    cla = _unpack(snap.resources[ENDPOINT][name], endpoint_pb2.ClusterLoadAssignment)
    assert [g.priority for g in cla.endpoints] == [0, 1]
    assert all(g.load_balancing_weight.value > 0 for g in cla.endpoints)
    health = [[e.health_status for e in g.lb_endpoints] for g in cla.endpoints]
    assert health == [[health_check_pb2.UNHEALTHY, health_check_pb2.HEALTHY],
                      [health_check_pb2.HEALTHY]]
    assert cla.endpoints[0].locality.sub_zone == "east-1"


def test_versions_change_only_with_their_content():
    a = snapshot([XdsService(SVC, priorities(tiers(*LOCAL, EAST2), ME, LISTEN))])
    b = snapshot([XdsService(SVC, priorities(tiers(*LOCAL, EAST2), ME, LISTEN))])
    assert a.versions == b.versions
    sick = [target("local:a", ME, healthy=False), LOCAL[1]]
    c = snapshot([XdsService(SVC, priorities(tiers(*sick, EAST2), ME, LISTEN))])
    changed = {t for t in a.versions if a.versions[t] != c.versions[t]}
    assert changed == {ENDPOINT}
