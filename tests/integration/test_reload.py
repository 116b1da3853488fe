"""Live reload of service files with real processes, under a steady stream of new connections
and a set of long-lived ones (README.md, "Config files by role").

east-1's gateway file names `services_dir: services` with guard rails; the test writes service
files there and the gateway reloads on the file change (inotify) or on SIGHUP. west-1 exports
`web` (its backends) and imports `api`, which nobody exports until east-1's service file does.
Throughout, 50 new connections per second go to east-1's inline `echo` import and three
long-lived connections chatter on it: a reload must fail none of them and drop none.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.helpers.backends import Backend
from tests.helpers.processes import free_port, run_cli
from tests.helpers.traffic import LoadStream, chatter, metric_value, request, wait_for
from tests.integration.harness import Topology, running

pytestmark = pytest.mark.integration

DRAIN = 2.0  # reload.drain_timeout of east-1

TOP = f"""\
services_dir: services

policy:
  namespaces:
    "services/*": [default]
  import_listen: [127.0.0.0/8]
  max_endpoints: 4

reload:
  debounce: 50ms
  drain_timeout: {DRAIN:g}s
"""


def import_text(name: str, port: int, tiers: str = "[any]", attempts: int = 4) -> str:
    return (f"  - name: {name}\n    namespace: default\n    listen: 127.0.0.1:{port}\n"
            f"    failover:\n      tiers: {tiers}\n      max_attempts: {attempts}\n")


def export_text(name: str, backends: list[Backend], namespace: str = "default") -> str:
    eps = "".join(f"      - {b.address}\n" for b in backends)
    return (f"  - name: {name}\n    namespace: {namespace}\n    port: 8080\n    endpoints:\n{eps}"
            "    health_check:\n      kind: tcp\n      interval: 200ms\n      timeout: 150ms\n")


class Steady:
    """The traffic every reload must leave alone: 50 new conn/s and 3 long-lived connections on
    east-1's echo import."""

    def __init__(self, port: int, seconds: float) -> None:
        self.stream = LoadStream(port, rate=50, max_seconds=seconds, max_count=int(seconds * 50))
        self.stop = asyncio.Event()
        self.logs: list[list[tuple[float, str | None]]] = [[], [], []]
        self.port = port
        self.tasks: list[asyncio.Task] = []

    def start(self) -> Steady:
        self.stream.start()
        self.tasks = [asyncio.create_task(chatter(self.port, self.stop, log)) for log in self.logs]
        return self

    async def finish(self) -> None:
        await self.stream.stop()
        self.stop.set()
        await asyncio.gather(*self.tasks)
        print(f"\nsteady: {len(self.stream.done())} new connections, "
              f"{len(self.stream.failed)} failed; long-lived: "
              f"{[len(log) for log in self.logs]} replies")
        assert not self.stream.failed, [c.error for c in self.stream.failed][:5]
        for log in self.logs:
            bad = [r for _, r in log if r != "east-1"]
            assert log and not bad, f"a long-lived connection was disturbed: {bad[:3]}"


