"""The gateway side of drills, with real processes (tests/integration/harness.py topology).

Drills are created through the federation API with the operator client, on cluster east-2
(so east-1 and west-1 observe). Each test speaks the link protocol to east-2's inbound listener
directly, with west-1's real SVID, to see what an in-scope gateway answers: drain -> `ERR
draining` (PING still PONG), blackhole -> nothing at all to OPEN or PING, degrade -> `ERR
degraded` at error_rate 1.0 and an `OK` delayed by the latency. Every fault must be gone at the
deadline, also when the federation was SIGKILLed mid-drill.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from federation.client import operator_client
from federation.drill_model import Drill
from federation.identity import Svid
from gateway.dataplane import link
from tests.helpers.traffic import http_get, metric_value, wait_for
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration


@pytest.fixture
async def topo(tmp_path, request):
    async with running(Topology(tmp_path / "topo"), request) as t:
        yield t


def operator(topo: Topology):
    return operator_client(topo.fed_url, topo.fed_dir / "operator")


async def start_drill(topo: Topology, **spec) -> Drill:
    body = {"scope": {"cluster": "east-2"}, "baseline": "1s", "settle": "0s", **spec}
    async with operator(topo) as op:
        return await op.create_drill(body)


async def _connect(topo: Topology, tmp: Path, node: str = "east-2"):
    """A TLS link to `node`'s inbound listener as west-1's gateway (its real SVID)."""
    west = topo.nodes["west-1"]
    svid = Svid.load(west.state_dir / "identity")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.pem").write_bytes(svid.cert_pem)
    (tmp / "k.pem").write_bytes(svid.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we look at what the server answers, not at who it is
    ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", topo.nodes[node].inbound_port, ssl=ctx, server_hostname=node
        ),
        3.0,
    )


async def relay_line(reader, writer, frames: link.FrameReader) -> bytes:
    """Send one line on an open stream; return the backend's reply line."""
    writer.write(link.frame(link.DATA, 1, b"hi\n"))
    line = b""
    while not line.endswith(b"\n"):
        more = await asyncio.wait_for(reader.read(4096), 3.0)
        assert more, "stream closed before the backend answered"
        for kind, _, payload in frames.feed(more):
            if kind == link.DATA:
                line += payload
    return line.strip()


async def link_call(topo: Topology, tmp: Path, kind: int, timeout: float, node: str = "east-2",
                    keep: list | None = None) -> tuple[str, float]:
    """Send OPEN default/echo (or PING) on a new link to `node`; return (what came back: 'OK',
    'ERR <code>', 'PONG', 'silent' or 'closed: EOF', seconds). After OK, one line is relayed
    through the stream to check it works; with `keep`, the open stream is appended to it
    (reader, writer, frames) instead of being closed."""
    reader, writer = await _connect(topo, tmp, node)
    started = time.monotonic()
    kept = False
    try:
        if kind == link.OPEN:
            writer.write(link.control(link.OPEN, 1, {"v": link.VERSION, "service": "default/echo"}))
        else:
            writer.write(link.frame(link.PING, 0, b"probe123"))
        frames = link.FrameReader()
        while True:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                return "silent", time.monotonic() - started
            try:
                data = await asyncio.wait_for(reader.read(4096), left)
            except TimeoutError:
                return "silent", time.monotonic() - started
            if not data:
                return "closed: EOF", time.monotonic() - started
            for k, _, payload in frames.feed(data):
                took = time.monotonic() - started
                if k == link.OK:
                    assert await relay_line(reader, writer, frames) == node.encode()
                    if keep is not None:
                        keep.append((reader, writer, frames))
                        kept = True
                    return "OK", took
                if k == link.ERR:
                    return f"ERR {link.parse_control(k, payload).get('code')}", took
                if k == link.PONG:
                    return "PONG", took
    finally:
        if not kept:
            writer.transport.abort()


