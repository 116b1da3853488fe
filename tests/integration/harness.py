"""Integration harness: a real federation, three real gateways and in-process echo backends.

`Topology(tmp_path)` writes everything under one directory:

    fed/                 the federation's state dir (CA, sqlite store)
    tokens/<c>.token     join tokens made with `isthmus federation token create`
    <c>/gateway.yaml     the gateway config of cluster <c>; its state dir is <c>/state
    logs/<proc>.log      stdout+stderr of every process (appended across restarts)

Clusters: east-1 (us-east/a), east-2 (us-east/b), west-1 (us-west/a). Each exports `echo`
(namespace default) with two local endpoints and imports `echo` with tiers
[cluster, zone, region, any]; health checks are tcp every 200ms (timeout 150ms), peer probes
every 200ms, outlier detection ejects after 1 failure, failback_after is 1s and
connect_timeout 300ms, so failover happens well inside a second.

`await topo.start()` starts `isthmus federation serve --lease-ttl 2s`, creates one join token
per cluster, starts the three `isthmus gateway run` processes, then waits until every
gateway's `/readyz` answers and its `/status` shows all three clusters live, and until every
import listener serves a connection from its own cluster. `await topo.stop()` stops every
process it started, by PID (SIGTERM, then SIGKILL), and closes the backends.

Backends (`Backend`) run on the test's event loop. Each connection gets one reply line per line
it sends: the cluster name (mode "echo"), or, in mode "count", nothing until EOF and then
"<cluster> <byte count>"; a connection whose first line is `GET <path> HTTP/1.x` is an HTTP
health check (200 for /healthz, 404 otherwise, then closed). A backend can be
  * stopped  — the listening socket is closed, so connects get a RST (ECONNREFUSED);
  * blackholed — a `listen(0)` socket whose accept queue is filled by idle client connections
    and never accepted: the kernel drops further SYNs, so connects time out with no answer
    (no root needed; `blackhole_times_out()` checks that this holds on the machine);
  * restarted.
`topo.use_process_backend(cluster)` (before `start()`) makes a cluster's first backend a
`ProcessBackend`: the same Backend in a process of its own (`python -m
tests.integration.harness backend CLUSTER PORT`), which a test can freeze with SIGSTOP and thaw
with SIGCONT by its PID: the kernel then keeps completing handshakes into its accept queue
(backlog 100) while the app answers nothing.

`Topology(health_check={...}, outlier_detection={...})` replace the gateways' health check
fields / add outlier_detection fields (values written into the YAML as given; `{cluster}` in a
health check value becomes the gateway's cluster name).

Ports come from 20000..32000 (below the ephemeral range, away from the fixed ports of
`isthmus demo`), checked free by binding, and never handed out twice by one test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CLUSTERS = (("east-1", "us-east", "a"), ("east-2", "us-east", "b"), ("west-1", "us-west", "a"))
NAMES = tuple(c[0] for c in CLUSTERS)
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


# ---------------------------------------------------------------------------------------------
# ports and commands


def free_port() -> int:
    """A port in PORT_RANGE that nothing listens on now (nor in TIME_WAIT), not handed out yet."""
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {PORT_RANGE}")


def isthmus_cmd() -> list[str]:
    """The `isthmus` console script of this interpreter (else `python -m isthmus.cli`)."""
    script = Path(sys.executable).with_name("isthmus")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "isthmus.cli"]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([*isthmus_cmd(), *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """One subprocess with its log file. Stopped only by its own PID."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} already running"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(self.args)}\n".encode())
            f.flush()
            self.popen = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# backends


