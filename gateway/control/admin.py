"""Admin endpoints of a gateway (aiohttp, off the data path): /healthz /readyz /metrics /status
/why (core/why.py: where the next connection of an import goes, and why).

Served by `federation.http_serving.BoundedSite` with `ADMIN_LIMITS` (header, body and idle
timeouts; at most 128 connections): a slow or junk client is closed and counted in
`isthmus_gateway_http_*`, and logged as one rate-limited line, never a traceback per request.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from federation.http_serving import (
    ADMIN_LIMITS,
    BoundedSite,
    ServingLimits,
    ServingStats,
    serving_metrics,
)
from federation.metrics import Exposition, Sample
from gateway.dataplane.http.host import BUCKETS

log = logging.getLogger("isthmus.gateway.admin")


def _http_metrics(page: Exposition, per: list[tuple[dict[str, str], dict[str, Any]]]) -> None:
    """HTTP imports (dataplane/http/listener.py): requests by route, backend cluster and status
    class, their latency, requests refused before routing, keep-alive race retries, the pool."""
    rows = [(lab, st["http"]) for lab, st in per if "http" in st]
    codes = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
    page.counter("isthmus_gateway_http_requests_total",
                 "HTTP requests answered, by route, backend cluster and status class (code "
                 "none: the client left first).",
                 [({**lab, "route": r["route"], "cluster": r["cluster"] or "none",
                    "code": codes[i]}, n)
                  for lab, h in rows for r in h["routes"] for i, n in enumerate(r["classes"])
                  if n])
    page.histograms("isthmus_gateway_http_request_duration_seconds",
                    "Time from a request's head to the end of its response, by route and "
                    "backend cluster.", BUCKETS,
                    [({**lab, "route": r["route"], "cluster": r["cluster"] or "none"},
                      r["buckets"], r["total"], r["count"]) for lab, h in rows
                     for r in h["routes"]])
    page.counter("isthmus_gateway_http_refused_total",
                 "HTTP requests refused before routing, by status (400 unparsable, 408 head too "
                 "slow, 414 target too long, 431 headers too large, 501 upgrade).",
                 [({**lab, "status": s}, n) for lab, h in rows
                  for s, n in sorted(h["refused"].items())])
    page.counter("isthmus_gateway_http_retries_total",
                 "Requests sent again, by route and reason: a route policy's retries "
                 "(connect-failure, reset, timeout, or the status retried), and reason "
                 "keepalive-race (route _any): a reused upstream connection closed before "
                 "answering.",
                 [({**lab, "route": "_any", "reason": "keepalive-race"}, h["retries"])
                  for lab, h in rows]
                 + [({**lab, "route": r["route"], "reason": r["reason"]}, r["count"])
                    for lab, h in rows for r in h.get("policy_retries", ())])
    page.counter("isthmus_gateway_http_retries_skipped_total",
                 "Failed tries a route policy did not retry, by reason (budget, method, "
                 "retry-after, deadline, body: streamed upstream, not held).",
                 [({**lab, "route": r["route"], "reason": r["reason"]}, r["count"])
                  for lab, h in rows for r in h.get("not_retried", ())])
    page.counter("isthmus_gateway_http_policy_denied_total",
                 "Requests a route policy answered itself, by policy and status (JWT 401/503, "
                 "OpenAPI 400/404/405/413/415).",
                 [({**lab, "route": r["route"], "policy": r["policy"],
                    "status": str(r["status"])}, r["count"])
                  for lab, h in rows for r in h.get("denied", ())])
    budgets = [({**lab, "route": b["route"], "backend": b["backend"]}, b)
               for lab, h in rows for b in h.get("budgets", ())]
    for key, what in (("requests", "Requests counted"), ("retries", "Retries spent"),
                      ("allowed", "Retries allowed")):
        page.gauge(f"isthmus_gateway_http_retry_budget_{key}",
                   f"{what} in the retry budget's current window, per route and backend.",
                   [(lab, b[key]) for lab, b in budgets])
    page.gauge("isthmus_gateway_http_upstream_idle", "Idle keep-alive upstream connections.",
               [(lab, h["pool"]["idle"]) for lab, h in rows])
    page.counter("isthmus_gateway_http_upstream_reused_total",
                 "Requests sent on a pooled keep-alive upstream connection.",
                 [(lab, h["pool"]["reused"]) for lab, h in rows])


def render_metrics(gw: Any, http: ServingStats | None = None) -> str:
    """Prometheus text exposition format (`federation.metrics`); `http`: the admin port's own
    connection counters."""
    page = Exposition()
    metric = page.family

    # Listener counters of every worker (only this process's with one worker); with several,
    # each series carries a `worker` label: sum without(worker) for the gateway's totals.
    several = getattr(gw, "workers", 1) > 1
    per: list[tuple[dict[str, str], dict[str, Any]]] = []
    for worker, got in sorted(gw.worker_stats().items()):
        for name, st in got["listeners"].items():
            per.append(({"listener": name, **({"worker": str(worker)} if several else {})}, st))

    def counter(key: str) -> list[Sample]:
        return [(lab, st.get(key, 0)) for lab, st in per]

    metric("isthmus_gateway_connections_accepted_total", "counter", "Connections accepted.",
           counter("accepted"))
    metric("isthmus_gateway_connections_active", "gauge", "Connections open now.",
           counter("active"))
    metric("isthmus_gateway_connections_failed_total", "counter",
           "Client connections closed because no candidate could be reached.", counter("failed"))
    metric("isthmus_gateway_connections_refused_limit_total", "counter",
           "Connections refused by the connection limit.", counter("refused_limit"))
    metric("isthmus_gateway_connections_idle_closed_total", "counter",
           "Connections closed by the idle timeout.", counter("idle_closed"))
    metric("isthmus_gateway_connect_attempts_total", "counter", "Connect attempts to targets.",
           counter("attempts"))
    metric("isthmus_gateway_connect_attempt_failures_total", "counter",
           "Connect attempts that failed (and moved to the next candidate).",
           counter("attempt_failures"))
    metric("isthmus_gateway_served_total", "counter", "Connections served, by target.",
           [({**lab, "target": t}, n) for lab, st in per
            for t, n in sorted(st.get("served_by", {}).items())])
    metric("isthmus_gateway_upstream_response_timeouts_total", "counter",
           "Connections reset because the target sent nothing within outlier_detection."
           "response_timeout of the client's first bytes (not counted as served).",
           [({**lab, "target": t}, n) for lab, st in per
            for t, n in sorted(st.get("response_timeouts_by", {}).items())])
    _http_metrics(page, per)
    spans = getattr(gw, "spans", None)
    if spans is not None:
        c = spans.counters()
        page.counter("isthmus_gateway_otlp_spans_total",
                     "HTTP spans by what became of them (exported; dropped: the queue was full; "
                     "failed: the collector did not take their batch).",
                     [({"result": k}, c[k]) for k in ("exported", "dropped", "failed")])
        page.gauge("isthmus_gateway_otlp_spans_queued", "HTTP spans waiting to be sent.",
                   [({}, c["queued"])])
    inbound = [({k: v for k, v in lab.items() if k != "listener"}, st)
               for lab, st in per if "denied" in st]
    metric("isthmus_gateway_inbound_identity_refused_total", "counter",
           "Inbound links refused because the peer SVID did not verify.",
           [(lab, st["identity_refused"]) for lab, st in inbound])
    metric("isthmus_gateway_inbound_handshake_failed_total", "counter",
           "Inbound links refused in the TLS handshake (certificate from no known CA, no client "
           "certificate, not TLS, timeout).",
           [(lab, st.get("handshake_failed", 0)) for lab, st in inbound])
    metric("isthmus_gateway_inbound_handshakes_refused_total", "counter",
           "Inbound connections closed unread because limits.inbound_max_handshakes TLS "
           "handshakes were in progress (a handshake flood).",
           [(lab, st.get("handshakes_refused", 0)) for lab, st in inbound])
    metric("isthmus_gateway_inbound_handshakes_in_progress", "gauge",
           "Inbound TLS handshakes in progress now.",
           [(lab, st.get("handshaking", 0)) for lab, st in inbound])
    metric("isthmus_gateway_inbound_denied_total", "counter",
           "Inbound streams refused because the consumer is not allowed.",
           [(lab, st["denied"]) for lab, st in inbound])
    # link lifecycle (gateway/core/links.py): the caller's pool and the answerer's links
    sides = [(lab, role, st.get(key) or {}) for lab, st in inbound
             for role, key in (("caller", "caller_links"), ("answerer", "links"))]
    metric("isthmus_gateway_links_replaced_total", "counter",
           "East-west links replaced make-before-break, by reason (caller: a new link took over; "
           "answerer: GOAWAY sent).",
           [({**lab, "role": role, "reason": r}, n) for lab, role, ls in sides
            for r, n in sorted(ls.get("replaced", {}).items())])
    metric("isthmus_gateway_links_closed_total", "counter",
           "East-west links aborted at once, by reason (cluster-removed, revoked, "
           "peer-cert-expired, own-cert-expired).",
           [({**lab, "role": role, "reason": r}, n) for lab, role, ls in sides
            for r, n in sorted(ls.get("closed", {}).items())])
    metric("isthmus_gateway_link_streams_reset_total", "counter",
           "Streams reset because their link was aborted (see links_closed).",
           [({**lab, "role": role}, ls.get("streams_reset", 0)) for lab, role, ls in sides])
    now = gw._mono()
    metric("isthmus_gateway_target_routable", "gauge", "1 if a target may get traffic now.",
           [({"target": k}, 1 if v["routable"] else 0) for k, v in gw.book.snapshot(now).items()])
    tiers: list[Sample] = []
    for router in gw.import_routers.values():
        active = router.state.active
        for tier in router.tiers:
            tiers.append(({"service": str(router.service), "tier": tier.name},
                          1 if tier.name == active else 0))
    metric("isthmus_gateway_tier_active", "gauge", "1 for the tier each import sends traffic to.",
           tiers)
    flows = gw.flows()
    metric("isthmus_gateway_import_connections_total", "counter",
           "Connections into import listeners, by source and destination cluster, service, tier "
           "and result (served, response_timeout, failed: destination and tier none).",
           [(f.labels(), f.count) for f in flows if f.unit == "connections"])
    metric("isthmus_gateway_import_requests_total", "counter",
           "Requests into HTTP import listeners, by source and backend cluster, service, tier "
           "and result (served: 1xx-4xx; failed: 5xx or no response).",
           [(f.labels(), f.count) for f in flows if f.unit == "requests"])
    seen = gw.observed
    metric("isthmus_gateway_failovers_total", "counter",
           "Times an import's active tier changed (failover or failback), by service.",
           [({"service": s}, n) for s, n in sorted(seen.failovers.items())])
    metric("isthmus_gateway_health_transitions_total", "counter",
           "Target health transitions, by kind (unhealthy, healthy, ejected, returned).",
           [({"kind": k}, n) for k, n in sorted(seen.health.items())])
    links = gw.dialer.pool.describe(gw.wall()) if gw.inbound is not None else []
    links += gw.inbound.describe(gw.wall()) if gw.inbound is not None else []
    up: dict[tuple[str, str], int] = {}
    for ln in links:
        if ln.get("state") == "active":
            k = (ln.get("role", "?"), ln.get("peer") or "?")
            up[k] = up.get(k, 0) + 1
    metric("isthmus_gateway_links_up", "gauge",
           "Active east-west links, by role (caller, answerer) and peer cluster.",
           [({"role": r, "peer": p}, n) for (r, p), n in sorted(up.items())])
    actor = getattr(gw, "drill_actor", None)
    if actor is not None:
        metric("isthmus_gateway_drill_fault_active", "gauge",
               "1 while this gateway acts out a drill's fault (0 once restored).",
               [({"drill": d, "mode": m}, v) for (d, m), v in sorted(actor.fault_gauge.items())])
        metric("isthmus_gateway_drill_probes_total", "counter",
               "Synthetic drill probes by result (ok, failed, skipped: too many in flight).",
               [({"drill": d, "result": r}, n) for (d, r), n in sorted(actor.probes.items())])
        metric("isthmus_gateway_drill_samples_buffered", "gauge",
               "Drill samples waiting to reach the federation.", [({}, len(actor.queue))])
    agent = gw.agent
    if agent is not None:
        metric("isthmus_gateway_federation_connected", "gauge",
               "1 if the last federation call worked.", [({}, 1 if agent.connected else 0)])
        metric("isthmus_gateway_federation_registered", "gauge",
               "1 while this gateway holds a lease at the federation (its exports count).",
               [({}, 1 if agent.lease is not None else 0)])
        metric("isthmus_gateway_federation_refusals_total", "counter",
               "Times the federation refused our bundle or a lease grant, by reason "
               "(bundle_sequence, unauthenticated, forbidden, bundle_invalid, ...).",
               [({"reason": r}, n) for r, n in sorted(agent.refusals.items())])
        metric("isthmus_gateway_bundle_sequence", "gauge",
               "spiffe_sequence of our own trust bundle.", [({}, agent.identity.bundle.sequence)])
        metric("isthmus_gateway_catalog_revision", "gauge", "Catalog revision in use.",
               [({}, agent.catalog.revision)])
        metric("isthmus_gateway_catalog_age_seconds", "gauge",
               "Seconds since the federation last answered a catalog read (a snapshot, or a "
               "watch long-poll, which answers at least every 25 s: above ~30 s the catalog is "
               "stale; absent before the first).",
               [({}, round(gw.wall() - agent.catalog_at, 3))] if agent.catalog_at else [])
        metric("isthmus_gateway_bundle_age_seconds", "gauge",
               "Seconds since each peer cluster's trust bundle last changed in our catalog.",
               [({"peer": c}, round(gw.wall() - t, 3))
                for c, t in sorted(agent.bundle_changed_at.items())])
        metric("isthmus_gateway_svid_expiry_timestamp_seconds", "gauge",
               "When the current SVID expires.", [({}, agent.identity.svid.not_after)])
    dns = getattr(gw, "dns", None)
    if dns is not None:
        d = dns.stats
        metric("isthmus_gateway_dns_queries_total", "counter",
               "DNS queries answered, by transport (udp, tcp), query type and rcode.",
               [({"transport": t, "qtype": q, "rcode": r}, n)
                for (t, q, r), n in sorted(d.queries.items())])
        metric("isthmus_gateway_dns_malformed_total", "counter",
               "DNS messages that could not be read (answered FORMERR, or dropped).",
               [({"transport": t}, n) for t, n in sorted(d.malformed.items())])
        metric("isthmus_gateway_dns_truncated_total", "counter",
               "UDP answers cut to the client's size (TC set: it retries over TCP).",
               [({}, d.truncated)])
        metric("isthmus_gateway_dns_tcp_refused_total", "counter",
               "DNS TCP connections closed at once (too many open).", [({}, d.tcp_refused)])
        page.histogram("isthmus_gateway_dns_response_seconds",
                       "Time to answer one DNS message (parse, resolve, write).",
                       d.BUCKETS, d.buckets, d.seconds, d.count)
    tunnel = getattr(gw, "tunnel", None)
    if tunnel is not None:
        t = tunnel.describe(gw.wall())
        peers = t["peers"]
        metric("isthmus_gateway_tunnel_peers", "gauge", "WireGuard peers configured.",
               [({}, len(peers))])
        metric("isthmus_gateway_tunnel_handshake_age_seconds", "gauge",
               "Seconds since the latest handshake with each peer (absent: none yet).",
               [({"peer": p["cluster"]}, p["handshake_age_seconds"]) for p in peers
                if p["handshake_age_seconds"] is not None])
        metric("isthmus_gateway_tunnel_bytes_total", "counter",
               "Bytes through the tunnel, by peer and direction (rx, tx).",
               [({"peer": p["cluster"], "direction": d}, p[f"{d}_bytes"]) for p in peers
                for d in ("rx", "tx")])
        metric("isthmus_gateway_tunnel_restarts_total", "counter",
               "Times wireguard-go died and was started again.", [({}, t["restarts"])])
        metric("isthmus_gateway_tunnel_failures_total", "counter",
               "Tunnel operations (UAPI, netlink) that failed.", [({}, t["failures"])])
    xds = getattr(gw, "xds", None)
    if xds is not None:
        st = xds.stats
        metric("isthmus_gateway_xds_clients", "gauge", "xDS (ADS) streams open now.",
               [({}, len(xds.streams))])
        metric("isthmus_gateway_xds_pushes_total", "counter", "xDS responses sent, by type.",
               [({"type": t.rsplit(".", 1)[-1]}, n) for t, n in sorted(st.pushes.items())])
        metric("isthmus_gateway_xds_acks_total", "counter", "xDS responses ACKed.",
               [({}, st.acks)])
        metric("isthmus_gateway_xds_nacks_total", "counter",
               "xDS responses NACKed (the client kept its last good version), by type.",
               [({"type": t.rsplit(".", 1)[-1]}, n) for t, n in sorted(st.nacks.items())])
        acks = sorted(st.ack_seconds)
        metric("isthmus_gateway_xds_change_to_ack_seconds", "gauge",
               "Median time from a change of the resources to a client's ACK (latest 1000).",
               [({}, acks[len(acks) // 2])] if acks else [])
    reloads = getattr(gw, "reloads", None)
    if reloads is not None:
        metric("isthmus_config_reload_total", "counter",
               "Config reloads (file change or SIGHUP), by result: applied, unchanged, refused "
               "(the last good version kept serving).",
               [({"result": r}, n) for r, n in reloads.counts.items()])
        metric("isthmus_config_version", "gauge",
               "Version of the config in use (1 at start, +1 per applied reload).",
               [({"fingerprint": reloads.fingerprint}, reloads.version)])
        metric("isthmus_config_last_reload_successful", "gauge",
               "0 while the last reload was refused (its problems are in /status config).",
               [({}, 0 if reloads.last_error else 1)])
        metric("isthmus_config_restart_needed", "gauge",
               "1 while gateway-file fields differ from the running ones (they take effect on "
               "a restart).", [({}, 1 if reloads.restart_needed else 0)])
    if http is not None:
        serving_metrics(page, "isthmus_gateway_http", {"admin": http})
    return page.text()


async def start_admin(gw: Any, host: str, port: int, sock: Any = None,
                      limits: ServingLimits = ADMIN_LIMITS) -> web.AppRunner:
    """The admin server, started on host:port or on `sock` (bound already: a takeover hands
    it over, gateway/control/handoff.py); `cleanup()` the runner to stop it (its one site, a
    `BoundedSite`, is in `runner.sites`)."""
    site: BoundedSite | None = None

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if not gw.ready:
            return web.Response(status=503, text="not ready\n")
        why = gw.agent.not_ready() if gw.agent is not None else None
        if why is not None:  # the federation refuses us (agent.py: "Refusals and readiness")
            return web.Response(status=503, text=f"not ready: {why}\n")
        return web.Response(text="ready\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=render_metrics(gw, site.stats if site else None),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(gw.status(), indent=2), content_type="application/json")

    async def why(request: web.Request) -> web.Response:
        """/why?service=NS/NAME: gateway/core/why.py's answer (the route is thin)."""
        service = request.query.get("service", "")
        if not service or len(service) > 300:
            return web.json_response({"error": "give ?service=NAMESPACE/NAME (an import of "
                                      "this gateway)"}, status=400)
        got = gw.why(service)
        if got is None:
            imports = sorted(str(s) for s in gw.import_routers)
            return web.json_response({"error": f"this gateway imports no service {service!r}",
                                      "imports": imports}, status=404)
        return web.json_response(got, dumps=lambda o: json.dumps(o, indent=2))

    app = web.Application()
    app.router.add_get("/why", why)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = BoundedSite(runner, host, port, limits=limits, name="admin", logger=log, sock=sock)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
