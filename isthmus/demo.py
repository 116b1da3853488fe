"""`isthmus demo`: clusters on this machine, a stream of traffic, failover, a drill, reports.

Everything runs on loopback without root: the federation and four gateways as real
subprocesses (the same `isthmus` commands a user runs), echo backends in this process (each
answers a line with its cluster's name, so every connection says who served it), and a client
opening `--rate` new connections per second to east-1's local listener for `echo`. Three
clusters export and import `echo` (east-1, east-2 in us-east; west-1 in us-west); a fourth,
`edge-1` (eu-west), exports nothing and imports `echo` preferring us-east, then us-west — the
consumer whose traffic a us-east drill moves.

Phases: all up -> east-1's backends down (traffic must move to east-2, same region) -> east-2's
down too (traffic must move to west-1, other region) -> all restored (traffic must come back to
east-1 after the failback delay). The report says, per phase, who served how many connections,
how many failed, and how long the shift took. Exit 0 when every phase ended on the expected
cluster with no failed new connection.

Failures are split by whose fault they are. A connection a backend had already accepted when
the demo killed that backend dies with it: no gateway can save bytes already handed to a dead
process, so it is counted as "in flight on a killed backend" and shown, but does not fail the
demo. Every other failed connection ("failed" in the table) is the gateway's and fails it. Each
client connection sends a numbered line; a backend notes the number of every connection it
resets when killed, and the number of those it reset before their line arrived.

Then a failover drill, through the same code as `isthmus drill run` (in this process, with the
operator credentials the federation wrote): the plan for losing us-east, then a `blackhole`
of us-east (2 s baseline, 8 s fault, 5 s settle) watched by edge-1's and west-1's probes; the
report is printed and written as `drill-report.html` in the state dir (kept, alone, when the
rest of a temporary state dir is removed). The demo fails when the drill never shifted traffic
out of us-east or the traffic flapped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from federation.files import write_atomic

CLUSTERS = (("east-1", "us-east", "a"), ("east-2", "us-east", "b"), ("west-1", "us-west", "a"))
# consumer-only clusters: export nothing, import echo (index continues CLUSTERS' port numbering)
CONSUMERS = (("edge-1", "eu-west", "a"),)
ALL_CLUSTERS = CLUSTERS + CONSUMERS
EDGE_FAILOVER = {
    "tiers": ["cluster", "zone", "region", "any"],
    "region_preference": ["us-east", "us-west"],
    "failback_after": "2s",
}
DRILL_SPEC = {
    "scope": {"region": "us-east"},
    "mode": "blackhole",
    "duration": "8s",
    "baseline": "2s",
    "settle": "5s",
}
FED_PORT, FED_ADMIN = 17443, 17080


def ports(offset: int, i: int) -> dict[str, int]:
    """Same numbering as examples/three-clusters: cluster i (1-based) uses 15i01.., 16i01,
    18i01.."""
    n = i + 1
    return {
        "inbound": 15001 + 100 * n + offset,
        "admin": 15002 + 100 * n + offset,
        "import": 16001 + 100 * n + offset,
        "ep1": 18001 + 100 * n + offset,
        "ep2": 18002 + 100 * n + offset,
    }


def write_configs(state: Path, offset: int,
                  edit: Callable[[str, dict], None] | None = None) -> list[Path]:
    """The gateways' config files; `edit(cluster, config)` may change a config before it is
    written (bench/soak.py shortens SVID lifetimes)."""
    paths = []
    for i, (name, region, zone) in enumerate(ALL_CLUSTERS):
        p = ports(offset, i)
        consumer = i >= len(CLUSTERS)
        cfg = {
            "cluster": {"name": name, "region": region, "zone": zone},
            "federation": {
                "url": f"https://127.0.0.1:{FED_PORT + offset}",
                "ca_file": "federation/ca.pem",
                "token_file": f"{name}.token",
            },
            "listen": {"inbound": f"127.0.0.1:{p['inbound']}", "admin": f"127.0.0.1:{p['admin']}"},
            "state_dir": name,
            "limits": {"connect_timeout": "500ms"},
            "outlier_detection": {
                "consecutive_failures": 1,
                "base_ejection": "2s",
                "max_ejection": "30s",
            },
            "peer_probe": {"interval": "300ms", "timeout": "300ms"},
            "exports": []
            if consumer
            else [
                {
                    "name": "echo",
                    "namespace": "default",
                    "port": 8080,
                    "protocol": "tcp",
                    "endpoints": [f"127.0.0.1:{p['ep1']}", f"127.0.0.1:{p['ep2']}"],
                    "health_check": {
                        "kind": "tcp",
                        "interval": "300ms",
                        "timeout": "200ms",
                        "healthy_threshold": 2,
                        "unhealthy_threshold": 2,
                    },
                }
            ],
            "imports": [
                {
                    "name": "echo",
                    "namespace": "default",
                    "listen": f"127.0.0.1:{p['import']}",
                    "failover": EDGE_FAILOVER
                    if consumer
                    else {"tiers": ["cluster", "zone", "region", "any"], "failback_after": "2s"},
                }
            ],
        }
        if edit is not None:
            edit(name, cfg)
        path = state / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(path)
    return paths


class Backends:
    """Echo servers of one cluster: answer each line with the cluster's name, until the client
    closes (the demo's clients send one line; bench/soak.py's long-lived ones keep sending)."""

    def __init__(self, cluster: str, addresses: list[int]) -> None:
        self.cluster = cluster
        self.ports = addresses
        self.servers: list[asyncio.base_events.Server] = []
        self.writers: dict[asyncio.StreamWriter, str | None] = {}  # open -> its client's line
        self.killed: set[str] = set()  # lines of the connections stop() reset
        self.killed_unread = 0  # connections stop() reset before their line arrived

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers[writer] = None
        try:
            while line := await asyncio.wait_for(reader.readline(), 5):
                if writer in self.writers:  # the last line: the one a kill interrupts
                    self.writers[writer] = line.decode(errors="replace").strip()
                writer.write(f"{self.cluster}\n".encode())
                await writer.drain()
        except (OSError, TimeoutError, RuntimeError):  # RuntimeError: stop() reset it meanwhile
            pass
        finally:
            self.writers.pop(writer, None)
            writer.close()

    def killed_in_flight(self, line: str) -> bool:
        """True when stop() reset the connection that sent `line` (or one whose line it never
        read, counted once each): that connection died with its backend."""
        if line in self.killed:
            return True
        if self.killed_unread > 0:
            self.killed_unread -= 1
            return True
        return False

    async def start(self) -> None:
        for port in self.ports:
            self.servers.append(
                await asyncio.start_server(self._handle, "127.0.0.1", port, reuse_address=True)
            )

    async def stop(self) -> None:
        """Close the listening sockets (new connects are refused) and reset open connections."""
        for s in self.servers:
            s.close()
        for w, line in list(self.writers.items()):
            if line:
                self.killed.add(line)
            else:
                self.killed_unread += 1
            w.transport.abort()
        self.writers.clear()
        for s in self.servers:
            await s.wait_closed()
        self.servers.clear()


@dataclass
class Phase:
    name: str
    expect: str
    started: float
    served: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # new connections the gateway failed
    in_flight: int = 0  # already on a backend when the demo killed it (not the gateway's fault)
    first_expected: float | None = None  # seconds after the phase started
    last_unexpected: float | None = None

    def record(self, at: float, who: str | None, killed: bool = False) -> None:
        if who is None:
            if killed:
                self.in_flight += 1
            else:
                self.failed += 1
            return
        self.served[who] = self.served.get(who, 0) + 1
        t = at - self.started
        if who == self.expect:
            if self.first_expected is None:
                self.first_expected = t
        else:
            self.last_unexpected = t

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.first_expected is not None


async def one_connection(port: int, timeout: float = 3.0, line: str = "hello") -> str | None:
    """Connect, send `line`, return the backend's answer (its cluster), None on any failure."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"{line}\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.decode().strip() or None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


