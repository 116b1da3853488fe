"""Schemathesis against a real `isthmus federation serve`: the served document and the server
agree (`--checks all`; schemathesis.toml at the root says which refusals are by design).

The federation is seeded with one joined, live cluster (east-1), then schemathesis runs twice
over TLS: as the operator (the credentials the federation writes to STATE/operator) and as
east-1's gateway (its own records as path names, so the cluster-write handlers really run).
A run is bounded to 10 examples per operation with a fixed seed (about 20 s each); a full run
is `schemathesis run --checks all https://127.0.0.1:PORT/v1/openapi.json --tls-verify
STATE/ca.pem --request-cert STATE/operator/svid.pem --request-cert-key
STATE/operator/svid-key.pem --request-timeout 65`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle
from federation.identity import gateway_id
from federation.model import ClusterRecord, Endpoint, Export
from tests.helpers.processes import Proc, free_port, isthmus_cmd, run_cli
from tests.helpers.traffic import http_get, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
def _schemathesis(url: str, ca: Path, cert_dir: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{url}/v1/openapi.json",
         "--checks", "all",
         "--tls-verify", str(ca), "--request-cert", str(cert_dir / "svid.pem"),
         "--request-cert-key", str(cert_dir / "svid-key.pem"),
         "--workers", "1", "--request-timeout", "65", "--max-examples", "10", "--seed", "1",
         "--no-color"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is in the test extra")
@pytest.mark.timeout(300)
async def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    """schemathesis (all checks, 10 examples per operation) as the operator and as east-1 finds
    0 failures, and no federation handler crashes."""
    state = tmp_path / "fed"
    port, admin = free_port(), free_port()
    fed = Proc("federation", [*isthmus_cmd(), "federation", "serve", "--state-dir", str(state),
                              "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                              "--lease-ttl", "1h"], tmp_path / "federation.log")
    fed.start()
    try:
        async def ready() -> bool:
            return (await http_get(admin, "/readyz", 1.0))[0] == 200

        await wait_for(ready, 15.0, what="federation /readyz")
        url = f"https://127.0.0.1:{port}"
        r = run_cli("federation", "token", "create", "--cluster", "east-1",
                    "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        td = "east-1.isthmus.local"
        ca = CertificateAuthority.create(td, time.time())
        svid = ca.issue(gateway_id(td), time.time())
        svid.write(tmp_path / "east-1")
        fed_bundle = load_federation_bundle(state / "ca.pem")
        record = ClusterRecord("east-1", "us-east", "a", td, "127.0.0.1:15443")
        async with FederationClient(url, fed_bundle) as anon:
            await anon.join(r.stdout.strip(), record, ca.bundle(1))
        async with FederationClient(url, fed_bundle, svid) as c:
            await c.grant_lease("east-1")
            await c.put_export(Export("east-1", "default", "echo", 8080, "tcp",
                                      (Endpoint("127.0.0.1", 9001),)))

        as_operator = ROOT / "schemathesis.toml"
        as_cluster = tmp_path / "as-cluster.toml"
        as_cluster.write_text('[parameters]\n"path.name" = "east-1"\n"path.cluster" = "east-1"\n'
                              + as_operator.read_text())
        for who, certs, config in (("operator", state / "operator", as_operator),
                                   ("east-1", tmp_path / "east-1", as_cluster)):
            run = _schemathesis(url, state / "ca.pem", certs, config)
            summary = next((line for line in reversed(run.stdout.splitlines())
                            if line.startswith("=")), "")
            print(f"\nschemathesis as {who}: exit {run.returncode}: {summary}")
            assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert fed.running, fed.tail()
        # no handler crashed (aiohttp's own parser may log a refused malformed request)
        assert f'File "{ROOT / "federation"}' not in fed.log.read_text(), fed.tail()
    finally:
        fed.stop()
