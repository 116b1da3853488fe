"""WireGuard tunnels between gateways, for real: each gateway in its own network namespace on an
underlay bridge (tests/helpers/netns.py), wireguard-go devices keyed through the federation.

Needs root, `ip`, wireguard-go, wg (wireguard-tools) and tcpdump; skips naming the install
otherwise. The federation runs in the bridge namespace on 10.77.0.1 (`--overlay-cidr
10.99.0.0/24`); each gateway listens for links on 0.0.0.0 (advertising its underlay address)
and has two echo backends in its namespace. Everything the test starts is stopped by PID and
every namespace deleted at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.netns import Netns, Underlay, can_make_namespaces, capture, read_capture
from tests.helpers.processes import Proc, isthmus_cmd, run_cli, tree_env
from tests.helpers.traffic import wait_for

pytestmark = pytest.mark.integration

TOOLS = ("ip", "wireguard-go", "wg", "tcpdump")
INSTALL = "apt-get install -y iproute2 wireguard-go wireguard-tools tcpdump"
CLUSTERS = (("east-1", "us-east", "a"), ("east-2", "us-east", "b"), ("west-1", "us-west", "a"))
FED_PORT, INBOUND, ADMIN, IMPORT, WG_PORT = 17443, 15443, 15000, 16001, 51820
BACKENDS = (18001, 18002)


def _skip_reason() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)}: {INSTALL}"
    ok, why = can_make_namespaces()
    return None if ok else why


class TunnelTopology:
    def __init__(self, root: Path, net: Underlay, rotate: str = "0s") -> None:
        self.rotate = rotate  # tunnel.rotate_every of every gateway
        self.root = root
        self.net = net
        self.procs: list[Proc] = []
        self.gw: dict[str, Proc] = {}
        self.tag = net.tag

    def interface(self, name: str) -> str:
        return f"wg{self.tag[-6:]}{name[0]}{name[-1]}"  # unique on the machine, <= 15 chars

    def _proc(self, name: str, ns: Netns, argv: list[str]) -> Proc:
        p = Proc(name, ns.cmd(argv), self.root / "logs" / f"{name}.log")
        self.procs.append(p)
        return p

    def config(self, name: str, region: str, zone: str) -> Path:
        ns = self.net.ns[name]
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        eps = "".join(f"      - 127.0.0.1:{p}\n" for p in BACKENDS)
        path = d / "gateway.yaml"
        path.write_text(f"""\
cluster: {{name: {name}, region: {region}, zone: {zone}}}
federation:
  url: https://10.77.0.1:{FED_PORT}
  ca_file: {self.root / 'fed' / 'ca.pem'}
  token_file: {d / 'token'}
listen:
  inbound: 0.0.0.0:{INBOUND}
  admin: 127.0.0.1:{ADMIN}
  advertise: {ns.address}:{INBOUND}
state_dir: {d / 'state'}
limits: {{connect_timeout: 500ms}}
peer_probe: {{interval: 300ms, timeout: 300ms}}
outlier_detection: {{consecutive_failures: 1}}
tunnel:
  kind: wireguard
  listen_port: {WG_PORT}
  interface: {self.interface(name)}
  rotate_every: {self.rotate}
  rotation_overlap: 1s
exports:
  - name: echo
    port: 8080
    endpoints:
{eps}    health_check: {{kind: tcp, interval: 200ms, timeout: 150ms}}
imports:
  - name: echo
    listen: 127.0.0.1:{IMPORT}
    failover: {{tiers: [cluster, zone, region, any], failback_after: 1s}}
