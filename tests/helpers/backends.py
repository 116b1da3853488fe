"""Echo backends for integration tests.

Backends (`Backend`) run on the test's event loop. Each connection gets one reply line per line
it sends: the cluster name (mode "echo"), or, in mode "count", nothing until EOF and then
"<cluster> <byte count>"; a connection whose first line is `GET <path> HTTP/1.x` is an HTTP
health check (200 for /healthz, 404 otherwise, then closed). A backend can be
  * stopped  — the listening socket is closed, so connects get a RST (ECONNREFUSED);
  * blackholed — a `listen(0)` socket whose accept queue is filled by idle client connections
    and never accepted: the kernel drops further SYNs, so connects time out with no answer
    (no root needed; `blackhole_times_out()` checks that this holds on the machine);
  * restarted.
`ProcessBackend` is the same Backend in a process of its own (`python -m tests.helpers.backends
backend CLUSTER PORT`), which a test can freeze with SIGSTOP and thaw with SIGCONT by its PID:
the kernel then keeps completing handshakes into its accept queue (backlog 100) while the app
answers nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from tests.helpers.processes import Proc
from tests.helpers.traffic import request, wait_for


class Backend:
    """One endpoint of a service, on the running event loop."""

    def __init__(self, cluster: str, port: int) -> None:
        self.cluster = cluster
        self.port = port
        self.mode = "echo"  # or "count"
        self.state = "down"  # down | up | blackholed
        self.served = 0
        self._server: asyncio.base_events.Server | None = None
        self._listener: socket.socket | None = None
        self._adopted: set[asyncio.Task] = set()
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
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(100)
            sock.setblocking(False)
            self._listener = sock
            self._server = await asyncio.start_server(self._handle, sock=sock)
        self.state = "up"

    restart = start

    def _close_server(self) -> None:
        if self._server is not None:
            self._adopt_queued()
            self._server.close()  # listening socket closed now; open connections keep going
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _adopt_queued(self) -> None:
        """Serve the connections the kernel already completed but the loop has not accepted yet.
        They are open connections (the client's connect succeeded), and closing the listening
        socket would reset them: a stopped backend then fails connections no proxy could move,
        a race with the loop rather than the refusal the tests mean."""
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            task = asyncio.ensure_future(self._serve_adopted(conn))
            self._adopted.add(task)
            task.add_done_callback(self._adopted.discard)

    async def _serve_adopted(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        await self._handle(reader, writer)

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
                         [sys.executable, "-m", "tests.helpers.backends", "backend", cluster,
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


if __name__ == "__main__":  # python -m tests.helpers.backends backend CLUSTER PORT
    if len(sys.argv) != 4 or sys.argv[1] != "backend":
        sys.exit("usage: python -m tests.helpers.backends backend CLUSTER PORT")
    asyncio.run(_serve_backend(sys.argv[2], int(sys.argv[3])))
