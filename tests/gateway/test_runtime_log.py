"""The gateway's INFO lines for failover transitions (runtime._log_transitions): what the
routers and the health book report as changed becomes one line each, naming the service and
the cluster, rate-limited. Driven through a real Gateway's routers and book with a fake clock;
nothing is bound (start() is not called)."""

from __future__ import annotations

import logging
from pathlib import Path

from federation.model import Endpoint, Export, Locality, ServiceKey
from gateway.config.schema import parse_config
from gateway.dataplane.router import remote_key
from gateway.runtime import Gateway

SVC = ServiceKey("default", "echo")
EAST_2 = Locality("us-east", "b", "east-2")
TEXT = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:9", ca_file: ca.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
outlier_detection: {consecutive_failures: 2, base_ejection: 2s, max_ejection: 60s}
exports:
  - {name: echo, port: 8080, endpoints: ["127.0.0.1:19001"]}
imports:
  - {name: echo, listen: "127.0.0.1:16001", failover: {failback_after: 2s}}
"""


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def gateway() -> tuple[Gateway, Clock]:
    clock = Clock()
    g = Gateway(parse_config(TEXT, Path("/etc/isthmus/gw.yaml")))
    g._mono = clock  # the routers take the clock when built
    g._build_routers()
    g.gateways["east-2"] = ("127.0.0.1", 15444)
    export = Export("east-2", "default", "echo", 8080, "tcp", (Endpoint("10.0.0.2", 80, True, 1),))
    g.import_routers[SVC].set_remote([(EAST_2, export)])
    return g, clock


def lines(caplog) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == "isthmus.gateway"]
    caplog.clear()
    return out


def fail_local(g: Gateway) -> None:
    router = g.import_routers[SVC]
    router.tick()
    target = next(t for tier in router.tiers for t in tier.targets if not t.remote)
    for _ in range(2):
        router.report(target, False)


def test_tier_switches_ejections_and_returns_are_logged_at_info(caplog):
    caplog.set_level(logging.INFO, "isthmus.gateway")
    g, clock = gateway()
    router = g.import_routers[SVC]
    router.plan()
    g._log_transitions()
    assert lines(caplog) == [
        "import default/echo (cluster east-1): traffic goes to tier 'cluster' (clusters east-1)"]

    fail_local(g)
    router.plan()
    g._log_transitions()
    assert lines(caplog) == [
        "import default/echo (cluster east-1): traffic moves from tier 'cluster' to 'region' "
        "(clusters east-2)",
        "endpoint 127.0.0.1:19001 of default/echo (cluster east-1) ejected for 2.0s after 2 "
        "failed connect(s)",
    ]
    clock.t += 2.0
    router.tick()
    g._log_transitions()
    assert lines(caplog) == ["endpoint 127.0.0.1:19001 of default/echo (cluster east-1) back "
                             "from ejection"]
    clock.t += 2.0  # failback_after
    router.tick()
    g._log_transitions()
    assert lines(caplog) == [
        "import default/echo (cluster east-1): traffic moves from tier 'region' to 'cluster' "
        "(clusters east-1)"]
    for _ in range(20):  # a quiet gateway logs nothing
        router.plan()
        g._log_transitions()
    assert lines(caplog) == []


def test_a_peer_gateway_lost_and_back_and_an_endpoint_check_are_logged(caplog):
    caplog.set_level(logging.INFO, "isthmus.gateway")
    g, clock = gateway()
    for ok in (False, False, True, True):
        g.book.probe(remote_key("east-2"), ok, clock(), 2, 2)
    for ok in (False, False):
        g.book.probe("local:127.0.0.1:19001", ok, clock(), 2, 2)
    g._log_transitions()
    assert lines(caplog) == [
        "peer gateway of cluster east-2 (imports default/echo) lost after 2 failed probe(s)",
        "peer gateway of cluster east-2 (imports default/echo) back after 2 good probe(s)",
        "endpoint 127.0.0.1:19001 of default/echo (cluster east-1) unhealthy after 2 failed "
        "health check(s)",
    ]


def test_flapping_is_rate_limited_per_target(caplog):
    caplog.set_level(logging.INFO, "isthmus.gateway")
    g, clock = gateway()
    key = remote_key("east-2")
    for _ in range(50):
        g.book.probe(key, False, clock(), 1, 1)
        g.book.probe(key, True, clock(), 1, 1)
        g._log_transitions()
    about_peer = [m for m in lines(caplog) if "peer gateway" in m]
    assert len(about_peer) == g.events.burst
