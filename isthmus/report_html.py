"""A drill report as one self-contained HTML page (no external URLs, no JavaScript).

`render_report_html(report)` takes the dict of `federation.drill_report.compute_report` (as
served by `GET /v1/drills/{id}/report`) and returns the page: a title, the summary table, an
inline SVG timeline — one stacked bar per second with the share of probes served by each
region, a red error-rate line, the fault window shaded with "fault start" / "fault stop" markers,
axes in seconds relative to the fault start and in percent — and the per-second rows in a
collapsed table. `summary_rows(report)` gives the (label, value) pairs the CLI prints as its
table too.

Pure formatting: this module reads no clock and does no I/O. It is tolerant of missing fields
(a report of a drill that never got samples still renders), so a partial report never hides
the rest of the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

__all__ = ["render_report_html", "summary_rows", "timeline_rows", "fmt_seconds"]

# Colour-blind-friendly palette (Okabe-Ito, without the red used for errors).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#56B4E9", "#CC79A7", "#F0E442", "#000000", "#999999")
ERROR_COLOR = "#D55E00"


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def fmt_seconds(x: Any) -> str:
    v = _num(x)
    return "never" if v is None else f"{v:.1f} s"


def _fmt_ms(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.1f} ms"


def _drill(report: Mapping[str, Any]) -> Mapping[str, Any]:
    d = report.get("drill")
    return d if isinstance(d, Mapping) else report


def _scope_text(report: Mapping[str, Any]) -> str:
    d = _drill(report)
    scope = d.get("scope")
    if isinstance(scope, Mapping) and len(scope) == 1:
        k, v = next(iter(scope.items()))
        return f"{k} {v}"
    kind, value = d.get("scope_kind"), d.get("scope")
    return f"{kind} {value}" if kind else str(value or "?")


def _regions_map(report: Mapping[str, Any]) -> dict[str, str]:
    regions = _drill(report).get("regions") or report.get("regions") or {}
    return {str(k): str(v) for k, v in regions.items()} if isinstance(regions, Mapping) else {}


def _in_scope_regions(report: Mapping[str, Any]) -> set[str]:
    d = _drill(report)
    regions = _regions_map(report)
    clusters = d.get("clusters_in_scope") or report.get("clusters_in_scope") or []
    out = {regions[c] for c in clusters if c in regions}
    scope = d.get("scope")
    if isinstance(scope, Mapping) and "region" in scope:
        out.add(str(scope["region"]))
    return out


def timeline_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's per-second rows, normalized: second (relative, int), attempts, successes,
    failures, by_region {region: successes}, by_cluster, p99_ms (None when unknown)."""
    regions = _regions_map(report)
    out = []
    for row in report.get("timeline") or []:
        if not isinstance(row, Mapping):
            continue
        sec = _num(row.get("t"))  # compute_report: t = relative, second = epoch second
        if sec is None:
            abs_sec, start = _num(row.get("second")), _num(_drill(report).get("fault_start"))
            if abs_sec is None:
                continue
            sec = abs_sec - start if start is not None and abs_sec > 1e6 else abs_sec
        by_cluster = row.get("served") or row.get("served_by_cluster") or {}
        by_region = row.get("served_by_region") or row.get("by_region") or row.get("served_regions")
        if not isinstance(by_region, Mapping):
            by_region = {}
            for c, n in (by_cluster.items() if isinstance(by_cluster, Mapping) else ()):
                r = regions.get(c, c)
                by_region[r] = by_region.get(r, 0) + (_num(n) or 0)
        out.append({
            "second": int(sec),
            "attempts": int(_num(row.get("attempts")) or 0),
            "successes": int(_num(row.get("successes")) or 0),
            "failures": int(_num(row.get("failures")) or 0),
            "by_region": {str(k): int(_num(v) or 0) for k, v in by_region.items()},
            "by_cluster": {str(k): int(_num(v) or 0) for k, v in by_cluster.items()}
            if isinstance(by_cluster, Mapping) else {},
            "p99_ms": _num(row.get("p99_ms", row.get("latency_p99_ms"))),
        })
    out.sort(key=lambda r: r["second"])
    return out


