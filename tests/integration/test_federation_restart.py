"""A federation outage longer than the lease TTL, then a restart: nothing may be withdrawn.

The federation is not on the data path, but a restarted one used to find every stored lease
past its deadline (the outage outlasted the 2 s TTL) and withdraw every cluster's exports
~0.2 s after start, before any gateway could renew; gateways then saw no remote exports for
up to ~1.4 s and sent traffic to their own dead endpoints. Here east-1's own endpoints are
dead, so every connection to its import listener depends on the exports of east-2 and
west-1 staying in its catalog, during the outage and after the restart.

Run with `-s` to see the numbers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers.traffic import LoadStream
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration

RATE = 40.0  # new connections per second through east-1's import listener
AFTER_RESTART = 8.0  # seconds of traffic after the federation serves again (4 lease TTLs)


async def _leases(topo: Topology) -> dict[str, int | None]:
    return {name: (await topo.status(name))["agent"]["lease"] for name in topo.nodes}


async def _outage_then_restart(topo: Topology, outage: float) -> None:
    east1 = topo.nodes["east-1"]
    await topo.stop_backends("east-1")
    await topo.wait_served("east-1", "east-2")
    leases_before = await _leases(topo)
    assert None not in leases_before.values(), leases_before
    fed_log_start = topo.fed_proc.log.stat().st_size

    seconds = 1.0 + outage + AFTER_RESTART + 15.0  # a bound; stop() ends it earlier
    stream = LoadStream(east1.import_port, rate=RATE, max_seconds=seconds,
                        max_count=int(RATE * seconds)).start()
    try:
        await asyncio.sleep(1.0)
        assert topo.fed_proc.stop() == 0
        t_down = time.monotonic()
        await asyncio.sleep(outage)
        topo.fed_proc.start()
        await topo.wait_federation()
        t_up = time.monotonic()
        await asyncio.sleep(AFTER_RESTART)
    finally:
        await stream.stop()

    during = [c for c in stream.failed if c.started < t_up]
    after = [c for c in stream.failed if c.started >= t_up]
    print(f"\nfederation down {t_up - t_down:.1f} s (lease ttl 2s), {len(stream.done())} "
          f"connections at {RATE:g}/s through east-1 (own endpoints dead): "
          f"{len(during)} failed during the outage, {len(after)} failed after the restart; "
          f"replies {stream.counts()}")
    fed_log = topo.fed_proc.log.read_bytes()[fed_log_start:].decode(errors="replace")
    withdrawn = [line for line in fed_log.splitlines() if "exports withdrawn" in line]
    assert not stream.failed, [c.error for c in stream.failed][:5]
    assert not withdrawn, withdrawn
    assert await _leases(topo) == leases_before  # kept alive across the restart, not re-granted
    fed = await topo.fed_status()
    assert all(c["live"] for c in fed["clusters"].values()), fed["clusters"]
    assert sorted((await topo.status("east-1"))["catalog"]["live"]) == sorted(topo.nodes)


async def test_federation_restart_after_30s_outage_withdraws_nothing(tmp_path, request):
    """40 new conn/s through a 30 s federation outage and 8 s after the restart (own endpoints
    dead): 0 failed, 0 exports withdrawn, leases kept."""
    async with running(Topology(tmp_path), request) as topo:
        await _outage_then_restart(topo, 30.0)


@pytest.mark.timeout(300)
async def test_federation_restart_after_3min_outage_withdraws_nothing(tmp_path, request):
    """40 new conn/s through a 3 min federation outage and 8 s after the restart (own endpoints
    dead): 0 failed, 0 exports withdrawn, leases kept."""
    async with running(Topology(tmp_path), request) as topo:
        await _outage_then_restart(topo, 180.0)