class Backend:
    """One endpoint of a service, on the running event loop."""

    def __init__(self, cluster: str, port: int) -> None:
        self.cluster = cluster
        self.port = port
        self.mode = "echo"  # or "count"
        self.state = "down"  # down | up | blackholed
        self.served = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._hole: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.served += 1
        try:
            if self.mode == "count":
                total = 0
                while chunk := await reader.read(65536):
                    total += len(chunk)
                writer.write(f"{self.cluster} {total}\n".encode())
                await writer.drain()
                return
            line = await reader.readline()
            if line.startswith(b"GET ") and b" HTTP/1." in line:  # an http health check
                while (await reader.readline()).strip():
                    pass
                status = "200 OK" if line.split(b" ")[1] == b"/healthz" else "404 Not Found"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                return
            while line:
                writer.write(f"{self.cluster}\n".encode())
                await writer.drain()
                line = await reader.readline()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self._unhole()
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      reuse_address=True)
        self.state = "up"

    restart = start

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()  # listening socket closed now; open connections keep going
            self._server = None

    async def stop(self) -> None:
        """Refuse: close the listening socket, so new connects get a RST."""
        self._close_server()
        self._unhole()
        self.state = "down"

    async def blackhole(self) -> None:
        """Accept nothing and answer no SYN: connects time out."""
        self._close_server()
        if self._hole is None:
            self._hole = make_blackhole(self.port, self._fillers)
        self.state = "blackholed"

    def _unhole(self) -> None:
        for s in self._fillers:
            s.close()
        self._fillers.clear()
        if self._hole is not None:
            self._hole.close()
            self._hole = None

    async def close(self) -> None:
        await self.stop()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()


class ProcessBackend:
    """A Backend in a process of its own, which a test can freeze (SIGSTOP) and thaw (SIGCONT)
    by its PID. Same start/stop/close/address as Backend; stopping ends the process."""

    def __init__(self, cluster: str, port: int, log: Path) -> None:
        self.cluster = cluster
        self.port = port
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": root}
        self.proc = Proc(f"backend-{cluster}-{port}",
                         [sys.executable, "-m", "tests.integration.harness", "backend", cluster,
                          str(port)], log, env=env)
        self.state = "down"  # down | up | frozen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def start(self) -> None:
        if not self.proc.running:
            self.proc.start()

        async def answers() -> bool:
            if not self.proc.running:
                raise RuntimeError(f"{self.proc.name} exited:\n{self.proc.tail()}")
            return await request(self.port, "ping", 1.0) == self.cluster

        await wait_for(answers, 10.0, what=f"{self.proc.name} to answer")
        self.state = "up"

    restart = start

    def freeze(self) -> None:
        """SIGSTOP: the kernel still completes handshakes (accept queue); the app answers none."""
        os.kill(self.pid, signal.SIGSTOP)
        self.state = "frozen"

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.state = "up"

    async def stop(self) -> None:
        if self.state == "frozen":
            self.thaw()
        self.proc.stop()
        self.state = "down"

    close = stop


async def _serve_backend(cluster: str, port: int) -> None:
    """Entry point of a ProcessBackend: one Backend until SIGTERM."""
    b = Backend(cluster, port)
    await b.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await b.close()


def make_blackhole(port: int, fillers: list[socket.socket]) -> socket.socket:
    """Listen with backlog 0 and fill the accept queue with idle connections that are never
    accepted; from then on the kernel drops SYNs to this port (no RST, no SYN-ACK)."""
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", port))
    hole.listen(0)
    for _ in range(2):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    return hole


