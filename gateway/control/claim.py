"""What a gateway claims before it writes anything to its state dir: every listening socket
(bound first, so a port in use is an error naming the field and the address, exit 2), the state
dir's lock (`STATE/gateway.lock`, flock; the file says the holder's PID) and the control socket
file (`STATE/gateway.sock`, 0600) that handoff.py speaks its protocol on.

In a takeover all three pass from the running gateway to the new process as open files
(handoff.py): the lock is never free and the control socket never missing in between.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from federation.errors import InputError
from gateway.core.takeover import Wanted

CONTROL_FILE = "gateway.sock"
LOCK_FILE = "gateway.lock"
BACKLOG = 4096


class BindError(InputError):
    """A listening address cannot be bound (in use, not ours, not an address here)."""


class AlreadyRunning(InputError):
    """A gateway already runs on this state dir."""



# ---------------------------------------------------------------------------------------------
# listening sockets


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=reuse_port)


def _bind_error(source: Any, w: Wanted, e: OSError) -> BindError:
    hint = {errno.EADDRINUSE: " (another process listens there)",
            errno.EACCES: " (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: " (not an address of this machine)"}.get(e.errno or 0, "")
    return BindError(f"{source}: {w.field}: cannot listen on {w.address}: {e.strerror or e}{hint}")


class ListenSockets:
    """Every listening socket of a gateway: address -> {worker index: socket}. The primary holds
    them all (one per worker for SO_REUSEPORT listeners, so it can hand them over, and to each
    worker its own); a worker holds those of its index. The primary binds index 0 (the check
    that every address is free); a worker binds its own as it starts, so nothing queues on a
    socket nobody accepts from yet, and sends them to its primary when it is ready (`adopt`).
    In a takeover the new workers get the old workers' sockets instead (`held`)."""

    def __init__(self, wanted: tuple[Wanted, ...],
                 socks: dict[str, dict[int, socket.socket]]) -> None:
        self.wanted = {w.address: w for w in wanted}
        self.socks = socks

    @classmethod
    def bind(cls, wanted: tuple[Wanted, ...], source: Any) -> ListenSockets:
        """Index 0 of every address (the primary's)."""
        out = cls(wanted, {})
        try:
            for w in wanted:
                out.add(w, [0], source)
        except BaseException:
            out.close()
            raise
        return out

    def add(self, w: Wanted, indexes: Any, source: Any) -> None:
        for i in indexes:
            try:
                sock = _listen(w.host, w.port, w.count > 1)
            except OSError as e:
                raise _bind_error(source, w, e) from None
            self.socks.setdefault(w.address, {})[i] = sock

    def open(self, w: Wanted, index: int, source: Any) -> socket.socket:
        """Bind `w` for worker `index` now (a reload added it); BindError if it cannot be."""
        self.wanted[w.address] = w
        self.add(w, [index], source)
        return self.socks[w.address][index]

    def remove(self, address: str) -> None:
        """Close every copy of `address` this process holds (a reload removed it): a copy left
        open would keep the kernel queueing connections there that nobody accepts."""
        self.wanted.pop(address, None)
        for s in self.socks.pop(address, {}).values():
            s.close()

    @classmethod
    def for_worker(cls, wanted: tuple[Wanted, ...], fds: Mapping[str, int], worker: int,
                   source: Any) -> ListenSockets:
        """A worker's sockets: those its primary passed (address -> fd), the rest bound here."""
        out = cls(wanted, {})
        try:
            for w in wanted:
                if worker >= w.count:
                    continue
                fd = fds.get(w.address)
                if fd is not None:
                    out.socks[w.address] = {worker: socket.socket(fileno=fd)}
                else:
                    out.add(w, [worker], source)
        except BaseException:
            out.close()
            raise
        return out

    def get(self, address: str, index: int = 0) -> socket.socket:
        return self.socks[address][index]

    def held(self, index: int) -> dict[str, socket.socket]:
        """The sockets of worker `index` this process holds (address -> socket)."""
        return {a: d[index] for a, d in self.socks.items() if index in d}

    def adopt(self, index: int, socks: Mapping[str, socket.socket]) -> None:
        """Hold worker `index`'s sockets (as it reported them); drop those no longer wanted."""
        for address, sock in socks.items():
            if address not in self.wanted:
                sock.close()
                continue
            old = self.socks.setdefault(address, {}).get(index)
            if old is not None and old is not sock:
                old.close()
            self.socks[address][index] = sock

    def drop(self, index: int) -> None:
        """Close worker `index`'s sockets (it died: what was queued on them goes with them)."""
        for d in self.socks.values():
            if index in d:
                d.pop(index).close()

    def offer(self) -> list[tuple[str, int, socket.socket]]:
        return [(a, i, s) for a, d in sorted(self.socks.items()) for i, s in sorted(d.items())]

    def close(self) -> None:
        for d in self.socks.values():
            for s in d.values():
                s.close()
        self.socks.clear()


# ---------------------------------------------------------------------------------------------
# the state dir's lock


class StateLock:
    """`STATE/gateway.lock`, flock'ed by the process that writes the state dir (its PID inside).
    Handed over as an fd: the new process shares the same open file, so the lock stays held."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @staticmethod
    def holder(state_dir: Path) -> int | None:
        """PID of the gateway holding the lock (0 if unreadable), or None if nobody does."""
        try:
            fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @classmethod
    def acquire(cls, state_dir: Path, source: Any, wait: float = 0.2) -> StateLock:
        """Take the lock, retrying for `wait` seconds (someone's holder() check holds it for a
        moment; a holder that just died frees it as it exits)."""
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for _ in range(int(wait / 0.05) + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                time.sleep(0.05)
        pid = _read_pid(fd)
        os.close(fd)
        raise already_running(state_dir, pid, source)

    def write_pid(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def already_running(state_dir: Path, pid: int, source: Any) -> AlreadyRunning:
    who = f"pid {pid}" if pid else "pid unknown"
    return AlreadyRunning(f"{state_dir}: a gateway already runs on this state dir ({who}); "
                          "stop it, or replace it without dropping connections: "
                          f"isthmus gateway run --config {source} --takeover")


# ---------------------------------------------------------------------------------------------
# the control socket


@contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A unix socket path under the kernel's 108-byte limit: long ones go through an O_PATH fd
    of the directory (/proc/self/fd/N/name)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def control_socket(state_dir: Path) -> socket.socket:
    """Bind STATE/gateway.sock (the caller holds the lock, so a file there is stale)."""
    path = state_dir / CONTROL_FILE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with short_path(path) as p:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            sock.bind(p)
            os.chmod(p, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_control_socket(state_dir: Path) -> None:
    with short_path(state_dir / CONTROL_FILE) as p:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass

