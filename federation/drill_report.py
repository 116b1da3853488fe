"""The report of a drill, computed from its record and its samples (pure).

`compute_report`: per-second rows summed over every sample of that second, with `t`
= second - fault_start (negative in the baseline). The derived numbers:

- *affected streams*: a stream is one (observing cluster, service). If any stream had a
  success served in scope during the baseline, only those streams count for "served outside the
  scope", shares, shift, failback and flapping -- an observer that always served a service from
  its own (out-of-scope) endpoints would otherwise make every drill "detect" and "shift" at
  t = 0. Without baseline data every stream counts. Failures always count from every stream.
- fault seconds: `fault_start <= second < fault_stop`; settle seconds: `second >= fault_stop`.
- `detection_s`: t of the first fault second with a failure, or an affected success served
  outside the scope; null if none.
- `shift_s`: t of the first fault second where affected successes ≥ 99% of affected attempts
  (successes > 0) and every one of them was served outside the scope (attributed in `served`:
  none in scope, served outside ≥ successes); null if never. So shift_s ≥ detection_s.
- `failed_during_shift`: failures of the fault seconds up to the shift second (inclusive), or
  of the whole fault when there is no shift.
- `p99_ms_worst` / `p99_ms_median`: max / median of the per-second p99 (the max over samples of
  `latency_p99_ms`) over the fault seconds that have one; null if none.
- `baseline_share`: in-scope served / served over the baseline seconds (affected streams);
  the failback threshold is 0.99 when it is ≥ 0.99, else 0.9 × baseline_share.
- `failback_s`: **relative to fault_stop** (not fault_start): the start of the first second
  ≥ fault_stop whose in-scope share reaches the threshold, minus fault_stop; null if never or
  if there was no baseline to compare with.
- `flapped`: after the shift second and before fault_stop (seconds ending by fault_stop), any
  second with an affected success served in scope; or after the failback second, any second
  whose in-scope share falls below the threshold again.
- `totals`: attempts, successes, failures over every sample (whole drill).

This module imports no asyncio, socket, time or random.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from federation.drill_model import Drill
from federation.drills import FAILBACK_FRACTION, SHIFT_SUCCESS

__all__ = ["compute_report"]


@dataclass
class _Acc:
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    in_scope: int = 0
    outside: int = 0

    @property
    def served(self) -> int:
        return self.in_scope + self.outside

    @property
    def share(self) -> float | None:
        return self.in_scope / self.served if self.served else None


def compute_report(drill: Drill, samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The drill's report (see the module docstring and docs/drills.md)."""
    samples = sorted(samples, key=lambda s: (s["second"], s["cluster"]))
    in_scope = set(drill.clusters_in_scope)
    fs, stop = drill.fault_start, drill.fault_stop

    # affected streams: (observer, service) with in-scope successes during the baseline
    affected: set[tuple[str, str]] = set()
    for s in samples:
        if s["second"] < fs:
            for key, svc in s["services"].items():
                if any(c in in_scope and n > 0 for c, n in svc["served"].items()):
                    affected.add((s["cluster"], key))

    rows: dict[int, dict[str, Any]] = {}
    acc: dict[int, _Acc] = {}
    totals = {"attempts": 0, "successes": 0, "failures": 0}
    for s in samples:
        sec = s["second"]
        row = rows.setdefault(sec, {
            "t": sec - fs, "second": sec, "attempts": 0, "successes": 0, "failures": 0,
            "served_by_cluster": {}, "served_by_region": {}, "in_scope_share": None,
            "p99_ms": None, "phase": _phase(drill, sec),
        })
        a = acc.setdefault(sec, _Acc())
        for key, svc in s["services"].items():
            counts_here = not affected or (s["cluster"], key) in affected
            row["attempts"] += svc["attempts"]
            row["successes"] += svc["successes"]
            row["failures"] += svc["failures"]
            for k in totals:
                totals[k] += svc[k]
            p99 = svc.get("latency_p99_ms")
            if p99 is not None and (row["p99_ms"] is None or p99 > row["p99_ms"]):
                row["p99_ms"] = p99
            if counts_here:
                a.attempts += svc["attempts"]
                a.successes += svc["successes"]
            a.failures += svc["failures"]
            for c, n in svc["served"].items():
                row["served_by_cluster"][c] = row["served_by_cluster"].get(c, 0) + n
                region = drill.regions.get(c, "unknown")
                row["served_by_region"][region] = row["served_by_region"].get(region, 0) + n
                if counts_here:
                    if c in in_scope:
                        a.in_scope += n
                    else:
                        a.outside += n
    for row in rows.values():
        served = row["served_by_cluster"]
        total = sum(served.values())
        row["in_scope_share"] = (
            sum(n for c, n in served.items() if c in in_scope) / total if total else None
        )
        row["served_by_cluster"] = dict(sorted(served.items()))
        row["served_by_region"] = dict(sorted(row["served_by_region"].items()))

    seconds = sorted(rows)
    fault = [s for s in seconds if fs <= s < stop]
    after = [s for s in seconds if s >= stop]

    detection = next((s for s in fault if acc[s].failures > 0 or acc[s].outside > 0), None)
    shift = next(
        (
            s for s in fault
            if acc[s].successes > 0 and acc[s].in_scope == 0
            and acc[s].outside >= acc[s].successes
            and acc[s].successes >= SHIFT_SUCCESS * acc[s].attempts
        ),
        None,
    )
    failed = sum(acc[s].failures for s in fault if shift is None or s <= shift)
    p99s = [rows[s]["p99_ms"] for s in fault if rows[s]["p99_ms"] is not None]

    base = _Acc()
    for s in seconds:
        if s < fs:
            base.in_scope += acc[s].in_scope
            base.outside += acc[s].outside
    baseline_share = base.share
    threshold = None
    if baseline_share is not None:
        threshold = (SHIFT_SUCCESS if baseline_share >= SHIFT_SUCCESS
                     else FAILBACK_FRACTION * baseline_share)
    failback = None
    if threshold is not None:
        failback = next(
            (s for s in after if acc[s].served and acc[s].share >= threshold),  # type: ignore[operator]
            None,
        )

    flapped = False
    if shift is not None:
        flapped = any(acc[s].in_scope > 0 for s in fault if s > shift and s + 1 <= stop)
    if not flapped and failback is not None and threshold is not None:
        flapped = any(
            acc[s].served and acc[s].share < threshold  # type: ignore[operator]
            for s in after if s > failback
        )

    return {
        "id": drill.id,
        "scope": {drill.scope_kind: drill.scope},
        "clusters_in_scope": list(drill.clusters_in_scope),
        "services": list(drill.services),
        "state": drill.state,
        "end_reason": drill.end_reason,
        "by_mode": {"mode": drill.mode, "latency": drill.latency, "error_rate": drill.error_rate},
        "created_at": drill.created_at,
        "fault_start": fs,
        "fault_end": drill.fault_end,
        "fault_stop": stop,
        "fault_stop_t": stop - fs,
        "settle": drill.settle,
        "detection_s": None if detection is None else float(detection - fs),
        "shift_s": None if shift is None else float(shift - fs),
        "failed_during_shift": failed,
        "p99_ms_worst": max(p99s) if p99s else None,
        "p99_ms_median": float(statistics.median(p99s)) if p99s else None,
        "baseline_share": baseline_share,
        "failback_s": None if failback is None else float(failback - stop),
        "flapped": bool(flapped),
        "totals": totals,
        "affected_streams": [f"{c} {k}" for c, k in sorted(affected)],
        "timeline": [rows[s] for s in seconds],
    }


def _phase(drill: Drill, second: int) -> str:
    if second < drill.fault_start:
        return "baseline"
    if second < drill.fault_stop:
        return "fault"
    return "settle"
