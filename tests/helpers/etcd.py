"""A real etcd for tests: one member on 127.0.0.1, its data in the test's tmp dir, stopped by
PID. Skips (naming the install) where etcd is not installed."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.helpers.processes import Proc, free_port

INSTALL = "apt-get install -y etcd-server etcd-client"


class Etcd:
    def __init__(self, root: Path, name: str = "e0") -> None:
        self.client_port, self.peer_port = free_port(), free_port()
        self.dir = root / name
        self.proc = Proc(f"etcd-{name}", [
            "etcd", "--name", name, "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"{name}=http://127.0.0.1:{self.peer_port}",
            "--log-level", "warn"], root / f"etcd-{name}.log")

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 15.0) -> None:
        self.proc.start()
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
    if shutil.which("etcd") is None:
        pytest.skip(f"needs etcd: {INSTALL}")
