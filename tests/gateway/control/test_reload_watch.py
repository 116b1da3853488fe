"""gateway/control/reload.py: the file watch sees the changes that matter (real files, inotify
and polling) and ConfigReloads keeps the record /status and /metrics show."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config.schema import load_config
from gateway.config.values import ReloadConfig
from gateway.control.reload import ConfigReloads, fingerprint, watch_config
from gateway.core.reconcile import reconcile
from tests.gateway.config.samples import cfg


def _setup(tmp: Path, watch: str) -> Path:
    (tmp / "services").mkdir()
    (tmp / "services" / "a.yaml").write_text("imports: []\n")
    gw = tmp / "gw.yaml"
    gw.write_text(cfg("services_dir: services\n"
                      f"reload:\n  watch: {watch}\n  poll_interval: 100ms\n  debounce: 20ms\n"))
    return gw


async def _triggers(gw: Path, act, settle: float = 0.6) -> list[str]:
    """Run the watch, do `act()` once it is watching, and return the reloads it asked for."""
    seen: list[str] = []
    running = load_config(gw)

    async def reload(trigger: str) -> None:
        seen.append(trigger)

    task = asyncio.create_task(watch_config(lambda: running, reload))
    try:
        await asyncio.sleep(0.4)  # the watch is set up
        act()
        await asyncio.sleep(settle)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen


@pytest.mark.parametrize("mode", ["inotify", "poll"])
async def test_a_changed_service_file_reloads(tmp_path, mode):
    gw = _setup(tmp_path, mode)
    tmp = tmp_path / "services" / ".a.yaml.tmp"

    def deploy() -> None:  # write whole and rename, as deploy tools do
        tmp.write_text("imports: []\nexports: []\n")
        os.replace(tmp, tmp_path / "services" / "a.yaml")

    assert await _triggers(gw, deploy) == ["file change"]


@pytest.mark.parametrize("mode", ["inotify", "poll"])
async def test_a_new_service_file_and_the_gateway_file_reload(tmp_path, mode):
    gw = _setup(tmp_path, mode)
    assert await _triggers(gw, lambda: (tmp_path / "services" / "b.yml").write_text(
        "imports: []\n")) \
        == ["file change"]
    assert await _triggers(gw, lambda: gw.write_text(gw.read_text() + "\n")) == ["file change"]


async def test_files_that_are_not_read_do_not_reload(tmp_path):
    gw = _setup(tmp_path, "inotify")

    def noise() -> None:
        (tmp_path / "services" / "notes.txt").write_text("x")
        (tmp_path / "services" / ".a.yaml.swp").write_text("x")
        (tmp_path / "other.yaml").write_text("x")

    assert await _triggers(gw, noise) == []


async def test_watch_sighup_never_reloads_on_files(tmp_path):
    gw = _setup(tmp_path, "sighup")
    assert await _triggers(gw, lambda: (tmp_path / "services" / "a.yaml").write_text(
        "exports: []\n")) == []


def test_the_record_of_reloads():
    now = [100.0]
    a = load_config_text(cfg())
    rec = ConfigReloads(a, lambda: now[0])
    assert rec.status()["version"] == 1 and rec.status()["last_reload"] is None
    rec.refused("SIGHUP", ["svc.yaml:3: imports[0].listen: bad"])
    st = rec.status()
    assert st["version"] == 1 and st["reloads"]["refused"] == 1
    assert st["last_error"] == ["svc.yaml:3: imports[0].listen: bad"]
    b = replace(a, reload=ReloadConfig(drain_timeout=5.0))
    now[0] = 200.0
    rec.applied("file change", b, reconcile(a, b))
    st = rec.status()
    assert st["version"] == 2 and st["last_error"] is None and st["loaded_at"] == 200.0
    assert st["last_reload"] == {"result": "applied", "trigger": "file change", "at": 200.0,
                                 "summary": "no service changed"}
    rec.needs_restart(("limits",))
    assert rec.status()["restart_needed"] == ["limits"]
    assert fingerprint(a) == fingerprint(b)  # the drain time is not content that serves


def load_config_text(text: str):
    from gateway.config.schema import parse_config
    from tests.gateway.config.samples import SRC
    return parse_config(text, SRC)
