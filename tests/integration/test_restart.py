"""Zero-downtime restarts (`isthmus gateway run --takeover`, gateway/control/handoff.py) and binding
every listener first. Real processes and sockets; every process is stopped by its PID.

Measured on this machine at 40 new connections/s through east-1's import listener (the
acceptance run's traffic): a plain restart (SIGTERM, then start again) fails 42-47 connections
(ECONNREFUSED while nothing listens), 83 with --workers 2; a takeover fails none.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from federation.ca import CertificateAuthority
from tests.helpers.backends import Backend, make_blackhole
from tests.helpers.processes import Proc, free_port, isthmus_cmd, run_cli
from tests.helpers.traffic import LoadStream, http_json, request, wait_for

from .harness import Node, Topology, running
from .test_workers import gone

pytestmark = pytest.mark.integration

DRAIN = 3.0  # limits.drain_timeout of the gateways here


class RestartTopology(Topology):
    """The harness topology with a short drain bound (and a takeover bound) on every gateway."""

    def config_text(self, n: Node) -> str:
        return super().config_text(n).replace(
            "limits:\n", f"limits:\n  drain_timeout: {DRAIN:g}s\n  takeover_timeout: 20s\n")


def takeover(topo: Topology, name: str, tag: str, *extra: str) -> Proc:
    n = topo.nodes[name]
    p = topo._proc(f"{name}-{tag}", ["gateway", "run", "--config", str(n.config), "--takeover",
                                     "--log-level", "info", *extra])
    p.start()
    return p


async def exited(p: Proc, timeout: float) -> int:
    await wait_for(lambda: not p.running, timeout, what=f"{p.name} (pid {p.pid}) to exit")
    return p.popen.returncode


class LongLived:
    """One client connection kept open: a line sent, the reply read, as often as we like."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> LongLived:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def ask(self) -> str:
        self.writer.write(b"ping\n")
        await self.writer.drain()
        return (await asyncio.wait_for(self.reader.readline(), 3)).decode().strip()

    async def until_closed(self, timeout: float) -> bytes:
        """What the gateway sends until it closes: b"" for a clean end (EOF); raises on a reset."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


def live_everywhere(fed: dict, name: str) -> bool:
    return fed["clusters"][name]["live"] and name in fed["services"]["default/echo"]


@pytest.fixture
async def topo(tmp_path, request):
    async with running(RestartTopology(tmp_path / "topo"), request) as t:
        yield t


async def test_takeover_under_load_loses_no_connection_and_drains_the_old_ones(topo: Topology):
    """A takeover of east-1 under 40 new conn/s: 0 of > 400 failed, all served by east-1, which
    stays live in the catalog; 3 long-lived connections drained, 1 closed by its client, 2 with a
    clean EOF at the 3 s bound, the old process exiting 0 after >= 2.5 s; a second takeover from
    the new process exits that one 0."""
    east1 = topo.nodes["east-1"]
    old = east1.proc
    kept = [await LongLived(east1.import_port).open() for _ in range(3)]
    assert [await c.ask() for c in kept] == ["east-1"] * 3
    load = LoadStream(east1.import_port, rate=40, max_seconds=30, max_count=1200).start()
    seen_live: list[bool] = []

    async def watch_federation() -> None:  # east-1 and its export stay in the catalog throughout
        while True:
            seen_live.append(live_everywhere(await topo.fed_status(), "east-1"))
            await asyncio.sleep(0.1)

    watcher = asyncio.get_running_loop().create_task(watch_federation())
    try:
        await asyncio.sleep(1.5)
        new = takeover(topo, "east-1", "new")

        async def handed_over() -> bool:  # the new process answers on the admin port
            st = await http_json(east1.admin_port, "/status", 1.0)
            return st["workers"][0]["pid"] == new.pid

        await wait_for(handed_over, 25, what="the new east-1 to take over")
        handed = time.monotonic()
        assert old.running  # draining: the long-lived connections still work through it
        assert [await c.ask() for c in kept] == ["east-1"] * 3
        kept[0].close()  # one ends when its client wants
        # The last two are still open at the drain bound: half-closed then (a clean EOF), and
        # the old process exits 0 (within the bound plus the grace time and a margin).
        assert await kept[1].until_closed(DRAIN + 5) == b""
        assert await kept[2].until_closed(2) == b""
        assert await exited(old, 5) == 0
        assert time.monotonic() - handed >= DRAIN - 0.5
        await asyncio.sleep(3)  # past the old lease's ttl (2s): nothing is withdrawn
        # A second takeover, from the process that took over (it serves the control socket now).
        newer = takeover(topo, "east-1", "newer")
        assert await exited(new, 25) == 0
        assert newer.running
        await asyncio.sleep(1)
    finally:
        await load.stop()
        watcher.cancel()
    assert len(load.done()) > 400
    assert [c.error for c in load.failed] == []
    assert set(load.counts()) == {"east-1"}
    assert seen_live and all(seen_live), seen_live.count(False)


async def test_takeover_of_the_inbound_side_moves_remote_links_without_a_failover(topo: Topology):
    """A takeover of east-2, the inbound side of east-1's link, under 40 new conn/s: 0 failed,
    all still served by east-2, the old east-2 exits 0 and the stream on the old link ends with a
    clean EOF.

    east-1's own backends are down, so its import goes to east-2 over a link to east-2's
    inbound listener. east-2 restarts: east-1 is told GOAWAY, opens a new link to the new east-2,
    and no connection fails or moves to another cluster (no outlier ejection)."""
    await topo.stop_backends("east-1")
    await topo.wait_served("east-1", "east-2")
    east1, east2 = topo.nodes["east-1"], topo.nodes["east-2"]
    kept = await LongLived(east1.import_port).open()  # a stream on the old link
    assert await kept.ask() == "east-2"
    load = LoadStream(east1.import_port, rate=40, max_seconds=30, max_count=1200).start()
    try:
        await asyncio.sleep(1.5)
        old = east2.proc
        takeover(topo, "east-2", "new")
        await wait_for(lambda: not old.running, 25, what="the old east-2 to hand over and exit")
        assert old.popen.returncode == 0
        await asyncio.sleep(1.5)
    finally:
        await load.stop()
    assert [c.error for c in load.failed] == []
    assert set(load.counts()) == {"east-2"}, load.counts()
    assert await kept.until_closed(1) == b""  # the old stream ended at the drain bound, cleanly


async def test_takeover_with_workers(tmp_path: Path, request):
    """A takeover of east-1 on --workers 2 under 40 new conn/s: one without --workers 2 exits 2,
    then 0 failed, all served by east-1, the old primary exits 0, its worker is gone and a new
    primary and worker 1 run."""
    async with running(RestartTopology(tmp_path / "topo", workers={"east-1": 2}), request) as topo:
        east1 = topo.nodes["east-1"]

        async def workers_up() -> list[dict]:
            rows = (await topo.status("east-1"))["workers"]
            return rows if all(r["running"] for r in rows) else []

        await wait_for(workers_up, 15, what="east-1's worker 1 running")
        old_worker = (await workers_up())[1]["pid"]
        # The worker count must stay: refused with exit 2, the running gateway untouched.
        r = run_cli("gateway", "run", "--config", str(east1.config), "--takeover")
        assert r.returncode == 2 and "has --workers 2" in r.stderr, r.stderr
        load = LoadStream(east1.import_port, rate=40, max_seconds=30, max_count=1200).start()
        try:
            await asyncio.sleep(1.5)
            new = takeover(topo, "east-1", "new", "--workers", "2")
            assert await exited(east1.proc, 25) == 0
            assert gone(old_worker)

            async def new_workers() -> bool:
                rows = await workers_up()
                return bool(rows) and rows[0]["pid"] == new.pid and rows[1]["pid"] != old_worker

            await wait_for(new_workers, 10, what="the new primary and its worker")
            await asyncio.sleep(1.5)
        finally:
            await load.stop()
        assert [c.error for c in load.failed] == []
        assert set(load.counts()) == {"east-1"}


# ---------------------------------------------------------------------------------------------
# one gateway on its own (its federation does not answer: it routes and retries)


def lone_config(root: Path, *, inbound: int, admin: int, import_port: int, endpoints: list[int],
                extra: str = "", name: str = "gateway.yaml") -> Path:
    """A gateway config whose federation never answers (the gateway routes and keeps retrying)."""
    root.mkdir(parents=True, exist_ok=True)
    # a real CA certificate (checked at start), of a federation that never answers
    fed_ca = CertificateAuthority.load_or_create(root / "fed-ca", "federation.isthmus.local",
                                                 time.time())
    (root / "ca.pem").write_bytes(fed_ca.cert_pem)
    (root / "token").write_text("not-a-token\n")
    eps = "".join(f"      - 127.0.0.1:{p}\n" for p in endpoints)
    path = root / name
    path.write_text(f"""\
