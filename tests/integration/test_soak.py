"""The chaos soak (bench/soak.py) for 2 minutes: steady new and long-lived connections across
the demo topology while a seeded schedule stops and kills gateways, the federation and
backends, rotates a CA and runs drills; every failed connection must be explained by the
schedule. `python -m bench.soak --minutes 10` is the long run (BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
async def test_two_minute_chaos_soak_has_no_unexplained_failure(tmp_path):
    report = await soak.soak(tmp_path, 2.0, seed=11)
    print("\n" + soak.render(report))
    assert report["events"]["sigkill"] + report["events"]["sigstop"] >= 2, report["events"]
    assert report["new_served"] > 1000 and report["long_lived_exchanges"] > 500, report
    assert report["unexplained"] == 0, report["unexplained_first"]
