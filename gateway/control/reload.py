"""Live reload of the config: what the gateway says about it, and the file watch that starts it.

A reload is started by a change to the gateway file or a service file (`watch_config`: inotify
through watchfiles, or polling) or by SIGHUP; Gateway.reload (runtime.py) reads and validates
everything, asks gateway/core/reconcile.py what changed and applies it. `ConfigReloads` keeps
the record of it for /status, /metrics and the log:

- `version` counts the configs applied (1: the one the gateway started with) and `fingerprint`
  names the content of the last good one (a hash of its services and policy);
- each reload ends `applied`, `unchanged` (nothing that matters differed) or `refused` (a
  problem in any file, or an added listener that cannot be bound): a refused reload changes
  nothing, the last good version keeps serving, and its problems stay in /status
  (`last_error`) until a later reload is applied;
- `restart_needed` names gateway-file fields that differ from the running ones; they take
  effect on a restart only (`isthmus gateway run --takeover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from watchfiles import awatch

from gateway.config.files import may_be_read, watched_dirs
from gateway.config.values import GatewayConfig
from gateway.core.reconcile import ConfigChanges

log = logging.getLogger("isthmus.gateway.config")

RESULTS = ("applied", "unchanged", "refused")
MAX_LOGGED_PROBLEMS = 20  # a refused reload logs at most this many problem lines


def fingerprint(cfg: GatewayConfig) -> str:
    """A short name for the content of a config's services and policy (frozen values: their
    repr is stable)."""
    text = repr((cfg.exports, cfg.imports, cfg.policy, cfg.service_files))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ConfigReloads:
    """The record of reloads (one per process)."""

    def __init__(self, cfg: GatewayConfig, wall: Callable[[], float]) -> None:
        self.wall = wall
        self.version = 1
        self.fingerprint = fingerprint(cfg)
        self.loaded_at = wall()
        self.files = [str(cfg.source), *map(str, cfg.service_files)]
        self.counts = dict.fromkeys(RESULTS, 0)
        self.last: dict[str, Any] | None = None  # result, trigger, at, summary
        self.last_error: list[str] | None = None
        self.restart_needed: tuple[str, ...] = ()

    def refused(self, trigger: str, problems: list[str]) -> None:
        self.counts["refused"] += 1
        self.last = {"result": "refused", "trigger": trigger, "at": self.wall(),
                     "summary": f"{len(problems)} problem(s)"}
        self.last_error = problems
        log.warning("config reload (%s) refused, %d problem(s); version %d (%s) keeps serving",
                    trigger, len(problems), self.version, self.fingerprint)
        for p in problems[:MAX_LOGGED_PROBLEMS]:
            log.warning("config reload refused: %s", p)
        if len(problems) > MAX_LOGGED_PROBLEMS:
            log.warning("config reload refused: ... and %d more (isthmus config validate)",
                        len(problems) - MAX_LOGGED_PROBLEMS)

    def unchanged(self, trigger: str) -> None:
        self.counts["unchanged"] += 1
        self.last = {"result": "unchanged", "trigger": trigger, "at": self.wall(),
                     "summary": "no change"}
        self.last_error = None
        log.debug("config reload (%s): nothing changed", trigger)

    def applied(self, trigger: str, cfg: GatewayConfig, changes: ConfigChanges) -> None:
        self.counts["applied"] += 1
        self.version += 1
        self.fingerprint = fingerprint(cfg)
        self.loaded_at = self.wall()
        self.files = [str(cfg.source), *map(str, cfg.service_files)]
        self.last = {"result": "applied", "trigger": trigger, "at": self.loaded_at,
                     "summary": changes.summary()}
        self.last_error = None
        log.info("config reload (%s) applied: version %d (%s): %s", trigger, self.version,
                 self.fingerprint, changes.summary())

    def needs_restart(self, fields: tuple[str, ...]) -> None:
        if fields and fields != self.restart_needed:
            log.warning("config: %s changed in the gateway file; the running values are kept "
                        "until a restart (isthmus gateway run --takeover)", ", ".join(fields))
        self.restart_needed = fields

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "loaded_at": self.loaded_at,
            "files": self.files,
            "reloads": dict(self.counts),
            "last_reload": self.last,
            "last_error": self.last_error,
            "restart_needed": list(self.restart_needed),
        }


async def watch_config(cfg: Callable[[], GatewayConfig],
                       reload: Callable[[str], Awaitable[Any]]) -> None:
    """Reload on every change that can change what the config reads, until cancelled. `cfg()`
    is the running config: after each reload the watched directories follow it (a new glob
    match, another services_dir)."""
    mode = cfg().reload.watch
    if mode == "sighup":
        return
    polling = mode == "poll"
    while True:
        running = cfg()
        watched = watched_dirs(running.services_dir, running.source, running.service_files)
        dirs = sorted(d for d in watched if d.is_dir())  # a directory made later: on SIGHUP
        changed = False
        try:
            if polling:
                await _poll(running, dirs)
                changed = True
            else:
                watch = awatch(*dirs, recursive=False,
                               debounce=max(1, int(running.reload.debounce * 1000)), step=50)
                async with contextlib.aclosing(watch):  # closed (its thread ends) on break
                    async for events in watch:
                        paths = {Path(p) for _, p in events}
                        if paths & watched or any(
                                may_be_read(p, running.services_dir, running.source,
                                            running.service_files) for p in paths):
                            changed = True
                            break
        except (OSError, RuntimeError) as e:
            if polling or mode == "inotify":
                log.error("config watch failed (%s); reload with SIGHUP", e)
                return
            log.warning("config watch: inotify failed (%s); polling every %gs instead", e,
                        running.reload.poll_interval)
            polling = True
            continue
        if changed:
            await reload("file change")



async def _poll(cfg: GatewayConfig, dirs: list[Path]) -> None:
    """Return once a file that may be read appeared, went or changed (mtime, size, inode:
    a file replaced by a rename within the same second is a change too), looking every
    reload.poll_interval; then wait reload.debounce for the rest of the burst."""
    def look() -> dict[Path, tuple[int, int, int]]:
        out = {}
        for d in dirs:
            try:
                for p in d.iterdir():
                    if may_be_read(p, cfg.services_dir, cfg.source, cfg.service_files):
                        st = p.stat()
                        out[p] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue
        return out

    before = await asyncio.to_thread(look)
    while await asyncio.to_thread(look) == before:
        await asyncio.sleep(cfg.reload.poll_interval)
    await asyncio.sleep(cfg.reload.debounce)
