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
import os
import random
import signal
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
    Tunnel,
)
from federation.units import format_hostport, parse_hostport
from gateway.config.schema import ConfigError, GatewayConfig, load_config
from gateway.config.values import ExportConfig, ImportConfig
from gateway.control.agent import Agent, Backoff, Identity, federation_ca
from gateway.control.claim import BindError
from gateway.control.drill_actor import DrillActor
from gateway.control.handoff import TakeoverFailed
from gateway.control.reload import ConfigReloads, watch_config
from gateway.control.workers import STATS_EVERY, Supervisor, read_stats, watch_parent, write_stats
from gateway.core.health import HealthBook
from gateway.core.priorities import priorities
from gateway.core.reconcile import ConfigChanges, effective, moved_listeners, reconcile
from gateway.core.takeover import Progress, Wanted
from gateway.core.tunnel_peers import wanted_peers
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import ImportListener, InboundListener
from gateway.dataplane.pool import keep_links
from gateway.dataplane.probes import checker, probe_loop
from gateway.dataplane.router import Router, local_key, remote_key
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from gateway.dns.answers import DnsSettings, Records, build
from gateway.dns.responder import DnsResponder
from gateway.errors import GatewayError
from gateway.restart import Restart, first_of, readiness
from gateway.tunnel.device import WireguardDevice
from gateway.tunnel.keys import load_or_create
from gateway.tunnel.rotation import KeyRotation
from gateway.tunnel.uapi import TunnelError
from gateway.xds.resources import Snapshot, XdsService
from gateway.xds.resources import snapshot as xds_snapshot
from gateway.xds.server import Pusher, XdsServer

log = logging.getLogger("isthmus.gateway")

TICK = 0.25  # failover state and export health re-evaluated this often, besides on events


