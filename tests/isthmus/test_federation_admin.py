"""`isthmus federation token …` and `cluster …` as a user runs them (real processes, a real
federation server in process, its SQLite store shared with the CLI)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.helpers.federation import make_cluster
from tests.helpers.processes import run_cli


async def _cli(*args: str):
    return await asyncio.to_thread(run_cli, *args)


async def test_a_state_dir_that_is_not_a_federations_is_refused(tmp_path: Path) -> None:
    typo = tmp_path / "federaton"
    for cmd in (("create", "--cluster", "east-1"), ("list",), ("revoke", "--cluster", "east-1")):
        r = await _cli("federation", "token", *cmd, "--state-dir", str(typo))
        assert r.returncode == 2, r
        assert "not a federation's state dir" in r.stderr and str(typo) in r.stderr
        assert r.stdout == ""
    assert not typo.exists()  # nothing made up


async def test_token_create_list_revoke(fed) -> None:
    store = ["--store", f"sqlite:{fed.tmp / 'fed.db'}"]
    r = await _cli("federation", "token", "create", "--cluster", "east-1", "--ttl", "169h", *store)
    assert r.returncode == 2 and "at most" in r.stderr
    r = await _cli("federation", "token", "create", "--cluster", "east-1", *store)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip()
    r = await _cli("federation", "token", "create", "--cluster", "east-1", "--ttl", "1h", *store)
    assert r.returncode == 0 and "revoked the earlier unused token" in r.stderr
    second = r.stdout.strip()
    assert first != second
    await fed.join(make_cluster("west-1"))
    r = await _cli("federation", "token", "create", "--cluster", "west-1", "--replace", *store)
    assert r.returncode == 0 and "WARNING" in r.stderr and "take over" in r.stderr
    r = await _cli("federation", "token", "list", "--json", *store)
    rows = json.loads(r.stdout)
    assert sorted((t["cluster"], t["replace"]) for t in rows) == [("east-1", False),
                                                                 ("west-1", True)]
    assert first not in r.stdout and second not in r.stdout  # ids, never the tokens
    r = await _cli("federation", "token", "list", *store)
    assert r.returncode == 0 and "replace" in r.stdout and "in 59m" in r.stdout
    west = next(t["id"] for t in rows if t["cluster"] == "west-1")
    r = await _cli("federation", "token", "revoke", west, *store)
    assert r.returncode == 0 and "west-1" in r.stdout
    r = await _cli("federation", "token", "revoke", "--cluster", "east-1", *store)
    assert r.returncode == 0
    r = await _cli("federation", "token", "list", *store)
    assert "no join tokens" in r.stdout


async def test_cluster_list_and_remove(fed) -> None:
    await fed.join(make_cluster("east-1"))
    await fed.join(make_cluster("west-1", "us-west"))
    op = ["--federation", fed.url, "--credentials", str(fed.tmp / "state" / "operator")]
    r = await _cli("federation", "cluster", "list", *op)
    assert r.returncode == 0, r.stderr
    assert "east-1" in r.stdout and "us-west/a" in r.stdout and "seq 1, 1 CA(s)" in r.stdout
    r = await _cli("federation", "cluster", "remove", "east-1", *op)
    assert r.returncode == 2 and "--yes" in r.stderr
    r = await _cli("federation", "cluster", "remove", "east-1", "--yes", *op)
    assert r.returncode == 0, r.stderr
    assert "removed cluster east-1" in r.stdout
    r = await _cli("federation", "cluster", "remove", "east-1", "--yes", *op)
    assert r.returncode == 1 and "no cluster named 'east-1'" in r.stderr
    r = await _cli("federation", "cluster", "list", "--json", *op)
    assert [c["CLUSTER"] for c in json.loads(r.stdout)] == ["west-1"]
