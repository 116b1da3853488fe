"""HTTP backends for integration tests: aiohttp servers on the test's event loop that answer
every request with JSON describing it, so a test sees what the gateway sent.

    {"cluster": "east-1", "name": "web-v1", "method": "GET", "path": "/api/x",
     "query": "a=1", "headers": {"host": "...", "traceparent": "...", ...}, "body_bytes": 0}

`GET /healthz` answers 200 (the gateways' HTTP health checks). A request with header
`x-status: N` gets status N; `x-sleep: S` waits S seconds first; `x-big: N` gets an N-byte body
streamed in chunks (a chunked response). A backend made with `fail_with=N` answers every
request but its health check with status N (a failing endpoint that still looks alive). The
JSON names the body too (`body`: its first 4 KiB as text). `stop()` closes the listening
socket and every open connection; `start()` again serves on the same port.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class HttpBackend:
    def __init__(self, cluster: str, name: str, port: int, fail_with: int | None = None) -> None:
        self.fail_with = fail_with
        self.cluster = cluster
        self.name = name
        self.port = port
        self.served = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _any(self, req: web.Request) -> web.StreamResponse:
        if req.path == "/healthz":
            return web.Response(text="ok")
        self.served += 1
        body = await req.read()
        if "x-sleep" in req.headers:
            await asyncio.sleep(float(req.headers["x-sleep"]))
        info = {"cluster": self.cluster, "name": self.name, "method": req.method,
                "path": req.path, "raw_path": req.raw_path, "query": req.query_string,
                "headers": {k.lower(): v for k, v in req.headers.items()},
                "body_bytes": len(body), "body": body[:4096].decode("utf-8", "replace")}
        if "x-big" in req.headers:
            resp = web.StreamResponse(headers={"x-cluster": self.cluster})
            await resp.prepare(req)
            left = int(req.headers["x-big"])
            while left > 0:
                n = min(left, 65536)
                await resp.write(b"x" * n)
                left -= n
            await resp.write_eof()
            return resp
        status = self.fail_with or int(req.headers.get("x-status", "200"))
        return web.Response(status=status, text=json.dumps(info),
                            content_type="application/json", headers={"x-cluster": self.cluster})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
