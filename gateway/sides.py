"""The gateway's side services, beside the data path: the clusterset DNS responder, the xDS
server and the WireGuard tunnel (each only with its config section, in the primary process).

`SideServices` is a part of `Gateway` (runtime.py): it reads the gateway's config, catalog and
routers, and is told of changes by the gateway (`_refresh_dns` and `_xds_changed` on every
catalog, health or reload change; `_tunnel_wanted` for the tunnel's peers). Each service's
logic lives in its package (gateway/dns, gateway/xds, gateway/tunnel) and its pure part in
answers.py, resources.py and core/priorities.py, core/tunnel_peers.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from federation.model import ServiceKey, Tunnel
from federation.units import format_hostport, parse_hostport
from gateway.config.reader import _is_wildcard
from gateway.control.claim import BindError
from gateway.core.priorities import priorities
from gateway.core.tunnel_peers import wanted_peers
from gateway.dns.answers import DnsSettings, build
from gateway.dns.responder import DnsResponder
from gateway.errors import GatewayError
from gateway.tunnel.device import WireguardDevice
from gateway.tunnel.keys import load_or_create
from gateway.tunnel.rotation import KeyRotation
from gateway.tunnel.uapi import TunnelError
from gateway.xds.resources import Snapshot, XdsService
from gateway.xds.resources import snapshot as xds_snapshot
from gateway.xds.server import Pusher, XdsServer

log = logging.getLogger("isthmus.gateway")


class SideServices:
    """DNS, xDS and the tunnel of a Gateway (a mixin: the attributes are the Gateway's)."""

    cfg: Any
    catalog: Any
    locality: Any
    primary: bool
    restart: Any
    agent: Any
    import_routers: dict
    _tg: Any

    def _xds_changed(self) -> None:
        if self.xds_pusher is not None:
            self.xds_pusher.mark()

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
        host = xd.listen[0] if xd is not None and not _is_wildcard(xd.listen[0]) else "127.0.0.1"
        services = []
        for im in self.cfg.imports:
            svc = ServiceKey(im.namespace, im.name)
            router = self.import_routers.get(svc)
            if router is None:
                continue
            router.tick()
            listen = (host if _is_wildcard(im.listen[0]) else im.listen[0], im.listen[1])
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

    def _tunnel_status(self) -> dict[str, Any] | None:
        if self.tunnel is None:
            return None
        out = self.tunnel.describe(self.wall())
        r = self.key_rotation
        out["key_rotations"] = r.rotations if r is not None else 0
        out["key_rotations_skipped"] = r.skipped if r is not None else 0
        return out
