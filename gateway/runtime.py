"""Composition root of a gateway: config -> identity, health, routers, listeners, agent, admin.

The data path reads top to bottom here: a local app connects to an import listener; its router
(tiers from the catalog and health) plans the attempts; the dialer connects a local endpoint or
a remote gateway over mutual TLS; the relay carries bytes. Inbound, a remote gateway's stream is
identified (SVID against its own trust domain's bundle), authorized (export's allowed
consumers), routed to a healthy local endpoint, relayed.

Drills (drill_actor.py) sit beside the data path: the actor hears every new catalog, sets the
inbound listener's fault hook while a drill holds this cluster (and has the agent withdraw our
exports for a drain), and probes our imports through their routers and the same dialer while
a drill of another cluster is observed.

Every task is owned by the TaskGroup in `run()`; stopping cancels the group, then closes the
listeners (their connections and connect tasks), the admin server and the federation client.

With `--workers N` (workers.py) the same Gateway runs in N processes on SO_REUSEPORT listeners:
worker 0 (the primary) does everything above and supervises the others; workers 1..N-1 are
data plane only (their own catalog watch, health checks and drill faults; no join, lease,
publishing, admin or drill observers).

Lifecycle (restart.py orchestrates restarts; control/handoff.py has the protocol):
1. claim: bind every listening socket (or, with --takeover, receive them from the gateway
   running on the state dir) before writing anything; take the state dir's lock;
2. build identity, routers, listeners (a takeover builds them not accepting yet), admin;
3. run the data plane's tasks; the primary *speaks* for the cluster (join, lease, publishing,
   catalog file, SVID rotation, drill actor: everything that writes the state dir or the
   federation) in one task that a handoff stops and, if the handoff fails, starts again;
4. a takeover waits until ready (takeover.missing), is released by the old process, starts
   accepting and speaking; the old one then drains (`Restart.drain`) and exits 0. SIGQUIT
   drains too; SIGTERM/SIGINT stop at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from typing import Any

from federation.errors import IsthmusError, PermanentError
from federation.identity import Svid, TrustBundle
from federation.logs import LogLimiter
from federation.model import (
    Catalog,
    Endpoint,
    Export,
    FailoverPolicy,
    Locality,
    ServiceKey,
    TierKind,
)
from federation.units import format_hostport, parse_hostport
from gateway.config.schema import GatewayConfig
from gateway.config.values import ExportConfig, ImportConfig
from gateway.control.agent import Agent, Backoff, Identity, federation_ca
from gateway.control.drill_actor import DrillActor
from gateway.control.handoff import TakeoverFailed
from gateway.control.otlp import OtlpExporter
from gateway.control.reload import ConfigReloads, watch_config
from gateway.control.workers import STATS_EVERY, Supervisor, watch_parent, write_stats
from gateway.core.health import HealthBook
from gateway.core.takeover import Progress
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import ImportListener, InboundListener
from gateway.dataplane.pool import keep_links
from gateway.dataplane.probes import checker, probe_loop
from gateway.dataplane.router import Router, local_key, remote_key
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from gateway.dns.answers import Records
from gateway.dns.responder import DnsResponder
from gateway.http_imports import HttpImports, http_limits
from gateway.introspection import Introspection, Observed
from gateway.reloading import LiveReload
from gateway.restart import Restart, first_of, readiness
from gateway.sides import SideServices
from gateway.tunnel.device import WireguardDevice
from gateway.tunnel.rotation import KeyRotation
from gateway.xds.server import Pusher, XdsServer

log = logging.getLogger("isthmus.gateway")

TICK = 0.25  # failover state and export health re-evaluated this often, besides on events
REPORT_INTERVAL = 1.0  # traffic report to the federation (dashboard), seconds


class Gateway(LiveReload, SideServices, Introspection, HttpImports):
    def __init__(self, cfg: GatewayConfig, *, wall=time.time, rng: random.Random | None = None,
                 workers: int = 1, worker: int = 0, primary_pid: int = 0, log_level: str = "info",
                 takeover: bool = False, listen_fds: dict[str, int] | None = None,
                 ready_fd: int | None = None, wait_serve: bool = False) -> None:
        self.cfg = cfg
        self.restart = Restart(cfg, workers=workers, worker=worker, takeover=takeover,
                               listen_fds=listen_fds, ready_fd=ready_fd, wait_serve=wait_serve,
                               speak=self._speak, quiet=self._quiet,
                               drain=lambda: self._drain_wanted.set())  # type: ignore[union-attr]
        self.catalog_from = "none"  # "cache" | "federation": what the catalog in use came from
        self._tg: asyncio.TaskGroup | None = None
        self._speaker: asyncio.Task | None = None
        self._watching = False
        self._drain_wanted: asyncio.Event | None = None
        self.workers = workers
        self.worker = worker
        self.primary = worker == 0
        self.primary_pid = primary_pid  # a worker's parent; it stops when that changes
        self.log_level = log_level
        self.supervisor: Supervisor | None = None
        self.wall = wall
        self.rng = rng or random.Random()
        c = cfg.cluster
        self.locality = Locality(c.region, c.zone, c.name)
        self.book = HealthBook(cfg.outlier_detection)
        self.book.on_change.append(self._health_changed)
        self.events = LogLimiter(log, interval=30.0, burst=4)  # transitions (_log_transitions)
        self.observed = Observed()  # what _log_transitions counted (/metrics, dashboard)
        self.identity: Identity | None = None
        self.tls: GatewayTls | None = None
        self.agent: Agent | None = None
        self.catalog = Catalog()
        self.gateways: dict[str, tuple[str, int]] = {}  # cluster -> inbound address
        self.export_routers: dict[ServiceKey, tuple[Export, Router]] = {}
        self.import_routers: dict[ServiceKey, Router] = {}
        self.listeners: list[Any] = []
        self.inbound: InboundListener | None = None
        self.dialer: Dialer | None = None
        self.drill_actor: DrillActor | None = None
        self.admin: Any = None
        self.ready = False
        self.started_at = time.monotonic()
        self.bundle_refused: dict[str, str] = {}
        self.reloads = ConfigReloads(cfg, wall)
        self._reload_lock = asyncio.Lock()
        self._reload_pending: str | None = None  # a SIGHUP before the task group runs
        self._probes: dict[tuple[ServiceKey, str], asyncio.Task] = {}  # health check loops
        self.import_listeners: dict[ServiceKey, ImportListener] = {}  # or HttpImportListener
        self.spans: OtlpExporter | None = None  # the `tracing:` section's span exporter
        self._backend_only: set[ServiceKey] = set()  # routers of route backends (http_imports)
        self._retiring: set[ImportListener] = set()  # removed by a reload, draining
        self.dns: DnsResponder | None = None  # the primary's, with a `dns:` section
        self.dns_records: Records | None = None
        self._dns_serial = 0
        self.tunnel: WireguardDevice | None = None  # the primary's, with a `tunnel:` section
        self._tunnel_wanted = asyncio.Event()  # a new catalog for the tunnel's peers
        self.key_rotation: KeyRotation | None = None
        self.xds: XdsServer | None = None  # the primary's, with an `xds:` section
        self.xds_pusher: Pusher | None = None

    # -- construction --------------------------------------------------------------------------
    def _mono(self) -> float:
        return time.monotonic()

    def _build_routers(self) -> None:
        for ex in self.cfg.exports:
            self._set_export(ex)
        for im in self.cfg.imports:
            self._add_import_router(im)
        self._sync_backends()

    def _set_export(self, ex: ExportConfig) -> None:
        """The router of export `ex` (made, or given the new endpoints), and the local
        endpoints of our import of the same service, if any."""
        svc = ServiceKey(ex.namespace, ex.name)
        own_only = FailoverPolicy((TierKind.CLUSTER,), max_attempts=max(1, len(ex.endpoints)))
        held = self.export_routers.get(svc)
        if held is None:
            router = Router(svc, self.locality, own_only, self.book, self._mono, self.rng.random)
        else:
            router = held[1]
            router.set_policy(own_only)
        router.set_local(ex.endpoints)
        self.export_routers[svc] = (self._export_value(ex, health=False), router)
        if svc in self.import_routers:
            self.import_routers[svc].set_local(ex.endpoints)

    def _remove_export(self, ex: ExportConfig) -> None:
        svc = ServiceKey(ex.namespace, ex.name)
        self.export_routers.pop(svc, None)  # new streams for it are refused from now on
        self._stop_probes(svc)
        if svc in self.import_routers:
            self.import_routers[svc].set_local(())

    def _add_import_router(self, im: ImportConfig, svc: ServiceKey | None = None) -> Router:
        """The router of import `im` (or of `svc`, a route backend, with `im`'s policy)."""
        svc = svc or ServiceKey(im.namespace, im.name)
        router = Router(svc, self.locality, im.failover, self.book, self._mono, self.rng.random,
                        gateway_address=self.gateways.get)
        own = self.export_routers.get(svc)
        if own is not None:
            router.set_local(own[1].local)
        self.import_routers[svc] = router
        return router

    def _export_value(self, ex: Any, health: bool = True) -> Export:
        now = self._mono()
        return Export(
            cluster=self.cfg.cluster.name,
            namespace=ex.namespace,
            name=ex.name,
            port=ex.port,
            protocol=ex.protocol,
            endpoints=tuple(
                Endpoint(e.host, e.port,
                         self.book.routable(local_key(e.host, e.port), now) if health else True,
                         e.weight)
                for e in ex.endpoints
            ),
            allowed_consumers=ex.allowed_consumers,
        )

    def export_state(self) -> list[Export]:
        return [self._export_value(ex) for ex in self.cfg.exports]

    # -- reactions -------------------------------------------------------------------------------
    def _health_changed(self, key: str) -> None:
        if key.startswith("local:") and self.agent is not None:
            self.agent.publish_wanted.set()
        self._xds_changed()

    def _on_identity(self, svid: Svid) -> None:  # a new SVID and/or own bundle (CA rotation)
        snap, own = self.tls.snapshot, self.identity.bundle
        self.tls.update(TlsSnapshot(svid, {**snap.bundles, own.trust_domain: own}, snap.owners))

    def apply_catalog(self, cat: Catalog) -> None:
        """New catalog: trust bundles, gateway addresses, remote candidates of every import."""
        self.catalog = cat
        me = self.cfg.cluster.name
        snap = self.tls.snapshot
        bundles: dict[str, TrustBundle] = {self.identity.bundle.trust_domain: self.identity.bundle}
        owners: dict[str, str] = {self.cfg.cluster.trust_domain: me}
        gateways: dict[str, tuple[str, int]] = {}
        for name, rec in cat.clusters.items():
            if name == me:
                continue
            raw = cat.bundles.get(rec.trust_domain)
            if raw is None:
                continue
            try:
                bundle = TrustBundle.from_jwks(rec.trust_domain, dict(raw))
                held = snap.bundles.get(rec.trust_domain)
                if held is not None:
                    bundle = held.successor(bundle)
                gateways[name] = parse_hostport(rec.gateway_address)
            except (IsthmusError, ValueError) as e:  # a malformed peer never crashes us
                if self.bundle_refused.get(name) != str(e):
                    log.warning("cluster %s: ignoring its bundle/record: %s", name, e)
                self.bundle_refused[name] = str(e)
                held = snap.bundles.get(rec.trust_domain)
                if held is None:
                    continue
                bundle = held
                gateways[name] = parse_hostport(rec.gateway_address)
            bundles[rec.trust_domain] = bundle
            owners[rec.trust_domain] = name
            if name in gateways and self.cfg.tunnel is not None and rec.tunnel is not None \
                    and rec.tunnel.overlay_address:  # links go through the tunnel
                gateways[name] = (rec.tunnel.overlay_address, gateways[name][1])
        self.tls.update(TlsSnapshot(snap.svid, bundles, owners))
        self.gateways.clear()
        self.gateways.update(gateways)
        for svc, router in self.import_routers.items():
            router.set_remote(self._remote_of(svc))
        self.book.forget(self._known_keys())
        self._refresh_dns()
        self._xds_changed()
        self._tunnel_wanted.set()
        if self.drill_actor is not None:
            self.drill_actor.on_catalog(cat)

    def _remote_of(self, svc: ServiceKey) -> list[tuple[Locality, Export]]:
        """Other clusters' exports of `svc` that may serve us (catalog and gateways known)."""
        me, cat = self.cfg.cluster.name, self.catalog
        return [(cat.clusters[e.cluster].locality, e) for e in cat.exports_of(svc)
                if e.cluster != me and e.cluster in self.gateways and e.allows(me)]

    def _known_keys(self) -> set[str]:
        keys = {local_key(e.host, e.port) for ex in self.cfg.exports for e in ex.endpoints}
        keys |= {remote_key(c) for c in self.gateways}
        return keys

    # -- tasks -----------------------------------------------------------------------------------
    def _start_probes(self, ex: ExportConfig, only: set[str] | None = None) -> None:
        """Health check loops of export `ex`'s endpoints (those keyed in `only`, if given)."""
        svc, hc = ServiceKey(ex.namespace, ex.name), ex.health_check
        for e in ex.endpoints:
            key = local_key(e.host, e.port)
            if (only is not None and key not in only) or (svc, key) in self._probes:
                continue
            check = checker(hc, e.host, e.port)
            self._probes[(svc, key)] = self._tg.create_task(  # type: ignore[union-attr]
                probe_loop(self.book, key, check, hc.interval, hc.healthy_threshold,
                           hc.unhealthy_threshold, self._mono))

    def _stop_probes(self, svc: ServiceKey, only: set[str] | None = None) -> None:
        for k in [k for k in self._probes if k[0] == svc and (only is None or k[1] in only)]:
            self._probes.pop(k).cancel()

    async def _probe_gateways(self) -> None:
        """Probe every remote gateway we may send traffic to, all at once, every interval."""
        p = self.cfg.peer_probe
        while True:
            started = self._mono()
            clusters = self._peers()

            async def one(cluster: str) -> None:
                host, port = self.gateways[cluster]
                ok = await self.dialer.pool.ping(cluster, host, port, p.timeout)
                self.book.probe(remote_key(cluster), ok, self._mono(), p.healthy_threshold,
                                p.unhealthy_threshold)

            if clusters:
                await asyncio.gather(*(one(c) for c in clusters))
            await asyncio.sleep(max(0.0, p.interval - (self._mono() - started)))

    def _peers(self) -> list[str]:
        """The remote gateways our imports may send traffic to (probed)."""
        wanted = {loc.cluster for r in self.import_routers.values() for loc, _ in r.remote}
        return sorted(c for c in wanted if c in self.gateways)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for router in self.import_routers.values():
                router.tick()
            self._log_transitions()
            if self.agent is not None and self.agent.lease is not None:
                self.agent.publish_wanted.set()  # publishes only exports whose health changed

    async def _join(self) -> None:
        """Join the federation once (a write: the primary only), retrying what may pass
        (federation down, 5xx); a PermanentError (no CA file, no token, token refused) ends
        run() with that error."""
        agent = self.agent
        if agent.client is not None:
            return
        backoff = Backoff()
        while True:
            try:
                await agent.ensure_joined()
                return
            except PermanentError:
                raise
            except IsthmusError as e:
                log.warning("cannot join the federation yet (retrying): %s", e)
                await asyncio.sleep(backoff.next())

    def _watch(self) -> None:
        """Follow the catalog (read-only; once per process)."""
        if not self._watching:
            self._watching = True
            self._tg.create_task(self.agent.watch_loop())  # type: ignore[union-attr]

    async def _speaking(self) -> None:
        """Everything that writes for the cluster: the state dir and the federation."""
        await self._join()
        self._watch()
        agent = self.agent
        async with asyncio.TaskGroup() as tg:
            for loop in (agent.lease_loop, agent.publish_loop, agent.persist_loop,
                         agent.rotation_loop):
                tg.create_task(loop())
            tg.create_task(self.drill_actor.run())
            tg.create_task(self._report_loop())

    async def _report_loop(self) -> None:
        """Every REPORT_INTERVAL, our traffic report to the federation (its dashboard); a
        failure is retried at the next one (debug log: the lease loop says when it is down)."""
        agent = self.agent
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            if agent.client is None or agent.lease is None:
                continue
            try:
                await agent.client.put_report(self.cfg.cluster.name, self.report())
            except IsthmusError as e:
                log.debug("traffic report not delivered: %s", e)

    def _speak(self) -> None:
        if self.tunnel is not None:
            self.tunnel.restart_on_exit = True
        if self._speaker is None:
            self._speaker = self._tg.create_task(self._speaking())  # type: ignore[union-attr]

    async def _quiet(self) -> None:
        """Stop speaking for the cluster (a handoff releases that role to the new process)."""
        if self.tunnel is not None:
            self.tunnel.restart_on_exit = False  # the new process takes the interface over
        if self._speaker is not None:
            self._speaker.cancel()
            await asyncio.wait({self._speaker})
            self._speaker = None

    def _on_federation_catalog(self, cat: Catalog) -> None:
        self.catalog_from = "federation"
        self.apply_catalog(cat)

    async def _follow_primary(self) -> None:
        """A worker follows the catalog once the primary has joined (it never joins itself)."""
        while not self.agent.joined_path.exists():
            await asyncio.sleep(0.5)
        await self.agent.ensure_joined()
        self._watch()

    async def _report_stats(self) -> None:
        while True:
            await asyncio.to_thread(write_stats, self.cfg.state_dir, self.worker,
                                    self.listener_stats())
            await asyncio.sleep(STATS_EVERY)

    async def _stop_with_parent(self, stop: asyncio.Event) -> None:
        await watch_parent(self.primary_pid)
        stop.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        federation_ca(cfg)  # a ConfigError now, before anything is bound, rather than at the join
        await self.restart.claim()
        self.identity = Identity(cfg, self.wall(),
                                 persist=self.primary and self.restart.handoff is None)
        self.tls = GatewayTls(
            TlsSnapshot(self.identity.svid,
                        {self.identity.bundle.trust_domain: self.identity.bundle},
                        {cfg.cluster.trust_domain: cfg.cluster.name}),
            self.wall,
        )
        self._build_routers()
        self.agent = Agent(cfg, self.identity, self.wall, self._on_federation_catalog,
                           self._on_identity, self.export_state)
        self.agent.log_peers = self.primary  # workers follow the same catalog: one line is enough
        await self._start_tunnel()
        cached = self.agent.load_cached_catalog()
        if cached is not None:
            self.catalog_from = "cache"
            self.apply_catalog(cached)
            log.info("routing from cached catalog revision %d until the federation answers",
                     cached.revision)
        lim = cfg.limits
        serving = self.restart.serving
        dialer = self.dialer = Dialer(self.tls, lim.connect_timeout)
        self.inbound = InboundListener(self.tls, self.export_routers.get, dialer,
                                       max_connections=lim.max_connections,
                                       idle_timeout=lim.idle_timeout,
                                       http_limits=http_limits(lim),
                                       max_handshakes=lim.inbound_max_handshakes)
        if cfg.tracing is not None:  # every process exports the spans of its own requests
            self.spans = OtlpExporter(cfg.tracing, cfg.cluster.name, self.worker)
            self.inbound.spans = self.spans
        await self.inbound.start(*cfg.listen.inbound, sock=self.restart.sock(cfg.listen.inbound),
                                 serving=serving,
                                 handshake_timeout=lim.inbound_handshake_timeout)
        self.listeners.append(self.inbound)
        self.drill_actor = DrillActor(cfg.cluster.name, self.wall, self._mono, self.inbound,
                                      self.agent if self.primary else None,
                                      self.import_routers, dialer, self.rng.random,
                                      observe=self.primary)
        self.drill_actor.on_catalog(self.catalog)  # a cached catalog may hold a drill in progress
        for im in cfg.imports:
            await self._open_import(im, self.restart.sock(im.listen), serving)
        if not self.primary:
            self.ready = True
            log.info("gateway %s worker %d/%d up", cfg.cluster.name, self.worker, self.workers)
            return
        if self.workers > 1:
            self.supervisor = Supervisor(cfg.source, self.workers, self.log_level,
                                         self.restart.sockets,
                                         wait_serve=self.restart.handoff is not None)
        if self.restart.handoff is not None:
            return  # run() takes over once ready
        await self._start_admin()
        await self._start_dns()
        await self._start_xds()
        self.ready = True
        log.info("gateway %s (%s) up: inbound %s, admin %s:%s, %d import listener(s), "
                 "%d worker(s)%s",
                 cfg.cluster.name, self.locality, cfg.listen.advertise, *cfg.listen.admin,
                 len(self.import_routers), self.workers,
                 f", DNS {format_hostport(*self.dns.address)} (zone {cfg.dns.zone})"
                 if self.dns is not None and cfg.dns is not None else "")

    async def _open_import(self, im: ImportConfig, sock: Any, serving: bool) -> None:
        svc, lim = ServiceKey(im.namespace, im.name), self.cfg.limits
        lst: Any
        if im.protocol == "http":
            lst = self._http_listener(im)
            lst.spans = self.spans
        else:
            lst = ImportListener(svc, self.import_routers[svc], self.dialer,  # type: ignore
                                 max_connections=lim.max_connections,
                                 idle_timeout=lim.idle_timeout)
        await lst.start(*im.listen, sock=sock, serving=serving)
        self.listeners.append(lst)
        self.import_listeners[svc] = lst

    async def _start_admin(self) -> None:
        from gateway.control.admin import start_admin

        admin = self.cfg.listen.admin
        self.admin = await start_admin(self, *admin, sock=self.restart.sock(admin))

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Until `stop` (close now) or `drain` (stop accepting, drain, close): SIGTERM / SIGQUIT
        in the command; a handoff to a new process sets `drain` too."""
        drain = self._drain_wanted = drain or asyncio.Event()
        failure: TakeoverFailed | None = None
        try:
            await self.start()
            # What start() built (modules, TLS contexts, config) lives as long as the process: keep
            # the cyclic GC from rescanning it every time per-connection garbage triggers a pass.
            gc.freeze()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._sync_policy_tasks()  # the JWT key refresh loops
                if self.primary:
                    tg.create_task(watch_config(lambda: self.cfg, self._reload_safely))
                if self._reload_pending is not None:
                    self.reload_soon(self._reload_pending)
                if self.primary:
                    if self.supervisor is not None:
                        tg.create_task(self.supervisor.run())
                else:
                    tg.create_task(self._follow_primary())
                    tg.create_task(self._report_stats())
                    tg.create_task(self._stop_with_parent(stop))
                    tg.create_task(self.agent.rotation_loop())
                    tg.create_task(self.drill_actor.run())
                for ex in self.cfg.exports:
                    self._start_probes(ex)
                tg.create_task(self._probe_gateways())
                tg.create_task(keep_links(self.tls, (self.dialer.pool, self.inbound)))
                tg.create_task(self._ticker())
                if self.spans is not None:
                    tg.create_task(self.spans.run())
                self._tunnel_tasks()
                if self.xds_pusher is not None:
                    tg.create_task(self.xds_pusher.run())
                if self.primary:
                    if self.restart.handoff is not None:
                        try:
                            await self.restart.take_over(
                                follow=self._follow_saved, progress=self._progress,
                                stopping=lambda: stop.is_set() or drain.is_set(),
                                identity=self.identity, accept=self._accept,
                                imports=len(self.import_routers))
                        except TakeoverFailed as e:
                            failure = e
                            raise _Stop from None
                    self._speak()
                    tg.create_task(self.restart.control_server().run())
                else:
                    tg.create_task(self.restart.worker_ready(self._progress, drain.is_set,
                                                             self.listeners))
                await first_of(stop, drain)
                if drain.is_set() and self.supervisor is not None:
                    self.supervisor.draining = True  # its workers drain too, not stop
                raise _Stop
        except* _Stop:
            pass
        except* PermanentError as group:  # the reason alone, not a group of one: cli exits on it
            raise _first_error(group) from None
        finally:
            if drain.is_set() and not stop.is_set() and failure is None:
                self.ready = False
                await self.restart.drain(stop, self.listeners, self.supervisor, self._close_admin)
            await self.close()
        if failure is not None:
            raise failure

    # -- restarts (restart.py) ---------------------------------------------------------------
    def _progress(self, waited: float) -> Progress:
        return readiness(waited, self.cfg, self.book, self._peers(), self.catalog_from,
                         self.supervisor)

    async def _follow_saved(self) -> None:
        """Taking over: follow the catalog at once if the old process had joined."""
        if self.agent.joined_path.exists():
            await self.agent.ensure_joined()  # the saved federation bundle: no request yet
            self._watch()

    async def _accept(self) -> None:
        """Taking over, released: accept (this process and its workers), serve the admin port."""
        for lst in self.listeners:
            await lst.serve()
        if self.supervisor is not None:
            self.supervisor.serve()
        await self._start_admin()
        await self._start_dns()
        await self._start_device()
        await self._start_xds()
        self.ready = True

    async def _close_admin(self) -> None:
        if self.admin is not None:
            await self.admin.cleanup()
            self.admin = None

    async def close(self) -> None:
        self.ready = False
        for lst in [*self.listeners, *self._retiring]:
            await lst.close()
        self.listeners.clear()
        if self.dialer is not None:
            await self.dialer.pool.close()
        await self._close_admin()
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
        if self.tunnel is not None:
            await self.tunnel.close()
            self.tunnel = None
        if self.xds is not None:
            await self.xds.close()
            self.xds = None
        if self.agent is not None:
            await self.agent.close()
        await self.restart.close()

class _Stop(Exception):
    pass


def _first_error(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e
