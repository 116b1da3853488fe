"""A proxyless gRPC client for tests: `python -m tests.helpers.grpc_xds_client TARGET` with
GRPC_XDS_BOOTSTRAP_CONFIG set dials `xds:///TARGET` and calls /isthmus.test.Echo/Who every
50 ms (1 s deadline each), printing one line per call: `<monotonic seconds> <reply>` or
`<monotonic seconds> ERR <status code>`, flushed, until SIGTERM or 120 s (bounded)."""

from __future__ import annotations

import signal
import sys
import time

import grpc

from tests.helpers.grpc_echo import METHOD

stopping = False


def _stop(*_: object) -> None:
    global stopping
    stopping = True


def main(target: str) -> None:
    signal.signal(signal.SIGTERM, _stop)
    channel = grpc.insecure_channel(f"xds:///{target}")
    call = channel.unary_unary(METHOD)
    end = time.monotonic() + 120
    while not stopping and time.monotonic() < end:
        t = time.monotonic()
        try:
            reply = call(b"", timeout=1.0).decode()
        except grpc.RpcError as e:
            reply = f"ERR {e.code().name}"
        print(f"{t:.3f} {reply}", flush=True)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
    channel.close()


if __name__ == "__main__":
    main(sys.argv[1])
