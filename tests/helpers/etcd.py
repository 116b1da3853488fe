"""A real etcd for tests: one member on 127.0.0.1, its data in the test's tmp dir, stopped by
PID. Skips (naming the install) where etcd is not installed."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.helpers.processes import Proc, free_port, isthmus_cmd

INSTALL = "apt-get install -y etcd-server etcd-client"


class Etcd:
    def __init__(self, root: Path, name: str = "e0", client_port: int | None = None,
                 peer_port: int | None = None, cluster: str | None = None) -> None:
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.dir = root / name
        self.proc = Proc(f"etcd-{name}", [
            "etcd", "--name", name, "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", cluster or f"{name}=http://127.0.0.1:{self.peer_port}",
            "--initial-cluster-state", "new", "--heartbeat-interval", "100",
            "--election-timeout", "1000", "--log-level", "warn"], root / f"etcd-{name}.log")

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

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
