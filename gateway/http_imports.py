"""HTTP imports in the gateway: their listeners and the routers of their routes' backends.

`HttpImports` is a part of `Gateway` (runtime.py), as reloading.py and sides.py are. An import
with `protocol: http` gets an `HttpImportListener` (dataplane/http/listener.py) instead of the
TCP one. Its routes may send to other services than the import's own (backendRefs: a canary
`checkout-v2` beside `checkout`): each such backend gets a Router like an import's — in
`import_routers`, so the catalog, health ticks and peer probes reach it as they reach every
import — with the failover policy of the first import that routes to it. They are synced at
start and after every reload (`_sync_backends`); each HTTP listener holds a plain dict of the
routers it may use (`_routers_of`), replaced whole with its routes on a reload.

Policies (dataplane/http/enforce.py): `policy_book` is built from the config by `policy_book`
(its JWKS files and OpenAPI specs read then: a bad one refuses the config, at start and on a
reload alike); each HTTP listener gets its table of it with its routes. Every JWT verifier's
key refresh loop is a task of the gateway's TaskGroup (`_sync_policy_tasks`): started for a
new verifier, cancelled when a reload drops it.
"""

from __future__ import annotations

from typing import Any

from federation.model import ServiceKey
from gateway.config.values import GatewayConfig, ImportConfig
from gateway.core.routes import compile_routes
from gateway.dataplane.http.enforce import PolicyBook, policy_book
from gateway.dataplane.http.host import HttpLimits
from gateway.dataplane.http.listener import HttpImportListener


def http_limits(lim: Any) -> HttpLimits:
    """The gateway file's limits.http_* as the HTTP listeners take them."""
    return HttpLimits(lim.http_max_header_bytes, lim.http_max_headers,
                      lim.http_max_target_bytes, lim.http_header_timeout)


class HttpImports:
    """The HTTP side of a Gateway's imports (a mixin: the attributes are the Gateway's)."""

    cfg: GatewayConfig
    import_routers: dict
    import_listeners: dict
    dialer: Any
    rng: Any
    _backend_only: set
    _tg: Any
    policy_book: PolicyBook | None = None
    _policy_tasks: dict | None = None

    def _backends_wanted(self) -> dict[ServiceKey, ImportConfig]:
        """Route backends that are not imports themselves -> the import whose policy they take."""
        own = {ServiceKey(im.namespace, im.name) for im in self.cfg.imports}
        out: dict[ServiceKey, ImportConfig] = {}
        for im in self.cfg.imports:
            for route in im.routes:
                for rule in route.rules:
                    for b in rule.backends:
                        if b.service not in own:
                            out.setdefault(b.service, im)
        return out

    def _sync_backends(self) -> None:
        """Routers for every route backend wanted now; those no route uses any more go."""
        wanted = self._backends_wanted()
        for svc in list(self._backend_only):
            if svc not in wanted:
                self._backend_only.discard(svc)
                self.import_routers.pop(svc, None)
        for svc, im in wanted.items():
            router = self.import_routers.get(svc)
            if router is None:
                router = self._add_import_router(im, svc)  # type: ignore[attr-defined]
                router.set_remote(self._remote_of(svc))  # type: ignore[attr-defined]
                self._backend_only.add(svc)
            elif svc in self._backend_only:
                router.set_policy(im.failover)
        book = self._policies()
        for svc, lst in self.import_listeners.items():
            if isinstance(lst, HttpImportListener):
                im = next(i for i in self.cfg.imports if ServiceKey(i.namespace, i.name) == svc)
                lst.set_routes(compile_routes(im.routes), im.access_log, self._routers_of(im))
                lst.set_policies(book.table(im))
        self._sync_policy_tasks()

    def _policies(self) -> PolicyBook:
        book = self.policy_book
        if book is None or book.policies != self.cfg.policies:
            book = self.policy_book = policy_book(self.cfg, book)
        return book

    def _sync_policy_tasks(self) -> None:
        """A key refresh loop per JWT verifier of the current book, owned by the TaskGroup."""
        if self._tg is None or self.policy_book is None:
            return  # before the TaskGroup runs: run() calls this again
        tasks = self._policy_tasks = self._policy_tasks or {}
        wanted = {id(v): v for v in self.policy_book.verifiers.values()}
        for key in [k for k in tasks if k not in wanted]:
            tasks.pop(key).cancel()
        for key, v in wanted.items():
            if key not in tasks:
                tasks[key] = self._tg.create_task(v.refresh_loop())

    def policy_status(self, im: ImportConfig) -> list[dict[str, Any]] | None:
        """/status: the effective policy of each route of an HTTP import."""
        if im.protocol != "http":
            return None
        return self._policies().describe(im)

    def _routers_of(self, im: ImportConfig) -> dict[ServiceKey, Any]:
        svc = ServiceKey(im.namespace, im.name)
        wanted = {svc} | {b.service for r in im.routes for u in r.rules for b in u.backends}
        return {s: self.import_routers[s] for s in wanted if s in self.import_routers}

    def _http_listener(self, im: ImportConfig) -> HttpImportListener:
        lim = self.cfg.limits
        lst = HttpImportListener(
            ServiceKey(im.namespace, im.name), compile_routes(im.routes), self._routers_of(im),
            self.dialer, max_connections=lim.max_connections, idle_timeout=lim.idle_timeout,
            limits=http_limits(lim), access_log=im.access_log, rng=self.rng)
        lst.set_policies(self._policies().table(im))
        return lst
