"""The pure decisions of a restart (gateway/core/takeover.py) and the I/O pieces of the handoff
that need no gateway: the state dir's lock and binding every listener first
(gateway/control/claim.py), control messages with file descriptors over a real unix socket
(gateway/control/handoff.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from gateway.config.schema import parse_config
from gateway.control.claim import (
    AlreadyRunning,
    BindError,
    ListenSockets,
    StateLock,
    control_socket,
)
from gateway.control.handoff import Channel, PeerGone
from gateway.core.takeover import (
    CATALOG_WAIT,
    PlanError,
    Progress,
    Wanted,
    missing,
    plan_sockets,
    wanted_listeners,
)
from gateway.errors import ConfigError, GatewayError

BASE = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:7443", ca_file: ca.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
"""
IMPORTS = """\
imports:
  - {name: cart, listen: "127.0.0.1:16000"}
  - {name: shop, listen: "0.0.0.0:16001"}
"""


def cfg(text: str = BASE + IMPORTS, path: Path = Path("/etc/isthmus/gw.yaml")):
    return parse_config(text, path)


# ------------------------------------------------------------------------------ config


def test_drain_and_takeover_timeouts_default_to_30s_and_parse():
    assert (cfg().limits.drain_timeout, cfg().limits.takeover_timeout) == (30.0, 30.0)
    c = cfg(BASE + "limits: {drain_timeout: 0s, takeover_timeout: 2m}\n")
    assert (c.limits.drain_timeout, c.limits.takeover_timeout) == (0.0, 120.0)


@pytest.mark.parametrize("limits, message", [
    ("{drain_timeout: 25h}", "limits.drain_timeout: '25h' is too long"),
    ("{takeover_timeout: 500ms}", "limits.takeover_timeout: '500ms' is too short"),
    ("{takeover_timeout: 11m}", "limits.takeover_timeout: '11m' is too long"),
    ("{drain_timeout: soon}", "limits.drain_timeout"),
])
def test_bad_drain_or_takeover_timeouts_are_refused(limits, message):
    with pytest.raises(ConfigError) as e:
        cfg(BASE + f"limits: {limits}\n")
    assert message in str(e.value)


# ------------------------------------------------------------------------------ pure


def test_wanted_listeners_name_their_field_and_count_one_socket_per_worker():
    got = wanted_listeners(cfg(), 3)
    assert [(w.field, w.address, w.count) for w in got] == [
        ("listen.inbound", "127.0.0.1:15443", 3),
        ("listen.admin", "127.0.0.1:15000", 1),  # the primary's only
        ("imports[0].listen", "127.0.0.1:16000", 3),
        ("imports[1].listen", "0.0.0.0:16001", 3),
    ]


def W(field: str, port: int, count: int = 1) -> Wanted:
    return Wanted(field, "127.0.0.1", port, count)


def test_sockets_are_matched_by_address_so_edits_keep_theirs():
    wanted = (W("listen.inbound", 1), W("listen.admin", 2), W("imports[0].listen", 4))
    plan = plan_sockets(wanted, {"127.0.0.1:1": False, "127.0.0.1:2": False,
                                 "127.0.0.1:3": False, "127.0.0.1:4": False})
    assert [w.address for w in plan.adopt] == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:4"]
    assert plan.bind == () and plan.drop == ("127.0.0.1:3",)  # an import removed
    plan = plan_sockets(wanted, {"127.0.0.1:1": False, "127.0.0.1:2": False})
    assert plan.bind == (W("imports[0].listen", 4),)  # an import added: bound here


def test_a_socket_that_does_not_fit_is_refused_naming_the_field():
    with pytest.raises(PlanError, match=r"imports\[0\].listen: 127.0.0.1:2 is not shared by"):
        plan_sockets((W("imports[0].listen", 2, count=2),), {"127.0.0.1:2": False})
    with pytest.raises(PlanError, match=r"listen.admin: 127.0.0.1:2 is shared by workers"):
        plan_sockets((W("listen.admin", 2),), {"127.0.0.1:2": True})


