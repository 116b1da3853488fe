"""Zero-downtime restarts of one gateway process: what runtime.py's Gateway holds for them.

The protocol between the old and the new process is control/handoff.py; what a process claims
(listening sockets, the state dir's lock, the control socket file) is control/claim.py; when a
new process is ready is core/takeover.py. Here is the orchestration:

1. claim: bind every listening socket (or, with --takeover, receive them from the gateway
   running on the state dir) before anything is written; the primary then takes the state dir's
   lock and its control socket (`Restart.claim`);
2. the new process waits until ready (`until_ready`, takeover.missing, within
   limits.takeover_timeout), is released by the old one (its lock and control socket), takes
   over the state dir (`persist_identity`), accepts and tells the old one taken
   (`Restart.take_over`); a worker started during a takeover reports ready with its sockets and
   accepts once its primary says so (`Restart.worker_ready`);
3. the old process answers on the control socket (handoff.Handing: `release`, `resume`,
   `handed_over`), then drains (`Restart.drain`): it stops accepting and lets open connections
   finish within limits.drain_timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from federation.errors import IsthmusError
from federation.identity import Svid
from federation.units import format_hostport
from gateway.config.schema import GatewayConfig
from gateway.control.agent import Identity
from gateway.control.claim import (
    ListenSockets,
    StateLock,
    already_running,
    control_socket,
    remove_control_socket,
)
from gateway.control.handoff import Channel, ControlServer, Takeover, TakeoverFailed, send_sockets
from gateway.control.workers import Supervisor
from gateway.core.health import HealthBook, HealthState
from gateway.core.takeover import Progress, missing, wanted_listeners
from gateway.dataplane.l4 import Listener
from gateway.dataplane.router import local_key, remote_key

log = logging.getLogger("isthmus.gateway")


def readiness(waited: float, cfg: GatewayConfig, book: HealthBook, peers: Sequence[str],
              catalog_from: str, supervisor: Supervisor | None) -> Progress:
    """What takeover.missing() decides on: the catalog's source, the endpoints and peers whose
    health is still unknown, the workers not ready yet."""
    unknown = tuple(local_key(e.host, e.port) for ex in cfg.exports for e in ex.endpoints
                    if book.state(local_key(e.host, e.port)) == HealthState.UNKNOWN)
    unprobed = tuple(c for c in peers if book.state(remote_key(c)) == HealthState.UNKNOWN)
    workers = supervisor.waiting() if supervisor is not None else ()
    return Progress(waited, catalog_from, unknown, unprobed, workers)


async def until_ready(progress: Callable[[float], Progress], stopping: Callable[[], bool],
                      timeout: float | None) -> str | None:
    """Wait until takeover.missing() says ready; what is missing if `timeout` passes first."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while (why := missing(progress(loop.time() - began))) is not None:
        if stopping():
            return "nothing (it was told to stop)"
        if timeout is not None and loop.time() - began >= timeout:
            return why
        await asyncio.sleep(0.05)
    return None


def persist_identity(ident: Identity) -> None:
    """Now the writer of the state dir: keep what was issued in memory while taking over."""
    ident.persist = True
    ident.bundle = ident._bundle()  # writes bundle.json if the CA changed; same sequence
    try:
        on_disk = Svid.load(ident.dir)
    except IsthmusError:
        on_disk = None
    if on_disk is None or on_disk.serial != ident.svid.serial:
        ident.svid.write(ident.dir)


async def first_of(*waitables: Any) -> None:
    """Until the first of these events (set) or futures (done)."""
    tasks = {w if isinstance(w, asyncio.Future) else asyncio.ensure_future(w.wait())
             for w in waitables}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if t not in waitables:
                t.cancel()