class Reloads:
    """east-1's config state in /status, and a way to wait for the next reload."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.dir = topo.nodes["east-1"].dir / "services"

    async def config(self) -> dict:
        return (await self.topo.status("east-1"))["config"]

    async def count(self) -> int:
        return sum((await self.config())["reloads"].values())

    async def after(self, change, timeout: float = 5.0) -> dict:
        """Do `change()` and wait until east-1 has finished one more reload; its config."""
        before = await self.count()
        change()
        await wait_for(lambda: self._more(before), timeout, what="east-1 to reload")
        return await self.config()

    async def _more(self, before: int) -> bool:
        return await self.count() > before

    def write(self, name: str, text: str) -> None:
        """Write a service file whole, as a deploy tool does (a temporary file, renamed)."""
        replace_file(self.dir / name, text)

    def sighup(self) -> None:
        os.kill(self.topo.nodes["east-1"].proc.pid, signal.SIGHUP)


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def answered(port: int, timeout: float = 1.0) -> str | None:
    try:
        return await request(port, "ping", timeout)
    except (OSError, TimeoutError, ConnectionError):
        return None


@pytest.fixture
async def topo(tmp_path, request):
    t = Topology(tmp_path / "topo", top={"east-1": TOP},
                 extra_imports={"west-1": [("api", free_port())]})
    t.add_service("web", "west-1", ())
    async with running(t, request):
        yield t


async def test_imports_appear_drain_and_follow_a_new_policy(topo: Topology):
    """Add an import (its listener appears), change its failover policy (new connections follow
    it at once, open ones go on), remove it (no new connections; open ones last the drain time,
    then are closed); the other listeners and the steady traffic are untouched."""
    r, web = Reloads(topo), free_port()
    steady = Steady(topo.nodes["east-1"].import_port, 30).start()
    try:
        assert await answered(web) is None
        t0 = time.monotonic()
        cfg = await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("web", web)))
        assert cfg["last_reload"]["result"] == "applied", cfg
        assert "imports +default/web" in cfg["last_reload"]["summary"]
        await wait_for(lambda: _is(answered(web), "west-1"), 5.0, what="web to be served")
        print(f"\nimport added: served through its new listener {time.monotonic() - t0:.2f} s "
              "after the file was written")

        held: list[tuple[float, str | None]] = []
        stop_held = asyncio.Event()
        holder = asyncio.create_task(chatter(web, stop_held, held))
        await wait_for(lambda: _true(held), 3.0, what="the long-lived web connection")

        # tiers [cluster, region]: west-1 is in neither, so a new connection finds no target
        cfg = await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text(
            "web", web, tiers="[cluster, region]")))
        assert "imports ~default/web" in cfg["last_reload"]["summary"], cfg
        assert await answered(web) is None, "a new connection ignored the new failover policy"
        n = len(held)
        await asyncio.sleep(0.6)
        assert len(held) > n and held[-1][1] == "west-1", "an open connection was touched"
        cfg = await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("web", web)))
        await wait_for(lambda: _is(answered(web), "west-1"), 3.0, what="web to be served again")

        t1 = time.monotonic()
        cfg = await r.after(lambda: r.write("team-a.yaml", "imports: []\n"))
        assert "imports -default/web" in cfg["last_reload"]["summary"], cfg
        assert await answered(web, 0.5) is None, "the removed import still accepts"
        n = len(held)
        await asyncio.sleep(DRAIN / 2)
        assert len(held) > n and held[-1][1] == "west-1", "dropped before the drain time"
        await asyncio.wait_for(holder, DRAIN + 4.0)
        lasted = held[-1][0] - t1
        print(f"removed import: its open connection lasted {lasted:.2f} s (drain_timeout "
              f"{DRAIN:g} s), then ended with {held[-1][1]!r}")
        assert held[-1][1] != "west-1" and DRAIN - 0.5 <= lasted <= DRAIN + 3.0
        assert (await topo.status("east-1"))["listeners"].get("import default/web") is None
    finally:
        await steady.finish()


async def test_exports_publish_and_withdraw(topo: Topology):
    """An export added in a service file is seen (and served) by another cluster within the
    watch latency; removed, it is withdrawn there."""
    r = Reloads(topo)
    api_port = topo.extra_imports["west-1"][0][1]
    backends = [Backend("east-1-api", free_port()), Backend("east-1-api", free_port())]
    for b in backends:
        await b.start()
    steady = Steady(topo.nodes["east-1"].import_port, 30).start()
    try:
        assert await answered(api_port) is None
        t0 = time.monotonic()
        await r.after(lambda: r.write("api.yaml", "exports:\n" + export_text("api", backends)))
        await wait_for(lambda: _is(answered(api_port), "east-1-api"), 5.0,
                       what="west-1 to reach east-1's new export")
        print(f"\nexport added: west-1 served by it {time.monotonic() - t0:.2f} s after the write")

        t1 = time.monotonic()
        await r.after(lambda: (r.dir / "api.yaml").unlink())

        async def gone() -> bool:
            st = await topo.status("west-1")
            return not any(t["key"] == "remote:east-1" for imp in st["imports"]
                           if imp["service"] == "default/api" for t in _targets(imp))

        await wait_for(gone, 5.0, what="west-1 to lose east-1's withdrawn export")
        print(f"export removed: gone from west-1's targets {time.monotonic() - t1:.2f} s later")
        assert await answered(api_port) is None
    finally:
        await steady.finish()
        for b in backends:
            await b.close()


async def test_bad_files_are_refused_whole_and_the_last_good_keeps_serving(topo: Topology):
    """A broken file, a service declared in two files and a guard-rail violation are each
    refused whole (FILE:LINE in /status and the metric); what served before still serves;
    a fixed file is applied."""
    r, web, other = Reloads(topo), free_port(), free_port()
    steady = Steady(topo.nodes["east-1"].import_port, 40).start()
    try:
        good_text = "imports:\n" + import_text("web", web)
        await r.after(lambda: r.write("team-a.yaml", good_text))
        await wait_for(lambda: _is(answered(web), "west-1"), 5.0, what="web to be served")
        good = await r.config()

        cases = {
            "broken": ("team-a.yaml", "imports:\n" + import_text("web", web)
                       + f"  - name: more\n    listen: 127.0.0.1:{other}\n    tiers: [any\n",
                       "team-a.yaml:"),
            "duplicate": ("team-b.yaml", "imports:\n" + import_text("web", other),
                          "team-a.yaml"),
            "guard rail": ("team-b.yaml", "exports:\n" + export_text(
                "pay", [Backend("x", free_port())], namespace="payments"), "payments"),
            "listen range": ("team-b.yaml", "imports:\n" + import_text("web2", other).replace(
                "127.0.0.1", "0.0.0.0"), "import_listen"),
        }
        busy = socket.create_server(("127.0.0.1", 0))
        cases["port in use"] = ("team-b.yaml", "imports:\n" + import_text(
            "web2", busy.getsockname()[1]), "imports[0].listen: cannot listen")
        for what, (name, text, expect) in cases.items():
            cfg = await r.after(lambda n=name, t=text: r.write(n, t))
            assert cfg["last_reload"]["result"] == "refused", (what, cfg)
            errors = "\n".join(cfg["last_error"])
            assert name in errors and expect in errors, (what, errors)
            assert cfg["version"] == good["version"] and cfg["fingerprint"] == good["fingerprint"]
            assert await answered(web) == "west-1", f"{what}: the last good import stopped"
            assert await answered(other, 0.5) is None, f"{what}: part of a refused file applied"
            print(f"\n{what}: refused: {cfg['last_error'][0]}")
            if name == "team-b.yaml":
                (r.dir / name).unlink()
            else:
                await r.after(lambda: r.write("team-a.yaml", good_text))
            await wait_for(lambda: _applied_or_unchanged(r), 5.0, what="the fix to be taken")

        busy.close()
        metrics = await topo.metrics("east-1")
        refused = metric_value(metrics, "isthmus_config_reload_total", 'result="refused"')
        assert refused >= len(cases), metrics
        cfg = await r.config()
        assert cfg["last_error"] is None and cfg["restart_needed"] == []
        r2 = run_cli("config", "validate", str(topo.nodes["east-1"].config))
        assert r2.returncode == 0, r2.stdout + r2.stderr
    finally:
        await steady.finish()


async def test_fifty_reloads_in_a_row_fail_nothing(topo: Topology):
    """50 reloads by SIGHUP, each a real change (a failover setting; every fifth one adds or
    removes an import listener): all applied, 0 failed connections, no long-lived one dropped."""
    r, web, extra = Reloads(topo), free_port(), free_port()
    await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("web", web)))
    steady = Steady(topo.nodes["east-1"].import_port, 60).start()
    web_stream = LoadStream(web, rate=20, max_seconds=60, max_count=1200).start()
    began = time.monotonic()
    try:
        before = (await r.config())["reloads"]["applied"]
        for i in range(50):
            text = "imports:\n" + import_text("web", web, attempts=3 + i % 2)
            if (i // 5) % 2:
                text += import_text("extra", extra)
            # the watcher may see the write first; either way the SIGHUP's reload comes after
            await r.after(lambda t=text: (r.write("team-a.yaml", t), r.sighup()))
        await wait_for(lambda: _applied_at_least(r, before + 50), 10.0, what="50 applied reloads")
    finally:
        took = time.monotonic() - began
        await web_stream.stop()
        await steady.finish()
    cfg = await r.config()
    print(f"50 reloads in {took:.1f} s: {cfg['reloads']}; web: {len(web_stream.done())} new "
          f"connections, {len(web_stream.failed)} failed")
    assert cfg["reloads"]["refused"] == 0, cfg
    assert not web_stream.failed, [c.error for c in web_stream.failed][:5]


async def test_sighup_without_change_and_restart_only_fields(topo: Topology):
    """SIGHUP with nothing changed is `unchanged`; a gateway-file field that needs a restart is
    named in /status and the running value kept, while the services still reload."""
    r, web = Reloads(topo), free_port()
    cfg = await r.after(r.sighup)
    assert cfg["last_reload"]["result"] == "unchanged", cfg
    gw = topo.nodes["east-1"].config
    text = gw.read_text()
    cfg = await r.after(lambda: replace_file(gw, text.replace("connect_timeout: 300ms",
                                                              "connect_timeout: 900ms")))
    assert cfg["restart_needed"] == ["limits"], cfg
    cfg = await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("web", web)))
    assert cfg["restart_needed"] == ["limits"], cfg
    assert cfg["last_reload"]["result"] == "applied"
    await wait_for(lambda: _is(answered(web), "west-1"), 5.0, what="web to be served")
    metrics = await topo.metrics("east-1")
    assert metric_value(metrics, "isthmus_config_restart_needed") == 1

    # another service at the same address: the old listener closes before the new one binds
    cfg = await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("api", web)))
    assert cfg["last_reload"]["summary"] == "imports +default/api -default/web", cfg
    listeners = (await topo.status("east-1"))["listeners"]
    assert "import default/api" in listeners and "import default/web" not in listeners


# -- small predicates --------------------------------------------------------------------------

async def _is(coro, value) -> bool:
    return await coro == value


async def _true(items) -> bool:
    return bool(items)


async def _applied_or_unchanged(r: Reloads) -> bool:
    cfg = await r.config()
    return cfg["last_error"] is None


async def _applied_at_least(r: Reloads, n: int) -> bool:
    return (await r.config())["reloads"]["applied"] >= n


def _targets(imp: dict) -> list[dict]:
    return [t for tier in imp.get("tiers", []) for t in tier.get("targets", [])]



async def test_every_worker_follows_a_reload(tmp_path, request):
    """With --workers 2 the primary reloads and tells its worker (SIGHUP): an added import is
    served whichever process the kernel hands a connection to; removed, no process accepts."""
    topo = Topology(tmp_path / "topo", top={"east-1": TOP}, workers={"east-1": 2})
    topo.add_service("web", "west-1", ())
    async with running(topo, request):
        r, web = Reloads(topo), free_port()
        await wait_for(lambda: _workers_up(topo), 10.0, what="east-1's worker to report")
        await r.after(lambda: r.write("team-a.yaml", "imports:\n" + import_text("web", web)))

        async def both_serve() -> bool:
            st = await topo.status("east-1")
            return all((w.get("listeners") or {}).get("import default/web") is not None
                       for w in st["workers"])

        await wait_for(both_serve, 10.0, what="both processes to open the web listener")
        replies = [await answered(web) for _ in range(40)]
        assert replies == ["west-1"] * 40, replies
        served: list[int] = []

        async def counted() -> bool:  # a worker's counters reach the primary every second
            st = await topo.status("east-1")
            served[:] = [w["listeners"]["import default/web"]["accepted"] for w in st["workers"]]
            return sum(served) >= 40

        await wait_for(counted, 5.0, what="both processes' counters")
        print(f"\nweb connections accepted per process after the reload: {served}")
        assert all(served), f"a process did not take connections on the new listener: {served}"

        await r.after(lambda: r.write("team-a.yaml", "imports: []\n"))

        async def none_accepts() -> bool:
            return all([await answered(web, 0.3) is None for _ in range(10)])

        await wait_for(none_accepts, 10.0, what="no process to accept on the removed import")


async def _workers_up(topo: Topology) -> bool:
    st = await topo.status("east-1")
    return len(st["workers"]) == 2 and all(w.get("listeners") for w in st["workers"])
