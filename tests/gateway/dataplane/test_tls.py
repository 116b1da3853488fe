"""Real TLS 1.3 over 127.0.0.1: contexts from SVIDs, peer verification by trust domain."""

import asyncio
import contextlib
import os
import ssl
import time

import pytest
from cryptography import x509

from federation.ca import CertificateAuthority
from federation.errors import IdentityError
from federation.identity import SpiffeId, TrustDomain, gateway_id
from federation.tls import (
    client_context,
    peer_cert_der,
    reload_server_context,
    server_context,
    verify_peer,
)

TD_A = "east-1.isthmus.local"
TD_B = "west-1.isthmus.local"
CLIENT_A = SpiffeId(TrustDomain(TD_A), "/ns/shop/sa/cart")


@pytest.fixture(scope="module")
def now():
    return time.time()


@pytest.fixture(scope="module")
def ca_a(now):
    return CertificateAuthority.create(TD_A, now)


@pytest.fixture(scope="module")
def ca_b(now):
    return CertificateAuthority.create(TD_B, now)


class Server:
    """An echo server that authorizes each client with verify_peer against `bundles`."""

    def __init__(self, ctx, bundles, now):
        self.ctx, self.bundles, self.now = ctx, bundles, now
        self.peers: list[SpiffeId] = []
        self.refused: list[str] = []
        self.server = None

    async def handle(self, reader, writer):
        try:
            try:
                sid = verify_peer(
                    peer_cert_der(writer.get_extra_info("ssl_object")), self.bundles, self.now
                )
            except IdentityError as e:
                self.refused.append(str(e))
                return
            self.peers.append(sid)
            while line := await reader.readline():
                writer.write(b"echo " + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def _connect(port, ctx):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)


async def _roundtrip(reader, writer, data=b"ping\n"):
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


async def _close(writer):
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def test_contexts_are_tls13_only(ca_a, now):
    svid = ca_a.issue(gateway_id(TD_A), now)
    s = server_context(svid, [ca_a.bundle(1)])
    c = client_context(svid, ca_a.bundle(1))
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.check_hostname is False
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_context(svid, [], require_client_cert=False).verify_mode == ssl.CERT_OPTIONAL


