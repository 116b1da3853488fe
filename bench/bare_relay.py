"""The floor for a Python proxy here: a bare TCP relay on asyncio Protocols and uvloop, with
nothing of a gateway (no routing, failover, limits, timeouts, metrics).

    python -m bench.bare_relay LISTEN_PORT UPSTREAM_PORT

The suite runs it beside the gateway on the proxy core, so a row can say how much of the gap
to HAProxy is Python + uvloop itself and how much is the gateway's own work. Half-close is
forwarded like the gateway does (EOF both ways, then close); bytes that arrive while the
upstream connects are held.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport = None
        self.peer: Side | None = None
        self.held: list[bytes] | None = []
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.held.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True
        if peer.eof:
            return False  # both directions done: close
        if not peer.transport.is_closing():
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.transport.close()

    def join(self, peer: Side) -> None:
        self.peer = peer
        for chunk in self.held or ():
            peer.transport.write(chunk)
        self.held = None
        if self.eof and not peer.transport.is_closing():
            peer.transport.write_eof()


class Accepted(Side):
    upstream = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.dial())

    async def dial(self) -> None:
        try:
            _, up = await asyncio.get_running_loop().create_connection(
                Side, "127.0.0.1", self.upstream
            )
        except OSError:
            self.transport.abort()
            return
        if self.transport.is_closing():
            up.transport.close()
            return
        up.join(self)
        self.join(up)


async def main(listen: int, upstream: int) -> None:
    Accepted.upstream = upstream
    server = await asyncio.get_running_loop().create_server(
        Accepted, "127.0.0.1", listen, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
