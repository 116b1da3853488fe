"""One watcher process of `bench.churn`: `python -m bench.churn_watcher SPEC.json`.

N long-poll watchers (the gateways' `FederationClient.watch`, mutual TLS with one cluster's
SVID) sharing CONNECTIONS clients (each with its own pool of TLS connections) to one
federation replica, from `start` (a revision)
until `deadline` (wall clock). Each watcher records, for the sampled revisions (revision %
`sample` == 0) of export events, the wall-clock time it had them; and every watcher counts
its answers and events, and the events at or below a revision it already had (a duplicate or
out of order: must be 0). Out: {"seen": {revision: [times]}, "answers": n, "events": n,
"out_of_order": n, "behind": [last revision of each watcher]}. A watch that fails is retried
after 0.2 s.
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
    counts = {"answers": 0, "events": 0, "out_of_order": 0}
    last: list[int] = []

    async def one(i: int) -> None:
        c, after = clients[i % CONNECTIONS], spec["start"]
        prev, at_prev = after, set()
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
                # below a revision this watcher had, or the same key at it again (one revision
                # may delete several keys: a lease's)
                if ev.revision < prev or (ev.revision == prev and ev.key in at_prev):
                    counts["out_of_order"] += 1
                first = ev.revision != prev  # time a revision once, however many keys
                at_prev = {ev.key} if first else at_prev | {ev.key}
                prev = ev.revision
                if first and ev.revision % sample == 0 and ev.key.startswith(EXPORTS):
                    seen.setdefault(ev.revision, []).append(now)
        last.append(after)

    await asyncio.gather(*(one(i) for i in range(spec["n"])))
    Path(spec["out"]).write_text(json.dumps({"seen": seen, **counts, "behind": last}))
    for c in clients:
        await c.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
