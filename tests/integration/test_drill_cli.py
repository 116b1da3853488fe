"""`isthmus drill ...` end to end on the demo topology (real processes on loopback).

One topology for the module (isthmus.demo.start_topology, port offset 1200): the federation,
east-1 + east-2 (us-east), west-1 (us-west) and edge-1 (eu-west, exports nothing, imports echo
preferring us-east then us-west). Backends run on a loop in a background thread; every process
is stopped by PID at the end (demo.Processes). Drills are short (1 s baseline, 4-5 s fault,
4 s settle) and run one after another (the federation refuses overlaps).

The independent client: while the CLI runs a drill, the test opens its own connections
(20/s) into edge-1's import listener for echo and records, per connection, when it started,
who served it (the echo backends answer with their cluster's name) or that it failed, and how
long it took. It is compared with the report within these stated tolerances:

- success ratio over the fault window: within 5 percentage points of the report's (the probes
  and the client go through the same router, but sample different instants);
- the shift: the client's first fault second served only outside us-east is within 1 s of the
  report's shift_s (whole-second rows on both sides);
- drain: 0 failed on both sides; blackhole: shift_s < 2 s and failed probes ≤ 40 (at most
  one second of all edge-1 + west-1 probes at 20/s).

A few tests at the top drive `run_drill` with a fake client (no processes): Ctrl-C aborts,
an unreachable federation is waited out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from federation.drill_model import Drill
from federation.errors import FederationError
from isthmus import demo
from isthmus.drill import EXIT_FAIL, EXIT_OK, aggregate_seconds, run_drill

OFFSET = 1200
FED_URL = f"https://127.0.0.1:{demo.FED_PORT + OFFSET}"
EDGE = len(demo.CLUSTERS)  # index of edge-1 in ALL_CLUSTERS
EDGE_IMPORT = demo.ports(OFFSET, EDGE)["import"]
EDGE_ADMIN = demo.ports(OFFSET, EDGE)["admin"]
US_EAST = {"east-1", "east-2"}
RATE = 20
SHORT = ["--baseline", "1s", "--settle", "4s"]


# ---------------------------------------------------------------------------------------------
# run_drill with a fake client (no processes)
class FakeClient:
    def __init__(self, now: float, fault: float = 1.0, settle: float = 0.5,
                 unreachable: tuple = ()):
        self.drill = Drill(
            id="d-20261130-120000-ab12", scope_kind="region", scope="us-east", mode="blackhole",
            created_at=now, fault_start=now + 0.5, fault_end=now + 0.5 + fault,
            clusters_in_scope=("east-1",),
            regions={"east-1": "us-east", "edge-1": "eu-west", "west-1": "us-west"},
            services=("default/echo",), settle=settle,
        )
        self.aborts: list[str] = []
        self.unreachable = unreachable  # (from, to) wall-clock window in which get_drill fails
        self.gets = 0

    async def create_drill(self, spec):
        return self.drill

    async def get_drill(self, did):
        self.gets += 1
        if self.unreachable and self.unreachable[0] <= time.time() < self.unreachable[1]:
            raise FederationError(
                f"federation at {FED_URL}: GET /v1/drills/{did}: connection refused")
        return self.drill, []

    async def abort_drill(self, did, reason):
        from dataclasses import replace

        self.aborts.append(reason)
        self.drill = replace(self.drill, state="aborted", ended_at=time.time(), end_reason=reason)
        return self.drill

    async def drill_report(self, did):
        return {"id": did, "state": self.drill.state, "end_reason": self.drill.end_reason,
                "timeline": []}


def _console():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115


async def test_run_drill_sigint_aborts_and_still_reports():
    """Ctrl-C 0.7 s into a 30 s drill aborts it (1 abort, "CLI interrupted"), still reports and
    exits 0 within 5 s."""
    client = FakeClient(time.time(), fault=30.0, settle=0.5)
    loop = asyncio.get_running_loop()
    loop.call_later(0.7, os.kill, os.getpid(), signal.SIGINT)
    t0 = time.monotonic()
    result = await run_drill(client, {}, _console())
    assert client.aborts == ["aborted: CLI interrupted"]
    assert result.report is not None and result.report["state"] == "aborted"
    assert result.code == EXIT_OK
    assert time.monotonic() - t0 < 5, "waited the settle window, not the 30 s fault"


async def test_run_drill_waits_out_an_unreachable_federation():
    """A federation unreachable for 1.2 s of a 1 s drill is waited out: >= 4 polls, a report,
    exit 0."""
    now = time.time()
    client = FakeClient(now, fault=1.0, settle=0.5, unreachable=(now + 0.3, now + 1.5))
    result = await run_drill(client, {}, _console(), handle_sigint=False)
    assert result.report is not None and result.code == EXIT_OK
    assert client.gets >= 4


def test_aggregate_seconds_sums_observers_and_maps_regions():
    """Two observers' samples of one second sum to 40 attempts, 39 ok, 1 failed, p99 400 ms, and
    west-1's 39 are shown as us-west's."""
    d = FakeClient(1000.0).drill
    s = [
        {"cluster": "edge-1", "second": 1001, "services": {"default/echo": {
            "attempts": 20, "successes": 19, "failures": 1, "latency_p99_ms": 400.0,
            "served": {"west-1": 19}}}},
        {"cluster": "west-1", "second": 1001, "services": {"default/echo": {
            "attempts": 20, "successes": 20, "failures": 0, "latency_p99_ms": 2.0,
            "served": {"west-1": 20}}}},
    ]
    line = aggregate_seconds(d, s)[1001]
    assert (line.second, line.attempts, line.successes, line.failures) == (1, 40, 39, 1)
    assert line.by_region == {"us-west": 39} and line.p99_ms == 400.0
    assert "served: us-west 39" in line.text({"us-east"})


# ---------------------------------------------------------------------------------------------
# the topology (module scope, backends on a background loop)
class Topo:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        (state / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = demo.Processes(state / "logs")
        self.backends = {
            name: demo.Backends(name, [demo.ports(OFFSET, i)["ep1"], demo.ports(OFFSET, i)["ep2"]])
            for i, (name, _, _) in enumerate(demo.CLUSTERS)
        }
        self.fed_restarts = 0

    def call(self, coro, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.call(demo.start_topology(self.state, OFFSET, self.procs, self.backends))

    def stop(self) -> None:
        try:
            self.procs.stop()
            for b in self.backends.values():
                self.call(b.stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def restart_federation(self) -> None:
        """SIGTERM the federation by PID, start it again on the same state dir and ports."""
        name, proc = next((n, p) for n, p in self.procs.procs
                          if n.startswith("federation") and p.poll() is None)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        self.procs.procs.remove((name, proc))
        self.fed_restarts += 1
        self.procs.start(f"federation-{self.fed_restarts}", "federation", "serve",
                         "--state-dir", str(self.state / "federation"),
                         "--listen", f"127.0.0.1:{demo.FED_PORT + OFFSET}",
                         "--admin", f"127.0.0.1:{demo.FED_ADMIN + OFFSET}", "--lease-ttl", "3s")

    def logs_tail(self) -> str:
        out = []
        for p in sorted((self.state / "logs").glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    t = Topo(tmp_path_factory.mktemp("drill-topo"))
    try:
        t.start()
        yield t
    finally:
        t.stop()


def cli(topo: Topo, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "isthmus.cli", "drill", *args, "--federation", FED_URL,
         "--credentials", str(topo.state / "federation" / "operator")],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def cli_popen(topo: Topo, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "isthmus.cli", "drill", *args, "--federation", FED_URL,
         "--credentials", str(topo.state / "federation" / "operator")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def wait_quiet(topo: Topo, timeout: float = 40) -> None:
    """Until no drill is running or still observing (a new one would be refused as overlapping)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = cli(topo, "list", "--json")
        if r.returncode == 0:
            drills = json.loads(r.stdout)["drills"]
            busy = [d for d in drills if d["state"] == "running" or
                    time.time() < min(d["fault_end"], d["ended_at"] or d["fault_end"])
                    + d["settle"] + 0.5]
            if not busy:
                return
        time.sleep(0.5)
    raise AssertionError(f"a drill is still running or observing after {timeout}s")


