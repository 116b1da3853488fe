"""Drill state machine, abort-on SLOs and sample validation (pure; the report: drill_report.py).

Theory of operation
-------------------
A drill is one `Drill` record (model.py) at `catalog/drills/<id>`, written by the federation
only, and a set of per-second probe samples at `drills/<id>/samples/<cluster>/<second>`. This
module decides everything about them; the server only reads the store, calls these functions
with its clock and randomness, and writes what they return.

Lifecycle (`state`)::

    new_drill ──▶ running ──(now >= fault_end: end(.., "ended", "deadline"))──▶ ended
                     │
                     └──(operator, CLI, or abort_on tripped: end(.., "aborted", why))──▶ aborted

`ended` and `aborted` are final; `end` on a final drill raises `DrillStateError` (the server
answers 409). A drill is never deleted. Times (wall-clock epoch seconds):

- `created_at` = the creation time: observers start probing (the baseline);
- `fault_start` = `created_at + baseline`, rounded UP to the next whole second, so the fault
  begins exactly at a sample-second boundary and every per-second row is wholly baseline or
  wholly fault (the rounding adds less than 1 s to the baseline);
- `fault_end` = `fault_start + duration`: the deadline (gateways restore by themselves);
- `fault_stop` = min(fault_end, ended_at); observers keep probing until `fault_stop + settle`.

A new drill overlaps (409) with any drill that is `running` or still observing at `now`
(`overlapping`), so two drills never share probes or faults.

Samples: one JSON object per observing cluster per whole epoch second (see docs/drills.md);
`validate_sample` bounds and normalizes it (≤ 1000 services, ≤ 1000 serving clusters, counts
0..1e6, successes and failures ≤ attempts, served total ≤ successes, services must be the
drill's), naming the bad field. The server accepts seconds in `sample_window(drill)` only.

abort_on: `<metric><op><number>[%]:<duration>` (`parse_slo`). `success` is the success ratio
(successes / attempts over every observing cluster and service, per second; `99%` or `0.99`);
`p99` is the worst per-second p99 latency in ms (no `%`). The window is whole seconds (≥ 1 s).
`slo_tripped` takes the seconds of the fault window (`fault_start <= second < fault_stop`, and
not after `now`) that have samples with a defined metric (attempts > 0, resp. some p99), and
trips when the condition holds for each of the last `window` of them; the reason reads
`aborted: SLO success<99% for 5s tripped`.

The report (`compute_report`) is computed in `drill_report.py`.

Inputs from the wire raise `InputError` quoting the bad value. This module imports no asyncio,
socket, time or random: the clock (`now`) and randomness (`rand4`) are parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from federation.drill_model import DRILL_STATES, Drill, DrillMode
from federation.errors import InputError, IsthmusError
from federation.fields import check_name
from federation.model import Catalog
from federation.units import DECIMAL, format_duration, parse_duration

__all__ = [
    "DrillStateError",
    "Slo",
    "new_drill",
    "overlapping",
    "end",
    "due",
    "parse_slo",
    "slo_tripped",
    "validate_sample",
    "sample_window",
    "SHIFT_SUCCESS",
]

MIN_DURATION = 1.0
MAX_DURATION = 3600.0
DEFAULT_BASELINE = 2.0
MAX_BASELINE = 60.0
DEFAULT_SETTLE = 5.0
MAX_SETTLE = 600.0
MAX_LATENCY = 60.0
DEFAULT_PROBE_RATE = 20.0
MAX_PROBE_RATE = 1000.0
MAX_SAMPLE_SERVICES = 1000
MAX_SAMPLE_SERVED = 1000
MAX_COUNT = 1_000_000
MAX_LATENCY_MS = 3_600_000.0
SHIFT_SUCCESS = 0.99
FAILBACK_FRACTION = 0.9
MAX_REASON = 200

REQUEST_FIELDS = (
    "scope", "mode", "duration", "latency", "error_rate", "probe_rate", "baseline", "settle",
    "abort_on",
)
_RAND4 = re.compile(r"^[a-z0-9]{4}$")


class DrillStateError(IsthmusError):
    """A transition that the drill's state does not allow (e.g. aborting an ended drill)."""


# ---- creation ------------------------------------------------------------------------------


