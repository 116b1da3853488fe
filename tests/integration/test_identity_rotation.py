"""A cluster's CA replaced with real processes: `isthmus identity rotate-ca` under traffic in
both directions (0 failed connections), two CAs in `identity.ca_cert_file` (the operator's own
overlap), and a gateway whose bundle sequence is behind the federation's (it recovers, and says
why it is not ready meanwhile).

Run with `python -m pytest tests/integration/test_identity_rotation.py -q -s` for the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from pathlib import Path

import pytest

from federation.ca import CertificateAuthority, fingerprint
from federation.client import operator_client
from federation.errors import IsthmusError
from federation.identity import TrustBundle, verify_svid
from tests.helpers.processes import run_cli
from tests.helpers.traffic import LoadStream, chatter_rounds, http_get, metric_value, wait_for
from tests.helpers.traffic import request as ask
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration


async def federation_bundle(topo: Topology, td: str) -> TrustBundle:
    """The bundle of trust domain `td` the federation serves (read as the operator)."""
    client = operator_client(topo.fed_url, topo.fed_dir / "operator")
    try:
        cat = await client.catalog()
    finally:
        await client.close()
    return TrustBundle.from_jwks(td, dict(cat.bundles[td]))


async def presented_svids(port: int, n: int = 16) -> list[bytes]:
    """The SVID a gateway's inbound listener presents, over `n` fresh TLS handshakes (with
    --workers, SO_REUSEPORT spreads them over every process). No client certificate is sent:
    the server refuses us after the handshake, which is all we need."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    out = []
    for _ in range(n):
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx),
                                           3.0)
        out.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.transport.abort()
    return out


def issued_by(svid_der: bytes, td: str, ca_der: bytes) -> bool:
    try:
        verify_svid(svid_der, TrustBundle(td, (ca_der,), 0), time.time())
        return True
    except IsthmusError:
        return False


def ca_der(path: Path) -> bytes:
    return CertificateAuthority.load(path.read_bytes(), path.with_name(
        path.name.replace(".pem", "-key.pem")).read_bytes(), "east-1.isthmus.local").cert_der


# -------------------------------------------------------------------------------------------
# 1. rotate-ca under traffic