async def catalog_exports(topo: Topology) -> set[str]:
    async with operator(topo) as op:
        cat = await op.catalog()
    return {e.cluster for e in cat.exports.values()}


async def wait_until_wall(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


async def gateway_drills(topo: Topology, node: str) -> dict:
    return (await topo.status(node))["drills"]


async def test_drain_refuses_opens_withdraws_exports_and_reports_samples(
    topo: Topology, tmp_path: Path
):
    """A 3 s drain of east-2: OPEN -> ERR draining, PING -> PONG, open streams relay, exports
    withdrawn; OPEN OK within 1 s of the deadline; observers send 17..23 probes/s, 0 failed."""
    assert await catalog_exports(topo) == {"east-1", "east-2", "west-1"}

    async def imports_published() -> bool:  # every gateway published its import (failover policy)
        async with operator(topo) as op:
            imports = (await op.catalog()).imports
        return {(r.cluster, str(r.service), r.failover.tiers) for r in imports.values()} == {
            (c, "default/echo", ("cluster", "zone", "region", "any"))
            for c in ("east-1", "east-2", "west-1")
        }

    await wait_for(imports_published, 3.0, what="import records in the catalog")
    d = await start_drill(topo, mode="drain", duration="3s", settle="1s", probe_rate=20)
    assert d.services == ("default/echo",)
    streams: list = []
    assert (await link_call(topo, tmp_path / "a", link.OPEN, 2.0, keep=streams))[
        0
    ] == "OK"  # baseline

    await wait_until_wall(d.fault_start + 0.3)
    assert (await link_call(topo, tmp_path / "b", link.OPEN, 2.0))[0] == "ERR draining"
    assert (await link_call(topo, tmp_path / "c", link.PING, 2.0))[0] == "PONG"
    reader, writer, frames = streams[0]  # opened before the fault: untouched, still relays
    assert await relay_line(reader, writer, frames) == b"east-2"
    writer.transport.abort()
    await wait_for(lambda: _exports_without(topo, "east-2"), 2.0, what="east-2's exports withdrawn")
    st = await gateway_drills(topo, "east-2")
    assert st["fault"]["mode"] == "drain" and st["fault"]["drill"] == d.id
    metrics = await topo.metrics("east-2")
    assert (
        metric_value(metrics, "isthmus_gateway_drill_fault_active", f'drill="{d.id}",mode="drain"')
        == 1
    )
    assert (await gateway_drills(topo, "west-1"))["observing"][0]["services"] == ["default/echo"]
    assert (await gateway_drills(topo, "east-1"))["observing"]

    # the deadline: east-2 restores by itself and republishes its exports
    await wait_until_wall(d.fault_end)
    took = await wait_for(
        lambda: _answers_ok(topo, tmp_path / "d"), 1.0, what="east-2 answering OPEN again"
    )
    await wait_for(lambda: _exports_with(topo, "east-2"), 3.0, what="east-2's exports back")
    print(f"\ndrain: OPEN answered OK again {took:.3f}s after the deadline")
    metrics = await topo.metrics("east-2")
    assert metric_value(metrics, "isthmus_gateway_drill_fault_active", f'drill="{d.id}"') == 0

    # samples of both observing clusters, ~probe_rate per second, at the federation
    await wait_until_wall(d.fault_end + d.settle + 1.5)
    async with operator(topo) as op:
        _, samples = await op.get_drill(d.id)
    by_cluster: dict[str, list[dict]] = {}
    for s in samples:
        by_cluster.setdefault(s["cluster"], []).append(s)
    assert set(by_cluster) == {"east-1", "west-1"}, sorted(by_cluster)
    for cluster, ss in by_cluster.items():
        seconds = [s["second"] for s in ss]
        span = d.fault_end + d.settle - d.created_at
        assert len(ss) >= span - 1.5, (cluster, seconds)
        # whole seconds in the middle carry ~probe_rate probes each
        inner = [s["services"]["default/echo"] for s in ss[1:-1]]
        counts = [x["attempts"] for x in inner]
        assert all(17 <= n <= 23 for n in counts), (cluster, counts)
        failures = sum(x["failures"] for x in inner)
        assert failures == 0, (cluster, [x for x in inner if x["failures"]])  # drain: 0 failed
        total = sum(x["attempts"] for x in (s["services"]["default/echo"] for s in ss))
        print(f"drain: {cluster} sent {len(ss)} samples, {total} probes, per-second {counts}")
    # east-1 probes its own endpoints (cluster tier): served by east-1; west-1 never by east-2
    # while east-2 drained
    for s in by_cluster["west-1"]:
        if d.fault_start + 1 <= s["second"] < d.fault_end - 1:
            assert "east-2" not in s["services"]["default/echo"]["served"], s
    m = await topo.metrics("west-1")
    assert (
        metric_value(m, "isthmus_gateway_drill_probes_total", f'drill="{d.id}",result="ok"')
        >= 20 * 4
    )


async def _exports_without(topo: Topology, cluster: str) -> bool:
    return cluster not in await catalog_exports(topo)


async def _exports_with(topo: Topology, cluster: str) -> bool:
    return cluster in await catalog_exports(topo)


async def _answers_ok(topo: Topology, tmp: Path) -> bool:
    return (await link_call(topo, tmp, link.OPEN, 1.0))[0] == "OK"


async def _answers_pong(topo: Topology, tmp: Path) -> bool:
    return (await link_call(topo, tmp, link.PING, 1.0))[0] == "PONG"


async def test_blackhole_answers_nothing_until_the_deadline(topo: Topology, tmp_path: Path):
    # east-1 without endpoints of its own: its traffic (and its drill probes) goes to east-2
    """A 3 s blackhole of east-2: OPEN and PING get no answer in 1 s, open streams relay, both are
    answered within 1.5 s of the deadline; east-1's probes move to west-1, p99 < 2.1 s."""
    for b in topo.nodes["east-1"].backends:
        await b.stop()
    await topo.wait_served("east-1", "east-2")
    d = await start_drill(topo, mode="blackhole", duration="3s", settle="1s")
    streams: list = []
    assert (await link_call(topo, tmp_path / "s", link.OPEN, 2.0, keep=streams))[0] == "OK"
    await wait_until_wall(d.fault_start + 0.2)
    open_, ping = await asyncio.gather(link_call(topo, tmp_path / "a", link.OPEN, 1.0),
                                       link_call(topo, tmp_path / "b", link.PING, 1.0))
    assert open_[0] == "silent" and ping[0] == "silent", (open_, ping)
    assert open_[1] >= 1.0 - 0.05
    assert await catalog_exports(topo) == {"east-1", "east-2", "west-1"}  # stale, on purpose
    reader, writer, frames = streams[0]  # opened before the fault: untouched, still relays
    assert await relay_line(reader, writer, frames) == b"east-2"
    writer.transport.abort()
    await wait_until_wall(d.fault_end)
    t_open = await wait_for(
        lambda: _answers_ok(topo, tmp_path / "c"), 1.5, what="OPEN answered again"
    )
    t_ping = await wait_for(
        lambda: _answers_pong(topo, tmp_path / "d"), 1.5, what="PING answered again"
    )
    print(
        f"\nblackhole: OPEN answered again {t_open:.3f}s and PING {t_ping:.3f}s after the deadline"
    )

    # east-1's probes went through its router: east-2 in the baseline, then (timeouts, outlier
    # ejection, failed PINGs) west-1 during the fault; no probe waited more than ~2 s
    await wait_until_wall(d.fault_end + d.settle + 1.5)
    async with operator(topo) as op:
        _, samples = await op.get_drill(d.id)
    rows = [
        (s["second"] - d.fault_start, s["services"]["default/echo"])
        for s in samples
        if s["cluster"] == "east-1"
    ]
    print("blackhole, east-1's samples (t, attempts, failures, served, p99 ms):")
    for t, x in rows:
        print(
            f"  {t:+.0f}  {x['attempts']:3d} {x['failures']:3d} {x['served']} {x['latency_p99_ms']}"
        )
    assert all(x["served"].keys() <= {"east-2"} for t, x in rows if t < 0), rows
    fault = [x for t, x in rows if 1 <= t < 3]
    assert fault and all(x["served"].keys() == {"west-1"} for x in fault), rows
    assert all(x["latency_p99_ms"] is None or x["latency_p99_ms"] < 2100 for _, x in rows), rows
    assert all(abs(x["attempts"] - 20) <= 3 for _, x in rows[1:-1]), rows


async def test_degrade_refuses_at_error_rate_then_delays_ok_by_latency(
    topo: Topology, tmp_path: Path
):
    """Degrade at error_rate 1.0: 10 of 10 OPENs -> ERR degraded (PING still PONG); at 300 ms: 5 of
    5 OK after >= 0.3 s; after the deadline OK in < 0.3 s."""
    d = await start_drill(topo, mode="degrade", duration="2s", error_rate=1.0)
    await wait_until_wall(d.fault_start + 0.2)
    results = await asyncio.gather(
        *(link_call(topo, tmp_path / f"e{i}", link.OPEN, 2.0) for i in range(10))
    )
    assert [r[0] for r in results] == ["ERR degraded"] * 10
    assert (await link_call(topo, tmp_path / "p", link.PING, 1.0))[0] == "PONG"
    await wait_until_wall(d.fault_end)
    await wait_for(lambda: _answers_ok(topo, tmp_path / "back"), 1.0, what="OPEN answered OK again")

    d2 = await start_drill(topo, mode="degrade", duration="3s", latency="300ms")
    await wait_until_wall(d2.fault_start + 0.2)
    results = await asyncio.gather(
        *(link_call(topo, tmp_path / f"l{i}", link.OPEN, 2.0) for i in range(5))
    )
    assert all(r[0] == "OK" for r in results), results  # and each stream relayed a line after
    assert all(r[1] >= 0.3 for r in results), results
    print(f"\ndegrade 300ms: OK after {', '.join(f'{r[1]:.3f}' for r in results)} s")
    await wait_until_wall(d2.fault_end)
    await asyncio.sleep(0.1)
    what, took = await link_call(topo, tmp_path / "fast", link.OPEN, 2.0)
    assert what == "OK" and took < 0.3, (what, took)


async def test_restores_at_the_deadline_with_the_federation_killed(topo: Topology, tmp_path: Path):
    """With the federation SIGKILLed mid-blackhole, east-2 answers OPEN again within 1.5 s of the
    deadline, its fault is cleared and west-1 keeps >= 1 sample buffered."""
    d = await start_drill(topo, mode="blackhole", duration="4s")
    await wait_until_wall(d.fault_start + 0.3)
    assert (await link_call(topo, tmp_path / "a", link.OPEN, 0.5))[0] == "silent"
    topo.fed_proc.kill()
    status, _ = await _fed_admin(topo)
    assert status is None  # really gone
    await wait_until_wall(d.fault_end)
    took = await wait_for(
        lambda: _answers_ok(topo, tmp_path / "b"), 1.5, what="OPEN answered again"
    )
    assert await _answers_pong(topo, tmp_path / "c")
    st = await gateway_drills(topo, "east-2")
    assert st["fault"] is None
    # observers keep their samples for later
    assert (await gateway_drills(topo, "west-1"))["samples"]["buffered"] >= 1
    print(f"\nfederation SIGKILLed mid-drill: east-2 answered OPEN again {took:.3f}s after "
          "the deadline")


async def _fed_admin(topo: Topology) -> tuple[int | None, str]:
    try:
        return await http_get(topo.fed_admin_port, "/readyz", 1.0)
    except Exception:
        return None, ""
