"""xDS resources for the services a gateway imports (pure: values -> Envoy API messages).

For each imported service, named as in DNS (`<svc>.<ns>.svc.clusterset.local`, what a
proxyless gRPC client dials as `xds:///<name>`):

    Listener               <name>  an API listener: HttpConnectionManager, routes by RDS, the
                                   router filter (gRPC requires it)
    RouteConfiguration     <name>  one virtual host (domains *), every path to cluster <name>
    Cluster                <name>  EDS over ADS, ROUND_ROBIN
    ClusterLoadAssignment  <name>  core/priorities.py: priority 0 = our own endpoints, direct;
                                   then our import listener (the gateway's hop, cross-cluster)

Every locality has load_balancing_weight > 0 and priorities have no gaps (gRPC NACKs or drops
anything else); health is HEALTHY or UNHEALTHY from our health state. `snapshot()` returns the
resources by type URL, each packed in an Any, and a version per type that changes only when
that type's content does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from federation.model import ServiceKey
from gateway.core.priorities import Priority

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINT)

__all__ = ["CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "TYPES", "Snapshot", "XdsService",
           "resource_name", "snapshot"]


def resource_name(svc: ServiceKey, zone: str = "clusterset.local") -> str:
    return f"{svc.name}.{svc.namespace}.svc.{zone}"


@dataclass(frozen=True, slots=True)
class XdsService:
    service: ServiceKey
    priorities: tuple[Priority, ...]


@dataclass(frozen=True)
class Snapshot:
    resources: dict[str, dict[str, any_pb2.Any]]  # type URL -> name -> resource
    versions: dict[str, str]  # type URL -> version of its content


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _pack(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def listener(name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=name, config_source=_ads()),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                         typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(hcm)))


def route(name: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[
        route_components_pb2.VirtualHost(
            name=name, domains=["*"],
            routes=[route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix=""),
                route=route_components_pb2.RouteAction(cluster=name))])])


def cluster(name: str, connect_timeout: float) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(),
                                                                 service_name=name),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        connect_timeout=duration_pb2.Duration(nanos=int(connect_timeout * 1e9) % 10**9,
                                              seconds=int(connect_timeout)))


def assignment(name: str, prios: Sequence[Priority]) -> endpoint_pb2.ClusterLoadAssignment:
    groups = []
    for i, p in enumerate(prios):
        eps = [endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=t.host, port_value=t.port))),
            health_status=health_check_pb2.HEALTHY if t.healthy else health_check_pb2.UNHEALTHY,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=t.weight))
            for t in p.targets]
        groups.append(endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(region=p.locality.region, zone=p.locality.zone,
                                       sub_zone=p.locality.cluster),
            lb_endpoints=eps, priority=i,
            load_balancing_weight=wrappers_pb2.UInt32Value(
                value=max(1, sum(t.weight for t in p.targets)))))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=groups)


def snapshot(services: Sequence[XdsService], connect_timeout: float = 1.0,
             zone: str = "clusterset.local") -> Snapshot:
    res: dict[str, dict[str, any_pb2.Any]] = {t: {} for t in TYPES}
    for s in sorted(services, key=lambda x: (x.service.namespace, x.service.name)):
        name = resource_name(s.service, zone)
        res[LISTENER][name] = _pack(listener(name))
        res[ROUTE][name] = _pack(route(name))
        res[CLUSTER][name] = _pack(cluster(name, connect_timeout))
        res[ENDPOINT][name] = _pack(assignment(name, s.priorities))
    versions = {}
    for t, by_name in res.items():
        h = hashlib.sha256()
        for n, a in sorted(by_name.items()):
            h.update(n.encode() + b"\0" + a.SerializeToString(deterministic=True) + b"\0")
        versions[t] = h.hexdigest()[:16]
    return Snapshot(res, versions)
