"""gateway/dns/responder.py on real sockets: dnspython and `dig` as clients over UDP and TCP,
truncation then TCP, malformed packets (Hypothesis) that never stop it answering.

The records are built by answers.build from a catalog value (the catalog is data; the
gateway's part in keeping it current is tested in tests/integration/test_dns.py)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype as T
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dns.answers import DnsSettings, build
from gateway.dns.responder import DnsResponder
from tests.gateway.dns.test_answers import ME, catalog, export, imp

NAME = "echo.default.svc.clusterset.local"
DIG = shutil.which("dig")
NEEDS_DIG = pytest.mark.skipif(DIG is None, reason="needs dig: apt-get install -y dnsutils")


def responder(**settings) -> DnsResponder:
    recs = build(DnsSettings(**settings), (imp(),), catalog(export("east-2")), ME, 1)
    return DnsResponder(recs)


@pytest.fixture
async def server():
    r = responder()
    await r.start("127.0.0.1", 0)
    yield r
    await r.close()


async def udp(server: DnsResponder, name: str, rdtype=T.A, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=server.address[1], timeout=2.0)


async def tcp(server: DnsResponder, name: str, rdtype=T.A, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    return await dns.asyncquery.tcp(q, "127.0.0.1", port=server.address[1], timeout=2.0)


async def test_a_over_udp_and_tcp(server):
    for ask in (udp, tcp):
        r = await ask(server, NAME)
        assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
        assert not r.flags & dns.flags.RA
        assert [rr.to_text() for rr in r.answer] == [f"{NAME}. 5 IN A 127.0.0.1"]


async def test_nxdomain_with_soa_and_refused(server):
    r = await udp(server, "nope.default.svc.clusterset.local")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == T.SOA
    r = await udp(server, "example.com")
    assert r.rcode() == dns.rcode.REFUSED and not r.answer


async def test_edns_payload_is_advertised(server):
    r = await udp(server, NAME, use_edns=0, payload=4096)
    assert r.edns == 0 and r.payload == 1232
    r = await udp(server, NAME)
    assert r.edns == -1  # no EDNS asked, none answered


async def test_big_answers_truncate_over_udp_and_come_whole_over_tcp():
    many = tuple(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60))  # 60 A records
    recs = build(DnsSettings(addresses=many), (imp(host="0.0.0.0"),),
                 catalog(export("east-2")), ME, 1)
    r = DnsResponder(recs)
    await r.start("127.0.0.1", 0)
    try:
        q = dns.message.make_query(NAME, T.A)  # no EDNS: 512 bytes
        got = await dns.asyncquery.udp(q, "127.0.0.1", port=r.address[1], timeout=2.0,
                                       ignore_trailing=True, raise_on_truncation=False)
        assert got.flags & dns.flags.TC
        whole, used_tcp = await dns.asyncquery.udp_with_fallback(
            q, "127.0.0.1", port=r.address[1], timeout=2.0)
        assert used_tcp and len(whole.answer[0]) == 60
        assert r.stats.truncated >= 2
    finally:
        await r.close()


@NEEDS_DIG
async def test_dig_a_srv_nxdomain_refused_and_tcp(server):
    port = str(server.address[1])

    async def dig(*args: str) -> str:
        p = await asyncio.create_subprocess_exec(
            DIG, "@127.0.0.1", "-p", port, "+time=2", "+tries=1", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 10.0)
        assert p.returncode == 0, err.decode()
        return out.decode()

    assert (await dig("+short", NAME, "A")).split() == ["127.0.0.1"]
    assert (await dig("+short", f"_tcp._tcp.{NAME}", "SRV")).split() == [
        "0", "100", "16001", f"{NAME}."]
    assert (await dig("+short", "+tcp", NAME.upper(), "A")).split() == ["127.0.0.1"]
    out = await dig("nope.default.svc.clusterset.local", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out.split("AUTHORITY SECTION")[1]
    assert "status: REFUSED" in await dig("example.com", "A")
    assert "flags: qr aa" in await dig(NAME, "AAAA")


# -- malformed input -----------------------------------------------------------------------

def _header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, 0, 0, 0)


MALFORMED = {
    "truncated header": b"\x12\x34\x01",
    "question cut short": _header() + b"\x04echo",
    "compression loop": _header() + b"\xc0\x0c" + b"\x00\x01\x00\x01",
    "label too long": _header() + b"\x7f" + b"a" * 127 + b"\x00\x00\x01\x00\x01",
    "counts lie": struct.pack("!HHHHHH", 7, 0x0100, 1, 5, 5, 5) + b"\x00\x00\x01\x00\x01",
    "a response": struct.pack("!HHHHHH", 7, 0x8180, 0, 0, 0, 0),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_malformed_gets_formerr_or_nothing(what):
    r = responder()
    wire = MALFORMED[what]
    out = r.respond(wire, "udp", 1232)
    if len(wire) < 12 or wire[2] & 0x80:
        assert out is None
    else:
        assert out[:2] == wire[:2] and out[2] & 0x80 and out[3] & 0x0F == dns.rcode.FORMERR
    assert r.stats.malformed["udp"] == 1


def test_two_questions_formerr_and_other_opcode_notimp():
    r = responder()
    q = dns.message.make_query(NAME, T.A)
    q.question.append(q.question[0])
    assert dns.message.from_wire(r.respond(q.to_wire(), "udp", 1232)).rcode() == \
        dns.rcode.FORMERR
    q = dns.message.make_query(NAME, T.A)
    q.set_opcode(dns.opcode.UPDATE)
    assert dns.message.from_wire(r.respond(q.to_wire(), "udp", 1232)).rcode() == \
        dns.rcode.NOTIMP


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    r = responder()
    out = r.respond(data, "udp", 1232)
    assert out is None or (len(out) >= 12 and out[:2] == data[:2])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 11), st.binary(min_size=1, max_size=40))
def test_a_real_query_cut_or_corrupted_never_raises(cut, junk):
    wire = dns.message.make_query(NAME, T.SRV, use_edns=0).to_wire()
    r = responder()
    for w in (wire[:cut], wire[:12 + cut] + junk, wire[:-cut or None] + junk):
        r.respond(w, "tcp", None)


async def test_it_still_answers_after_garbage_over_udp_and_tcp(server):
    port = server.address[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for wire in MALFORMED.values():
            s.sendto(wire, ("127.0.0.1", port))
    finally:
        s.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for wire in MALFORMED.values():  # length-prefixed garbage, then a length that lies
        writer.write(len(wire).to_bytes(2, "big") + wire)
    writer.write(b"\xff\xff\x00")
    await writer.drain()
    writer.close()
    assert (await udp(server, NAME)).answer
    assert (await tcp(server, NAME)).answer


async def test_tcp_connections_are_bounded(server, monkeypatch):
    import gateway.dns.responder as mod

    monkeypatch.setattr(mod, "MAX_TCP", 3)
    held = [await asyncio.open_connection("127.0.0.1", server.address[1]) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
    assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed at once
    assert server.stats.tcp_refused == 1
    for _, w in held:
        w.close()
    writer.close()
    await asyncio.sleep(0.05)
    assert (await tcp(server, NAME)).answer


# -- the fast path (cached responses) --------------------------------------------------------

def _ask(r: DnsResponder, name: str, rdtype=T.A, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    out = r.respond(q.to_wire(), "udp", 1232)
    got = dns.message.from_wire(out)
    assert got.id == q.id
    return got


def test_a_cached_answer_keeps_the_case_and_id_of_each_query():
    r = responder()
    first = _ask(r, NAME)
    for name in (NAME.upper(), "eChO.DeFault.svc.clusterset.local", NAME):
        got = _ask(r, name)
        assert got.question[0].name.to_text() == name + "."
        assert got.answer[0].name.to_text() == name + "."
        assert got.answer[0].to_text().lower() == first.answer[0].to_text().lower()
    assert len(r._cache) == 1 and len(r._exact) == 1  # case variants: from the name key
    assert r.stats.queries[("udp", "A", "NOERROR")] == 4


def test_the_cache_keys_on_what_the_response_depends_on():
    r = responder()
    assert _ask(r, NAME).edns == -1
    assert _ask(r, NAME, use_edns=0).edns == 0  # same name, with EDNS: another response
    assert _ask(r, NAME, T.SRV).answer[0].rdtype == T.SRV
    assert _ask(r, "nope.default.svc.clusterset.local").rcode() == dns.rcode.NXDOMAIN
    assert len(r._cache) == 4


def test_new_records_are_answered_at_once():
    r = DnsResponder(build(DnsSettings(), (imp(),), catalog(export("east-2")), ME, 1))
    assert _ask(r, NAME).answer
    assert _ask(r, NAME).answer  # from the cache
    r.set_records(build(DnsSettings(), (imp(),), catalog(), ME, 2))  # nobody exports echo
    assert _ask(r, NAME).rcode() == dns.rcode.NXDOMAIN
