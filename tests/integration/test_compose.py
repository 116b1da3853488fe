"""compose/demo.yaml for real, with podman-compose: build (cached) -> up -> traffic through
edge-1 while us-east's echo backends stop and come back -> a blackhole drill of us-east run
inside the federation's container -> a gateway and the federation stopped (each must exit 0 on
its stop signal; the gateway drains) -> down -v, which must leave no container and no volume.

Ports are the compose file's own (the demo's numbering + 50); the test fails at once, naming the
port, when something already listens on one (say `podman-compose -f compose/demo.yaml up` left
running by hand). The project name is the test's own, so a user's `isthmus-demo` volumes are
never touched. Every step is bounded; the times of each step are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import pytest

from isthmus import demo
from tests.deploy.podman import ROOT, image, logs, podman, require
from tests.helpers.traffic import LoadStream, http_json, request, wait_for

pytestmark = pytest.mark.integration

OFFSET = 50  # compose/demo.yaml's ports: the demo's numbering + 50
PROJECT = "isthmus-compose-test"
COMPOSE_FILE = ROOT / "compose" / "demo.yaml"
EDGE = len(demo.ALL_CLUSTERS) - 1
EDGE_IMPORT = demo.ports(OFFSET, EDGE)["import"]
EDGE_ADMIN = demo.ports(OFFSET, EDGE)["admin"]
US_EAST = {"east-1", "east-2"}


def compose(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "podman_compose", "-p", PROJECT,
                           "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"podman-compose {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stderr[-2000:]}")
    return done


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def project_leftovers() -> list[str]:
    label = f"label=io.podman.compose.project={PROJECT}"
    return (podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()
            + podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").split())


async def served(port: int) -> str | None:
    try:
        return await request(port, "hello", timeout=2)
    except (OSError, TimeoutError):
        return None


@pytest.mark.timeout(420)
async def test_demo_topology_up_failover_drill_down():
    require("podman_compose")
    times: dict[str, float] = {}
    started = time.monotonic()
    report = await asyncio.to_thread(image)
    times["build"] = time.monotonic() - started
    ports = [demo.FED_PORT + OFFSET, demo.FED_ADMIN + OFFSET] + [
        p for i in range(len(demo.ALL_CLUSTERS)) for p in demo.ports(OFFSET, i).values()]
    busy = [p for p in ports if listening(p)]
    assert not busy, f"ports of compose/demo.yaml already in use: {busy}"
    assert not project_leftovers(), f"project {PROJECT} left over from an earlier run"

    try:
        t = time.monotonic()
        await asyncio.to_thread(compose, "up", "-d")
        await wait_for(lambda: _edge_ready(), 90, interval=0.5,
                       what="edge-1 to see 4 live clusters and reach us-east")
        times["up"] = time.monotonic() - t

        # traffic through edge-1 while us-east's backends stop, then come back
        t = time.monotonic()
        stream = LoadStream(EDGE_IMPORT, rate=20, max_seconds=45).start()
        await asyncio.sleep(2)
        stopping = time.monotonic()
        await asyncio.to_thread(compose, "stop", "echo-east-1", "echo-east-2")
        stopped = time.monotonic()
        await wait_for(lambda: _served_by(stream, {"west-1"}, stopped), 15,
                       what="edge-1's traffic to move to west-1")
        await asyncio.to_thread(compose, "start", "echo-east-1", "echo-east-2")
        restarted = time.monotonic()
        await wait_for(lambda: _served_by(stream, US_EAST, restarted), 20,
                       what="edge-1's traffic to come back to us-east")
        await asyncio.sleep(1)
        await stream.stop()
        times["failover"] = time.monotonic() - t
        after_stop = [c for c in stream.failed if c.started > stopped]
        assert not after_stop, f"new connections failed after us-east stopped: {after_stop[:3]}"
        before = {c.reply for c in stream.done() if c.ended < stopping and c.reply}
        assert before and before <= US_EAST, f"before the stop, served by {before}"

        # a drill, run where the operator credentials are: in the federation's container
        t = time.monotonic()
        drill = await asyncio.to_thread(
            compose, "exec", "-T", "federation", "isthmus", "drill", "run", "--region",
            "us-east", "--mode", "blackhole", "--duration", "4s", "--baseline", "1s",
            "--settle", "3s", "--json", "--federation",
            f"https://127.0.0.1:{demo.FED_PORT + OFFSET}",
            "--credentials", "/var/lib/isthmus/operator", timeout=60)
        result = json.loads(drill.stdout)
        times["drill"] = time.monotonic() - t
        assert result["state"] == "ended", result["end_reason"]
        assert result["shift_s"] is not None, "the drill never moved traffic out of us-east"
        assert not result["flapped"]

        # stop signals: a gateway drains (SIGQUIT) and the federation stops (SIGTERM), exit 0
        t = time.monotonic()
        await asyncio.to_thread(compose, "stop", "east-1", "federation")
        times["stop"] = time.monotonic() - t
        for service in ("east-1", "federation"):
            container = f"{PROJECT}_{service}_1"
            code = podman("inspect", container, "--format", "{{.State.ExitCode}}").strip()
            assert code == "0", f"{service} exited {code} on its stop signal"
        assert "draining: accepting no more" in logs(f"{PROJECT}_east-1_1")
    finally:
        t = time.monotonic()
        await asyncio.to_thread(compose, "down", "-v")
        times["down"] = time.monotonic() - t
        print(f"compose test times (s): {', '.join(f'{k} {v:.1f}' for k, v in times.items())}; "
              f"{'; '.join(report)}")
    assert not project_leftovers(), "down -v left containers or volumes behind"
    assert not [p for p in ports if listening(p)], "something still listens after down"


async def _edge_ready() -> bool:
    status = await http_json(EDGE_ADMIN, "/status")
    return (len(status["catalog"]["live"]) == len(demo.ALL_CLUSTERS)
            and await served(EDGE_IMPORT) in US_EAST)


def _served_by(stream: LoadStream, clusters: set[str], since: float) -> bool:
    """The last three connections that began after `since` were all served by `clusters`."""
    recent = [c for c in stream.done() if c.started > since][-3:]
    return len(recent) == 3 and all(c.reply in clusters for c in recent)