@pytest.mark.parametrize("progress, want", [
    (Progress(0.1, "federation"), None),
    (Progress(0.1, "cache"), "the catalog"),  # give the federation a moment
    (Progress(CATALOG_WAIT, "cache"), None),  # then the cache the old process kept stands in
    (Progress(CATALOG_WAIT, "none"), None),  # it had no catalog either
    (Progress(0.1, "federation", unknown_endpoints=("local:a:1",)), "local endpoint(s) local:a:1"),
    (Progress(0.1, "federation", unknown_peers=("west-1",)), "remote gateway(s) west-1"),
    (Progress(0.1, "federation", workers_waiting=(1, 2, 3, 4)), "worker(s) 1, 2, 3 and 1 more"),
    (Progress(0.1, "federation", ("e",), ("p",)), "health of local endpoint(s) e; a probe"),
])
def test_ready_when_catalog_health_peers_and_workers_are_known(progress, want):
    got = missing(progress)
    assert got is None if want is None else want in got


def test_an_unknown_catalog_source_is_a_bug():
    with pytest.raises(ValueError):
        missing(Progress(0.0, "guess"))


# ------------------------------------------------------------------------------ the lock


def test_the_lock_names_its_holder_and_a_second_start_is_refused(tmp_path: Path):
    assert StateLock.holder(tmp_path) is None  # no lock file: nobody
    lock = StateLock.acquire(tmp_path, "gw.yaml")
    lock.write_pid(4242)
    assert StateLock.holder(tmp_path) == 4242
    with pytest.raises(AlreadyRunning, match=r"\(pid 4242\).*--config gw.yaml --takeover"):
        StateLock.acquire(tmp_path, "gw.yaml", wait=0.1)
    # Handed over as an fd (here: a duplicate, as SCM_RIGHTS gives): still held by the copy.
    copy = StateLock(os.dup(lock.fd))
    lock.close()
    assert StateLock.holder(tmp_path) == 4242
    copy.close()
    assert StateLock.holder(tmp_path) is None  # the file stays, unlocked: a stale PID is no one
    StateLock.acquire(tmp_path, "gw.yaml").close()


# ------------------------------------------------------------------------------ binding first


