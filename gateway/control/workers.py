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
- a worker whose primary is gone (its parent changed) stops within a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
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
    write_atomic(path, json.dumps({"pid": os.getpid(), "written_at": time.time(), "listeners": listeners}).encode())


def read_stats(state_dir: Path, workers: int, now: float) -> dict[int, dict[str, Any]]:
    """Fresh counters of workers 1..workers-1: {worker: {"pid", "listeners": {name: stats}}}.
    A missing, unreadable or stale file is left out (the worker is starting, gone or stuck)."""
    out: dict[int, dict[str, Any]] = {}
    for i in range(1, workers):
        try:
            obj = json.loads(stats_path(state_dir, i).read_text())
            if now - float(obj["written_at"]) <= STATS_STALE and isinstance(obj.get("listeners"), dict):
                out[i] = obj
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


class Supervisor:
    """Keeps workers 1..workers-1 running while the primary runs."""

    def __init__(self, config_path: Path, workers: int, log_level: str) -> None:
        self.config_path = config_path
        self.workers = workers
        self.log_level = log_level
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {i: 0 for i in range(1, workers)}

    def command(self, worker: int) -> list[str]:
        return [sys.executable, "-m", "isthmus.cli", "gateway", "run", "--config", str(self.config_path),
                "--workers", str(self.workers), "--worker-index", str(worker), "--primary-pid", str(os.getpid()),
                "--log-level", self.log_level]

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(1, self.workers):
                    tg.create_task(self._keep(i))
        finally:
            await self.stop()

    async def _keep(self, worker: int) -> None:
        backoff = 1.0
        while True:
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self.command(worker), stdin=asyncio.subprocess.DEVNULL)
            self.procs[worker] = proc
            log.info("worker %d started (pid %d)", worker, proc.pid)
            code = await proc.wait()
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts[worker] += 1
            log.warning("worker %d (pid %d) exited with code %s; restarting in %.0fs", worker, proc.pid, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(30.0, backoff * 2)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every live worker by PID, SIGKILL what is left after `timeout`."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
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
                 "running": bool(p is not None and p.returncode is None), "restarts": self.restarts[i]}
                for i in range(1, self.workers)]


async def watch_parent(parent: int, every: float = 1.0) -> None:
    """Return once our parent is no longer `parent` (the primary's pid, given on the command line,
    not read at startup: the primary may die before we get that far): this worker stops too."""
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.warning("the primary (pid %d) is gone; this worker stops", parent)
