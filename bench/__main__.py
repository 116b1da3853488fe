"""The benchmark suite (issue 4): Isthmus side by side with HAProxy 2.6, in one run.

    python -m bench            # full run, ~15 min; table to stdout and bench/last-run.md
    python -m bench --quick    # smoke run: 1 round, 2 s loads, 128 MiB bulk, 5 kills, 1k conns/services
    python -m bench --only l4,cross    # cases: l4 cross bulk failover memory workers

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
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import failover, infra, memory
from federation.errors import InputError
from federation.units import parse_int
from isthmus.demo import Processes, ports, start_topology

OFFSET = 8000  # gateway ports 23101..26302 (integration tests use 15xxx-22999; keep below 32768)
HAPROXY_TCP, CHAIN_IN, CHAIN_TLS, BARE_RELAY = 27501, 27511, 27512, 27521
HAPROXY_T1, HAPROXY_T2 = 27531, 27532  # scaling case: nbthread 1 and 2, not pinned
CASES = ("l4", "cross", "bulk", "failover", "memory", "workers")
GiB = 1 << 30


@dataclass
class Row:
    case: str
    metric: str
    unit: str
    higher_better: bool
    values: dict[str, list[float]] = field(default_factory=dict)  # path -> one value per round
    cpu: dict[str, list[float]] = field(default_factory=dict)  # path -> proxy CPU % of one core

    def add(self, path: str, value: float | None, cpu: float | None = None) -> None:
        if value is not None:
            self.values.setdefault(path, []).append(value)
        if cpu is not None:
            self.cpu.setdefault(path, []).append(cpu)

    def med(self, path: str) -> float | None:
        v = self.values.get(path)
        return statistics.median(v) if v else None

    def cpu_med(self, path: str) -> float | None:
        v = self.cpu.get(path)
        return statistics.median(v) if v else None


class Suite:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.rows: dict[tuple[str, str], Row] = {}
        self.extra: dict[str, dict] = {}
        self.notes: list[str] = []
        self.nginx_pid: int | None = None  # set by main(); moved to the proxy core for hop latency
        self.last_split = (0.0, 0.0)  # user, system CPU seconds of the last measure()
        self.scaling: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (metric, path) -> (rps, CPU %)
        self.conn_cost: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (case, path) -> (user, sys) µs per new connection

    def row(self, case: str, metric: str, unit: str, higher: bool) -> Row:
        key = (case, metric)
        if key not in self.rows:
            self.rows[key] = Row(case, metric, unit, higher)
        return self.rows[key]

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
            self.row(case, "keep-alive rps (wrk -c50)", "req/s", True).add(name, r.rps, cpu if pids else None)
            self._errors(case, name, "keep-alive", r.errors)
            r, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 50, a.seconds, close=True))
            self.row(case, "new connection per request rps (wrk -c50, Connection: close)", "req/s", True).add(
                name, r.rps, cpu if pids else None)
            self._errors(case, name, "new-connection", r.errors)
            if pids and r.requests:
                user, system = self.last_split
                self.conn_cost.setdefault((case, name), []).append((1e6 * user / r.requests, 1e6 * system / r.requests))
            r, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 1, a.seconds))
            self.row(case, "one connection, serial rps (wrk -c1)", "req/s", True).add(name, r.rps, cpu if pids else None)
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
                self.row(case, "one connection p50, nginx on the proxy's core (wrk -c1)", "µs", False).add(name, r.p50_us)
                self.row(case, "one connection p99, nginx on the proxy's core (wrk -c1)", "µs", False).add(name, r.p99_us)
                self._errors(case, name, "serial (nginx on the proxy core)", r.errors)
            if fixed_rates:
                for rate in (1000, 5000):
                    res, cpu = self.measure(pids, lambda port=port, rate=rate: self.loadgen(port, rate))
                    self.row(case, f"p50 at fixed {rate // 1000}k rps (bench.loadgen, 20 conns)", "µs", False).add(
                        name, res["p50_us"])
                    self.row(case, f"p99 at fixed {rate // 1000}k rps (bench.loadgen, 20 conns)", "µs", False).add(
                        name, res["p99_us"], cpu if pids else None)
                    self._errors(case, name, f"fixed {rate}", res["errors"])
                    if res["rate"] < 0.95 * rate:
                        self.notes.append(f"{case}/{name}: fixed {rate} rps reached only {res['rate']:.0f} rps")

    def loadgen(self, port: int, rate: int) -> dict:
        out = subprocess.run(["taskset", "-c", str(infra.LOAD_CORE), sys.executable, "-m", "bench.loadgen",
                              "--port", str(port), "--rate", str(rate), "--seconds", str(self.args.seconds)],
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
            mbps, cpu = self.measure(pids, lambda port=port: infra.curl_mbps(port, "/bulk/blob", size))
            self.row(case, f"MB/s, {self.args.bulk_mib} MiB via curl", "MB/s", True).add(name, mbps, cpu if pids else None)

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
            bare = subprocess.Popen(["taskset", "-c", str(infra.PROXY_CORE), sys.executable, "-m", "bench.bare_relay",
                                     str(BARE_RELAY), str(e2["ep1"])], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=open(self.tmp / "bare-relay.log", "wb"))
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
            local = {"Isthmus": (e2["import"], [gw["east-2"].pid]), "HAProxy": (HAPROXY_TCP, [h_tcp.pid]),
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
                    self.bulk({k: v for k, v in cross.items() if k != "direct"}, "3. bulk, cross-cluster")
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
        h1 = infra.haproxy_tcp(self.tmp, HAPROXY_T1, e2["ep1"], name="tcp-t1", nbthread=1, pinned=False)
        h2 = infra.haproxy_tcp(self.tmp, HAPROXY_T2, e2["ep1"], name="tcp-t2", nbthread=2, pinned=False)
        try:
            h1.start(HAPROXY_T1)
            h2.start(HAPROXY_T2)
            uvloop.run(start_topology(state, OFFSET, procs, None, workers={"east-2": 2}))
            time.sleep(1.5)
            gw = dict(procs.procs)
            infra.pin(gw["federation"].pid, infra.LOAD_CORE)
            paths = {"Isthmus, 1 worker": (w1["import"], [gw["west-1"].pid]),
                     "Isthmus, 2 workers": (e2["import"], [gw["east-2"].pid, *infra.children(gw["east-2"].pid)]),
                     "HAProxy, nbthread 1": (HAPROXY_T1, [h1.pid]), "HAProxy, nbthread 2": (HAPROXY_T2, [h2.pid])}
            self.check_paths(paths)
            for r in range(a.rounds):
                self.log(f"round {r + 1}/{a.rounds}: workers")
                for name, (port, pids) in paths.items():
                    res, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 50, a.seconds))
                    self.scaling.setdefault(("keep-alive rps (wrk -c50)", name), []).append((res.rps, cpu))
                    res, cpu = self.measure(pids, lambda port=port: infra.wrk(port, 50, a.seconds, close=True))
                    self.scaling.setdefault(("new connection per request rps (wrk -c50, Connection: close)", name),
                                            []).append((res.rps, cpu))
                procs.check()
        finally:
            procs.stop()
            h1.stop()
            h2.stop()

    def scaling_table(self) -> str:
        names = ["Isthmus, 1 worker", "Isthmus, 2 workers", "HAProxy, nbthread 1", "HAProxy, nbthread 2"]
        lines = ["| metric | " + " | ".join(names) + " | Isthmus 2 ÷ 1 | HAProxy 2 ÷ 1 | Isthmus 2 workers ÷ HAProxy nbthread 1 |"
                 " Isthmus 2 workers ÷ HAProxy nbthread 2 |", "|---" * (len(names) + 5) + "|"]
        for metric in dict.fromkeys(m for m, _ in self.scaling):
            med = {n: statistics.median(v for v, _ in self.scaling.get((metric, n), [(0.0, 0.0)])) for n in names}
            cpu = {n: statistics.median(c for _, c in self.scaling.get((metric, n), [(0.0, 0.0)])) for n in names}

            def ratio(x: str, y: str, med=med) -> str:
                return f"{med[x] / med[y]:.2f}x" if med[y] else "-"

            lines.append(f"| {metric} | " + " | ".join(f"{med[n]:,.0f} ({cpu[n]:.0f}% CPU)" for n in names)
                         + f" | {ratio(names[1], names[0])} | {ratio(names[3], names[2])} | {ratio(names[1], names[2])}"
                         f" | {ratio(names[1], names[3])} |")
        return "\n".join(lines)

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
        for label, port, name, close in (("local keep-alive", local_port, "east-2", False),
                                         ("local new connections", local_port, "east-2", True),
                                         ("cross new connections, gateway A", cross_port, "east-1", True),
                                         ("cross new connections, gateway B", cross_port, "east-2", True)):
            out = self.tmp / f"profile-{label.replace(' ', '-').replace(',', '')}.txt"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(gw[name].pid), "--duration", "4", "--rate", "200",
                                    "--format", "raw", "--output", str(out), "--nonblocking"],
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

    # -----------------------------------------------------------------------------------------
    def table(self) -> str:
        lines = ["| case | metric | Isthmus | HAProxy | direct | bare uvloop relay | Isthmus ÷ HAProxy | Isthmus CPU % "
                 "| HAProxy CPU % | CPU per request or MB, Isthmus ÷ HAProxy |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows.values():
            iv, hv, dv, bv = row.med("Isthmus"), row.med("HAProxy"), row.med("direct"), row.med("bare relay")
            ratio = f"{iv / hv:.2f}x" if iv and hv else "-"
            if ratio != "-" and not row.higher_better:
                ratio += " (lower is better)"
            lines.append(f"| {row.case} | {row.metric} | {fmt(iv, row.unit)} | {fmt(hv, row.unit)} | "
                         f"{fmt(dv, row.unit)} | {fmt(bv, row.unit)} | {ratio} | {fmt(row.cpu_med('Isthmus'), '%')} | "
                         f"{fmt(row.cpu_med('HAProxy'), '%')} | {cost_ratio(row)} |")
        fo = self.extra.get("failover")
        if fo:
            for mode, d in fo.items():
                lines.append(f"| 4. failover | {mode}: death → first connection served by the next tier, "
                             f"median / max over {d['kills']} kills | {d['median_ms']:.0f} / {d['max_ms']:.0f} ms | - | - | - | "
                             f"failed connections: {d['failed_total']} (max {d['failed_max_per_kill']} per kill) | - | - | - |")
        gm = self.extra.get("gateway memory")
        if gm:
            pts = ", ".join(f"{n}: {r:.0f}" for n, r in gm["rss"])
            how = (f"extrapolated from {gm['n']} (fd limit {gm['nofile']})" if gm["extrapolated"] else "measured")
            lines.append(f"| 5. memory | gateway RSS with {gm['target']} idle relayed connections ({how}) | "
                         f"{gm['rss_at_target']:.0f} MiB | - | - | - | {gm['kib_per_conn']:.1f} KiB per connection; "
                         f"RSS MiB at conns {pts} | - | - | - |")
        fm = self.extra.get("federation memory")
        if fm:
            lines.append(f"| 5. memory | federation RSS holding {fm['services']} services × 10 endpoints | "
                         f"{fm['rss_published']:.0f} MiB | - | - | - | empty {fm['rss_before']:.0f} MiB; after a full "
                         f"catalog read {fm['rss_after_read']:.0f} MiB (peak {fm['hwm']:.0f}); published "
                         f"{fm['publish_per_s']:.0f} exports/s; catalog read {fm['catalog_read_s']:.2f} s; "
                         f"SQLite {fm['db_mib']:.0f} MiB | - | - | - |")
        return "\n".join(lines)

    def targets(self) -> str:
        def ratio(case: str, metric_start: str) -> float | None:
            for (c, m), row in self.rows.items():
                if c == case and m.startswith(metric_start):
                    i, h = row.med("Isthmus"), row.med("HAProxy")
                    return i / h if i and h else None
            return None

        def p50(path: str, metric: str = "one connection p50, nginx on the proxy's core (wrk -c1)") -> float | None:
            row = self.rows.get(("1. L4 local", metric))
            return row.med(path) if row else None

        out = ["| target | measured | met |", "|---|---|---|"]

        def add(name: str, value: float | None, goal: float, text: str, higher: bool = True) -> None:
            if value is None:
                out.append(f"| {name} | not measured | - |")
                return
            met = value >= goal if higher else value <= goal
            out.append(f"| {name} | {text} | {'met' if met else 'NOT met'} |")

        v = ratio("1. L4 local", "keep-alive")
        add("L4 keep-alive rps ≥ 1.00x HAProxy", v, 1.0, f"{v:.2f}x" if v else "")
        v = ratio("1. L4 local", "new connection")
        add("L4 new connections ≥ 0.80x HAProxy", v, 0.8, f"{v:.2f}x" if v else "")
        v = ratio("3. bulk, local path", "MB/s")
        add("bulk MB/s ≥ 1.00x HAProxy (default buffers), local path", v, 1.0, f"{v:.2f}x" if v else "")
        out.append("| HTTP-mode listener ≥ 0.90x HAProxy `mode http` | no HTTP mode in the gateway yet | n/a |")
        v = ratio("2. cross-cluster", "new connection")
        add("cross-cluster new-connection rate ≥ 3x HAProxy TLS re-encrypt chain", v, 3.0, f"{v:.2f}x" if v else "")
        gi, hd, d = p50("Isthmus"), p50("HAProxy"), p50("direct")
        if gi is not None and d is not None:
            apart = "one connection p50 (wrk -c1)"
            gi2, hd2, d2 = p50("Isthmus", apart), p50("HAProxy", apart), p50("direct", apart)
            other = (f"; nginx on the load core: +{(gi2 - d2) / 1000:.3f} ms (HAProxy +{((hd2 or d2) - d2) / 1000:.3f} ms)"
                     if gi2 is not None and d2 is not None else "")
            add("added p50 latency of one gateway hop ≤ 0.05 ms", (gi - d) / 1000, 0.05,
                f"+{(gi - d) / 1000:.3f} ms (HAProxy +{((hd or d) - d) / 1000:.3f} ms), wrk -c1 p50 minus direct, "
                f"nginx on the proxy's core{other}", higher=False)
        gm = self.extra.get("gateway memory")
        if gm:
            add("10k idle connections ≤ 200 MiB gateway RSS", gm["rss_at_target"], 200,
                f"{gm['rss_at_target']:.0f} MiB" + (" (extrapolated)" if gm["extrapolated"] else ""), higher=False)
        return "\n".join(out)


def cost_ratio(row: Row) -> str:
    """CPU spent per unit of work (request or MB), Isthmus over HAProxy: < 1 means cheaper.
    Only for throughput rows, where both proxies were measured."""
    if not row.higher_better:
        return "-"
    i, h = row.med("Isthmus"), row.med("HAProxy")
    ci, ch = row.cpu_med("Isthmus"), row.cpu_med("HAProxy")
    if not (i and h and ci and ch):
        return "-"
    return f"{(ci / i) / (ch / h):.2f}x"


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.0f}%"
    if unit == "µs":
        return f"{v:.0f} µs"
    if unit == "MB/s":
        return f"{v:.0f}"
    return f"{v:,.0f}"


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
        rows = [(f, c) for f, c in sorted(d.items(), key=lambda x: -x[1]) if d is own or c < 0.9 * total]
        return [f"  {c * 100 / total:5.1f}% {f}" for f, c in rows[:n]]

    return ["self:", *top(own), "inclusive (frames under 90%, i.e. below main/Runner.run):", *top(incl)]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--only", default=",".join(CASES), help="comma-separated cases: " + " ".join(CASES))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="length of each load run (default 5)")
    ap.add_argument("--profile", action="store_true", help="py-spy the gateways under load after the rounds")
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
    nginx_ports = [ports(OFFSET, 1)["ep1"], ports(OFFSET, 1)["ep2"], ports(OFFSET, 2)["ep1"], ports(OFFSET, 2)["ep2"],
                   ports(memory.OFFSET, 1)["ep1"], ports(memory.OFFSET, 1)["ep2"]]
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
        if "memory" in a.only:
            suite.log("memory: gateway idle connections")
            attempt("gateway memory", lambda: suite.extra.__setitem__(
                "gateway memory", uvloop.run(memory.gateway_idle(tmp / "memory-gw", idle_conns, suite.log))))
            suite.log("memory: federation catalog")
            attempt("federation memory", fed_memory)
    finally:
        nginx.stop()
    report = render(suite, a, time.time() - started)
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


def render(suite: Suite, a: argparse.Namespace, elapsed: float) -> str:
    import os

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or os.environ.get("ISTHMUS_BENCH_COMMIT", "unknown")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "federation"], capture_output=True,
                           text=True, cwd=Path(__file__).parent).stdout.strip()
    hv = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    every = CASES
    only = "" if a.only == set(every) else f" --only {','.join(c for c in every if c in a.only)}"
    parts = [
        f"`python -m bench{' --quick' if a.quick else ''}{only}{' --profile' if a.profile else ''}` — "
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}"
        f"{' (gateway/ or federation/ modified in the working tree)' if dirty else ''}, {platform.python_version()}, "
        f"{hv.split(' - ')[0]}, {len(os.sched_getaffinity(0))} cores, {a.rounds} round(s) of "
        f"{a.seconds:g} s loads, medians; {elapsed / 60:.1f} min; load average at the end "
        f"{open('/proc/loadavg').read().split()[0]} (other work on the machine shows up as noise).",
        "",
        suite.table(),
        "",
        "Targets (issue 4), ratios from this run:",
        "",
        suite.targets(),
    ]
    if suite.scaling:
        parts += ["", "Scaling with `--workers` (not a target: the targets are one worker each). The local path; "
                  "wrk and nginx pinned to core 0, the proxies not pinned (a second worker or thread shares core 0 "
                  "with the load); CPU % = the proxy's processes over the run (100% = one core):", "",
                  suite.scaling_table()]
    if suite.conn_cost:
        parts += ["", "CPU per new connection (wrk -c50 with `Connection: close`; /proc user and system time of "
                  "the proxy processes — both hops for cross-cluster — over the requests served; medians over rounds):",
                  "", "| case | proxy | user µs | kernel µs | total µs | kernel share |", "|---|---|---|---|---|---|"]
        for (case, name), costs in suite.conn_cost.items():
            user = statistics.median(c[0] for c in costs)
            system = statistics.median(c[1] for c in costs)
            parts.append(f"| {case} | {name} | {user:.0f} | {system:.0f} | {user + system:.0f} | "
                         f"{100 * system / (user + system):.0f}% |")
    if suite.notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in suite.notes]
    for name, d in suite.extra.items():
        if name.startswith("profile"):
            parts += ["", f"py-spy, {name}, wrk -c50 for 5 s:", "", "```", *d["top"], "```"]
    fo = suite.extra.get("failover")
    if fo:
        parts += ["", f"Blackhole: {fo['blackholed']['blackhole_check']}."]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
