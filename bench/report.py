"""The benchmark's results and their Markdown report: the rows measured (medians over rounds,
Isthmus ÷ HAProxy), the scaling and per-connection CPU tables, the targets of issue 4."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


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


class Results:
    """What a run measured; bench.__main__.Suite fills it in."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.extra: dict[str, dict] = {}
        self.notes: list[str] = []
        # (metric, path) -> (rps, CPU %)
        self.scaling: dict[tuple[str, str], list[tuple[float, float]]] = {}
        # (case, path) -> (user, sys) µs per new connection
        self.conn_cost: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def row(self, case: str, metric: str, unit: str, higher: bool) -> Row:
        key = (case, metric)
        if key not in self.rows:
            self.rows[key] = Row(case, metric, unit, higher)
        return self.rows[key]

    def scaling_table(self) -> str:
        names = ["Isthmus, 1 worker", "Isthmus, 2 workers", "HAProxy, nbthread 1",
                 "HAProxy, nbthread 2"]
        lines = ["| metric | " + " | ".join(names) + " | Isthmus 2 ÷ 1 | HAProxy 2 ÷ 1 | "
                 "Isthmus 2 workers ÷ HAProxy nbthread 1 | "
                 "Isthmus 2 workers ÷ HAProxy nbthread 2 |",
                 "|---" * (len(names) + 5) + "|"]
        for metric in dict.fromkeys(m for m, _ in self.scaling):
            got = {n: self.scaling.get((metric, n), [(0.0, 0.0)]) for n in names}
            med = {n: statistics.median(v for v, _ in got[n]) for n in names}
            cpu = {n: statistics.median(c for _, c in got[n]) for n in names}

            def ratio(x: str, y: str, med=med) -> str:
                return f"{med[x] / med[y]:.2f}x" if med[y] else "-"

            lines.append(f"| {metric} | "
                         + " | ".join(f"{med[n]:,.0f} ({cpu[n]:.0f}% CPU)" for n in names)
                         + f" | {ratio(names[1], names[0])} | {ratio(names[3], names[2])}"
                         f" | {ratio(names[1], names[2])} | {ratio(names[1], names[3])} |")
        return "\n".join(lines)

    # -----------------------------------------------------------------------------------------
    def table(self) -> str:
        lines = ["| case | metric | Isthmus | HAProxy | direct | bare uvloop relay "
                 "| Isthmus ÷ HAProxy | Isthmus CPU % "
                 "| HAProxy CPU % | CPU per request or MB, Isthmus ÷ HAProxy |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows.values():
            iv, hv = row.med("Isthmus"), row.med("HAProxy")
            dv, bv = row.med("direct"), row.med("bare relay")
            ratio = f"{iv / hv:.2f}x" if iv and hv else "-"
            if ratio != "-" and not row.higher_better:
                ratio += " (lower is better)"
            lines.append(f"| {row.case} | {row.metric} | {fmt(iv, row.unit)} | "
                         f"{fmt(hv, row.unit)} | {fmt(dv, row.unit)} | {fmt(bv, row.unit)} | "
                         f"{ratio} | {fmt(row.cpu_med('Isthmus'), '%')} | "
                         f"{fmt(row.cpu_med('HAProxy'), '%')} | {cost_ratio(row)} |")
        fo = self.extra.get("failover")
        if fo:
            for mode, d in fo.items():
                lines.append(f"| 4. failover | {mode}: death → first connection served by the next "
                             f"tier, median / max over {d['kills']} kills | "
                             f"{d['median_ms']:.0f} / {d['max_ms']:.0f} ms | - | - | - | "
                             f"failed connections: {d['failed_total']} "
                             f"(max {d['failed_max_per_kill']} per kill) | - | - | - |")
        gm = self.extra.get("gateway memory")
        if gm:
            pts = ", ".join(f"{n}: {r:.0f}" for n, r in gm["rss"])
            how = (f"extrapolated from {gm['n']} (fd limit {gm['nofile']})"
                   if gm["extrapolated"] else "measured")
            lines.append(f"| 5. memory | gateway RSS with {gm['target']} idle relayed connections "
                         f"({how}) | {gm['rss_at_target']:.0f} MiB | - | - | - | "
                         f"{gm['kib_per_conn']:.1f} KiB per connection; "
                         f"RSS MiB at conns {pts} | - | - | - |")
        fm = self.extra.get("federation memory")
        if fm:
            lines.append(f"| 5. memory | federation RSS holding {fm['services']} services × 10 "
                         f"endpoints | {fm['rss_published']:.0f} MiB | - | - | - | "
                         f"empty {fm['rss_before']:.0f} MiB; after a full catalog read "
                         f"{fm['rss_after_read']:.0f} MiB (peak {fm['hwm']:.0f}); published "
                         f"{fm['publish_per_s']:.0f} exports/s; catalog read "
                         f"{fm['catalog_read_s']:.2f} s; SQLite {fm['db_mib']:.0f} MiB "
                         "| - | - | - |")
        return "\n".join(lines)

    def targets(self) -> str:
        def ratio(case: str, metric_start: str) -> float | None:
            for (c, m), row in self.rows.items():
                if c == case and m.startswith(metric_start):
                    i, h = row.med("Isthmus"), row.med("HAProxy")
                    return i / h if i and h else None
            return None

        def p50(path: str, metric: str = "one connection p50, nginx on the proxy's core (wrk -c1)"
                ) -> float | None:
            row = self.rows.get(("1. L4 local", metric))
            return row.med(path) if row else None

        out = ["| target | measured | met |", "|---|---|---|"]

        def add(name: str, value: float | None, goal: float, text: str,
                higher: bool = True) -> None:
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
        add("bulk MB/s ≥ 1.00x HAProxy (default buffers), local path", v, 1.0,
            f"{v:.2f}x" if v else "")
        http = self.extra.get("http")
        v = None
        if http and http.get("HAProxy mode http", {}).get("keep-alive req/s"):
            v = (http["Isthmus local"]["keep-alive req/s"]
                 / http["HAProxy mode http"]["keep-alive req/s"])
        add("HTTP-mode listener ≥ 0.90x HAProxy `mode http` (keep-alive rps)", v, 0.9,
            f"{v:.2f}x" if v else "")
        v = ratio("2. cross-cluster", "new connection")
        add("cross-cluster new-connection rate ≥ 3x HAProxy TLS re-encrypt chain", v, 3.0,
            f"{v:.2f}x" if v else "")
        gi, hd, d = p50("Isthmus"), p50("HAProxy"), p50("direct")
        if gi is not None and d is not None:
            apart = "one connection p50 (wrk -c1)"
            gi2, hd2, d2 = p50("Isthmus", apart), p50("HAProxy", apart), p50("direct", apart)
            other = (f"; nginx on the load core: +{(gi2 - d2) / 1000:.3f} ms "
                     f"(HAProxy +{((hd2 or d2) - d2) / 1000:.3f} ms)"
                     if gi2 is not None and d2 is not None else "")
            add("added p50 latency of one gateway hop ≤ 0.05 ms", (gi - d) / 1000, 0.05,
                f"+{(gi - d) / 1000:.3f} ms (HAProxy +{((hd or d) - d) / 1000:.3f} ms), "
                f"wrk -c1 p50 minus direct, nginx on the proxy's core{other}", higher=False)
        gm = self.extra.get("gateway memory")
        if gm:
            add("10k idle connections ≤ 200 MiB gateway RSS", gm["rss_at_target"], 200,
                f"{gm['rss_at_target']:.0f} MiB"
                + (" (extrapolated)" if gm["extrapolated"] else ""),
                higher=False)
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


def render(suite: Results, a: argparse.Namespace, elapsed: float, every: tuple[str, ...]) -> str:
    """The whole Markdown report of a run; `every` is the list of cases (for the command line)."""
    here = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip() or os.environ.get(
                                "ISTHMUS_BENCH_COMMIT", "unknown")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "federation"],
                           capture_output=True, text=True, cwd=here).stdout.strip()
    hv = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    only = "" if a.only == set(every) else f" --only {','.join(c for c in every if c in a.only)}"
    parts = [
        f"`python -m bench{' --quick' if a.quick else ''}{only}"
        f"{' --profile' if a.profile else ''}` — "
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}"
        f"{' (gateway/ or federation/ modified in the working tree)' if dirty else ''}, "
        f"{platform.python_version()}, "
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
        parts += ["", "Scaling with `--workers` (not a target: the targets are one worker each). "
                  "The local path; wrk and nginx pinned to core 0, the proxies not pinned (a "
                  "second worker or thread shares core 0 with the load); CPU % = the proxy's "
                  "processes over the run (100% = one core):", "",
                  suite.scaling_table()]
    if suite.conn_cost:
        parts += ["", "CPU per new connection (wrk -c50 with `Connection: close`; /proc user and "
                  "system time of the proxy processes — both hops for cross-cluster — over the "
                  "requests served; medians over rounds):",
                  "", "| case | proxy | user µs | kernel µs | total µs | kernel share |",
                  "|---|---|---|---|---|---|"]
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
    tun = suite.extra.get("tunnel")
    if tun:
        from bench.tunnel import table as tunnel_table

        parts += ["", "Tunnel (issue 12): cross-cluster between two network namespaces, "
                  "WireGuard (wireguard-go) + mTLS vs mTLS only vs the HAProxy TLS chain:", "",
                  tunnel_table(tun)]
    http = suite.extra.get("http")
    if http:
        from bench.http import table as http_table

        parts += ["", "HTTP (issue 14): the HTTP import listener vs HAProxy mode http, and "
                  "cross-cluster vs the HAProxy http TLS chain (wrk -c50 keep-alive):", "",
                  http_table(http)]
    return "\n".join(parts)
