"""A real etcd for tests: one member on 127.0.0.1, its data in the test's tmp dir, stopped by
PID. Skips (naming the install) where etcd is not installed."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.helpers.processes import Proc, free_port

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
