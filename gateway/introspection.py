"""What a gateway says about itself: transition log lines, /status, /why, listener and worker
counters (for /metrics). `Introspection` is a part of `Gateway` (runtime.py): it only reads the
Gateway's state, and counts what it logs in `Observed` (failovers, health transitions, the
latest events: /metrics and the report to the federation's dashboard).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

from federation.model import ServiceKey
from federation.units import format_hostport
from gateway.control.workers import read_stats
from gateway.core.traffic import Flow, flows
from gateway.core.why import Health, excluded, explain
from gateway.dataplane.router import local_key, remote_key

log = logging.getLogger("isthmus.gateway")

RECENT = 32  # events kept for the federation's dashboard


class Observed:
    """Counts of the transitions `_log_transitions` logs, and the latest of them (bounded)."""

    def __init__(self) -> None:
        self.failovers: dict[str, int] = {}  # service -> active-tier changes
        self.health: dict[str, int] = {}  # HealthEvent kind -> count
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def event(self, at: float, kind: str, text: str, **fields: Any) -> None:
        self.recent.append({"at": round(at, 3), "kind": kind, "text": text, **fields})


class Introspection:
    """Reports of a Gateway (a mixin: the attributes are the Gateway's)."""

    cfg: Any
    events: Any
    book: Any
    export_routers: dict
    import_routers: dict
    listeners: list
    workers: int
    supervisor: Any
    observed: Observed

    def _log_transitions(self) -> None:
        """What the routers and the health book report as changed (router.py), one INFO line
        each, rate-limited per service and per target (both are bounded by config/catalog)."""
        me, events, seen, wall = self.cfg.cluster.name, self.events, self.observed, self.wall()
        for _, router in self.export_routers.values():
            router.take_switches()  # one tier (our endpoints): their health events say it all
        for router in self.import_routers.values():
            for sw in router.take_switches():
                key, where = f"tier:{sw.service}", f"import {sw.service} (cluster {me})"
                clusters = ", ".join(sw.clusters) or "none"
                svc = str(sw.service)
                if sw.old is not None and sw.old != sw.new:
                    seen.failovers[svc] = seen.failovers.get(svc, 0) + 1
                seen.event(wall, "failover", f"{svc}: tier {sw.old} -> {sw.new}"
                           f"{' (panic)' if sw.panic else ''}, clusters {clusters}",
                           service=svc, old=sw.old, new=sw.new, clusters=list(sw.clusters),
                           panic=sw.panic)
                if sw.new is None:
                    events.info(key, "%s: no candidate left in any tier (was %r)", where, sw.old)
                elif sw.panic:
                    events.info(key, "%s: no healthy target in any tier; trying the unhealthy ones "
                                "of tier %r (clusters %s)", where, sw.new, clusters)
                elif sw.old == sw.new:
                    events.info(key, "%s: healthy targets again in tier %r (clusters %s)", where,
                                sw.new, clusters)
                elif sw.old is None:
                    events.info(key, "%s: traffic goes to tier %r (clusters %s)", where, sw.new,
                                clusters)
                else:
                    events.info(key, "%s: traffic moves from tier %r to %r (clusters %s)", where,
                                sw.old, sw.new, clusters)
        for ev in self.book.take_events(self._mono()):
            key, what = f"health:{ev.key}", self._describe_target(ev.key)
            seen.health[ev.kind] = seen.health.get(ev.kind, 0) + 1
            seen.event(wall, "health", f"{what}: {ev.kind}", target=ev.key, health=ev.kind)
            if ev.kind == "ejected":
                events.info(key, "%s ejected for %.1fs after %d failed connect(s)", what,
                            ev.until - ev.at, ev.count)
            elif ev.kind == "returned":
                events.info(key, "%s back from ejection", what)
            else:
                bad, peer = ev.kind == "unhealthy", ev.key.startswith("remote:")
                state = ("lost" if bad else "back") if peer else (
                    "unhealthy" if bad else "healthy again")
                events.info(key, "%s %s after %d %s %s", what, state, ev.count,
                            "failed" if bad else "good", "probe(s)" if peer else "health check(s)")

    def _describe_target(self, key: str) -> str:
        """`peer gateway of cluster C (imports S, ...)` or `endpoint H:P of S (cluster ME)`."""
        if key.startswith("remote:"):
            cluster = key.removeprefix("remote:")
            svcs = [str(svc) for svc, r in self.import_routers.items()
                    if any(loc.cluster == cluster for loc, _ in r.remote)]
            return f"peer gateway of cluster {cluster} (imports {', '.join(svcs) or 'none'})"
        svcs = [str(svc) for svc, (_, r) in self.export_routers.items()
                if any(local_key(e.host, e.port) == key for e in r.local)]
        return (f"endpoint {key.removeprefix('local:')} of {', '.join(svcs) or 'no export'} "
                f"(cluster {self.cfg.cluster.name})")

    def flows(self) -> list[Flow]:
        """Every import's connections by destination, tier and result (core/traffic.py),
        summed over the workers."""
        per = [got["listeners"] for got in self.worker_stats().values()]
        me = self.cfg.cluster.name
        return [f for svc, router in self.import_routers.items()
                for f in flows(me, str(svc), router.tiers,
                               [ls[f"import {svc}"] for ls in per if f"import {svc}" in ls])]

    def report(self) -> dict[str, Any]:
        """The traffic report for the federation's dashboard (federation/traffic.py)."""
        host, port = self.cfg.listen.admin
        return {
            "admin": format_hostport("127.0.0.1" if host in ("0.0.0.0", "") else host, port),
            "flows": [{"destination": f.destination, "service": f.service, "tier": f.tier,
                       "result": f.result, "count": f.count, "unit": f.unit}
                      for f in self.flows()],
            "tiers": [{"service": str(svc), "active": r.state.active,
                       "panic": bool(r.tiers) and not any(t.eligible for t in r.tiers)}
                      for svc, r in self.import_routers.items()],
            "events": list(self.observed.recent),
        }

    def listener_stats(self) -> dict[str, dict[str, Any]]:
        return {lst.name: lst.counters() for lst in self.listeners}

    def worker_stats(self) -> dict[int, dict[str, Any]]:
        """Listener counters of every worker: 0 is this process (the primary), the others from
        their stats files (fresh ones only)."""
        out = {0: {"pid": os.getpid(), "listeners": self.listener_stats()}}
        if self.workers > 1:
            out.update(read_stats(self.cfg.state_dir, self.workers, time.time()))
        return out

    # -- introspection -----------------------------------------------------------------------
    def why(self, service: str) -> dict[str, Any] | None:
        """/why: core/why.py's explanation of import `service` ("ns/name", or a name in
        `default`) as the router sees it now; None when we import no such service."""
        ns, _, name = service.rpartition("/")
        svc = ServiceKey(ns or "default", name)
        router = self.import_routers.get(svc)
        if router is None:
            return None
        router.tick()
        now, book = self._mono(), self.book
        health = {}
        for k in {*book.active, *book.outlier}:
            o = book.outlier.get(k)
            health[k] = Health(book.state(k), book.ejected_until(k),
                               o.consecutive_failures if o is not None else 0)
        weights = {remote_key(loc.cluster): ex.healthy_weight() for loc, ex in router.remote}
        dropped = excluded(self.catalog, svc, self.cfg.cluster.name, self.gateways)
        w = explain(svc, router.caller, router.policy, router.targets(now), router.tiers,
                    router.state, health, now, weights, dropped)
        return {"cluster": self.cfg.cluster.name, **w.to_json(now)}

    def status(self) -> dict[str, Any]:
        now = self._mono()
        return {
            "cluster": self.cfg.cluster.name,
            "locality": {"region": self.locality.region, "zone": self.locality.zone},
            "trust_domain": self.cfg.cluster.trust_domain,
            "ready": self.ready and (self.agent is None or self.agent.not_ready() is None),
            "uptime_seconds": round(now - self.started_at, 1),
            "agent": self.agent.status() if self.agent else None,
            "catalog": {"revision": self.catalog.revision,
                        "clusters": sorted(self.catalog.clusters),
                        "live": sorted(self.catalog.live)},
            "imports": [self._import_status(r) for r in self.import_routers.values()],
            "exports": [e.to_json() for e in self.export_state()],
            "health": self.book.snapshot(now),
            "listeners": self.listener_stats(),
            "links": [*self.dialer.pool.describe(self.wall()), *self.inbound.describe(self.wall())]
            if self.inbound else [],
            "drills": self.drill_actor.status() if self.drill_actor else None,
            "workers": self._workers_status(),
            "restart": self.restart.status(),
            "config": self.reloads.status(),
            "dns": self.dns.describe() if self.dns is not None else None,
            "tunnel": self._tunnel_status(),
            "xds": self.xds.describe() if self.xds is not None else None,
        }

    def _import_status(self, router: Any) -> dict[str, Any]:
        """A router's tiers; for an HTTP import, its routes' effective policies too."""
        out = router.describe()
        im = next((i for i in self.cfg.imports
                   if (i.namespace, i.name) == (router.service.namespace, router.service.name)),
                  None)
        routes = self.policy_status(im) if im is not None else None  # type: ignore[attr-defined]
        if routes is not None:
            out["routes"] = routes
        return out

    def _workers_status(self) -> list[dict[str, Any]]:
        rows = [{"worker": 0, "pid": os.getpid(), "running": True, "restarts": 0}]
        if self.supervisor is not None:
            rows += self.supervisor.status()
        fresh = self.worker_stats()
        for row in rows:
            got = fresh.get(row["worker"])
            row["listeners"] = got["listeners"] if got else None
        return rows
