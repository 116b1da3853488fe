"""Core behaviour with real processes: a federation, three gateways, echo backends, real TLS.

Run with `python -m pytest tests/integration -q -s` to see the measured numbers. Every test
starts its own topology (see harness.py) on free loopback ports below 32768 and stops every
process it started by PID.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle
from federation.errors import FederationError
from federation.identity import SpiffeId, Svid, gateway_id
from federation.model import ClusterRecord, Endpoint, Export
from gateway.dataplane import link
from tests.helpers.backends import blackhole_times_out
from tests.helpers.processes import run_cli
from tests.helpers.traffic import (
    LoadStream,
    chatter,
    count_through,
    http_get,
    metric_value,
    request,
    wait_for,
)
from tests.integration.harness import Topology

pytestmark = pytest.mark.integration


@pytest.fixture
async def make_topology(tmp_path, request):
    """Start a topology (keyword options as Topology's); dump its logs if the test failed."""
    made: list[Topology] = []
    failed_before = request.session.testsfailed

    async def make(**kw) -> Topology:
        topo = Topology(tmp_path / f"topo{len(made)}", **kw)
        made.append(topo)
        await topo.start()
        return topo

    yield make
    for topo in made:
        if request.session.testsfailed > failed_before:
            topo.dump_logs()
        await topo.stop()


@pytest.fixture
async def topo(make_topology) -> Topology:
    return await make_topology()


# -------------------------------------------------------------------------------------------
# 1. join tokens


def _new_cluster(name: str, region: str = "eu-west", zone: str = "a"):
    """A cluster record and the bundle of a fresh CA, as a new gateway would send to join."""
    td = f"{name}.isthmus.local"
    ca = CertificateAuthority.create(td, time.time())
    record = ClusterRecord(name, region, zone, td, "127.0.0.1:9")
    return record, ca.bundle(1)


async def test_join_token_single_use_and_expiring(topo: Topology):
    """A join token joins once, only its own cluster and only within its ttl: reused -> 401, another
    cluster's -> 403, a 1 s token after 1.3 s -> 401 and no record."""
    fed_bundle = load_federation_bundle(topo.fed_ca)
    record, bundle = _new_cluster("north-1")
    token = topo.create_token("north-1", ttl="5m")
    async with FederationClient(topo.fed_url, fed_bundle) as client:
        reply = await client.join(token, record, bundle)
        assert reply["federation_trust_domain"] == "federation.isthmus.local"
        assert reply["federation_bundle"]["keys"], reply
        clusters = (await topo.fed_status())["clusters"]
        assert clusters["north-1"]["trust_domain"] == "north-1.isthmus.local"

        # the same token again (even for the same cluster) is refused
        with pytest.raises(FederationError) as e:
            await client.join(token, record, bundle)
        assert e.value.status == 401 and "already used" in str(e.value)

        # a token issued for another cluster is refused
        other = topo.create_token("south-1", ttl="5m")
        east9, east9_bundle = _new_cluster("east-9")
        with pytest.raises(FederationError) as e:
            await client.join(other, east9, east9_bundle)
        assert e.value.status == 403 and "issued for cluster 'south-1'" in str(e.value), e.value

        # an expired token is refused
        short = topo.create_token("south-1", ttl="1s")
        await asyncio.sleep(1.3)
        south, south_bundle = _new_cluster("south-1")
        with pytest.raises(FederationError) as e:
            await client.join(short, south, south_bundle)
        assert e.value.status == 401 and "expired" in str(e.value)
        assert "south-1" not in (await topo.fed_status())["clusters"]


# -------------------------------------------------------------------------------------------
# 2. a cluster writes only its own records


async def test_cluster_cannot_write_another_clusters_records(topo: Topology):
    """east-1's SVID reads the catalog but cannot write east-2's records: put/delete export and
    lease are 3 of 3 refused with 403, east-2's records unchanged, >= 3 denials counted."""
    east1 = topo.nodes["east-1"]
    svid = Svid.load(east1.state_dir / "identity")
    assert svid is not None and str(svid.spiffe_id) == str(gateway_id(east1.trust_domain))
    fed_bundle = load_federation_bundle(topo.fed_ca)
    before = (await topo.fed_status())["services"]["default/echo"]["east-2"]
    forged = Export("east-2", "default", "echo", 8080, "tcp", (Endpoint("127.0.0.1", 9, True, 1),))
    async with FederationClient(topo.fed_url, fed_bundle, svid) as client:
        cat = await client.catalog()  # authenticated as east-1: reading works
        assert "east-2" in cat.clusters
        with pytest.raises(FederationError) as e:
            await client.put_export(forged)
        assert e.value.status == 403, e.value
        assert "east-1" in str(e.value) and "east-2" in str(e.value)
        with pytest.raises(FederationError) as e:
            await client.delete_export("east-2", "default", "echo")
        assert e.value.status == 403
        with pytest.raises(FederationError) as e:
            await client.grant_lease("east-2")
        assert e.value.status == 403
    after = (await topo.fed_status())["services"]["default/echo"]["east-2"]
    assert after == before
    metrics = (await _fed_metrics(topo))
    assert metric_value(metrics, "isthmus_federation_authz_denied_total") >= 3


async def _fed_metrics(topo: Topology) -> str:
    status, text = await http_get(topo.fed_admin_port, "/metrics")
    assert status == 200
    return text


# -------------------------------------------------------------------------------------------
# 3. the inbound listener refuses identities that do not verify


def _leaf(ca_cert: x509.Certificate, ca_key, sid: str) -> tuple[bytes, bytes]:
    """A leaf certificate for SPIFFE ID `sid` signed by (ca_cert, ca_key), whatever its domain."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                              ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def _try_open(port: int, cert_pem: bytes, key_pem: bytes, tmp: Path) -> str:
    """TLS 1.3 to a gateway's inbound listener with this client certificate, OPEN default/echo;
    returns 'OK', 'ERR <code>' or 'closed: <why>'."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.pem").write_bytes(cert_pem)
    (tmp / "k.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we test the server's check of us, not ours of it
    ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="east-1"), 3.0)
    except (OSError, ssl.SSLError, TimeoutError) as e:
        return f"closed: handshake: {e!r}"
    try:
        writer.write(link.control(link.OPEN, 1, {"v": link.VERSION, "service": "default/echo"}))
        frames = link.FrameReader()
        while True:
            data = await asyncio.wait_for(reader.read(4096), 3.0)
            if not data:
                return "closed: EOF"
            for kind, _, payload in frames.feed(data):
                if kind == link.OK:
                    return "OK"
                if kind == link.ERR:
                    return f"ERR {link.parse_control(kind, payload).get('code')}"
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as e:
        return f"closed: {e!r}"
    finally:
        writer.transport.abort()


