"""One watcher process of `bench.churn`: `python -m bench.churn_watcher SPEC.json`.

N long-poll watchers (the gateways' `FederationClient.watch`, mutual TLS with one cluster's
SVID) sharing CONNECTIONS clients (each with its own pool of TLS connections) to one
federation replica, from `start` (a revision)
until `deadline` (wall clock). Each watcher records, for the sampled revisions (revision %
`sample` == 0) of export events, the wall-clock time it had them; and every watcher counts
its answers and events. Out: {"seen": {revision: [times]}, "answers": n, "events": n,
"behind": [last revision of each watcher]}. A watch that fails is retried after 0.2 s.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import uvloop

from federation.client import FederationClient, load_federation_bundle
from federation.errors import FederationError
from federation.identity import Svid
from federation.model import EXPORTS

CONNECTIONS = 25


async def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    svid = Svid.from_pem(Path(spec["cert"]).read_bytes(), Path(spec["key"]).read_bytes())
    bundle = load_federation_bundle(Path(spec["ca"]))
    clients = [FederationClient(spec["url"], bundle, svid, timeout=30.0)
               for _ in range(CONNECTIONS)]
    sample, deadline = spec["sample"], spec["deadline"]
    seen: dict[int, list[float]] = {}
    counts = {"answers": 0, "events": 0}
    last: list[int] = []

    async def one(i: int) -> None:
        c, after = clients[i % CONNECTIONS], spec["start"]
        while (left := deadline - time.time()) > 0:
            try:
                after, events = await c.watch(after, min(5.0, left))
            except FederationError:
                await asyncio.sleep(0.2)
                continue
            now = time.time()
            counts["answers"] += 1
            counts["events"] += len(events)
            for ev in events:
                if ev.revision % sample == 0 and ev.key.startswith(EXPORTS):
                    seen.setdefault(ev.revision, []).append(now)
        last.append(after)

    await asyncio.gather(*(one(i) for i in range(spec["n"])))
    Path(spec["out"]).write_text(json.dumps({"seen": seen, **counts, "behind": last}))
    for c in clients:
        await c.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
