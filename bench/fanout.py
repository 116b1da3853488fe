"""Catalog fan-out benchmark (issue 16): `python -m bench.fanout [--watchers 1000] [--changes 10]
[--store sqlite|etcd] [--replicas N]`.

One `isthmus federation serve` process (SQLite, or etcd with `--store etcd`: a one-member etcd
started here); a cluster joins and holds a lease; WATCHERS long-poll watchers (the gateways'
`FederationClient.watch`, mutual TLS with that cluster's SVID) in 4 processes (6 with 3
replicas, so each replica gets the same number), 25 TLS connections each; with `--replicas N`
(etcd only) N federation processes on the one etcd, the watcher processes spread over them
round robin. Each change is one export write; measured per change: the time from the
write's answer to each watcher having the event (wall clock, one machine), p50, p99 and max
over all watchers and changes; per replica: the long-polls it holds (its
`isthmus_federation_watchers` gauge, read between changes) and its CPU per change; RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench import infra
from federation.client import FederationClient, load_federation_bundle
from federation.model import Endpoint, Export
from tests.helpers.etcd import Etcd
from tests.helpers.federation import make_cluster

PORT, ADMIN = 27801, 27802
ROOT = Path(__file__).resolve().parents[1]

WATCHER = r'''
import asyncio, json, sys, time
from pathlib import Path
import uvloop
from federation.client import FederationClient, load_federation_bundle
from federation.identity import Svid

async def main(url, ca, cert, key, n, changes, out, start_rev):
    svid = Svid.from_pem(Path(cert).read_bytes(), Path(key).read_bytes())
    bundle = load_federation_bundle(Path(ca))
    clients = [FederationClient(url, bundle, svid, timeout=30.0) for _ in range(25)]
    seen = {}
    async def one(i):
        c = clients[i % len(clients)]
        after, got = start_rev, 0
        while got < changes:
            try:
                after, events = await c.watch(after, 25.0)
            except Exception as e:
                await asyncio.sleep(0.2)
                continue
            now = time.time()
            for ev in events:
                if ev.key.endswith("/bench"):
                    seen.setdefault(ev.revision, []).append(now)
                    got += 1
    await asyncio.gather(*(one(i) for i in range(n)))
    Path(out).write_text(json.dumps(seen))
    for c in clients:
        await c.close()

uvloop.run(main(*sys.argv[1:5], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8])))
'''


def _cpu(pid: int) -> float:
    return infra.cpu_seconds(pid) if os.path.exists(f"/proc/{pid}") else 0.0


def watching(admin_port: int) -> int:
    """The long-polls a federation process holds now (its /metrics gauge)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("isthmus_federation_watchers "):
                return int(float(line.split()[1]))
    return -1


def serve_replica(tmp: Path, i: int, store_url: str | None, env: dict,
                  lease_ttl: str = "30s") -> subprocess.Popen:
    """Replica i of `federation serve` (API on PORT + 2i, admin on ADMIN + 2i); replicas after
    the first get the first one's CA."""
    state = tmp / ("fed" if i == 0 else f"fed{i}")
    if i:  # a replica: the first one's CA
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in ("ca.pem", "ca-key.pem"):
            (state / f).write_bytes((tmp / "fed" / f).read_bytes())
            (state / f).chmod(0o600)
    args = [sys.executable, "-m", "isthmus.cli", "federation", "serve", "--state-dir",
            str(state), "--listen", f"127.0.0.1:{PORT + 2 * i}", "--admin",
            f"127.0.0.1:{ADMIN + 2 * i}", "--lease-ttl", lease_ttl, "--log-level", "warning"]
    if store_url:
        args += ["--store", store_url]
    p = subprocess.Popen(args, env=env, stdout=open(tmp / f"fed{i}.log", "w"),
                         stderr=subprocess.STDOUT)
    infra.wait_port(PORT + 2 * i, 20.0)
    return p


