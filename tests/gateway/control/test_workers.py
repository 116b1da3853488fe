"""Unit tests of what `--workers` adds outside the processes: a worker's read-only identity and
the counters files workers leave for their primary (the processes:
tests/integration/test_workers.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.config.schema import parse_config
from gateway.control.agent import Identity
from gateway.control.workers import read_stats, stats_path, write_stats
from gateway.errors import GatewayError

CONFIG = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:7443", ca_file: ca.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
"""


def config(tmp_path: Path):
    return parse_config(CONFIG, tmp_path / "gw.yaml")


def test_a_worker_never_creates_a_cluster_ca(tmp_path: Path):
    with pytest.raises(GatewayError, match="a worker never creates one"):
        Identity(config(tmp_path), time.time(), persist=False)
    assert not (tmp_path / "state" / "identity" / "ca.pem").exists()


def test_a_worker_uses_the_primarys_svid_and_keeps_its_own_rotations_in_memory(tmp_path: Path):
    cfg = config(tmp_path)
    now = time.time()
    primary = Identity(cfg, now)
    on_disk = {p.name: p.read_bytes() for p in (tmp_path / "state" / "identity").iterdir()}
    worker = Identity(cfg, now, persist=False)
    assert worker.svid.serial == primary.svid.serial
    assert worker.bundle.sequence == primary.bundle.sequence
    rotated = worker.issue(now + 1)
    assert rotated.serial != primary.svid.serial and worker.svid is rotated
    assert {p.name: p.read_bytes() for p in (tmp_path / "state" / "identity").iterdir()} == on_disk


def test_worker_counters_reach_the_primary_unless_stale_or_unreadable(tmp_path: Path):
    listeners = {"import default/echo": {"accepted": 3, "served_by": {"local:127.0.0.1:9": 3}}}
    write_stats(tmp_path, 1, listeners)
    write_stats(tmp_path, 2, listeners)
    stale = json.loads(stats_path(tmp_path, 2).read_text())
    stale["written_at"] -= 60
    stats_path(tmp_path, 2).write_text(json.dumps(stale))
    stats_path(tmp_path, 3).write_text("{not json")
    got = read_stats(tmp_path, 5, time.time())  # worker 4 wrote nothing yet
    assert list(got) == [1]
    assert got[1]["listeners"] == listeners
    assert stats_path(tmp_path, 1).stat().st_mode & 0o777 == 0o600