async def paced(start: Callable[[], Awaitable[None]], interval: float, stop: asyncio.Event,
                limit: float = 3600.0) -> None:
    """Start `start()` every `interval` seconds (open loop: a slow one does not delay the next)
    until `stop` is set or `limit` seconds passed (every load loop is bounded), then wait for
    all of them to finish."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    nxt = loop.time()
    deadline = nxt + limit
    while not stop.is_set() and loop.time() < deadline:
        t = asyncio.create_task(start())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        nxt += interval
        await asyncio.sleep(max(0.0, nxt - loop.time()))
    if tasks:
        await asyncio.gather(*tasks)


async def drive(port: int, rate: int, phases: list[Phase], stop: asyncio.Event,
                backends: dict[str, Backends]) -> None:
    """Open `rate` connections per second until stop; each is counted in the phase it began in,
    a failed one as in flight when a killed backend had it."""
    loop = asyncio.get_running_loop()
    numbers = iter(range(1, 1 << 62))

    async def run(phase: Phase) -> None:  # the phase current when the connection began
        line = f"hello {next(numbers)}"
        who = await one_connection(port, line=line)
        killed = who is None and any(b.killed_in_flight(line) for b in backends.values())
        phase.record(loop.time(), who, killed)

    await paced(lambda: run(phases[-1]), 1.0 / rate, stop)


class Processes:
    """The subprocesses we started, stopped by PID on the way out."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "isthmus.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {p.returncode}; log tail:\n{tail}")


