"""Live reload of the gateway's config: read and validate every file, ask the core what changed
(gateway/core/reconcile.py), apply exactly that (README "Live reload").

`LiveReload` is a part of `Gateway` (runtime.py): it changes the gateway's routers, listeners,
health checks and config in place and tells the agent to publish; everything it touches is the
Gateway's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from federation.model import ServiceKey
from federation.units import format_hostport
from gateway.config.schema import ConfigError, GatewayConfig, load_config
from gateway.config.values import ImportConfig
from gateway.control.claim import BindError
from gateway.core.reconcile import ConfigChanges, effective, moved_listeners, reconcile
from gateway.core.takeover import Wanted
from gateway.dataplane.http.enforce import policy_book
from gateway.dataplane.l4 import ImportListener
from gateway.dataplane.router import local_key

log = logging.getLogger("isthmus.gateway")


class LiveReload:
    """Reloads of a Gateway (a mixin: the attributes are the Gateway's)."""

    cfg: Any
    agent: Any
    restart: Any
    reloads: Any
    supervisor: Any
    workers: int
    worker: int
    import_routers: dict
    import_listeners: dict
    listeners: list
    book: Any
    _tg: Any
    _reload_lock: asyncio.Lock
    _reload_pending: str | None
    _retiring: set

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
            try:  # JWKS files and OpenAPI specs: read now, so a bad one changes nothing
                book = await asyncio.to_thread(policy_book, cfg, self.policy_book)
            except ConfigError as e:
                self.reloads.refused(trigger, [str(p) for p in e.problems])
                return "refused"
            try:
                fresh = self._bind_added(changes, cfg)
            except BindError as e:
                self.reloads.refused(trigger, [str(e)])
                return "refused"
            self.policy_book = book
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
        self._sync_backends()  # route backends, and every HTTP listener's new routes
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