async def test_inbound_refuses_unverified_identities(topo: Topology, tmp_path: Path):
    """east-1's inbound listener accepts east-2's real SVID and refuses 4 of 4 forged identities
    (unknown CA, fake east-2 CA, east-2 CA signing a west-1 ID, an east-2 non-gateway ID):
    >= 2 failed handshakes, >= 2 SPIFFE refusals, 0 OPENs answered."""
    east1, east2 = topo.nodes["east-1"], topo.nodes["east-2"]
    port = east1.inbound_port
    metric = "isthmus_gateway_inbound_identity_refused_total"
    failed_metric = "isthmus_gateway_inbound_handshake_failed_total"
    refused0 = metric_value(await topo.metrics("east-1"), metric)
    failed0 = metric_value(await topo.metrics("east-1"), failed_metric)
    assert refused0 == 0

    # control: east-2's real SVID is accepted
    real = Svid.load(east2.state_dir / "identity")
    assert await _try_open(port, real.cert_pem, real.key_pem, tmp_path / "real") == "OK"

    now = time.time()
    results: dict[str, str] = {}
    # (a) a CA that is in no bundle at all
    rogue = CertificateAuthority.create("rogue.isthmus.local", now)
    s = rogue.issue(gateway_id("rogue.isthmus.local"), now)
    results["unknown CA"] = await _try_open(port, s.cert_pem, s.key_pem, tmp_path / "a")
    # (b) a CA claiming east-2's trust domain that is not east-2's real CA
    fake = CertificateAuthority.create(east2.trust_domain, now)
    s = fake.issue(gateway_id(east2.trust_domain), now)
    results["fake east-2 CA"] = await _try_open(port, s.cert_pem, s.key_pem, tmp_path / "b")

    # The chain checks above fail inside the TLS handshake. The next two pass the handshake
    # (signed by a CA in the server's store) and must be refused by the SPIFFE check.
    ca_dir = east2.state_dir / "identity"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    # (c) east-2's CA vouching for an ID of another trust domain (west-1's gateway)
    cert, key = _leaf(ca_cert, ca_key, str(gateway_id("west-1.isthmus.local")))
    results["east-2 CA signing a west-1 ID"] = await _try_open(port, cert, key, tmp_path / "c")
    # (d) a real east-2 SVID that is not the gateway's ID
    cert, key = _leaf(ca_cert, ca_key, str(SpiffeId.parse("spiffe://east-2.isthmus.local/ns/default/sa/app")))
    results["east-2 workload, not gateway"] = await _try_open(port, cert, key, tmp_path / "d")

    await asyncio.sleep(0.2)
    text = await topo.metrics("east-1")
    refused = metric_value(text, metric) - refused0
    failed = metric_value(text, failed_metric) - failed0
    print(f"\ninbound identity checks at east-1: {results}; identity_refused_total +{refused:g}, "
          f"handshake_failed_total +{failed:g}")
    for what, result in results.items():
        assert result != "OK" and not result.startswith("ERR"), f"{what}: {result}"
    # the two chains OpenSSL refuses are counted as failed handshakes, the two identities that
    # pass the TLS chain check as SPIFFE refusals
    assert failed >= 2, failed
    assert refused >= 2, refused


