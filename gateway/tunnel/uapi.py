"""The WireGuard cross-platform userspace API (UAPI): the text protocol wireguard-go serves on
`/var/run/wireguard/<interface>.sock` (https://www.wireguard.com/xplatform/).

    set=1\\n key=value\\n ... \\n\\n    ->  errno=0\\n\\n
    get=1\\n\\n                      ->  key=value\\n ... errno=0\\n\\n

Keys are hex in this protocol (base64 elsewhere). Requests and answers are bounded in size and
time; an errno other than 0 is a TunnelError naming the operation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import GatewayError

SOCKET_DIR = Path("/var/run/wireguard")
MAX_ANSWER = 1 << 20  # a get of a few hundred peers is tens of KiB
TIMEOUT = 5.0


class TunnelError(GatewayError):
    """The WireGuard device refused or did not answer a request."""


@dataclass
class PeerState:
    public_key_hex: str
    endpoint: str = ""
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake: float = 0.0  # epoch seconds, 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class DeviceState:
    listen_port: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)  # by public key (hex)


def socket_path(interface: str) -> Path:
    return SOCKET_DIR / f"{interface}.sock"


async def _call(interface: str, request: str) -> list[str]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(socket_path(interface))), TIMEOUT)
    try:
        writer.write(request.encode())
        await writer.drain()
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_ANSWER:
                raise TunnelError(f"{interface}: UAPI answer larger than {MAX_ANSWER} bytes")
    finally:
        writer.close()
    lines = data.decode(errors="replace").strip("\n").split("\n")
    errno = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("errno=")), None)
    if errno != "0":
        raise TunnelError(f"{interface}: UAPI {request.split(chr(10), 1)[0]} failed "
                          f"(errno={errno})")
    return lines


async def set_config(interface: str, lines: list[str]) -> None:
    """One `set` transaction (lines like `private_key=<hex>`, `public_key=<hex>` ...)."""
    await _call(interface, "set=1\n" + "".join(f"{ln}\n" for ln in lines) + "\n")


async def get_state(interface: str) -> DeviceState:
    state, peer = DeviceState(), None
    for line in await _call(interface, "get=1\n\n"):
        key, _, value = line.partition("=")
        if key == "listen_port":
            state.listen_port = int(value)
        elif key == "public_key":
            peer = state.peers[value] = PeerState(value)
        elif peer is None:
            continue
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake += int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake += int(value) / 1e9
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return state