def _number(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{what}: {value!r} is not a number")
    if not lo <= value <= hi:
        raise InputError(f"{what}: {value!r} is not in {lo:g}..{hi:g}")
    return float(value)


def _duration(value: Any, what: str, lo: float, hi: float) -> float:
    try:
        seconds = parse_duration(value)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    if not lo <= seconds <= hi:
        raise InputError(f"{what}: {value!r} is not in {_span(lo)}..{_span(hi)}")
    return seconds


def _span(seconds: float) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return format_duration(seconds) if seconds else "0s"


def new_drill(request: Any, catalog: Catalog, now: float, rand4: str) -> Drill:
    """A running Drill from a `POST /v1/drills` body, fixed against `catalog` at `now`.

    `rand4` is 4 random [a-z0-9] (the id suffix). Raises InputError naming the field and quoting
    the bad value; an unknown region/cluster lists the known ones."""
    if not isinstance(request, Mapping):
        raise InputError(f"drill request: expected a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise InputError(
            f"drill request: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(REQUEST_FIELDS)}"
        )
    if not isinstance(rand4, str) or not _RAND4.match(rand4):
        raise InputError(f"rand4: {rand4!r} is not 4 characters of [a-z0-9]")

    scope = request.get("scope")
    if (not isinstance(scope, Mapping) or len(scope) != 1
            or next(iter(scope)) not in ("region", "cluster")):
        raise InputError(f'scope: {scope!r}: expected {{"region": R}} or {{"cluster": C}}')
    kind, name = next(iter(scope.items()))
    check_name(name, f"scope.{kind}")
    clusters, known = _scope_clusters(catalog, kind, name)
    if not clusters:
        raise InputError(
            f"scope.{kind}: unknown {kind} {name!r}; known {kind}s: {', '.join(known) or '(none)'}"
        )

    mode = request.get("mode")
    if mode not in tuple(DrillMode):
        raise InputError(f"mode: {mode!r} is not one of {', '.join(DrillMode)}")
    if "duration" not in request:
        raise InputError("duration: missing (e.g. \"30s\"; 1s..1h)")
    duration = _duration(request["duration"], "duration", MIN_DURATION, MAX_DURATION)

    latency = 0.0
    if request.get("latency") is not None:
        latency = _duration(request["latency"], "latency", 0.0, MAX_LATENCY)
    error_rate = 0.0
    if request.get("error_rate") is not None:
        error_rate = _number(request["error_rate"], "error_rate", 0.0, 1.0)
    if mode == DrillMode.DEGRADE and latency == 0 and error_rate == 0:
        raise InputError("degrade: set latency (e.g. \"200ms\") or error_rate (e.g. 0.3), or both")
    if mode != DrillMode.DEGRADE and (latency or error_rate):
        raise InputError(f"latency and error_rate apply to mode 'degrade' only, not {mode!r}")
    probe_rate = DEFAULT_PROBE_RATE
    if request.get("probe_rate") is not None:
        probe_rate = _number(request["probe_rate"], "probe_rate", 0.0, MAX_PROBE_RATE)
        if probe_rate <= 0:
            raise InputError(f"probe_rate: {request['probe_rate']!r} must be > 0")
    baseline = DEFAULT_BASELINE
    if request.get("baseline") is not None:
        baseline = _duration(request["baseline"], "baseline", 0.0, MAX_BASELINE)
    settle = DEFAULT_SETTLE
    if request.get("settle") is not None:
        settle = _duration(request["settle"], "settle", 0.0, MAX_SETTLE)
    abort_on = request.get("abort_on")
    if abort_on is not None:
        if not isinstance(abort_on, str):
            raise InputError(f"abort_on: {abort_on!r} is not a string like 'success<99%:5s'")
        abort_on = abort_on.strip()
        parse_slo(abort_on)

    if not math.isfinite(now) or now <= 0:
        raise InputError(f"now: {now!r} is not a wall-clock time")
    fault_start = float(math.ceil(now + baseline))
    in_scope = set(clusters)
    services = sorted({
        f"{e.namespace}/{e.name}"
        for e in catalog.exports.values()
        if e.cluster in in_scope and e.cluster in catalog.live
    })
    stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%d-%H%M%S")
    return Drill(
        id=f"d-{stamp}-{rand4}",
        scope_kind=kind,
        scope=name,
        mode=DrillMode(mode),
        created_at=float(now),
        fault_start=fault_start,
        fault_end=fault_start + duration,
        clusters_in_scope=tuple(clusters),
        regions={n: c.region for n, c in sorted(catalog.clusters.items())},
        services=tuple(services),
        latency=latency,
        error_rate=error_rate,
        probe_rate=probe_rate,
        settle=settle,
        abort_on=abort_on,
    )


def _scope_clusters(catalog: Catalog, kind: str, name: str) -> tuple[list[str], list[str]]:
    """(clusters in scope, known names of that kind)."""
    if kind == "region":
        known = sorted({c.region for c in catalog.clusters.values()})
        return sorted(n for n, c in catalog.clusters.items() if c.region == name), known
    known = sorted(catalog.clusters)
    return ([name] if name in catalog.clusters else []), known


def overlapping(catalog_or_drills: Catalog | Iterable[Drill], now: float) -> Drill | None:
    """The newest drill that is running, or still observing at `now`; None if there is none."""
    drills = (
        catalog_or_drills.drills.values()
        if isinstance(catalog_or_drills, Catalog)
        else catalog_or_drills
    )
    busy = [d for d in drills if d.state == "running" or d.observing(now)]
    return max(busy, key=lambda d: (d.created_at, d.id)) if busy else None


def end(drill: Drill, now: float, state: str, reason: str) -> Drill:
    """The drill ended at `now` (`state` "ended" or "aborted"). DrillStateError if not running."""
    if state not in DRILL_STATES or state == "running":
        raise InputError(f"state: {state!r} is not 'ended' or 'aborted'")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise InputError(f"reason: {reason!r}: expected a short non-empty text (≤ {MAX_REASON})")
    if drill.state != "running":
        raise DrillStateError(
            f"drill {drill.id} is already {drill.state} ({drill.end_reason or 'no reason'})"
        )
    return replace(drill, state=state, ended_at=float(now), end_reason=reason.strip())


def due(drill: Drill, now: float) -> bool:
    """True when a running drill is at or past its deadline (the federation ends it)."""
    return drill.state == "running" and now >= drill.fault_end


# ---- abort_on ------------------------------------------------------------------------------

_SLO = re.compile(rf"(success|p99)\s*(<|>)\s*({DECIMAL})\s*(%?)\s*:\s*(\S+)", re.ASCII)


@dataclass(frozen=True, slots=True)
class Slo:
    metric: str  # "success" (ratio 0..1) | "p99" (ms)
    op: str  # "<" | ">"
    threshold: float  # success: a ratio 0..1; p99: milliseconds
    window: int  # whole seconds
    text: str  # e.g. "success<99% for 5s" (used in the abort reason)

    def holds(self, value: float) -> bool:
        return value < self.threshold if self.op == "<" else value > self.threshold


def parse_slo(text: Any) -> Slo:
    """`success<99%:5s`, `success<0.95:10s`, `p99>500:3s` -> Slo. InputError quotes the text."""
    if not isinstance(text, str) or len(text) > 200:
        raise InputError(f"abort_on: {text!r} is not a short string like 'success<99%:5s'")
    m = _SLO.fullmatch(text.strip())
    if not m:
        raise InputError(
            f"abort_on: {text!r} is not <metric><op><number>[%]:<duration> with metric "
            "success or p99 and op < or >, e.g. 'success<99%:5s' or 'p99>500:3s'"
        )
    metric, op, num, pct, dur = m.groups()
    value = float(num)
    if metric == "success":
        if pct:
            if value > 100:
                raise InputError(f"abort_on: {text!r}: {num}% is more than 100%")
            threshold = value / 100
        else:
            if value > 1:
                raise InputError(
                    f"abort_on: {text!r}: a success ratio without % must be 0..1 (or write {num}%)"
                )
            threshold = value
    else:
        if pct:
            raise InputError(f"abort_on: {text!r}: p99 is in milliseconds, not a percentage")
        threshold = value
    try:
        seconds = parse_duration(dur)
    except InputError as e:
        raise InputError(f"abort_on: {text!r}: {e}") from None
    if seconds < 1 or seconds > MAX_DURATION or seconds != int(seconds):
        raise InputError(f"abort_on: {text!r}: the window {dur!r} must be whole seconds, 1s..1h")
    window = int(seconds)
    return Slo(metric, op, threshold, window, f"{metric}{op}{num}{pct} for {window}s")


def slo_tripped(
    slo: Slo, drill: Drill, samples: Iterable[Mapping[str, Any]], now: float
) -> str | None:
    """The abort reason when `slo` held for each of the last `slo.window` fault seconds that
    have samples (and a defined metric); None otherwise."""
    per_second: dict[int, list[Mapping[str, Any]]] = {}
    for s in samples:
        sec = s["second"]
        if drill.fault_start <= sec < drill.fault_stop and sec <= now:
            per_second.setdefault(sec, []).append(s)
    values: list[float] = []
    for sec in sorted(per_second):
        value = _slo_metric(slo.metric, per_second[sec])
        if value is not None:
            values.append(value)
    if len(values) < slo.window:
        return None
    if all(slo.holds(v) for v in values[-slo.window:]):
        return f"aborted: SLO {slo.text} tripped"
    return None


def _slo_metric(metric: str, samples: list[Mapping[str, Any]]) -> float | None:
    if metric == "success":
        attempts = successes = 0
        for s in samples:
            for svc in s["services"].values():
                attempts += svc["attempts"]
                successes += svc["successes"]
        return successes / attempts if attempts else None
    p99s = [
        svc["latency_p99_ms"]
        for s in samples
        for svc in s["services"].values()
        if svc.get("latency_p99_ms") is not None
    ]
    return max(p99s) if p99s else None


# ---- samples -------------------------------------------------------------------------------


def sample_window(drill: Drill) -> tuple[float, float]:
    """Seconds the federation accepts samples for: [created_at - 1, fault_stop + settle + 5]."""
    return drill.created_at - 1, drill.fault_stop + drill.settle + 5


def _count(obj: Mapping[str, Any], key: str, what: str) -> int:
    if key not in obj:
        raise InputError(f"{what}.{key}: missing")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise InputError(f"{what}.{key}: {v!r} is not an integer in 0..{MAX_COUNT}")
    return v


def _latency(obj: Mapping[str, Any], key: str, what: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InputError(f"{what}.{key}: {v!r} is not a number of milliseconds")
    if not 0 <= v <= MAX_LATENCY_MS:
        raise InputError(f"{what}.{key}: {v!r} is not in 0..{MAX_LATENCY_MS:g} ms")
    return float(v)


def validate_sample(obj: Any, drill: Drill, cluster: str, second: int) -> dict[str, Any]:
    """The normalized sample of `cluster` for epoch `second`; InputError naming the bad field."""
    w = "sample"
    if not isinstance(obj, Mapping):
        raise InputError(f"{w}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"cluster", "second", "services"})
    if unknown:
        raise InputError(f"{w}: unknown field(s) {', '.join(map(repr, unknown))}")
    if obj.get("cluster") != cluster:
        raise InputError(
            f"{w}.cluster: {obj.get('cluster')!r} does not match the path's {cluster!r}"
        )
    sec = obj.get("second")
    if isinstance(sec, bool) or not isinstance(sec, int) or sec != second:
        raise InputError(f"{w}.second: {sec!r} does not match the path's {second!r}")
    services = obj.get("services")
    if not isinstance(services, Mapping):
        raise InputError(f"{w}.services: {services!r} is not an object of 'ns/name' -> counts")
    if len(services) > MAX_SAMPLE_SERVICES:
        raise InputError(f"{w}.services: {len(services)} services, at most {MAX_SAMPLE_SERVICES}")
    allowed = set(drill.services)
    out: dict[str, Any] = {}
    for key in sorted(services):
        sw = f"{w}.services[{key!r}]"
        if not isinstance(key, str) or key not in allowed:
            raise InputError(
                f"{w}.services: {key!r} is not a service of drill {drill.id} "
                f"({', '.join(drill.services) or 'none'})"
            )
        svc = services[key]
        if not isinstance(svc, Mapping):
            raise InputError(f"{sw}: expected an object")
        attempts = _count(svc, "attempts", sw)
        successes = _count(svc, "successes", sw)
        failures = _count(svc, "failures", sw)
        if successes > attempts or failures > attempts:
            raise InputError(
                f"{sw}: successes ({successes}) and failures ({failures}) may not exceed "
                f"attempts ({attempts})"
            )
        served = svc.get("served", {})
        if not isinstance(served, Mapping) or len(served) > MAX_SAMPLE_SERVED:
            raise InputError(
                f"{sw}.served: expected an object of at most {MAX_SAMPLE_SERVED} clusters"
            )
        served_out: dict[str, int] = {}
        for c in sorted(served):
            check_name(c, f"{sw}.served")
            served_out[c] = _count(served, c, f"{sw}.served")
        if sum(served_out.values()) > successes:
            raise InputError(
                f"{sw}.served: {sum(served_out.values())} served is more than "
                f"{successes} successes"
            )
        out[key] = {
            "attempts": attempts,
            "successes": successes,
            "failures": failures,
            "latency_p50_ms": _latency(svc, "latency_p50_ms", sw),
            "latency_p99_ms": _latency(svc, "latency_p99_ms", sw),
            "served": served_out,
        }
    return {"cluster": cluster, "second": second, "services": out}