async def test_rotate_ca_under_traffic_in_both_directions_fails_no_connection(tmp_path, request):
    """east-1 (2 workers) rotates its CA (1 m SVIDs, refresh hint 1 s, overlap 4 s, skew 2 s:
    about 70 s) while new connections flow into it from east-2 and west-1 and out of it to
    east-2 and west-1, and two long-lived connections (20 s each, one after another) stay open:
    0 fail. Then the federation's bundle of east-1 holds the new CA only, every east-1 process
    presents an SVID of it, and a restarted east-2 (new links both ways, east-1's bundle from
    the federation) works."""
    topo = Topology(tmp_path, svid_ttl="1m", workers={"east-1": 2},
                    identity={"east-1": {"bundle_refresh_hint": "1s", "rotation_overlap": "4s"}})
    inward = topo.add_service("inward", "east-1", ("east-2", "west-1"))
    outward = topo.add_service("outward", "east-2", ("east-1",))
    westward = topo.add_service("westward", "west-1", ("east-1",))
    flows = {"east-2 -> east-1": (inward["east-2"], "east-1"),
             "west-1 -> east-1": (inward["west-1"], "east-1"),
             "east-1 -> east-2": (outward["east-1"], "east-2"),
             "east-1 -> west-1": (westward["east-1"], "west-1")}
    east1 = topo.nodes["east-1"]
    td = east1.trust_domain
    async with running(topo, request):
        for port, who in flows.values():
            await wait_for(lambda p=port, w=who: _answers(p, w), 15.0, what=f"{who} via {port}")
        old = (await federation_bundle(topo, td)).authorities
        assert len(old) == 1
        loads = {k: LoadStream(port, rate=8, max_seconds=150, max_count=1500).start()
                 for k, (port, _) in flows.items()}
        stop, chats = asyncio.Event(), {"east-2 -> east-1": [], "east-1 -> east-2": []}
        # each 20 s long: a link guarantees a stream about half the SVID lifetime (30 s here)
        chat_tasks = [asyncio.create_task(chatter_rounds(flows[k][0], stop, lg, 20.0))
                      for k, lg in chats.items()]
        try:
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            r = await asyncio.to_thread(run_cli, "identity", "rotate-ca", "--config",
                                        str(east1.config), "--overlap", "4s", "--clock-skew",
                                        "2s")
            assert r.returncode == 0, r.stderr
            plan = json.loads((east1.state_dir / "identity" / "rotation.json").read_text())
            new = ca_der(east1.state_dir / "identity" / "ca-next.pem")
            assert fingerprint(new) == plan["new"] and fingerprint(old[0]) == plan["old"]
            phases: list[str] = []
            during_switch: TrustBundle | None = None
            while True:
                assert time.monotonic() - t0 < 100, f"rotation stuck after phases {phases}"
                rot = (await topo.status("east-1"))["agent"]["identity"]["rotation"]
                phase = rot["phase"] if rot else "done" if phases else None  # None: not seen yet
                if phase is not None and (not phases or phases[-1] != phase):
                    phases.append(phase)
                    if phase == "switch":
                        during_switch = await federation_bundle(topo, td)
                        await asyncio.sleep(1.5)  # the workers look at the plan every second
                        svids = await presented_svids(east1.inbound_port)
                        assert all(issued_by(s, td, new) for s in svids)
                if phase == "done":
                    break
                await asyncio.sleep(0.5)
            took = time.monotonic() - t0
            await asyncio.sleep(2.0)  # traffic after the retire
        finally:
            stop.set()
            for load in loads.values():
                await load.stop()
            await asyncio.gather(*chat_tasks, return_exceptions=True)
        assert phases == ["prepare", "switch", "done"], phases
        assert during_switch is not None and during_switch.authorities == (old[0], new)
        after = await federation_bundle(topo, td)
        assert after.authorities == (new,) and after.sequence == during_switch.sequence + 1
        svids = await presented_svids(east1.inbound_port)
        assert all(issued_by(s, td, new) and not issued_by(s, td, old[0]) for s in svids)
        failed = {k: len(v.failed) for k, v in loads.items()}
        total = {k: len(v.done()) for k, v in loads.items()}
        bad_chat = [r for lg in chats.values() for _, r in lg if r not in ("east-1", "east-2")]
        print(f"\nrotate-ca under traffic: prepare -> switch -> retire in {took:.1f} s; "
              f"connections {total} (total {sum(total.values())}), failed {failed}; "
              f"long-lived lines {[len(lg) for lg in chats.values()]}, failed {len(bad_chat)}")
        assert sum(failed.values()) == 0, {k: v.failed[:3] for k, v in loads.items() if v.failed}
        assert not bad_chat, bad_chat[:5]
        assert all(n > 100 for n in total.values()), total
        # a peer that starts now knows east-1 only by the federation's bundle (new CA only)
        east2 = topo.nodes["east-2"]
        east2.proc.stop()
        topo.start_gateway("east-2")
        await topo.wait_ready("east-2")
        for key in ("east-2 -> east-1", "east-1 -> east-2"):
            port, who = flows[key]
            await wait_for(lambda p=port, w=who: _answers(p, w), 15.0, what=key)
        archived = sorted(p.name for p in (east1.state_dir / "identity" / "archive").iterdir())
        assert archived == [f"ca-{plan['old'][:16]}-key.pem", f"ca-{plan['old'][:16]}.pem"]
        log = east1.proc.log.read_text()
        for phrase in ("CA rotation: prepare:", "CA rotation: the federation holds bundle",
                       "CA rotation: switch:", "CA rotation: retire:"):
            assert log.count(phrase) == 1, phrase  # once (the workers say it at DEBUG)


async def _answers(port: int, who: str) -> bool:
    return await ask(port, "ping", 2.0) == who


# -------------------------------------------------------------------------------------------
# 2. two CAs in identity.ca_cert_file


async def test_two_cas_in_ca_cert_file_are_published_and_a_switch_by_hand_keeps_peers(tmp_path,
                                                                                      request):
    """east-1 runs on a CA of its own: ca_cert_file holds the old and the new CA, ca_key_file
    the old key. The federation's bundle has both; after switching ca_key_file to the new key
    (restart) peers take east-1's new SVIDs both ways; after dropping the old certificate the
    bundle holds the new CA only, at the next sequence."""
    td = "east-1.isthmus.local"
    pki = tmp_path / "pki"
    old, new = CertificateAuthority.create(td, time.time()), CertificateAuthority.create(
        td, time.time())
    old.write(pki / "old.pem", pki / "old-key.pem")
    new.write(pki / "new.pem", pki / "new-key.pem")
    (pki / "cas.pem").write_bytes(old.cert_pem + new.cert_pem)
    own = {"ca_cert_file": str(pki / "cas.pem"), "ca_key_file": str(pki / "old-key.pem")}
    topo = Topology(tmp_path / "topo", identity={"east-1": own})
    inward = topo.add_service("inward", "east-1", ("east-2",))
    outward = topo.add_service("outward", "east-2", ("east-1",))
    east1 = topo.nodes["east-1"]

    async def restart_east1() -> None:
        east1.proc.stop()
        topo.write_configs()
        topo.start_gateway("east-1")
        await topo.wait_ready("east-1")
        await topo.wait_live("east-1")

    async with running(topo, request):
        got = await federation_bundle(topo, td)
        assert got.authorities == (old.cert_der, new.cert_der) and got.sequence == 1
        assert all(issued_by(s, td, old.cert_der) for s in await presented_svids(
            east1.inbound_port, 4))
        own["ca_key_file"] = str(pki / "new-key.pem")  # the new CA signs
        await restart_east1()
        assert all(issued_by(s, td, new.cert_der) for s in await presented_svids(
            east1.inbound_port, 4))
        for port, who in ((inward["east-2"], "east-1"), (outward["east-1"], "east-2")):
            await wait_for(lambda p=port, w=who: _answers(p, w), 15.0, what=f"{who} via {port}")
        assert (await federation_bundle(topo, td)).sequence == 1  # the same two authorities
        (pki / "cas.pem").write_bytes(new.cert_pem)  # retire the old CA
        await restart_east1()

        async def new_only() -> bool:
            b = await federation_bundle(topo, td)
            return b.authorities == (new.cert_der,) and b.sequence == 2

        await wait_for(new_only, 10.0, what="the federation's bundle of east-1 to be the new CA")
        for port, who in ((inward["east-2"], "east-1"), (outward["east-1"], "east-2")):
            await wait_for(lambda p=port, w=who: _answers(p, w), 15.0, what=f"{who} via {port}")