class Restart:
    """One process's listening sockets, state dir lock and control socket, and its part in a
    restart: the new process's (`take_over`, `worker_ready`) or the old one's (handoff.Handing
    for the control server, then `drain`). The Gateway gives what the old process needs of it:
    `speak()` (write for the cluster again), `quiet()` (stop writing for it) and `drain()` (ask
    run() to drain)."""

    def __init__(self, cfg: GatewayConfig, *, workers: int, worker: int, takeover: bool,
                 listen_fds: dict[str, int] | None, ready_fd: int | None, wait_serve: bool,
                 speak: Callable[[], None], quiet: Callable[[], Awaitable[None]],
                 drain: Callable[[], None]) -> None:
        self.cfg = cfg
        self.workers = workers  # handoff.Handing: a takeover keeps the count
        self.worker = worker
        self.takeover_wanted = takeover  # --takeover: take the sockets of the running gateway
        self.listen_fds = listen_fds  # a worker's sockets, from its primary: address -> fd
        self.ready_fd = ready_fd  # a worker tells its primary it is ready here
        self.wait_serve = wait_serve  # a worker started in a takeover: accept on SIGUSR1 only
        self._speak, self._quiet, self._drain = speak, quiet, drain
        self.sockets: ListenSockets | None = None
        self.handoff: Takeover | None = None  # a takeover in progress (this is the new process)
        self.lock: StateLock | None = None
        self.control_sock: Any = None
        self.control: ControlServer | None = None
        self.handed_over_to = False  # the old process, after a handoff
        self._released = False  # the old process, between release and taken (or resume)
        self.draining = False

    # -- claim ---------------------------------------------------------------------------------
    async def claim(self) -> None:
        """Bind (or, taking over, receive) every listening socket before anything is written to
        the state dir; then the primary takes the state dir's lock and its control socket."""
        cfg = self.cfg
        wanted = wanted_listeners(cfg, self.workers)
        if self.worker != 0:
            self.sockets = ListenSockets.for_worker(wanted, self.listen_fds or {}, self.worker,
                                                    cfg.source)
            return
        if self.takeover_wanted:
            self.handoff = await Takeover.begin(cfg.state_dir, self.workers,
                                                cfg.limits.takeover_timeout)
            if self.handoff is None:
                log.info("--takeover: no gateway runs on %s; starting normally", cfg.state_dir)
            else:
                try:
                    self.sockets = self.handoff.sockets(wanted, cfg.source)
                except Exception as e:
                    await self.handoff.abort(str(e))
                    self.handoff = None
                    raise
                return
        pid = StateLock.holder(cfg.state_dir)
        if pid is not None:
            raise already_running(cfg.state_dir, pid, cfg.source)
        self.sockets = ListenSockets.bind(wanted, cfg.source)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock = StateLock.acquire(cfg.state_dir, cfg.source)
        self.lock.write_pid(os.getpid())
        self.control_sock = control_socket(cfg.state_dir)

    def sock(self, hostport: tuple[str, int]) -> socket.socket:
        """This process's listening socket for `hostport`."""
        return self.sockets.get(format_hostport(*hostport), self.worker)

    @property
    def serving(self) -> bool:
        """Listeners accept as they start (not in a takeover: then once released)."""
        return self.handoff is None and not self.wait_serve

    # -- the new process -----------------------------------------------------------------------
    async def take_over(self, *, follow: Callable[[], Awaitable[None]],
                        progress: Callable[[float], Progress], stopping: Callable[[], bool],
                        identity: Identity, accept: Callable[[], Awaitable[None]],
                        imports: int) -> None:
        """This process is the new one: `follow()` the catalog, get ready, be released,
        `accept()` (and speak, the caller's next step); the old one drains."""
        t, cfg = self.handoff, self.cfg
        assert t is not None
        began = time.monotonic()
        await follow()
        timeout = cfg.limits.takeover_timeout
        why = await until_ready(progress, stopping, timeout)
        if why is not None:
            reason = (f"not ready after {timeout:g}s (limits.takeover_timeout): "
                      f"still waiting for {why}")
            await t.abort(reason)
            self.handoff = None
            raise TakeoverFailed(f"takeover aborted, {reason}; the running gateway (pid {t.pid}) "
                                 "keeps serving")
        got = await t.ready()  # TakeoverFailed if it gave up on us
        try:
            if got is None:
                log.warning("the running gateway (pid %d) went away during the takeover; "
                            "going on alone", t.pid)
                self.lock = StateLock.acquire(cfg.state_dir, cfg.source, wait=2.0)
                self.control_sock = control_socket(cfg.state_dir)
            else:
                self.lock, self.control_sock = got
        except IsthmusError as e:
            await t.abort(str(e))
            self.handoff = None
            raise TakeoverFailed(f"takeover aborted: {e}") from None
        self.lock.write_pid(os.getpid())
        persist_identity(identity)
        await accept()
        if got is not None:
            await t.taken()
        self.handoff = None
        log.info("gateway %s took over from pid %d in %.1fs: %d import listener(s), %d worker(s)",
                 cfg.cluster.name, t.pid, time.monotonic() - began, imports, self.workers)

    async def worker_ready(self, progress: Callable[[float], Progress],
                           stopping: Callable[[], bool], listeners: Sequence[Listener]) -> None:
        """A worker: accept now, or (in a takeover) once ready and its primary says so; tell the
        primary it is ready, with its sockets, on the socket it gave (`--ready-fd`)."""
        if self.wait_serve:
            loop = asyncio.get_running_loop()
            serve = asyncio.Event()
            loop.add_signal_handler(signal.SIGUSR1, serve.set)
            await until_ready(progress, stopping, None)  # the primary bounds the wait
            await self._signal_ready()
            await serve.wait()
            for lst in listeners:
                await lst.serve()
            log.info("worker %d accepting", self.worker)
        else:
            await self._signal_ready()

    async def _signal_ready(self) -> None:
        if self.ready_fd is None:
            return
        ch = Channel(socket.socket(fileno=self.ready_fd))
        self.ready_fd = None
        try:
            await send_sockets(ch, "ready", self.sockets.offer())
        except (IsthmusError, OSError) as e:
            log.warning("cannot tell the primary this worker is ready: %s", e)
        finally:
            ch.close()

    # -- the old process: handoff.Handing, for the control server ------------------------------
    def control_server(self) -> ControlServer:
        self.control = ControlServer(self.control_sock, self)
        return self.control

    def handoff_sockets(self) -> ListenSockets:
        return self.sockets

    async def release(self) -> tuple[int, Any]:
        await self._quiet()
        self._released = True
        log.info("released the state dir and the federation role to the new process")
        return self.lock.fd, self.control_sock

    def resume(self) -> None:
        self._released = False
        self.lock.write_pid(os.getpid())
        self._speak()

    def handed_over(self) -> None:
        self.handed_over_to = True
        self._drain()

    async def drain(self, stop: asyncio.Event, listeners: Sequence[Listener],
                    supervisor: Supervisor | None,
                    close_admin: Callable[[], Awaitable[None]]) -> None:
        """Stop accepting (the new process, if any, accepts from the same sockets); let open
        connections finish within limits.drain_timeout; a SIGTERM meanwhile cuts it short."""
        timeout = self.cfg.limits.drain_timeout
        self.draining = True
        for lst in listeners:
            lst.stop_accepting()
        await close_admin()
        if self.sockets is not None:
            self.sockets.close()
        open_now = sum(len(lst.legs) for lst in listeners)
        log.info("draining: accepting no more; %d open connection(s) get up to %gs",
                 open_now, timeout)
        jobs = [lst.drain(timeout) for lst in listeners]
        if supervisor is not None:
            jobs.append(supervisor.drain(timeout))
        work = asyncio.ensure_future(asyncio.gather(*jobs))
        await first_of(stop, work)
        if work.done():
            left = sum(n for n in work.result() if isinstance(n, int))
            log.info("drained: %d connection(s) were still open at the bound and were closed", left)
        else:
            log.warning("told to stop while draining: closing the open connections now")
            work.cancel()
            await asyncio.wait({work})

    # -- either ----------------------------------------------------------------------------------
    async def close(self) -> None:
        """After the listeners: give up a takeover not done, close the sockets, the control
        socket (its file too, unless the new process has it now) and the lock."""
        if self.handoff is not None:  # this process never took over: the old one keeps serving
            await self.handoff.abort("the new process stopped before it was ready")
            self.handoff = None
        if self.sockets is not None:
            self.sockets.close()
        if self.control_sock is not None:
            if not (self.handed_over_to or self._released):  # else the new process's now
                remove_control_socket(self.cfg.state_dir)
            self.control_sock.close()
            self.control_sock = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def status(self) -> dict[str, Any]:
        control = self.control
        return {"draining": self.draining,
                "handoff": control.state if control is not None else None,
                "successor": control.successor if control is not None else None}
