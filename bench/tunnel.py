"""Tunnel benchmark (issue 12, `python -m bench --only tunnel`): cross-cluster traffic over
WireGuard + mTLS, over mTLS only, and through the HAProxy TLS chain, in one run.

Two network namespaces on an underlay bridge (tests/helpers/netns.py, root needed): east-1
(client side: wrk and curl, its gateway's import listener, HAProxy A) and east-2 (nginx on
127.0.0.1, its gateway exporting it, HAProxy B on its underlay address). The federation runs in
the bridge namespace. Per round, each path in turn: keep-alive requests/s (wrk -c 32), new
connections/s (wrk -c 32, Connection: close), and one bulk download's MB/s (curl). Load on core
0, the proxies on core 1. Medians over rounds; ratios from the same run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import infra
from tests.helpers.netns import Netns, Underlay, can_make_namespaces

FED_PORT, INBOUND, ADMIN, IMPORT, WG_PORT = 17443, 15443, 15000, 16001, 51820
NGINX = (18001, 18002)
CHAIN_IN, CHAIN_TLS = 27501, 27512
PATHS = ("WireGuard+mTLS", "mTLS only", "HAProxy TLS chain")


def _config(d: Path, name: str, zone: str, ns: Netns, tunnel: bool, exports: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    eps = "".join(f"      - 127.0.0.1:{p}\n" for p in NGINX)
    text = f"""\
cluster: {{name: {name}, region: us-east, zone: {zone}}}
federation: {{url: "https://10.77.0.1:{FED_PORT}", ca_file: "{d.parent / 'fed' / 'ca.pem'}",
             token_file: "{d / 'token'}"}}
listen: {{inbound: "0.0.0.0:{INBOUND}", admin: "127.0.0.1:{ADMIN}",
         advertise: "{ns.address}:{INBOUND}"}}