# ---------------------------------------------------------------------------------------------
# the independent client
async def _traffic(port: int, rate: int, seconds: float) -> list[tuple[float, str | None, float]]:
    """(wall-clock start, served-by cluster or None, duration) of each connection."""
    out: list[tuple[float, str | None, float]] = []
    tasks: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()

    async def one() -> None:
        t0, m0 = time.time(), loop.time()
        who = await demo.one_connection(port, timeout=3.0)
        out.append((t0, who, loop.time() - m0))

    end = loop.time() + seconds
    nxt = loop.time()
    while loop.time() < end:
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        nxt += 1 / rate
        await asyncio.sleep(max(0.0, nxt - loop.time()))
    if tasks:
        await asyncio.gather(*tasks)
    return out


def traffic(seconds: float, rate: int = RATE) -> list[tuple[float, str | None, float]]:
    return asyncio.run(_traffic(EDGE_IMPORT, rate, seconds))


def status(port: int) -> dict:
    async def go():
        return await demo.http_json(port, "/status")
    return asyncio.run(go())


def faults_cleared() -> bool:
    """No gateway of us-east is acting out a fault (their own /status)."""
    return all((status(demo.ports(OFFSET, i)["admin"]).get("drills") or {}).get("fault") is None
               for i in (0, 1))


