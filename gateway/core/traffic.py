"""Where an import's connections went: listener counters -> flows by destination, tier, result.

An import listener counts connections per target key (`served_by`, `response_timeouts_by`) and
connections no candidate took (`failed`); dataplane/dial.py `ListenerStats`. A flow names them
the way an operator reads a service map:

    source       this cluster
    destination  the target's cluster: `local:<host:port>` is our own, `remote:<C>` is C;
                 "none" for a failed connection (no target took it)
    tier         the tier that target is in now (tiers follow locality, which a target keeps,
                 so this is the tier it was served from unless the policy was reloaded since);
                 "none" for failed connections and targets no tier holds any more
    result       served | response_timeout (reset: the target never answered) | failed

An HTTP import (protocol: http) counts requests instead, per (route, backend cluster) and
status class (`http.routes[].classes`, dataplane/http/host.py): its flows have unit
"requests", destination the backend cluster ("none": no backend answered), tier the tier that
cluster's gateway (or our own endpoints) is in, and result served (1xx-4xx) or failed (5xx,
or no response: the client left first or no backend could be reached).

Counters add up across workers (each worker's listener of the same import). The same flows
feed `isthmus_gateway_import_connections_total` (and `..._import_requests_total`) and the report
to the federation (the dashboard's service map). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.core.balance import Tier

__all__ = ["Flow", "flows", "destination"]


@dataclass(frozen=True, slots=True)
class Flow:
    source: str
    destination: str
    service: str
    tier: str
    result: str
    count: int
    unit: str = "connections"  # or "requests" (HTTP imports)

    def labels(self) -> dict[str, str]:
        return {"source": self.source, "destination": self.destination,
                "service": self.service, "tier": self.tier, "result": self.result}


def destination(key: str, me: str) -> str:
    """The cluster a target key points at."""
    if key.startswith("remote:"):
        return key.removeprefix("remote:")
    return me


def flows(me: str, service: str, tiers: Sequence[Tier],
          counters: Iterable[Mapping[str, Any]]) -> list[Flow]:
    """The flows of one import from its listeners' counters (one mapping per worker)."""
    tier_of = {t.key: tier.name for tier in tiers for t in tier.targets}
    tier_of_cluster = {t.locality.cluster: tier.name for tier in tiers for t in tier.targets}
    sums: dict[tuple[str, str, str], int] = {}
    http: dict[tuple[str, str, str, str], int] = {}
    for st in counters:
        for result, field in (("served", "served_by"), ("response_timeout",
                                                        "response_timeouts_by")):
            for key, n in (st.get(field) or {}).items():
                k = (destination(key, me), tier_of.get(key, "none"), result)
                sums[k] = sums.get(k, 0) + int(n)
        failed = int(st.get("failed", 0))
        if failed:
            sums[("none", "none", "failed")] = sums.get(("none", "none", "failed"), 0) + failed
        for r in (st.get("http") or {}).get("routes", ()):
            cluster, classes = r.get("cluster") or "", r.get("classes") or [0] * 6
            dest = cluster or "none"
            tier = tier_of_cluster.get(cluster, "none")
            for result, n in (("served", sum(classes[1:5])), ("failed", classes[0] + classes[5])):
                if n:
                    k = (dest, tier, result, "requests")
                    http[k] = http.get(k, 0) + int(n)
    return ([Flow(me, d, service, t, r, n) for (d, t, r), n in sorted(sums.items())]
            + [Flow(me, d, service, t, r, n, u) for (d, t, r, u), n in sorted(http.items())])
