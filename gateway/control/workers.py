"""Extra worker processes of one gateway (`isthmus gateway run --workers N`).

Theory of operation
-------------------
One Python process drives about one core. With `--workers N` the process the operator started
is worker 0, the *primary*; it starts workers 1..N-1 as child processes running the same
config with `--worker-index i`, restarts one that exits (backoff 1 s doubling to 30 s, reset
after a minute of uptime) and stops them all, by PID, when it stops.

Every worker binds the same listeners with SO_REUSEPORT, so the kernel spreads new connections
(and new inbound links from remote gateways) across them. What is shared and what is not:

- the primary alone speaks for the cluster: it joins, holds the lease, publishes exports (with
  its own view of endpoint health) and imports, persists the catalog, serves the admin port,
  and runs drill observers;
- every worker follows the catalog itself (a read-only watch with the cluster's SVID, once the
  primary has joined), runs its own health checks, peer probes and outlier detection (so probe
  traffic is N times one worker's), keeps its own links to remote gateways, and acts out drill
  faults on its own inbound listener;
- a worker issues its SVIDs in memory from the cluster CA in the state dir (the primary's copy
  on disk is the one rotated there), and writes its listener counters to
  `STATE/workers/<i>.json` every second, which the primary's /metrics and /status include with
  a `worker` label;
- a worker whose primary is gone (its parent changed) stops within a second;
- the primary binds every listening socket, one per worker for each SO_REUSEPORT listener, and
  each worker inherits those of its index (the primary keeps them all, to hand them over in a
  restart: gateway/control/handoff.py); a worker told SIGQUIT stops accepting and drains, like
  the primary, and one that starts during a takeover accepts only when its primary says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from federation.files import write_atomic

log = logging.getLogger("isthmus.gateway.workers")

MAX_WORKERS = 64
STATS_EVERY = 1.0
STATS_STALE = 10.0  # a worker's counters older than this are not reported (it is gone or stuck)


def stats_path(state_dir: Path, worker: int) -> Path:
    return state_dir / "workers" / f"{worker}.json"


def write_stats(state_dir: Path, worker: int, listeners: dict[str, dict[str, Any]]) -> None:
    path = stats_path(state_dir, worker)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps({"pid": os.getpid(), "written_at": time.time(),
                                   "listeners": listeners}).encode())


def read_stats(state_dir: Path, workers: int, now: float) -> dict[int, dict[str, Any]]:
    """Fresh counters of workers 1..workers-1: {worker: {"pid", "listeners": {name: stats}}}.
    A missing, unreadable or stale file is left out (the worker is starting, gone or stuck)."""
    out: dict[int, dict[str, Any]] = {}
    for i in range(1, workers):
        try:
            obj = json.loads(stats_path(state_dir, i).read_text())
            if (now - float(obj["written_at"]) <= STATS_STALE
                    and isinstance(obj.get("listeners"), dict)):
                out[i] = obj
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


class Supervisor:
    """Keeps workers 1..workers-1 running while the primary runs.

    Worker i binds its own SO_REUSEPORT sockets as it starts (so nothing queues where nobody
    accepts yet), or, in a takeover, inherits those the old worker i had (pass_fds,
    `--listen-fds`); when ready it sends them to the primary over a socket pair (`--ready-fd`),
    which holds them (claim.ListenSockets) to hand them over in the next restart. During a
    takeover (`wait_serve`) workers do not accept until the primary sends SIGUSR1 (`serve()`),
    so a takeover given up never leaves a worker with connections. When a worker exits, the
    primary closes its copies at once (what was queued on them is lost, as with any crash; new
    connections go to the other workers). `drain()` (the primary handed
    over or was told SIGQUIT) sends SIGQUIT to every worker and restarts none."""

    def __init__(self, config_path: Path, workers: int, log_level: str, sockets: Any = None,
                 wait_serve: bool = False) -> None:
        self.config_path = config_path
        self.workers = workers
        self.log_level = log_level
        self.sockets = sockets  # claim.ListenSockets (None: workers bind their own; unit tests)
        self.wait_serve = wait_serve
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {i: 0 for i in range(1, workers)}
        self.ready: set[int] = set()
        self.draining = False
        self._tg: asyncio.TaskGroup | None = None

    def command(self, worker: int, fds: dict[str, int] | None = None,
                ready_fd: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "isthmus.cli", "gateway", "run",
               "--config", str(self.config_path), "--workers", str(self.workers),
               "--worker-index", str(worker), "--primary-pid", str(os.getpid()),
               "--log-level", self.log_level]
        if fds is not None:
            cmd += ["--listen-fds", json.dumps(fds, separators=(",", ":"))]
        if ready_fd is not None:
            cmd += ["--ready-fd", str(ready_fd)]
        if self.wait_serve:
            cmd.append("--wait-serve")
        return cmd

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for i in range(1, self.workers):
                    tg.create_task(self._keep(i))
        finally:
            if not self.draining:
                await self.stop()

    async def _spawn(self, worker: int) -> asyncio.subprocess.Process:
        if self.sockets is None:
            return await asyncio.create_subprocess_exec(*self.command(worker),
                                                        stdin=asyncio.subprocess.DEVNULL)
        held = self.sockets.held(worker)  # the old worker's, in a takeover; else none
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(worker, {a: s.fileno() for a, s in held.items()}, theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[*(s.fileno() for s in held.values()), theirs.fileno()])
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._tg.create_task(self._await_ready(worker, proc, mine))  # type: ignore[union-attr]
        return proc

    async def _await_ready(self, worker: int, proc: asyncio.subprocess.Process,
                           sock: socket.socket) -> None:
        """The worker's "ready", with its listening sockets: held from now on."""
        from federation.errors import IsthmusError
        from gateway.control.handoff import Channel, take_sockets

        ch = Channel(sock)
        got: dict[str, dict[int, socket.socket]] = {}
        try:
            more = True
            while more:
                msg, fds = await ch.recv(timeout=None)
                if msg["type"] != "ready":
                    raise IsthmusError(f"expected ready, got {msg['type']!r}")
                more = take_sockets(msg, fds, self.workers, got)
        except IsthmusError as e:  # it exited before it was ready (PeerGone), or misspoke
            log.debug("worker %d: %s", worker, e)
            for d in got.values():
                for s in d.values():
                    s.close()
            return
        finally:
            ch.close()
        if proc.returncode is not None or any(set(d) != {worker} for d in got.values()):
            for d in got.values():
                for s in d.values():
                    s.close()
            return
        self.sockets.adopt(worker, {a: d[worker] for a, d in got.items()})
        self.ready.add(worker)

    async def _keep(self, worker: int) -> None:
        from federation.errors import IsthmusError

        backoff = 1.0
        while True:
            started = time.monotonic()
            try:
                proc = await self._spawn(worker)
            except IsthmusError as e:  # its sockets cannot be bound: try again later
                log.warning("worker %d cannot start: %s; retrying in %.0fs", worker, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            self.procs[worker] = proc
            log.info("worker %d started (pid %d)", worker, proc.pid)
            code = await proc.wait()
            self.ready.discard(worker)
            if self.draining:
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts[worker] += 1
            log.warning("worker %d (pid %d) exited with code %s; restarting in %.0fs", worker,
                        proc.pid, code, backoff)
            if self.sockets is not None:
                self.sockets.drop(worker)
            await asyncio.sleep(backoff)
            backoff = min(30.0, backoff * 2)

    def all_ready(self) -> bool:
        return all(i in self.ready for i in range(1, self.workers))

    def waiting(self) -> tuple[int, ...]:
        return tuple(i for i in range(1, self.workers) if i not in self.ready)

    def serve(self) -> None:
        """A takeover is settled: every worker starts accepting (later restarts at once)."""
        self.wait_serve = False
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGUSR1)

    def signal_ready(self, sig: int) -> None:
        """Send `sig` to every worker that is up (one still starting reads the files itself)."""
        for i, p in self.procs.items():
            if i in self.ready and p.returncode is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def drain(self, timeout: float) -> None:
        """SIGQUIT every worker (stop accepting, drain for `timeout`, exit 0); SIGKILL what is
        left 5 s after that. No worker is restarted any more."""
        self.draining = True
        await self.stop(timeout + 5.0, signal.SIGQUIT)

    async def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Signal every live worker by PID (SIGTERM), SIGKILL what is left after `timeout`."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
        for p in live:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                p.kill()
                await p.wait()

    def status(self) -> list[dict[str, Any]]:
        return [{"worker": i, "pid": p.pid if (p := self.procs.get(i)) else None,
                 "running": bool(p is not None and p.returncode is None),
                 "restarts": self.restarts[i]}
                for i in range(1, self.workers)]


async def watch_parent(parent: int, every: float = 1.0) -> None:
    """Return once our parent is no longer `parent` (the primary's pid, given on the command line,
    not read at startup: the primary may die before we get that far): this worker stops too."""
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.warning("the primary (pid %d) is gone; this worker stops", parent)