def blackhole_times_out(timeout: float = 0.5) -> tuple[bool, str]:
    """Check on this machine that a connect to a blackholed port times out (no RST)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fillers: list[socket.socket] = []
    hole = make_blackhole(port, fillers)
    try:
        time.sleep(0.05)
        c = socket.socket()
        c.settimeout(timeout)
        started = time.monotonic()
        try:
            c.connect(("127.0.0.1", port))
        except TimeoutError:
            return True, f"connect timed out after {time.monotonic() - started:.3f}s"
        except OSError as e:
            return False, f"connect failed at once: {e}"
        finally:
            c.close()
        return False, "connect succeeded"
    finally:
        for f in fillers:
            f.close()
        hole.close()


# ---------------------------------------------------------------------------------------------
# talking to things


async def request(port: int, line: str = "ping", timeout: float = 3.0) -> str:
    """One connection to 127.0.0.1:port: send a line, return the reply line (stripped)."""

    async def go() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(line.encode() + b"\n")
            reply = await reader.readline()
            if not reply:
                raise ConnectionError("closed without a reply")
            return reply.decode().strip()
        finally:
            writer.transport.abort()

    return await asyncio.wait_for(go(), timeout)


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.text()


async def http_json(port: int, path: str, timeout: float = 3.0) -> Any:
    status, text = await http_get(port, path, timeout)
    if status != 200:
        raise AssertionError(f"GET :{port}{path} -> {status}: {text[:200]}")
    return json.loads(text)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (optionally those whose label text contains `labels`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (key.startswith(name + "{") and labels in key):
            total += float(value)
    return total


async def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> float:
    """Poll an async or sync predicate until truthy; returns the seconds it took."""
    started = time.monotonic()
    last: Any = None
    while True:
        try:
            res = predicate()
            if asyncio.iscoroutine(res):
                res = await res
            if res:
                return time.monotonic() - started
        except Exception as e:  # not up yet, connection refused, ...
            last = e
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# traffic


@dataclass
class Conn:
    started: float
    ended: float = 0.0
    reply: str | None = None
    error: str | None = None


@dataclass
class LoadStream:
    """New connections at `rate`/s to one port, each sending a line and reading the reply.
    Bounded by `max_count` connections and `max_seconds`; `stop()` waits for the last ones."""

    port: int
    rate: float = 50.0
    max_seconds: float = 30.0
    max_count: int = 2000
    timeout: float = 3.0
    conns: list[Conn] = field(default_factory=list)
    _task: asyncio.Task | None = None
    _inflight: set = field(default_factory=set)

    def start(self) -> LoadStream:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _one(self, c: Conn) -> None:
        try:
            c.reply = await request(self.port, "ping", self.timeout)
        except Exception as e:
            c.error = f"{type(e).__name__}: {e}"
        c.ended = time.monotonic()

    async def _run(self) -> None:
        began = time.monotonic()
        step = 1.0 / self.rate
        n = 0
        while n < self.max_count and time.monotonic() - began < self.max_seconds:
            c = Conn(time.monotonic())
            self.conns.append(c)
            t = asyncio.get_running_loop().create_task(self._one(c))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            n += 1
            await asyncio.sleep(max(0.0, began + n * step - time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout + 2)

    def done(self) -> list[Conn]:
        return [c for c in self.conns if c.ended]

    @property
    def failed(self) -> list[Conn]:
        return [c for c in self.done() if c.reply is None]

    def first_served_by(self, cluster: str, after: float) -> float | None:
        """Seconds from `after` until the first reply from `cluster` that ended after it."""
        ends = [c.ended for c in self.done() if c.reply == cluster and c.ended > after]
        return min(ends) - after if ends else None

    def last_reply(self) -> str | None:
        done = sorted(self.done(), key=lambda c: c.ended)
        return done[-1].reply if done else None

    def counts(self, since: float = 0.0) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.done():
            if c.started >= since:
                k = c.reply or "FAILED"
                out[k] = out.get(k, 0) + 1
        return out


# ---------------------------------------------------------------------------------------------
# the topology


@dataclass
class Node:
    name: str
    region: str
    zone: str
    dir: Path
    inbound_port: int
    admin_port: int
    import_port: int
    backends: list[Backend]
    proc: Proc | None = None

    @property
    def config(self) -> Path:
        return self.dir / "gateway.yaml"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def trust_domain(self) -> str:
        return f"{self.name}.isthmus.local"


class Topology:
    def __init__(self, root: Path, *, lease_ttl: str = "2s", svid_ttl: str | None = None,
                 connect_timeout: str = "300ms", failback_after: str = "1s",
                 workers: dict[str, int] | None = None, health_check: dict[str, str] | None = None,
                 outlier_detection: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.health_check = health_check or {"kind": "tcp", "interval": "200ms", "timeout": "150ms"}
        self.outlier_detection = {"consecutive_failures": "1", **(outlier_detection or {})}
        self.workers = workers or {}  # cluster -> `gateway run --workers N`
        self.lease_ttl = lease_ttl
        self.svid_ttl = svid_ttl
        self.connect_timeout = connect_timeout
        self.failback_after = failback_after
        self.fed_dir = self.root / "fed"
        self.fed_port = free_port()
        self.fed_admin_port = free_port()
        self.fed_proc: Proc | None = None
        self.nodes: dict[str, Node] = {}
        for name, region, zone in CLUSTERS:
            self.nodes[name] = Node(name, region, zone, self.root / name, free_port(), free_port(),
                                    free_port(), [Backend(name, free_port()), Backend(name, free_port())])
        self.procs: list[Proc] = []
        self.write_configs()

    # -- files -------------------------------------------------------------------------------
    @property
    def fed_url(self) -> str:
        return f"https://127.0.0.1:{self.fed_port}"

    @property
    def fed_ca(self) -> Path:
        return self.fed_dir / "ca.pem"

    def token_file(self, name: str) -> Path:
        return self.root / "tokens" / f"{name}.token"

    def config_text(self, n: Node) -> str:
        identity = f"identity:\n  svid_ttl: {self.svid_ttl}\n\n" if self.svid_ttl else ""
        endpoints = "".join(f"      - {b.address}\n" for b in n.backends)
        health = "".join(f"      {k}: {v.replace('{cluster}', n.name)}\n"
                         for k, v in self.health_check.items())
        outlier = "".join(f"  {k}: {v}\n" for k, v in self.outlier_detection.items())
        return f"""\
