"""Admin endpoints: /healthz, /readyz, /metrics (Prometheus text), /status (JSON).

They are served on the admin port (plain HTTP, `admin_limits`) and, except /status which there
needs a cluster or operator SVID, on the TLS port too. /readyz is ready once the store is open
and the TLS listener bound. /metrics counts every answer by route and status (the middleware),
refusals for the caller's identity, long-polls, and each port's connection stats.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from aiohttp import web

from federation import api
from federation.errors import StoreError
from federation.http_serving import ServingStats, serving_metrics
from federation.metrics import Exposition
from federation.model import LIVE
from federation.server.auth import Auth
from federation.server.catalog import CatalogView
from federation.server.state import REPLICAS, State

ADMIN = web.AppKey("admin", bool)  # True in the admin port's app


class Admin:
    def __init__(self, state: State, auth: Auth, catalog: CatalogView,
                 ports: Callable[[], Mapping[str, ServingStats]]) -> None:
        self.state = state
        self.auth = auth
        self.catalog = catalog
        self.ports = ports  # the stats of each bound port, by name ("api", "admin")

    async def h_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def h_readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.state.store_open:
            problems.append("store not open")
        if not self.state.bound:
            problems.append("TLS listener not bound")
        if problems:
            return web.Response(text="not ready: " + ", ".join(problems) + "\n", status=503)
        return web.Response(text="ready\n")

    async def h_metrics(self, request: web.Request) -> web.Response:
        state = self.state
        rev = await state.store.revision() if state.store_open else 0
        live = 0
        if state.store_open:
            kvs, _ = await state.store.range(LIVE)
            live = len(kvs)
        page = Exposition()
        page.counter("isthmus_federation_requests_total",
                     "HTTP requests by route and status code.",
                     [({"route": route, "code": code}, n)
                      for (route, code), n in sorted(state.requests.items())])
        page.counter("isthmus_federation_authz_denied_total",
                     "Requests refused for the caller's identity.", [({}, state.denied)])
        page.gauge("isthmus_federation_watchers", "Long-polls in progress.",
                   [({}, state.watchers)])
        page.gauge("isthmus_federation_revision", "Latest store revision.", [({}, rev)])
        page.gauge("isthmus_federation_clusters", "Joined clusters.",
                   [({}, len(state.records))])
        page.gauge("isthmus_federation_live_clusters", "Clusters holding a live lease.",
                   [({}, live)])
        page.histogram_of("isthmus_federation_request_duration_seconds",
                          "Time to answer one API request (long-polls of /v1/watch excluded).",
                          state.request_seconds)
        drills = await self.catalog.snapshot() if state.store_open else None
        by_state = {"running": 0, "ended": 0, "aborted": 0}
        for d in (drills.drills.values() if drills is not None else ()):
            by_state[d.state] = by_state.get(d.state, 0) + 1
        page.gauge("isthmus_federation_drills", "Drills in the store, by state (running, ended, "
                   "aborted).", [({"state": k}, n) for k, n in sorted(by_state.items())])
        now = state.clock()
        page.gauge("isthmus_federation_report_age_seconds",
                   "Seconds since each cluster's gateway last reported its traffic (dashboard).",
                   [({"cluster": c}, round(now - rep.at, 3))
                    for c, (_, rep) in sorted(state.reports.items())])
        serving_metrics(page, "isthmus_federation_http", self.ports())
        return web.Response(
            body=page.text().encode(),
            headers={"Content-Type": api.METRICS_CONTENT_TYPE,
                     "X-Content-Type-Options": "nosniff"},
        )

    async def h_status(self, request: web.Request) -> web.Response:
        if not request.app[ADMIN]:
            self.auth.caller(request)
        return web.json_response(await self.status())

    async def status(self) -> dict:
        """/status as a dict (the dashboard's state builds on it)."""
        cat = await self.catalog.snapshot()
        now = self.state.clock()
        clusters = {}
        for name, rec in sorted(cat.clusters.items()):
            renewed = self.state.renewed.get(name)
            clusters[name] = {
                "region": rec.region,
                "zone": rec.zone,
                "trust_domain": rec.trust_domain,
                "gateway_address": rec.gateway_address,
                "bundle_sequence": _bundle_field(cat, rec.trust_domain, "spiffe_sequence"),
                "bundle_authorities": len(_bundle_field(cat, rec.trust_domain, "keys") or ()),
                "live": name in cat.live,
                "lease_age_seconds": None if renewed is None else round(now - renewed, 3),
                "admin": (rep := self.state.reports.get(name)) and rep[1].admin,
                "report_age_seconds": None if rep is None else round(now - rep[1].at, 3),
                "tunnel": None if rec.tunnel is None else {
                    "public_key": rec.tunnel.public_key[:8] + "…",
                    "endpoint": rec.tunnel.endpoint,
                    "overlay_address": rec.tunnel.overlay_address,
                    "rotating": bool(rec.tunnel.next_public_key),
                },
            }
        services: dict[str, dict[str, list]] = {}
        for _, exp in sorted(cat.exports.items()):
            services.setdefault(str(exp.service), {})[exp.cluster] = [
                e.to_json() for e in exp.endpoints
            ]
        return {
            "revision": cat.revision,
            "trust_domain": self.state.trust_domain,
            "clusters": clusters,
            "services": services,
            "store": await self._store_status(),
        }

    async def _store_status(self) -> dict:
        """The store (SQLite file, or etcd members and the one in use) and, on a shared store,
        the federation replicas serving from it."""
        store = self.state.store
        out = dict(await store.describe())
        if getattr(store, "shared", False):
            try:
                kvs, _ = await store.range(REPLICAS)
                out["replicas"] = [json.loads(kv.value) for kv in kvs]
            except (StoreError, ValueError):
                out["replicas"] = []
        return out


def _bundle_field(cat, td: str, field: str):
    bundle = cat.bundles.get(td)
    return bundle.get(field) if bundle is not None else None
