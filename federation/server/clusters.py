"""The federation service: an aiohttp app over TLS 1.3 where gateways join, publish, and watch.

Theory of operation
-------------------
* Identity. The federation has its own trust domain (default `federation.isthmus.local`) and a
  CA kept in `--state-dir` (`ca.pem`, `ca-key.pem`); gateways trust only that CA for the
  federation (it issues nothing but the federation's own server SVID). The server SVID is
  issued at every start and reissued at half life by a background task, then swapped into the
  live SSL context (`reload_server_context`), so open connections are not dropped.
* Operator identity. At every start the server makes sure `<state-dir>/operator/` holds an
  operator SVID `spiffe://<federation-td>/ns/isthmus-system/sa/operator` (valid 30 days,
  `svid.pem` + `svid-key.pem`, key 0600) issued by the federation CA, reissued when missing,
  unreadable, past half life or not issued by the current CA, plus a copy of `ca.pem`: that
  directory is all the CLI needs (`client.operator_client`).
* Authentication. The TLS listener asks for, but does not require, a client certificate, so a
  new cluster can `POST /v1/join` with only a join token. Every other `/v1` route (and
  `/status` on the TLS port) needs a client SVID: either one that verifies against the bundle
  of a joined cluster's trust domain and is that trust domain's gateway ID (a *cluster*), or
  the operator ID verified against the federation's own bundle (the *operator*; any other ID
  of the federation's trust domain is 403). `_caller` returns ("cluster", name) or
  ("operator", id). The server context trusts the federation CA and every joined cluster's
  bundle; a join or bundle update adds the new authorities to the live context. (OpenSSL
  cannot forget a CA in place: after a bundle drops an authority the handshake may still
  pass, but `verify_peer` checks against the current bundle only, so the request is refused
  with 401.) No cluster may join with the federation's own trust domain.
* Authorization. A cluster writes only its own records (`/v1/clusters/{name}/...` with
  name == caller) and its own drill samples; anything else is 403 naming both, logged and
  counted. The operator reads the catalog, the watch and drills, and creates and aborts
  drills; it writes no cluster record (403). Creating or aborting drills is operator-only.
* Drills (decisions in `drills.py`, pure). Records at `catalog/drills/<id>` (so every gateway
  sees them through the watch), samples at `drills/<id>/samples/<cluster>/<second:010d>`
  (outside `catalog/`, never watched). Every drill transition (create with the overlap check,
  abort, deadline, abort_on trip) runs under one lock and re-reads the record from the store,
  so two transitions never race. A timer task sleeps until the earliest deadline of the
  running drills (woken early when a drill is created or ends; at most 5 s) and ends due
  drills with reason "deadline"; `start()` first ends every drill found running past its
  deadline (after a restart), keeping its record. `abort_on` is evaluated after each sample
  write over the stored samples.
* State lives in the store under the keys described in `model.py`; the server keeps in memory
  only what it can rebuild from the store at start (bundles, trust domain -> cluster, current
  lease per cluster) plus last-renewal times for `/status`.
* Leases. A reaper calls `store.expire_leases()` every 200 ms, so a cluster that stops renewing
  loses `catalog/live/<c>` and its exports within ttl + 0.2 s; watchers see the deletes.
  A restart knows nothing new about liveness: `_load_state` renews every stored lease for a
  full ttl (`store.renew_all_leases()`) before the listeners open, so after an outage longer
  than the ttl the gateways' next keepalives (every ttl/3, retried as often while the
  federation is down) find their leases alive and nothing is withdrawn.
  Granting a new lease does not revoke the previous one: keys re-put under the new lease move
  to it, and the old lease ends (deleting only what is still attached to it) at its deadline.
* Join tokens: 32 random bytes, urlsafe; only the sha256 is stored (`tokens/<hex>`), consumed by
  an atomic `store.delete`. A re-join with a fresh token replaces the record and the bundle
  (even with a lower sequence: a cluster that lost its state starts again from 0).
* Serving. Both ports are `http_serving.BoundedSite`s (`limits`, `admin_limits`): handshake,
  header, body and idle timeouts, and bounds on connections, handshakes and connections without
  a client certificate, so anonymous clients cannot hold the port. `_middleware` answers every
  error as JSON and counts every answer by route and status (an unexpected exception: a JSON
  500 and one rate-limited log line). Log lines quote what came off the wire (`logs.quote`);
  401/403s are logged through one `LogLimiter` (the counter carries the volume).
* Ownership. `start()` opens the store; every background task lives in `self._tasks`;
  `stop()` stops accepting, wakes long-polls, cancels tasks and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from federation import api
from federation import drills as drill_logic
from federation.errors import (
    ApiError,
    BundleSequenceError,
    CompactedError,
    FutureRevisionError,
    IdentityError,
    InputError,
    StoreError,
)
from federation.http_serving import (
    ADMIN_LIMITS,
    TLS_LIMITS,
    BoundedSite,
    ServingLimits,
    serving_metrics,
    where,
)
from federation.identity import (
    SYSTEM_NAMESPACE,
    CertificateAuthority,
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    federation_id,
    gateway_id,
    spiffe_id_of,
    verify_svid,
)
from federation.logs import LogLimiter, quote
from federation.metrics import Exposition
from federation.model import (
    BUNDLES,
    CATALOG_PREFIX,
    CLUSTERS,
    DRILLS,
    EXPORTS,
    IMPORTS,
    LIVE,
    SAMPLES,
    TOKENS,
    Catalog,
    ClusterRecord,
    Drill,
    Export,
    ImportRecord,
    check_name,
    is_drill_id,
)
from federation.store.base import KV, Store
from federation.tls import peer_cert_der, reload_server_context, server_context, verify_peer
from federation.units import format_hostport, parse_duration, parse_int

log = logging.getLogger("isthmus.federation")

FEDERATION_TRUST_DOMAIN = "federation.isthmus.local"
REAP_INTERVAL = 0.2
TOKEN_SWEEP_INTERVAL = 60.0
SVID_CHECK_INTERVAL = 1.0
OPERATOR_DIR = "operator"
OPERATOR_SVID_TTL = 30 * 86400.0
DRILL_TIMER_MAX_WAIT = 5.0
_ADMIN = web.AppKey("admin", bool)
_RAND_ALPHABET = string.ascii_lowercase + string.digits


def operator_id(td: str | TrustDomain) -> SpiffeId:
    """spiffe://<federation-td>/ns/isthmus-system/sa/operator"""
    return SpiffeId(td if isinstance(td, TrustDomain) else TrustDomain(td),
                    f"/ns/{SYSTEM_NAMESPACE}/sa/operator")


