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

Backends are tests/helpers/backends.py's `Backend`s (echo servers on the test's event loop,
which a test can stop, blackhole or restart). `topo.use_process_backend(cluster)` (before
`start()`) makes a cluster's first backend a `ProcessBackend` (a process of its own, which a test
can freeze with SIGSTOP by its PID).

`Topology(health_check={...}, outlier_detection={...})` replace the gateways' health check
fields / add outlier_detection fields (values written into the YAML as given; `{cluster}` in a
health check value becomes the gateway's cluster name). `identity={cluster: {field: value}}`
adds identity fields to one cluster's config. `top={cluster: yaml}` adds top-level sections to one
cluster's gateway file (e.g. `services_dir: services`, `policy:`, `reload:`; a services dir named
there is made empty under <c>/), and `extra_imports={cluster: [(service, port)]}` imports more
services of namespace default there (tiers [any]). `topo.add_service(name, exporter, importers)`
(before `start()`) adds a service exported by one cluster (its backends) and imported by others
(tiers [any]); it returns each importer's listen port.

Ports come from tests/helpers/processes.py's `free_port()`; every process is a `Proc` there.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.backends import Backend, ProcessBackend
from tests.helpers.processes import Proc, free_port, isthmus_cmd, run_cli
from tests.helpers.traffic import http_get, http_json, request, wait_for

CLUSTERS = (("east-1", "us-east", "a"), ("east-2", "us-east", "b"), ("west-1", "us-west", "a"))
NAMES = tuple(c[0] for c in CLUSTERS)


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
                 outlier_detection: dict[str, str] | None = None,
                 identity: dict[str, dict[str, str]] | None = None,
                 top: dict[str, str] | None = None,
                 extra_imports: dict[str, list[tuple[str, int]]] | None = None) -> None:
        self.root = Path(root)
        self.health_check = health_check or {"kind": "tcp", "interval": "200ms", "timeout": "150ms"}
        self.outlier_detection = {"consecutive_failures": "1", **(outlier_detection or {})}
        self.workers = workers or {}  # cluster -> `gateway run --workers N`
        self.lease_ttl = lease_ttl
        self.svid_ttl = svid_ttl
        self.identity = identity or {}
        self.top = top or {}
        self.extra_imports = extra_imports or {}
        self.services: list[tuple[str, str, dict[str, int]]] = []  # name, exporter, ports
        self.connect_timeout = connect_timeout
        self.failback_after = failback_after
        self.fed_dir = self.root / "fed"
        self.fed_port = free_port()
        self.fed_admin_port = free_port()
        self.fed_proc: Proc | None = None
        self.nodes: dict[str, Node] = {}
        for name, region, zone in CLUSTERS:
            backends = [Backend(name, free_port()), Backend(name, free_port())]
            self.nodes[name] = Node(name, region, zone, self.root / name, free_port(), free_port(),
                                    free_port(), backends)
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

    def add_service(self, name: str, exporter: str, importers: tuple[str, ...]) -> dict[str, int]:
        ports = {i: free_port() for i in importers}
        self.services.append((name, exporter, ports))
        self.write_configs()
        return ports

    def _services_text(self, n: Node, health: str) -> tuple[str, str]:
        exports = imports = ""
        for name, exporter, ports in self.services:
            if exporter == n.name:
                eps = "".join(f"      - {b.address}\n" for b in n.backends)
                exports += (f"  - name: {name}\n    namespace: default\n    port: 8080\n"
                            f"    endpoints:\n{eps}    health_check:\n{health}")
            if n.name in ports:
                imports += self._import_text(name, ports[n.name])
        for name, port in self.extra_imports.get(n.name, []):
            imports += self._import_text(name, port)
        return exports, imports

    def _import_text(self, name: str, port: int) -> str:
        return (f"  - name: {name}\n    namespace: default\n"
                f"    listen: 127.0.0.1:{port}\n    failover:\n"
                f"      tiers: [any]\n      failback_after: {self.failback_after}\n"
                "      max_attempts: 4\n")

    def config_text(self, n: Node) -> str:
        fields = {**({"svid_ttl": self.svid_ttl} if self.svid_ttl else {}),
                  **self.identity.get(n.name, {})}
        identity = ("identity:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()) + "\n"
                    if fields else "")
        endpoints = "".join(f"      - {b.address}\n" for b in n.backends)
        health = "".join(f"      {k}: {v.replace('{cluster}', n.name)}\n"
                         for k, v in self.health_check.items())
        outlier = "".join(f"  {k}: {v}\n" for k, v in self.outlier_detection.items())
        more_exports, more_imports = self._services_text(n, health)
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

{self.top.get(n.name, "")}

exports:
  - name: echo
    namespace: default
    port: 8080
    endpoints:
{endpoints}    health_check:
{health}{more_exports}
imports:
  - name: echo
    namespace: default
    listen: 127.0.0.1:{n.import_port}
    failover:
      tiers: [cluster, zone, region, any]
      failback_after: {self.failback_after}
      max_attempts: 4
{more_imports}"""

    def write_configs(self) -> None:
        (self.root / "tokens").mkdir(parents=True, exist_ok=True)
        for n in self.nodes.values():
            n.dir.mkdir(parents=True, exist_ok=True)
            n.config.write_text(self.config_text(n))
            if "services_dir: services" in self.top.get(n.name, ""):
                (n.dir / "services").mkdir(exist_ok=True)

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
                "--listen", f"127.0.0.1:{self.fed_port}",
                "--admin", f"127.0.0.1:{self.fed_admin_port}",
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
            n.proc = self._proc(name, ["gateway", "run", "--config", str(n.config),
                                       "--log-level", "info",
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
            pid = p.popen.pid if p.popen else "-"
            print(f"\n----- {p.name} (pid {pid}): {p.log} -----\n{p.tail(lines)}",
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