""")
        return path

    async def start(self) -> None:
        fed = self._proc("federation", self.net.ul, [
            *isthmus_cmd(), "federation", "serve", "--state-dir", str(self.root / "fed"),
            "--listen", f"10.77.0.1:{FED_PORT}", "--admin", "127.0.0.1:17000",
            "--lease-ttl", "2s", "--overlay-cidr", "10.99.0.0/24", "--log-level", "info"])
        fed.start()
        await wait_for(lambda: self._ready(self.net.ul, 17000, fed), 20.0,
                       what="the federation in its namespace")
        for name, region, zone in CLUSTERS:
            ns = self.net.ns[name]
            for port in BACKENDS:
                self._proc(f"backend-{name}-{port}", ns, [
                    sys.executable, "-m", "tests.helpers.backends", "backend", name,
                    str(port)]).start()
            (self.root / name).mkdir(parents=True, exist_ok=True)
            r = run_cli("federation", "token", "create", "--cluster", name, "--state-dir",
                        str(self.root / "fed"), "-o", str(self.root / name / "token"))
            assert r.returncode == 0, r.stderr
            self.gw[name] = self._proc(name, ns, [
                *isthmus_cmd(), "gateway", "run", "--config",
                str(self.config(name, region, zone)), "--log-level", "info"])
            self.gw[name].start()
        for name, *_ in CLUSTERS:
            await wait_for(lambda n=name: self._ready(self.net.ns[n], ADMIN, self.gw[n]), 20.0,
                           what=f"{name} /readyz")
        for name, *_ in CLUSTERS:
            await self.wait_peers(name, {c for c, *_ in CLUSTERS} - {name})

    async def _ready(self, ns: Netns, port: int, proc: Proc) -> bool:
        if not proc.running:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            reader, writer = await ns.open(port, timeout=1.0)
        except OSError:
            return False
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 2.0)
        writer.transport.abort()
        return data.startswith(b"HTTP/1.1 200")

    async def status(self, name: str) -> dict:
        return await self.net.ns[name].http_json(ADMIN, "/status")

    async def wait_peers(self, name: str, want: set[str], timeout: float = 20.0) -> None:
        async def has() -> bool:
            t = (await self.status(name))["tunnel"]
            return {p["cluster"] for p in t["peers"]} == want and t["overlay_address"]

        await wait_for(has, timeout, what=f"{name}'s tunnel peers to be {sorted(want)}")

    async def ask(self, name: str, timeout: float = 3.0) -> str:
        return await self.net.ns[name].request(IMPORT, "ping", timeout)

    async def cross_from_east1(self):
        """Stop east-1's backends, so its import goes through a tunnel; wait until it does.
        Returns the check (is east-1's import served by another cluster now?)."""
        for p in [p for p in self.procs if p.name.startswith("backend-east-1")]:
            p.stop()

        async def served() -> bool:
            try:
                return await self.ask("east-1", 2.0) in ("east-2", "west-1")
            except (OSError, ConnectionError, TimeoutError):
                return False

        await wait_for(served, 10.0, what="east-1 served through the tunnel")
        return served

    async def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def dump_logs(self) -> None:
        for p in self.procs:
            if not p.name.startswith("backend"):
                print(f"\n----- {p.name}: {p.log} -----\n{p.tail(60)}", file=sys.stderr)


@pytest.fixture
async def topo(tmp_path, request):
    why = _skip_reason()
    if why:
        pytest.skip(why)
    tag = f"it{int(time.time() * 1000) % 100000}"
    failed_before = request.session.testsfailed
    rotate = getattr(request, "param", "0s")
    with Underlay(tag, [c for c, *_ in CLUSTERS]) as net:
        t = TunnelTopology(tmp_path, net, rotate)
        try:
            await t.start()
            yield t
        finally:
            if request.session.testsfailed > failed_before:
                t.dump_logs()
            await t.stop()


async def test_traffic_between_clusters_goes_only_through_the_tunnels(topo: TunnelTopology,
                                                                       tmp_path):
    """east-1's and east-2's backends stop: east-1's import is served by west-1 over the tunnel.
    The underlay sees UDP to the WireGuard ports and no TCP between gateways; `wg show` agrees
    with the federation's records."""
    pcap = tmp_path / "underlay.pcap"
    tcpdump = capture(topo.net.ul, "br0", pcap)
    try:
        await asyncio.sleep(0.5)
        for name in ("east-1", "east-2"):
            for p in [p for p in topo.procs if p.name.startswith(f"backend-{name}")]:
                p.stop()

        async def served_by_west() -> bool:
            try:
                return await topo.ask("east-1") == "west-1"
            except (OSError, ConnectionError, TimeoutError):
                return False

        await wait_for(served_by_west, 10.0, what="east-1 to be served by west-1")
        replies = [await topo.ask("east-1") for _ in range(20)]
        assert replies == ["west-1"] * 20
        await asyncio.sleep(0.5)
    finally:
        tcpdump.terminate()
        tcpdump.wait(5)
    lines = read_capture(pcap)
    gateways = {topo.net.ns[c].address for c, *_ in CLUSTERS}
    tcp_between = [ln for ln in lines if " Flags " in ln and
                   sum(f" {a}." in ln for a in gateways) == 2]
    wg = [ln for ln in lines if f".{WG_PORT}: UDP" in ln or f".{WG_PORT} >" in ln]
    print(f"\nunderlay capture: {len(lines)} packets, {len(wg)} WireGuard UDP, "
          f"{len(tcp_between)} TCP between gateways")
    assert wg, lines[:20]
    assert not tcp_between, tcp_between[:5]

    # wg show agrees with the federation's records
    cat = await topo.status("west-1")
    fed_keys = {}
    for name, *_ in CLUSTERS:
        r = topo.net.ns[name].run(["wg", "show", topo.interface(name), "public-key"])
        assert r.returncode == 0, r.stderr
        fed_keys[name] = r.stdout.strip()
    dump = topo.net.ns["west-1"].run(["wg", "show", topo.interface("west-1"), "dump"]).stdout
    peer_keys = {ln.split("\t")[0] for ln in dump.splitlines()[1:]}
    assert peer_keys == {fed_keys["east-1"], fed_keys["east-2"]}, dump
    assert cat["tunnel"]["public_key"] == fed_keys["west-1"][:8] + "…"

    # `isthmus status`: the gateway's peers with handshakes; the federation's published tunnels.
    # A peer both sides added at the same moment may need WireGuard's retry (5 s) to handshake.
    async def handshaken() -> bool:
        peers = (await topo.status("west-1"))["tunnel"]["peers"]
        return all(p["handshake_age_seconds"] is not None for p in peers)

    await wait_for(handshaken, 15.0, what="west-1's peers to have handshaken")
    out = topo.net.ns["west-1"].run([*isthmus_cmd(), "status", "--admin", f"127.0.0.1:{ADMIN}"],
                                    env=tree_env()).stdout
    assert "tunnel" in out and "east-1" in out and "east-2" in out and "ago" in out, out
    out = topo.net.ul.run([*isthmus_cmd(), "status", "--admin", "127.0.0.1:17000"],
                          env=tree_env()).stdout
    assert "tunnels (WireGuard)" in out and fed_keys["east-1"][:8] in out, out


async def test_a_cluster_whose_lease_expires_is_removed_as_a_peer(topo: TunnelTopology):
    t0 = time.monotonic()
    topo.gw["east-2"].stop()
    await topo.wait_peers("east-1", {"west-1"}, timeout=10.0)
    await topo.wait_peers("west-1", {"east-1"}, timeout=10.0)
    gone = time.monotonic() - t0
    print(f"\neast-2 removed as a peer {gone:.2f} s after it stopped (lease ttl 2 s)")
    dump = topo.net.ns["east-1"].run(["wg", "show", topo.interface("east-1"), "peers"]).stdout
    assert len(dump.split()) == 1
    assert gone < 2.0 + 3.0


async def test_wireguard_go_killed_is_restarted_and_traffic_resumes(topo: TunnelTopology):
    served = await topo.cross_from_east1()
    pid = (await topo.status("east-1"))["tunnel"]["pid"]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()

    async def restarted() -> bool:
        t = (await topo.status("east-1"))["tunnel"]
        return t["restarts"] >= 1 and t["pid"] not in (None, pid)

    await wait_for(restarted, 10.0, what="wireguard-go to be restarted")
    await wait_for(served, 15.0, what="traffic through the tunnel again")
    print(f"\nwireguard-go killed: restarted and serving again {time.monotonic() - t0:.2f} s "
          "later")
    metrics = await topo.net.ns["east-1"].http_json(ADMIN, "/status")
    assert metrics["tunnel"]["restarts"] == 1


async def test_a_peer_with_a_wrong_key_gets_no_traffic(topo: TunnelTopology, tmp_path):
    """An impostor on the underlay takes east-2's overlay address with a key of its own and
    sends to east-1's WireGuard port: east-1 completes no handshake with it, so not one of its
    connections to east-1's gateway gets through, while east-2 itself still does."""
    east2 = (await topo.status("east-2"))["tunnel"]["overlay_address"]
    east1 = (await topo.status("east-1"))["tunnel"]["overlay_address"]
    east1_key = topo.net.ns["east-1"].run(
        ["wg", "show", topo.interface("east-1"), "public-key"]).stdout.strip()
    ul, ifname = topo.net.ul, f"wg{topo.tag[-6:]}x"
    key = tmp_path / "impostor.key"
    key.write_text(ul.run(["wg", "genkey"]).stdout)
    key.chmod(0o600)
    impostor = Proc("impostor", ul.cmd(["wireguard-go", "-f", ifname]), tmp_path / "imp.log")
    impostor.start()
    try:
        await wait_for(lambda: Path(f"/var/run/wireguard/{ifname}.sock").exists(), 5.0,
                       what="the impostor's wireguard-go")
        for argv in (["wg", "set", ifname, "private-key", str(key), "peer", east1_key,
                      "endpoint", f"{topo.net.ns['east-1'].address}:{WG_PORT}",
                      "allowed-ips", f"{east1}/32", "persistent-keepalive", "1"],
                     ["ip", "addr", "add", f"{east2}/32", "dev", ifname],
                     ["ip", "link", "set", ifname, "up"],
                     ["ip", "route", "add", f"{east1}/32", "dev", ifname]):
            r = ul.run(argv)
            assert r.returncode == 0, (argv, r.stderr)
        refused = 0
        for _ in range(3):
            try:
                s = await asyncio.to_thread(ul.connect, east1, INBOUND, 1.0)
                s.close()
            except OSError:
                refused += 1
        assert refused == 3, "a connection through the impostor's tunnel got through"
        dump = ul.run(["wg", "show", ifname, "dump"]).stdout.splitlines()
        handshake = int(dump[1].split("\t")[4])
        assert handshake == 0, f"the impostor completed a handshake: {dump}"
        east1_peers = topo.net.ns["east-1"].run(
            ["wg", "show", topo.interface("east-1"), "peers"]).stdout.split()
        assert len(east1_peers) == 2  # east-2 and west-1, not the impostor's key
        # east-2 itself still reaches east-1 through its tunnel
        s = await asyncio.to_thread(topo.net.ns["east-2"].connect, east1, INBOUND, 3.0)
        s.close()
        print(f"\nimpostor with east-2's overlay address and its own key: {refused} of 3 "
              "connections refused, no handshake; east-2 still connects")
    finally:
        impostor.stop()


@pytest.mark.parametrize("topo", ["4s"], indirect=True)
async def test_key_rotation_under_a_steady_stream_fails_nothing(topo: TunnelTopology):
    """Every gateway rotates its key every 4 s (announced 1 s before use) while east-1's
    import, its own backends stopped, sends 20 new connections a second through the tunnels
    for 14 s: 0 failed, and each gateway rotated at least twice."""
    await topo.cross_from_east1()
    keys0 = {c: (await topo.status(c))["tunnel"]["public_key"] for c, *_ in CLUSTERS}
    results: list[str] = []

    async def one() -> None:
        try:
            results.append(await topo.ask("east-1", 3.0))
        except (OSError, ConnectionError, TimeoutError) as e:
            results.append(f"FAILED {e!r}")

    tasks = []
    end = time.monotonic() + 14.0
    while time.monotonic() < end:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    failed = [r for r in results if r.startswith("FAILED")]
    rotations = {c: (await topo.status(c))["tunnel"]["key_rotations"] for c, *_ in CLUSTERS}
    keys1 = {c: (await topo.status(c))["tunnel"]["public_key"] for c, *_ in CLUSTERS}
    print(f"\nkey rotation under a stream: {len(results)} connections, {len(failed)} failed; "
          f"rotations {rotations}")
    assert not failed, failed[:5]
    assert all(n >= 2 for n in rotations.values()), rotations
    assert all(keys0[c] != keys1[c] for c in keys0)


async def test_a_takeover_hands_the_tunnel_over(topo: TunnelTopology):
    """`gateway run --takeover` of east-1 while its import goes through the tunnel: the new
    process takes the interface over once released (a new wireguard-go), the old one exits 0,
    and calls made all along fail none."""
    await topo.cross_from_east1()
    old_pid = (await topo.status("east-1"))["tunnel"]["pid"]
    results: list[str] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            try:
                results.append(await topo.ask("east-1", 3.0))
            except (OSError, ConnectionError, TimeoutError) as e:
                results.append(f"FAILED {e!r}")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(stream())
    old = topo.gw["east-1"]
    cfg = topo.root / "east-1" / "gateway.yaml"
    new = topo._proc("east-1-new", topo.net.ns["east-1"], [
        *isthmus_cmd(), "gateway", "run", "--config", str(cfg), "--takeover",
        "--log-level", "info"])
    new.start()
    try:
        await wait_for(lambda: old.popen.poll() is not None, 60.0, what="the old east-1 to exit")
        assert old.popen.returncode == 0, old.tail()

        async def new_device() -> bool:
            t = (await topo.status("east-1"))["tunnel"]
            return t is not None and t["pid"] not in (None, old_pid) and len(t["peers"]) == 2

        await wait_for(new_device, 20.0, what="the new process's tunnel")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await task
    failed = [r for r in results if r.startswith("FAILED")]
    print(f"\ntakeover with a tunnel: {len(results)} calls, {len(failed)} failed")
    assert not failed, failed[:5]