state_dir: {d / 'state'}
"""
    if tunnel:
        text += f"tunnel: {{kind: wireguard, listen_port: {WG_PORT}, interface: wgb{name[-1]}, " \
                "rotate_every: 0s}\n"
    if exports:
        text += f"exports:\n  - name: web\n    port: 80\n    endpoints:\n{eps}"
    else:
        text += (f"imports:\n  - name: web\n    listen: 127.0.0.1:{IMPORT}\n"
                 "    failover: {tiers: [cluster, zone, region, any]}\n")
    path = d / "gateway.yaml"
    path.write_text(text)
    return path


class Gateways:
    """east-1 and east-2 gateways (with or without tunnels) and the federation."""

    def __init__(self, tmp: Path, net: Underlay, tunnel: bool) -> None:
        self.tmp, self.net, self.tunnel = tmp, net, tunnel
        self.procs: list[subprocess.Popen] = []

    def _start(self, ns: Netns, argv: list[str], log: str, pin: bool) -> subprocess.Popen:
        p = subprocess.Popen(ns.cmd(argv), stdin=subprocess.DEVNULL,
                             stdout=open(self.tmp / log, "ab"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        if pin:
            time.sleep(0.3)
            for pid in [p.pid, *infra.children(p.pid)]:
                infra.pin(pid, infra.PROXY_CORE)
        return p

    def start(self) -> None:
        d = self.tmp / ("tunnel" if self.tunnel else "mtls")
        cli = [sys.executable, "-m", "isthmus.cli"]
        self._start(self.net.ul, [*cli, "federation", "serve", "--state-dir", str(d / "fed"),
                                  "--listen", f"10.77.0.1:{FED_PORT}", "--lease-ttl", "5s",
                                  "--overlay-cidr", "10.99.0.0/24", "--log-level", "warning"],
                    f"{d.name}-fed.log", pin=False)
        infra.wait_port(FED_PORT, 20.0, prefix=tuple(self.net.ul.cmd([])), host="10.77.0.1")
        for name, zone, exports in (("east-2", "b", True), ("east-1", "a", False)):
            ns = self.net.ns[name]
            cfg = _config(d / name, name, zone, ns, self.tunnel, exports)
            r = subprocess.run([*cli, "federation", "token", "create", "--cluster", name,
                                "--state-dir", str(d / "fed"), "-o", str(d / name / "token")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"token for {name}: {r.stderr}")
            self._start(ns, [*cli, "gateway", "run", "--config", str(cfg), "--log-level",
                             "warning"], f"{d.name}-{name}.log", pin=True)
        ns1 = self.net.ns["east-1"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = ns1.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                         "2", f"http://127.0.0.1:{IMPORT}/"])
            if r.stdout == "200":
                for p in self.procs[1:]:  # the gateways and, now started, their wireguard-go
                    for pid in [p.pid, *infra.children(p.pid)]:
                        infra.pin(pid, infra.PROXY_CORE)
                return
            time.sleep(0.3)
        raise RuntimeError(f"east-1's import never served (logs in {self.tmp})")

    def stop(self) -> None:
        for p in reversed(self.procs):
            infra.stop(p)
        self.procs.clear()


def _measure(ns1: Netns, port: int, seconds: float, bulk: int) -> dict[str, float]:
    pre = tuple(ns1.cmd([]))
    ka = infra.wrk(port, 32, seconds, prefix=pre)
    nc = infra.wrk(port, 32, seconds, close=True, prefix=pre)
    mbps = infra.curl_mbps(port, "/bulk/blob", bulk, prefix=pre)
    return {"keep-alive req/s": ka.rps, "new conn/s": nc.rps, "bulk MB/s": mbps,
            "errors": ka.errors + nc.errors}


def run(tmp: Path, rounds: int, seconds: float, bulk_mib: int,
        log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    ok, why = can_make_namespaces()
    if not ok:
        raise RuntimeError(f"tunnel bench: {why}")
    tmp.mkdir(parents=True, exist_ok=True)
    bulk = bulk_mib << 20
    results: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    with Underlay(f"bt{int(time.time()) % 10000}", ["east-1", "east-2"]) as net:
        ns1, ns2 = net.ns["east-1"], net.ns["east-2"]
        nginx = infra.Nginx(tmp, list(NGINX), bulk_bytes=bulk, prefix=tuple(ns2.cmd([])))
        nginx.start()
        certs = infra.make_certs(tmp)
        a, b = infra.haproxy_chain(tmp, CHAIN_IN, CHAIN_TLS, NGINX[0], certs,
                                   tls_host=ns2.address, prefix_a=tuple(ns1.cmd([])),
                                   prefix_b=tuple(ns2.cmd([])))
        try:
            b.start(CHAIN_TLS)
            a.start(CHAIN_IN)
            for i in range(rounds):
                for tunnel, label in ((True, PATHS[0]), (False, PATHS[1])):
                    log(f"tunnel round {i + 1}: {label}")
                    gws = Gateways(tmp, net, tunnel)
                    try:
                        gws.start()
                        results[label].append(_measure(ns1, IMPORT, seconds, bulk))
                    finally:
                        gws.stop()
                log(f"tunnel round {i + 1}: {PATHS[2]}")
                results[PATHS[2]].append(_measure(ns1, CHAIN_IN, seconds, bulk))
        finally:
            a.stop()
            b.stop()
            nginx.stop()
    return {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for p, rs in results.items() if rs}


def table(got: dict[str, dict[str, float]]) -> str:
    rows = ["| path | keep-alive req/s | new conn/s | bulk MB/s | errors |",
            "|---|---|---|---|---|"]
    for p in PATHS:
        r = got[p]
        rows.append(f"| {p} | {r['keep-alive req/s']:,.0f} | {r['new conn/s']:,.0f} | "
                    f"{r['bulk MB/s']:,.0f} | {r['errors']:.0f} |")
    wg, mtls, chain = (got[p] for p in PATHS)
    for key in ("keep-alive req/s", "new conn/s", "bulk MB/s"):
        rows.append(f"| {key}: WireGuard+mTLS ÷ mTLS only {wg[key] / mtls[key]:.2f}x, "
                    f"÷ HAProxy chain {wg[key] / chain[key]:.2f}x | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="isthmus-bench-tunnel-") as d:
        out = run(Path(d), 1, 3.0, 128, lambda m: print(m, file=sys.stderr))
    print(table(out))
