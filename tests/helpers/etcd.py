"""A real etcd for tests: one member on 127.0.0.1, its data in the test's tmp dir, stopped by
PID (or three: `EtcdCluster`; or served over TLS with client certificates: `make_etcd_certs`
and `Etcd(certs=...)`); `FedReplica`, a federation process serving from it. Skips (naming the
install) where etcd is not installed."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.processes import Proc, free_port, isthmus_cmd

INSTALL = "apt-get install -y etcd-server etcd-client"


@dataclass(frozen=True)
class EtcdCerts:
    """A test CA, etcd's server certificate (IP SAN 127.0.0.1) and a client certificate."""

    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path

    def query(self, client: bool = True) -> str:
        q = f"?cacert={self.ca}"
        return q + f"&cert={self.client}&key={self.client_key}" if client else q


def make_etcd_certs(d: Path) -> EtcdCerts:
    """EC P-256 certificates valid for a day, keys written 0600."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)

    def build(cn: str, signer_key, issuer: x509.Name | None, extensions) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer_key or key, hashes.SHA256()), key

    def write(name: str, cert, key) -> tuple[Path, Path]:
        cp, kp = d / f"{name}.pem", d / f"{name}-key.pem"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.touch(mode=0o600)
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return cp, kp

    ca, ca_key = build("etcd-test-ca", None, None,
                       [(x509.BasicConstraints(ca=True, path_length=0), True)])
    server, server_key = build("etcd", ca_key, ca.subject, [
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                      x509.DNSName("localhost")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    client, client_key = build("federation", ca_key, ca.subject, [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    ca_path, _ = write("ca", ca, ca_key)
    (d / "ca-key.pem").unlink()  # nothing signs with it after this
    return EtcdCerts(ca_path, *write("server", server, server_key),
                     *write("client", client, client_key))


class Etcd:
    def __init__(self, root: Path, name: str = "e0", client_port: int | None = None,
                 peer_port: int | None = None, cluster: str | None = None,
                 certs: EtcdCerts | None = None, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.dir = root / name
        self.certs = certs
        scheme = "https" if certs else "http"
        tls = [] if certs is None else [
            "--cert-file", str(certs.server), "--key-file", str(certs.server_key),
            "--trusted-ca-file", str(certs.ca), "--client-cert-auth"]
        self.proc = Proc(f"etcd-{name}", [
            "etcd", "--name", name, "--data-dir", str(self.dir / "data"), *tls,
            "--listen-client-urls", f"{scheme}://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", cluster or f"{name}=http://127.0.0.1:{self.peer_port}",
            "--initial-cluster-state", "new", "--heartbeat-interval", "100",
            "--election-timeout", "1000", "--log-level", "warn", *extra],
            root / f"etcd-{name}.log")

    @property
    def url(self) -> str:
        """The store URL; with certs, TLS with the client certificate."""
        url = f"etcd://127.0.0.1:{self.client_port}"
        return url + self.certs.query() if self.certs else url

    def start(self, timeout: float = 15.0) -> None:
        self.proc.start()
        self.start_wait(timeout)

    def start_wait(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.running:
                raise RuntimeError(f"etcd exited:\n{self.proc.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.client_port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"etcd did not listen within {timeout}s:\n{self.proc.tail()}")

    def stop(self) -> None:
        self.proc.stop()


def require_etcd() -> None:
    missing = [t for t in ("etcd", "etcdctl") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: {INSTALL}")


class EtcdCluster:
    """Three members on 127.0.0.1; `leader()` names the one leading now (via etcdctl)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.members = [Etcd(root, f"m{i}", c, p, cluster) for i, (c, p) in enumerate(ports)]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self) -> None:
        for m in self.members:
            m.proc.start()
        for m in self.members:
            m.start_wait()

    def leader(self) -> Etcd:
        import json
        import subprocess

        eps = ",".join(f"127.0.0.1:{m.client_port}" for m in self.members if m.proc.running)
        out = subprocess.run(["etcdctl", "--endpoints", eps, "endpoint", "status", "-w",
                              "json"], capture_output=True, text=True,
                             env={**os.environ, "ETCDCTL_API": "3"}).stdout
        for row in json.loads(out):
            st = row["Status"]
            if st["header"]["member_id"] == st["leader"]:
                port = int(row["Endpoint"].rsplit(":", 1)[1])
                return next(m for m in self.members if m.client_port == port)
        raise RuntimeError(f"no leader in {out}")

    def stop(self) -> None:
        for m in self.members:
            m.stop()


class FedReplica:
    """One `isthmus federation serve --store etcd://...` process (a replica), its state in
    `root/name`, stopped or killed by its PID. Replicas after the first get the first one's CA
    (`ca_from`: that state dir) before they start, so a gateway trusting one trusts them all."""

    def __init__(self, root: Path, name: str, store_url: str, ca_from: Path | None = None,
                 lease_ttl: str = "10s") -> None:
        self.state = root / name
        self.port, self.admin_port = free_port(), free_port()
        self.ca_from = ca_from
        self.proc = Proc(f"federation-{name}", [
            *isthmus_cmd(), "federation", "serve", "--state-dir", str(self.state),
            "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
            "--store", store_url, "--lease-ttl", lease_ttl, "--log-level", "info"],
            root / f"{name}.log")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        if self.ca_from is not None and not (self.state / "ca.pem").exists():
            self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
            for f in ("ca.pem", "ca-key.pem"):
                (self.state / f).write_bytes((self.ca_from / f).read_bytes())
                (self.state / f).chmod(0o600)
        self.proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.running:
                raise RuntimeError(f"federation exited:\n{self.proc.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"federation did not listen within {timeout}s:\n{self.proc.tail()}")

    def stop(self) -> None:
        self.proc.stop()