# -------------------------------------------------------------------------------------------
# 4. failover in the region, then across regions, then back


def _report(what: str, seconds: float | None, stream: LoadStream) -> None:
    n = len(stream.done())
    shown = "never" if seconds is None else f"{seconds:.3f} s"
    print(f"\n{what}: {shown}, {len(stream.failed)} failed of {n}")


async def _wait_first(stream: LoadStream, cluster: str, after: float, timeout: float) -> float:
    await wait_for(lambda: stream.first_served_by(cluster, after) is not None, timeout,
                   interval=0.02, what=f"a connection served by {cluster}")
    return stream.first_served_by(cluster, after)


async def test_failover_zone_then_region_then_back(topo: Topology):
    """50 new conn/s while east-1's, then east-2's backends stop and then come back: east-1 ->
    east-2 and east-2 -> west-1 each < 1 s, failback to east-1 >= 1 s (failback_after), 0
    failed."""
    stream = LoadStream(topo.nodes["east-1"].import_port, rate=50, max_seconds=30,
                        max_count=1500).start()
    try:
        await asyncio.sleep(0.5)
        assert stream.counts() == {"east-1": len(stream.done())}, stream.counts()

        t1 = time.monotonic()
        await topo.stop_backends("east-1")
        to_east2 = await _wait_first(stream, "east-2", t1, 3.0)
        await asyncio.sleep(0.6)
        assert stream.last_reply() == "east-2"

        t2 = time.monotonic()
        await topo.stop_backends("east-2")
        to_west1 = await _wait_first(stream, "west-1", t2, 3.0)
        await asyncio.sleep(0.6)
        assert stream.last_reply() == "west-1"

        t3 = time.monotonic()
        await topo.restart_backends("east-1")
        await topo.restart_backends("east-2")
        back = await _wait_first(stream, "east-1", t3, 8.0)
        await asyncio.sleep(0.4)
        assert stream.last_reply() == "east-1"
    finally:
        await stream.stop()
    print(f"\nfailover refused east-1 -> east-2: {to_east2:.3f} s")
    print(f"failover refused east-2 -> west-1: {to_west1:.3f} s")
    print(f"failback to east-1 after restore: {back:.3f} s (failback_after 1s)")
    print(f"stream: {stream.counts()}; {len(stream.failed)} failed of {len(stream.done())}")
    assert not stream.failed, [c.error for c in stream.failed][:5]
    assert to_east2 < 1.0 and to_west1 < 1.0
    assert back >= 1.0, "failed back before failback_after"