def _fault_stop_rel(report: Mapping[str, Any]) -> float | None:
    """Seconds from fault start to fault stop (the deadline, or the abort if it came first)."""
    for k in ("fault_stop_t", "fault_stop_s"):
        if _num(report.get(k)) is not None:
            return _num(report.get(k))
    d = _drill(report)
    start = _num(d.get("fault_start"))
    if start is None:
        return None
    stop = _num(d.get("fault_stop"))
    if stop is None:
        known = [v for v in (_num(d.get("fault_end")), _num(d.get("ended_at"))) if v is not None]
        stop = min(known) if known else None
    return None if stop is None else stop - start


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary: the same in the CLI's table and the HTML page."""
    d = _drill(report)
    totals = report.get("totals") if isinstance(report.get("totals"), Mapping) else {}
    mode = report.get("by_mode") if isinstance(report.get("by_mode"), Mapping) else {}
    mode_name = mode.get("mode") or d.get("mode") or "?"
    mode_text = str(mode_name)
    if mode_name == "degrade":
        lat, err = (
            _num(mode.get("latency", d.get("latency"))),
            _num(mode.get("error_rate", d.get("error_rate"))),
        )
        mode_text += (f" (latency {0 if lat is None else lat * 1000:.0f} ms, "
                      f"error rate {0 if err is None else err:.0%})")
    attempts = int(_num(totals.get("attempts")) or 0)
    successes = int(_num(totals.get("successes")) or 0)
    failures = int(_num(totals.get("failures")) or 0)
    ratio = f" ({successes / attempts:.2%} ok)" if attempts else ""
    flapped = report.get("flapped")
    stop = _fault_stop_rel(report)
    rows = [
        ("drill", str(d.get("id") or report.get("id") or "?")),
        ("scope", _scope_text(report)),
        ("mode", mode_text),
        (
            "state",
            f"{report.get('state') or d.get('state') or '?'} "
            f"({report.get('end_reason') or d.get('end_reason') or '-'})",
        ),
        ("fault window", "-" if stop is None else f"0.0 s .. {stop:.1f} s"),
        ("detection", fmt_seconds(report.get("detection_s"))),
        ("time to shift", fmt_seconds(report.get("shift_s"))),
        ("failed during shift", str(report.get("failed_during_shift", "-"))),
        (
            "p99 during fault (worst / median)",
            f"{_fmt_ms(report.get('p99_ms_worst'))} / {_fmt_ms(report.get('p99_ms_median'))}",
        ),
        ("failback after fault stop", fmt_seconds(report.get("failback_s"))),
        ("flapped", "-" if flapped is None else ("YES" if flapped else "no")),
        ("probes", f"{attempts} attempts, {successes} ok, {failures} failed{ratio}"),
    ]
    return rows


# -- the SVG timeline ---------------------------------------------------------------------------
W, H = 1100, 420
ML, MR, MT, MB = 64, 24, 44, 56  # margins: left (y labels), right, top (legend), bottom (x labels)


