"""Failover time: from an endpoint's death to the first connection served by the next tier.

Topology: the demo's (isthmus.demo.start_topology) with one change to east-1's config: its
export `echo` has a single endpoint (ep1), so killing it empties east-1's own tier and traffic
must move to the next tier, east-2 (same region, other zone). Backends are the demo's echo
backends (they answer a line with their cluster's name). To keep the ≥ 20 kill/restore
cycles short, failback_after is 500ms and the outlier ejection base/max 500ms/1s (these only
affect how fast traffic comes *back*, not the failover being measured).

A client opens a new connection to east-1's import listener every 5 ms (concurrently, each
bounded by a 3 s timeout) and records when it finished and who served it. Per kill:
  refused    the backend's listener is closed and its open connections reset
  blackholed the same, then a listen(0) socket takes the port and its accept queue is filled
             with one never-accepted connection, so further SYNs are dropped (no RST): a
             connect can only time out (checked before the first kill)
failover time = (end of the first connection served by east-2 after the kill) - (kill time).
Failed connections = connections that ended without an answer between the kill and restore.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import isthmus.demo as demo
from isthmus.demo import Backends, Processes, one_connection, paced, ports

OFFSET = 8400  # ports 23501..26702 (tests use 15xxx-22999; keep below 32768)
PACE = 0.005


class Blackhole:
    """A listening socket that never accepts, its one-slot queue filled: SYNs get no answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(0)
        self.filler = socket.socket()
        self.filler.setblocking(False)
        self.filler.connect_ex(("127.0.0.1", port))

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


def verify_blackhole(port: int) -> str:
    bh = Blackhole(port)
    try:
        time.sleep(0.05)
        probe = socket.socket()
        probe.settimeout(1.0)
        t = time.monotonic()
        try:
            probe.connect(("127.0.0.1", port))
            return "NOT verified: a connect to the filled listen(0) socket succeeded"
        except TimeoutError:
            took = time.monotonic() - t
            return f"verified: a connect to the filled listen(0) socket timed out after {took:.1f}s"
        except OSError as e:
            return f"NOT verified: connect failed with {e}"
        finally:
            probe.close()
    finally:
        bh.close()


def edit_config(name: str, cfg: dict) -> None:
    """The demo's config of `name`, changed as the module docstring says."""
    cfg["outlier_detection"].update({"base_ejection": "500ms", "max_ejection": "1s"})
    cfg["imports"][0]["failover"]["failback_after"] = "500ms"
    if name == "east-1":
        cfg["exports"][0]["endpoints"] = cfg["exports"][0]["endpoints"][:1]


async def run(state: Path, kills: int, log: Any) -> dict[str, dict]:
    (state / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(state / "logs")
    e1, e2 = ports(OFFSET, 0), ports(OFFSET, 1)
    be1 = Backends("east-1", [e1["ep1"]])
    be2 = Backends("east-2", [e2["ep1"], e2["ep2"]])
    results: list[tuple[float, str | None]] = []  # (end time, who)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def one() -> None:
        who = await one_connection(e1["import"], 3.0)
        results.append((loop.time(), who))

    async def serving(who: str, since: float, n: int = 3, timeout: float = 15.0) -> bool:
        end = loop.time() + timeout
        while loop.time() < end:
            recent = [w for t, w in results if t >= since][-n:]
            if len(recent) == n and all(w == who for w in recent):
                return True
            await asyncio.sleep(0.05)
        return False

    out: dict[str, dict] = {}
    await be2.start()
    await demo.start_topology(state, OFFSET, procs, {"east-1": be1}, edit=edit_config)
    drive = asyncio.create_task(paced(one, PACE, stop))
    try:
        note = verify_blackhole(e1["ep2"])  # same kind of port, not in use by anything
        log(f"failover: blackhole {note}")
        for mode in ("refused", "blackholed"):
            times: list[float] = []
            failed: list[int] = []
            for k in range(kills):
                if not await serving("east-1", loop.time()):
                    raise RuntimeError(
                        f"failover {mode} #{k}: traffic did not return to east-1 within 15 s"
                    )
                await asyncio.sleep(0.2)
                t_death = loop.time()
                await be1.stop()
                bh = Blackhole(e1["ep1"]) if mode == "blackholed" else None
                first = None
                limit = t_death + 10.0
                while first is None and loop.time() < limit:
                    await asyncio.sleep(0.002)
                    first = next((t for t, w in results if t >= t_death and w == "east-2"), None)
                await asyncio.sleep(0.3)
                t_restore = loop.time()
                if bh is not None:
                    bh.close()
                await be1.start()
                if first is None:
                    raise RuntimeError(
                        f"failover {mode} #{k}: no connection served by east-2 within 10 s"
                    )
                times.append((first - t_death) * 1000)
                failed.append(sum(1 for t, w in results if t_death <= t < t_restore and w is None))
                del results[: max(0, len(results) - 200)]
            out[mode] = {
                "kills": kills,
                "median_ms": statistics.median(times),
                "max_ms": max(times),
                "min_ms": min(times),
                "failed_total": sum(failed),
                "failed_max_per_kill": max(failed),
                "blackhole_check": note if mode == "blackholed" else "",
            }
            log(
                f"failover {mode}: median {out[mode]['median_ms']:.1f} ms, "
                f"max {out[mode]['max_ms']:.1f} ms, "
                f"{sum(failed)} failed connections over {kills} kills"
            )
    finally:
        stop.set()
        await drive
        procs.stop()
        await be1.stop()
        await be2.stop()
    return out