def wait_back_in_scope(bound: float) -> float:
    """Seconds until a whole second of edge-1 connections is served by us-east; fails after
    `bound` (failback = peer probes healthy + failback_after 2 s, or an outlier ejection
    running out: up to max_ejection, 30 s in the demo config)."""
    t0 = time.time()
    while time.time() - t0 < bound:
        conns = traffic(1.0)
        if conns and all(x[1] in US_EAST for x in conns):
            return time.time() - t0 - 1.0
    raise AssertionError(f"edge-1 traffic not back in us-east after {bound}s")


def window(conns, start: float, stop: float):
    return [c for c in conns if start <= c[0] < stop]


def ratio(conns) -> float:
    return sum(1 for c in conns if c[1] is not None) / max(1, len(conns))


def client_shift(conns, fault_start: float, fault_stop: float) -> float | None:
    """First whole fault second (relative) whose connections all succeeded outside us-east."""
    sec = 0
    while fault_start + sec < fault_stop:
        cs = window(conns, fault_start + sec, fault_start + sec + 1)
        if cs and all(c[1] is not None and c[1] not in US_EAST for c in cs):
            return float(sec)
        sec += 1
    return None


def run_with_traffic(topo: Topo, *args: str, extra: float = 0.0):
    """Run `drill run ... --json` while the independent client drives edge-1; (rc, report, conns,
    err)."""
    wait_quiet(topo)
    proc = cli_popen(topo, "run", *args, "--json")
    # baseline + fault + settle + the CLI's tail, from the args
    spec = dict(zip(args[::2], args[1::2], strict=False))
    total = sum(float(spec.get(k, d).rstrip("s"))
                for k, d in (("--baseline", "2s"), ("--duration", "0s"), ("--settle", "5s")))
    conns = traffic(total + 3.5 + extra)  # + the CLI's start and the fault's second rounding
    rc, out, err = finish(proc, 60)
    assert out.strip(), f"rc={rc}\n{err}\n{topo.logs_tail()}"
    return rc, json.loads(out), conns, err


