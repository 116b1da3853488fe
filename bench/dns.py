"""DNS benchmark (issue 11): the gateway's responder side by side with NSD, in one run.

    python -m bench.dns                  # 3 rounds, 5 s each, 100 services
    python -m bench.dns --rounds 1 --seconds 2

Both serve the same records on 127.0.0.1 (bench/dns_server.py writes NSD's zone file from the
records the gateway's responder answers with): 100 imported services, A and SRV names. dnsperf
(core 0) sends a mix of 45% A, 45% SRV (`_tcp._tcp.<svc>...`), 10% NXDOMAIN queries over UDP to
each server in turn (core 1, NSD with one server process and no rate limiting):

1. max rate: `dnsperf -c 4 -q 200 -l SECONDS`, queries/s and loss, median over rounds;
2. latency at half the responder's max rate, for both servers: p50 / p99 / p99.9 from
   dnsperf's per-query lines (`-v`).

Needs `dnsperf` and `nsd` (`apt-get install -y dnsperf nsd`). Prints a markdown table; the
ratios are what to read (this VM adds milliseconds of wake-up latency to every server).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import infra

SERVICES = 100
ISTHMUS_PORT, NSD_PORT = 27601, 27602
ZONE = "clusterset.local"


def queries(n: int, path: Path, count: int = 10000) -> None:
    rng = random.Random(11)
    lines = []
    for _ in range(count):
        i, roll = rng.randrange(n), rng.random()
        if roll < 0.45:
            lines.append(f"svc-{i}.bench.svc.{ZONE} A")
        elif roll < 0.9:
            lines.append(f"_tcp._tcp.svc-{i}.bench.svc.{ZONE} SRV")
        else:
            lines.append(f"nope-{i}.bench.svc.{ZONE} A")
    path.write_text("\n".join(lines) + "\n")


def nsd_conf(d: Path, zone_file: Path) -> Path:
    conf = d / "nsd.conf"
    conf.write_text(f"""server:
  ip-address: 127.0.0.1@{NSD_PORT}
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: "{d}/nsd.pid"
  xfrdfile: "{d}/xfrd.state"
  xfrdir: "{d}"
  zonelistfile: "{d}/zone.list"
  logfile: "{d}/nsd.log"
  server-count: 1
  verbosity: 0
  hide-version: yes
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: "{zone_file}"
""")
    return conf


def dnsperf(port: int, qfile: Path, seconds: float, rate: int | None = None,
            verbose: bool = False) -> dict:
    cmd = ["taskset", "-c", str(infra.LOAD_CORE), "dnsperf", "-s", "127.0.0.1", "-p", str(port),
           "-d", str(qfile), "-l", str(seconds), "-c", "4", "-q", "200", "-t", "2"]
    if rate:
        cmd += ["-Q", str(rate)]
    if verbose:
        cmd.append("-v")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", out).group(1)
    got = {"qps": qps, "lost": int(lost)}
    if verbose:
        lat = sorted(float(m.group(1)) for m in re.finditer(r"^> \S+ \S+ \S+ ([\d.]+)$", out,
                                                              re.M))
        if lat:
            def pct(p: float) -> float:
                return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

            got.update(p50=pct(0.5), p99=pct(0.99), p999=pct(0.999), n=len(lat))
    return got


def start(cmd: list[str], log: Path, ready: str | None, port: int) -> subprocess.Popen:
    f = log.open("w")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE if ready else f, stderr=f, text=True)
    infra.pin(p.pid, infra.PROXY_CORE)
    if ready:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != ready:
            infra.stop(p)
            raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")
    else:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            probe = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1",
                                    "+tries=1", f"svc-0.bench.svc.{ZONE}"],
                                   capture_output=True, text=True)
            if probe.stdout.strip():
                break
            time.sleep(0.2)
        else:
            infra.stop(p)
            raise RuntimeError(f"nsd did not start: {log.read_text()[-2000:]}")
        for pid in [p.pid, *infra.children(p.pid)]:
            infra.pin(pid, infra.PROXY_CORE)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    for tool in ("dnsperf", "nsd", "dig"):
        if shutil.which(tool) is None:
            print(f"needs {tool}: apt-get install -y dnsperf nsd dnsutils", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-dns-") as tmp:
        d = Path(tmp)
        zone_file, qfile = d / "zone", d / "queries.txt"
        queries(SERVICES, qfile)
        ours = start([sys.executable, "-m", "bench.dns_server", str(ISTHMUS_PORT), str(SERVICES),
                      str(zone_file)], d / "isthmus.log", "ready", ISTHMUS_PORT)
        nsd = None
        try:
            nsd = start(["nsd", "-d", "-c", str(nsd_conf(d, zone_file))], d / "nsd.out", None,
                        NSD_PORT)
            runs: dict[str, list[dict]] = {"isthmus": [], "nsd": []}
            for _ in range(args.rounds):
                for name, port in (("isthmus", ISTHMUS_PORT), ("nsd", NSD_PORT)):
                    runs[name].append(dnsperf(port, qfile, args.seconds))
            best = {k: statistics.median(r["qps"] for r in v) for k, v in runs.items()}
            rate = int(best["isthmus"] / 2)
            lat = {name: dnsperf(port, qfile, min(args.seconds, 3.0), rate, verbose=True)
                   for name, port in (("isthmus", ISTHMUS_PORT), ("nsd", NSD_PORT))}
        finally:
            infra.stop(ours)
            if nsd is not None:
                infra.stop(nsd)
    print(f"DNS, {SERVICES} services, UDP, {args.rounds} round(s) of {args.seconds:g} s "
          "(dnsperf -c 4 -q 200 on core 0; server on core 1)\n")
    print("| | Isthmus responder | NSD 4.6 | Isthmus ÷ NSD |")
    print("|---|---|---|---|")
    print(f"| max queries/s (median) | {best['isthmus']:,.0f} | {best['nsd']:,.0f} | "
          f"{best['isthmus'] / best['nsd']:.2f}x |")
    lost = {k: sum(r["lost"] for r in v) for k, v in runs.items()}
    print(f"| queries lost at max rate | {lost['isthmus']} | {lost['nsd']} | |")
    for key, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
        a, b = lat["isthmus"].get(key), lat["nsd"].get(key)
        if a is not None and b is not None:
            print(f"| latency {label} at {rate:,} q/s | {a:.2f} ms | {b:.2f} ms | "
                  f"{a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
