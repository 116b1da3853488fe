"""Network namespaces for tests that need root (WireGuard tunnels): an underlay bridge and one
namespace per gateway, all made by the test and all deleted at the end, even on failure.

    with Underlay("t1", ["east-1", "east-2"]) as net:   # needs root
        ns = net.ns["east-1"]          # Netns: name, address (10.77.0.x on the underlay)
        ns.cmd(["python", "-m", ...])  # the argv that runs it inside the namespace
        await ns.request(port, "ping") # a TCP request from inside the namespace
        net.ul                          # the bridge namespace (federation, captures)

Layout: namespace `<tag>-ul` holds bridge `br0` with 10.77.0.1/24; namespace `<tag>-<i>` per
gateway holds `eth0` 10.77.0.<10+i>/24, a veth whose other end is on br0, and `lo`. Nothing is
added to the test's own namespace. A socket "from inside" a namespace is made by a thread that
enters it (setns), creates the socket and leaves: the socket stays in that namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_setns_lock = threading.Lock()


def can_make_namespaces() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    r = subprocess.run(["ip", "netns", "add", "isthmus-probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "isthmus-probe"], capture_output=True)
    return True, ""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Netns:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, **kw)

    def connect(self, host: str, port: int, timeout: float = 3.0,
                kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket made in this namespace and connected to host:port (blocking; run it in a
        thread)."""
        with _setns_lock:  # one thread at a time moves between namespaces
            here = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
            there = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(there)
                try:
                    s = socket.socket(socket.AF_INET, kind)
                finally:
                    _setns(here)
            finally:
                os.close(here)
                os.close(there)
        try:
            s.settimeout(timeout)
            s.connect((host, port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    async def open(self, port: int, host: str = "127.0.0.1", timeout: float = 3.0
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        s = await asyncio.to_thread(self.connect, host, port, timeout)
        return await asyncio.open_connection(sock=s)

    async def request(self, port: int, line: str = "ping", timeout: float = 3.0,
                      host: str = "127.0.0.1") -> str:
        """One connection: send a line, read the reply line (stripped)."""
        reader, writer = await asyncio.wait_for(self.open(port, host, timeout), timeout)
        try:
            writer.write(line.encode() + b"\n")
            reply = await asyncio.wait_for(reader.readline(), timeout)
            if not reply:
                raise ConnectionError("closed without a reply")
            return reply.decode().strip()
        finally:
            writer.transport.abort()

    async def http_json(self, port: int, path: str, timeout: float = 3.0) -> Any:
        reader, writer = await asyncio.wait_for(self.open(port, timeout=timeout), timeout)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.transport.abort()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"GET {path} in {self.name}: {head[:200]!r}")
        return json.loads(body)


class Underlay:
    """A bridge namespace and one namespace per name (module docstring)."""

    def __init__(self, tag: str, names: list[str]) -> None:
        self.tag = tag
        self.names = names
        self.ul = Netns(f"{tag}-ul", "10.77.0.1")
        self.ns = {n: Netns(f"{tag}-{i}", f"10.77.0.{10 + i}") for i, n in enumerate(names)}
        self.made: list[str] = []

    def __enter__(self) -> Underlay:
        try:
            self._make()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def _make(self) -> None:
        ul = self.ul.name
        _ip("netns", "add", ul)
        self.made.append(ul)
        _ip("link", "set", "lo", "up", ns=ul)
        _ip("link", "add", "br0", "type", "bridge", ns=ul)
        _ip("addr", "add", "10.77.0.1/24", "dev", "br0", ns=ul)
        _ip("link", "set", "br0", "up", ns=ul)
        for i, n in enumerate(self.names):
            ns = self.ns[n].name
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
            peer = f"{self.tag[:8]}v{i}"
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", peer, ns=ns)
            _ip("link", "set", peer, "netns", ul, ns=ns)
            _ip("addr", "add", f"{self.ns[n].address}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", peer, "master", "br0", ns=ul)
            _ip("link", "set", peer, "up", ns=ul)

    def delete(self) -> None:
        for ns in reversed(self.made):  # its processes were stopped by PID before
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


def capture(ns: Netns, interface: str, path: Path) -> subprocess.Popen:
    """tcpdump on `interface` in `ns` into `path` (pcap) until stopped by PID."""
    return subprocess.Popen(ns.cmd(["tcpdump", "-i", interface, "-n", "-U", "-w", str(path)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_capture(path: Path) -> list[str]:
    r = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True)
    return r.stdout.splitlines()