def compare(report: dict, conns) -> dict[str, Any]:
    fs, stop = report["fault_start"], report["fault_stop"]
    fault_conns = window(conns, fs, stop)
    fault_rows = [r for r in report["timeline"] if 0 <= r["t"] < stop - fs]
    att = sum(r["attempts"] for r in fault_rows)
    ok = sum(r["successes"] for r in fault_rows)
    return {
        "client_ratio": ratio(fault_conns),
        "report_ratio": ok / max(1, att),
        "client_failed": sum(1 for c in fault_conns if c[1] is None),
        "client_shift": client_shift(conns, fs, stop),
        "client_n": len(fault_conns),
        "report_attempts": att,
    }


# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_plan_table_json_and_no_target_warning(topo):
    """`drill plan --region us-east` shows edge-1 shifting to us-west (2 healthy endpoints) and
    exits 0; with west-1's backends down too it warns of 2 imports with no target and exits 3."""
    r = cli(topo, "plan", "--region", "us-east")
    assert r.returncode == 0, r.stdout + r.stderr
    edge = next(line for line in r.stdout.splitlines() if "edge-1" in line)
    assert "any:us-east" in edge and "any:us-west" in edge and "shifts" in edge, r.stdout
    j = json.loads(cli(topo, "plan", "--region", "us-east", "--json").stdout)
    rows = {(x["cluster"], x["service"]): x for x in j["imports"]}
    assert rows[("edge-1", "default/echo")]["after"] == {
        "tier": "any:us-west", "clusters": ["west-1"], "healthy_endpoints": 2}
    assert rows[("west-1", "default/echo")]["changed"] is False
    assert j["no_target"] == []
    # west-1's endpoints down: with us-east lost, nobody outside has a healthy echo -> exit 3
    topo.call(topo.backends["west-1"].stop())
    try:
        deadline = time.time() + 10
        while True:
            r = cli(topo, "plan", "--region", "us-east")
            if r.returncode == 3 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert r.returncode == 3, r.stdout + r.stderr
        assert ("WARNING" in r.stderr and "edge-1: default/echo" in r.stderr
                and "west-1: default/echo" in r.stderr)
        assert "NO HEALTHY TARGET" in r.stdout
    finally:
        topo.call(topo.backends["west-1"].start())
    deadline = time.time() + 10
    while cli(topo, "plan", "--region", "us-east").returncode != 0:
        assert time.time() < deadline, "west-1 never healthy again"
        time.sleep(0.3)


@pytest.mark.integration
def test_unknown_region_and_overlap_refused(topo):
    """An unknown region or cluster exits 2 naming the known ones; a drill overlapping a running one
    exits 1 naming it; the first drill still exits 0."""
    r = cli(topo, "run", "--region", "mars", "--mode", "drain", "--duration", "3s")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "mars" in r.stderr and "us-east" in r.stderr and "us-west" in r.stderr, r.stderr
    r = cli(topo, "plan", "--cluster", "nope-1")
    assert r.returncode == 2 and "known clusters" in r.stderr, r.stderr
    wait_quiet(topo)
    first = cli_popen(topo, "run", "--cluster", "west-1", "--mode", "drain", "--duration", "2s",
                      *SHORT, "--json")
    try:
        deadline = time.time() + 10
        while True:
            drills = json.loads(cli(topo, "list", "--json").stdout)["drills"]
            running = [d for d in drills if d["state"] == "running"]
            if running or time.time() > deadline:
                break
            time.sleep(0.2)
        assert running, "the first drill never started"
        r = cli(topo, "run", "--region", "us-east", "--mode", "drain", "--duration", "3s")
        assert r.returncode == 1, r.stdout + r.stderr
        assert running[0]["id"] in r.stderr, r.stderr
    finally:
        rc, out, err = finish(first)
    assert rc == 0, err


