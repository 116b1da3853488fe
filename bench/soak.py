"""Chaos soak: steady traffic across the demo topology while a seeded schedule breaks things;
every failed connection must be explained by the schedule.

`python -m bench.soak --minutes N [--seed S] [--json FILE]` (exit 0 when nothing is unexplained)

Topology: the demo's (isthmus.demo.start_topology: a federation, east-1 and east-2 in us-east,
west-1 in us-west, edge-1 in eu-west importing only), real processes, with SVIDs of 1 minute
(`identity.svid_ttl: 1m`: every gateway rotates its SVID every 30 s during the soak) and a 1 s
bundle refresh hint (so `isthmus identity rotate-ca --overlap 3s` is allowed).

Traffic, all through the import listeners of east-1 (which prefers its own endpoints) and of
edge-1 (which has none: every connection crosses to another gateway):
* new connections, `RATE` per second in all, alternating between the two, each sending one
  numbered line and reading the answer within 3 s;
* `LONG_LIVED` long-lived connections (half through each), each sending a line every 0.5 s
  and reading the answer within 3 s; one that fails is reopened.

Schedule (random.Random(seed)): one event at a time, 1.5-3 s apart, each one of
    endpoints    a cluster's echo backends stopped (listeners closed, connections reset),
                 restored 2-4 s later
    sigstop      a gateway SIGSTOPped for 1-2.5 s, then SIGCONT
    sigkill      a gateway SIGKILLed, restarted 0.5-2 s later (same config and state dir)
    federation   the federation SIGKILLed, restarted 1-3 s later
    rotate-ca    `isthmus identity rotate-ca --overlap 3s` of a gateway (a CA rotation)
    drill        a blackhole drill of a region (1 s baseline, 3 s fault, 1 s settle)

Explaining a failure. A failed new connection is the window [start, end] of that connection; a
failed long-lived one is the window [end of its last good exchange, failure] (what was in
flight when it broke). A failure is explained, in this order, when
    backend      its line was on a backend when `endpoints` reset it (the backend's record)
    own gateway  the gateway it connected to (east-1 or edge-1) was SIGKILLed and not ready
                 yet, or SIGSTOPped, at some point of the window
    in flight    a `sigkill` or `sigstop` of any gateway began inside the window (a stream
                 carried by that process when it died or froze)
    certificate  (long-lived only) a gateway closed a link because a certificate of it expired
                 inside the window: its log line "closed now (peer-cert-expired)" or
                 "(own-cert-expired)": N stream(s) reset", read from the gateways' logs after
                 the run, on the wall clock like the failure's own window; each such line
                 explains at most its N streams. By design a stream outlives the replacement of
                 its link but not the link's certificates (gateway/core/links.py): with
                 1-minute SVIDs a stream may be cut after ~30 s (less on a link dialled just as
                 the peer's certificate passed its half-life), with the default 24 h ones ~12 h
Anything else is `unexplained` and fails the soak: a failure the gateways should have
avoided (a federation outage, a rotation, a drill, or a new connection after a peer died
are all things the gateways must route around). The windows are the events' own times, not
a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from isthmus.demo import (
    ALL_CLUSTERS,
    CLUSTERS,
    FED_ADMIN,
    Backends,
    Processes,
    federation_url,
    http_json,
    operator_credentials,
    paced,
    ports,
    start_topology,
)

OFFSET = 9200  # ports 24301..27502 (tests use 15xxx-22999; other benches 8000-8800; < 32768)
RATE = 20.0  # new connections per second, in all
LONG_LIVED = 4
ENTRIES = ("east-1", "edge-1")  # the gateways the clients connect to
GATEWAYS = tuple(name for name, _, _ in CLUSTERS)  # the ones the schedule stops and kills
ACTIONS = (("endpoints", 3), ("sigstop", 2), ("sigkill", 2), ("federation", 2),
           ("rotate-ca", 1), ("drill", 1))
DRILL = {"mode": "blackhole", "duration": "3s", "baseline": "1s", "settle": "1s"}
TIMEOUT = 3.0
SVID_TTL = 60.0  # identity.svid_ttl of every gateway (edit_config)
CERT_CLOSE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* link with cluster "
                        r"'([^']*)' closed now \((?:peer|own)-cert-expired\): (\d+) stream")


def edit_config(name: str, cfg: dict) -> None:
    cfg["identity"] = {"svid_ttl": f"{SVID_TTL:g}s", "bundle_refresh_hint": "1s",
                       "rotation_overlap": "3s"}


@dataclass
class Event:
    kind: str
    target: str
    start: float  # monotonic
    end: float = 0.0  # restored / SIGCONT / restarted process ready / drill over
    down_until: float = 0.0  # sigkill: the restarted process is ready
    note: str = ""
    streams: int = 0  # cert-expired: streams the close reset that no failure was matched to yet


@dataclass
class Failure:
    kind: str  # "new" or "long"
    via: str
    start: float
    end: float
    lines: tuple[str, ...]
    error: str
    cause: str = ""
    opened: float = 0.0  # the connection's open time (long-lived: before `start`)
    wall: tuple[float, float] = (0.0, 0.0)  # start and end on the wall clock (log lines' clock)


@dataclass
class Traffic:
    new_ok: int = 0
    long_exchanges: int = 0
    long_opened: int = 0
    served_by: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)


class Chaos:
    """Runs the seeded schedule against the topology's processes and backends."""

    def __init__(self, state: Path, procs: Processes, backends: dict[str, Backends],
                 rng: random.Random) -> None:
        self.state, self.procs, self.backends, self.rng = state, procs, backends, rng
        self.events: list[Event] = []
        self.restarts = Counter()

    def _popen(self, name: str) -> subprocess.Popen:
        return next(p for n, p in reversed(self.procs.procs) if n.split("#")[0] == name)

    async def _restart(self, name: str, ready_port: int) -> None:
        """Start `name` again with the same arguments (log `name#N.log`), wait for /readyz."""
        old = self._popen(name)
        self.procs.procs = [(n, p) for n, p in self.procs.procs if p is not old]
        self.restarts[name] += 1
        self.procs.start(f"{name}#{self.restarts[name]}", *old.args[3:])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.procs.check()
            try:
                await http_json(ready_port, "/readyz")
                return
            except (OSError, ValueError, TimeoutError):
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} not ready 30 s after its restart")

    @staticmethod
    def _admin(name: str) -> int:
        return ports(OFFSET, [n for n, _, _ in ALL_CLUSTERS].index(name))["admin"]

    async def one(self, kind: str) -> Event:
        rng, now = self.rng, time.monotonic
        if kind == "endpoints":
            name = rng.choice(GATEWAYS)
            ev = Event(kind, name, now())
            await self.backends[name].stop()
            await asyncio.sleep(rng.uniform(2, 4))
            await self.backends[name].start()
        elif kind == "sigstop":
            name = rng.choice(GATEWAYS)
            pid = self._popen(name).pid
            ev = Event(kind, name, now())
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(rng.uniform(1, 2.5))
            finally:
                os.kill(pid, signal.SIGCONT)
        elif kind == "sigkill":
            name = rng.choice(GATEWAYS)
            p = self._popen(name)
            ev = Event(kind, name, now())
            p.kill()
            p.wait(10)
            await asyncio.sleep(rng.uniform(0.5, 2))
            await self._restart(name, self._admin(name))
            ev.down_until = now()
        elif kind == "federation":
            p = self._popen("federation")
            ev = Event(kind, "federation", now())
            p.kill()
            p.wait(10)
            await asyncio.sleep(rng.uniform(1, 3))
            await self._restart("federation", FED_ADMIN + OFFSET)
        elif kind == "rotate-ca":
            name = rng.choice(GATEWAYS)
            ev = Event(kind, name, now())
            out = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "isthmus.cli", "identity", "rotate-ca", "--config",
                str(self.state / f"{name}.yaml"), "--overlap", "3s"],
                capture_output=True, text=True, timeout=30)
            said = " ".join((out.stdout + out.stderr).split())
            ev.note = f"exit {out.returncode}: {said[-160:]}"
        else:
            from isthmus.drill import open_client

            region = rng.choice(["us-east", "us-west"])
            ev = Event(kind, region, now())
            async with open_client(federation_url(OFFSET), operator_credentials(self.state)) as c:
                try:
                    drill = await c.create_drill({"scope": {"region": region}, **DRILL})
                    ev.note = f"drill {drill.id}"
                except Exception as e:  # a refused drill is noted, not a crash of the soak
                    ev.note = f"refused: {e}"
            await asyncio.sleep(5.5)  # baseline + fault + settle
        ev.end = now()
        self.events.append(ev)
        return ev

    async def run(self, stop: asyncio.Event, log) -> None:
        kinds = [k for k, w in ACTIONS for _ in range(w)]
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.rng.uniform(1.5, 3))
                return
            except TimeoutError:
                pass
            ev = await self.one(self.rng.choice(kinds))
            log(f"  {ev.kind:<10} {ev.target:<10} {ev.end - ev.start:5.1f} s {ev.note}")


