"""The gateway's clusterset.local DNS with real processes: answers from the live catalog, a name
that goes with its last exporter's lease and comes back with it, and an app that connects by
name failing over like one that uses the address."""

from __future__ import annotations

import asyncio
import shutil
import time

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype as T
import pytest

from tests.helpers.processes import free_port
from tests.helpers.traffic import metric_value, request, wait_for
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration

ECHO = "echo.default.svc.clusterset.local"
SOLO = "solo.default.svc.clusterset.local"


async def query(port: int, name: str, rdtype=T.A, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
    return await ask(q, "127.0.0.1", port=port, timeout=2.0)


@pytest.fixture
async def topo(tmp_path, request):
    dns_port = free_port()
    t = Topology(tmp_path / "topo", top={"east-1": f"dns:\n  listen: 127.0.0.1:{dns_port}\n"})
    t.dns_port = dns_port  # type: ignore[attr-defined]
    t.add_service("solo", "west-1", ("east-1",))
    async with running(t, request):
        yield t


async def test_answers_follow_the_imports_and_the_catalog(topo: Topology):
    port, east1 = topo.dns_port, topo.nodes["east-1"]
    r = await query(port, ECHO)
    assert [rr.to_text() for rr in r.answer] == [f"{ECHO}. 5 IN A 127.0.0.1"]
    r = await query(port, f"_tcp._tcp.{ECHO}", T.SRV, tcp=True)
    assert r.answer[0][0].port == east1.import_port
    assert (await query(port, "nope.default.svc.clusterset.local")).rcode() == dns.rcode.NXDOMAIN
    assert (await query(port, "example.com")).rcode() == dns.rcode.REFUSED
    st = await topo.status("east-1")
    names = {row["name"]: row for row in st["dns"]["names"]}
    assert names[ECHO]["exported_by"] == ["east-1", "east-2", "west-1"]
    assert names[SOLO]["exported_by"] == ["west-1"]
    metrics = await topo.metrics("east-1")
    assert metric_value(metrics, "isthmus_gateway_dns_queries_total", 'rcode="NXDOMAIN"') >= 1
    assert metric_value(metrics, "isthmus_gateway_dns_response_seconds_count") >= 4


async def test_a_name_goes_with_its_last_exporters_lease_and_comes_back(topo: Topology):
    port = topo.dns_port
    assert (await query(port, SOLO)).answer
    west = topo.nodes["west-1"]
    t0 = time.monotonic()
    west.proc.stop()  # its lease (2 s) expires at the federation; solo has no other exporter

    async def rcode(want: int) -> bool:
        return (await query(port, SOLO)).rcode() == want

    await wait_for(lambda: rcode(dns.rcode.NXDOMAIN), 10.0, what="solo to be NXDOMAIN")
    gone = time.monotonic() - t0
    assert (await query(port, ECHO)).answer, "echo has other exporters: it must stay"
    t1 = time.monotonic()
    topo.start_gateway("west-1")
    await wait_for(lambda: rcode(dns.rcode.NOERROR), 20.0, what="solo to come back")
    back = time.monotonic() - t1
    print(f"\nsolo NXDOMAIN {gone:.2f} s after its only exporter stopped (lease ttl 2 s); "
          f"back {back:.2f} s after it started again")


async def test_an_app_connecting_by_name_fails_over_like_one_using_the_address(topo: Topology):
    port = topo.dns_port
    replies: list[str] = []
    failed: list[str] = []

    async def by_name() -> None:
        r = await query(port, f"_tcp._tcp.{ECHO}", T.SRV)
        srv, addr = r.answer[0][0], r.additional[0][0].address
        replies.append(await request(srv.port, "ping", 3.0) if addr == "127.0.0.1" else "?")

    async def app(seconds: float) -> None:
        end = time.monotonic() + seconds
        tasks = []
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(by_name()))
            await asyncio.sleep(0.05)
        for t in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(t, BaseException):
                failed.append(repr(t))

    running_app = asyncio.create_task(app(3.0))
    await asyncio.sleep(1.0)
    await topo.stop_backends("east-1")
    await running_app
    print(f"\nby name: {len(replies)} connections, {len(failed)} failed, served by "
          f"{sorted(set(replies))}")
    assert not failed, failed[:3]
    assert replies[0] == "east-1" and replies[-1] == "east-2"


@pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig: apt-get install -y dnsutils")
async def test_dig_against_a_running_gateway(topo: Topology):
    p = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(topo.dns_port), "+short", "+time=2", "+tries=1", ECHO,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(p.communicate(), 10.0)
    assert out.decode().split() == ["127.0.0.1"]
