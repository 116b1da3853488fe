"""`isthmus demo` end to end, as a user runs it (real processes on loopback).

Proves: every phase ends on the cluster it should (east-1 -> east-2 -> west-1 -> east-1), the
gateway fails 0 new connections (a connection already on a backend when the demo kills it is
counted apart, as not the gateway's fault), and the us-east drill shifts edge-1 without flapping.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_fails_over_and_back_with_no_failed_connection(tmp_path):
    """`isthmus demo` at 30 conn/s, 2 s phases: 4 of 4 phases end on the right cluster (east-1 ->
    east-2 -> west-1 -> east-1), the gateway fails 0, the us-east drill shifts with no flap."""
    proc = subprocess.run(
        [sys.executable, "-m", "isthmus.cli", "demo", "--port-offset", "700", "--phase", "2s",
         "--rate", "30", "--state-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    # each phase ended on the cluster it should: east-1 → east-2 (same region) → west-1 → east-1
    for phase in ("all up", "east-1 down", "east-2 down too", "all restored"):
        assert phase in rows, out
        assert rows[phase].rstrip("│ ").endswith("yes"), rows[phase]
    served = [int(c) for c in rows["east-1 down"].split("│")[3:6]]
    assert served[0] == 0 and served[1] > 0, rows["east-1 down"]  # nothing to dead east-1
    served = [int(c) for c in rows["east-2 down too"].split("│")[3:6]]
    assert served[2] > 0 and served[0] == served[1] == 0, rows["east-2 down too"]
    for phase in ("all up", "east-1 down", "east-2 down too", "all restored"):
        assert rows[phase].split("│")[6].strip() == "0", rows[phase]  # the gateway failed none
    assert ", 0 failed, " in out, out
    assert "dashboard (live service map, drills): http://127.0.0.1:17780/ui/?token=" in out, out
    # then the blackhole drill of us-east: edge-1's traffic shifted to us-west, no flapping
    assert "drill plan: region us-east lost" in out, out
    shift = next(line for line in out.splitlines() if "time to shift" in line)
    assert "never" not in shift, out
    flapped = next(line for line in out.splitlines() if "│ flapped" in line)
    assert flapped.split("│")[2].strip() == "no", out
    html = tmp_path / "demo" / "drill-report.html"
    assert f"HTML report: {html}" in out and "<svg" in html.read_text(), out