@pytest.mark.integration
def test_blackhole_shifts_fast_and_agrees_with_independent_client(topo, tmp_path):
    """A 5 s us-east blackhole under 20 conn/s from edge-1: shift < 2 s, <= 40 failed probes, no
    flap; the client's ok ratio within 5 points and its shift within 1 s of the report's."""
    html = tmp_path / "bh.html"
    rc, rep, conns, err = run_with_traffic(topo, "--region", "us-east", "--mode", "blackhole",
                                           "--duration", "5s", *SHORT, "--report", str(html))
    assert rc == 0, err
    c = compare(rep, conns)
    print(f"\nblackhole: shift {rep['shift_s']} s, detection {rep['detection_s']} s, failed "
          f"during shift {rep['failed_during_shift']}, failback {rep['failback_s']} s, p99 worst "
          f"{rep['p99_ms_worst']} ms; client {c}")
    assert rep["state"] == "ended" and rep["end_reason"] == "deadline"
    assert rep["shift_s"] is not None and rep["shift_s"] < 2.0, rep
    assert rep["failed_during_shift"] <= 40, rep
    assert rep["flapped"] is False
    assert abs(c["client_ratio"] - c["report_ratio"]) <= 0.05, c
    assert c["client_shift"] is not None and abs(c["client_shift"] - rep["shift_s"]) <= 1.0, c
    # after the settle window traffic is back in us-east (failback)
    late = [x for x in conns if x[0] >= rep["fault_stop"] + 4.0]
    assert late and all(x[1] in US_EAST for x in late), late
    assert html.exists() and "<svg" in html.read_text()


@pytest.mark.integration
def test_drain_fails_nothing(topo):
    """A 4 s us-east drain under 20 conn/s from edge-1: 0 failed in the report and at the client, no
    flap, the client's shift within 1 s of the report's."""
    rc, rep, conns, err = run_with_traffic(topo, "--region", "us-east", "--mode", "drain",
                                           "--duration", "4s", *SHORT)
    assert rc == 0, err
    c = compare(rep, conns)
    print(f"\ndrain: shift {rep['shift_s']} s, failed {rep['totals']['failures']}, failback "
          f"{rep['failback_s']} s; client {c}")
    assert rep["totals"]["failures"] == 0, rep["totals"]
    assert c["client_failed"] == 0 and all(x[1] is not None for x in conns), c
    assert rep["shift_s"] is not None and rep["flapped"] is False
    assert c["client_shift"] is not None and abs(c["client_shift"] - rep["shift_s"]) <= 1.0, c


@pytest.mark.integration
def test_abort_on_slo_trips_and_restores(topo):
    """A 300 ms degrade with --abort-on p99>100:2s aborts in < 6 s of fault (exit 1, < 25 s in all);
    afterwards edge-1 is served by us-east again in < 0.2 s per connection."""
    t0 = time.time()
    rc, rep, conns, err = run_with_traffic(topo, "--region", "us-east", "--mode", "degrade",
                                           "--duration", "20s", "--latency", "300ms",
                                           "--abort-on", "p99>100:2s", *SHORT, extra=-15)
    print(f"\nabort-on: {rep['end_reason']} after "
          f"{rep['fault_stop'] - rep['fault_start']:.1f} s of fault")
    assert rc == EXIT_FAIL, err
    assert (rep["state"] == "aborted" and "SLO" in rep["end_reason"]
            and "p99>100" in rep["end_reason"]), rep
    assert rep["fault_stop"] - rep["fault_start"] < 6, rep
    assert time.time() - t0 < 25
    # restored: new connections from edge-1 are served by us-east again, fast
    after = traffic(2.0)
    assert all(x[1] in US_EAST and x[2] < 0.2 for x in after), after