def test_svid_temp_files_are_removed(ca_a, now, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server_context(ca_a.issue(gateway_id(TD_A), now), [ca_a.bundle(1)])
    assert list(tmp_path.iterdir()) == []


async def test_mtls_both_sides_verify(ca_a, now):
    server_svid = ca_a.issue(gateway_id(TD_A), now)
    client_svid = ca_a.issue(CLIENT_A, now)
    bundles = {TD_A: ca_a.bundle(1)}
    async with Server(server_context(server_svid, [ca_a.bundle(1)]), bundles, now) as srv:
        reader, writer = await _connect(srv.port, client_context(client_svid, ca_a.bundle(1)))
        server_id = verify_peer(
            peer_cert_der(writer.get_extra_info("ssl_object")),
            bundles,
            now,
            expected=gateway_id(TD_A),
        )
        assert server_id == gateway_id(TD_A)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert await _roundtrip(reader, writer) == b"echo ping\n"
        assert srv.peers == [CLIENT_A]
        with pytest.raises(IdentityError, match="expected"):
            verify_peer(
                peer_cert_der(writer.get_extra_info("ssl_object")), bundles, now, expected=CLIENT_A
            )
        await _close(writer)


async def test_client_refuses_server_of_other_ca(ca_a, now):
    impostor = CertificateAuthority.create(TD_A, now)
    async with Server(
        server_context(impostor.issue(gateway_id(TD_A), now), [ca_a.bundle(1)]),
        {TD_A: ca_a.bundle(1)},
        now,
    ) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            await _connect(srv.port, client_context(ca_a.issue(CLIENT_A, now), ca_a.bundle(1)))


async def test_client_cert_from_untrusted_ca_refused(ca_a, now):
    untrusted = CertificateAuthority.create(TD_A, now)
    async with Server(
        server_context(ca_a.issue(gateway_id(TD_A), now), [ca_a.bundle(1)]),
        {TD_A: ca_a.bundle(1)},
        now,
    ) as srv:
        ctx = client_context(untrusted.issue(CLIENT_A, now), ca_a.bundle(1))
        # TLS 1.3: the client's handshake may finish before the server checks its cert;
        # the refusal then shows on the first read.
        got = None
        with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            reader, writer = await _connect(srv.port, ctx)
            try:
                got = await _roundtrip(reader, writer)
            finally:
                await _close(writer)
        assert not got
        assert srv.peers == []


async def test_client_without_cert_refused(ca_a, now):
    async with Server(
        server_context(ca_a.issue(gateway_id(TD_A), now), [ca_a.bundle(1)]),
        {TD_A: ca_a.bundle(1)},
        now,
    ) as srv:
        got = None
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await _connect(srv.port, client_context(None, ca_a.bundle(1)))
            try:
                got = await _roundtrip(reader, writer)
            finally:
                await _close(writer)
        assert not got
        assert srv.peers == []


async def test_optional_client_cert_gives_no_identity(ca_a, now):
    async with Server(
        server_context(
            ca_a.issue(gateway_id(TD_A), now), [ca_a.bundle(1)], require_client_cert=False
        ),
        {TD_A: ca_a.bundle(1)},
        now,
    ) as srv:
        reader, writer = await _connect(srv.port, client_context(None, ca_a.bundle(1)))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await _close(writer)
        assert srv.refused == ["peer presented no certificate"]


@pytest.mark.parametrize("b_mapping", ["missing", "other-ca"])
async def test_valid_svid_of_wrong_trust_domain_refused(ca_a, ca_b, now, b_mapping):
    # The server's OpenSSL store trusts both CAs (so the handshake succeeds), but the
    # authoritative per-trust-domain check has no bundle for B, or B's bundle is another CA.
    bundles = {TD_A: ca_a.bundle(1)}
    if b_mapping == "other-ca":
        bundles[TD_B] = CertificateAuthority.create(TD_B, now).bundle(1)
    ctx = server_context(ca_a.issue(gateway_id(TD_A), now), [ca_a.bundle(1), ca_b.bundle(1)])
    async with Server(ctx, bundles, now) as srv:
        reader, writer = await _connect(
            srv.port, client_context(ca_b.issue(gateway_id(TD_B), now), ca_a.bundle(1))
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await _close(writer)
    assert srv.peers == []
    (msg,) = srv.refused
    want = "no bundle for trust domain" if b_mapping == "missing" else "not signed"
    assert want in msg and f"spiffe://{TD_B}" in msg


async def test_reload_server_context_rotates_svid(ca_a, ca_b, now):
    old = ca_a.issue(gateway_id(TD_A), now)
    ctx = server_context(old, [ca_a.bundle(1)])
    bundles = {TD_A: ca_a.bundle(1), TD_B: ca_b.bundle(1)}
    async with Server(ctx, bundles, now) as srv:
        r1, w1 = await _connect(srv.port, client_context(ca_a.issue(CLIENT_A, now), ca_a.bundle(1)))
        assert await _roundtrip(r1, w1) == b"echo ping\n"
        serial1 = x509.load_der_x509_certificate(
            peer_cert_der(w1.get_extra_info("ssl_object"))
        ).serial_number
        assert serial1 == old.serial

        new = ca_a.issue(gateway_id(TD_A), now)
        reload_server_context(ctx, new, [ca_b.bundle(1)])  # rotate + trust a newly joined B

        assert await _roundtrip(r1, w1, b"still\n") == b"echo still\n"
        r2, w2 = await _connect(
            srv.port, client_context(ca_b.issue(gateway_id(TD_B), now), ca_a.bundle(1))
        )
        assert await _roundtrip(r2, w2) == b"echo ping\n"
        serial2 = x509.load_der_x509_certificate(
            peer_cert_der(w2.get_extra_info("ssl_object"))
        ).serial_number
        assert serial2 == new.serial != serial1
        assert srv.peers == [CLIENT_A, gateway_id(TD_B)]
        assert await _roundtrip(r1, w1, b"again\n") == b"echo again\n"
        await _close(w1)
        await _close(w2)


def test_verify_peer_no_cert():
    with pytest.raises(IdentityError, match="peer presented no certificate"):
        verify_peer(None, {}, 0.0)
    assert peer_cert_der(None) is None


def test_key_file_permissions_during_load(ca_a, now, monkeypatch):
    """The helper writes the key 0600 inside a 0700 directory."""
    seen = {}
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        seen["dir"] = os.stat(os.path.dirname(keyfile)).st_mode & 0o777
        seen["key"] = os.stat(keyfile).st_mode & 0o777
        return real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    client_context(ca_a.issue(CLIENT_A, now), ca_a.bundle(1))
    assert seen == {"dir": 0o700, "key": 0o600}
