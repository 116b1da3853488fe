"""What a config reload changes: the running config and the one just read -> the work to apply.

Theory of operation
-------------------
A reload (file change or SIGHUP) reads and validates the gateway file with every service file
first (config/schema.load_config); only a config without problems gets here. `reconcile` then
says what differs, service by service, and the runtime does exactly that and nothing else:

    imports   added    -> bind its listener (before anything else is applied: a port in use
                          refuses the whole reload), then accept
              removed  -> stop accepting; open connections drain for reload.drain_timeout,
                          then are ended
              moved    -> (listen address or protocol changed) removed + added
              changed  -> (failover policy, HTTP routes, access log) the router takes the new
                          policy, the HTTP listener the new routes: new connections and
                          requests follow them at once, open ones are not touched
    exports   added    -> router, health checks, published at the federation
              removed  -> withdrawn at the federation; new streams for it are refused
              changed  -> endpoints, port, health check or allowed consumers replaced; health
                          checks restarted only for endpoints whose check changed
    policy, services_dir, reload.drain_timeout -> just the new values (they are checked at
                          load time, or read when used)

The rest of the gateway file (cluster, federation, listen, state_dir, identity, limits,
outlier_detection, peer_probe, dns, tunnel, xds, tracing, reload.watch / poll_interval /
debounce) is
what the running process is built on: a change there is *not* applied live. `restart_needed`
names those fields; the running values are kept (`effective`), the reload of the services
still applies, and the gateway says so (log, /status) until a restart (`isthmus gateway run
--takeover`).

Pure: values in, values out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.config.values import ExportConfig, GatewayConfig, ImportConfig

__all__ = ["ConfigChanges", "effective", "reconcile", "RESTART_FIELDS"]

# GatewayConfig fields the running process is built on (changed only by a restart).
RESTART_FIELDS = ("cluster", "federation", "listen", "state_dir", "identity", "limits",
                  "outlier_detection", "peer_probe", "dns", "tunnel", "xds", "tracing")
RELOAD_RESTART_FIELDS = ("watch", "poll_interval", "debounce")


def _key(x: ExportConfig | ImportConfig) -> tuple[str, str]:
    return (x.namespace, x.name)


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    imports_added: tuple[ImportConfig, ...] = ()
    imports_removed: tuple[ImportConfig, ...] = ()
    imports_changed: tuple[tuple[ImportConfig, ImportConfig], ...] = ()  # (old, new) failover
    exports_added: tuple[ExportConfig, ...] = ()
    exports_removed: tuple[ExportConfig, ...] = ()
    exports_changed: tuple[tuple[ExportConfig, ExportConfig], ...] = ()  # (old, new)
    restart_needed: tuple[str, ...] = ()  # gateway-file fields that differ (kept as running)
    other: bool = False  # policy / services_dir / drain time / file list changed (no action)
    # (route policies too: the HTTP listeners get the new ones from runtime's _sync_backends)

    @property
    def services(self) -> bool:
        """Anything to do to listeners, routers or the federation."""
        return bool(self.imports_added or self.imports_removed or self.imports_changed
                    or self.exports_added or self.exports_removed or self.exports_changed)

    @property
    def empty(self) -> bool:
        return not self.services and not self.other and not self.restart_needed

    def summary(self) -> str:
        """One line: `imports +ns/a -ns/b ~ns/c; exports +ns/d` (or `no service changed`)."""
        def names(sign: str, items: tuple) -> list[str]:
            return [f"{sign}{x.namespace}/{x.name}" for x in items]

        parts = []
        imports = (names("+", self.imports_added) + names("-", self.imports_removed)
                   + names("~", tuple(new for _, new in self.imports_changed)))
        exports = (names("+", self.exports_added) + names("-", self.exports_removed)
                   + names("~", tuple(new for _, new in self.exports_changed)))
        if imports:
            parts.append("imports " + " ".join(imports))
        if exports:
            parts.append("exports " + " ".join(exports))
        return "; ".join(parts) or "no service changed"


def reconcile(running: GatewayConfig, wanted: GatewayConfig) -> ConfigChanges:
    """What turns `running` into `wanted` (both validated configs of the same gateway file)."""
    old_im = {_key(i): i for i in running.imports}
    new_im = {_key(i): i for i in wanted.imports}
    added: list[ImportConfig] = []
    removed: list[ImportConfig] = []
    changed: list[tuple[ImportConfig, ImportConfig]] = []
    for k, new in new_im.items():
        old = old_im.get(k)
        if old is None:
            added.append(new)
        elif old.listen != new.listen or old.protocol != new.protocol:
            removed.append(old)
            added.append(new)
        elif old != new:
            changed.append((old, new))
    removed += [old for k, old in old_im.items() if k not in new_im]

    old_ex = {_key(e): e for e in running.exports}
    new_ex = {_key(e): e for e in wanted.exports}
    ex_added = tuple(e for k, e in new_ex.items() if k not in old_ex)
    ex_removed = tuple(e for k, e in old_ex.items() if k not in new_ex)
    ex_changed = tuple((old_ex[k], e) for k, e in new_ex.items()
                       if k in old_ex and old_ex[k] != e)

    restart = [f for f in RESTART_FIELDS if getattr(running, f) != getattr(wanted, f)]
    restart += [f"reload.{f}" for f in RELOAD_RESTART_FIELDS
                if getattr(running.reload, f) != getattr(wanted.reload, f)]
    other = (running.policy != wanted.policy or running.policies != wanted.policies
             or running.services_dir != wanted.services_dir
             or running.service_files != wanted.service_files
             or running.reload.drain_timeout != wanted.reload.drain_timeout)
    return ConfigChanges(tuple(added), tuple(removed), tuple(changed), ex_added, ex_removed,
                         ex_changed, tuple(restart), other)


def effective(running: GatewayConfig, wanted: GatewayConfig) -> GatewayConfig:
    """The config to run after the reload: `wanted`, except the fields only a restart changes,
    which keep their running values."""
    kept = {f: getattr(running, f) for f in RESTART_FIELDS}
    reload = replace(running.reload, drain_timeout=wanted.reload.drain_timeout)
    return replace(wanted, reload=reload, **kept)


def moved_listeners(changes: ConfigChanges) -> set[tuple[str, int]]:
    """Addresses a removed import frees and an added one takes (a rename at the same address):
    the old listener must stop accepting before the new one binds there."""
    freed = {i.listen for i in changes.imports_removed}
    return {i.listen for i in changes.imports_added if i.listen in freed}
