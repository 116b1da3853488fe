"""Catalog churn benchmark (issue 16): `python -m bench.churn [--clusters 1000] [--services 20]
[--endpoints 5] [--watchers 1000] [--rates 20,100,400] [--step 10] [--replicas 1]`.

Where does the federation saturate first — its CPU, etcd, or the bytes it sends — when 1,000
clusters of 20 services each churn their endpoints while 1,000 gateways watch?

What it starts (loopback; every process stopped by its PID; every load bounded in count and
time): a one-member etcd (`--store sqlite`: none), REPLICAS `federation serve` processes on it
(bench/fanout.py `serve_replica`), CLUSTERS clusters (each its own CA and SVID, joined with a
single-use token), WRITERS writer processes (bench/churn_writer.py: each takes its clusters'
leases, loads SERVICES exports of ENDPOINTS endpoints per cluster — 1,000 x 20 x 5 = 100,000
endpoints — then churns), and WATCHERS long-poll watchers in 4 processes
(bench/churn_watcher.py), spread over the replicas.

Measured:
* the load: seconds to put every export (LOAD_CONCURRENCY in flight per writer);
* the federation's RSS with the whole catalog in the store, before and after one full
  `GET /v1/catalog` (its size in bytes is printed beside the size of one watch event);
* per churn phase (RATE writes per second for STEP seconds, open loop): writes acknowledged
  per second, refused, skipped (all MAX_INFLIGHT writes busy); change -> watcher latency p50,
  p99, max over sampled revisions (every SAMPLE-th) and every watcher, and the share of
  (sampled change, watcher) pairs delivered by the end; CPU (% of one core) of each federation
  replica, etcd, the watcher and writer processes, and of everything else on the machine (other
  engineers share these 2 cores); bytes the federation wrote per second (`wchar` of
  /proc/PID/io: with uvloop every socket write is a write/writev, so it counts them; its log is
  at warning level).
A phase is saturated when fewer than 90% of its writes were acknowledged, p99 is above 1 s,
or fewer than 99% of its deliveries arrived; the report names the busiest component there.
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

import aiohttp
import uvloop

from bench import infra
from bench.fanout import PORT, serve_replica
from federation.client import FederationClient, load_federation_bundle
from federation.server.tokens import create_token
from federation.store.base import open_store
from federation.tls import client_context
from tests.helpers.etcd import Etcd
from tests.helpers.federation import make_cluster

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = 7  # every 7th revision is timed at every watcher
WATCHER_PROCS = 4
JOIN_CONCURRENCY = 16


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]
    return (sum(v) - idle) / hz, sum(v) / hz


def _wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _cpu(pids: list[int]) -> float:
    return sum(infra.cpu_seconds(p) for p in pids if os.path.exists(f"/proc/{p}"))


class Probe:
    """CPU seconds of each group of processes, machine busy time and federation bytes, now."""

    def __init__(self, groups: dict[str, list[int]], feds: list[int]) -> None:
        self.groups, self.feds = groups, feds

    def read(self) -> dict:
        busy, _ = _machine_busy()
        return {"t": time.monotonic(), "busy": busy,
                "cpu": {g: _cpu(p) for g, p in self.groups.items()},
                "fed_cpu": [_cpu([p]) for p in self.feds],
                "wchar": sum(_wchar(p) for p in self.feds if os.path.exists(f"/proc/{p}"))}


def _pct(a: dict, b: dict) -> dict:
    dt = b["t"] - a["t"]
    ours = sum(b["cpu"][g] - a["cpu"][g] for g in a["cpu"])
    return {"cpu_pct": {g: round(100 * (b["cpu"][g] - a["cpu"][g]) / dt) for g in a["cpu"]},
            "fed_cpu_pct": [round(100 * (y - x) / dt)
                            for x, y in zip(a["fed_cpu"], b["fed_cpu"], strict=True)],
            "others_pct": round(100 * (b["busy"] - a["busy"] - ours) / dt),
            "fed_mb_per_s": round((b["wchar"] - a["wchar"]) / dt / 1e6, 2)}


def _quantile(xs: list[float], q: float) -> float | None:
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else None


async def _join_all(url: str, bundle, store_url: str, n: int, tmp: Path) -> list[dict]:
    store = open_store(store_url)
    await store.open()
    gate = asyncio.Semaphore(JOIN_CONCURRENCY)
    out: list[dict] = []
    async with FederationClient(url, bundle, timeout=30.0) as anon:

        async def one(i: int) -> None:
            c = make_cluster(f"c{i:04d}", region=f"r{i % 4}", zone="a")
            async with gate:
                token, _ = await create_token(store, c.name, 600.0, time.time())
                await anon.join(token, c.record, c.bundle(1))
            cert, key = tmp / f"{c.name}.pem", tmp / f"{c.name}-key.pem"
            cert.write_bytes(c.svid.cert_pem)
            key.touch(mode=0o600)
            key.write_bytes(c.svid.key_pem)
            out.append({"name": c.name, "cert": str(cert), "key": str(key)})

        await asyncio.gather(*(one(i) for i in range(n)))
    await store.close()
    return sorted(out, key=lambda c: c["name"])


async def _revision(store_url: str) -> int:
    store = open_store(store_url)
    await store.open()
    try:
        return await store.revision()
    finally:
        await store.close()


async def _snapshot_bytes(url: str, bundle, cluster: dict) -> tuple[int, float]:
    from federation.identity import Svid

    svid = Svid.from_pem(Path(cluster["cert"]).read_bytes(), Path(cluster["key"]).read_bytes())
    t = time.monotonic()
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=client_context(svid, bundle))) as s, s.get(url + "/v1/catalog") as r):
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"GET /v1/catalog: HTTP {r.status}: {body[:300]!r}")
    return len(body), time.monotonic() - t


async def run(tmp: Path, a: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load0 = os.getloadavg()
    etcd = None
    if a.store == "etcd":
        etcd = Etcd(tmp)
        etcd.start()
    store_url = etcd.url if etcd else f"sqlite:{tmp / 'fed' / 'federation.db'}"
    feds = [serve_replica(tmp, 0, etcd.url if etcd else None, env, lease_ttl="120s")]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(1, a.replicas):
            feds.append(serve_replica(tmp, i, store_url, env, lease_ttl="120s"))
        urls = [f"https://127.0.0.1:{PORT + 2 * i}" for i in range(a.replicas)]
        ca = tmp / "fed" / "ca.pem"
        bundle = load_federation_bundle(ca)
        (tmp / "svids").mkdir()
        t = time.monotonic()
        clusters = await _join_all(urls[0], bundle, store_url, a.clusters, tmp / "svids")
        joined_s = time.monotonic() - t
        rss_empty = max(infra.rss_mib(f.pid) for f in feds)
        phases = [[r, a.step] for r in a.rates]
        writers: list[subprocess.Popen] = []
        for w in range(a.writers):
            spec = {"urls": urls[w % len(urls):] + urls[:w % len(urls)], "ca": str(ca),
                    "clusters": clusters[w::a.writers], "services": a.services,
                    "endpoints": a.endpoints, "lease_ttl": 120.0, "seed": w,
                    "phases": [[r / a.writers, s] for r, s in phases],
                    "loaded": str(tmp / f"loaded{w}"), "go": str(tmp / "go"),
                    "out": str(tmp / f"writer{w}.json")}
            (tmp / f"writer{w}.spec").write_text(json.dumps(spec))
            writers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.churn_writer", str(tmp / f"writer{w}.spec")],
                env=env, stdout=open(tmp / f"writer{w}.log", "w"), stderr=subprocess.STDOUT))
        procs += writers
        deadline = time.monotonic() + a.load_timeout
        while not all((tmp / f"loaded{w}").exists() for w in range(a.writers)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in writers):
                tails = "".join(f"\nwriter{w}: " + (tmp / f"writer{w}.log").read_text()[:3000]
                                for w, p in enumerate(writers) if p.poll() is not None)
                tails += "\nfederation: " + (tmp / "fed0.log").read_text()[-3000:]
                raise RuntimeError(f"load did not finish:{tails}")
            await asyncio.sleep(0.2)
        load = [json.loads((tmp / f"loaded{w}").read_text()) for w in range(a.writers)]
        rss_loaded = max(infra.rss_mib(f.pid) for f in feds)
        snap_bytes, snap_s = await _snapshot_bytes(urls[0], bundle, clusters[0])
        rss_after_snapshot = max(infra.rss_mib(f.pid) for f in feds)
        start_rev = await _revision(store_url)
        churn_s = a.step * len(phases)
        watch_deadline = time.time() + 5.0 + churn_s + a.drain
        watchers: list[subprocess.Popen] = []
        per = a.watchers // WATCHER_PROCS
        for i in range(WATCHER_PROCS):
            spec = {"url": urls[i % len(urls)], "ca": str(ca), "cert": clusters[i]["cert"],
                    "key": clusters[i]["key"], "n": per, "start": start_rev,
                    "sample": SAMPLE, "deadline": watch_deadline,
                    "out": str(tmp / f"watcher{i}.json")}
            (tmp / f"watcher{i}.spec").write_text(json.dumps(spec))
            watchers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.churn_watcher", str(tmp / f"watcher{i}.spec")],
                env=env, stdout=open(tmp / f"watcher{i}.log", "w"), stderr=subprocess.STDOUT))
        procs += watchers
        await asyncio.sleep(5.0)  # every watcher connected and long-polling
        groups = {"etcd": [etcd.proc.pid] if etcd else [],
                  "watchers": [p.pid for p in watchers], "writers": [p.pid for p in writers]}
        probe = Probe({"federation": [f.pid for f in feds], **groups}, [f.pid for f in feds])
        t0 = time.time() + 0.5
        (tmp / "go").write_text(repr(t0))
        await asyncio.sleep(max(0.0, t0 - time.time()))
        marks = [probe.read()]
        for _ in phases:
            await asyncio.sleep(a.step)
            marks.append(probe.read())
        rss_churn = max(infra.rss_mib(f.pid) for f in feds)
        for p in procs:
            p.wait(timeout=a.drain + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                infra.stop(p)
        for f in feds:
            infra.stop(f)
        if etcd is not None:
            etcd.stop()
    acks, refused, skipped = [], [0] * len(phases), [0] * len(phases)
    why: list[list[str]] = [[] for _ in phases]
    for w in range(a.writers):
        out = json.loads((tmp / f"writer{w}.json").read_text())
        acks += out["acks"]
        refused = [x + y for x, y in zip(refused, out["refused"], strict=True)]
        skipped = [x + y for x, y in zip(skipped, out["skipped"], strict=True)]
        why = [(x + y)[:3] for x, y in zip(why, out["why"], strict=True)]
    seen: dict[int, list[float]] = {}
    answers = events = out_of_order = 0
    for i in range(WATCHER_PROCS):
        out = json.loads((tmp / f"watcher{i}.json").read_text())
        answers += out["answers"]
        events += out["events"]
        out_of_order += out["out_of_order"]
        for rev, times in out["seen"].items():
            seen.setdefault(int(rev), []).extend(times)
    n_watchers = per * WATCHER_PROCS
    rows = []
    for k, (rate, secs) in enumerate(phases):
        mine = [(rev, t) for rev, t, ph in acks if ph == k]
        lat: list[float] = []
        expected = 0
        for rev, t_ack in mine:
            if rev % SAMPLE == 0:
                expected += n_watchers
                lat += [x - t_ack for x in seen.get(rev, [])]
        lat.sort()
        rows.append({"rate": rate, "seconds": secs, "acked_per_s": round(len(mine) / secs),
                     "refused": refused[k], "skipped": skipped[k], "refusals": why[k],
                     "p50_ms": _ms(_quantile(lat, 0.5)), "p99_ms": _ms(_quantile(lat, 0.99)),
                     "max_ms": _ms(lat[-1] if lat else None),
                     "delivered": round(len(lat) / expected, 4) if expected else None,
                     **_pct(marks[k], marks[k + 1])})
    from bench.churn_writer import export

    one = export("c0000", 0, a.endpoints)
    event_bytes = len(json.dumps({"type": "put", "key": one.key, "value": one.to_json(),
                                  "revision": acks[-1][0] if acks else 1}))
    return {"clusters": a.clusters, "services": a.services, "endpoints_per_export": a.endpoints,
            "endpoints": a.clusters * a.services * a.endpoints, "watchers": n_watchers,
            "store": a.store, "replicas": a.replicas, "writers": a.writers,
            "join_s": round(joined_s, 1), "load_s": round(max(x["seconds"] for x in load), 1),
            "load_puts": sum(x["puts"] for x in load),
            "load_retries": sum(x["retries"] for x in load),
            "rss_mib": {"joined": round(rss_empty), "loaded": round(rss_loaded),
                        "after_snapshot": round(rss_after_snapshot), "churn": round(rss_churn)},
            "snapshot_bytes": snap_bytes, "snapshot_s": round(snap_s, 2),
            "watch_event_bytes": event_bytes,
            "watch_answers": answers, "watch_events": events,
            "watch_events_out_of_order": out_of_order,
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "phases": rows}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000)


def saturation(r: dict) -> str:
    for row in r["phases"]:
        bad = []
        if row["acked_per_s"] < 0.9 * row["rate"]:
            bad.append(f"{row['acked_per_s']} of {row['rate']} writes/s acknowledged")
        if row["p99_ms"] is None or row["p99_ms"] > 1000:
            bad.append(f"p99 {row['p99_ms']} ms")
        if row["delivered"] is not None and row["delivered"] < 0.99:
            bad.append(f"{row['delivered']:.1%} delivered")
        if bad:
            busiest = max(row["cpu_pct"].items(), key=lambda kv: kv[1])
            return (f"saturated at {row['rate']} writes/s ({'; '.join(bad)}); busiest there: "
                    f"{busiest[0]} at {busiest[1]}% of a core (federation per replica "
                    f"{row['fed_cpu_pct']}%, etcd {row['cpu_pct']['etcd']}%, others on the "
                    f"machine {row['others_pct']}%), federation writing "
                    f"{row['fed_mb_per_s']} MB/s")
    return "not saturated at any rate tried"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--endpoints", type=int, default=5, help="per export")
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--writers", type=int, default=4, help="writer processes")
    ap.add_argument("--rates", default="20,100,400", help="writes per second, one per phase")
    ap.add_argument("--step", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--drain", type=float, default=10.0, help="seconds watchers go on after")
    ap.add_argument("--load-timeout", type=float, default=600.0)
    ap.add_argument("--store", choices=("sqlite", "etcd"), default="etcd")
    ap.add_argument("--replicas", type=int, default=1)
    a = ap.parse_args()
    a.rates = [float(x) for x in a.rates.split(",")]
    bounds = ((a.clusters, 1, 5000), (a.services, 1, 100), (a.endpoints, 1, 100),
              (a.watchers, WATCHER_PROCS, 5000), (a.writers, 1, 16), (a.replicas, 1, 5))
    if any(not lo <= v <= hi for v, lo, hi in bounds) or not 0 < a.step <= 120 or any(
            not 0 < r <= 5000 for r in a.rates) or len(a.rates) > 8:
        ap.error("out of bounds: clusters 1..5000, services 1..100, endpoints 1..100, watchers "
                 "4..5000, writers 1..16, replicas 1..5, step 0..120 s, at most 8 rates "
                 "0..5000/s")
    if a.replicas > 1 and a.store != "etcd":
        ap.error("--replicas needs --store etcd")
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-churn-") as d:
        r = uvloop.run(run(Path(d), a))
    print(json.dumps(r))
    print(f"{r['clusters']} clusters x {r['services']} services x {r['endpoints_per_export']} "
          f"endpoints = {r['endpoints']} endpoints, {r['watchers']} watchers, {r['store']}, "
          f"{r['replicas']} replica(s); load {r['load_puts']} puts in {r['load_s']} s "
          f"({r['load_retries']} retried); "
          f"federation RSS {r['rss_mib']} MiB; snapshot {r['snapshot_bytes']} bytes in "
          f"{r['snapshot_s']} s, one watch event {r['watch_event_bytes']} bytes")
    for row in r["phases"]:
        print(f"  {row['rate']:.0f}/s: acked {row['acked_per_s']}/s (refused {row['refused']}, "
              f"skipped {row['skipped']}), p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
              f"delivered {row['delivered']}, CPU {row['cpu_pct']} fed {row['fed_cpu_pct']}, "
              f"others {row['others_pct']}%, federation {row['fed_mb_per_s']} MB/s")
    print(saturation(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
