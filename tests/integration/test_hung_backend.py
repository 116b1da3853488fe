"""A hung backend: one of east-1's two endpoints is SIGSTOPped for 10 s under 40 new conn/s.

A stopped process is the fault L4 sees worst: its kernel still completes TCP handshakes from the
accept queue (backlog 100) and takes the bytes sent, so connects succeed, a plain tcp health
check succeeds, and outlier detection on connects sees successes, while every connection
committed to it waits for an answer that never comes (the client gives up after 3 s).

Each scenario starts a topology whose health checks run every 1 s (timeout 500 ms, 2 failures
to go unhealthy: the defaults), freezes the backend (a ProcessBackend of tests/helpers/
backends.py, by PID), thaws it, and measures: how long until east-1's /status shows the endpoint
unroutable, how many client connections failed, and when the last of them started.
Run with `-s` to see the numbers.

- `tcp`: the blind spot, kept as the reference (a plain tcp check and no response_timeout).
- `send-expect`, `http`: active checks that need the app: the endpoint goes unhealthy in about
  two check intervals; only connections committed before that fail.
- `+response_timeout` (500 ms): the passive signal ejects after the first silent connection,
  sooner than the checks; the connections it resets count as response timeouts, not as served.
  With only a tcp check beside it, each ejection that ends (2 s, then 4 s, 8 s) lets one more
  response_timeout's worth of connections in before the next.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers.backends import ProcessBackend
from tests.helpers.traffic import LoadStream, metric_value
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration

CHECK = {"interval": "1s", "timeout": "500ms"}
SCENARIOS = {
    "tcp": ({"kind": "tcp", **CHECK}, {}),
    "send-expect": ({"kind": "tcp", "send": '"ping\\n"', "expect": '"{cluster}"', **CHECK}, {}),
    "http": ({"kind": "http", "path": "/healthz", **CHECK}, {}),
    "tcp+response_timeout": ({"kind": "tcp", **CHECK}, {"response_timeout": "500ms"}),
    "http+response_timeout": ({"kind": "http", "path": "/healthz", **CHECK},
                              {"response_timeout": "500ms"}),
}
RATE, FREEZE, CLIENT_TIMEOUT = 40, 10.0, 3.0
LISTENER = 'listener="import default/echo"'


async def _routable_timeline(topo: Topology, key: str, until: float) -> list[tuple[float, bool]]:
    """(time, routable) of `key` in east-1's /status, every 100 ms until `until`."""
    out: list[tuple[float, bool]] = []
    while time.monotonic() < until:
        try:
            health = (await topo.status("east-1"))["health"]
            out.append((time.monotonic(), health.get(key, {}).get("routable", True)))
        except Exception:  # a slow answer under load: skip the sample
            pass
        await asyncio.sleep(0.1)
    return out


def _counters(text: str) -> dict[str, float]:
    return {
        "served": metric_value(text, "isthmus_gateway_served_total", LISTENER),
        "timeouts": metric_value(
            text, "isthmus_gateway_upstream_response_timeouts_total", LISTENER
        ),
        "failed": metric_value(text, "isthmus_gateway_connections_failed_total", LISTENER),
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_sigstopped_backend(tmp_path, request, scenario):
    """One of two endpoints SIGSTOPped 10 s under 40 conn/s: a tcp check misses it (>= 40 lost);
    the others take it out in < 4 s and lose none later (active) or <= 60 (passive)."""
    health_check, outlier = SCENARIOS[scenario]
    topo = Topology(tmp_path, health_check=health_check, outlier_detection=outlier)
    frozen: ProcessBackend = topo.use_process_backend("east-1")
    key = f"local:{frozen.address}"
    async with running(topo, request):
        before = _counters(await topo.metrics("east-1"))
        stream = LoadStream(topo.nodes["east-1"].import_port, rate=RATE, max_seconds=30,
                            max_count=1200, timeout=CLIENT_TIMEOUT).start()
        await asyncio.sleep(2.0)
        t0 = time.monotonic()
        frozen.freeze()
        timeline = await _routable_timeline(topo, key, t0 + FREEZE)
        frozen.thaw()
        t1 = time.monotonic()
        timeline += await _routable_timeline(topo, key, t1 + CLIENT_TIMEOUT + 3.0)
        await stream.stop()
        await asyncio.sleep(0.5)
        after = _counters(await topo.metrics("east-1"))

    done = stream.done()
    failed = [c for c in done if c.reply is None]
    ok = len(done) - len(failed)
    down = next((t for t, r in timeline if t >= t0 and not r), None)
    detected = None if down is None else down - t0
    back = next((t for t, r in timeline if t >= t1 and r), None)
    last_failed = max((c.started for c in failed), default=None)
    delta = {k: after[k] - before[k] for k in after}
    print(f"\nSIGSTOP {FREEZE:g}s of one of two endpoints at {RATE} conn/s, {scenario}: "
          f"{len(done)} connections, {len(failed)} failed; unroutable after "
          f"{'never' if detected is None else f'{detected:.2f}s'}; last failed connection "
          f"started {'-' if last_failed is None else f'{last_failed - t0:+.2f}s'} from the "
          f"SIGSTOP; routable again {'never' if back is None else f'{back - t1:.2f}s'} after "
          f"SIGCONT; metrics: served +{delta['served']:g}, response timeouts "
          f"+{delta['timeouts']:g}, failed +{delta['failed']:g} (clients: {ok} ok)")

    assert done and len(done) >= 0.9 * RATE * (2.0 + FREEZE + CLIENT_TIMEOUT + 3.0), len(done)
    if scenario == "tcp":
        # The reference: nothing notices the app is gone, its share of connections is lost,
        # and the gateway counts every one of them as served.
        assert len(failed) >= RATE * 0.5 * 2, len(failed)
        assert delta["served"] == len(done) and delta["timeouts"] == 0
        return
    assert detected is not None, "the frozen endpoint was never taken out of rotation"
    assert detected < 4.0, detected  # ~2 s for the checks, ~0.5 s for the response timeout
    assert back is not None, "the thawed endpoint never came back"
    late = [c for c in failed if c.started > down + 0.3]  # (100 ms of status polling slack)
    if health_check.get("kind") == "http" or "expect" in health_check:
        # The active check keeps it out: only connections committed before that fail.
        assert not late, [round(c.started - t0, 2) for c in late]
    else:
        # The passive path alone: each time an ejection ends (2 s, 4 s, 8 s: it doubles), the
        # connections of one response_timeout are lost again before the next ejection.
        assert len(failed) <= 3 * (RATE / 2 * 0.5) * 2, len(failed)
    if outlier:
        # Honest counters: what clients got is what the gateway says it served; every lost
        # connection is a response timeout (the gateway reset it before the client gave up).
        assert delta["served"] == ok, (delta, ok)
        assert delta["timeouts"] + delta["failed"] == len(failed), (delta, len(failed))
        assert delta["timeouts"] >= 1
