"""Echo backends of one cluster as a process, for the compose topologies: `isthmus.demo`'s
`Backends` (each connection's line is answered with the cluster's name, so a client sees who
served it), listening on 127.0.0.1 at the given ports until SIGTERM or SIGINT.

Usage: python3 echo_backend.py CLUSTER PORT [PORT...]"""

import asyncio
import signal
import sys

from isthmus.demo import Backends


async def serve(cluster: str, ports: list[int]) -> None:
    backends = Backends(cluster, ports)
    await backends.start()
    print(f"echo backends of {cluster!r} on 127.0.0.1 ports {ports}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backends.stop()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all(a.isdigit() and 0 < int(a) < 65536 for a in argv[1:]):
        print("usage: echo_backend.py CLUSTER PORT [PORT...]", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0], [int(a) for a in argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
