"""Drills as values: `Drill`, the record of a planned, bounded, reversible fault
(`catalog/drills/<id>`, written by the federation only), and `DrillMode`, how it faults its
scope. The pure decisions about drills are federation/drills.py's; the catalog that holds them
is federation/model.py's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from federation.errors import InputError
from federation.fields import check_name, choices, get_field

DRILLS = "catalog/drills/"
DRILL_STATES = ("running", "ended", "aborted")


class DrillMode(StrEnum):
    """How a drill faults its scope: withdraw its exports, drop its inbound streams, or slow
    and refuse some of them."""

    DRAIN = "drain"
    BLACKHOLE = "blackhole"
    DEGRADE = "degrade"


DRILL_ID_PATTERN = "d-[0-9]{8}-[0-9]{6}-[a-z0-9]{4}"
_DRILL_ID = re.compile(DRILL_ID_PATTERN)


def is_drill_id(value: Any) -> bool:
    """d-YYYYMMDD-HHMMSS-xxxx, ASCII, matched whole."""
    return isinstance(value, str) and _DRILL_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Drill:
    """A planned, bounded, reversible fault of a region or a cluster. Times are wall-clock
    seconds (epoch). Probes run from `created_at` (a baseline before the fault) until `settle`
    seconds after the fault ended; the fault itself lasts from `fault_start` to `fault_end`
    unless the drill ends earlier (aborted)."""

    id: str
    scope_kind: str  # "region" | "cluster"
    scope: str
    mode: DrillMode
    created_at: float
    fault_start: float
    fault_end: float  # the deadline: every gateway restores by itself at this time
    clusters_in_scope: tuple[str, ...]
    regions: Mapping[str, str]  # cluster -> region, as the catalog had it at creation
    services: tuple[str, ...]  # "ns/name" of the exports in scope (the services affected)
    latency: float = 0.0  # degrade: added latency per stream, seconds
    error_rate: float = 0.0  # degrade: fraction of streams refused
    probe_rate: float = 20.0  # synthetic probes per second per service per observing cluster
    settle: float = 5.0
    abort_on: str | None = None  # e.g. "success<99%:5s"
    state: str = "running"  # running | ended | aborted
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def key(self) -> str:
        return f"{DRILLS}{self.id}"

    def in_scope(self, cluster: str) -> bool:
        return cluster in self.clusters_in_scope

    def fault_active(self, now: float) -> bool:
        return self.state == "running" and self.fault_start <= now < self.fault_end

    @property
    def fault_stop(self) -> float:
        """When the fault stopped (or will stop): the deadline, or the end if it came first."""
        return min(self.fault_end, self.ended_at) if self.ended_at is not None else self.fault_end

    def observing(self, now: float) -> bool:
        return self.created_at <= now < self.fault_stop + self.settle

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": {self.scope_kind: self.scope},
            "mode": self.mode,
            "created_at": self.created_at,
            "fault_start": self.fault_start,
            "fault_end": self.fault_end,
            "clusters_in_scope": list(self.clusters_in_scope),
            "regions": dict(self.regions),
            "services": list(self.services),
            "latency": self.latency,
            "error_rate": self.error_rate,
            "probe_rate": self.probe_rate,
            "settle": self.settle,
            "abort_on": self.abort_on,
            "state": self.state,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "drill") -> Drill:
        did = get_field(obj, "id", what, str)
        if not is_drill_id(did):
            raise InputError(f"{what}.id: {did!r} is not a drill id (d-YYYYMMDD-HHMMSS-xxxx)")
        scope = get_field(obj, "scope", what, dict)
        if len(scope) != 1 or next(iter(scope)) not in ("region", "cluster"):
            raise InputError(
                f"{what}.scope: expected {{'region': R}} or {{'cluster': C}}, got {scope!r}"
            )
        kind, value = next(iter(scope.items()))
        check_name(value, f"{what}.scope.{kind}")
        mode = get_field(obj, "mode", what, str)
        if mode not in tuple(DrillMode):
            raise InputError(f"{what}.mode: {mode!r} is not one of {choices(DrillMode)}")
        state = get_field(obj, "state", what, str)
        if state not in DRILL_STATES:
            raise InputError(f"{what}.state: {state!r} is not one of {', '.join(DRILL_STATES)}")
        num = (int, float)
        times = [
            float(get_field(obj, k, what, num)) for k in ("created_at", "fault_start", "fault_end")
        ]
        if not times[0] <= times[1] <= times[2]:
            raise InputError(f"{what}: expected created_at <= fault_start <= fault_end")
        clusters = get_field(obj, "clusters_in_scope", what, list)
        regions = get_field(obj, "regions", what, dict)
        services = get_field(obj, "services", what, list)
        if len(clusters) > 1000 or len(regions) > 1000 or len(services) > 10000:
            raise InputError(f"{what}: too many clusters, regions or services")
        latency = float(get_field(obj, "latency", what, num))
        error_rate = float(get_field(obj, "error_rate", what, num))
        probe_rate = float(get_field(obj, "probe_rate", what, num))
        settle = float(get_field(obj, "settle", what, num))
        if not (
            0 <= latency <= 60 and 0 <= error_rate <= 1 and 0 < probe_rate <= 1000
            and 0 <= settle <= 600
        ):
            raise InputError(
                f"{what}: latency 0..60 s, error_rate 0..1, probe_rate 0..1000/s, settle 0..600 s"
            )
        abort_on = obj.get("abort_on")
        if abort_on is not None and (not isinstance(abort_on, str) or len(abort_on) > 200):
            raise InputError(f"{what}.abort_on: expected a short string like 'success<99%:5s'")
        ended_at = obj.get("ended_at")
        if ended_at is not None and (isinstance(ended_at, bool) or not isinstance(ended_at, num)):
            raise InputError(f"{what}.ended_at: expected a number or null")
        reason = obj.get("end_reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
            raise InputError(f"{what}.end_reason: expected a short string or null")
        return cls(
            id=did,
            scope_kind=kind,
            scope=value,
            mode=DrillMode(mode),
            created_at=times[0],
            fault_start=times[1],
            fault_end=times[2],
            clusters_in_scope=tuple(check_name(c, f"{what}.clusters_in_scope") for c in clusters),
            regions={
                check_name(k, f"{what}.regions"): check_name(v, f"{what}.regions.{k}")
                for k, v in regions.items()
            },
            services=tuple(str(x) for x in services),
            latency=latency,
            error_rate=error_rate,
            probe_rate=probe_rate,
            settle=settle,
            abort_on=abort_on,
            state=state,
            ended_at=None if ended_at is None else float(ended_at),
            end_reason=reason,
        )