async def http_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"GET {path}: {head[:80]!r}")
    return json.loads(body) if path != "/readyz" else body


async def wait_until(what: str, check, procs: Processes, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        procs.check()
        try:
            result = await check()
            if result:
                return result
        except (OSError, ValueError, TimeoutError) as e:
            last = e
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


async def start_topology(
    state: Path,
    offset: int,
    procs: Processes,
    backends: dict[str, Backends] | None,
    workers: dict[str, int] | None = None,
    edit: Callable[[str, dict], None] | None = None,
) -> None:
    """Federation, join tokens, (optionally) backends, four gateways (ALL_CLUSTERS); returns when
    east-1 sees every cluster live and both remote gateways healthy, and edge-1 sees the three
    exporting gateways healthy. The operator credentials are in state/federation/operator.
    `workers`: cluster -> `gateway run --workers N` (default 1); `edit`: see write_configs."""
    configs = write_configs(state, offset, edit)
    procs.start(
        "federation",
        "federation",
        "serve",
        "--state-dir",
        str(state / "federation"),
        "--listen",
        f"127.0.0.1:{FED_PORT + offset}",
        "--admin",
        f"127.0.0.1:{FED_ADMIN + offset}",
        "--lease-ttl",
        "3s",
    )
    await wait_until("the federation", lambda: http_json(FED_ADMIN + offset, "/readyz"), procs)

    from federation.server.app import create_token
    from federation.store.sqlite import SqliteStore

    store = SqliteStore(str(state / "federation" / "federation.db"))
    await store.open()
    try:
        for name, _, _ in ALL_CLUSTERS:
            token, _ = await create_token(store, name, 600, time.time())
            write_atomic(state / f"{name}.token", token.encode())
    finally:
        await store.close()
    for b in (backends or {}).values():
        await b.start()
    for (name, _, _), path in zip(ALL_CLUSTERS, configs, strict=True):
        procs.start(
            name,
            "gateway",
            "run",
            "--config",
            str(path),
            "--workers",
            str((workers or {}).get(name, 1)),
        )
    # Ready when every cluster is live and east-1 and edge-1 have reached every other exporting
    # gateway (its PING probe is healthy). Endpoint health is not waited for: a cluster whose
    # endpoints are down (as in the benchmarks' topology) is a state to route around, not a hang.
    exporters = [name for name, _, _ in CLUSTERS]
    for i, me in ((0, "east-1"), (len(CLUSTERS), "edge-1")):
        admin = ports(offset, i)["admin"]
        peers = {f"remote:{c}" for c in exporters if c != me}

        async def reached(admin: int = admin, peers: set[str] = peers) -> bool:
            st = await http_json(admin, "/status")
            health = st.get("health", {})
            return len(st["catalog"]["live"]) == len(ALL_CLUSTERS) and all(
                health.get(k, {}).get("state") == "healthy" for k in peers)

        await wait_until(
            f"{me} to see {len(ALL_CLUSTERS)} live clusters and reach {len(peers)} gateways",
            reached,
            procs,
            30,
        )


def federation_url(offset: int) -> str:
    return f"https://127.0.0.1:{FED_PORT + offset}"


def operator_credentials(state: Path) -> Path:
    return state / "federation" / "operator"


def dashboard_url(state: Path, offset: int) -> str:
    """The federation's dashboard, signed in with its read-only token (federation/server/ui.py;
    the demo's own federation on loopback, so the token is printed for the browser)."""
    token = (operator_credentials(state) / "dashboard-token").read_text().strip()
    return f"http://127.0.0.1:{FED_ADMIN + offset}/ui/?token={token}"


async def demo(args: Any, state: Path, out) -> int:
    offset = args.port_offset
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(logs)
    backends = {
        name: Backends(name, [ports(offset, i)["ep1"], ports(offset, i)["ep2"]])
        for i, (name, _, _) in enumerate(CLUSTERS)
    }
    try:
        out(f"state and logs in {state}")
        await start_topology(state, offset, procs, backends)
        admin1 = ports(offset, 0)["admin"]
        out(
            "federation + 4 gateways up: east-1 (us-east/a), east-2 (us-east/b), "
            "west-1 (us-west/a), "
            "edge-1 (eu-west/a, consumer only: prefers us-east, then us-west)"
        )
        out(f"dashboard (live service map, drills): {dashboard_url(state, offset)}")
        out(
            f"driving {args.rate} new connections/s into east-1's local listener for default/echo\n"
        )

        loop = asyncio.get_running_loop()
        phases: list[Phase] = []
        stop = asyncio.Event()

        def begin(name: str, expect: str) -> None:
            phases.append(Phase(name, expect, loop.time()))

        begin("all up", "east-1")
        driver = asyncio.create_task(
            drive(ports(offset, 0)["import"], args.rate, phases, stop, backends)
        )
        try:
            await asyncio.sleep(args.phase)
            await backends["east-1"].stop()
            begin("east-1 down", "east-2")
            await asyncio.sleep(args.phase)
            await backends["east-2"].stop()
            begin("east-2 down too", "west-1")
            await asyncio.sleep(args.phase)
            await backends["east-1"].start()
            await backends["east-2"].start()
            begin("all restored", "east-1")
            await asyncio.sleep(args.phase + 3)
        finally:
            stop.set()
            await driver
        ok = report(phases, out)
        ok = await drill(state, offset, out) and ok
        if args.keep_running:
            out(
                "\nstill running; try: isthmus status --admin "
                f"http://127.0.0.1:{FED_ADMIN + offset}"
                f"  or  curl 127.0.0.1:{admin1}/status  or  isthmus why default/echo --from "
                f"edge-1 --federation http://127.0.0.1:{FED_ADMIN + offset}   (Ctrl-C to stop)\n"
                f"dashboard: {dashboard_url(state, offset)}"
            )
            forever = asyncio.Event()
            loop.add_signal_handler(signal.SIGINT, forever.set)
            loop.add_signal_handler(signal.SIGTERM, forever.set)
            # traffic goes on (east-1 and edge-1, half the rate each): the dashboard's map lives
            kept = [Phase("kept running", name, loop.time()) for name in ("east-1", "edge-1")]
            await asyncio.gather(*(
                drive(ports(offset, i)["import"], max(1, args.rate // 2), [phase], forever,
                      backends) for i, phase in ((0, kept[0]), (len(CLUSTERS), kept[1]))))
        return 0 if ok else 1
    finally:
        procs.stop()
        for b in backends.values():
            await b.stop()


async def drill(state: Path, offset: int, out) -> bool:
    """Plan, then run a blackhole drill of us-east as `isthmus drill run` does; True when the
    traffic shifted out of us-east and did not flap."""
    from rich.console import Console

    from gateway.core.drill_plan import plan_drill
    from isthmus.drill import open_client, run_drill
    from isthmus.drill_print import print_plan, print_report, write_html

    console = Console(width=max(100, shutil.get_terminal_size().columns), highlight=False)
    scope = DRILL_SPEC["scope"]["region"]
    out(
        f"\nfailover drill: {DRILL_SPEC['mode']} of region {scope} for {DRILL_SPEC['duration']} "
        f"(isthmus drill run --region {scope} --mode {DRILL_SPEC['mode']} "
        f"--duration {DRILL_SPEC['duration']} "
        f"--baseline {DRILL_SPEC['baseline']} --settle {DRILL_SPEC['settle']})"
    )
    async with open_client(federation_url(offset), operator_credentials(state)) as client:
        print_plan(plan_drill(await client.catalog(), "region", scope), console)
        result = await run_drill(client, dict(DRILL_SPEC), console)
    if result.report is None:
        out(f"drill {result.drill.id}: {result.message}")
        return False
    print_report(result.report, console)
    path = write_html(result.report, state / "drill-report.html")
    out(f"HTML report: {path}")
    shifted = result.report.get("shift_s") is not None
    flapped = bool(result.report.get("flapped"))
    if not shifted:
        out("drill: traffic never shifted out of us-east (shift_s is null)")
    if flapped:
        out("drill: traffic flapped")
    return shifted and not flapped


def report(phases: list[Phase], out) -> bool:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="isthmus demo: who served east-1's connections")
    for col in ("phase", "expected", "east-1", "east-2", "west-1", "failed", "in flight",
                "shift time", "ok"):
        t.add_column(col)
    all_ok = True
    for i, p in enumerate(phases):
        shift = "-"
        if i > 0:
            shift = (
                "never"
                if p.first_expected is None
                else (
                    f"{(p.last_unexpected or 0) * 1000:.0f} ms"
                    if p.last_unexpected is not None
                    else "0 ms"
                )
            )
        all_ok &= p.ok
        t.add_row(
            p.name,
            p.expect,
            *(str(p.served.get(c, 0)) for c, _, _ in CLUSTERS),
            str(p.failed),
            str(p.in_flight),
            shift,
            "[green]yes[/]" if p.ok else "[red]NO[/]",
        )
    Console(width=max(100, shutil.get_terminal_size().columns)).print(t)
    total = sum(sum(p.served.values()) + p.failed + p.in_flight for p in phases)
    failed = sum(p.failed for p in phases)
    in_flight = sum(p.in_flight for p in phases)
    out(f"{total} connections, {failed} failed, {in_flight} in flight on a killed backend "
        "(already handed to the backend when it was killed: no gateway can save those).")
    out("shift time = last connection served by the previous cluster after the phase began "
        "(failback waits failback_after=2s on purpose)")
    return all_ok


def run_demo(args: Any) -> int:
    import uvloop

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="isthmus-demo-"))
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)

    def out(msg: str) -> None:
        print(msg, flush=True)

    try:
        code = uvloop.run(demo(args, state, out))
    except RuntimeError as e:
        print(f"isthmus demo: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    if args.state_dir is None and code == 0 and not args.keep_running:
        for child in state.iterdir():  # keep only the HTML report
            if child.name == "drill-report.html":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return code