class Gateway:
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
        self.import_listeners: dict[ServiceKey, ImportListener] = {}
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

    def _add_import_router(self, im: ImportConfig) -> Router:
        svc = ServiceKey(im.namespace, im.name)
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

    def _xds_changed(self) -> None:
        if self.xds_pusher is not None:
            self.xds_pusher.mark()

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

    def _refresh_dns(self) -> None:
        """The DNS answers from the catalog and imports now (replaced whole; the SOA serial goes
        up only when a record changed)."""
        d = self.cfg.dns
        if d is None or not self.primary:  # the primary alone answers DNS
            return
        settings = DnsSettings(d.zone, d.ttl, d.listen[0], d.addresses)
        me, old = self.cfg.cluster.name, self.dns_records
        recs = build(settings, self.cfg.imports, self.catalog, me, self._dns_serial)
        if old is None or recs.names != old.names:
            self._dns_serial += 1
            recs = build(settings, self.cfg.imports, self.catalog, me, self._dns_serial)
        self.dns_records = recs
        if self.dns is not None:
            self.dns.set_records(recs)

    async def _follow_tunnel(self) -> None:
        """Keep the tunnel's address and peers equal to the latest catalog (coalesced)."""
        me = self.cfg.cluster.name
        while True:
            await self._tunnel_wanted.wait()
            self._tunnel_wanted.clear()
            own = self.catalog.clusters.get(me)
            try:
                if own is not None and own.tunnel is not None and own.tunnel.overlay_address:
                    await self.tunnel.set_address(  # type: ignore[union-attr]
                        own.tunnel.overlay_address)
                await self.tunnel.set_peers(wanted_peers(self.catalog, me))  # type: ignore
            except (TunnelError, OSError) as e:
                self.tunnel.stats.failures += 1  # type: ignore[union-attr]
                log.warning("tunnel: applying the catalog failed (%s); retried on the next "
                            "change", e)
                await asyncio.sleep(1.0)
                self._tunnel_wanted.set()

    async def _start_tunnel(self) -> None:
        """Our key pair and record's tunnel side; the primary also runs the device."""
        t = self.cfg.tunnel
        if t is None:
            return
        keys = await asyncio.to_thread(load_or_create, self.cfg.state_dir)
        endpoint = t.endpoint or format_hostport(parse_hostport(self.cfg.listen.advertise)[0],
                                                 t.listen_port)
        self.agent.tunnel = Tunnel(keys.public_b64, endpoint)  # type: ignore[union-attr]
        if self.primary and self.restart.handoff is None:
            await self._start_device(keys)

    async def _start_device(self, keys: Any = None) -> None:
        """The primary's WireGuard device (in a takeover: once released; the old process's
        wireguard-go then goes with the interface it held)."""
        t = self.cfg.tunnel
        if t is None or self.tunnel is not None:
            return
        if keys is None:
            keys = await asyncio.to_thread(load_or_create, self.cfg.state_dir)
        self.tunnel = WireguardDevice(t.interface, t.listen_port, keys)
        await self.tunnel.start()
        if t.rotate_every:
            self.key_rotation = KeyRotation(self.cfg.state_dir, t.rotate_every,
                                            t.rotation_overlap, self.tunnel,
                                            lambda: self.agent.tunnel,  # type: ignore
                                            self._publish_tunnel)
        if self._tg is not None:
            self._tunnel_tasks()

    def _tunnel_tasks(self) -> None:
        if self.tunnel is not None:
            self._tg.create_task(self.tunnel.supervise())  # type: ignore[union-attr]
            self._tg.create_task(self._follow_tunnel())  # type: ignore[union-attr]
            self._tunnel_wanted.set()
        if self.key_rotation is not None:
            self._tg.create_task(self.key_rotation.run())  # type: ignore[union-attr]

    async def _publish_tunnel(self, tunnel: Tunnel) -> None:
        """Our record with this tunnel side, now (a key rotation's announcement or switch)."""
        agent = self.agent
        agent.tunnel = tunnel  # type: ignore[union-attr]
        if agent.client is None:  # type: ignore[union-attr]
            raise GatewayError("not joined to the federation yet")
        await agent.client.put_record(agent._record())  # type: ignore[union-attr]

    def _xds_snapshot(self) -> Snapshot:
        """The xDS resources now: per import, priorities from its router's tiers."""
        xd = self.cfg.xds
        host = xd.listen[0] if xd is not None and not _wildcard(xd.listen[0]) else "127.0.0.1"
        services = []
        for im in self.cfg.imports:
            svc = ServiceKey(im.namespace, im.name)
            router = self.import_routers.get(svc)
            if router is None:
                continue
            router.tick()
            listen = (host if _wildcard(im.listen[0]) else im.listen[0], im.listen[1])
            services.append(XdsService(svc, priorities(router.tiers, self.locality, listen)))
        zone = self.cfg.dns.zone if self.cfg.dns is not None else "clusterset.local"
        return xds_snapshot(services, self.cfg.limits.connect_timeout, zone)

    async def _start_xds(self) -> None:
        xd = self.cfg.xds
        if xd is None or self.xds is not None:
            return
        server = XdsServer(self._xds_snapshot())
        try:
            await server.start(*xd.listen)
        except (OSError, RuntimeError) as e:
            raise BindError(f"{self.cfg.source}: xds.listen: cannot listen on "
                            f"{format_hostport(*xd.listen)}: {e}") from None
        self.xds = server
        self.xds_pusher = Pusher(server, self._xds_snapshot)
        if self._tg is not None:
            self._tg.create_task(self.xds_pusher.run())

    async def _start_dns(self) -> None:
        d = self.cfg.dns
        if d is None or self.dns is not None:
            return
        self._refresh_dns()
        dns = DnsResponder(self.dns_records)  # type: ignore[arg-type]
        try:
            await dns.start(*d.listen)
        except OSError as e:
            raise BindError(f"{self.cfg.source}: dns.listen: cannot listen on "
                            f"{format_hostport(*d.listen)}: {e.strerror or e}") from None
        self.dns = dns

    def _remote_of(self, svc: ServiceKey) -> list[tuple[Locality, Export]]:
        """Other clusters' exports of `svc` that may serve us (catalog and gateways known)."""
        me, cat = self.cfg.cluster.name, self.catalog
        return [(cat.clusters[e.cluster].locality, e) for e in cat.exports_of(svc)
                if e.cluster != me and e.cluster in self.gateways and e.allows(me)]

    def _log_transitions(self) -> None:
        """What the routers and the health book report as changed (router.py), one INFO line
        each, rate-limited per service and per target (both are bounded by config/catalog)."""
        me, events = self.cfg.cluster.name, self.events
        for _, router in self.export_routers.values():
            router.take_switches()  # one tier (our endpoints): their health events say it all
        for router in self.import_routers.values():
            for sw in router.take_switches():
                key, where = f"tier:{sw.service}", f"import {sw.service} (cluster {me})"
                clusters = ", ".join(sw.clusters) or "none"
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

    def _known_keys(self) -> set[str]:
        keys = {local_key(e.host, e.port) for ex in self.cfg.exports for e in ex.endpoints}
        keys |= {remote_key(c) for c in self.gateways}
        return keys

    # -- live reload (core/reconcile.py says what changed; this applies it) ----------------------
    def reload_soon(self, trigger: str) -> None:
        """Reload in a task of the gateway's group (a signal handler's way in)."""
        if self._tg is None:
            self._reload_pending = trigger  # run() starts it once the group runs
        else:
            self._tg.create_task(self._reload_safely(trigger))

    async def _reload_safely(self, trigger: str) -> None:
        """A reload that fails in a way nobody foresaw is refused and logged; the gateway goes
        on serving the config it had."""
        try:
            await self.reload(trigger)
        except Exception as e:  # noqa: BLE001 - one bad reload must not stop the gateway
            log.exception("config reload (%s) failed", trigger)
            self.reloads.refused(trigger, [f"{self.cfg.source}: reload failed: "
                                           f"{type(e).__name__}: {e}"])

    async def reload(self, trigger: str) -> str:
        """Read and validate every file, then apply what changed: 'applied', 'unchanged' or
        'refused' (then nothing changed at all). One reload at a time."""
        async with self._reload_lock:
            try:
                wanted = await asyncio.to_thread(load_config, self.cfg.source)
            except ConfigError as e:
                self.reloads.refused(trigger, [str(p) for p in e.problems])
                return "refused"
            changes = reconcile(self.cfg, wanted)
            self.reloads.needs_restart(changes.restart_needed)
            if not changes.services and not changes.other:
                self.reloads.unchanged(trigger)
                return "unchanged"
            cfg = effective(self.cfg, wanted)
            try:
                fresh = self._bind_added(changes, cfg)
            except BindError as e:
                self.reloads.refused(trigger, [str(e)])
                return "refused"
            await self._apply(changes, cfg, fresh)
            self.reloads.applied(trigger, cfg, changes)
        if self.supervisor is not None:
            self.supervisor.signal_ready(signal.SIGHUP)  # the workers reload too
        return "applied"

    def _bind_added(self, changes: ConfigChanges, cfg: GatewayConfig
                    ) -> dict[tuple[str, int], Any]:
        """Bind every added import's listener that no removed import holds (all or none: a
        port in use refuses the reload before anything changed)."""
        out: dict[tuple[str, int], Any] = {}
        moved = moved_listeners(changes)
        try:
            for im in changes.imports_added:
                if im.listen not in moved:
                    out[im.listen] = self._bind(im, cfg)
        except BaseException:
            for addr in out:
                self.restart.sockets.remove(format_hostport(*addr))
            raise
        return out

    def _bind(self, im: ImportConfig, cfg: GatewayConfig) -> Any:
        """Bind import `im`'s listener; a BindError names its file, line and field in `cfg`."""
        src, field = cfg.source_of("imports", im.namespace, im.name), "imports[?].listen"
        where = str(cfg.source)
        if src is not None:
            same = [s for s in cfg.service_sources
                    if s.section == "imports" and s.file == src.file]
            where, field = f"{src.file}:{src.line}", f"imports[{same.index(src)}].listen"
        w = Wanted(field, *im.listen, self.workers)
        return self.restart.sockets.open(w, self.worker, where)

    async def _apply(self, changes: ConfigChanges, cfg: GatewayConfig,
                     fresh: dict[tuple[str, int], Any]) -> None:
        self.cfg = self.agent.cfg = self.restart.cfg = cfg
        for ex in changes.exports_removed:
            self._remove_export(ex)
        for old, ex in changes.exports_changed:
            svc = ServiceKey(ex.namespace, ex.name)
            keys = {local_key(e.host, e.port) for e in old.endpoints}
            kept = {local_key(e.host, e.port) for e in ex.endpoints}
            self._stop_probes(svc, None if old.health_check != ex.health_check else keys - kept)
            self._set_export(ex)
            self._start_probes(ex)
        for ex in changes.exports_added:
            self._set_export(ex)
            self._start_probes(ex)
        for _, im in changes.imports_changed:
            self.import_routers[ServiceKey(im.namespace, im.name)].set_policy(im.failover)
        for im in changes.imports_removed:
            self._retire(ServiceKey(im.namespace, im.name), im)
        for im in changes.imports_added:
            sock = fresh.get(im.listen)
            if sock is None:  # a removed import held the address: it is free now
                try:
                    sock = self._bind(im, cfg)
                except BindError as e:
                    log.error("config reload: import %s/%s not opened: %s", im.namespace,
                              im.name, e)
                    continue
            router = self._add_import_router(im)
            router.set_remote(self._remote_of(router.service))
            await self._open_import(im, sock, serving=True)
        self.book.forget(self._known_keys())
        self._refresh_dns()
        self._xds_changed()
        if self.agent.lease is not None:
            self.agent.publish_wanted.set()

    def _retire(self, svc: ServiceKey, im: ImportConfig) -> None:
        """A removed import: accept no more, drain what is open (reload.drain_timeout), close."""
        self.import_routers.pop(svc, None)
        lst = self.import_listeners.pop(svc, None)
        if lst is None:
            return
        lst.stop_accepting()
        self.restart.sockets.remove(format_hostport(*im.listen))
        self.listeners.remove(lst)
        self._retiring.add(lst)
        self._tg.create_task(self._drain_retired(lst))  # type: ignore[union-attr]

    async def _drain_retired(self, lst: ImportListener) -> None:
        try:
            left = await lst.drain(self.cfg.reload.drain_timeout)
            if left:
                log.info("%s: removed by a reload; %d connection(s) still open after %gs "
                         "(reload.drain_timeout) were ended", lst.name, left,
                         self.cfg.reload.drain_timeout)
        finally:
            await lst.close()
            self._retiring.discard(lst)

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

    def listener_stats(self) -> dict[str, dict[str, Any]]:
        return {lst.name: lst.counters() for lst in self.listeners}

    def worker_stats(self) -> dict[int, dict[str, Any]]:
        """Listener counters of every worker: 0 is this process (the primary), the others from
        their stats files (fresh ones only)."""
        out = {0: {"pid": os.getpid(), "listeners": self.listener_stats()}}
        if self.workers > 1:
            out.update(read_stats(self.cfg.state_dir, self.workers, time.time()))
        return out

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
                                       idle_timeout=lim.idle_timeout)
        await self.inbound.start(*cfg.listen.inbound, sock=self.restart.sock(cfg.listen.inbound),
                                 serving=serving)
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
        lst = ImportListener(svc, self.import_routers[svc], self.dialer,  # type: ignore[arg-type]
                             max_connections=lim.max_connections, idle_timeout=lim.idle_timeout)
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

    # -- introspection -----------------------------------------------------------------------
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
            "imports": [r.describe() for r in self.import_routers.values()],
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

    def _tunnel_status(self) -> dict[str, Any] | None:
        if self.tunnel is None:
            return None
        out = self.tunnel.describe(self.wall())
        r = self.key_rotation
        out["key_rotations"] = r.rotations if r is not None else 0
        out["key_rotations_skipped"] = r.skipped if r is not None else 0
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


class _Stop(Exception):
    pass


def _first_error(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")
