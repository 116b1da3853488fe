"""The benchmark suite (issue 4): Isthmus side by side with HAProxy 2.6, in one run.

    python -m bench            # full run, ~15 min; table to stdout and bench/last-run.md
    python -m bench --quick    # smoke: 1 round, 2 s loads, 128 MiB bulk, 5 kills, 1k conns/services
    python -m bench --only l4,cross    # cases: l4 cross bulk failover memory workers tunnel
    python -m bench --only tunnel      # WireGuard+mTLS vs mTLS vs HAProxy chain (root: netns)
    python -m bench --only http        # HTTP import vs HAProxy mode http (and the TLS chain)

Starts on 127.0.0.1, and stops by PID: nginx (backend: 64-byte `/`, a sparse file for bulk),
HAProxy (`mode tcp`, and a TLS 1.3 re-encrypt chain of two HAProxies with client certs both
ways), the demo topology (isthmus.demo.start_topology: federation + 3 gateways, one worker
each, uvloop). nginx's ports are east-2's endpoints; east-1 has none, so east-1's import goes
cross-cluster to east-2 (mTLS), and east-2's import is the local listener path.
Core 0: wrk / curl / bench.loadgen and nginx. Core 1: the proxy under test (all threads of the
gateway processes, both HAProxies). Each round runs every metric on Isthmus, then HAProxy,
then direct; the table shows medians over rounds and Isthmus ÷ HAProxy from the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench import failover, infra, memory, tunnel
from bench import http as http_bench
from bench.report import Results, render
from federation.errors import InputError
from federation.units import parse_int
from isthmus.demo import Processes, ports, start_topology

OFFSET = 8000  # gateway ports 23101..26302 (integration tests use 15xxx-22999; keep below 32768)
HAPROXY_TCP, CHAIN_IN, CHAIN_TLS, BARE_RELAY = 27501, 27511, 27512, 27521
HAPROXY_T1, HAPROXY_T2 = 27531, 27532  # scaling case: nbthread 1 and 2, not pinned
CASES = ("l4", "cross", "bulk", "failover", "memory", "workers", "tunnel", "http")
GiB = 1 << 30


class Suite(Results):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        super().__init__()
        self.args = args
        self.tmp = tmp
        self.nginx_pid: int | None = None  # set by main(); moved to the proxy core for hop latency
        self.last_split = (0.0, 0.0)  # user, system CPU seconds of the last measure()

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -----------------------------------------------------------------------------------------
    def measure(self, pids: list[int], fn):
        """Run fn(); return (its result, CPU % of one core used by pids meanwhile)."""
        s0 = [infra.cpu_split(p) for p in pids]
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        s1 = [infra.cpu_split(p) for p in pids]
        user = sum(b[0] - a[0] for a, b in zip(s0, s1, strict=True))
        system = sum(b[1] - a[1] for a, b in zip(s0, s1, strict=True))
        self.last_split = (user, system)
        return out, 100 * (user + system) / wall

    def http_case(self, case: str, paths: dict[str, tuple[int, list[int]]], fixed_rates: bool,
                  hop_latency: bool = False) -> None:
        a = self.args
        for name, (port, pids) in paths.items():
            r, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 50, a.seconds))
            self.row(case, "keep-alive rps (wrk -c50)", "req/s", True).add(
                name, r.rps, cpu if pids else None)
            self._errors(case, name, "keep-alive", r.errors)
            r, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 50, a.seconds,
                                                                     close=True))
            self.row(case, "new connection per request rps (wrk -c50, Connection: close)",
                     "req/s", True).add(name, r.rps, cpu if pids else None)
            self._errors(case, name, "new-connection", r.errors)
            if pids and r.requests:
                user, system = self.last_split
                self.conn_cost.setdefault((case, name), []).append(
                    (1e6 * user / r.requests, 1e6 * system / r.requests))
            r, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 1, a.seconds))
            self.row(case, "one connection, serial rps (wrk -c1)", "req/s", True).add(
                name, r.rps, cpu if pids else None)
            self.row(case, "one connection p50 (wrk -c1)", "µs", False).add(name, r.p50_us)
            self.row(case, "one connection p99 (wrk -c1)", "µs", False).add(name, r.p99_us)
            self._errors(case, name, "serial", r.errors)
            if hop_latency:
                # The row above has wrk and nginx on core 0 and the proxy on core 1: the direct
                # path crosses no core, a proxied one crosses four times (wrk -> proxy -> nginx
                # and back), so its "added latency" is mostly this VM's cross-core wake-ups.
                # Here nginx moves to the proxy's core: every path crosses twice, and the
                # difference to direct is what the hop itself adds.
                assert self.nginx_pid is not None
                infra.pin(self.nginx_pid, infra.PROXY_CORE)
                try:
                    r = infra.wrk(port, 1, a.seconds)
                finally:
                    infra.pin(self.nginx_pid, infra.LOAD_CORE)
                self.row(case, "one connection p50, nginx on the proxy's core (wrk -c1)", "µs",
                         False).add(name, r.p50_us)
                self.row(case, "one connection p99, nginx on the proxy's core (wrk -c1)", "µs",
                         False).add(name, r.p99_us)
                self._errors(case, name, "serial (nginx on the proxy core)", r.errors)
            if fixed_rates:
                for rate in (1000, 5000):
                    res, cpu = self.measure(
                        pids, lambda port=port, rate=rate: self.loadgen(port, rate))
                    what = f"at fixed {rate // 1000}k rps (bench.loadgen, 20 conns)"
                    self.row(case, f"p50 {what}", "µs", False).add(name, res["p50_us"])
                    self.row(case, f"p99 {what}", "µs", False).add(
                        name, res["p99_us"], cpu if pids else None)
                    self._errors(case, name, f"fixed {rate}", res["errors"])
                    if res["rate"] < 0.95 * rate:
                        self.notes.append(f"{case}/{name}: fixed {rate} rps reached only "
                                          f"{res['rate']:.0f} rps")

    def loadgen(self, port: int, rate: int) -> dict:
        out = subprocess.run(["taskset", "-c", str(infra.LOAD_CORE), sys.executable, "-m",
                              "bench.loadgen", "--port", str(port), "--rate", str(rate),
                              "--seconds", str(self.args.seconds)],
                             capture_output=True, text=True, timeout=self.args.seconds + 30)
        if out.returncode != 0:
            raise RuntimeError(f"bench.loadgen on port {port}: {out.stderr[-1000:]}")
        return json.loads(out.stdout)

    def _errors(self, case: str, path: str, what: str, n: int) -> None:
        if n:
            self.notes.append(f"{case}/{path}: {n} errors in a {what} run")

    def bulk(self, paths: dict[str, tuple[int, list[int]]], case: str) -> None:
        size = self.args.bulk_mib << 20
        for name, (port, pids) in paths.items():
            mbps, cpu = self.measure(pids,
                                     lambda port=port: infra.curl_mbps(port, "/bulk/blob", size))
            self.row(case, f"MB/s, {self.args.bulk_mib} MiB via curl", "MB/s", True).add(
                name, mbps, cpu if pids else None)

    # -----------------------------------------------------------------------------------------
    def run_traffic(self) -> None:
        a = self.args
        state = self.tmp / "topology"
        (state / "logs").mkdir(parents=True)
        e1, e2 = ports(OFFSET, 0), ports(OFFSET, 1)
        procs = Processes(state / "logs")
        certs = infra.make_certs(self.tmp / "certs")
        h_tcp = infra.haproxy_tcp(self.tmp, HAPROXY_TCP, e2["ep1"])
        h_a, h_b = infra.haproxy_chain(self.tmp, CHAIN_IN, CHAIN_TLS, e2["ep1"], certs)
        bare = None
        try:
            bare = subprocess.Popen(["taskset", "-c", str(infra.PROXY_CORE), sys.executable, "-m",
                                     "bench.bare_relay", str(BARE_RELAY), str(e2["ep1"])],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=open(self.tmp / "bare-relay.log", "wb"))
            infra.wait_port(BARE_RELAY)
            h_tcp.start(HAPROXY_TCP)
            h_b.start(CHAIN_TLS)
            h_a.start(CHAIN_IN)
            uvloop.run(start_topology(state, OFFSET, procs, None))
            time.sleep(1.5)  # let east-1's own (absent) endpoints be marked down
            gw = dict(procs.procs)
            for name in ("east-1", "east-2", "west-1", "edge-1"):  # every gateway of the demo
                if name in gw:
                    infra.pin(gw[name].pid, infra.PROXY_CORE)
            infra.pin(gw["federation"].pid, infra.LOAD_CORE)
            self.gateway_pids = {n: p.pid for n, p in gw.items()}
            local = {"Isthmus": (e2["import"], [gw["east-2"].pid]),
                     "HAProxy": (HAPROXY_TCP, [h_tcp.pid]),
                     "direct": (e2["ep1"], []), "bare relay": (BARE_RELAY, [bare.pid])}
            cross = {"Isthmus": (e1["import"], [gw["east-1"].pid, gw["east-2"].pid]),
                     "HAProxy": (CHAIN_IN, [h_a.pid, h_b.pid]), "direct": (e2["ep1"], [])}
            self.check_paths(local, cross)
            if "bulk" in a.only:
                # The blob is a fresh sparse file: the first read of it fills the page cache at
                # ~400 MB/s on nginx's core, so whichever path went first was measured cold
                # (measured: direct 378 MB/s cold, 1734 warm). Read it once, untimed.
                infra.curl_mbps(e2["ep1"], "/bulk/blob", a.bulk_mib << 20)
            for r in range(a.rounds):
                if "l4" in a.only:
                    self.log(f"round {r + 1}/{a.rounds}: L4 local")
                    self.http_case("1. L4 local", local, fixed_rates=True, hop_latency=True)
                if "cross" in a.only:
                    self.log(f"round {r + 1}/{a.rounds}: cross-cluster")
                    self.http_case("2. cross-cluster", cross, fixed_rates=False)
                if "bulk" in a.only:
                    self.log(f"round {r + 1}/{a.rounds}: bulk")
                    self.bulk(local, "3. bulk, local path")
                    self.bulk({k: v for k, v in cross.items() if k != "direct"},
                              "3. bulk, cross-cluster")
                procs.check()
            if a.profile:
                self.profile(e2["import"], e1["import"], gw)
        finally:
            procs.stop()
            for h in (h_a, h_b, h_tcp):
                h.stop()
            if bare is not None:
                infra.stop(bare)

    def run_workers(self) -> None:
        """Scaling, measured apart from the one-worker targets: the local path with east-2 on
        `--workers 2` and west-1 on one worker (same topology, same nginx), HAProxy `nbthread`
        1 and 2. Nothing pinned but the load (wrk and nginx on core 0), so the second worker or
        thread shares core 0 with them: this is what a 2-core machine gives a proxy."""
        a = self.args
        state = self.tmp / "workers"
        (state / "logs").mkdir(parents=True)
        e2, w1 = ports(OFFSET, 1), ports(OFFSET, 2)
        procs = Processes(state / "logs")
        h1 = infra.haproxy_tcp(self.tmp, HAPROXY_T1, e2["ep1"], name="tcp-t1", nbthread=1,
                               pinned=False)
        h2 = infra.haproxy_tcp(self.tmp, HAPROXY_T2, e2["ep1"], name="tcp-t2", nbthread=2,
                               pinned=False)
        try:
            h1.start(HAPROXY_T1)
            h2.start(HAPROXY_T2)
            uvloop.run(start_topology(state, OFFSET, procs, None, workers={"east-2": 2}))
            time.sleep(1.5)
            gw = dict(procs.procs)
            infra.pin(gw["federation"].pid, infra.LOAD_CORE)
            paths = {"Isthmus, 1 worker": (w1["import"], [gw["west-1"].pid]),
                     "Isthmus, 2 workers": (e2["import"], [gw["east-2"].pid,
                                                           *infra.children(gw["east-2"].pid)]),
                     "HAProxy, nbthread 1": (HAPROXY_T1, [h1.pid]),
                     "HAProxy, nbthread 2": (HAPROXY_T2, [h2.pid])}
            self.check_paths(paths)
            for r in range(a.rounds):
                self.log(f"round {r + 1}/{a.rounds}: workers")
                for name, (port, pids) in paths.items():
                    res, cpu = self.measure(pids,
                                            lambda port=port: infra.wrk(port, 50, a.seconds))
                    self.scaling.setdefault(("keep-alive rps (wrk -c50)", name), []).append(
                        (res.rps, cpu))
                    res, cpu = self.measure(
                        pids, lambda port=port: infra.wrk(port, 50, a.seconds, close=True))
                    self.scaling.setdefault(
                        ("new connection per request rps (wrk -c50, Connection: close)", name),
                        []).append((res.rps, cpu))
                procs.check()
        finally:
            procs.stop()
            h1.stop()
            h2.stop()

    def check_paths(self, *cases: dict[str, tuple[int, list[int]]]) -> None:
        """Each path answers a one-second wrk -c1 without errors before anything is measured."""
        for case in cases:
            for name, (port, _) in case.items():
                r = infra.wrk(port, 1, 1)
                if r.requests < 10 or r.errors:
                    raise RuntimeError(f"path {name} (port {port}) does not work: {r}")

    def profile(self, local_port: int, cross_port: int, gw: dict) -> None:
        """py-spy (if installed) on the gateways under keep-alive load: top functions."""
        import shutil

        if shutil.which("py-spy") is None:
            self.notes.append("profile: py-spy not installed (pip install py-spy)")
            return
        runs = (("local keep-alive", local_port, "east-2", False),
                ("local new connections", local_port, "east-2", True),
                ("cross new connections, gateway A", cross_port, "east-1", True),
                ("cross new connections, gateway B", cross_port, "east-2", True))
        for label, port, name, close in runs:
            out = self.tmp / f"profile-{label.replace(' ', '-').replace(',', '')}.txt"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(gw[name].pid),
                                    "--duration", "4", "--rate", "200", "--format", "raw",
                                    "--output", str(out), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            infra.wrk(port, 50, 5, close=close)
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                infra.stop(spy)
            if out.exists():
                self.extra[f"profile {label} ({name})"] = {"top": top_frames(out)}
            else:
                self.notes.append(f"profile {label}: py-spy wrote nothing")


def top_frames(path: Path, n: int = 10) -> list[str]:
    """Leaders by self time and by inclusive time from a py-spy raw (collapsed stacks) file.
    Time spent in C (uvloop, OpenSSL, syscalls) is charged to the Python frame that called it;
    `Runner.run` as a leaf is the event loop itself (uvloop's C code, epoll, socket syscalls)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, num = line.rpartition(" ")
        try:
            k = parse_int(num, "sample count")
        except InputError:
            continue
        frames = [f.split(" (")[0] for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
        total += k
    if not total:
        return ["(no samples)"]
    def top(d: dict[str, int]) -> list[str]:
        rows = [(f, c) for f, c in sorted(d.items(), key=lambda x: -x[1])
                if d is own or c < 0.9 * total]
        return [f"  {c * 100 / total:5.1f}% {f}" for f, c in rows[:n]]

    return ["self:", *top(own), "inclusive (frames under 90%, i.e. below main/Runner.run):",
            *top(incl)]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--only", default=",".join(CASES),
                    help="comma-separated cases: " + " ".join(CASES))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None,
                    help="length of each load run (default 5)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the gateways under load after the rounds")
    ap.add_argument("--output", type=Path, default=Path(__file__).with_name("last-run.md"))
    a = ap.parse_args()
    a.only = set(a.only.split(","))
    unknown = a.only - set(CASES)
    if unknown:
        ap.error(f"--only: unknown case(s) {', '.join(sorted(unknown))}")
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    if not (1 <= a.rounds <= 20 and 1 <= a.seconds <= 60):
        ap.error("--rounds 1..20, --seconds 1..60")
    a.bulk_mib = 128 if a.quick else 1024
    kills = 5 if a.quick else 20
    idle_conns = 1000 if a.quick else 10_000
    services = 1000 if a.quick else 10_000

    infra.require_tools()
    memory.raise_nofile()  # children (nginx, gateways) inherit it
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    suite = Suite(a, tmp)
    started = time.time()
    nginx_ports = [ports(OFFSET, 1)["ep1"], ports(OFFSET, 1)["ep2"], ports(OFFSET, 2)["ep1"],
                   ports(OFFSET, 2)["ep2"], ports(memory.OFFSET, 1)["ep1"],
                   ports(memory.OFFSET, 1)["ep2"]]
    nginx = infra.Nginx(tmp, nginx_ports, bulk_bytes=a.bulk_mib << 20)
    failures: list[str] = []

    def attempt(name: str, step) -> None:
        """One case failing (e.g. a topology that would not start) must not lose the others."""
        try:
            step()
        except Exception as e:  # reported in the table and by the exit code
            failures.append(f"{name}: {type(e).__name__}: {e}")
            suite.log(f"{name} FAILED: {e} (logs kept in {tmp})")

    def fed_memory() -> None:
        suite.extra["federation memory"] = uvloop.run(
            memory.federation_catalog(tmp / "memory-fed", services, suite.log))

    try:
        nginx.start()
        suite.nginx_pid = nginx.proc.pid
        if a.only & {"l4", "cross", "bulk"}:
            attempt("traffic", suite.run_traffic)
        if "workers" in a.only:
            attempt("workers", suite.run_workers)
        if "failover" in a.only:
            suite.log("failover")
            attempt("failover", lambda: suite.extra.__setitem__(
                "failover", uvloop.run(failover.run(tmp / "failover", kills, suite.log))))
        if "tunnel" in a.only:
            suite.log("tunnel")
            attempt("tunnel", lambda: suite.extra.__setitem__(
                "tunnel", tunnel.run(tmp / "tunnel", a.rounds, a.seconds, a.bulk_mib,
                                     suite.log)))
        if "http" in a.only:
            suite.log("http")
            attempt("http", lambda: suite.extra.__setitem__(
                "http", http_bench.run(tmp / "http", a.rounds, a.seconds, suite.log)))
        if "memory" in a.only:
            suite.log("memory: gateway idle connections")
            attempt("gateway memory", lambda: suite.extra.__setitem__(
                "gateway memory",
                uvloop.run(memory.gateway_idle(tmp / "memory-gw", idle_conns, suite.log))))
            suite.log("memory: federation catalog")
            attempt("federation memory", fed_memory)
    finally:
        nginx.stop()
    report = render(suite, a, time.time() - started, CASES)
    if failures:
        report += "\n\nCases that failed in this run (their rows are missing):\n" + "\n".join(
            f"- {f}" for f in failures)
    print(report)
    a.output.write_text(report + "\n")
    if failures:
        return 1
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # kept on failure, for the logs
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