# written by tests/integration/harness.py
cluster:
  name: {n.name}
  region: {n.region}
  zone: {n.zone}

federation:
  url: {self.fed_url}
  ca_file: {self.fed_ca}
  token_file: {self.token_file(n.name)}

listen:
  inbound: 127.0.0.1:{n.inbound_port}
  admin: 127.0.0.1:{n.admin_port}

state_dir: {n.state_dir}

{identity}limits:
  connect_timeout: {self.connect_timeout}

outlier_detection:
{outlier}
peer_probe:
  interval: 200ms
  timeout: 200ms

exports:
  - name: echo
    namespace: default
    port: 8080
    endpoints:
{endpoints}    health_check:
{health}
imports:
  - name: echo
    namespace: default
    listen: 127.0.0.1:{n.import_port}
    failover:
      tiers: [cluster, zone, region, any]
      failback_after: {self.failback_after}
      max_attempts: 4
"""

    def write_configs(self) -> None:
        (self.root / "tokens").mkdir(parents=True, exist_ok=True)
        for n in self.nodes.values():
            n.dir.mkdir(parents=True, exist_ok=True)
            n.config.write_text(self.config_text(n))

    def use_process_backend(self, cluster: str, index: int = 0) -> ProcessBackend:
        """Make one backend of `cluster` a ProcessBackend (same port); call before start()."""
        n = self.nodes[cluster]
        old = n.backends[index]
        b = ProcessBackend(cluster, old.port, self.root / "logs" / f"backend-{cluster}-{index}.log")
        n.backends[index] = b  # type: ignore[call-overload]
        return b

    # -- processes -----------------------------------------------------------------------------
    def _proc(self, name: str, args: list[str]) -> Proc:
        p = Proc(name, [*isthmus_cmd(), *args], self.root / "logs" / f"{name}.log")
        self.procs.append(p)
        return p

    def start_federation(self) -> None:
        if self.fed_proc is None:
            self.fed_proc = self._proc("federation", [
                "federation", "serve", "--state-dir", str(self.fed_dir),
                "--listen", f"127.0.0.1:{self.fed_port}", "--admin", f"127.0.0.1:{self.fed_admin_port}",
                "--lease-ttl", self.lease_ttl, "--log-level", "info",
            ])
        self.fed_proc.start()

    async def wait_federation(self, timeout: float = 15.0) -> None:
        async def ready() -> bool:
            self._check_alive(self.fed_proc)
            status, _ = await http_get(self.fed_admin_port, "/readyz", 1.0)
            return status == 200

        await wait_for(ready, timeout, what="federation /readyz")

    def create_token(self, cluster: str, ttl: str = "15m", output: Path | None = None) -> str:
        args = ["federation", "token", "create", "--cluster", cluster, "--ttl", ttl,
                "--state-dir", str(self.fed_dir)]
        if output is not None:
            args += ["--output", str(output)]
        r = run_cli(*args)
        if r.returncode != 0:
            raise AssertionError(f"token create for {cluster} failed ({r.returncode}): {r.stderr}")
        return output.read_text().strip() if output is not None else r.stdout.strip()

    def start_gateway(self, name: str) -> None:
        n = self.nodes[name]
        if n.proc is None:
            n.proc = self._proc(name, ["gateway", "run", "--config", str(n.config), "--log-level", "info",
                                       "--workers", str(self.workers.get(name, 1))])
        n.proc.start()

    async def wait_ready(self, name: str, timeout: float = 15.0) -> None:
        n = self.nodes[name]

        async def ready() -> bool:
            self._check_alive(n.proc)
            status, _ = await http_get(n.admin_port, "/readyz", 1.0)
            return status == 200

        await wait_for(ready, timeout, what=f"{name} /readyz")

    async def wait_live(self, name: str, clusters=NAMES, timeout: float = 15.0) -> None:
        want = sorted(clusters)

        async def live() -> bool:
            self._check_alive(self.nodes[name].proc)
            return (await self.status(name))["catalog"]["live"] == want

        await wait_for(live, timeout, what=f"{name}'s catalog to show {want} live")

    async def wait_served(self, via: str, cluster: str, timeout: float = 10.0) -> float:
        """Until a connection to `via`'s import listener is answered by `cluster`."""
        port = self.nodes[via].import_port

        async def served() -> bool:
            return await request(port, "ping", 2.0) == cluster

        return await wait_for(served, timeout, interval=0.05,
                              what=f"{via}'s import of echo to be served by {cluster}")

    @staticmethod
    def _check_alive(proc: Proc | None) -> None:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")

    async def start(self) -> None:
        try:
            for n in self.nodes.values():
                for b in n.backends:
                    await b.start()
            self.start_federation()
            await self.wait_federation()
            for name in self.nodes:
                self.create_token(name, output=self.token_file(name))
            for name in self.nodes:
                self.start_gateway(name)
            for name in self.nodes:
                await self.wait_ready(name)
            for name in self.nodes:
                await self.wait_live(name)
            for name in self.nodes:
                await self.wait_served(name, name)
        except BaseException:
            self.dump_logs()
            raise

    async def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for n in self.nodes.values():
            for b in n.backends:
                await b.close()

    def dump_logs(self, lines: int = 80) -> None:
        for p in self.procs:
            print(f"\n----- {p.name} (pid {p.popen.pid if p.popen else '-'}): {p.log} -----\n{p.tail(lines)}",
                  file=sys.stderr)

    # -- observing ----------------------------------------------------------------------------
    async def status(self, name: str) -> dict:
        return await http_json(self.nodes[name].admin_port, "/status")

    async def metrics(self, name: str) -> str:
        status, text = await http_get(self.nodes[name].admin_port, "/metrics")
        assert status == 200, text
        return text

    async def fed_status(self) -> dict:
        return await http_json(self.fed_admin_port, "/status")

    # -- faults -------------------------------------------------------------------------------
    async def stop_backends(self, name: str) -> None:
        for b in self.nodes[name].backends:
            await b.stop()

    async def blackhole_backends(self, name: str) -> None:
        for b in self.nodes[name].backends:
            await b.blackhole()

    async def restart_backends(self, name: str) -> None:
        for b in self.nodes[name].backends:
            await b.restart()


@contextlib.asynccontextmanager
async def running(topo: Topology, request: Any):
    """Start `topo` for one test and always stop what it started (even when starting failed
    halfway); dump its logs if the test failed. `request` is pytest's fixture request."""
    failed_before = request.session.testsfailed
    try:
        await topo.start()
        yield topo
        if request.session.testsfailed > failed_before:
            topo.dump_logs()
    finally:
        await topo.stop()


if __name__ == "__main__":  # python -m tests.integration.harness backend CLUSTER PORT
    if len(sys.argv) != 4 or sys.argv[1] != "backend":
        sys.exit("usage: python -m tests.integration.harness backend CLUSTER PORT")
    asyncio.run(_serve_backend(sys.argv[2], int(sys.argv[3])))
