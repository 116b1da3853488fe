"""Durability: SIGKILL the federation during a stream of writes; every acknowledged write survives.

`python -m bench.durability [--store sqlite|etcd|both] [--kills 50] [--seed 1] [--writers 4]`

One `isthmus federation serve` process (the real command, on SQLite in a temporary directory or
on a real one-member etcd) and one cluster, east-1, joined with a real join token and writing
through the real API with its own SVID (mutual TLS):

* `writers` concurrent export writers, each PUTting a new export `w<writer>-<n>` in a loop;
* one bundle writer PUTting east-1's trust bundle with sequence 2, 3, 4, ... in a loop.

A write is *acknowledged* when the federation answered 2xx. Then, `kills` times: wait until at
least one write has been acknowledged since the last restart, sleep a seeded random 0-400 ms
(so the kill lands at a random point of some write: in the handler, inside the store's
transaction, between commit and answer), SIGKILL the federation by its PID, start it again on the
same state (store, CA, credentials), wait until `/readyz` answers and check, through the API,
that every export acknowledged so far is in the catalog and east-1's bundle sequence is at least
the last acknowledged one. A write that failed (connection reset, no answer) is not
acknowledged: it may or may not be there, both are fine. A write answered with a status other
than 2xx while the federation was up is counted as `refused` and shown.

The lease TTL is 10 minutes so no lease ends during the run: exports live on the cluster's
lease, and a lease expiring would withdraw them on purpose (that is not a loss). The report:
kills, acknowledged writes, writes lost (must be 0), refused writes, restart time (p50/max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from federation.client import FederationClient, load_federation_bundle
from federation.errors import FederationError
from federation.model import Endpoint, Export
from federation.server.app import create_token
from federation.store.base import open_store
from tests.helpers.etcd import Etcd
from tests.helpers.federation import Cluster, make_cluster
from tests.helpers.processes import Proc, free_port, isthmus_cmd
from tests.helpers.traffic import http_get

LEASE_TTL = "10m"
KILL_DELAY = (0.0, 0.4)  # seconds after the first acknowledged write since the restart
READY_TIMEOUT = 30.0


@dataclass
class Report:
    store: str
    kills: int = 0
    acknowledged_exports: int = 0
    acknowledged_bundles: int = 0
    unanswered: int = 0  # attempts with no answer: killed under the write, or still down
    refused: list[str] = field(default_factory=list)  # non-2xx answers while up
    lost: list[str] = field(default_factory=list)  # acknowledged, absent after a restart
    restart_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        r = sorted(self.restart_seconds) or [0.0]
        return {"store": self.store, "kills": self.kills,
                "acknowledged_writes": self.acknowledged_exports + self.acknowledged_bundles,
                "acknowledged_exports": self.acknowledged_exports,
                "acknowledged_bundles": self.acknowledged_bundles,
                "unanswered": self.unanswered, "refused": len(self.refused),
                "writes_lost": len(self.lost), "restart_p50_s": round(statistics.median(r), 3),
                "restart_max_s": round(r[-1], 3), "seconds": round(self.seconds, 1),
                "lost_first": self.lost[:5], "refused_first": self.refused[:5]}


class Federation:
    """The `federation serve` process on fixed ports and state, killed and restarted by PID."""

    def __init__(self, root: Path, store_url: str) -> None:
        self.root = root
        self.port, self.admin = free_port(), free_port()
        self.store_url = store_url
        self.proc = Proc("federation", [
            *isthmus_cmd(), "federation", "serve", "--listen", f"127.0.0.1:{self.port}",
            "--admin", f"127.0.0.1:{self.admin}", "--store", store_url,
            "--state-dir", str(root / "state"), "--lease-ttl", LEASE_TTL,
            "--log-level", "warning"], root / "federation.log")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start and wait for /readyz; returns the seconds it took."""
        t0 = time.monotonic()
        self.proc.start()
        while time.monotonic() - t0 < READY_TIMEOUT:
            if not self.proc.running:
                raise RuntimeError(f"federation exited:\n{self.proc.tail()}")
            try:
                status, _ = await http_get(self.admin, "/readyz", timeout=1.0)
                if status == 200:
                    return time.monotonic() - t0
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError(f"federation not ready within {READY_TIMEOUT}s:\n{self.proc.tail()}")