# -------------------------------------------------------------------------------------------
# 5. blackholed endpoints (connects time out, no RST)


def test_blackhole_really_times_out():
    """On this machine a connect to a full listen(0) socket times out after 0.5 s instead of
    getting a RST (the premise of the blackhole tests)."""
    ok, why = blackhole_times_out(0.5)
    assert ok, f"a listen(0) socket with a full accept queue did not blackhole here: {why}"


async def test_blackholed_endpoints_detected_within_a_second(topo: Topology):
    """50 new conn/s while east-1's backends are blackholed (connects time out, no RST): served by
    east-2 within 1 s, 0 failed."""
    ok, why = blackhole_times_out(0.5)
    if not ok:
        pytest.skip(f"cannot blackhole without root on this machine: {why}")
    stream = LoadStream(topo.nodes["east-1"].import_port, rate=50, max_seconds=20,
                        max_count=1000).start()
    try:
        await asyncio.sleep(0.5)
        t1 = time.monotonic()
        await topo.blackhole_backends("east-1")
        to_east2 = await _wait_first(stream, "east-2", t1, 3.0)
        await asyncio.sleep(1.0)
        assert stream.last_reply() == "east-2"
        during = stream.counts(since=t1)

        t2 = time.monotonic()
        await topo.restart_backends("east-1")
        back = await _wait_first(stream, "east-1", t2, 8.0)
    finally:
        await stream.stop()
    slow = [c for c in stream.done() if c.started >= t1 and c.reply and c.ended - c.started > 0.25]
    print(
        f"\nfailover blackhole east-1 -> east-2: {to_east2:.3f} s, {len(stream.failed)} failed of "
        f"{len(stream.done())} (after the blackhole: {during}; {len(slow)} connections took "
        f"> 0.25 s, the longest {max((c.ended - c.started for c in slow), default=0):.3f} s)"
    )
    print(f"failback to east-1 after the blackhole ended: {back:.3f} s")
    assert to_east2 < 1.0
    assert not stream.failed, [c.error for c in stream.failed][:5]


# -------------------------------------------------------------------------------------------
# 6. lease expiry withdraws a cluster


async def test_lease_expiry_withdraws_cluster(topo: Topology):
    """A SIGKILLed east-2 (lease ttl 2 s) leaves east-1's live set and the federation's echo
    service within 3 s; east-1 and west-1 stay live."""
    topo.nodes["east-2"].proc.kill()
    t0 = time.monotonic()

    async def gone_from_east1() -> bool:
        return "east-2" not in (await topo.status("east-1"))["catalog"]["live"]

    took = await wait_for(
        gone_from_east1, 2.0 + 1.0, interval=0.05, what="east-2 to leave east-1's live set"
    )
    fed = await topo.fed_status()
    print(f"\nlease expiry: east-2 withdrawn from east-1's catalog {took:.3f} s after SIGKILL "
          "(lease ttl 2s)")
    assert fed["clusters"]["east-2"]["live"] is False
    assert fed["clusters"]["east-1"]["live"] and fed["clusters"]["west-1"]["live"]
    assert "east-2" not in fed["services"]["default/echo"]
    live = (await topo.status("east-1"))["catalog"]["live"]
    assert live == ["east-1", "west-1"], live
    assert time.monotonic() - t0 < 3.0 + 1.0


