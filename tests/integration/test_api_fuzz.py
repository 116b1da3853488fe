"""schemathesis, stateful and time-bounded, as the operator, as east-1, and as east-1 aiming at
west-1's records (bench/fuzz.py has the theory of operation): every check passes, 0 answers
with a 5xx status, no write accepted across clusters, the federation never crashes. CI gives
it 45 s; `python -m bench.fuzz --minutes 10` is the long run (BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench import fuzz

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not fuzz.SCHEMATHESIS.exists(), reason="schemathesis is in the test extra: "
                    "pip install -e '.[test]'")
@pytest.mark.timeout(400)
async def test_stateful_api_fuzz_finds_nothing_and_no_cross_cluster_write(tmp_path):
    report = await fuzz.run(tmp_path, 45, seed=3)
    passes = report["passes"]
    for who, p in passes.items():
        assert p["exit"] == 0, f"as {who}:\n{p.get('output_tail', '')}"
        assert p["test_cases"] > 50, (who, p)
    assert passes["cross"]["cross_cluster_writes_accepted"] is False, passes["cross"]
    assert passes["cross"]["refused_for_identity"] > 0, passes["cross"]
    assert report["responses_5xx"] == 0
    assert report["federation_running"] and report["federation_tracebacks"] == 0
    assert report["ok"]