def test_binding_a_port_in_use_names_the_field_and_closes_what_it_bound():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        free = socket.create_server(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        wanted = (W("listen.inbound", free_port), W("imports[3].listen", port))
        with pytest.raises(BindError) as e:
            ListenSockets.bind(wanted, "gw.yaml")
    assert str(e.value).startswith(f"gw.yaml: imports[3].listen: cannot listen on 127.0.0.1:{port}")
    assert "in use" in str(e.value)
    with socket.create_server(("127.0.0.1", free_port)):  # the first one was closed again
        pass


def test_a_worker_binds_its_own_sockets_and_its_primary_holds_them_until_it_dies():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    wanted = (Wanted("listen.inbound", "127.0.0.1", port, 3), W("listen.admin", 0))
    primary = ListenSockets.bind(wanted, "gw.yaml")
    worker = ListenSockets.for_worker(wanted, {}, 2, "gw.yaml")  # SO_REUSEPORT: beside index 0
    try:
        assert [(a, i) for a, i, _ in primary.offer()] == [("127.0.0.1:0", 0), (address, 0)]
        assert [(a, i) for a, i, _ in worker.offer()] == [(address, 2)]  # no admin socket
        sock = worker.get(address, 2)
        primary.adopt(2, {address: socket.socket(fileno=os.dup(sock.fileno()))})
        assert list(primary.held(2)) == [address]
        inherited = ListenSockets.for_worker(wanted, {address: os.dup(sock.fileno())}, 2, "gw.yaml")
        assert inherited.get(address, 2).getsockname() == sock.getsockname()  # passed, not bound
        inherited.close()
        held = primary.held(2)[address]
        primary.drop(2)
        assert held.fileno() == -1 and primary.held(2) == {}
    finally:
        primary.close()
        worker.close()


# ------------------------------------------------------------------------------ control messages


def test_messages_carry_fds_and_bad_ones_are_refused(tmp_path: Path):
    async def go() -> None:
        server = control_socket(tmp_path)
        assert (tmp_path / "gateway.sock").stat().st_mode & 0o777 == 0o600
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(str(tmp_path / "gateway.sock"))
        conn, _ = server.accept()
        a, b = Channel(client), Channel(conn)
        r, w = os.pipe()
        await a.send({"type": "sockets", "n": 1}, [w])
        msg, fds = await b.recv()
        assert msg == {"type": "sockets", "n": 1} and len(fds) == 1
        os.write(fds[0], b"through")  # the same pipe, passed across
        assert os.read(r, 7) == b"through"
        for fd in (r, w, *fds):
            os.close(fd)
        client.send(b"not json")
        with pytest.raises(GatewayError, match="not a control message: 'not json'"):
            await b.recv()
        client.send(b'{"no": "type"}')
        with pytest.raises(GatewayError, match="not a control message"):
            await b.recv()
        client.send(b"x" * 70_000)
        with pytest.raises(GatewayError, match="over 65536 bytes"):
            await b.recv()
        with pytest.raises(TimeoutError):
            await b.recv(timeout=0.05)
        a.close()
        with pytest.raises(PeerGone):
            await b.recv()
        b.close()
        server.close()

    asyncio.run(go())


def test_a_long_state_dir_path_still_gets_a_control_socket(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = control_socket(deep)
    try:
        assert (deep / "gateway.sock").exists()
    finally:
        sock.close()


# ------------------------------------------------------------------------------ the protocol


class Owner:
    """What the control server needs of a running gateway (handoff.Handing), and no more."""

    def __init__(self, tmp_path: Path, workers: int = 1) -> None:
        self.workers = workers
        self.lock = StateLock.acquire(tmp_path, "gw.yaml")
        self.control = control_socket(tmp_path)
        self.listen = ListenSockets.bind((W("listen.inbound", 0),), "gw.yaml")
        self.events: list[str] = []

    def handoff_sockets(self) -> ListenSockets:
        return self.listen

    async def release(self):
        self.events.append("release")
        return self.lock.fd, self.control

    def resume(self) -> None:
        self.events.append("resume")

    def handed_over(self) -> None:
        self.events.append("handed over")


def test_the_handoff_protocol_end_to_end(tmp_path: Path):
    from gateway.control.handoff import ControlServer, Takeover, TakeoverFailed, TakeoverRefused

    async def go() -> None:
        owner = Owner(tmp_path)
        server = ControlServer(owner.control, owner)
        task = asyncio.ensure_future(server.run())
        try:
            with pytest.raises(TakeoverRefused, match="has --workers 1; a takeover keeps"):
                await Takeover.begin(tmp_path, 2, 5.0)
            first = await Takeover.begin(tmp_path, 1, 5.0)
            assert first.pid == os.getpid() and list(first.socks) == ["127.0.0.1:0"]
            with pytest.raises(TakeoverFailed, match=f"a takeover by pid {os.getpid()} is in"):
                await Takeover.begin(tmp_path, 1, 5.0)
            await first.abort("changed my mind")  # the owner keeps everything
            await asyncio.sleep(0.1)
            assert owner.events == [] and server.state == "serving"
            second = await Takeover.begin(tmp_path, 1, 5.0)
            got = await second.ready()
            assert got is not None and owner.events == ["release"]
            lock, control = got
            assert StateLock.holder(tmp_path) == 0  # held (by both copies); no PID written
            await second.taken()
            await asyncio.sleep(0.1)
            assert owner.events == ["release", "handed over"] and server.state == "handed over"
            lock.close()
            control.close()
            for s in second.socks.values():
                for sock in s.values():
                    sock.close()
        finally:
            task.cancel()
            await asyncio.wait({task})
            owner.listen.close()
            owner.lock.close()
            owner.control.close()

    asyncio.run(go())


def test_nobody_on_the_control_socket_means_start_normally(tmp_path: Path):
    from gateway.control.handoff import Takeover

    assert asyncio.run(Takeover.begin(tmp_path, 1, 5.0)) is None  # no socket file
    control_socket(tmp_path).close()  # a stale file: nobody listens
    assert asyncio.run(Takeover.begin(tmp_path, 1, 5.0)) is None
