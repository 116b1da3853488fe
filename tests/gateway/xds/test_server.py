"""gateway/xds/server.py with a real proxyless gRPC client (grpcio, in its own process): ACKs,
a NACKed update that leaves the client on its last good config, coalesced pushes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import replace

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from federation.model import Locality, ServiceKey
from gateway.core.balance import Target
from gateway.core.priorities import Priority
from gateway.xds import server as xds_server
from gateway.xds.resources import ENDPOINT, XdsService, snapshot
from gateway.xds.server import Pusher, XdsServer
from tests.helpers.processes import Proc, free_port
from tests.helpers.traffic import wait_for

ME = Locality("us-east", "a", "east-1")
SVC = ServiceKey("default", "grpc")
NAME = "grpc.default.svc.clusterset.local"


def snap(port: int):
    t = Target("local:x", ME, "127.0.0.1", port, 1, True, False)
    return snapshot([XdsService(SVC, (Priority(ME, (t,)),))])


def with_gap(s):
    """The same snapshot with its assignment's priority 0 made 2: a gap gRPC NACKs."""
    cla = endpoint_pb2.ClusterLoadAssignment()
    s.resources[ENDPOINT][NAME].Unpack(cla)
    cla.endpoints[0].priority = 2
    bad = dict(s.resources[ENDPOINT])
    bad[NAME].Pack(cla)
    return replace(s, resources={**s.resources, ENDPOINT: bad},
                   versions={**s.versions, ENDPOINT: "bad-version"})


@pytest.fixture
async def echo(tmp_path):
    port = free_port()
    p = Proc("grpc-echo", [sys.executable, "-m", "tests.helpers.grpc_echo", "local", str(port)],
             tmp_path / "echo.log")
    p.start()
    await wait_for(lambda: "ready" in p.tail(3), 10.0, what="the gRPC echo server")
    yield port
    p.stop()


async def test_a_nacked_update_leaves_the_client_on_its_last_good_config(tmp_path, echo):
    server = XdsServer(snap(echo))
    await server.start("127.0.0.1", 0)
    boot = {"xds_servers": [{"server_uri": f"127.0.0.1:{server.port}",
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}], "node": {"id": "t"}}
    client = Proc("client", [sys.executable, "-m", "tests.helpers.grpc_xds_client", NAME],
                  tmp_path / "client.log",
                  env={**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(boot)})
    client.start()
    try:
        await wait_for(lambda: client.tail(1).endswith(" local"), 20.0, what="calls to work")
        assert server.stats.acks >= 4 and not server.stats.nacks
        good_version = server.snapshot.versions[ENDPOINT]
        server.update(with_gap(server.snapshot))
        await wait_for(lambda: server.stats.nacks[ENDPOINT] >= 1, 10.0, what="a NACK")
        stream = next(iter(server.streams))
        assert stream.acked[ENDPOINT] == good_version  # the last good one, still
        await asyncio.sleep(0.5)
        lines = client.log.read_text().splitlines()[-5:]
        assert all(ln.endswith(" local") for ln in lines), lines  # still calling on it
    finally:
        client.stop()
        await server.close()


async def test_a_burst_of_changes_is_one_push(monkeypatch):
    monkeypatch.setattr(xds_server, "DEBOUNCE", 0.05)
    server = XdsServer(snap(1))
    builds = []

    def build():
        builds.append(1)
        return snap(2)

    pusher = Pusher(server, build)
    task = asyncio.create_task(pusher.run())
    try:
        for _ in range(20):
            pusher.mark()
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        assert len(builds) == 1 and server.snapshot.versions == snap(2).versions
    finally:
        task.cancel()
