"""`isthmus status` as a real process against a real HTTP admin endpoint on loopback: piped, it
prints every value in full (no "…"); it finds the federation by --admin (URL or host:port) or
$ISTHMUS_FEDERATION_ADMIN."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aiohttp import web

LONG_TD = "a-very-long-trust-domain-name-that-does-not-fit.example.isthmus.local"
ENDPOINTS = [f"10.20.30.{i}:18080" for i in range(1, 13)]
STATUS = {
    "revision": 42,
    "clusters": {
        "east-1": {"region": "us-east", "zone": "a", "gateway_address": "gw-east-1.example:15443",
                   "trust_domain": LONG_TD, "live": True, "lease_age_seconds": 1.5},
    },
    "services": {
        "default/echo": {"east-1": [{"address": a, "healthy": i % 3 != 0}
                                    for i, a in enumerate(ENDPOINTS)]},
    },
}


@pytest.fixture
async def admin():
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(STATUS)

    app = web.Application()
    app.router.add_get("/status", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        await runner.cleanup()


async def status(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    unset = ("COLUMNS", "ISTHMUS_FEDERATION_ADMIN")
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "isthmus.cli", "status", *args, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("columns", [None, "60"])
async def test_piped_status_prints_every_value_in_full(admin, columns):
    rc, out, err = await status("--admin", f"http://127.0.0.1:{admin}",
                                env={"COLUMNS": columns} if columns else None)
    assert rc == 0, err
    assert "…" not in out
    assert LONG_TD in out and "gw-east-1.example:15443" in out
    row = next(line for line in out.splitlines() if "default/echo" in line)
    want = " ".join(f"{a}{'' if i % 3 else '(down)'}" for i, a in enumerate(ENDPOINTS))
    assert want in row and "8/12" in row  # one line per row, nothing wrapped


async def test_status_finds_the_federation_by_host_port_or_environment(admin):
    rc, out, err = await status("--admin", f"127.0.0.1:{admin}")
    assert rc == 0 and "catalog revision 42" in out, err
    rc, out, err = await status(env={"ISTHMUS_FEDERATION_ADMIN": f"http://127.0.0.1:{admin}"})
    assert rc == 0 and "catalog revision 42" in out, err
    rc, out, err = await status("--json", env={"ISTHMUS_FEDERATION_ADMIN": f"127.0.0.1:{admin}"})
    assert rc == 0 and '"revision": 42' in out, err


async def test_status_of_an_unreachable_federation_exits_1_naming_the_url():
    from tests.helpers.processes import free_port

    port = free_port()
    rc, out, err = await status("--admin", f"127.0.0.1:{port}")
    assert rc == 1 and out == ""
    assert err.startswith(f"isthmus status: cannot reach the federation admin at "
                          f"http://127.0.0.1:{port}/status"), err