# -------------------------------------------------------------------------------------------
# 3. a bundle sequence behind the federation's


class SlowRelay:
    """A TCP relay to 127.0.0.1:`upstream` that holds every chunk `delay` seconds each way (a
    slow network to the federation, so a short-lived state stays long enough to be seen)."""

    def __init__(self, upstream: int, delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        for src, dst in ((reader, up_w), (up_r, writer)):
            t = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pump(self, src, dst) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                dst.write(data)
            dst.transport.abort()

        sender = asyncio.create_task(send())
        try:
            while data := await src.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait(None)
            await asyncio.gather(sender, return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_bundle_sequence_behind_the_federations_recovers_and_readyz_says_why(tmp_path,
                                                                                   request):
    """east-1 restarts with bundle.json at sequence 0 while the federation holds 1 (a state dir
    restored from a backup), talking to the federation over a slow relay (0.5 s each way). The
    409 makes it not ready, /readyz saying why; it publishes at sequence 2, gets a lease and
    publishes its exports again; its metrics and /status count one refusal."""
    topo = Topology(tmp_path, lease_ttl="6s")
    east1 = topo.nodes["east-1"]
    relay = SlowRelay(topo.fed_port, 0.5)
    async with running(topo, request):
        assert east1.proc.stop() == 0
        await topo.wait_live("east-2", clusters=("east-2", "west-1"))  # its exports withdrawn
        meta_path = east1.state_dir / "identity" / "bundle.json"
        meta = json.loads(meta_path.read_text())
        assert meta["sequence"] == 1
        meta_path.write_text(json.dumps({**meta, "sequence": 0}))
        port = await relay.start()
        east1.config.write_text(east1.config.read_text().replace(
            topo.fed_url, f"https://127.0.0.1:{port}"))
        try:
            east1.proc.start()
            seen: list[tuple[int, str]] = []

            async def recovered() -> bool:
                status, body = await http_get(east1.admin_port, "/readyz", 1.0)
                if not seen or seen[-1] != (status, body):
                    seen.append((status, body))
                return status == 200 and any(s == 503 for s, _ in seen)

            await wait_for(recovered, 30.0, interval=0.05, what="east-1 not ready, then ready")
            relay.delay = 0.0
            refused = [b for s, b in seen if s == 503]
            assert refused and refused[0].startswith(
                "not ready: the federation refuses our bundle (bundle_sequence, HTTP 409): "
                "bundle east-1.isthmus.local: sequence 0 is lower"), seen
            await topo.wait_live("east-2")
            status = (await topo.status("east-1"))["agent"]
            assert status["registered"] and status["bundle_sequence"] == 2
            assert status["refusals"] == {"bundle_sequence": 1} and status["refusal"] is None
            text = await topo.metrics("east-1")
            assert metric_value(text, "isthmus_gateway_federation_registered") == 1
            assert metric_value(text, "isthmus_gateway_federation_refusals_total",
                                'reason="bundle_sequence"') == 1
            assert json.loads(meta_path.read_text())["sequence"] == 2
            assert "the federation holds bundle sequence 1, ours is 0; publishing ours as " \
                   "sequence 2" in east1.proc.log.read_text()

            async def exports_back() -> bool:
                client = operator_client(topo.fed_url, topo.fed_dir / "operator")
                try:
                    cat = await client.catalog()
                finally:
                    await client.close()
                return any(e.cluster == "east-1" for e in cat.exports.values())

            await wait_for(exports_back, 10.0, what="east-1's exports at the federation")
            print(f"\nbundle sequence behind: /readyz went {[s for s, _ in seen]}; "
                  f"503 said {refused[0].strip()!r}")
        finally:
            with contextlib.suppress(Exception):
                await relay.close()
