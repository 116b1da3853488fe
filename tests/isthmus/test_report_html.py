"""report_html: structure of the page, and a real render in headless Chromium (screenshot)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from federation.drill_model import Drill
from federation.drill_report import compute_report
from isthmus.report_html import render_report_html, summary_rows, timeline_rows

T0 = 1_796_000_000.0


def sample_report(mode: str = "blackhole") -> dict:
    """A real compute_report of synthetic samples: 2 s baseline, 8 s fault, 5 s settle; edge-1
    probes echo at 40/s, us-east serves it, then us-west during the fault, then us-east again."""
    drill = Drill(
        id="d-20261130-120000-ab12",
        scope_kind="region",
        scope="us-east",
        mode=mode,
        created_at=T0 - 2,
        fault_start=T0,
        fault_end=T0 + 8,
        clusters_in_scope=("east-1", "east-2"),
        regions={
            "east-1": "us-east",
            "east-2": "us-east",
            "west-1": "us-west",
            "edge-1": "eu-west",
        },
        services=("default/echo",),
        latency=0.2 if mode == "degrade" else 0.0,
        error_rate=0.3 if mode == "degrade" else 0.0,
        settle=5.0,
        state="ended",
        ended_at=T0 + 8,
        end_reason="deadline",
    )
    samples = []
    for rel in range(-2, 13):
        if rel < 0 or rel >= 10:  # baseline, and after failback (2 s after the fault stopped)
            served, fail = {"east-1": 20, "east-2": 20}, 0
        elif rel == 0:
            served, fail = {"east-1": 10, "west-1": 20}, 10
        else:
            served, fail = {"west-1": 40}, 0
        samples.append(
            {
                "cluster": "edge-1",
                "second": int(T0) + rel,
                "services": {
                    "default/echo": {
                        "attempts": 40,
                        "successes": 40 - fail,
                        "failures": fail,
                        "latency_p50_ms": 1.0,
                        "latency_p99_ms": 480.0 if rel == 0 else 2.0,
                        "served": served,
                    }
                },
            }
        )
    report = compute_report(drill, samples)
    report["drill"] = drill.to_json()  # what the CLI adds before rendering
    return report


def test_structure_self_contained():
    page = render_report_html(sample_report())
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Isthmus drill d-20261130-120000-ab12: region us-east</title>" in page
    assert "<script" not in page.lower()
    # no external resources: the only URL is the SVG namespace
    urls = set(re.findall(r"(?:https?:)?//[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"""(?:src|href)\s*=""", page)
    svg = page[page.index("<svg"): page.index("</svg>") + 6]
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    shares = [r for r in root.iter(f"{ns}rect") if r.get("class") == "share"]
    assert {r.get("data-region") for r in shares} == {"us-east", "us-west"}
    assert [p for p in root.iter(f"{ns}polyline") if p.get("class") == "error-rate"]
    markers = [ln for ln in root.iter(f"{ns}line") if ln.get("class") == "marker"]
    assert len(markers) == 2
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "fault start" in texts and "fault stop" in texts
    assert "seconds since fault start" in texts
    assert {"-2", "0", "4", "8", "12"} <= set(texts)  # x axis in seconds
    assert "served by us-east (in scope)" in texts and "served by us-west" in texts
    # the fault-stop marker sits 8/15 of the way (seconds -2..13)
    x0, x8 = (float(m.get("x1")) for m in markers)
    assert x8 > x0
    # summary table has the contract's fields
    for label in (
        "detection",
        "time to shift",
        "failed during shift",
        "failback after fault stop",
        "flapped",
    ):
        assert f"<th>{label}</th>" in page


def test_stacked_shares_sum_to_success_ratio():
    page = render_report_html(sample_report())
    root = ET.fromstring(page[page.index("<svg"): page.index("</svg>") + 6])
    ns = "{http://www.w3.org/2000/svg}"
    heights: dict[str, float] = {}
    for r in root.iter(f"{ns}rect"):
        if r.get("class") == "share":
            x = r.get("x")
            heights[x] = heights.get(x, 0.0) + float(r.get("height"))
    full = max(heights.values())
    assert len(heights) == 15
    assert min(heights.values()) == pytest.approx(
        full * 30 / 40, abs=0.5
    )  # second 0: 10 of 40 failed


def test_summary_rows_and_escaping():
    rep = sample_report("degrade")
    rows = dict(summary_rows(rep))
    assert rows["time to shift"] == "1.0 s"
    assert rows["failback after fault stop"] == "2.0 s"
    assert rows["failed during shift"] == "10"
    assert rows["mode"] == "degrade (latency 200 ms, error rate 30%)"
    assert rows["flapped"] == "no"
    assert rows["probes"].startswith("600 attempts, 590 ok, 10 failed")
    rep["end_reason"] = "<script>alert(1)</script>"
    rep["shift_s"] = None
    page = render_report_html(rep)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '<td class="bad">never</td>' in page


def test_timeline_rows_derive_regions_from_clusters():
    rep = sample_report()
    for row in rep["timeline"]:
        del row["served_by_region"]
    rows = timeline_rows(rep)
    assert rows[0]["by_region"] == {"us-east": 40}
    assert rows[3]["by_region"] == {"us-west": 40}


def test_empty_report_renders():
    page = render_report_html(
        {"drill": {"id": "d-20261130-120000-ab12", "scope": {"cluster": "x"}}}
    )
    assert "no samples" in page and "never" in page


# -- a real render ---------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "google-chrome"):
        path = shutil.which(name) or (name if Path(name).exists() else None)
        if path:
            return path
    return None


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert ihdr is not None
    width, height, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1: (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def test_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no Chromium on this machine (apt-get install -y chromium) — cannot take the screenshot"
        )
    page = tmp_path / "report.html"
    page.write_text(render_report_html(sample_report()), encoding="utf-8")
    shot = tmp_path / "r.png"
    proc = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert shot.exists(), out.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    assert len(data) > 20_000, f"screenshot only {len(data)} bytes"
    width, height, rows = decode_png(data)
    assert (width, height) == (1200, 900)
    colors: set[bytes] = set()
    for row in rows[::3]:
        for x in range(0, len(row), 9):
            colors.add(row[x: x + 3])
    assert len(colors) > 20, f"only {len(colors)} distinct colors: a blank page?"
    # the plot's palette is on screen: the us-east blue, the us-west orange, the error line
    for hexcolor in ("0072B2", "E69F00", "D55E00"):
        want = bytes.fromhex(hexcolor)
        assert any(want in row for row in rows), f"colour #{hexcolor} not on the screenshot"
    keep = os.environ.get("ISTHMUS_KEEP_SCREENSHOT")  # a path: keep the PNG for a human to look at
    if keep:
        Path(keep).write_bytes(data)