def _svg(report: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    pw, ph = W - ML - MR, H - MT - MB
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'role="img" aria-labelledby="plot-title" font-family="sans-serif" font-size="12">',
        '<title id="plot-title">Traffic share per serving region and error rate, per second'
        "</title>",
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
    ]
    if not rows:
        parts.append(
            f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#555">no samples</text>'
            "</svg>"
        )
        return "\n".join(parts)
    lo, hi = rows[0]["second"], rows[-1]["second"] + 1
    span = max(1, hi - lo)

    def x(s: float) -> float:
        return ML + (s - lo) / span * pw

    def y(frac: float) -> float:
        return MT + (1 - frac) * ph

    # fault window
    stop = _fault_stop_rel(report)
    if stop is not None:
        x0, x1 = x(max(lo, 0)), x(min(hi, stop))
        if x1 > x0:
            parts.append(f'<rect class="fault-window" x="{x0:.1f}" y="{MT}" width="{x1 - x0:.1f}" '
                         f'height="{ph}" fill="#fbe3d6"/>')
            # the same window as a strip above the plot (the bars cover the shading)
            parts.append(
                f'<rect class="fault-strip" x="{x0:.1f}" y="{MT - 9}" width="{x1 - x0:.1f}" '
                'height="6" fill="#e8a27c"/>'
            )
    # grid + y axis
    for i in range(0, 11, 2):
        f = i / 10
        parts.append(
            f'<line x1="{ML}" x2="{ML + pw}" y1="{y(f):.1f}" y2="{y(f):.1f}" stroke="#e4e4e4"/>'
        )
        parts.append(
            f'<text x="{ML - 8}" y="{y(f) + 4:.1f}" text-anchor="end" fill="#333">{i * 10}%</text>'
        )
    # stacked bars of share per serving region
    regions = sorted({r for row in rows for r in row["by_region"]})
    in_scope = _in_scope_regions(report)
    colors = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(regions)}
    bw = pw / span
    gap = min(2.0, bw * 0.15)
    for row in rows:
        att = row["attempts"]
        if att <= 0:
            continue
        acc = 0.0
        for r in regions:
            n = row["by_region"].get(r, 0)
            if n <= 0:
                continue
            share = min(1.0, n / att)
            top = y(acc + share)
            parts.append(
                f'<rect class="share" data-region="{e(r)}" x="{x(row["second"]) + gap / 2:.1f}" '
                f'y="{top:.1f}" '
                f'width="{max(0.5, bw - gap):.1f}" height="{y(acc) - top:.1f}" fill="{colors[r]}">'
                f"<title>t={row['second']} s: {e(r)} served {n}/{att}</title></rect>"
            )
            acc += share
    # error-rate line (a point per second, at the middle of its bar)
    pts = [
        f'{x(row["second"] + 0.5):.1f},{y(row["failures"] / row["attempts"]):.1f}'
        for row in rows
        if row["attempts"] > 0
    ]
    if pts:
        parts.append(f'<polyline class="error-rate" points="{" ".join(pts)}" fill="none" '
                     f'stroke="{ERROR_COLOR}" stroke-width="2.5" stroke-linejoin="round"/>')
        for p in pts:
            cx, cy = p.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{ERROR_COLOR}"/>')
    # markers
    for label, at in (("fault start", 0.0), ("fault stop", stop)):
        if at is None or not lo <= at <= hi:
            continue
        xm = x(at)
        parts.append(
            f'<line class="marker" x1="{xm:.1f}" x2="{xm:.1f}" y1="{MT - 6}" y2="{MT + ph}" '
            'stroke="#222" stroke-width="1.5" stroke-dasharray="6 4"/>'
        )
        parts.append(
            f'<rect x="{xm + 2:.1f}" y="{MT + 2}" width="{6.6 * len(label) + 6:.1f}" height="15" '
            'fill="#ffffff" fill-opacity="0.85"/>'
        )
        parts.append(
            f'<text x="{xm + 5:.1f}" y="{MT + 14}" fill="#222" font-weight="bold">{label}</text>'
        )
    # x axis: a tick every few seconds so labels never collide
    step = next(s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600) if span / s <= 24)
    parts.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{MT + ph}" y2="{MT + ph}" stroke="#333"/>')
    first = -(-lo // step) * step
    for s in range(first, hi + 1, step):
        parts.append(
            f'<line x1="{x(s):.1f}" x2="{x(s):.1f}" y1="{MT + ph}" y2="{MT + ph + 5}" '
            'stroke="#333"/>'
        )
        parts.append(
            f'<text x="{x(s):.1f}" y="{MT + ph + 19}" text-anchor="middle" fill="#333">{s}</text>'
        )
    parts.append(f'<text x="{ML + pw / 2}" y="{H - 12}" text-anchor="middle" fill="#111">'
                 'seconds since fault start</text>')
    parts.append(f'<text x="16" y="{MT + ph / 2}" text-anchor="middle" fill="#111" '
                 f'transform="rotate(-90 16 {MT + ph / 2})">share of probes</text>')
    # legend
    lx = ML
    for r in regions:
        name = f"served by {r}" + (" (in scope)" if r in in_scope else "")
        parts.append(f'<rect x="{lx}" y="14" width="14" height="14" fill="{colors[r]}"/>')
        parts.append(f'<text x="{lx + 20}" y="26" fill="#111">{e(name)}</text>')
        lx += 34 + 7.2 * len(name)
    parts.append(
        f'<line x1="{lx}" x2="{lx + 22}" y1="21" y2="21" stroke="{ERROR_COLOR}" '
        'stroke-width="2.5"/>'
    )
    parts.append(f'<text x="{lx + 28}" y="26" fill="#111">error rate</text>')
    lx += 110
    parts.append(
        f'<rect x="{lx}" y="14" width="14" height="14" fill="#fbe3d6" stroke="#e8a27c" '
        'stroke-width="2"/>'
    )
    parts.append(f'<text x="{lx + 20}" y="26" fill="#111">fault window</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #111; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
p.sub { color: #555; margin: 0 0 16px 0; }
table { border-collapse: collapse; margin: 8px 0 20px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00020; font-weight: bold; }
.good { color: #0a7a32; font-weight: bold; }
figure { margin: 0 0 16px 0; }
figcaption { color: #555; font-size: 13px; }
"""


def render_report_html(report: Mapping[str, Any]) -> str:
    """The whole page (see the module docstring)."""
    e = html.escape
    rows = timeline_rows(report)
    d = _drill(report)
    did = str(d.get("id") or report.get("id") or "drill")
    title = f"Isthmus drill {did}: {_scope_text(report)}"
    summary = []
    for label, value in summary_rows(report):
        cls = ""
        if label == "flapped":
            cls = ' class="bad"' if value == "YES" else ' class="good"'
        elif label == "time to shift" and value == "never":
            cls = ' class="bad"'
        summary.append(f"<tr><th>{e(label)}</th><td{cls}>{e(value)}</td></tr>")
    regions = sorted({r for row in rows for r in row["by_region"]})
    head = "".join(f"<th>{e(r)}</th>" for r in regions)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{row["by_region"].get(r, 0)}</td>' for r in regions)
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
        body.append(
            f'<tr><td class="num">{row["second"]}</td><td class="num">{row["attempts"]}</td>'
            f'<td class="num">{row["successes"]}</td><td class="num">{row["failures"]}</td>'
            f'{cells}<td class="num">{p99}</td></tr>'
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{e(title)}</h1>
<p class="sub">mode {e(str(d.get("mode") or (report.get("by_mode") or {}).get("mode") or "?"))}; \
seconds are relative to the
fault start (negative: baseline before the fault).</p>
<table class="summary">
{chr(10).join(summary)}
</table>
<figure>
{_svg(report, rows)}
<figcaption>Bars: share of synthetic probes served by each region, per second (the rest of a bar's
height is failed probes). Line: error rate. Shaded: the fault window.</figcaption>
</figure>
<details>
<summary>per-second timeline ({len(rows)} rows)</summary>
<table class="timeline">
<tr><th>second</th><th>attempts</th><th>ok</th><th>failed</th>{head}<th>p99 ms</th></tr>
{chr(10).join(body)}
</table>
</details>
</body>
</html>
"""
