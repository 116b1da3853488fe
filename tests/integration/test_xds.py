"""The gateway's ADS driving a real proxyless gRPC client (grpcio, `xds:///` target, bootstrap
from `isthmus xds bootstrap`), with real processes: a federation, three gateways, gRPC echo
servers as every cluster's endpoints of the service `grpc`.

east-1 imports `grpc` and serves xDS. Its client's calls go straight to east-1's own endpoints
(priority 0, no gateway hop); when those stop, to east-1's import listener (priority 1), which
carries them to another cluster; when they are back, back to them. The ADS going away (the
gateway restarted) leaves the client calling on its last config, and it reconnects.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from tests.helpers.processes import Proc, free_port, run_cli
from tests.helpers.traffic import wait_for
from tests.integration.harness import NAMES, Topology, running

pytestmark = pytest.mark.integration

TARGET = "grpc.default.svc.clusterset.local"


class Grpc:
    """gRPC echo servers (2 per cluster) and the xDS client of east-1."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.ports = {c: (free_port(), free_port()) for c in NAMES}
        self.servers: dict[str, list[Proc]] = {}
        self.import_port = free_port()
        self.client: Proc | None = None

    def write_services(self) -> None:
        for c in NAMES:
            eps = "".join(f"      - 127.0.0.1:{p}\n" for p in self.ports[c])
            text = ("exports:\n  - name: grpc\n    port: 50051\n    endpoints:\n" + eps
                    + "    health_check: {kind: tcp, interval: 200ms, timeout: 150ms}\n")
            if c == "east-1":
                text += (f"imports:\n  - name: grpc\n    listen: 127.0.0.1:{self.import_port}\n"
                         "    failover: {tiers: [cluster, zone, region, any], "
                         "failback_after: 1s}\n")
            (self.topo.nodes[c].dir / "services" / "grpc.yaml").write_text(text)

    async def start_servers(self, cluster: str) -> None:
        procs = []
        for port in self.ports[cluster]:
            p = Proc(f"grpc-{cluster}-{port}", [sys.executable, "-m", "tests.helpers.grpc_echo",
                                                cluster, str(port)],
                     self.topo.root / "logs" / f"grpc-{cluster}-{port}.log")
            p.start()
            procs.append(p)
        for p in procs:
            await wait_for(lambda p=p: "ready" in p.tail(5), 10.0, what=f"{p.name} to start")
        self.servers[cluster] = procs

    def stop_servers(self, cluster: str) -> None:
        for p in self.servers.pop(cluster, []):
            p.stop()

    def start_client(self, bootstrap: str) -> None:
        import os

        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap}
        self.client = Proc("grpc-client", [sys.executable, "-m",
                                           "tests.helpers.grpc_xds_client", TARGET],
                           self.topo.root / "logs" / "grpc-client.log", env=env)
        self.client.start()

    def calls(self, since: float = 0.0) -> list[tuple[float, str]]:
        out = []
        for line in self.client.log.read_text().splitlines():
            t, _, reply = line.partition(" ")
            try:
                if float(t) >= since:
                    out.append((float(t), reply))
            except ValueError:
                continue
        return out

    async def until(self, want, timeout: float, what: str) -> float:
        """Until the last 5 calls all satisfy `want`; when the first of them started."""
        found: list[float] = []

        async def ok() -> bool:
            last = self.calls()[-5:]
            if len(last) == 5 and all(want(r) for _, r in last):
                found.append(last[0][0])
                return True
            return False

        await wait_for(ok, timeout, what=what)
        return found[0]

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
        for c in list(self.servers):
            self.stop_servers(c)


@pytest.fixture
async def grpc_topo(tmp_path, request):
    xds_port = free_port()
    top = {c: "services_dir: services\n" for c in NAMES}
    top["east-1"] += f"xds:\n  listen: 127.0.0.1:{xds_port}\n"
    topo = Topology(tmp_path / "topo", top=top)
    g = Grpc(topo)
    g.write_services()
    try:
        for c in NAMES:
            await g.start_servers(c)
        async with running(topo, request):
            yield topo, g
    finally:
        g.stop()


async def test_proxyless_grpc_goes_direct_fails_over_through_the_gateway_and_back(grpc_topo):
    topo, g = grpc_topo
    r = run_cli("xds", "bootstrap", "--config", str(topo.nodes["east-1"].config))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["xds_servers"][0]["server_uri"].startswith("127.0.0.1:")
    g.start_client(r.stdout)
    await g.until(lambda rep: rep == "east-1", 20.0, "the client's calls to reach east-1")
    st = await topo.status("east-1")
    hop = st["listeners"]["import default/grpc"]["accepted"]
    assert st["xds"]["acks"] >= 4 and len(st["xds"]["clients"]) == 1, st["xds"]
    print(f"\nlocal calls: direct to east-1's endpoints ({hop} connection(s) through the "
          "gateway's import listener)")

    t0 = time.monotonic()
    g.stop_servers("east-1")
    moved = await g.until(lambda rep: rep in ("east-2", "west-1"), 15.0,
                          "calls to move to another cluster through the gateway")
    during = [rep for t, rep in g.calls(t0) if t <= moved]
    failed = [rep for rep in during if rep.startswith("ERR")]
    st = await topo.status("east-1")
    assert st["listeners"]["import default/grpc"]["accepted"] > hop  # now through the gateway
    print(f"east-1's endpoints stopped: calls moved to {g.calls()[-1][1]} after "
          f"{moved - t0:.2f} s; {len(failed)} of {len(during)} calls failed meanwhile "
          f"({sorted(set(failed))})")

    t1 = time.monotonic()
    await g.start_servers("east-1")
    back = await g.until(lambda rep: rep == "east-1", 20.0, "calls to come back to east-1")
    back_failed = [rep for t, rep in g.calls(t1) if t <= back and rep.startswith("ERR")]
    print(f"east-1's endpoints back: calls back on them after {back - t1:.2f} s "
          f"({len(back_failed)} failed)")
    assert not back_failed, back_failed[:5]

    # The ADS goes away (the gateway restarts): calls go on, on the client's last config.
    t2 = time.monotonic()
    topo.nodes["east-1"].proc.stop()
    await asyncio.sleep(1.5)
    topo.start_gateway("east-1")
    await topo.wait_ready("east-1")

    async def reconnected() -> bool:
        x = (await topo.status("east-1"))["xds"]
        return len(x["clients"]) == 1 and x["acks"] >= 4

    await wait_for(reconnected, 30.0, what="the client to reconnect to the new ADS")
    during = g.calls(t2)
    bad = [rep for _, rep in during if rep != "east-1"]
    print(f"gateway (ADS) restarted: {len(during)} calls meanwhile, {len(bad)} not answered by "
          f"east-1; the client reconnected {time.monotonic() - t2:.1f} s after the stop")
    assert not bad, bad[:5]
