"""The integration harness's topology (tests/integration/harness.py `Topology`) with the
federation and the gateways in containers of the project image, started through
testcontainers-python on podman's Docker-compatible API (tests/deploy/podman.py `ApiService`).

Only where the processes run changes; the files, ports, backends and waits are the harness's,
so the process-based tests can run on it unchanged:

- every container uses host networking and talks only to loopback; the in-process echo
  backends on the test's loop are reached at 127.0.0.1 as before;
- the topology's directory is bind-mounted at the same path in every container (owned by the
  image's user, uid 10001), so the harness's configs, with their absolute paths, work as they are;
- the federation's state dir is a named volume (`<prefix>-federation`) mounted over that path:
  `fed_proc.stop()` stops its container (SIGTERM, graceful) and `fed_proc.start()` starts a new
  container on the same volume, which must find its CA, store and leases there. The gateways get
  a copy of its `ca.pem` (never its key) in the host's directory of the same name;
- `create_token` runs `isthmus federation token create` inside the federation's container;
- `ContainerProc` stands in for the harness's `Proc`: `start`, `stop` (exit code), `kill`,
  `running`, `tail`, and `log` (the file gets every container's output, refreshed when read).
`stop()` removes every container and the volume.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from tests.deploy.podman import IMAGE, podman
from tests.integration.harness import Topology

UID = 10001  # the image's user `isthmus`


class ContainerProc:
    """One process of the topology as a container; every start() is a new container."""

    def __init__(self, name: str, prefix: str, command: list[str], log: Path,
                 volumes: list[tuple[str, str, str]], admin_port: int) -> None:
        self.name = name
        self.health_url = f"http://127.0.0.1:{admin_port}/healthz"  # the image's HEALTHCHECK
        self.prefix = prefix
        self.command = command
        self.volumes = volumes  # (host path or volume name, container path, "rw" | "ro")
        self._log = log
        self._earlier = b""  # output of this proc's finished containers
        self._starts = 0
        self.container: DockerContainer | None = None
        self.popen = None  # the harness checks `popen` of its own processes only

    def start(self) -> None:
        assert not self.running, f"{self.name} already running"
        self._starts += 1
        c = DockerContainer(IMAGE).with_name(f"{self.prefix}-{self.name}-{self._starts}")
        c.with_command(self.command).with_kwargs(network_mode="host")
        c.with_env("ISTHMUS_HEALTH_URL", self.health_url)
        for source, target, mode in self.volumes:
            c.with_volume_mapping(source, target, mode)
        self.container = c.start()

    @property
    def running(self) -> bool:
        if self.container is None:
            return False
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status == "running"

    def output(self) -> bytes:
        if self.container is None:
            return b""
        return self.container.get_wrapped_container().logs(stdout=True, stderr=True)

    @property
    def log(self) -> Path:
        self._log.parent.mkdir(parents=True, exist_ok=True)
        self._log.write_bytes(self._earlier + self.output())
        return self._log

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the container (its stop signal, SIGKILL after `grace`), keep its output, remove
        it; the exit code."""
        if self.container is None:
            return None
        wrapped = self.container.get_wrapped_container()
        wrapped.stop(timeout=int(grace))
        code = wrapped.wait(timeout=grace + 5)["StatusCode"]
        self._earlier += self.output()
        self.container.stop()  # removes it (and nothing else: named volumes stay)
        self.container = None
        return code

    def kill(self) -> None:
        if self.container is not None:
            self.container.get_wrapped_container().kill()
            self.stop()

    def tail(self, lines: int = 60) -> str:
        text = (self._earlier + self.output()).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class ContainerTopology(Topology):
    """`Topology` with the federation and gateways in containers (see the module docstring)."""

    def __init__(self, root: Path, **kw) -> None:
        super().__init__(root, **kw)
        testcontainers_config.ryuk_disabled = True  # Ryuk's image cannot be pulled here
        self.prefix = f"isthmus-tc-{uuid.uuid4().hex[:8]}"
        self.fed_volume = f"{self.prefix}-federation"
        self._owned = False

    def _own_files(self) -> None:
        """The bind-mounted directory belongs to the image's user (we are root)."""
        if self._owned:
            return
        self.fed_dir.mkdir(parents=True, exist_ok=True)
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, UID, UID)
        self._owned = True

    def _mount(self) -> tuple[str, str, str]:
        return (str(self.root), str(self.root), "rw")

    def start_federation(self) -> None:
        self._own_files()
        if self.fed_proc is None:
            self.fed_proc = ContainerProc(
                "federation", self.prefix,
                ["federation", "serve", "--state-dir", str(self.fed_dir),
                 "--listen", f"127.0.0.1:{self.fed_port}",
                 "--admin", f"127.0.0.1:{self.fed_admin_port}",
                 "--lease-ttl", self.lease_ttl, "--log-level", "info"],
                self.root / "logs" / "federation.log",
                [self._mount(), (self.fed_volume, str(self.fed_dir), "rw")], self.fed_admin_port)
            self.procs.append(self.fed_proc)  # type: ignore[arg-type]
        self.fed_proc.start()

    async def wait_federation(self, timeout: float = 30.0) -> None:
        await super().wait_federation(timeout)
        ca = self._fed_exec("cat", str(self.fed_dir / "ca.pem"))
        self.fed_ca.write_bytes(ca.encode())
        os.chown(self.fed_ca, UID, UID)

    def _fed_exec(self, *args: str) -> str:
        assert self.fed_proc is not None and self.fed_proc.container is not None
        code, out = self.fed_proc.container.exec(list(args))
        if code != 0:
            raise AssertionError(f"{' '.join(args)} in the federation's container exited "
                                 f"{code}: {out.decode(errors='replace')}")
        return out.decode()

    def create_token(self, cluster: str, ttl: str = "15m", output: Path | None = None) -> str:
        """Made inside the federation's container, written to `output` (else to a file of the
        topology's, as the container's stdout mixes in its stderr) and returned."""
        out = output or self.root / "tokens" / f"{cluster}.{uuid.uuid4().hex[:6]}.token"
        self._fed_exec("isthmus", "federation", "token", "create", "--cluster", cluster,
                       "--ttl", ttl, "--state-dir", str(self.fed_dir), "--output", str(out))
        return out.read_text().strip()

    def start_gateway(self, name: str) -> None:
        self._own_files()
        n = self.nodes[name]
        if n.proc is None:
            n.proc = ContainerProc(  # type: ignore[assignment]
                name, self.prefix,
                ["gateway", "run", "--config", str(n.config), "--log-level", "info",
                 "--workers", str(self.workers.get(name, 1))],
                self.root / "logs" / f"{name}.log", [self._mount()], n.admin_port)
            self.procs.append(n.proc)  # type: ignore[arg-type]
        n.proc.start()

    def _check_alive(self, proc) -> None:  # type: ignore[override]
        if isinstance(proc, ContainerProc) and proc.container is not None and not proc.running:
            raise RuntimeError(f"{proc.name}'s container exited:\n{proc.tail()}")

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            podman("volume", "rm", "--force", self.fed_volume, check=False)
