"""A gRPC server for tests: `python -m tests.helpers.grpc_echo NAME PORT` answers the unary
method /isthmus.test.Echo/Who with NAME (raw bytes, no protos), on 127.0.0.1:PORT, until
SIGTERM. Also serves plain TCP health checks (a connect is enough)."""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

METHOD = "/isthmus.test.Echo/Who"


def _handler(name: bytes) -> grpc.GenericRpcHandler:
    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return name

    method = grpc.unary_unary_rpc_method_handler(who, request_deserializer=None,
                                                 response_serializer=None)
    return grpc.method_handlers_generic_handler("isthmus.test.Echo", {"Who": method})


async def main(name: str, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(name.encode()),))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
