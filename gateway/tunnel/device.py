"""The gateway's WireGuard interface: a wireguard-go process it owns, configured over UAPI,
with addresses and routes set through pyroute2 (netlink).

The kernel module is used by nothing here: these machines have none (PLATFORM-NOTES), and
wireguard-go is the same protocol in userspace. The device

- starts `wireguard-go -f <interface>` (foreground, so the gateway holds its PID), waits for
  its UAPI socket, sets the private key and listen port, the interface's overlay address (/32)
  and MTU, brings it up, and sets every peer with a route to its overlay address;
- keeps the peers equal to what the catalog says (`set_peers`, from core/tunnel_peers.py):
  only the peers that changed are touched (a re-set peer would lose its session);
- is supervised: once a second it reads the device's state (handshakes, bytes) for /status and
  /metrics and, if the process died, starts it again with everything set as before (each
  restart counted, backoff 0.5 s doubling to 10 s);
- on close stops the process by PID and deletes the interface if it is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.core.tunnel_peers import Peer, peer_changes
from gateway.tunnel.keys import KeyPair, b64_to_hex
from gateway.tunnel.uapi import DeviceState, TunnelError, get_state, set_config, socket_path

log = logging.getLogger("isthmus.gateway.tunnel")

MTU = 1420  # 1500 underlay - 80 (IPv6 + UDP + WireGuard overhead)
KEEPALIVE = 10  # seconds: peers handshake and NAT mappings stay open without traffic
START_TIMEOUT = 5.0


@dataclass
class DeviceStats:
    restarts: int = 0
    failures: int = 0  # UAPI or netlink operations that failed
    started_at: float = 0.0
    state: DeviceState = field(default_factory=DeviceState)


class WireguardDevice:
    def __init__(self, interface: str, listen_port: int, keys: KeyPair,
                 binary: str = "wireguard-go") -> None:
        self.interface = interface
        self.listen_port = listen_port
        self.keys = keys
        self.binary = binary
        self.proc: asyncio.subprocess.Process | None = None
        self.peers: dict[str, Peer] = {}  # what the device holds now, by public key
        self.address = ""  # our overlay address, once the federation gave it
        self.stats = DeviceStats()
        self._lock = asyncio.Lock()  # one reconfiguration at a time
        self._closing = False
        # False while a restart hands the cluster to a new process, which takes the interface
        # over (its wireguard-go replaces ours): ours is not started again then.
        self.restart_on_exit = True

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        await asyncio.to_thread(_delete_link, self.interface)  # a leftover of a crashed run
        sock = socket_path(self.interface)
        if sock.exists():
            sock.unlink()
        env = {**os.environ, "LOG_LEVEL": "error", "WG_PROCESS_FOREGROUND": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-f", self.interface, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise TunnelError(f"{self.binary} -f {self.interface} did not start (exit "
                                  f"{self.proc.returncode}); is the tun module loaded and are "
                                  "we root (CAP_NET_ADMIN)?")
            await asyncio.sleep(0.02)
        self.stats.started_at = time.time()
        await set_config(self.interface, [f"private_key={self.keys.private.hex()}",
                                          f"listen_port={self.listen_port}",
                                          "replace_peers=true"])
        await asyncio.to_thread(_link_up, self.interface, MTU)
        held, self.peers = self.peers, {}
        if self.address:
            await asyncio.to_thread(_set_address, self.interface, self.address)
        await self._apply(held)
        log.info("tunnel %s up (wireguard-go pid %d, port %d, public key %s…, %d peer(s))",
                 self.interface, self.proc.pid, self.listen_port, self.keys.public_b64[:8],
                 len(self.peers))

    async def close(self) -> None:
        """Stop our wireguard-go (its interface goes with it). If it is gone already (a new
        process took the interface over in a restart), the interface is not ours to delete."""
        self._closing = True
        p = self.proc
        if p is None or p.returncode is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), 5.0)
        except TimeoutError:
            p.kill()
            await p.wait()
        await asyncio.to_thread(_delete_link, self.interface)

    async def supervise(self) -> None:
        """Once a second: read the state; restart a dead process (with backoff)."""
        backoff = 0.5
        while not self._closing:
            await asyncio.sleep(1.0)
            p = self.proc
            if p is not None and p.returncode is not None and not self._closing \
                    and self.restart_on_exit:
                self.stats.restarts += 1
                log.warning("tunnel %s: wireguard-go (pid %d) exited with %s; restarting "
                            "(restart %d)", self.interface, p.pid, p.returncode,
                            self.stats.restarts)
                try:
                    async with self._lock:
                        await self._start()
                    backoff = 0.5
                except (TunnelError, OSError) as e:
                    self.stats.failures += 1
                    log.error("tunnel %s: restart failed: %s (next try in %.1fs)",
                              self.interface, e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(10.0, backoff * 2)
                continue
            try:
                self.stats.state = await get_state(self.interface)
            except (TunnelError, OSError):
                self.stats.failures += 1

    # -- configuration -------------------------------------------------------------------------
    async def set_address(self, address: str) -> None:
        if address == self.address:
            return
        async with self._lock:
            old, self.address = self.address, address
            await asyncio.to_thread(_set_address, self.interface, address, old)
            log.info("tunnel %s: overlay address %s", self.interface, address)

    async def set_peers(self, wanted: dict[str, Peer]) -> None:
        async with self._lock:
            await self._apply(wanted)

    async def _apply(self, wanted: dict[str, Peer]) -> None:
        upsert, remove = peer_changes(self.peers, wanted)
        if not upsert and not remove:
            return
        lines: list[str] = []
        for p in remove:
            lines += [f"public_key={b64_to_hex(p.public_key)}", "remove=true"]
        # Removals first (an old key's allowed IP is free before the new key takes it), then
        # unrouted next keys, then routed peers: one transaction, applied in order.
        for p in sorted(upsert, key=lambda x: x.routed):
            lines += [f"public_key={b64_to_hex(p.public_key)}", f"endpoint={p.endpoint}",
                      f"persistent_keepalive_interval={KEEPALIVE}", "replace_allowed_ips=true"]
            if p.routed:
                lines.append(f"allowed_ip={p.allowed_ip}")
        routed = {p.allowed_ip for p in wanted.values() if p.routed}
        try:
            await set_config(self.interface, lines)
            await asyncio.to_thread(_routes, self.interface,
                                    [p.allowed_ip for p in upsert if p.routed],
                                    [p.allowed_ip for p in remove if p.allowed_ip not in routed])
        except (TunnelError, OSError) as e:
            self.stats.failures += 1
            log.warning("tunnel %s: setting peers failed (%s); retried on the next catalog",
                        self.interface, e)
            return
        self.peers = dict(wanted)
        for p in remove:
            log.info("tunnel %s: peer %s (%s…) removed", self.interface, p.cluster,
                     p.public_key[:8])
        for p in upsert:
            log.info("tunnel %s: peer %s (%s…) at %s, overlay %s", self.interface, p.cluster,
                     p.public_key[:8], p.endpoint, p.overlay_address)

    async def set_key(self, keys: KeyPair) -> None:
        """Switch to another private key (a rotation); sessions handshake again at once."""
        async with self._lock:
            await set_config(self.interface, [f"private_key={keys.private.hex()}"])
            self.keys = keys

    def describe(self, now: float) -> dict[str, Any]:
        st = self.stats.state
        peers = []
        for p in sorted((p for p in self.peers.values() if p.routed), key=lambda x: x.cluster):
            got = st.peers.get(b64_to_hex(p.public_key))
            hs = got.last_handshake if got else 0.0
            peers.append({
                "cluster": p.cluster, "public_key": p.public_key[:8] + "…",
                "endpoint": (got.endpoint if got and got.endpoint else p.endpoint),
                "overlay_address": p.overlay_address,
                "latest_handshake": hs or None,
                "handshake_age_seconds": round(now - hs, 1) if hs else None,
                "rx_bytes": got.rx_bytes if got else 0, "tx_bytes": got.tx_bytes if got else 0,
            })
        return {"interface": self.interface, "public_key": self.keys.public_b64[:8] + "…",
                "listen_port": self.listen_port, "overlay_address": self.address or None,
                "pid": self.proc.pid if self.proc and self.proc.returncode is None else None,
                "restarts": self.stats.restarts, "failures": self.stats.failures,
                "peers": peers}


# -- netlink (pyroute2), run in a thread: each call is a few syscalls --------------------------

@contextlib.contextmanager
def _netlink() -> Iterator[Any]:
    """A pyroute2 IPRoute on a plain asyncio loop of this thread (pyroute2 runs its sockets on
    an event loop, and uvloop, the gateway's policy, cannot carry netlink sockets)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    loop = asyncio.SelectorEventLoop()
    try:
        with IPRoute(use_event_loop=loop) as ipr:
            yield ipr
    except NetlinkError as e:  # one error type for the callers: the device's
        raise TunnelError(f"netlink: {e}") from None
    finally:
        loop.close()


def _index(ipr: Any, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise TunnelError(f"interface {interface} not found")
    return found[0]


def _link_up(interface: str, mtu: int) -> None:
    with _netlink() as ipr:
        ipr.link("set", index=_index(ipr, interface), state="up", mtu=mtu)


def _set_address(interface: str, address: str, old: str = "") -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    bits = 128 if ":" in address else 32
    with _netlink() as ipr:
        idx = _index(ipr, interface)
        if old:
            try:
                ipr.addr("del", index=idx, address=old, prefixlen=128 if ":" in old else 32)
            except NetlinkError:
                pass
        try:
            ipr.addr("add", index=idx, address=address, prefixlen=bits)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def _routes(interface: str, add: list[str], remove: list[str]) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with _netlink() as ipr:
        idx = _index(ipr, interface)
        for dst in add:
            ipr.route("replace", dst=dst, oif=idx)
        for dst in remove:
            try:
                ipr.route("del", dst=dst, oif=idx)
            except NetlinkError:
                pass


def _delete_link(interface: str) -> None:
    with _netlink() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if found:
            ipr.link("del", index=found[0])