def _token_key(token: str) -> str:
    return TOKENS + hashlib.sha256(token.encode()).hexdigest()


async def create_token(store: Store, cluster: str, ttl: float, now: float) -> str:
    """A single-use join token for `cluster`, valid `ttl` seconds from `now`. The store must be
    open; only the token's sha256 is stored. Returns the token (show it once, never log it)."""
    check_name(cluster, "cluster")
    if ttl <= 0:
        raise InputError(f"token ttl {ttl!r}: must be positive")
    token = secrets.token_urlsafe(32)
    value = api.canonical_json({"cluster": cluster, "expires_at": now + ttl})
    await store.put(_token_key(token), value)
    return token


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
    ):
        self.store = store
        self.state_dir = Path(state_dir)
        self.listen = listen
        self.admin_listen = admin_listen
        self.lease_ttl = float(lease_ttl)
        self.trust_domain = trust_domain
        self._clock = clock
        self.limits = limits
        self.admin_limits = admin_limits

        self.ca: CertificateAuthority | None = None
        self.svid: Svid | None = None
        self.operator_svid: Svid | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.port: int | None = None  # bound TLS port (useful with port 0)
        self.admin_port: int | None = None

        # Rebuilt from the store at start; replaced (not mutated) on change.
        self._bundles: dict[str, TrustBundle] = {}
        self._cluster_by_td: dict[str, str] = {}
        self._records: dict[str, ClusterRecord] = {}
        self._leases: dict[str, int] = {}
        self._renewed: dict[str, float] = {}

        self._join_lock = asyncio.Lock()
        self._drill_lock = asyncio.Lock()
        self._drills_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._runners: list[web.AppRunner] = []
        self._sites: dict[str, BoundedSite] = {}  # "api" (TLS), "admin": their http stats
        self._limited = LogLimiter(log)  # 401/403s, handler errors: one line per class
        self._store_open = False
        self._bound = False
        self._watchers = 0
        self._requests: Counter[tuple[str, int]] = Counter()
        self._denied = 0

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        now = self._clock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(
            self.state_dir, TrustDomain(self.trust_domain), now
        )
        self.svid = self._issue_svid(now)
        self.operator_svid = self._ensure_operator_credentials(now)
        await self.store.open()
        self._store_open = True
        await self._load_state()
        await self._end_due_drills()  # drills left running past their deadline (restart)
        self.ssl_context = server_context(self.svid, self._trust(), require_client_cert=False)

        app = self._make_app(admin=False)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runners.append(runner)
        site = BoundedSite(runner, self.listen[0], self.listen[1], ssl_context=self.ssl_context,
                           limits=self.limits, name="api", logger=log)
        await site.start()
        self._sites["api"] = site
        self.port = site.port
        self._bound = True
        if self.admin_listen is not None:
            admin = web.AppRunner(self._make_app(admin=True), access_log=None, shutdown_timeout=2.0)
            await admin.setup()
            self._runners.append(admin)
            asite = BoundedSite(admin, self.admin_listen[0], self.admin_listen[1],
                                limits=self.admin_limits, name="admin", logger=log)
            await asite.start()
            self._sites["admin"] = asite
            self.admin_port = asite.port

        self._spawn(self._reaper(), "lease-reaper")
        self._spawn(self._token_sweeper(), "token-sweeper")
        self._spawn(self._svid_rotator(), "svid-rotator")
        self._spawn(self._drill_timer(), "drill-timer")
        log.info(
            "federation %s listening on %s (admin %s), %d clusters, lease ttl %gs",
            self.trust_domain,
            format_hostport(self.listen[0], self.port),
            "off" if self.admin_port is None
            else format_hostport(self.admin_listen[0], self.admin_port),  # type: ignore[index]
            len(self._records),
            self.lease_ttl,
        )

    async def stop(self) -> None:
        self._stopping.set()  # wakes long-polls: they answer with no events
        self._bound = False
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._store_open:
            self._store_open = False
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

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"federation-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- state ---------------------------------------------------------------------------

    async def _load_state(self) -> None:
        renewed = await self.store.renew_all_leases()
        if renewed:
            log.info("%d stored leases renewed for a full ttl: their gateways renew them from "
                     "now on (a restart says nothing about liveness)", renewed)
        kvs, _ = await self.store.range(CATALOG_PREFIX)
        records: dict[str, ClusterRecord] = {}
        bundles: dict[str, TrustBundle] = {}
        leases: dict[str, int] = {}
        for kv in kvs:
            try:
                if kv.key.startswith(CLUSTERS):
                    rec = ClusterRecord.from_json(json.loads(kv.value), kv.key)
                    records[rec.name] = rec
                elif kv.key.startswith(BUNDLES):
                    td = kv.key[len(BUNDLES):]
                    bundles[td] = TrustBundle.from_jwks(td, json.loads(kv.value))
                elif kv.key.startswith(LIVE) and kv.lease is not None:
                    leases[kv.key[len(LIVE):]] = kv.lease
            except (ValueError, InputError, IdentityError) as e:
                log.error("ignoring unreadable stored value %s: %s", quote(kv.key), quote(e))
        self._records = records
        self._cluster_by_td = {r.trust_domain: r.name for r in records.values()}
        self._bundles = bundles
        self._leases = leases

    def _trust(self) -> list[TrustBundle]:
        assert self.ca is not None
        return [self.ca.bundle(0), *self._bundles.values()]

    def _issue_svid(self, now: float) -> Svid:
        assert self.ca is not None
        host = self.listen[0]
        ips: list[str] = []
        dns: list[str] = ["localhost"]
        try:
            addr = ipaddress.ip_address(host)
            if addr.is_unspecified:
                ips += ["127.0.0.1", "::1"]
                dns.append(socket.gethostname())
            else:
                ips.append(host)
        except ValueError:
            if host and host != "localhost":
                dns.append(host)
        return self.ca.issue(
            federation_id(self.trust_domain),
            now,
            dns_names=tuple(dns),
            ip_addresses=tuple(ips),
        )

    def _ensure_operator_credentials(self, now: float) -> Svid:
        """`<state-dir>/operator/`: svid.pem + svid-key.pem (0600) + ca.pem; reissued when
        missing, unreadable, another ID, past half life or not from the current CA."""
        assert self.ca is not None
        directory = self.state_dir / OPERATOR_DIR
        want = operator_id(self.trust_domain)
        svid: Svid | None = None
        try:
            svid = Svid.load(directory)
        except IdentityError as e:
            log.warning("operator SVID in %s unreadable (%s): issuing a new one", directory, e)
        reason = None
        if svid is None:
            reason = "none yet"
        elif svid.spiffe_id != want:
            reason = f"it names {svid.spiffe_id}"
        elif svid.rotation_due(now):
            reason = "past half life"
        else:
            try:
                verify_svid(svid.cert_der(), self.ca.bundle(0), now)
            except IdentityError:
                reason = "not issued by the current federation CA"
        if reason is not None:
            svid = self.ca.issue(want, now, ttl=OPERATOR_SVID_TTL)
            svid.write(directory)
            log.info("operator SVID %s issued into %s (%s)", want, directory, reason)
        assert svid is not None
        ca_copy = directory / CertificateAuthority.CERT_FILE
        if not ca_copy.exists() or ca_copy.read_bytes() != self.ca.cert_pem:
            tmp = directory / f".{ca_copy.name}.{secrets.token_hex(6)}.tmp"
            tmp.write_bytes(self.ca.cert_pem)
            os.replace(tmp, ca_copy)
        return svid

    def _verify_bundles(self) -> dict[str, TrustBundle]:
        """Bundles `verify_peer` checks callers against: clusters' and the federation's own."""
        assert self.ca is not None
        return {**self._bundles, self.trust_domain: self.ca.bundle(0)}

    def _reload_trust(self) -> None:
        if self.ssl_context is not None:
            reload_server_context(self.ssl_context, trust=self._trust())

    # ---- background tasks ----------------------------------------------------------------

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                ended = await self.store.expire_leases()
            except StoreError as e:
                log.warning("lease reaper: %s", e)
                continue
            if ended:
                for name, lease in list(self._leases.items()):
                    if not await self._lease_alive(name, lease):
                        log.info("cluster %s: lease %d expired, exports withdrawn", name, lease)
                        self._leases.pop(name, None)

    async def _lease_alive(self, name: str, lease: int) -> bool:
        kv = await self.store.get(LIVE + name)
        return kv is not None and kv.lease == lease

    async def _token_sweeper(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_SWEEP_INTERVAL)
            try:
                kvs, _ = await self.store.range(TOKENS)
                now = self._clock()
                for kv in kvs:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        if json.loads(kv.value)["expires_at"] < now:
                            await self.store.delete(kv.key)
            except StoreError as e:
                log.warning("token sweep: %s", e)

    async def _svid_rotator(self) -> None:
        while True:
            await asyncio.sleep(SVID_CHECK_INTERVAL)
            now = self._clock()
            if self.svid is not None and self.svid.rotation_due(now):
                try:
                    svid = self._issue_svid(now)
                    assert self.ssl_context is not None
                    reload_server_context(self.ssl_context, svid=svid)
                    self.svid = svid
                    log.info("federation SVID rotated (serial %s)", svid.serial)
                except Exception:  # keep serving with the old one; try again next tick
                    log.exception("federation SVID rotation failed")

    async def _drill_timer(self) -> None:
        """End running drills at their deadline; sleep until the earliest one (or a change)."""
        while True:
            self._drills_changed.clear()
            try:
                earliest = await self._end_due_drills()
            except StoreError as e:
                log.warning("drill timer: %s", e)
                earliest = None
            wait = DRILL_TIMER_MAX_WAIT
            if earliest is not None:
                wait = min(max(earliest - self._clock(), 0.0), DRILL_TIMER_MAX_WAIT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drills_changed.wait(), wait)

    async def _end_due_drills(self) -> float | None:
        """End every running drill past its deadline; the earliest deadline still ahead."""
        async with self._drill_lock:
            now = self._clock()
            earliest: float | None = None
            for drill in await self._load_drills():
                if drill_logic.due(drill, now):
                    await self._put_drill(drill_logic.end(drill, now, "ended", "deadline"))
                    log.info("drill %s ended at its deadline", drill.id)
                elif drill.state == "running":
                    earliest = drill.fault_end if earliest is None else min(earliest, drill.fault_end)
            return earliest

    async def _load_drills(self) -> list[Drill]:
        kvs, _ = await self.store.range(DRILLS)
        out = []
        for kv in kvs:
            try:
                out.append(Drill.from_json(json.loads(kv.value), kv.key))
            except (ValueError, InputError) as e:
                log.error("ignoring unreadable drill %s: %s", quote(kv.key), quote(e))
        return out

    async def _put_drill(self, drill: Drill) -> int:
        rev = await self.store.put(drill.key, api.canonical_json(drill.to_json()))
        self._drills_changed.set()
        return rev

    # ---- app -----------------------------------------------------------------------------

    def _make_app(self, admin: bool) -> web.Application:
        app = web.Application(
            client_max_size=api.MAX_BODY,
            middlewares=[self._middleware],
        )
        app[_ADMIN] = admin
        handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "join": self.h_join,
            "putBundle": self.h_put_bundle,
            "grantLease": self.h_grant_lease,
            "keepAlive": self.h_keepalive,
            "putExport": self.h_put_export,
            "deleteExport": self.h_delete_export,
            "putImport": self.h_put_import,
            "deleteImport": self.h_delete_import,
            "createDrill": self.h_create_drill,
            "listDrills": self.h_list_drills,
            "getDrill": self.h_get_drill,
            "drillReport": self.h_drill_report,
            "abortDrill": self.h_abort_drill,
            "putSample": self.h_put_sample,
            "getCatalog": self.h_catalog,
            "watch": self.h_watch,
            "openapi": self.h_openapi,
            "healthz": self.h_healthz,
            "readyz": self.h_readyz,
            "metrics": self.h_metrics,
            "status": self.h_status,
        }
        for r in api.ROUTES:
            if admin and r.path not in api.ADMIN_PATHS:
                continue
            app.router.add_route(r.method, r.path, handlers[r.operation_id], name=r.operation_id)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer is JSON and counted by route and status, 5xx included; an unexpected
        exception is one rate-limited log line (no traceback) and a JSON 500."""
        route = _route_name(request)
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
                {"error": f"request body is larger than the limit of {api.MAX_BODY} bytes (1 MiB)"},
                status=413,
            )
        except web.HTTPException as e:
            if e.status < 400:
                self._requests[(route, e.status)] += 1
                raise
            headers = {}
            if isinstance(e, web.HTTPMethodNotAllowed):  # RFC 9110 15.5.6: 405 names the methods
                headers["Allow"] = ", ".join(sorted(e.allowed_methods))
            resp = web.json_response(
                {"error": f"{e.reason}: {request.method} {request.path}"},
                status=e.status, headers=headers,
            )
        except StoreError as e:
            self._limited.error("store-error", "%s %s: store error: %s",
                                request.method, quote(request.path), e)
            resp = web.json_response({"error": f"store error: {e}"}, status=503)
        except ConnectionError:
            raise  # the client is gone (or timed out sending its body): no answer to count
        except Exception as e:
            self._limited.error(
                "handler-error", "%s %s (route %s) failed: %s: %s (at %s)",
                request.method, quote(request.path), route, type(e).__name__, quote(e), where(e),
            )
            resp = web.json_response(
                {"error": f"internal error ({type(e).__name__}) answering {route}; "
                 "the federation's log has a line about it"},
                status=500,
            )
        self._requests[(route, resp.status)] += 1
        return resp

    # ---- request helpers -----------------------------------------------------------------

    async def _json(self, request: web.Request) -> Any:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise
        if not raw:
            raise ApiError(400, "request body: empty, expected JSON")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body: not valid JSON ({e})") from None

    def _identify(self, request: web.Request) -> tuple[str, str, SpiffeId]:
        """("cluster", name, id) for a joined cluster's gateway SVID, ("operator", id, id) for
        the federation-issued operator SVID; ApiError 401/403 otherwise."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = peer_cert_der(ssl_object) if ssl_object is not None else None
        if der is None:
            raise ApiError(
                401, "client certificate required (this route needs a cluster or operator SVID)"
            )
        try:
            sid = verify_peer(der, self._verify_bundles(), self._clock())
        except IdentityError as e:
            self._refused("unauthenticated", "refused client certificate from %s: %s",
                          quote(request.remote), quote(e))
            raise ApiError(401, f"client certificate refused: {e}") from None
        td = str(sid.trust_domain)
        if td == self.trust_domain:
            if sid == operator_id(td):
                return "operator", str(sid), sid
            self._refused("forbidden", "refused %s: an ID of the federation's trust domain, "
                          "not the operator", quote(sid))
            raise ApiError(403, f"peer {sid} is not the operator (expected {operator_id(td)})")
        cluster = self._cluster_by_td.get(td)
        if cluster is None:
            self._denied += 1
            raise ApiError(401, f"peer {sid}: trust domain {td!r} belongs to no joined cluster")
        if str(sid) != str(gateway_id(sid.trust_domain)):
            self._refused("forbidden", "refused %s: not the gateway ID of cluster %s",
                          quote(sid), quote(cluster))
            raise ApiError(
                403, f"peer {sid} is not the gateway of cluster {cluster!r} "
                f"(expected {gateway_id(sid.trust_domain)})"
            )
        return "cluster", cluster, sid

    def _refused(self, key: str, msg: str, *args: object) -> None:
        """Count a request refused for the caller's identity; log it (one line per class,
        rate-limited: the counter carries the volume). Quote what came off the wire."""
        self._denied += 1
        self._limited.warning(key, msg, *args)

    def _caller(self, request: web.Request) -> tuple[str, str]:
        """("cluster", name) or ("operator", id): who may read."""
        kind, name, _ = self._identify(request)
        return kind, name

    def _cluster(self, request: web.Request, action: str) -> tuple[str, SpiffeId]:
        """The calling cluster; 403 for the operator (it writes no cluster record)."""
        kind, name, sid = self._identify(request)
        if kind != "cluster":
            self._refused("forbidden", "denied: operator %s tried %s %s",
                          quote(name), request.method, quote(request.path))
            raise ApiError(403, f"the operator ({name}) may not {action}: clusters only")
        return name, sid

    def _operator(self, request: web.Request, action: str) -> str:
        kind, name, _ = self._identify(request)
        if kind != "operator":
            self._refused("forbidden", "denied: cluster %s tried %s %s (operator only)",
                          quote(name), request.method, quote(request.path))
            raise ApiError(
                403,
                f"cluster {name!r} may not {action}: operator only "
                f"({operator_id(self.trust_domain)})",
            )
        return name

    def _owner(self, request: web.Request) -> str:
        """Authenticate, and require the caller to be the cluster named in the path."""
        caller, sid = self._cluster(request, "write cluster records")
        target = request.match_info["name"]
        if caller != target:
            self._refused(
                "forbidden", "denied: cluster %s (%s) tried %s %s, a record of cluster %s",
                quote(caller), quote(sid), request.method, quote(request.path), quote(target),
            )
            raise ApiError(
                403,
                f"cluster {caller!r} may not write records of cluster {target!r}",
                caller=caller,
                target=target,
            )
        return caller

    # ---- /v1 handlers --------------------------------------------------------------------

    async def h_join(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: expected an object")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "token: missing or not a string")
        # The token first: a caller without a valid one gets 401 before the server parses a
        # bundle's certificates for it. Only peeked here; consumed atomically below.
        self._token_cluster(await self.store.get(_token_key(token)))
        if "bundle" not in body:
            raise ApiError(400, "bundle: missing")
        try:
            record = ClusterRecord.from_json(body.get("cluster"), "cluster")
            bundle = TrustBundle.from_jwks(record.trust_domain, body["bundle"])
        except (InputError, IdentityError) as e:
            raise ApiError(400, str(e)) from None
        if record.trust_domain == self.trust_domain:
            raise ApiError(
                400, f"cluster.trust_domain: {record.trust_domain!r} is the federation's own"
            )
        _check_bundle_domain(bundle, record.trust_domain)
        async with self._join_lock:
            kv = await self.store.delete(_token_key(token))
            token_cluster = self._token_cluster(kv)  # again: used or expired meanwhile
            assert kv is not None
            if token_cluster != record.name:
                self._limited.warning("join-token-mismatch",
                                      "join token for %s presented for cluster %s",
                                      quote(token_cluster), quote(record.name))
                raise ApiError(
                    403,
                    f"join token was issued for cluster {token_cluster!r}, "
                    f"not {record.name!r}",
                )
            other = self._cluster_by_td.get(record.trust_domain)
            if other is not None and other != record.name:
                await self.store.put(kv.key, kv.value)  # authorized but conflicting: keep it
                raise ApiError(
                    409,
                    f"trust domain {record.trust_domain!r} is already used by cluster "
                    f"{other!r}",
                )
            old = self._records.get(record.name)
            await self.store.put(BUNDLES + record.trust_domain, api.canonical_json(bundle.to_jwks()))
            await self.store.put(CLUSTERS + record.name, api.canonical_json(record.to_json()))
            bundles = dict(self._bundles)
            by_td = dict(self._cluster_by_td)
            if old is not None and old.trust_domain != record.trust_domain:
                await self.store.delete(BUNDLES + old.trust_domain)
                bundles.pop(old.trust_domain, None)
                by_td.pop(old.trust_domain, None)
            bundles[record.trust_domain] = bundle
            by_td[record.trust_domain] = record.name
            self._bundles = bundles
            self._cluster_by_td = by_td
            self._records = {**self._records, record.name: record}
            self._reload_trust()
        log.info(
            "cluster %s %s (trust domain %s, %s/%s, gateway %s)",
            record.name, "re-joined" if old else "joined", record.trust_domain,
            record.region, record.zone, quote(record.gateway_address),
        )
        assert self.ca is not None
        return web.json_response({
            "federation_trust_domain": self.trust_domain,
            "federation_bundle": self.ca.bundle(0).to_jwks(),
            "lease_ttl": self.lease_ttl,
        })

    def _token_cluster(self, kv: KV | None) -> str:
        """The cluster a stored join token was issued for; ApiError 401 if it is unknown, used,
        unreadable or expired."""
        if kv is None:
            raise ApiError(401, "join token unknown or already used")
        try:
            meta = json.loads(kv.value)
            token_cluster, expires_at = meta["cluster"], float(meta["expires_at"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(401, "join token unreadable; create a new one") from None
        if expires_at <= self._clock():
            raise ApiError(401, "join token expired")
        return str(token_cluster)

    async def h_put_bundle(self, request: web.Request) -> web.Response:
        name = self._owner(request)
        body = await self._json(request)
        td = self._records[name].trust_domain
        try:
            new = TrustBundle.from_jwks(td, body)
        except (InputError, IdentityError) as e:
            raise ApiError(400, f"bundle: {e}") from None
        _check_bundle_domain(new, td)
        held = self._bundles.get(td)
        if held is not None:
            try:
                new = held.successor(new)
            except BundleSequenceError:
                raise ApiError(
                    409,
                    f"bundle of {td}: sequence {new.sequence} is lower than the held "
                    f"sequence {held.sequence}",
                    held_sequence=held.sequence,
                    sequence=new.sequence,
                ) from None
        rev = await self.store.put(BUNDLES + td, api.canonical_json(new.to_jwks()))
        self._bundles = {**self._bundles, td: new}
        self._reload_trust()
        log.info("cluster %s: bundle of %s updated to sequence %d", name, td, new.sequence)
        return web.json_response({"revision": rev})

    async def h_grant_lease(self, request: web.Request) -> web.Response:
        name = self._owner(request)
        lease = await self.store.grant_lease(self.lease_ttl)
        now = self._clock()
        await self.store.put(LIVE + name, api.canonical_json({"since": now}), lease=lease)
        self._leases[name] = lease
        self._renewed[name] = now
        log.info("cluster %s: lease %d granted (ttl %gs)", name, lease, self.lease_ttl)
        return web.json_response({"lease": lease, "ttl": self.lease_ttl})

    async def h_keepalive(self, request: web.Request) -> web.Response:
        name = self._owner(request)
        try:
            lease = parse_int(request.match_info["lease"], "lease (a lease id)", 1, api.MAX_ID)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        if self._leases.get(name) != lease or not await self.store.keepalive(lease):
            raise ApiError(404, f"lease {lease} of cluster {name!r} is unknown or expired")
        self._renewed[name] = self._clock()
        return web.json_response({"lease": lease, "ttl": self.lease_ttl})

    async def h_put_export(self, request: web.Request) -> web.Response:
        return await self._put_leased(request, Export, "export")

    async def h_delete_export(self, request: web.Request) -> web.Response:
        return await self._delete_leased(request, EXPORTS)

    async def h_put_import(self, request: web.Request) -> web.Response:
        return await self._put_leased(request, ImportRecord, "import")

    async def h_delete_import(self, request: web.Request) -> web.Response:
        return await self._delete_leased(request, IMPORTS)

    async def _put_leased(self, request: web.Request, kind: type, what: str) -> web.Response:
        """Store one of the caller's own per-service records (an Export or an ImportRecord) on
        its lease, so it disappears with the lease. An identical write is not a new revision."""
        name = self._owner(request)
        body = await self._json(request)
        try:
            rec = kind.from_json(body, what)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        ns, svc = request.match_info["namespace"], request.match_info["service"]
        if (rec.cluster, rec.namespace, rec.name) != (name, ns, svc):
            raise ApiError(
                400,
                f"{what}: names {rec.cluster}/{rec.namespace}/{rec.name} but the "
                f"path is {name}/{ns}/{svc}",
            )
        lease = self._leases.get(name)
        if lease is None:
            raise ApiError(409, f"cluster {name!r} has no live lease; grant one first")
        value = api.canonical_json(rec.to_json())
        current = await self.store.get(rec.key)
        if current is not None and current.value == value and current.lease == lease:
            return web.json_response({"revision": current.mod_revision})
        try:
            rev = await self.store.put(rec.key, value, lease=lease)
        except StoreError:
            self._leases.pop(name, None)
            raise ApiError(409, f"cluster {name!r} has no live lease (lease {lease} expired)") from None
        return web.json_response({"revision": rev})

    async def _delete_leased(self, request: web.Request, prefix: str) -> web.Response:
        name = self._owner(request)
        try:
            ns = check_name(request.match_info["namespace"], "namespace")
            svc = check_name(request.match_info["service"], "service")
        except InputError as e:
            raise ApiError(400, str(e)) from None
        key = f"{prefix}{name}/{ns}/{svc}"
        prev = await self.store.delete(key)
        return web.json_response({
            "deleted": prev is not None,
            "revision": await self.store.revision(),
        })

    # ---- drills --------------------------------------------------------------------------

    async def _get_drill(self, drill_id: str) -> Drill:
        if not is_drill_id(drill_id):
            raise ApiError(404, f"drill {drill_id!r}: not a drill id (d-YYYYMMDD-HHMMSS-xxxx)")
        kv = await self.store.get(DRILLS + drill_id)
        if kv is None:
            raise ApiError(404, f"drill {drill_id!r} is unknown")
        try:
            return Drill.from_json(json.loads(kv.value), kv.key)
        except (ValueError, InputError) as e:
            raise ApiError(500, f"drill {drill_id!r}: stored record unreadable: {e}") from None

    async def _samples(self, drill_id: str) -> list[dict[str, Any]]:
        kvs, _ = await self.store.range(f"{SAMPLES}{drill_id}/samples/")
        out = []
        for kv in kvs:
            try:
                obj = json.loads(kv.value)
                if isinstance(obj, dict) and isinstance(obj.get("second"), int):
                    out.append(obj)
            except ValueError:
                log.error("ignoring unreadable sample %s", quote(kv.key))
        out.sort(key=lambda o: (o["second"], str(o.get("cluster"))))
        return out

    async def h_create_drill(self, request: web.Request) -> web.Response:
        operator = self._operator(request, "create drills")
        body = await self._json(request)
        async with self._drill_lock:
            now = self._clock()
            cat = await self._snapshot()
            busy = drill_logic.overlapping(cat, now)
            if busy is not None:
                raise ApiError(
                    409,
                    f"drill {busy.id} ({busy.mode} of {busy.scope_kind} {busy.scope}) is "
                    f"{'still running' if busy.state == 'running' else 'still observing'}; "
                    "wait for it to finish or abort it",
                    drill=busy.id,
                )
            rand4 = "".join(secrets.choice(_RAND_ALPHABET) for _ in range(4))
            try:
                drill = drill_logic.new_drill(body, cat, now, rand4)
            except InputError as e:
                raise ApiError(400, str(e)) from None
            await self._put_drill(drill)
        log.info(
            "drill %s created by %s: %s of %s %s (%s), deadline in %.1fs",
            drill.id, quote(operator), drill.mode, drill.scope_kind, drill.scope,
            ", ".join(drill.clusters_in_scope), drill.fault_end - now,
        )
        return web.json_response(drill.to_json(), status=201)

    async def h_list_drills(self, request: web.Request) -> web.Response:
        self._caller(request)
        drills = sorted(await self._load_drills(), key=lambda d: (d.created_at, d.id), reverse=True)
        return web.json_response({"drills": [d.to_json() for d in drills]})

    async def h_get_drill(self, request: web.Request) -> web.Response:
        self._caller(request)
        drill = await self._get_drill(request.match_info["id"])
        return web.json_response({
            "drill": drill.to_json(),
            "samples": await self._samples(drill.id),
        })

    async def h_drill_report(self, request: web.Request) -> web.Response:
        self._caller(request)
        drill = await self._get_drill(request.match_info["id"])
        return web.json_response(drill_logic.compute_report(drill, await self._samples(drill.id)))

    async def h_abort_drill(self, request: web.Request) -> web.Response:
        operator = self._operator(request, "abort drills")
        await self._get_drill(request.match_info["id"])  # 404 before the body is looked at
        reason = "aborted by operator"
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"request body: not valid JSON ({e})") from None
            if not isinstance(body, dict) or set(body) - {"reason"}:
                raise ApiError(400, 'request body: expected {"reason": "..."}')
            r = body.get("reason")
            if r is not None:
                if not isinstance(r, str) or not r.strip() or len(r) > drill_logic.MAX_REASON:
                    raise ApiError(400, f"reason: {r!r}: expected a short non-empty text")
                reason = r.strip()
        drill = await self._end_drill(request.match_info["id"], "aborted", reason)
        log.info("drill %s aborted by %s: %s", drill.id, quote(operator), quote(reason))
        return web.json_response(drill.to_json())

    async def _end_drill(self, drill_id: str, state: str, reason: str) -> Drill:
        async with self._drill_lock:
            drill = await self._get_drill(drill_id)
            try:
                ended = drill_logic.end(drill, self._clock(), state, reason)
            except drill_logic.DrillStateError as e:
                raise ApiError(409, str(e), state=drill.state) from None
            await self._put_drill(ended)
            return ended

    async def h_put_sample(self, request: web.Request) -> web.Response:
        info = request.match_info
        caller, _ = self._cluster(request, "write drill samples")
        target = info["cluster"]
        if caller != target:
            self._refused("forbidden", "denied: cluster %s tried to write samples of cluster %s",
                          quote(caller), quote(target))
            raise ApiError(
                403, f"cluster {caller!r} may not write samples of cluster {target!r}",
                caller=caller, target=target,
            )
        try:
            second = parse_int(info["second"], "second (an epoch second)", 0, api.MAX_SECOND)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        drill = await self._get_drill(info["id"])
        if drill.in_scope(caller):
            raise ApiError(
                403, f"cluster {caller!r} is in the scope of drill {drill.id}: only observers "
                "send samples",
            )
        body = await self._json(request)
        try:
            sample = drill_logic.validate_sample(body, drill, caller, second)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        lo, hi = drill_logic.sample_window(drill)
        if not lo <= second <= hi:
            raise ApiError(
                409,
                f"second {second} is outside drill {drill.id}'s sample window "
                f"[{lo:.0f}, {hi:.0f}]",
            )
        key = f"{SAMPLES}{drill.id}/samples/{caller}/{second:010d}"
        rev = await self.store.put(key, api.canonical_json(sample))
        if drill.state == "running" and drill.abort_on:
            slo = drill_logic.parse_slo(drill.abort_on)
            reason = drill_logic.slo_tripped(slo, drill, await self._samples(drill.id), self._clock())
            if reason is not None:
                with contextlib.suppress(ApiError):  # already ended meanwhile: nothing to do
                    await self._end_drill(drill.id, "aborted", reason)
                    log.warning("drill %s: %s", drill.id, reason)
        return web.json_response({"revision": rev})

    async def _snapshot(self) -> Catalog:
        kvs, rev = await self.store.range(CATALOG_PREFIX)
        items = []
        for kv in kvs:
            try:
                Catalog().apply(kv.key, kv.value, rev)
                items.append((kv.key, kv.value))
            except InputError as e:
                log.error("catalog: skipping unreadable %s: %s", quote(kv.key), quote(e))
        return Catalog.from_items(items, rev)

    async def h_catalog(self, request: web.Request) -> web.Response:
        self._caller(request)
        return web.json_response((await self._snapshot()).to_json())

    async def h_watch(self, request: web.Request) -> web.Response:
        self._caller(request)
        q = request.query
        try:
            after = parse_int(q.get("after", "0"), "after (a revision)", 0, api.MAX_ID)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        try:
            timeout = parse_duration(q["timeout"]) if "timeout" in q else api.DEFAULT_WATCH_TIMEOUT
        except InputError as e:
            raise ApiError(400, f"timeout: {e}") from None
        timeout = min(timeout, api.MAX_WATCH_TIMEOUT)
        self._watchers += 1
        try:
            waiter = asyncio.ensure_future(self.store.events(CATALOG_PREFIX, after, timeout))
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
            events = waiter.result() if not waiter.cancelled() else []
        except CompactedError as e:
            return web.json_response({"error": str(e), "compacted": e.compacted}, status=410)
        except FutureRevisionError as e:
            return web.json_response({"error": f"after: {e}", "revision": e.current}, status=400)
        finally:
            self._watchers -= 1
        latest = events[-1].revision if events else after
        return web.json_response({
            "revision": latest,
            "events": [api.event_to_json(ev) for ev in events],
        })

    async def h_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(api.openapi_document())

    # ---- admin ---------------------------------------------------------------------------

    async def h_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def h_readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self._store_open:
            problems.append("store not open")
        if not self._bound:
            problems.append("TLS listener not bound")
        if problems:
            return web.Response(text="not ready: " + ", ".join(problems) + "\n", status=503)
        return web.Response(text="ready\n")

    async def h_metrics(self, request: web.Request) -> web.Response:
        rev = await self.store.revision() if self._store_open else 0
        live = 0
        if self._store_open:
            kvs, _ = await self.store.range(LIVE)
            live = len(kvs)
        page = Exposition()
        page.counter("isthmus_federation_requests_total",
                     "HTTP requests by route and status code.",
                     [({"route": route, "code": code}, n)
                      for (route, code), n in sorted(self._requests.items())])
        page.counter("isthmus_federation_authz_denied_total",
                     "Requests refused for the caller's identity.", [({}, self._denied)])
        page.gauge("isthmus_federation_watchers", "Long-polls in progress.",
                   [({}, self._watchers)])
        page.gauge("isthmus_federation_revision", "Latest store revision.", [({}, rev)])
        page.gauge("isthmus_federation_clusters", "Joined clusters.",
                   [({}, len(self._records))])
        page.gauge("isthmus_federation_live_clusters", "Clusters holding a live lease.",
                   [({}, live)])
        serving_metrics(page, "isthmus_federation_http",
                        {n: site.stats for n, site in self._sites.items()})
        return web.Response(
            body=page.text().encode(),
            headers={"Content-Type": api.METRICS_CONTENT_TYPE,
                     "X-Content-Type-Options": "nosniff"},
        )

    async def h_status(self, request: web.Request) -> web.Response:
        if not request.app[_ADMIN]:
            self._caller(request)
        cat = await self._snapshot()
        now = self._clock()
        clusters = {}
        for name, rec in sorted(cat.clusters.items()):
            renewed = self._renewed.get(name)
            clusters[name] = {
                "region": rec.region,
                "zone": rec.zone,
                "trust_domain": rec.trust_domain,
                "gateway_address": rec.gateway_address,
                "live": name in cat.live,
                "lease_age_seconds": None if renewed is None else round(now - renewed, 3),
            }
        services: dict[str, dict[str, list]] = {}
        for _, exp in sorted(cat.exports.items()):
            services.setdefault(str(exp.service), {})[exp.cluster] = [
                e.to_json() for e in exp.endpoints
            ]
        return web.json_response({
            "revision": cat.revision,
            "trust_domain": self.trust_domain,
            "clusters": clusters,
            "services": services,
        })


def _check_bundle_domain(bundle: TrustBundle, td: str) -> None:
    """A JWKS carries no trust domain; but an authority whose URI SAN is a SPIFFE ID (as our CAs
    have: `spiffe://<td>`) must name the cluster's trust domain."""
    for i, der in enumerate(bundle.authorities):
        try:
            claimed = spiffe_id_of(der)
        except IdentityError:
            continue  # a CA without a SPIFFE URI SAN: nothing to compare
        if claimed.trust_domain.name != td:
            raise ApiError(
                400,
                f"bundle: keys[{i}] is an authority of trust domain "
                f"{claimed.trust_domain.name!r}, not of the cluster's {td!r}",
            )


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None) if route is not None else None
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return resource.canonical
