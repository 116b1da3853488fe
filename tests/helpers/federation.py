"""A federation server in process, clusters with their own CA, and raw mTLS sessions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle, operator_client
from federation.identity import Svid, TrustBundle, gateway_id
from federation.model import ClusterRecord, Endpoint, Export
from federation.server.app import FederationServer, create_token
from federation.store.base import open_store
from federation.store.sqlite import SqliteStore
from federation.tls import client_context


@dataclass
class Cluster:
    name: str
    td: str
    ca: CertificateAuthority
    svid: Svid
    record: ClusterRecord

    def bundle(self, sequence: int = 1) -> TrustBundle:
        return self.ca.bundle(sequence)

    def export(self, name: str = "web", port: int = 8080, healthy: bool = True) -> Export:
        return Export(
            self.name, "default", name, port, "tcp",
            (Endpoint("127.0.0.1", port, healthy, 1),),
        )


def make_cluster(name: str, region: str = "us-east", zone: str = "a") -> Cluster:
    now = time.time()
    td = f"{name}.isthmus.local"
    ca = CertificateAuthority.create(td, now)
    svid = ca.issue(gateway_id(td), now)
    record = ClusterRecord(name, region, zone, td, "127.0.0.1:15443")
    return Cluster(name, td, ca, svid, record)


class Fed:
    """A running federation server plus helpers to make clients and join clusters."""

    def __init__(self, tmp: Path, history: int = 10000, lease_ttl: float = 1.0,
                 clock: Callable[[], float] = time.time, forget_silent_after: float | None = None,
                 overlay_cidr: str | None = None, store_url: str | None = None):
        self.tmp = tmp
        self.overlay_cidr = overlay_cidr
        self.store_url = store_url  # e.g. etcd://127.0.0.1:PORT; default: SQLite in tmp
        self.history = history
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.forget_silent_after = forget_silent_after
        self.server: FederationServer | None = None
        self.clients: list[FederationClient] = []

    async def start(self) -> FederationServer:
        store = (open_store(self.store_url) if self.store_url is not None else
                 SqliteStore(str(self.tmp / "fed.db"), history=self.history, clock=self.clock))
        self.server = FederationServer(
            store, self.tmp / "state", ("127.0.0.1", 0), ("127.0.0.1", 0),
            lease_ttl=self.lease_ttl, clock=self.clock,
            forget_silent_after=self.forget_silent_after, overlay_cidr=self.overlay_cidr,
        )
        await self.server.start()
        return self.server

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def admin_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.admin_port}"

    def bundle(self) -> TrustBundle:
        return load_federation_bundle(self.tmp / "state" / "ca.pem")

    def client(self, svid: Svid | None = None) -> FederationClient:
        c = FederationClient(self.url, self.bundle(), svid, timeout=5.0)
        self.clients.append(c)
        return c

    async def token(self, cluster: str, ttl: float = 60.0, now: float | None = None,
                    replace: bool = False) -> str:
        assert self.server is not None
        token, _ = await create_token(self.server.store, cluster, ttl, now or time.time(),
                                      replace=replace)
        return token

    async def join(self, c: Cluster, sequence: int = 1, *, prove_with: Svid | None = None,
                   replace: bool = False) -> FederationClient:
        anon = self.client()
        await anon.join(await self.token(c.name, replace=replace), c.record, c.bundle(sequence),
                        prove_with=prove_with)
        return self.client(c.svid)

    def operator(self) -> FederationClient:
        c = operator_client(self.url, self.tmp / "state" / "operator", timeout=5.0)
        self.clients.append(c)
        return c

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        self.clients.clear()
        if self.server is not None:
            await self.server.stop()
            self.server = None



def raw_session(fed: Fed, svid: Svid | None) -> aiohttp.ClientSession:
    ctx = client_context(svid, fed.bundle())
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))



def forge_svid(signer: CertificateAuthority, spiffe_id: str) -> Svid:
    """A leaf claiming `spiffe_id` but signed by `signer` (a CA of another trust domain)."""
    now = time.time()
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime as dt

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]))
        .issuer_name(x509.load_der_x509_certificate(signer.cert_der).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(signer._key, hashes.SHA256())
    )
    from federation.identity import SpiffeId

    return Svid(
        SpiffeId.parse(spiffe_id),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        now - 60,
        now + 3600,
        cert.serial_number,
    )
