"""The dashboard, `isthmus why` and every /metrics page, against the harness topology.

Real processes (tests/integration/harness.py: a federation and east-1, east-2, west-1), new
connections into east-1's import listener for `default/echo` (10/s, from this test), and a
headless Chromium over CDP (tests/helpers/cdp.py) signed in with the dashboard token:

1. the page loads with no console error, shows every cluster and the service, and its map has
   east-1's traffic kept in east-1 (edge `east-1>east-1`);
2. east-1's endpoints are stopped: the map's `east-1>east-2` edge carries the traffic within
   a few seconds (measured, printed); `#cluster=west-1` (one gateway's view) leaves east-1's
   traffic out;
3. a drill (`isthmus drill run`, blackhole of us-west) shows as running, with its timeline;
4. screenshots of each step go to a tmp dir, whose path is printed;
5. `isthmus why default/echo --from east-1` names why east-1's endpoints are skipped, and
   `promtool check metrics` passes on the federation's and every gateway's /metrics.
Without the token the page and its state are 401 on the admin port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.cdp import Browser, chromium
from tests.helpers.processes import free_port, run_cli
from tests.helpers.traffic import http_get, wait_for
from tests.helpers.traffic import request as connect
from tests.integration.harness import NAMES, Topology, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def traffic(port: int, stop: asyncio.Event) -> None:
    """New connections, 10 per second, until `stop` (failures are the gateway's to count)."""
    while not stop.is_set():
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            await connect(port, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


def promtool_check(text: str, what: str) -> None:
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"promtool on {what}: {r.stdout}{r.stderr}"


async def edge_rate(b: Browser, edge: str) -> float:
    v = await b.eval(f"(document.querySelector('#map [data-edge=\"{edge}\"]') || "
                     "{getAttribute: () => '0'}).getAttribute('data-rate')")
    return float(v or 0)


@pytest.mark.skipif(chromium() is None, reason="no chromium: apt-get install -y chromium")
async def test_dashboard_shows_clusters_map_failover_and_drill(tmp_path, request):
    shots = Path(tempfile.mkdtemp(prefix="isthmus-dashboard-"))
    print(f"\ndashboard screenshots: {shots}")
    topo = Topology(tmp_path)
    async with running(topo, request):
        east1 = topo.nodes["east-1"]
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(east1.import_port, stop))
        try:
            ui = f"http://127.0.0.1:{topo.fed_admin_port}/ui/"
            assert (await http_get(topo.fed_admin_port, "/ui/"))[0] == 401
            assert (await http_get(topo.fed_admin_port, "/ui/api/state"))[0] == 401
            token_file = topo.fed_dir / "operator" / "dashboard-token"
            assert token_file.stat().st_mode & 0o077 == 0
            token = token_file.read_text().strip()
            async with Browser(tmp_path) as b:
                await b.goto(f"{ui}?token={token}")
                assert await b.eval("location.pathname + location.search") == "/ui/"

                async def drawn() -> bool:
                    got = await b.eval("[...document.querySelectorAll('#clusters "
                                       "[data-cluster]')].map(e => e.dataset.cluster)")
                    return sorted(got or []) == sorted(NAMES)
                await wait_for(drawn, 10, 0.2, "every cluster on the page")
                assert await b.eval("!!document.querySelector("
                                    "'#services tr[data-service=\"default/echo\"]')")
                await wait_for(lambda: edge_rate(b, "east-1>east-1"), 10, 0.2,
                               "east-1's own traffic on the map")
                await b.screenshot(shots / "1-all-up.png")

                await topo.stop_backends("east-1")
                t0 = time.monotonic()
                took = await wait_for(lambda: edge_rate(b, "east-1>east-2"), 10, 0.1,
                                      "east-1 -> east-2 on the map after east-1's endpoints died")
                print(f"map showed east-1 -> east-2 {took:.2f} s after the kill")
                assert took < 5.0
                await wait_for(lambda: b.eval("document.querySelectorAll("
                                              "'#events li[data-kind=\"failover\"]').length"),
                               5, 0.2, "the failover in recent events")
                await b.screenshot(shots / "2-east-1-down.png")
                await b.eval("location.hash = 'cluster=west-1'")  # one gateway's view
                await wait_for(lambda: b.eval("document.querySelectorAll('#map "
                                              "[data-edge^=\"east-1>\"]').length === 0"),
                               5, 0.2, "west-1's view without east-1's traffic")
                await b.eval("location.hash = ''")
                await wait_for(lambda: edge_rate(b, "east-1>east-2"), 5, 0.2, "all traffic again")
                assert time.monotonic() - t0 < 15

                drill = topo._proc("drill", [
                    "drill", "run", "--federation", topo.fed_url, "--credentials",
                    str(topo.fed_dir / "operator"), "--region", "us-west", "--mode",
                    "blackhole", "--duration", "4s", "--baseline", "1s", "--settle", "2s"])
                drill.start()
                await wait_for(lambda: b.eval("document.getElementById('drill').dataset.state"
                                              " === 'running'"), 15, 0.2, "a running drill")
                await wait_for(lambda: b.eval("document.querySelectorAll("
                                              "'#drill-timeline rect[data-t]').length > 1"),
                               10, 0.2, "the drill's timeline")
                await b.screenshot(shots / "3-drill-running.png")
                await wait_for(lambda: b.eval("['ended', 'aborted'].includes("
                                              "document.getElementById('drill').dataset.state)"),
                               30, 0.5, "the drill's end")
                await b.screenshot(shots / "4-drill-report.png")
                drill.stop()
                assert b.errors == [], b.errors
        finally:
            stop.set()
            await load
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, shot


async def test_why_and_promtool_on_every_metrics_page(tmp_path, request):
    if shutil.which("promtool") is None:
        pytest.skip("no promtool: apt-get install -y prometheus")
    sides = (f"dns: {{listen: 127.0.0.1:{free_port()}}}\n"
             f"xds: {{listen: 127.0.0.1:{free_port()}}}\n")
    topo = Topology(tmp_path, top={"east-1": sides})  # its DNS and xDS metrics too
    async with running(topo, request):
        east1 = topo.nodes["east-1"]
        for _ in range(5):
            await connect(east1.import_port)
        await topo.stop_backends("east-1")
        for _ in range(5):  # connect-time failover: these go to east-2; east-1's are ejected
            await connect(east1.import_port)

        async def reported() -> bool:
            st = await topo.fed_status()
            return st["clusters"]["east-1"].get("admin") is not None
        await wait_for(reported, 10, 0.2, "east-1's admin address at the federation")
        fed = f"http://127.0.0.1:{topo.fed_admin_port}"
        r = run_cli("why", "default/echo", "--from", "east-1", "--federation", fed, "--json")
        assert r.returncode == 0, r.stderr
        why = json.loads(r.stdout)
        assert why["active_tier"] == "region" and why["order"][0] == "remote:east-2"
        local = [c for c in why["candidates"] if c["cluster"] == "east-1"]
        assert len(local) == 2
        for c in local:
            assert set(c["reasons"]) & {"check-unhealthy", "ejected"}, c
        text = run_cli("why", "default/echo", "--from", "east-1", "--federation", fed)
        assert text.returncode == 0 and "LAST RESORT" in text.stdout, text.stdout
        wrong = run_cli("why", "default/echo", "--from", "east-2", "--admin",
                        f"127.0.0.1:{east1.admin_port}")
        assert wrong.returncode == 1 and "not 'east-2'" in wrong.stderr, wrong.stderr
        missing = run_cli("why", "default/nope", "--from", "east-1", "--admin",
                          f"127.0.0.1:{east1.admin_port}")
        assert missing.returncode == 1 and "imports no service" in missing.stderr

        status, text = await http_get(topo.fed_admin_port, "/metrics")
        assert status == 200
        promtool_check(text, "the federation")
        assert "isthmus_federation_request_duration_seconds_bucket" in text
        for name in NAMES:
            page = await topo.metrics(name)
            promtool_check(page, f"gateway {name}")
        page = await topo.metrics("east-1")
        assert 'isthmus_gateway_import_connections_total{source="east-1",destination="east-2"' \
            in page
        assert 'isthmus_gateway_failovers_total{service="default/echo"}' in page
        assert "isthmus_gateway_dns_response_seconds_bucket" in page
        assert "isthmus_gateway_xds_clients" in page