class Writers:
    """The write streams; each acknowledged write is remembered."""

    def __init__(self, client: FederationClient, cluster: Cluster, report: Report,
                 writers: int) -> None:
        self.client, self.cluster, self.report = client, cluster, report
        self.exports: set[str] = set()  # store keys of acknowledged exports
        self.bundle_sequence = 1  # last acknowledged
        self.since_restart = 0
        self.stop = asyncio.Event()
        self.n = writers

    async def _attempt(self, what: str, write) -> bool:
        try:
            await write()
        except FederationError as e:
            if e.status is None:
                self.report.unanswered += 1
                await asyncio.sleep(0.02)  # down: try again soon (restarts take ~1 s)
            else:
                self.report.refused.append(f"{what}: HTTP {e.status}: {e}")
            return False
        self.since_restart += 1
        return True

    async def export_writer(self, w: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            e = Export(self.cluster.name, "default", f"w{w}-{i}", 8080, "tcp",
                       (Endpoint("127.0.0.1", 20000 + i % 10000),))
            if await self._attempt(e.key, lambda e=e: self.client.put_export(e)):
                self.exports.add(e.key)
                self.report.acknowledged_exports += 1

    async def bundle_writer(self) -> None:
        seq = 1
        while not self.stop.is_set():
            seq += 1
            bundle = self.cluster.bundle(seq)
            if await self._attempt(f"bundle {seq}",
                                   lambda b=bundle: self.client.put_bundle(self.cluster.name, b)):
                self.bundle_sequence = seq
                self.report.acknowledged_bundles += 1

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for w in range(self.n):
                tg.create_task(self.export_writer(w))
            tg.create_task(self.bundle_writer())


async def check(client: FederationClient, cluster: Cluster, acked: set[str], sequence: int,
                report: Report) -> None:
    """Every acknowledged export (`acked`: store keys) is in the catalog, and the cluster's bundle
    sequence is at least the last acknowledged one; each miss is added to `report.lost`."""
    cat = await client.catalog()
    where = f"after kill {report.kills}"
    report.lost += [f"{where}: export {k}" for k in sorted(acked - set(cat.exports))]
    held = cat.bundles.get(cluster.td) or cat.bundles.get(cluster.name) or {}
    have = int(held.get("spiffe_sequence", 0))
    if have < sequence:
        report.lost.append(f"{where}: bundle sequence {have} < acknowledged {sequence}")


async def run(store: str, kills: int, seed: int, root: Path, writers: int = 4) -> Report:
    """`kills` SIGKILLs of a federation on `store` ("sqlite" or "etcd") under writes."""
    rng = random.Random(seed)
    report = Report(store)
    t_start = time.monotonic()
    etcd = None
    if store == "etcd":
        etcd = Etcd(root)
        etcd.start()
        url = etcd.url
    else:
        url = f"sqlite:{root / 'fed.db'}"
    fed = Federation(root, url)
    cluster = make_cluster("east-1")
    clients: list[FederationClient] = []
    try:
        await fed.start()
        st = open_store(url)
        await st.open()
        try:
            token, _ = await create_token(st, cluster.name, 600, time.time())
        finally:
            await st.close()
        bundle = load_federation_bundle(root / "state" / "ca.pem")
        anon = FederationClient(fed.url, bundle, timeout=5.0)
        me = FederationClient(fed.url, bundle, cluster.svid, timeout=2.0)
        clients += [anon, me]
        await anon.join(token, cluster.record, cluster.bundle(1))
        await me.grant_lease(cluster.name)
        w = Writers(me, cluster, report, writers)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(w.run())
            try:
                for _ in range(kills):
                    while w.since_restart == 0:
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(rng.uniform(*KILL_DELAY))
                    fed.proc.kill()
                    report.kills += 1
                    acked, seq = set(w.exports), w.bundle_sequence
                    report.restart_seconds.append(await fed.start())
                    w.since_restart = 0
                    await check(me, cluster, acked, seq, report)  # acknowledged at the kill
            finally:
                w.stop.set()
            await task
        # and everything acknowledged after the last restart
        await check(me, cluster, set(w.exports), w.bundle_sequence, report)
    finally:
        for c in clients:
            await c.close()
        fed.proc.stop()
        if etcd is not None:
            etcd.stop()
    report.seconds = time.monotonic() - t_start
    return report


def render(reports: list[Report]) -> str:
    lines = ["store   kills  acknowledged writes  unanswered attempts  refused  lost  "
             "restart p50/max  seconds"]
    for r in reports:
        s = r.summary()
        lines.append(f"{s['store']:<7} {s['kills']:>5}  {s['acknowledged_writes']:>19}  "
                     f"{s['unanswered']:>19}  {s['refused']:>7}  {s['writes_lost']:>4}  "
                     f"{s['restart_p50_s']:.2f}/{s['restart_max_s']:.2f} s    {s['seconds']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.split(
        "\n")[0])
    p.add_argument("--store", choices=("sqlite", "etcd", "both"), default="both")
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    stores = ("sqlite", "etcd") if args.store == "both" else (args.store,)
    reports = []
    for s in stores:
        with tempfile.TemporaryDirectory(prefix=f"isthmus-durability-{s}-") as tmp:
            reports.append(asyncio.run(run(s, args.kills, args.seed, Path(tmp), args.writers)))
    print(render(reports))
    for r in reports:
        for line in r.lost[:20] + r.refused[:20]:
            print(f"  {r.store}: {line}")
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in reports], indent=2) + "\n")
    return 0 if all(not r.lost and not r.refused for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
