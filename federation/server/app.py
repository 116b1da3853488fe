"""The federation service: an aiohttp app over TLS 1.3 where gateways join, publish, and watch.

Theory of operation
-------------------
The server is composed here from parts that share one `State` (state.py): `Credentials`
(federation CA, server SVID and its rotation, operator credentials, the TLS context),
`Auth` (who is calling, and may they), `Membership` (join, re-join, record, removal; join
tokens are tokens.py's), `Clusters` (bundles, leases, exports, imports),
`CatalogView` (snapshot, watch), `Drills` (drill handlers, timer, samples) and `Admin`
(healthz, readyz, metrics, status). Each part's docstring tells its part of the story.

* Serving. Both ports are `http_serving.BoundedSite`s (`limits`, `admin_limits`): handshake,
  header, body and idle timeouts, and bounds on connections, handshakes and connections without
  a client certificate, so anonymous clients cannot hold the port. `_middleware` answers every
  error as JSON and counts every answer by route and status (an unexpected exception: a JSON
  500 and one rate-limited log line). Log lines quote what came off the wire (`logs.quote`).
  The route table maps every operation of `api.ROUTES` to its handler; the admin port serves
  the `api.ADMIN_PATHS` only.
* Ownership. `start()` loads the credentials, opens the store, rebuilds the state, ends drills
  left past their deadline, binds the ports, then starts one task that owns an
  `asyncio.TaskGroup` with every background loop (lease reaper, token sweeper, SVID rotator,
  drill timer). `stop()` stops accepting, wakes long-polls, cancels that task (the group
  cancels and awaits every loop) and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from federation import api
from federation.ca import CertificateAuthority
from federation.errors import ApiError, StoreError
from federation.http_serving import ADMIN_LIMITS, TLS_LIMITS, BoundedSite, ServingLimits, where
from federation.identity import Svid
from federation.logs import quote
from federation.overlay import parse_cidr
from federation.server.admin import ADMIN, Admin
from federation.server.auth import Auth
from federation.server.catalog import CatalogView
from federation.server.clusters import REAP_INTERVAL, Clusters
from federation.server.credentials import FEDERATION_TRUST_DOMAIN, Credentials, operator_id
from federation.server.drills import Drills
from federation.server.membership import Membership
from federation.server.state import REPLICAS, State, log
from federation.server.tokens import create_token
from federation.server.ui import Dashboard
from federation.store.base import Store
from federation.units import format_hostport

REPLICA_TTL = 10.0

__all__ = [
    "FEDERATION_TRUST_DOMAIN",
    "REAP_INTERVAL",
    "FederationServer",
    "create_token",
    "operator_id",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FederationServer:
    def __init__(
        self,
        store: Store,
        state_dir: Path,
        listen: tuple[str, int],
        admin_listen: tuple[str, int] | None = None,
        lease_ttl: float = 6.0,
        trust_domain: str = FEDERATION_TRUST_DOMAIN,
        clock: Callable[[], float] = time.time,
        limits: ServingLimits = TLS_LIMITS,
        admin_limits: ServingLimits = ADMIN_LIMITS,
        forget_silent_after: float | None = None,
        overlay_cidr: str | None = None,
    ):
        self.store = store
        self.state_dir = Path(state_dir)
        self.listen = listen
        self.admin_listen = admin_listen
        self.trust_domain = trust_domain
        self.limits = limits
        self.admin_limits = admin_limits
        self.forget_silent_after = forget_silent_after  # None: a silent cluster stays trusted
        self.port: int | None = None  # bound TLS port (useful with port 0)
        self.admin_port: int | None = None

        overlay = parse_cidr(overlay_cidr) if overlay_cidr is not None else None
        self.state = State(store, trust_domain, lease_ttl, clock, overlay)
        self.credentials = Credentials(self.state, self.state_dir, listen[0])
        self.auth = Auth(self.state, self.credentials)
        self.clusters = Clusters(self.state, self.credentials, self.auth)
        self.membership = Membership(self.state, self.credentials, self.auth)
        self.catalog = CatalogView(self.state, self.auth)
        self.drills = Drills(self.state, self.auth, self.catalog)
        self.admin = Admin(self.state, self.auth, self.catalog,
                           lambda: {n: site.stats for n, site in self._sites.items()})
        self.dashboard = Dashboard(self.state, self.auth, self.drills, self.admin.status,
                                   self.state_dir)

        self._background: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []
        self._sites: dict[str, BoundedSite] = {}  # "api" (TLS), "admin": their http stats

    @property
    def lease_ttl(self) -> float:
        return self.state.lease_ttl

    @property
    def ca(self) -> CertificateAuthority | None:
        return self.credentials.ca

    @property
    def svid(self) -> Svid | None:
        return self.credentials.svid

    @property
    def operator_svid(self) -> Svid | None:
        return self.credentials.operator_svid

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        state = self.state
        self.credentials.load(state.clock())
        self.dashboard.start(self.state_dir)  # its token, next to the operator SVID
        await self.store.open()
        state.store_open = True
        await self.clusters.load_state()
        await self.drills.end_due()  # drills left running past their deadline (restart)
        ssl_context = self.credentials.make_context()

        runner = web.AppRunner(self._make_app(admin=False), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runners.append(runner)
        site = BoundedSite(runner, self.listen[0], self.listen[1], ssl_context=ssl_context,
                           limits=self.limits, name="api", logger=log)
        await site.start()
        self.credentials.on_context = site.set_ssl_context  # trust changes: rebuilt contexts
        self._sites["api"] = site
        self.port = site.port
        state.bound = True
        if self.admin_listen is not None:
            admin = web.AppRunner(self._make_app(admin=True), access_log=None, shutdown_timeout=2.0)
            await admin.setup()
            self._runners.append(admin)
            asite = BoundedSite(admin, self.admin_listen[0], self.admin_listen[1],
                                limits=self.admin_limits, name="admin", logger=log)
            await asite.start()
            self._sites["admin"] = asite
            self.admin_port = asite.port

        self._background = asyncio.create_task(self._run_background(), name="federation-tasks")
        if self.admin_port is not None:
            log.info("dashboard at http://%s/ui/ (sign in once with /ui/?token= and the token in "
                     "%s)", format_hostport(self.admin_listen[0], self.admin_port),  # type: ignore
                     self.dashboard.token_path)
        log.info(
            "federation %s listening on %s (admin %s), %d clusters, lease ttl %gs",
            self.trust_domain,
            format_hostport(self.listen[0], self.port),
            "off" if self.admin_port is None
            else format_hostport(self.admin_listen[0], self.admin_port),  # type: ignore[index]
            len(state.records),
            self.lease_ttl,
        )

    async def _run_background(self) -> None:
        """Every background loop, owned by one TaskGroup; cancelling this task cancels and
        awaits them all. A loop that fails ends the others: that is logged, never silent."""
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "lease-reaper": self.clusters.reaper,
            "token-sweeper": self.credentials.token_sweeper,
            "svid-rotator": self.credentials.svid_rotator,
            "drill-timer": self.drills.timer,
            "store-follower": self.clusters.follow_store,
            "replica-heartbeat": self._heartbeat,
        }
        if self.forget_silent_after is not None:
            after = self.forget_silent_after
            loops["forget-silent"] = lambda: self.membership.forget_silent(after)
        try:
            async with asyncio.TaskGroup() as group:
                for name, loop in loops.items():
                    group.create_task(loop(), name=f"federation-{name}")
        except Exception:
            log.exception("federation background task failed; background work stopped")

    async def _heartbeat(self) -> None:
        """With a shared store: this process is listed under `federation/replicas/` while it
        runs (an etcd lease of REPLICA_TTL, renewed every third of it), for /status."""
        store = self.store
        if not getattr(store, "shared", False):
            return
        where = format_hostport(self.listen[0], self.port or self.listen[1])
        body = api.canonical_json({"listen": where, "started_at": self.state.clock(),
                                   "pid": os.getpid()})
        lease = None
        while True:
            try:
                if lease is None or not await store.keepalive(lease):
                    lease = await store.grant_lease(REPLICA_TTL)
                    await store.put(REPLICAS + where, body, lease=lease)
            except StoreError as e:
                log.warning("replica heartbeat: %s", e)
                lease = None
            await asyncio.sleep(REPLICA_TTL / 3)

    async def stop(self) -> None:
        self.state.stopping.set()  # wakes long-polls: they answer with no events
        self.catalog.stop()
        self.state.bound = False
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None
        if self.state.store_open:
            self.state.store_open = False
            await self.store.close()
        log.info("federation stopped")

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Start, run until SIGINT/SIGTERM (or `stop` is set), then stop in order."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            await self.start()
            await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    # ---- app -----------------------------------------------------------------------------

    def _routes(self) -> dict[str, Handler]:
        """The route table: every `api.ROUTES` operation id and the handler that answers it."""
        clusters, drills, admin = self.clusters, self.drills, self.admin
        return {
            "join": self.membership.h_join,
            "putCluster": self.membership.h_put_cluster,
            "removeCluster": self.membership.h_remove_cluster,
            "putBundle": clusters.h_put_bundle,
            "grantLease": clusters.h_grant_lease,
            "keepAlive": clusters.h_keepalive,
            "putExport": clusters.h_put_export,
            "deleteExport": clusters.h_delete_export,
            "putImport": clusters.h_put_import,
            "deleteImport": clusters.h_delete_import,
            "createDrill": drills.h_create_drill,
            "listDrills": drills.h_list_drills,
            "getDrill": drills.h_get_drill,
            "drillReport": drills.h_drill_report,
            "abortDrill": drills.h_abort_drill,
            "putSample": drills.h_put_sample,
            "putReport": self.dashboard.h_put_report,
            "getCatalog": self.catalog.h_catalog,
            "watch": self.catalog.h_watch,
            "openapi": self.h_openapi,
            "healthz": admin.h_healthz,
            "readyz": admin.h_readyz,
            "metrics": admin.h_metrics,
            "status": admin.h_status,
        }

    def _make_app(self, admin: bool) -> web.Application:
        app = web.Application(
            client_max_size=api.MAX_BODY,
            middlewares=[self._middleware],
        )
        app[ADMIN] = admin
        handlers = self._routes()
        for r in api.ROUTES:
            if admin and r.path not in api.ADMIN_PATHS:
                continue
            app.router.add_route(r.method, r.path, handlers[r.operation_id], name=r.operation_id)
        self.dashboard.add_routes(app)  # /ui/ on both ports (ui.py says who may see it)
        return app

    async def h_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(api.openapi_document())

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer is JSON and counted by route and status, 5xx included; an unexpected
        exception is one rate-limited log line (no traceback) and a JSON 500."""
        route = _route_name(request)
        requests, limited = self.state.requests, self.state.limited
        started = time.monotonic()
        try:
            if request.content_length is not None and request.content_length > api.MAX_BODY:
                raise ApiError(
                    413,
                    f"request body of {request.content_length} bytes is larger than "
                    f"the limit of {api.MAX_BODY} bytes (1 MiB)",
                )
            resp = await handler(request)
        except ApiError as e:
            resp = web.json_response(e.body, status=e.status)
        except web.HTTPRequestEntityTooLarge:
            resp = web.json_response(
                {"error": f"request body is larger than the limit of {api.MAX_BODY} bytes "
                          "(1 MiB)"},
                status=413,
            )
        except web.HTTPException as e:
            if e.status < 400:
                requests[(route, e.status)] += 1
                raise
            headers = {}
            if isinstance(e, web.HTTPMethodNotAllowed):  # RFC 9110 15.5.6: 405 names the methods
                headers["Allow"] = ", ".join(sorted(e.allowed_methods))
            resp = web.json_response(
                {"error": f"{e.reason}: {request.method} {request.path}"},
                status=e.status, headers=headers,
            )
        except StoreError as e:
            limited.error("store-error", "%s %s: store error: %s",
                          request.method, quote(request.path), e)
            resp = web.json_response({"error": f"store error: {e}"}, status=503)
        except ConnectionError:
            raise  # the client is gone (or timed out sending its body): no answer to count
        except Exception as e:
            limited.error(
                "handler-error", "%s %s (route %s) failed: %s: %s (at %s)",
                request.method, quote(request.path), route, type(e).__name__, quote(e), where(e),
            )
            resp = web.json_response(
                {"error": f"internal error ({type(e).__name__}) answering {route}; "
                 "the federation's log has a line about it"},
                status=500,
            )
        requests[(route, resp.status)] += 1
        if route != "/v1/watch":  # a long-poll's time is the caller's timeout, not ours
            self.state.request_seconds.observe(time.monotonic() - started)
        return resp


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None) if route is not None else None
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return resource.canonical