cluster: {{name: east-1, region: us-east, zone: a}}
federation: {{url: "https://127.0.0.1:{free_port()}", ca_file: ca.pem, token_file: token}}
listen: {{inbound: "127.0.0.1:{inbound}", admin: "127.0.0.1:{admin}"}}
state_dir: state
limits: {{connect_timeout: 300ms, drain_timeout: 2s, takeover_timeout: 2s}}
exports:
  - name: echo
    port: 8080
    endpoints:
{eps}    health_check: {{kind: tcp, interval: 200ms, timeout: 150ms{extra}}}
imports:
  - name: echo
    listen: 127.0.0.1:{import_port}
    failover: {{tiers: [cluster]}}
""")
    return path


@pytest.fixture
async def lone(tmp_path: Path):
    backend = Backend("east-1", free_port())
    await backend.start()
    ports = {"inbound": free_port(), "admin": free_port(), "import_port": free_port()}
    cfg = lone_config(tmp_path / "gw", **ports, endpoints=[backend.port])
    procs: list[Proc] = []

    def start(path: Path = cfg, *args: str) -> Proc:
        name = f"gw{len(procs)}"
        p = Proc(name, [*isthmus_cmd(), "gateway", "run", "--config", str(path), *args],
                 tmp_path / "logs" / f"{name}.log")
        procs.append(p)
        p.start()
        return p

    async def ready(p: Proc) -> None:
        async def up() -> bool:
            assert p.running, p.tail()
            return await request(ports["import_port"], "ping", 1.0) == "east-1"

        await wait_for(up, 15, what=f"{p.name} serving")

    try:
        yield cfg, ports, backend, start, ready
    finally:
        for p in reversed(procs):
            p.stop()
        await backend.close()


async def test_a_second_plain_start_exits_2_naming_the_running_pid(lone):
    """A plain start on the state dir of a running gateway exits 2 naming its pid and --takeover,
    and the running gateway keeps serving."""
    cfg, ports, _, start, ready = lone
    first = start()
    await ready(first)
    r = run_cli("gateway", "run", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"a gateway already runs on this state dir (pid {first.pid})" in r.stderr
    assert "--takeover" in r.stderr
    assert first.running and await request(ports["import_port"]) == "east-1"


@pytest.mark.parametrize("field", ["listen.inbound", "listen.admin", "imports[0].listen"])
async def test_a_port_in_use_exits_2_before_anything_is_written(tmp_path: Path, field):
    """With listen.inbound, listen.admin or imports[0].listen in use, a start exits 2 naming the
    field, the address and "in use", and writes no state dir."""
    ports = {"inbound": free_port(), "admin": free_port(), "import_port": free_port()}
    cfg = lone_config(tmp_path / "gw", **ports, endpoints=[free_port()])
    taken = {"listen.inbound": ports["inbound"], "listen.admin": ports["admin"],
             "imports[0].listen": ports["import_port"]}[field]
    with socket.create_server(("127.0.0.1", taken)):
        r = run_cli("gateway", "run", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"{field}: cannot listen on 127.0.0.1:{taken}" in r.stderr
    assert "in use" in r.stderr
    assert not (tmp_path / "gw" / "state").exists()  # no identity, no lock: nothing


async def test_a_takeover_that_never_gets_ready_leaves_the_old_gateway_serving(lone, tmp_path):
    """A takeover not ready within takeover_timeout 2s exits 1 after >= 2 s, and one killed after
    receiving the sockets changes nothing either: under 40 new conn/s 0 failed, the old gateway
    keeps serving and owning the state dir (a plain start exits 2 naming its pid)."""
    cfg, ports, backend, start, ready = lone
    old = start()
    await ready(old)
    # The new config adds an endpoint that never answers a probe (a blackholed port) and needs
    # 20 failed probes to call it unhealthy: not ready within takeover_timeout (2s).
    fillers: list[socket.socket] = []
    hole = make_blackhole(free_port(), fillers)
    try:
        slow = lone_config(tmp_path / "gw", **ports,
                           endpoints=[backend.port, hole.getsockname()[1]],
                           extra=", unhealthy_threshold: 20", name="slow.yaml")
        load = LoadStream(ports["import_port"], rate=40, max_seconds=20, max_count=800).start()
        try:
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            new = start(slow, "--takeover")
            assert await exited(new, 20) == 1
            assert time.monotonic() - t0 >= 2.0
            assert "takeover aborted, not ready after 2s" in new.tail()
            assert "health of local endpoint(s)" in new.tail()
            # A new process killed mid-takeover (before it was ready): the same.
            crash = start(slow, "--takeover")
            await wait_for(lambda: "listening socket(s) received" in crash.tail(), 10,
                           what="the second new process to receive the sockets")
            crash.kill()
            await asyncio.sleep(1.0)
        finally:
            await load.stop()
    finally:
        hole.close()
        for f in fillers:
            f.close()
    assert old.running
    assert [c.error for c in load.failed] == []
    assert "went away before it was ready; this gateway keeps serving" in old.tail()
    # The old one still owns the state dir: a plain start names it.
    r = run_cli("gateway", "run", "--config", str(cfg))
    assert r.returncode == 2 and f"(pid {old.pid})" in r.stderr, r.stderr


async def test_when_the_old_gateway_dies_mid_takeover_the_new_one_goes_on_alone(lone):
    """The old gateway killed after handing over its sockets: 5 of 5 requests are served by the
    new one within 8 s, which goes on alone, is ready and owns the state dir (a plain start exits
    2 naming its pid)."""
    cfg, ports, _, start, ready = lone
    old = start()
    await ready(old)
    new = start(cfg, "--takeover")  # no federation: it waits CATALOG_WAIT (2s) for a catalog
    await wait_for(lambda: "listening socket(s) received" in new.tail(), 10,
                   what="the new process to receive the sockets")
    old.kill()
    killed = time.monotonic()
    replies = await asyncio.gather(*(request(ports["import_port"], "ping", 8.0) for _ in range(5)))
    assert replies == ["east-1"] * 5  # queued on the socket the new process holds, then served
    assert time.monotonic() - killed < 8
    await wait_for(lambda: "went away during the takeover; going on alone" in new.tail(), 5,
                   what="the new process to go on alone")
    r = run_cli("gateway", "run", "--config", str(cfg))
    assert r.returncode == 2 and f"(pid {new.pid})" in r.stderr, r.stderr  # it owns the state dir
    status = await http_json(ports["admin"], "/status")
    assert status["ready"] and status["workers"][0]["pid"] == new.pid


async def test_sigquit_drains_and_exits_0(lone):
    """SIGQUIT: new connections are refused 0.5 s later, an open one still answers and ends with a
    clean EOF at the 2 s drain bound, and the process exits 0."""
    cfg, ports, _, start, ready = lone
    gw = start()
    await ready(gw)
    kept = await LongLived(ports["import_port"]).open()
    assert await kept.ask() == "east-1"
    os.kill(gw.pid, signal.SIGQUIT)
    await asyncio.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):  # nobody else holds the socket: it is gone
        await request(ports["import_port"])
    assert await kept.ask() == "east-1"  # open connections go on until the bound (2s)
    assert await kept.until_closed(5) == b""
    assert await exited(gw, 5) == 0