async def run(tmp: Path, watchers: int, changes: int, store: str, replicas: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    etcd = None
    if store == "etcd":
        etcd = Etcd(tmp)
        etcd.start()
    feds = [serve_replica(tmp, 0, etcd.url if etcd else None, env)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(1, replicas):
            feds.append(serve_replica(tmp, i, etcd.url if etcd else None, env))
        url = f"https://127.0.0.1:{PORT}"
        bundle = load_federation_bundle(tmp / "fed" / "ca.pem")
        c = make_cluster("bench-1")
        store_args = ["--store", etcd.url] if etcd is not None else []
        token = subprocess.run([sys.executable, "-m", "isthmus.cli", "federation", "token",
                                "create", "--cluster", "bench-1", "--state-dir",
                                str(tmp / "fed"), *store_args], capture_output=True, text=True,
                               env=env).stdout.strip()
        async with FederationClient(url, bundle) as anon:
            await anon.join(token, c.record, c.bundle(1))
        client = FederationClient(url, bundle, c.svid, timeout=30.0)
        await client.grant_lease("bench-1")
        start_rev = (await client.catalog()).revision
        (tmp / "svid.pem").write_bytes(c.svid.cert_pem)
        (tmp / "svid-key.pem").write_bytes(c.svid.key_pem)
        (tmp / "watcher.py").write_text(WATCHER)
        nproc = 4 if 4 % replicas == 0 else 2 * replicas
        per = watchers // nproc
        watchers = per * nproc
        for i in range(nproc):
            wurl = f"https://127.0.0.1:{PORT + 2 * (i % replicas)}"
            procs.append(subprocess.Popen(
                [sys.executable, str(tmp / "watcher.py"), wurl, str(tmp / "fed" / "ca.pem"),
                 str(tmp / "svid.pem"), str(tmp / "svid-key.pem"), str(per), str(changes),
                 str(tmp / f"seen{i}.json"), str(start_rev)],
                env=env, stdout=open(tmp / f"w{i}.log", "w"), stderr=subprocess.STDOUT))
        await asyncio.sleep(5.0)  # every watcher connected and long-polling
        cpu0 = [_cpu(f.pid) for f in feds]
        wrote: dict[int, float] = {}
        held: list[int] = []
        for i in range(changes):
            if i == changes // 2:
                await asyncio.sleep(0.5)  # between two changes: every watcher is back polling
                held = [watching(ADMIN + 2 * k) for k in range(len(feds))]
            ex = Export("bench-1", "default", "bench", 8080, "tcp",
                        (Endpoint("127.0.0.1", 9000 + i, True, 1),))
            rev = await client.put_export(ex)
            wrote[rev] = time.time()
            await asyncio.sleep(1.0)
        deadline = time.time() + 30
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            await asyncio.sleep(0.2)
        cpu1 = [_cpu(f.pid) for f in feds]
        rss = max(infra.rss_mib(f.pid) for f in feds)
        await client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(5)
        for f in feds:
            infra.stop(f)
        if etcd is not None:
            etcd.stop()
    lat: list[float] = []
    got = 0
    for i in range(nproc):
        try:
            seen = json.loads((tmp / f"seen{i}.json").read_text())
        except OSError:
            continue
        for rev, times in seen.items():
            if int(rev) in wrote:
                lat += [t - wrote[int(rev)] for t in times]
                got += len(times)
    lat.sort()
    return {"watchers": watchers, "changes": changes, "store": store,
            "deliveries": got, "expected": watchers * changes,
            "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else None,
            "max_ms": lat[-1] * 1000 if lat else None,
            "replicas": replicas, "watchers_per_replica": held,
            "cpu_per_change_ms": [round((b - a) / changes * 1000) for a, b in zip(cpu0, cpu1,
                                                                                  strict=True)],
            "rss_mib": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite")
    ap.add_argument("--replicas", type=int, default=1, help="federation processes (etcd only)")
    a = ap.parse_args()
    if a.replicas > 1 and a.store != "etcd":
        ap.error("--replicas needs --store etcd")
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-fanout-") as d:
        r = uvloop.run(run(Path(d), a.watchers, a.changes, a.store, a.replicas))
    print(json.dumps(r))
    print(f"fan-out ({r['store']}, {r['replicas']} replica(s)), {r['watchers']} watchers x "
          f"{r['changes']} changes: "
          f"{r['deliveries']} of {r['expected']} deliveries; change -> watcher p50 "
          f"{r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms; federation "
          f"CPU per change per replica {r['cpu_per_change_ms']} ms, long-polls held per "
          f"replica {r['watchers_per_replica']}, RSS {r['rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