# -------------------------------------------------------------------------------------------
# 7. the federation is not on the data path


async def test_traffic_flows_without_federation_and_after_restart(topo: Topology):
    """With the federation SIGKILLed, 50 new conn/s fail over east-1 -> east-2 in < 1 s with 0
    failed, and east-1 restarted then routes from its cached catalog (5 of 5 served by
    east-2)."""
    topo.fed_proc.kill()
    stream = LoadStream(topo.nodes["east-1"].import_port, rate=50, max_seconds=15,
                        max_count=750).start()
    try:
        await asyncio.sleep(0.3)
        t1 = time.monotonic()
        await topo.stop_backends("east-1")
        to_east2 = await _wait_first(stream, "east-2", t1, 3.0)
        await asyncio.sleep(0.6)
        assert stream.last_reply() == "east-2"
    finally:
        await stream.stop()
    _report("failover with the federation down (refused east-1 -> east-2)", to_east2, stream)
    assert not stream.failed, [c.error for c in stream.failed][:5]
    assert to_east2 < 1.0

    # restart east-1's gateway while the federation is still down: it routes from catalog.json
    east1 = topo.nodes["east-1"]
    assert (east1.state_dir / "catalog.json").exists()
    assert east1.proc.stop() == 0
    east1.proc.start()
    await topo.wait_ready("east-1")
    status = await topo.status("east-1")
    assert sorted(status["catalog"]["clusters"]) == ["east-1", "east-2", "west-1"]
    assert status["agent"]["connected"] is False
    replies = [await request(east1.import_port, "ping", 3.0) for _ in range(5)]
    print(f"east-1 restarted with the federation down: replies {replies}")
    assert replies == ["east-2"] * 5
    assert "cached catalog" in east1.proc.log.read_text()


# -------------------------------------------------------------------------------------------
# 8. SVID rotation drops no connection


async def test_svid_rotation_drops_no_connection(make_topology):
    # identity.svid_ttl has a floor of 1m; SVIDs rotate at half their validity
    """1 m SVIDs of east-1 and east-2 rotate (< 50 s) under 5 long-lived connections through the
    east-1 -> east-2 hop: 0 failed lines, >= 2 lines on each after it, 5 of 5 new ones served."""
    topo = await make_topology(svid_ttl="1m")
    east1 = topo.nodes["east-1"]
    await topo.stop_backends("east-1")
    await topo.wait_served("east-1", "east-2", timeout=5.0)

    async def serials() -> dict[str, str]:
        return {n: (await topo.status(n))["agent"]["svid"]["serial"] for n in ("east-1", "east-2")}

    stop = asyncio.Event()
    logs: list[list] = [[] for _ in range(5)]
    tasks = [asyncio.create_task(chatter(east1.import_port, stop, lg)) for lg in logs]
    try:
        await asyncio.sleep(0.5)
        first = await serials()
        t0 = time.monotonic()

        async def rotated() -> bool:
            now = await serials()
            return all(now[n] != first[n] for n in now)

        took = await wait_for(
            rotated, 45.0, interval=0.2, what="east-1 and east-2 to rotate their SVIDs"
        )
        t_rot = time.monotonic()
        await asyncio.sleep(1.0)  # a few more lines on every connection after the rotation
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    new = [await request(east1.import_port, "ping", 3.0) for _ in range(5)]
    lines = [len(lg) for lg in logs]
    bad = [r for lg in logs for _, r in lg if r != "east-2"]
    after = [sum(1 for t, r in lg if t > t_rot and r == "east-2") for lg in logs]
    print(f"\nsvid rotation: {first} -> {await serials()} after {took:.1f} s; 5 long-lived "
          f"connections sent {lines} lines ({after} after the rotation), {len(bad)} failed; "
          f"new connections: {new}")
    assert time.monotonic() - t0 < 50
    assert not bad, bad[:5]
    assert all(a >= 2 for a in after), after
    assert new == ["east-2"] * 5


