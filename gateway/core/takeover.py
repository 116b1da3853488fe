"""Pure decisions of a zero-downtime restart (`isthmus gateway run --takeover`); the I/O is in
gateway/handoff.py.

- `wanted_listeners`: every listening address a gateway needs, with the config field that asks
  for it and how many sockets it takes: one per worker for the SO_REUSEPORT listeners (inbound
  and imports; each worker accepts on its own socket, so each socket keeps its own accept
  queue across a restart), one for the admin port (served by the primary only).
- `plan_sockets`: given what the old process offers (address -> whether its sockets are shared
  by workers, SO_REUSEPORT), which sockets the new one adopts, which addresses it binds itself
  (added to the config) and which it drops (removed from the config: the old process closes
  them when it stops accepting). Sockets are matched by address, not by field, so reordering or
  renaming imports keeps their sockets.
- `missing`: whether the new process is ready to take the traffic, or what it still waits for.
  Ready means: the catalog came from the federation (or the federation did not answer within
  CATALOG_WAIT, and the cached catalog, which the old process kept up to date, stands in);
  every local endpoint and every remote gateway it may route to has a health verdict (healthy
  or unhealthy, not "never probed"); every worker says the same of itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from federation.units import format_hostport
from gateway.config.schema import GatewayConfig

CATALOG_WAIT = 2.0  # seconds a new process waits for the federation's catalog before the cache


@dataclass(frozen=True, slots=True)
class Wanted:
    """One listening address: the config field asking for it and its number of sockets."""

    field: str
    host: str
    port: int
    count: int

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)


def wanted_listeners(cfg: GatewayConfig, workers: int) -> tuple[Wanted, ...]:
    out = [Wanted("listen.inbound", *cfg.listen.inbound, workers),
           Wanted("listen.admin", *cfg.listen.admin, 1)]
    out += [Wanted(f"imports[{i}].listen", *im.listen, workers) for i, im in enumerate(cfg.imports)]
    return tuple(out)


class PlanError(ValueError):
    """The old process's sockets cannot serve the new config as they are (says why)."""


@dataclass(frozen=True, slots=True)
class SocketPlan:
    adopt: tuple[Wanted, ...]  # sockets handed over by the old process
    bind: tuple[Wanted, ...]  # addresses new in the config: bound here
    drop: tuple[str, ...]  # offered but no longer configured: closed here


def plan_sockets(wanted: tuple[Wanted, ...], offered: Mapping[str, bool]) -> SocketPlan:
    adopt: list[Wanted] = []
    bind: list[Wanted] = []
    for w in wanted:
        shared = offered.get(w.address)
        if shared is None:
            bind.append(w)
        elif shared != (w.count > 1):
            had, needs = ("", " not") if shared else (" not", "")
            raise PlanError(f"{w.field}: {w.address} is{had} shared by workers in the running "
                            f"gateway and must{needs} be here (it moved between the admin port "
                            "and a listener the workers share): stop and start to move it")
        else:
            adopt.append(w)
    names = {w.address for w in wanted}
    drop = tuple(sorted(a for a in offered if a not in names))
    return SocketPlan(tuple(adopt), tuple(bind), drop)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a process taking over knows so far."""

    waited: float  # seconds since it started preparing
    catalog: str  # "federation" | "cache" | "none": where its catalog came from
    unknown_endpoints: tuple[str, ...] = ()  # local endpoints never probed to a verdict yet
    unknown_peers: tuple[str, ...] = ()  # remote gateways never probed to a verdict yet
    workers_waiting: tuple[int, ...] = ()  # worker indexes not ready yet


def _some(items: tuple, limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def missing(p: Progress, catalog_wait: float = CATALOG_WAIT) -> str | None:
    """None when ready to take the traffic; else what is still missing, for people."""
    if p.catalog not in ("federation", "cache", "none"):
        raise ValueError(f"catalog source {p.catalog!r}")
    if p.catalog != "federation" and p.waited < catalog_wait:
        return "the catalog (no snapshot from the federation yet)"
    out = []
    if p.unknown_endpoints:
        out.append(f"health of local endpoint(s) {_some(p.unknown_endpoints)}")
    if p.unknown_peers:
        out.append(f"a probe verdict on remote gateway(s) {_some(p.unknown_peers)}")
    if p.workers_waiting:
        out.append(f"worker(s) {_some(p.workers_waiting)}")
    return "; ".join(out) or None
