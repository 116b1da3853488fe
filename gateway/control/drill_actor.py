"""Drills, acted out by one gateway: apply the fault when in scope, probe and report when not.

Theory of operation
-------------------
The federation records drills in the catalog (`catalog/drills/<id>`); every gateway follows the
catalog and decides on its own, from its own wall clock, what a drill asks of it. The decision
is a pure function of (drills, own cluster, own imports, now), at the top of this file:

- `fault_for`: the fault in force here — None, or `Fault(drill, mode, latency, error_rate)` — while
  a *running* drill holds this cluster in scope and `fault_start <= now < fault_end`. A drill
  that became `ended`/`aborted` stops holding at once; the deadline `fault_end` ends it even if
  nobody ever says so (the federation and the CLI may be gone).
- `observations`: what to probe — for every drill that does not hold this cluster and is
  `observing(now)` (from `created_at` to `fault_stop + settle`), the imports of ours among the
  drill's affected services.
- `next_change`: the next instant at which either answer can change without a new catalog
  (a created_at, fault_start, fault_end or observation end still ahead).
- `make_sample`: one per-second sample (the docs/drills.md format) from probe results.

The shell (`DrillActor`, one task in the runtime's TaskGroup) re-decides on every new catalog
(`on_catalog`) and on a timer at `next_change`, so restore happens at the deadline with no
federation and no CLI. It performs what was decided:

- fault: `InboundListener.fault` is set to a `FaultHook` (mode, latency, error_rate, random
  source) or None; the InboundListener (gateway/dataplane/l4.py) consults it on each new OPEN
  and PING (streams already open are never touched). `drain` also withdraws our exports at the
  federation (`Agent.exports_withdrawn`, reconciled and retried by the agent's publish loop) and
  republishes them on restore; `blackhole` and `degrade` leave the exports as they are (stale
  health on purpose: detection must come from probes, timeouts and outlier ejection).
- observing: per (drill, service) a prober opens `probe_rate` synthetic connections per second
  through the import's own Router and the shared Dialer (`dial.connect_first`: the same tiers,
  failover and outlier reporting as real traffic), and closes each as soon as it is connected
  (for a remote target: after OPEN -> OK). A probe that is not connected within PROBE_TIMEOUT
  counts as failed; probes in flight are bounded so a blackhole cannot pile up tasks. Probes
  count in a ListenerStats of their own, so they never show in the listeners' app-traffic
  metrics; they have `isthmus_gateway_drill_probes_total{drill,result}` instead.
- samples: results are bucketed by the whole epoch second the probe *started* in; a second is
  complete when it is over and none of its probes is still in flight (at most PROBE_TIMEOUT
  later). Each complete second becomes one sample, queued (bounded: SAMPLE_BUFFER, oldest
  dropped) and PUT in order; the federation being unreachable (or 5xx) keeps the queue and
  retries with backoff; a 4xx answer (drill unknown, outside its window, ...) drops that sample.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from federation.drill_model import Drill, DrillMode
from federation.errors import FederationError
from federation.model import ServiceKey
from gateway.dataplane.dial import ListenerStats, connect_first

log = logging.getLogger("isthmus.gateway.drill")

PROBE_TIMEOUT = 2.0  # seconds a probe may take (connect incl. OK) before it counts as failed
SAMPLE_BUFFER = 600  # samples kept while the federation is unreachable (oldest dropped)
MAX_WAIT = 5.0  # re-decide at least this often (covers wall-clock jumps)


# ---------------------------------------------------------------------------------------------
# Pure core


@dataclass(frozen=True, slots=True)
class Fault:
    drill: str
    mode: DrillMode
    latency: float = 0.0  # degrade only: added before each OK, seconds
    error_rate: float = 0.0  # degrade only: fraction of OPENs refused
    until: float = 0.0  # the deadline (fault_end), for status


@dataclass(frozen=True, slots=True)
class Observation:
    drill: str
    services: tuple[str, ...]  # "ns/name" of our imports the drill affects
    rate: float  # probes per second per service
    until: float  # fault_stop + settle


def fault_for(drills: Iterable[Drill], cluster: str, now: float) -> Fault | None:
    """The fault this cluster must act out now, or None. The federation refuses overlapping
    drills; should two hold at once anyway, the one that started first wins (deterministic)."""
    holding = [d for d in drills if d.in_scope(cluster) and d.fault_active(now)]
    if not holding:
        return None
    d = min(holding, key=lambda d: (d.fault_start, d.id))
    if d.mode == DrillMode.DEGRADE:
        return Fault(d.id, d.mode, d.latency, d.error_rate, d.fault_end)
    return Fault(d.id, d.mode, 0.0, 0.0, d.fault_end)


def observations(drills: Iterable[Drill], cluster: str, imports: Iterable[str],
                 now: float) -> tuple[Observation, ...]:
    """What this cluster must probe now: per observed drill, our imports among its services."""
    mine = set(imports)
    out = []
    for d in sorted(drills, key=lambda d: d.id):
        if d.in_scope(cluster) or not d.observing(now):
            continue
        services = tuple(sorted(s for s in d.services if s in mine))
        if services:
            out.append(Observation(d.id, services, d.probe_rate, d.fault_stop + d.settle))
    return tuple(out)


def next_change(drills: Iterable[Drill], now: float) -> float | None:
    """The next instant after `now` at which fault_for/observations may answer differently."""
    times = [
        t
        for d in drills
        for t in (d.created_at, d.fault_start, d.fault_end, d.fault_stop + d.settle)
        if t > now
    ]
    return min(times, default=None)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency_ms: float  # from start to connected (or to giving up)
    served: str | None  # cluster that served a successful probe


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[rank - 1]


def make_sample(cluster: str, second: int,
                results: Mapping[str, Sequence[ProbeResult]]) -> dict[str, Any]:
    """One sample in the docs/drills.md format. Latency percentiles are over the *successful*
    probes of that second (null when none succeeded: failures are counted, not timed)."""
    services: dict[str, Any] = {}
    for svc in sorted(results)[:1000]:
        rs = results[svc]
        ok = [r for r in rs if r.ok]
        served: dict[str, int] = {}
        for r in ok:
            if r.served is not None:
                served[r.served] = served.get(r.served, 0) + 1
        lat = [r.latency_ms for r in ok]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        services[svc] = {
            "attempts": len(rs),
            "successes": len(ok),
            "failures": len(rs) - len(ok),
            "latency_p50_ms": None if p50 is None else round(p50, 3),
            "latency_p99_ms": None if p99 is None else round(p99, 3),
            "served": dict(sorted(served.items())[:1000]),
        }
    return {"cluster": cluster, "second": int(second), "services": services}


def probe_limit(rate: float) -> int:
    """Probes of one service allowed in flight: a full PROBE_TIMEOUT of them, plus slack."""
    return min(2000, math.ceil(rate * PROBE_TIMEOUT) + 8)


# ---------------------------------------------------------------------------------------------
# Shell


@dataclass(slots=True)
class FaultHook:
    """What `InboundListener.fault` holds while a drill holds this cluster (read by l4)."""

    mode: DrillMode
    latency: float
    error_rate: float
    random: Callable[[], float]


@dataclass
class _Bucket:
    results: dict[str, list[ProbeResult]] = field(default_factory=dict)
    pending: int = 0


class DrillActor:
    def __init__(
        self,
        cluster: str,
        wall: Callable[[], float],
        mono: Callable[[], float],
        inbound: Any,  # InboundListener (its .fault is set)
        agent: Any,  # Agent (exports_withdrawn, client)
        routers: Mapping[ServiceKey, Any],  # import routers
        dialer: Any,
        random: Callable[[], float],
        observe: bool = True,  # False in extra workers: the primary alone probes and reports
    ) -> None:
        self.cluster = cluster
        self.observe = observe
        self.wall = wall
        self.mono = mono
        self.inbound = inbound
        self.agent = agent
        self.routers = routers
        self.dialer = dialer
        self.random = random
        self.drills: tuple[Drill, ...] = ()
        self.fault: Fault | None = None
        self.observing: tuple[Observation, ...] = ()
        self.stats = ListenerStats()  # probes' own counters (not app traffic)
        self.probes: dict[tuple[str, str], int] = {}  # (drill, ok|failed|skipped) -> count
        # (drill, mode) -> 1 in force / 0 restored
        self.fault_gauge: dict[tuple[str, str], int] = {}
        self.buckets: dict[tuple[str, int], _Bucket] = {}
        self.queue: collections.deque[tuple[str, int, dict]] = collections.deque(
            maxlen=SAMPLE_BUFFER)
        self.sent = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self._queued = asyncio.Event()
        self._probers: dict[tuple[str, str], asyncio.Task] = {}
        self._tg: asyncio.TaskGroup | None = None

    # -- decisions -------------------------------------------------------------------------
    def on_catalog(self, catalog: Any) -> None:
        self.drills = tuple(catalog.drills.values())
        self._wake.set()

    def _imports(self) -> list[str]:
        return [str(s) for s in self.routers]

    def evaluate(self) -> None:
        """Decide from the drills and the clock; perform the difference."""
        now = self.wall()
        fault = fault_for(self.drills, self.cluster, now)
        if fault != self.fault:
            self._apply(fault)
        if not self.observe:
            return
        self.observing = observations(self.drills, self.cluster, self._imports(), now)
        if self._tg is not None:
            for obs in self.observing:
                for svc in obs.services:
                    key = (obs.drill, svc)
                    task = self._probers.get(key)
                    if task is None or task.done():
                        if task is None:
                            log.info("drill %s: probing %s at %g/s until %.0f", obs.drill, svc,
                                     obs.rate, obs.until)
                        self._probers[key] = self._tg.create_task(
                            self._observe(obs.drill, svc, obs.rate))

    def _apply(self, fault: Fault | None) -> None:
        old = self.fault
        self.fault = fault
        if old is not None:
            self.fault_gauge[(old.drill, old.mode)] = 0
            log.info("drill %s: %s fault over; restored", old.drill, old.mode)
        if fault is None:
            self.inbound.fault = None
        else:
            self.fault_gauge[(fault.drill, fault.mode)] = 1
            self.inbound.fault = FaultHook(fault.mode, fault.latency, fault.error_rate, self.random)
            log.warning("drill %s: acting out %s (latency %gs, error rate %g) until %.3f",
                        fault.drill, fault.mode, fault.latency, fault.error_rate, fault.until)
        if len(self.fault_gauge) > 64:  # keep the restored ones of the last few drills only
            restored = [k for k, v in self.fault_gauge.items() if v == 0]
            for key in restored[: len(self.fault_gauge) - 64]:
                del self.fault_gauge[key]
        if self.agent is not None:
            self.agent.set_exports_withdrawn(fault is not None and fault.mode == DrillMode.DRAIN)

    def _wanted(self, drill: str, svc: str) -> bool:
        return any(o.drill == drill and svc in o.services for o in self.observing)

    # -- tasks -----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._flush_loop())
                tg.create_task(self._send_loop())
                while True:
                    self._wake.clear()
                    self.evaluate()
                    nxt = next_change(self.drills, self.wall())
                    delay = (MAX_WAIT if nxt is None
                             else min(MAX_WAIT, max(0.0, nxt - self.wall()) + 0.002))
                    try:
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
        finally:
            self._tg = None
            if self.fault is not None:  # stopping: never leave a fault behind
                self._apply(None)

    async def _observe(self, drill: str, svc: str, rate: float) -> None:
        try:
            await self._observe_loop(drill, svc, rate)
        except Exception:  # a bug here must never take the gateway down
            log.exception("drill %s: prober of %s failed", drill, svc)

    async def _observe_loop(self, drill: str, svc: str, rate: float) -> None:
        """Probe one service at `rate`/s while the drill wants it; then let probes finish."""
        ns, _, name = svc.partition("/")
        key = ServiceKey(ns, name)
        router = self.routers.get(key)
        if router is None:
            return
        limit = probe_limit(rate)
        interval = 1.0 / rate
        inflight = 0
        async with asyncio.TaskGroup() as tg:
            nxt = self.mono()
            while self._wanted(drill, svc):
                if inflight < limit:
                    second = int(self.wall())
                    bucket = self.buckets.setdefault((drill, second), _Bucket())
                    bucket.pending += 1
                    inflight += 1

                    async def one(bucket: _Bucket = bucket) -> None:
                        nonlocal inflight
                        try:
                            r = await self._probe(router, key)
                        finally:
                            inflight -= 1
                            bucket.pending -= 1
                        bucket.results.setdefault(svc, []).append(r)
                        self._count(drill, "ok" if r.ok else "failed")

                    tg.create_task(one())
                else:
                    self._count(drill, "skipped")
                nxt += interval
                delay = nxt - self.mono()
                if delay < -1.0:  # fell behind (suspended loop): do not burst to catch up
                    nxt = self.mono()
                    delay = 0.0
                await asyncio.sleep(max(0.0, delay))

    async def _probe(self, router: Any, key: ServiceKey) -> ProbeResult:
        t0 = self.mono()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                found = await connect_first(router, self.dialer, key, self.stats)
        except TimeoutError:
            found = None
        ms = (self.mono() - t0) * 1000.0
        if found is None:
            return ProbeResult(False, ms, None)
        target, leg = found
        leg.close()
        return ProbeResult(True, ms, target.locality.cluster)

    def _count(self, drill: str, result: str) -> None:
        self.probes[(drill, result)] = self.probes.get((drill, result), 0) + 1

    def flush(self, now: float) -> None:
        """Move every complete second (over, nothing in flight) to the send queue."""
        current = int(now)
        for k in sorted(k for k, b in self.buckets.items() if k[1] < current and b.pending == 0):
            b = self.buckets.pop(k)
            if len(self.queue) == self.queue.maxlen:
                self.dropped += 1
            self.queue.append((k[0], k[1], make_sample(self.cluster, k[1], b.results)))
            self._queued.set()

    async def _flush_loop(self) -> None:
        while True:
            self.flush(self.wall())
            await asyncio.sleep(0.1)

    async def _send_loop(self) -> None:
        backoff = 0.2
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self.queue:
                client = getattr(self.agent, "client", None)
                if client is None:  # not joined yet
                    await asyncio.sleep(0.5)
                    continue
                drill, second, sample = self.queue[0]
                try:
                    await client.put_sample(drill, self.cluster, second, sample)
                except FederationError as e:
                    if e.status is None or e.status >= 500:
                        log.debug("drill %s: sample %d not sent yet: %s", drill, second, e)
                        await asyncio.sleep(backoff)
                        backoff = min(5.0, backoff * 2)
                        continue
                    log.warning("drill %s: federation refused sample %d: %s", drill, second, e)
                    self.dropped += 1
                else:
                    self.sent += 1
                    backoff = 0.2
                if self.queue and self.queue[0][:2] == (drill, second):
                    self.queue.popleft()

    # -- introspection ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        f = self.fault
        return {
            "fault": None if f is None else {"drill": f.drill, "mode": f.mode, "latency": f.latency,
                                             "error_rate": f.error_rate, "until": f.until},
            "observing": [{"drill": o.drill, "services": list(o.services), "probe_rate": o.rate,
                           "until": o.until}
                          for o in self.observing],
            "probes": {f"{d}/{r}": n for (d, r), n in sorted(self.probes.items())},
            "samples": {"buffered": len(self.queue), "sent": self.sent, "dropped": self.dropped},
        }
