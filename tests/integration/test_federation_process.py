"""`isthmus federation serve` as a real process: start, join, publish, SIGTERM, restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle
from federation.identity import gateway_id
from federation.model import ClusterRecord, Endpoint, Export
from federation.server.app import create_token
from federation.store.sqlite import SqliteStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, port: int, admin: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "isthmus.cli", "federation", "serve",
            "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}",
            "--store", f"sqlite:{tmp / 'fed.db'}",
            "--state-dir", str(tmp / "state"),
            "--lease-ttl", "2s",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def wait_ready(proc: subprocess.Popen, admin: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"federation exited {proc.returncode}:\n{out}")
            try:
                async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("federation did not become ready")


def terminate(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.returncode, out


async def test_federation_process_lifecycle(tmp_path: Path) -> None:
    """`federation serve` starts with a 0600 CA key, joins/leases/publishes east-1, exits 0 on
    SIGTERM without logging the token, and serves the same record after a restart."""
    port, admin = free_port(), free_port()
    proc = start(tmp_path, port, admin)
    try:
        await wait_ready(proc, admin)
        assert (tmp_path / "state" / "ca.pem").exists()
        assert (tmp_path / "state" / "ca-key.pem").stat().st_mode & 0o077 == 0

        # the CLI's `federation token create` path: straight onto the store file
        store = SqliteStore(str(tmp_path / "fed.db"))
        await store.open()
        try:
            token, _ = await create_token(store, "east-1", 900, time.time())
        finally:
            await store.close()

        now = time.time()
        td = "east-1.isthmus.local"
        ca = CertificateAuthority.create(td, now)
        svid = ca.issue(gateway_id(td), now)
        record = ClusterRecord("east-1", "us-east", "a", td, "127.0.0.1:15443")
        bundle = load_federation_bundle(tmp_path / "state" / "ca.pem")
        url = f"https://127.0.0.1:{port}"
        async with FederationClient(url, bundle) as anon:
            await anon.join(token, record, ca.bundle(1))
        async with FederationClient(url, bundle, svid) as c:
            await c.grant_lease("east-1")
            export = Export("east-1", "default", "web", 8080, "tcp", (Endpoint("10.0.0.1", 8080),))
            await c.put_export(export)
            cat = await c.catalog()
            assert "east-1" in cat.live and export.key in cat.exports
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin}/status") as r:
                st = await r.json()
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics = await r.text()
        assert st["clusters"]["east-1"]["live"] is True
        assert "isthmus_federation_clusters 1" in metrics
    finally:
        code, out = terminate(proc)
    assert code == 0, out
    assert token not in out  # tokens are never logged
    assert "federation stopped" in out

    proc = start(tmp_path, port, admin)
    try:
        await wait_ready(proc, admin)
        async with FederationClient(url, bundle, svid) as c:
            cat = await c.catalog()
            assert cat.clusters["east-1"] == record
    finally:
        code, out = terminate(proc)
    assert code == 0, out
