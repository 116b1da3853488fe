"""`isthmus gateway run --workers N`: extra processes on SO_REUSEPORT listeners, supervised by
the primary (worker 0). Real processes, real sockets; every process is stopped by its PID."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gateway.dataplane import link
from tests.helpers.processes import run_cli
from tests.helpers.traffic import metric_value, request, wait_for
from tests.integration.harness import Topology, running
from tests.integration.test_drill_gateway import link_call, start_drill, wait_until_wall

pytestmark = pytest.mark.integration

IMPORT = 'listener="import default/echo"'


@pytest.fixture
async def topo(tmp_path, request):
    async with running(Topology(tmp_path / "topo", workers={"east-1": 2}), request) as t:
        yield t


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def worker_1(topo: Topology, node: str = "east-1") -> dict:
    rows = (await topo.status(node))["workers"]
    assert [r["worker"] for r in rows] == [0, 1]
    return rows[1]


async def test_workers_share_the_listeners_and_are_restarted_and_stopped(topo: Topology):
    """2 workers share east-1's listeners (80 of 80 served, some by each), a SIGKILLed one is
    restarted once and 40 of 40 are served after; stopping the primary stops both."""
    east1 = topo.nodes["east-1"]
    primary = east1.proc.pid

    async def reporting() -> bool:
        row = await worker_1(topo)
        return row["running"] and row["listeners"] is not None

    await wait_for(reporting, 10, what="worker 1 running and reporting its counters")
    first = (await worker_1(topo))["pid"]
    assert first != primary and not gone(first)

    # The kernel spreads connections over both workers' sockets (by 4-tuple hash); every one
    # is served, by east-1's own backends (the cluster tier).
    async def accepted() -> list[float]:
        text = await topo.metrics("east-1")
        return [
            metric_value(
                text, "isthmus_gateway_connections_accepted_total", f'{IMPORT},worker="{w}"'
            )
            for w in ("0", "1")
        ]

    before = await accepted()
    replies = await asyncio.gather(*(request(east1.import_port, "ping") for _ in range(80)))
    assert set(replies) == {"east-1"}

    async def both_counted() -> bool:  # a worker's counters reach the primary within a second
        got = [after - b for after, b in zip(await accepted(), before, strict=True)]
        return sum(got) == 80 and min(got) > 0

    await wait_for(both_counted, 5, what="80 connections counted, some by each worker")

    # A worker that dies is started again (same index, new pid), and traffic goes on.
    os.kill(first, signal.SIGKILL)

    async def restarted() -> bool:
        row = await worker_1(topo)
        return row["running"] and row["pid"] != first and row["restarts"] == 1

    await wait_for(restarted, 10, what="worker 1 restarted after SIGKILL")
    second = (await worker_1(topo))["pid"]
    replies = await asyncio.gather(*(request(east1.import_port, "ping") for _ in range(40)))
    assert set(replies) == {"east-1"}

    # Stopping the primary stops its workers (by PID, before it exits).
    assert east1.proc.stop() == 0
    assert gone(second)


async def test_a_worker_stops_when_its_primary_is_killed(topo: Topology):
    """A worker stops within 5 s of its primary being SIGKILLed."""
    async def running() -> bool:
        return (await worker_1(topo))["running"]

    await wait_for(running, 10, what="worker 1 running")
    pid = (await worker_1(topo))["pid"]
    topo.nodes["east-1"].proc.kill()  # SIGKILL: the primary cannot stop anything itself
    await wait_for(lambda: gone(pid), 5, what=f"worker pid {pid} to stop after its primary died")


async def test_every_worker_acts_out_a_drill_fault(tmp_path: Path, request):
    """A drain of east-2 with 2 workers: 12 of 12 new links refused (ERR draining), 12 of 12 OK
    after the deadline, links landed on both workers."""
    async with running(Topology(tmp_path / "topo", workers={"east-2": 2}), request) as topo:
        async def reporting() -> bool:
            row = await worker_1(topo, "east-2")
            return row["running"] and row["listeners"] is not None

        await wait_for(reporting, 10, what="east-2's worker 1 running")
        d = await start_drill(topo, mode="drain", duration="3s", settle="0s")
        await wait_until_wall(d.fault_start + 0.3)
        # Each new link lands on one of the two workers (4-tuple hash): all must refuse. A
        # worker ignoring the fault would answer OK to about half of them.
        answers = [
            (await link_call(topo, tmp_path / f"drain{i}", link.OPEN, 2.0))[0] for i in range(12)
        ]
        assert answers == ["ERR draining"] * 12
        await wait_until_wall(d.fault_end + 0.3)
        answers = [
            (await link_call(topo, tmp_path / f"after{i}", link.OPEN, 2.0))[0] for i in range(12)
        ]
        assert answers == ["OK"] * 12

        async def both_workers_had_links() -> bool:  # inbound streams are counted per worker
            text = await topo.metrics("east-2")
            return all(metric_value(text, "isthmus_gateway_connections_accepted_total",
                                    f'listener="inbound",worker="{w}"') > 0 for w in ("0", "1"))

        await wait_for(both_workers_had_links, 5, what="inbound streams on both workers")


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: must be 1..64, got 0"),
    (["--workers", "2", "--worker-index", "2"], "--worker-index: must be 0..1, got 2"),
    (["--workers", "2", "--worker-index", "1"], "--worker-index needs --primary-pid"),
])
def test_bad_worker_arguments_exit_2(tmp_path: Path, args, message):
    """3 bad --workers/--worker-index/--primary-pid combinations each exit 2 naming the flag."""
    topo = Topology(tmp_path / "t")
    r = run_cli("gateway", "run", "--config", str(topo.nodes["east-1"].config), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