@pytest.mark.integration
def test_cli_killed_mid_drill_gateways_restore_at_deadline(topo):
    """The CLI SIGKILLed 2.5 s into a 4 s blackhole: the fault still holds (edge-1 served only by
    west-1), ends at the deadline by itself, traffic is back in us-east within 35 s."""
    wait_quiet(topo)
    proc = cli_popen(topo, "run", "--region", "us-east", "--mode", "blackhole", "--duration", "4s",
                     *SHORT)
    try:
        time.sleep(2.5)  # inside the fault (baseline ≤ 2 s)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        finish(proc, 10)
    drills = json.loads(cli(topo, "list", "--json").stdout)["drills"]
    d = drills[0]
    assert d["state"] == "running", d
    conns = traffic(max(0.0, d["fault_end"] - time.time()) + 0.5)
    during = window(conns, d["fault_start"] + 1.5, d["fault_end"])
    assert during and all(x[1] == "west-1" for x in during), during
    # restored by themselves
    assert faults_cleared(), "us-east gateways still faulted after the deadline"
    wait_back_in_scope(35)
    print(f"\nCLI killed: edge-1 back in us-east {time.time() - 1.0 - d['fault_end']:.1f}s "
          "after the deadline")
    r = cli(topo, "show", d["id"], "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["state"] == "ended" and rep["end_reason"] == "deadline", rep


@pytest.mark.integration
def test_federation_restarted_mid_drill_ends_safely_and_keeps_record(topo):
    """The federation restarted 2.5 s into a 5 s blackhole: the CLI exits 0 with a report, the
    drill is recorded as ended, faults clear and edge-1 is back in us-east within 35 s."""
    wait_quiet(topo)
    proc = cli_popen(topo, "run", "--region", "us-east", "--mode", "blackhole", "--duration", "5s",
                     *SHORT)
    try:
        time.sleep(2.5)
        topo.restart_federation()
        rc, out, err = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, out + err + topo.logs_tail()
    assert "time to shift" in out
    listed = cli(topo, "list")
    assert listed.returncode == 0, listed.stderr
    drills = json.loads(cli(topo, "list", "--json").stdout)["drills"]
    d = drills[0]
    assert d["state"] == "ended", d
    r = cli(topo, "show", d["id"])
    assert r.returncode == 0 and d["id"] in r.stdout, r.stderr
    # and the gateways are back: faults cleared, edge-1 served by us-east again
    assert faults_cleared()
    wait_back_in_scope(35)


@pytest.mark.integration
def test_degrade_refuses_and_delays_and_agrees_with_independent_client(topo):
    """A 4 s degrade (30% refused, +200 ms) under 20 conn/s from edge-1: 0 failed on both sides,
    ratios within 5 points, traffic moves to west-1, us-east's answers take >= 190 ms.

    Last in the file: refused OPENs eject us-east's gateways (outlier detection, backoff
    doubling up to max_ejection 30 s), which would slow the failback of the drills after it."""
    rc, rep, conns, err = run_with_traffic(topo, "--region", "us-east", "--mode", "degrade",
                                           "--duration", "4s", "--latency", "200ms",
                                           "--error-rate", "0.3", *SHORT)
    assert rc == 0, err
    c = compare(rep, conns)
    print(f"\ndegrade: detection {rep['detection_s']} s, shift {rep['shift_s']} s, "
          f"p99 worst {rep['p99_ms_worst']} ms, ok ratio {c['report_ratio']:.3f}, "
          f"failback {rep['failback_s']} s; client {c}")
    assert rep["by_mode"] == {"mode": "degrade", "latency": 0.2, "error_rate": 0.3}
    # ERR degraded is refused at connect time: the caller fails over, nothing fails
    assert rep["totals"]["failures"] == 0 and c["client_failed"] == 0, (rep["totals"], c)
    assert abs(c["client_ratio"] - c["report_ratio"]) <= 0.05, c
    # both sides saw traffic leave us-east during the fault
    assert rep["detection_s"] is not None
    fault = window(conns, rep["fault_start"] + 0.05, rep["fault_stop"])
    assert any(x[1] == "west-1" for x in fault), fault
    # whatever us-east still served during the fault came with the added latency
    assert all(x[2] >= 0.19 for x in fault if x[1] in US_EAST), [
        x for x in fault if x[1] in US_EAST]
