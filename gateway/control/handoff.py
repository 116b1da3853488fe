"""Zero-downtime restart: a running gateway hands its listening sockets, then its role as the
writer of its state dir, to a new process (`isthmus gateway run --config F --takeover`).

Theory of operation
-------------------
Every listening socket is bound before anything is written to the state dir
(claim.py, `ListenSockets.bind`: a port in use is an error naming the field and the address,
exit 2). The process that owns a state dir holds `STATE/gateway.lock` (flock; the file says its
PID) and answers on `STATE/gateway.sock`, a unix SOCK_SEQPACKET socket (0600, in the 0700 state
dir; peers of another uid are refused). A second plain start finds the lock held and exits 2 naming
the PID. A start with --takeover connects to the control socket instead:

    new -> old   hello     {protocol, pid, workers, ready_within}
    old -> new   sockets   {pid, workers, items: [{address, index}], more} + the listening fds
                 (SCM_RIGHTS, at most MAX_FDS per message; `more` until the last) -- or
                 refused   {code: "usage" | "busy", error}
    new          binds what the old one lacks (addresses new in its config), builds everything,
                 follows the catalog, probes its endpoints and peers, starts its workers; until
                 `takeover.missing()` says ready (within limits.takeover_timeout)
    new -> old   ready     -- or abort {error} (not ready in time, bad config): the old one
                 never stopped anything and keeps serving
    old          stops writing the state dir and the federation (lease, publishing, catalog
                 file, SVID rotation, drill samples); keeps serving
    old -> new   released  + the lock fd and the control socket (the same open files: the lock
                 is never free, and the control socket never missing, in between)
    new          starts accepting (it and its workers), grants its own lease and publishes,
                 writes the catalog and its PID
    new -> old   taken
    old          stops accepting (its copies of the sockets close; the new process holds the
                 same sockets, so nothing queued is lost), tells its links' callers GOAWAY,
                 drains its open connections for up to limits.drain_timeout, exits 0

The old process waits `ready_within` (+ STEP_TIMEOUT) for ready and STEP_TIMEOUT for taken; if
the new process dies or stalls before taken, the old one resumes writing and goes on as if
nothing happened. If the old process dies mid-handoff, the new one goes on alone: it takes the
lock itself once free and binds a new control socket. Sockets are matched by address
(`takeover.plan_sockets`), so a config change that adds or removes listeners is fine; the
worker count must stay the same (each worker keeps the socket of its index, and its queue).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from federation.errors import InputError
from federation.logs import LogLimiter, quote
from gateway.control.claim import CONTROL_FILE, ListenSockets, StateLock, short_path
from gateway.core.takeover import PlanError, Wanted, plan_sockets
from gateway.errors import GatewayError

log = logging.getLogger("isthmus.gateway.handoff")
limited = LogLimiter(log)  # for what peers on the control socket make us say

PROTOCOL = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 200  # per message (the kernel takes at most 253)
STEP_TIMEOUT = 10.0  # every answer but `ready`
MAX_READY_WITHIN = 600.0  # bound on what a peer may ask us to wait for `ready`


class TakeoverRefused(InputError):
    """The running gateway will not hand over to this invocation (e.g. another worker count)."""


class TakeoverFailed(GatewayError):
    """This process could not take over; the running gateway keeps serving."""


class PeerGone(GatewayError):
    """The other side of the control connection went away."""


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Channel:
    """JSON messages, with file descriptors, on a connected unix SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def _wait(self, add: Callable, remove: Callable, timeout: float | None) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            remove(fd)

    async def send(self, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                   timeout: float = STEP_TIMEOUT) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        while True:
            try:
                socket.send_fds(self.sock, [data], list(fds))
                return
            except BlockingIOError:
                await self._wait(self.loop.add_writer, self.loop.remove_writer, timeout)
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerGone(str(e)) from None

    async def recv(self, timeout: float | None = STEP_TIMEOUT) -> tuple[dict[str, Any], list[int]]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
                break
            except BlockingIOError:
                await self._wait(self.loop.add_reader, self.loop.remove_reader, timeout)
            except ConnectionResetError as e:
                raise PeerGone(str(e)) from None
        try:
            if not data:
                raise PeerGone("closed")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise GatewayError(f"control message over {MAX_MESSAGE} bytes or {MAX_FDS} fds")
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                obj = None
            if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                raise GatewayError(f"not a control message: {quote(data[:80])}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return obj, fds

    def close(self) -> None:
        self.sock.close()


def _expect(obj: dict[str, Any], fds: list[int], *types: str) -> None:
    if obj["type"] not in types:
        for fd in fds:
            os.close(fd)
        raise GatewayError(f"expected {' or '.join(types)}, got {quote(obj['type'])}")


async def send_sockets(ch: Channel, kind: str, items: list[tuple[str, int, socket.socket]],
                       **extra: Any) -> None:
    """Listening sockets as `kind` messages: {items: [{address, index}], more} + their fds."""
    chunks = [items[i:i + MAX_FDS] for i in range(0, len(items), MAX_FDS)] or [[]]
    for n, chunk in enumerate(chunks):
        listed = [{"address": a, "index": i} for a, i, _ in chunk]
        await ch.send({"type": kind, **extra, "items": listed, "more": n < len(chunks) - 1},
                      [s.fileno() for _, _, s in chunk])


def take_sockets(msg: dict[str, Any], fds: list[int], workers: int,
                 into: dict[str, dict[int, socket.socket]]) -> bool:
    """Add one message's sockets to `into` (address -> index -> socket); True if more follow.
    GatewayError (every fd of the message closed) if items and fds do not fit together."""
    items = msg.get("items")
    ok = isinstance(items, list) and len(items) == len(fds)
    got: list[tuple[str, int, socket.socket]] = []
    for item, fd in zip(items if ok else [], fds, strict=False):
        a, i = (item.get("address"), item.get("index")) if isinstance(item, dict) else (None, None)
        if not isinstance(a, str) or not isinstance(i, int) or not 0 <= i < workers:
            ok = False
            break
        got.append((a, i, socket.socket(fileno=fd)))
    if not ok or any(s.type != socket.SOCK_STREAM for _, _, s in got):
        for s in (s for _, _, s in got):
            s.close()
        for fd in fds[len(got):]:
            os.close(fd)
        raise GatewayError(f"{len(fds)} fds for socket items {quote(items)}")
    for a, i, s in got:
        into.setdefault(a, {})[i] = s
    return msg.get("more") is True


# ---------------------------------------------------------------------------------------------
# the running gateway's side


class Handing(Protocol):
    """What the control server needs of the running gateway."""

    workers: int

    def handoff_sockets(self) -> ListenSockets: ...

    async def release(self) -> tuple[int, socket.socket]:
        """Stop writing the state dir and the federation; give the lock fd and control socket."""

    def resume(self) -> None:
        """The handoff failed after release: write again, as before."""

    def handed_over(self) -> None:
        """The new process has it all: stop accepting, drain, exit."""


class ControlServer:
    """Answers on the control socket; one handoff at a time."""

    def __init__(self, sock: socket.socket, owner: Handing) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.owner = owner
        self.successor: int | None = None  # pid of the process taking over
        self.state = "serving"  # serving | handing over | handed over
        self._accepting = asyncio.Event()  # cleared while the new process holds the socket
        self._accepting.set()
        self._accept: asyncio.Task | None = None

    def _pause(self) -> None:
        self._accepting.clear()
        if self._accept is not None:
            self._accept.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            try:
                while True:
                    await self._accepting.wait()
                    self._accept = accept = loop.create_task(loop.sock_accept(self.sock))
                    await asyncio.wait({accept})
                    if accept.cancelled():  # released: the new process accepts here now
                        continue
                    try:
                        conn, _ = accept.result()
                    except OSError as e:
                        limited.warning("accept", "control socket: accept failed: %s", e)
                        await asyncio.sleep(0.1)
                        continue
                    tg.create_task(self._serve(conn))
            finally:
                if self._accept is not None:
                    self._accept.cancel()

    async def _serve(self, conn: socket.socket) -> None:
        ch = Channel(conn)
        try:
            if _peer_uid(conn) != os.getuid():
                limited.warning("uid", "control socket: refused a peer of another uid")
                return
            hello, fds = await ch.recv()
            _expect(hello, fds, "hello")
            pid, workers, within = hello.get("pid"), hello.get("workers"), hello.get("ready_within")
            if (hello.get("protocol") != PROTOCOL or not isinstance(pid, int)
                    or not isinstance(workers, int) or not isinstance(within, int | float)):
                await ch.send({"type": "refused", "code": "usage",
                               "error": f"unsupported hello (protocol {PROTOCOL} here)"})
                return
            if self.successor is not None:
                await ch.send({"type": "refused", "code": "busy",
                               "error": f"a takeover by pid {self.successor} is in progress"})
                return
            if workers != self.owner.workers:
                await ch.send({"type": "refused", "code": "usage", "error":
                               f"the running gateway (pid {os.getpid()}) has --workers "
                               f"{self.owner.workers}; a takeover keeps the count (use --workers "
                               f"{self.owner.workers}, or stop and start to change it)"})
                return
            self.successor = pid
            self.state = "handing over"
            try:
                await self._handoff(ch, pid, min(float(within), MAX_READY_WITHIN))
            finally:
                self.successor = None
                if self.state == "handing over":
                    self.state = "serving"
        except (GatewayError, OSError, TimeoutError) as e:
            limited.warning("peer", "control socket: %s", e)
        finally:
            ch.close()

    async def _handoff(self, ch: Channel, pid: int, within: float) -> None:
        offer = self.owner.handoff_sockets().offer()
        await send_sockets(ch, "sockets", offer, pid=os.getpid(), workers=self.owner.workers)
        log.info("handing over to pid %d: %d listening socket(s) sent; it has %gs to get ready",
                 pid, len(offer), within)
        try:
            msg, fds = await ch.recv(within + STEP_TIMEOUT)
            _expect(msg, fds, "ready", "abort")
        except TimeoutError:
            await ch.send({"type": "abort", "error": f"not ready within {within:g}s"})
            log.warning("pid %d was not ready within %gs; this gateway keeps serving", pid, within)
            return
        except PeerGone:
            log.warning("pid %d went away before it was ready; this gateway keeps serving", pid)
            return
        if msg["type"] == "abort":
            log.warning("pid %d gave up taking over (%s); this gateway keeps serving",
                        pid, quote(msg.get("error")))
            return
        lock_fd, control = await self.owner.release()
        self._pause()
        try:
            await ch.send({"type": "released"}, [lock_fd, control.fileno()])
            msg, fds = await ch.recv()
            _expect(msg, fds, "taken")
        except (GatewayError, OSError, TimeoutError) as e:
            self._accepting.set()
            self.owner.resume()
            log.warning("pid %d did not confirm the takeover (%s); this gateway resumes", pid, e)
            return
        self.state = "handed over"
        log.info("pid %d took over; this gateway stops accepting and drains", pid)
        self.owner.handed_over()


# ---------------------------------------------------------------------------------------------
# the new process's side


class Takeover:
    """A takeover in progress, seen from the new process."""

    def __init__(self, ch: Channel, pid: int, socks: dict[str, dict[int, socket.socket]]) -> None:
        self.ch = ch
        self.pid = pid  # the running gateway's
        self.socks = socks

    @classmethod
    async def begin(cls, state_dir: Path, workers: int, ready_within: float) -> Takeover | None:
        """Ask the gateway running on `state_dir` for its sockets; None if none runs there."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            with short_path(state_dir / CONTROL_FILE) as p:
                await asyncio.wait_for(loop.sock_connect(sock, p), STEP_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except (OSError, TimeoutError) as e:
            sock.close()
            raise TakeoverFailed(f"{state_dir / CONTROL_FILE}: cannot reach the running "
                                 f"gateway: {e}") from None
        ch = Channel(sock)
        socks: dict[str, dict[int, socket.socket]] = {}
        pid = 0
        try:
            await ch.send({"type": "hello", "protocol": PROTOCOL, "pid": os.getpid(),
                           "workers": workers, "ready_within": ready_within})
            more = True
            while more:
                msg, fds = await ch.recv()
                if msg["type"] == "refused":
                    err = ("the running gateway refused the takeover: "
                           f"{quote(msg.get('error'), 300)}")
                    raise (TakeoverRefused if msg.get("code") == "usage" else TakeoverFailed)(err)
                _expect(msg, fds, "sockets")
                pid = msg.get("pid") if isinstance(msg.get("pid"), int) else 0
                more = take_sockets(msg, fds, workers, socks)
        except (TakeoverRefused, TakeoverFailed):
            _close_all(socks)
            ch.close()
            raise
        except (GatewayError, OSError, TimeoutError) as e:
            _close_all(socks)
            ch.close()
            raise TakeoverFailed(f"takeover: the running gateway broke off: {e}") from None
        log.info("taking over from pid %d: %d listening socket(s) received", pid,
                 sum(len(d) for d in socks.values()))
        return cls(ch, pid, socks)

    def sockets(self, wanted: tuple[Wanted, ...], source: Any) -> ListenSockets:
        """The received sockets this config wants, plus new ones bound for new addresses."""
        try:
            plan = plan_sockets(wanted, {a: any(_shared(s) for s in d.values())
                                         for a, d in self.socks.items()})
        except PlanError as e:
            raise TakeoverRefused(f"{source}: {e}") from None
        for a in plan.drop:
            log.info("%s is no longer configured: its socket is closed", a)
            for s in self.socks.pop(a).values():
                s.close()
        # A worker that is down in the old process sent no socket of its index: bound when the
        # new worker of that index starts, as any worker's.
        out = ListenSockets(wanted, {w.address: self.socks.pop(w.address) for w in plan.adopt})
        try:
            for w in plan.bind:
                out.add(w, [0], source)
        except BaseException:
            out.close()
            raise
        return out

    async def ready(self) -> tuple[StateLock, socket.socket] | None:
        """Say we are ready; the old process's lock and control socket, or None if it went
        away (we go on alone). TakeoverFailed if it gave up on us."""
        try:
            await self.ch.send({"type": "ready"})
            msg, fds = await self.ch.recv()
        except (PeerGone, BrokenPipeError, ConnectionError):
            return None
        except (GatewayError, TimeoutError) as e:
            raise TakeoverFailed(f"takeover: no answer to ready from pid {self.pid}: {e}") from None
        if msg["type"] == "abort":
            raise TakeoverFailed(f"pid {self.pid} gave up waiting: {quote(msg.get('error'))}")
        _expect(msg, fds, "released")
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise TakeoverFailed(f"released with {len(fds)} fds, expected 2 (lock, control socket)")
        return StateLock(fds[0]), socket.socket(fileno=fds[1])

    async def taken(self) -> None:
        try:
            await self.ch.send({"type": "taken"})
        except (GatewayError, OSError, TimeoutError) as e:
            log.warning("could not tell pid %d that the takeover is done: %s", self.pid, e)
        self.ch.close()

    async def abort(self, reason: str) -> None:
        try:
            await self.ch.send({"type": "abort", "error": reason[:2000]})
        except (GatewayError, OSError, TimeoutError):
            pass
        self.ch.close()
        _close_all(self.socks)


def _shared(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _close_all(socks: dict[str, dict[int, socket.socket]]) -> None:
    for d in socks.values():
        for s in d.values():
            s.close()
    socks.clear()