# -------------------------------------------------------------------------------------------
# 9. bad configs


GOOD = """\
cluster:
  name: east-1
  region: us-east
  zone: a
federation:
  url: https://127.0.0.1:17443
  ca_file: ca.pem
listen:
  inbound: 127.0.0.1:25101
  admin: 127.0.0.1:25102
state_dir: state
limits:
  connect_timeout: 300ms
exports:
  - name: echo
    port: 8080
    endpoints:
      - 127.0.0.1:28101
    health_check:
      kind: tcp
      interval: 200ms
      timeout: 150ms
imports:
  - name: echo
    listen: 127.0.0.1:26101
"""

BROKEN = [
    # (what to replace, replacement, line, field, words in the message)
    ("  connect_timeout: 300ms", "  conect_timeout: 300ms", 13, "limits.conect_timeout",
     "unknown field"),
    ("  zone: a", "  zone: Zone_A", 4, "cluster.zone", "not a valid name"),
    ("listen: 127.0.0.1:26101", "listen: 127.0.0.1:99999", 25, "imports[0].listen",
     "not in 1..65535"),
    ("      interval: 200ms", "      interval: 30", 21, "exports[0].health_check.interval", "unit"),
    ("      timeout: 150ms", "      timeout: 250ms", 22, "exports[0].health_check.timeout",
     "shorter than the interval"),
    ("  url: https://127.0.0.1:17443", "  url: http://127.0.0.1:17443", 6, "federation.url",
     "https"),
]


def test_bad_configs_name_file_line_and_field(tmp_path: Path):
    """6 broken configs each exit 2 with `file:line: field: reason`; 2 problems give 2 lines sorted
    by line; `gateway run` refuses the same file alike; a missing file exits 2."""
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = run_cli("config", "validate", str(good))
    assert r.returncode == 0, r.stderr
    for i, (old, new, line, field, words) in enumerate(BROKEN):
        assert old in GOOD
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(GOOD.replace(old, new))
        r = run_cli("config", "validate", str(path))
        assert r.returncode == 2, (new, r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith(f"{path}:{line}: {field}: "), (new, r.stderr)
        assert words in r.stderr, (new, r.stderr)
    # every problem at once, one line each, sorted by line
    both = tmp_path / "both.yaml"
    both.write_text(GOOD.replace(BROKEN[0][0], BROKEN[0][1]).replace(BROKEN[1][0], BROKEN[1][1]))
    r = run_cli("config", "validate", str(both))
    assert r.returncode == 2
    lines = [ln.split(": ")[0] for ln in r.stderr.strip().splitlines()]
    assert lines == [f"{both}:4", f"{both}:13"]
    # `gateway run` refuses the same file with the same message and exit code
    r = run_cli("gateway", "run", "--config", str(tmp_path / "bad0.yaml"))
    assert r.returncode == 2 and f"{tmp_path / 'bad0.yaml'}:13: limits.conect_timeout:" in r.stderr
    # a missing file
    r = run_cli("config", "validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr


# -------------------------------------------------------------------------------------------
# 10. half-close through a remote hop


async def test_half_close_through_remote_hop(topo: Topology):
    """Half-closed connections through the east-1 -> east-2 hop carry 0, 1, 100,000 and 3 MiB + 7
    bytes and still read the reply: 4 of 4 byte counts exact."""
    east1 = topo.nodes["east-1"]
    await topo.stop_backends("east-1")
    await topo.wait_served("east-1", "east-2", timeout=5.0)
    for b in topo.nodes["east-2"].backends:
        b.mode = "count"
    results = {}
    for n in (0, 1, 100_000, 3 * 1024 * 1024 + 7):
        results[n] = await asyncio.wait_for(count_through(east1.import_port, n), 15.0)
    print(f"\nhalf-close through east-1 -> east-2: {results}")
    for n, reply in results.items():
        assert reply == f"east-2 {n}", (n, reply)