class Clients:
    """New and long-lived connections through the entry gateways' import listeners."""

    def __init__(self, traffic: Traffic) -> None:
        self.t = traffic
        self.numbers = iter(range(1, 1 << 62))

    @staticmethod
    def port(via: str) -> int:
        return ports(OFFSET, [n for n, _, _ in ALL_CLUSTERS].index(via))["import"]

    async def new(self, via: str) -> None:
        line = f"new {next(self.numbers)}"
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port(via)), TIMEOUT)
        except (OSError, TimeoutError) as e:
            self.t.failures.append(Failure("new", via, t0, time.monotonic(), (line,),
                                           f"connect: {type(e).__name__}: {e}"))
            return
        try:
            writer.write(f"{line}\n".encode())
            who = (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode().strip()
            if not who:
                raise ConnectionError("closed without an answer")
            self.t.new_ok += 1
            self.t.served_by[who] += 1
        except (OSError, TimeoutError, ConnectionError) as e:
            self.t.failures.append(Failure("new", via, t0, time.monotonic(), (line,),
                                           f"{type(e).__name__}: {e}"))
        finally:
            writer.close()

    async def long_lived(self, via: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port(via)), TIMEOUT)
            except (OSError, TimeoutError) as e:
                self.t.failures.append(Failure("long", via, t0, time.monotonic(), (),
                                               f"connect: {type(e).__name__}: {e}"))
                await asyncio.sleep(0.2)
                continue
            self.t.long_opened += 1
            last_ok, last_ok_wall, prev, line = t0, time.time(), "", ""
            try:
                while not stop.is_set():
                    prev, line = line, f"long {next(self.numbers)}"
                    writer.write(f"{line}\n".encode())
                    who = (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode().strip()
                    if not who:
                        raise ConnectionError("closed without an answer")
                    last_ok, last_ok_wall = time.monotonic(), time.time()
                    self.t.long_exchanges += 1
                    await asyncio.sleep(0.5)
            except (OSError, TimeoutError, ConnectionError) as e:
                self.t.failures.append(Failure("long", via, last_ok, time.monotonic(),
                                               (line, prev), f"{type(e).__name__}: {e}",
                                               opened=t0, wall=(last_ok_wall, time.time())))
                await asyncio.sleep(0.2)
            finally:
                writer.close()


def explain(f: Failure, events: list[Event], backends: dict[str, Backends]) -> str:
    """The cause of one failure (see the module docstring), or "unexplained"."""
    for name, b in backends.items():
        if any(line and line in b.killed for line in f.lines):
            return f"backend: in flight on {name}'s killed backend"
    for ev in events:  # reset by a backend's kill before its line arrived (counted, not named)
        b = backends.get(ev.target)
        if (ev.kind == "endpoints" and f.start <= ev.start <= f.end and b is not None
                and b.killed_unread > 0):
            b.killed_unread -= 1
            return f"backend: in flight on {ev.target}'s killed backend (line not read yet)"
    for ev in events:
        if ev.target != f.via:
            continue
        if ev.kind == "sigkill" and f.start <= ev.down_until and f.end >= ev.start:
            return f"own gateway: {f.via} SIGKILLed, restarting"
        if ev.kind == "sigstop" and f.start <= ev.end and f.end >= ev.start:
            return f"own gateway: {f.via} SIGSTOPped"
    for ev in events:
        if ev.kind in ("sigkill", "sigstop") and f.start <= ev.start <= f.end:
            how = "SIGKILLed" if ev.kind == "sigkill" else "SIGSTOPped"
            return f"in flight: through {ev.target} when it was {how}"
    for ev in events:
        if (ev.kind == "cert-expired" and f.kind == "long" and ev.streams > 0
                and f.wall[0] - LOG_MS <= ev.start <= f.wall[1]):
            ev.streams -= 1
            return "certificate: its link was closed at a certificate's expiry"
    return "unexplained"


LOG_MS = 0.001  # log lines carry the wall clock truncated to the millisecond


def cert_closes(state: Path) -> list[Event]:
    """Links the gateways closed at a certificate's expiry, from their logs: events on the wall
    clock (compared with a failure's `wall` window, never mapped to the monotonic clock)."""
    out = []
    for log in sorted(state.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = CERT_CLOSE.match(line)
            if m:
                at = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
                out.append(Event("cert-expired", log.stem.split("#")[0], at, at,
                                 note=f"link with {m[3]}", streams=int(m[4])))
    return out


async def soak(state: Path, minutes: float, seed: int, log=print) -> dict:
    """Run the soak; returns the report (a JSON-able dict; `unexplained` must be 0)."""
    rng = random.Random(seed)
    procs = Processes(state)
    backends = {name: Backends(name, [ports(OFFSET, i)["ep1"], ports(OFFSET, i)["ep2"]])
                for i, (name, _, _) in enumerate(CLUSTERS)}
    traffic = Traffic()
    chaos = Chaos(state, procs, backends, rng)
    stop = asyncio.Event()
    clients = Clients(traffic)
    t_start = time.monotonic()
    try:
        await start_topology(state, OFFSET, procs, backends, edit=edit_config)
        log(f"soak: topology up in {time.monotonic() - t_start:.1f} s; {minutes:g} min of "
            f"traffic ({RATE:g} new conn/s, {LONG_LIVED} long-lived) under chaos (seed {seed})")
        t0 = time.monotonic()
        turn = iter(range(1 << 62))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(paced(lambda: clients.new(ENTRIES[next(turn) % 2]), 1 / RATE, stop,
                                 limit=minutes * 60 + 60))
            for i in range(LONG_LIVED):
                tg.create_task(clients.long_lived(ENTRIES[i % 2], stop))
            chaos_task = tg.create_task(chaos.run(stop, log))
            await asyncio.sleep(minutes * 60)
            stop.set()
            await chaos_task
        seconds = time.monotonic() - t0
    finally:
        for _, p in procs.procs:  # nothing stays stopped
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        procs.stop()
        for b in backends.values():
            await b.stop()
        await asyncio.sleep(0.2)  # their handlers end (reset connections) before the loop does
    expiries = cert_closes(state)
    for f in traffic.failures:
        f.cause = explain(f, chaos.events + expiries, backends)
    causes = Counter(f.cause for f in traffic.failures)
    unexplained = [f for f in traffic.failures if f.cause == "unexplained"]

    def rel(f: Failure) -> dict:
        d = asdict(f)
        d["start"], d["end"] = round(f.start - t0, 3), round(f.end - t0, 3)
        return d

    return {
        "seed": seed, "minutes": minutes, "seconds": round(seconds, 1),
        "new_connections": traffic.new_ok + sum(f.kind == "new" for f in traffic.failures),
        "new_served": traffic.new_ok, "served_by": dict(traffic.served_by),
        "long_lived_opened": traffic.long_opened, "long_lived_exchanges": traffic.long_exchanges,
        "events": Counter(e.kind for e in chaos.events),
        "links_closed_at_certificate_expiry": len(expiries),
        "event_log": [{**asdict(e), "start": round(e.start - t0, 3), "end": round(e.end - t0, 3),
                       "down_until": round(e.down_until - t0, 3) if e.down_until else None}
                      for e in chaos.events],
        "failures": len(traffic.failures), "failures_by_cause": dict(causes.most_common()),
        "unexplained": len(unexplained), "unexplained_first": [rel(f) for f in unexplained[:20]],
    }


def render(r: dict) -> str:
    lines = [f"soak: {r['seconds']} s, seed {r['seed']}: {r['new_connections']} new connections "
             f"({r['new_served']} served: {r['served_by']}), {r['long_lived_opened']} long-lived "
             f"connections with {r['long_lived_exchanges']} exchanges",
             f"events: {dict(r['events'])}",
             f"failures: {r['failures']}, by cause:"]
    lines += [f"  {n:>6}  {cause}" for cause, n in r["failures_by_cause"].items()]
    lines.append(f"unexplained (the gateways should have avoided them): {r['unexplained']}")
    lines += [f"  {f['kind']} via {f['via']} {f['start']}..{f['end']} s: {f['error']}"
              for f in r["unexplained_first"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--keep", type=Path, help="state dir to use and keep (logs); default: a "
                                             "temporary one, removed")
    args = p.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(args.keep, args.minutes, args.seed))
    else:
        with tempfile.TemporaryDirectory(prefix="isthmus-soak-") as tmp:
            report = asyncio.run(soak(Path(tmp), args.minutes, args.seed))
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["unexplained"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
