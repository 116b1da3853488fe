"""What an operator reads in a gateway's log when failover happens: one INFO line per tier
switch, endpoint health change, peer gateway lost or back and lease expiry seen, each naming the
service and the cluster. Real processes (harness.py); the lines are read from the log file."""

from __future__ import annotations

import pytest

from tests.helpers.traffic import wait_for
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration


async def test_failover_events_are_logged_at_info(tmp_path, request):
    """east-1's log names every failover event: 2 tier switches (exactly), 2 endpoints unhealthy and
    healthy again, a peer lost after 2 failed probes and its lease expiry."""
    async with running(Topology(tmp_path), request) as topo:
        east1 = topo.nodes["east-1"]

        async def logged(text: str) -> None:
            await wait_for(lambda: text in east1.proc.log.read_text(), 10.0,
                           what=f"east-1 to log {text!r}")

        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2")
        await logged("INFO isthmus.gateway: import default/echo (cluster east-1): traffic moves "
                     "from tier 'cluster' to 'region' (clusters east-2)")
        for b in east1.backends:
            await logged(f"endpoint 127.0.0.1:{b.port} of default/echo (cluster east-1) unhealthy "
                         "after 2 failed health check(s)")

        await topo.restart_backends("east-1")
        await topo.wait_served("east-1", "east-1")
        await logged("import default/echo (cluster east-1): traffic moves from tier 'region' to "
                     "'cluster' (clusters east-1)")
        await logged("of default/echo (cluster east-1) healthy again after 2 good health check(s)")

        topo.nodes["east-2"].proc.stop()
        await logged("peer gateway of cluster east-2 (imports default/echo) lost after 2 failed "
                     "probe(s)")
        await logged("INFO isthmus.gateway.agent: cluster east-2: lease expired at the federation")
        text = east1.proc.log.read_text()
        assert text.count("traffic moves from tier") == 2, text[-3000:]
