"""East-west links follow identity, with real processes (tests/integration/harness.py): 1 m SVIDs
(`identity.svid_ttl: 1m`, the schema's minimum) rotate at half life, and every link is replaced
make-before-break before either of its certificates expires, under traffic, without a failed
connection. In-process tests of the same (rotation on either side, removal, revocation,
expiry): tests/gateway/dataplane/test_link_lifecycle.py.

Run with `python -m pytest tests/integration/test_link_lifecycle.py -q -s` to see the numbers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers.traffic import LoadStream, chatter, metric_value, wait_for
from tests.integration.harness import NAMES, Topology, running

pytestmark = pytest.mark.integration

CHATTER_SECONDS = 12.0  # each long-lived connection; several span a replacement of their link
MAX_TRAFFIC = 75.0  # the bound of the traffic phase


async def _rolling_chatter(port: int, until: float, spans: list) -> None:
    """Long-lived connections one after another (a line every 200 ms, each CHATTER_SECONDS)
    until `until` (monotonic); each appends (start, end, replies) to `spans`."""
    while time.monotonic() < until - 1.0:
        stop, log = asyncio.Event(), []
        started = time.monotonic()
        asyncio.get_running_loop().call_later(min(CHATTER_SECONDS, until - started), stop.set)
        await chatter(port, stop, log)
        spans.append((started, time.monotonic(), log))


async def test_links_are_replaced_before_their_certificates_expire_under_traffic(tmp_path,
                                                                                 request):
    """east-1 has no healthy local endpoint, so its import goes to east-2 over their link.
    For ~70 s (past the expiry of every first SVID): 20 new connections/s and 2 rolling
    long-lived ones through it; /status of every gateway polled every 0.5 s. Asserts: the
    peer SVID on east-1's active link to east-2 changes as east-2 rotates; 0 failed
    connections (new and long-lived, some spanning a replacement); no link ever shown with an
    expired certificate (either side's)."""
    topo = Topology(tmp_path / "topo", svid_ttl="1m")
    async with running(topo, request):
        east1 = topo.nodes["east-1"]
        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2", timeout=5.0)
        first = {n: (await topo.status(n))["agent"]["svid"] for n in NAMES}
        # until every first SVID has expired (~60 s after the gateways started), plus 5 s
        end_wall = max(s["not_after"] for s in first.values()) + 5.0
        until = time.monotonic() + min(MAX_TRAFFIC, end_wall - time.time())
        load = LoadStream(east1.import_port, rate=20, max_seconds=until - time.monotonic(),
                          max_count=2000, timeout=3.0).start()
        spans: list = []
        chatters = [asyncio.create_task(_rolling_chatter(east1.import_port, until, spans))
                    for _ in range(2)]
        seen: list[tuple[float, str]] = []  # (time, peer serial of east-1's active link)
        expired: list = []
        rows_seen = 0
        try:
            while time.monotonic() < until:
                for name in NAMES:
                    status = await topo.status(name)
                    for row in status["links"]:
                        rows_seen += 1
                        if row["peer_expires_in"] <= 0 or row["own_not_after"] <= time.time():
                            expired.append((name, row))
                        if (name == "east-1" and row["role"] == "caller"
                                and row["peer"] == "east-2" and row["state"] == "active"):
                            if not seen or seen[-1][1] != row["peer_serial"]:
                                seen.append((time.monotonic(), row["peer_serial"]))
                await asyncio.sleep(0.5)
        finally:
            await load.stop()
            await asyncio.gather(*chatters, return_exceptions=True)

        async def on_current() -> bool:  # the active link shows east-2's current SVID
            svid = (await topo.status("east-2"))["agent"]["svid"]["serial"]
            return any(r["peer_serial"] == svid and r["state"] == "active"
                       for r in (await topo.status("east-1"))["links"]
                       if r["role"] == "caller" and r["peer"] == "east-2")

        await wait_for(on_current, 5.0, what="east-1's link to show east-2's current SVID")
        metrics = {n: await topo.metrics(n) for n in NAMES}
        replaced = {n: metric_value(m, "isthmus_gateway_links_replaced_total")
                    for n, m in metrics.items()}
        closed = {n: metric_value(m, "isthmus_gateway_links_closed_total")
                  for n, m in metrics.items()}
        reset = {n: metric_value(m, "isthmus_gateway_link_streams_reset_total")
                 for n, m in metrics.items()}
        svids = {n: (await topo.status(n))["agent"]["svid"]["serial"] for n in NAMES}
        reasons = {f"{role} {why}": sum(metric_value(m, "isthmus_gateway_links_replaced_total",
                                                     f'role="{role}",reason="{why}"')
                                        for m in metrics.values())
                   for role in ("caller", "answerer")
                   for why in ("own-svid-rotated", "peer-bundle-changed", "half-life", "goaway")}

    conns = load.done()
    failed = load.failed
    lines = [r for _, _, log in spans for _, r in log]
    bad_lines = [r for r in lines if r != "east-2"]
    changes = [t for t, _ in seen[1:]]
    spanning = [s for s in spans if any(s[0] < t < s[1] for t in changes)]
    print(f"\nlink lifecycle, 1 m SVIDs: {len(conns)} new connections, {len(failed)} failed; "
          f"{len(spans)} long-lived connections ({len(lines)} lines, {len(bad_lines)} bad, "
          f"{len(spanning)} spanning a replacement); east-1's active link to east-2 showed "
          f"peer serials {[s for _, s in seen]}; SVIDs {first['east-2']['serial']} -> "
          f"{svids}; links replaced {replaced} ({ {k: v for k, v in reasons.items() if v} }), "
          f"closed {closed}, streams reset {reset}; "
          f"{rows_seen} link rows seen, {len(expired)} with an expired certificate")
    assert not failed, [c.error for c in failed[:5]]
    assert not bad_lines, bad_lines[:5]
    assert not expired, expired[:3]
    assert len(seen) >= 2, seen  # replaced: east-2's rotated SVID reached east-1's link
    assert spanning, "no long-lived connection spanned a replacement"
    assert all(n > 0 for n in replaced.values()), replaced
    assert sum(reset.values()) == 0, reset
