"""A gateway's traffic report: what the federation's dashboard draws the service map from.

Every second or so a gateway PUTs `/v1/clusters/{name}/report` (that cluster only):

    {"admin": "127.0.0.1:15102" | null,          its admin address (for `isthmus why`)
     "flows": [{"destination": "east-2", "service": "default/echo", "tier": "zone",
                "result": "served", "count": 412, "unit": "connections"}, ...],
                                                  cumulative counters; unit: connections (TCP
                                                  imports, the default) or requests (HTTP)
     "tiers": [{"service": "default/echo", "active": "zone", "panic": false}, ...],
     "events": [{"at": 1735689600.5, "kind": "failover", "text": "..."}, ...]}  latest first-in

Counters are cumulative since the gateway started (as in its /metrics); the federation keeps
the latest two reports of each cluster in memory only (not in the store: a replica that did
not receive a report shows none, and a restart forgets them) and serves the rate between them
(`rates`). A counter that went down (the gateway restarted) counts from zero. Bounds: at most
MAX_FLOWS flows, MAX_TIERS tiers, MAX_EVENTS events, strings at most MAX_TEXT characters;
beyond them the report is refused with a 400 naming the field. Pure: values and parsing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from federation.errors import InputError
from federation.fields import check_name, get_field

__all__ = ["Report", "parse_report", "rates", "MAX_FLOWS", "MAX_TIERS", "MAX_EVENTS"]

MAX_FLOWS = 2000
MAX_TIERS = 500
MAX_EVENTS = 32
MAX_TEXT = 300
RESULTS = ("served", "response_timeout", "failed")
UNITS = ("connections", "requests")


@dataclass(frozen=True)
class Report:
    cluster: str
    at: float  # federation clock when received
    admin: str | None
    # (destination, service, tier, result, unit, n)
    flows: tuple[tuple[str, str, str, str, str, int], ...]
    tiers: tuple[dict[str, Any], ...]
    events: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "at": self.at, "admin": self.admin,
                "flows": [{"destination": d, "service": s, "tier": t, "result": r, "unit": u,
                           "count": n} for d, s, t, r, u, n in self.flows],
                "tiers": list(self.tiers), "events": list(self.events)}


def _text(v: Any, what: str) -> str:
    """A string of at most MAX_TEXT characters (the page shows it as text, never as markup)."""
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise InputError(f"{what}: expected a string of at most {MAX_TEXT} characters, got "
                         f"{str(v)[:40]!r}")
    return v


def _only(obj: Any, allowed: tuple[str, ...], what: str) -> None:
    if isinstance(obj, Mapping):
        extra = sorted(set(obj) - set(allowed))
        if extra:
            raise InputError(f"{what}: unknown field(s) {', '.join(map(repr, extra))} "
                             f"(known: {', '.join(allowed)})")


def _service(v: Any, what: str) -> str:
    ns, sep, name = str(v).partition("/") if isinstance(v, str) else ("", "", "")
    if not sep:
        raise InputError(f"{what}: expected NAMESPACE/NAME, got {str(v)[:40]!r}")
    check_name(ns, what)
    check_name(name, what)
    return v


def _list(obj: Mapping[str, Any], key: str, limit: int) -> list[Any]:
    items = get_field(obj, key, "report", list)
    if len(items) > limit:
        raise InputError(f"report.{key}: {len(items)} items, at most {limit}")
    return items


def parse_report(cluster: str, obj: Any, at: float) -> Report:
    """A report body, checked field by field (InputError names the field)."""
    _only(obj, ("admin", "flows", "tiers", "events"), "report")
    admin = obj.get("admin") if isinstance(obj, Mapping) else None
    if admin is not None:
        admin = _text(admin, "report.admin")
    flows = []
    for i, f in enumerate(_list(obj, "flows", MAX_FLOWS)):
        w = f"report.flows[{i}]"
        _only(f, ("destination", "service", "tier", "result", "count", "unit"), w)
        dest = get_field(f, "destination", w, str)
        if dest != "none":
            check_name(dest, f"{w}.destination")
        tier = _text(get_field(f, "tier", w, str), f"{w}.tier")
        result = get_field(f, "result", w, str)
        if result not in RESULTS:
            raise InputError(f"{w}.result: {result!r} is not one of {', '.join(RESULTS)}")
        n = get_field(f, "count", w, (int, float))
        if isinstance(n, float):  # JSON's 12.0 is an integer too (JSON Schema says so)
            if not n.is_integer():
                raise InputError(f"{w}.count: {n} is not a whole number")
            n = int(n)
        if not 0 <= n < 2**63:
            raise InputError(f"{w}.count: {n} is out of range")
        unit = f.get("unit", "connections")
        if unit not in UNITS:
            raise InputError(f"{w}.unit: {str(unit)[:40]!r} is not one of {', '.join(UNITS)}")
        flows.append((dest, _service(get_field(f, "service", w, str), f"{w}.service"), tier,
                      result, unit, n))
    tiers = []
    for i, t in enumerate(_list(obj, "tiers", MAX_TIERS)):
        w = f"report.tiers[{i}]"
        _only(t, ("service", "active", "panic"), w)
        active = get_field(t, "active", w, (str, type(None)))
        tiers.append({"service": _service(get_field(t, "service", w, str), f"{w}.service"),
                      "active": None if active is None else _text(active, f"{w}.active"),
                      "panic": bool(get_field(t, "panic", w, bool))})
    events = []
    for i, e in enumerate(_list(obj, "events", MAX_EVENTS)):
        w = f"report.events[{i}]"
        at_e = get_field(e, "at", w, (int, float))
        if not math.isfinite(at_e):  # json.loads reads NaN and Infinity; the page's JSON cannot
            raise InputError(f"{w}.at: {at_e} is not a finite number")
        events.append({"at": float(at_e), "kind": _text(get_field(e, "kind", w, str), f"{w}.kind"),
                       "text": _text(get_field(e, "text", w, str), f"{w}.text")})
    return Report(cluster, at, admin, tuple(flows), tuple(tiers), tuple(events))


def rates(prev: Report | None, cur: Report) -> list[dict[str, Any]]:
    """Per flow, connections (or requests) per second between two reports of one cluster (a
    counter that went down counts from zero; without a previous report the rate is unknown:
    0)."""
    before = {f[:5]: f[5] for f in prev.flows} if prev is not None else {}
    dt = cur.at - prev.at if prev is not None else 0.0
    out = []
    for d, s, t, r, u, n in cur.flows:
        old = before.get((d, s, t, r, u), 0)
        delta = n - old if n >= old else n
        out.append({"source": cur.cluster, "destination": d, "service": s, "tier": t,
                    "result": r, "unit": u, "count": n,
                    "per_second": round(delta / dt, 3) if dt > 0 else 0.0})
    return out
