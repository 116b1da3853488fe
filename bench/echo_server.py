"""A minimal uvloop echo server for benchmarks: `python -m bench.echo_server PORT [PORT...]`."""

import asyncio
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def main(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(Echo, "127.0.0.1", port, reuse_address=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main([int(p) for p in sys.argv[1:]]))
