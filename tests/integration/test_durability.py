"""SIGKILL the federation under a stream of acknowledged writes; after every restart, every
acknowledged write is there (bench/durability.py has the theory of operation).

CI runs fewer kills than the 50 of `python -m bench.durability` to stay within ~40 s: 20 on
SQLite (~0.35 s per restart) and 10 on etcd (~1 s per restart: the store reconnects).
"""

from __future__ import annotations

import pytest

from bench import durability
from tests.helpers.etcd import require_etcd

pytestmark = pytest.mark.integration


def _assert_nothing_lost(report: durability.Report, kills: int) -> None:
    s = report.summary()
    print(f"\n{durability.render([report])}")
    assert report.kills == kills
    assert report.acknowledged_exports > kills and report.acknowledged_bundles > 0, s
    assert not report.lost, report.lost[:10]
    assert not report.refused, report.refused[:10]


@pytest.mark.timeout(120)
async def test_sqlite_loses_no_acknowledged_write_across_20_sigkills(tmp_path):
    report = await durability.run("sqlite", 20, seed=7, root=tmp_path)
    _assert_nothing_lost(report, 20)


@pytest.mark.timeout(120)
async def test_etcd_loses_no_acknowledged_write_across_10_sigkills(tmp_path):
    require_etcd()
    report = await durability.run("etcd", 10, seed=7, root=tmp_path)
    _assert_nothing_lost(report, 10)
