"""A gateway that cannot ever start exits with the reason on one line; one that only has to wait
keeps retrying. Real processes: `isthmus gateway run`, and a real federation where one is needed.

Permanent (exit 2, config): federation.ca_file missing. Permanent (exit 1): the join token is used
or expired. Transient: the federation is down; the gateway retries and joins once it is back.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle
from federation.model import ClusterRecord
from tests.helpers.processes import run_cli
from tests.helpers.traffic import wait_for
from tests.integration.harness import Topology

pytestmark = pytest.mark.integration


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
async def topo(tmp_path):
    t = Topology(tmp_path / "topo")
    try:
        yield t
    finally:
        await t.stop()


async def test_missing_ca_file_exits_2_naming_the_field_and_warns_of_a_public_admin(topo):
    """A missing federation.ca_file exits 2 within 30 s, the last line naming file, field and path,
    no traceback, after a warning of an admin port on every interface.

    No federation ever ran, so fed/ca.pem does not exist. The admin port is on every
    interface in this config: the warning is logged first (nothing is bound: the CA file is
    checked before any listener)."""
    n = topo.nodes["east-1"]
    n.config.write_text(n.config.read_text().replace(f"admin: 127.0.0.1:{n.admin_port}",
                                                     f"admin: 0.0.0.0:{n.admin_port}"))
    started = time.monotonic()
    r = run_cli("gateway", "run", "--config", str(n.config), timeout=30)
    took = time.monotonic() - started
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    last = _last_line(r.stderr)
    assert last.startswith(f"{n.config}: federation.ca_file: "), r.stderr[-2000:]
    assert str(topo.fed_ca) in last and "No such file" in last, last
    assert "Traceback" not in r.stderr
    assert f"warning: listen.admin: '0.0.0.0:{n.admin_port}'" in r.stderr, r.stderr[-2000:]
    assert "every interface" in r.stderr
    assert took < 30


async def _join_once(topo: Topology, name: str, token: str) -> None:
    """Use up `token` the way a gateway would (a fresh CA of the cluster's trust domain)."""
    td = topo.nodes[name].trust_domain
    bundle = CertificateAuthority.create(td, time.time()).bundle(1)
    record = ClusterRecord(name, topo.nodes[name].region, topo.nodes[name].zone, td, "127.0.0.1:9")
    async with FederationClient(topo.fed_url, load_federation_bundle(topo.fed_ca)) as client:
        await client.join(token, record, bundle)


@pytest.mark.parametrize("how", ["used", "expired"])
async def test_a_refused_join_token_exits_1_with_the_reason(topo, how):
    """A used or expired join token exits 1 with one line: the federation's 401 reason and the
    command to make a new token; no traceback, no retry."""
    topo.start_federation()
    await topo.wait_federation()
    n = topo.nodes["east-1"]
    if how == "used":
        token = topo.create_token("east-1", output=topo.token_file("east-1"))
        await _join_once(topo, "east-1", token)
        reason = "join token unknown, revoked or already used"
    else:
        topo.create_token("east-1", ttl="1s", output=topo.token_file("east-1"))
        await asyncio.sleep(1.3)
        reason = "join token expired"
    r = await asyncio.to_thread(run_cli, "gateway", "run", "--config", str(n.config), timeout=30)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = _last_line(r.stderr)
    assert last == (f"isthmus: federation at {topo.fed_url} refused to join east-1 (401): "
                    f"{reason}; create a new one with `isthmus federation token create "
                    "--cluster east-1`"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "retrying" not in r.stderr


async def test_an_unreachable_federation_is_retried_until_it_answers(topo):
    """A gateway whose federation is down serves (/readyz), retries the join and joins within 15 s
    of the federation coming back."""
    topo.start_federation()
    await topo.wait_federation()
    topo.create_token("east-1", output=topo.token_file("east-1"))
    topo.fed_proc.stop()
    n = topo.nodes["east-1"]
    topo.start_gateway("east-1")
    await topo.wait_ready("east-1")  # serves (and routes) while it has not joined yet

    def retrying() -> bool:
        return "cannot join the federation yet (retrying)" in n.proc.log.read_text()

    await wait_for(retrying, 15.0, what="a retried join in the gateway's log")
    await asyncio.sleep(1.0)
    assert n.proc.running and not (n.state_dir / "joined.json").exists()
    topo.start_federation()
    await topo.wait_federation()
    await wait_for(lambda: (n.state_dir / "joined.json").exists(), 15.0, what="the join")
    await topo.wait_live("east-1", clusters=("east-1",))
    assert n.proc.running
