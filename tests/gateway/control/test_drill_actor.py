"""Drill actor: the pure decisions (tables, injected clock) and the shell with fakes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from federation.drill_model import Drill
from federation.errors import FederationError
from federation.model import Catalog, Locality, ServiceKey
from gateway.control.drill_actor import (
    SAMPLE_BUFFER,
    DrillActor,
    Fault,
    Observation,
    ProbeResult,
    fault_for,
    make_sample,
    next_change,
    observations,
    percentile,
    probe_limit,
)
from gateway.core.balance import Target

T0 = 1_800_000_000.0


def drill(**kw) -> Drill:
    base = dict(
        id="d-20270115-080000-abcd",
        scope_kind="region",
        scope="us-east",
        mode="drain",
        created_at=T0,
        fault_start=T0 + 2,
        fault_end=T0 + 12,
        clusters_in_scope=("east-1", "east-2"),
        regions={"east-1": "us-east", "east-2": "us-east", "west-1": "us-west"},
        services=("default/echo",),
        settle=5.0,
    )
    base.update(kw)
    return Drill(**base)


# -- fault_for ----------------------------------------------------------------------------------

FAULT_CASES = [
    # (name, drill kwargs, cluster, now, expected (mode, latency, error_rate) or None)
    ("baseline: not yet", {}, "east-1", T0 + 1, None),
    ("at fault_start", {}, "east-1", T0 + 2, ("drain", 0.0, 0.0)),
    ("mid fault", {}, "east-2", T0 + 7, ("drain", 0.0, 0.0)),
    ("at the deadline: restored", {}, "east-1", T0 + 12, None),
    ("after the deadline", {}, "east-1", T0 + 13, None),
    ("not in scope", {}, "west-1", T0 + 7, None),
    ("aborted mid fault", {"state": "aborted", "ended_at": T0 + 5, "end_reason": "x"},
     "east-1", T0 + 7, None),
    ("ended", {"state": "ended", "ended_at": T0 + 12, "end_reason": "deadline"},
     "east-1", T0 + 7, None),
    ("blackhole", {"mode": "blackhole"}, "east-1", T0 + 3, ("blackhole", 0.0, 0.0)),
    ("degrade", {"mode": "degrade", "latency": 0.3, "error_rate": 0.5},
     "east-1", T0 + 3, ("degrade", 0.3, 0.5)),
    ("latency ignored unless degrade", {"mode": "drain", "latency": 0.3},
     "east-1", T0 + 3, ("drain", 0.0, 0.0)),
    ("cluster scope",
     {"scope_kind": "cluster", "scope": "west-1", "clusters_in_scope": ("west-1",)},
     "west-1", T0 + 3, ("drain", 0.0, 0.0)),
]


@pytest.mark.parametrize("name,kw,cluster,now,want", FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_fault_for(name, kw, cluster, now, want):
    d = drill(**kw)
    got = fault_for([d], cluster, now)
    if want is None:
        assert got is None
    else:
        assert got == Fault(d.id, *want, until=d.fault_end)


def test_fault_for_picks_the_earliest_of_overlapping_drills():
    a = drill(id="d-20270115-080000-aaaa", fault_start=T0 + 3, mode="blackhole")
    b = drill(id="d-20270115-080000-bbbb", fault_start=T0 + 2, mode="drain")
    assert fault_for([a, b], "east-1", T0 + 4).drill == b.id
    assert fault_for([], "east-1", T0 + 4) is None


# -- observations -------------------------------------------------------------------------------

OBS_CASES = [
    ("before created_at", {}, "west-1", ["default/echo"], T0 - 0.5, ()),
    ("baseline", {}, "west-1", ["default/echo"], T0, (("default/echo",),)),
    ("during fault", {}, "west-1", ["default/echo"], T0 + 5, (("default/echo",),)),
    ("settling after the deadline", {}, "west-1", ["default/echo"], T0 + 16.9,
     (("default/echo",),)),
    ("settle over", {}, "west-1", ["default/echo"], T0 + 17, ()),
    ("in scope: never observes", {}, "east-1", ["default/echo"], T0 + 5, ()),
    ("import not affected", {}, "west-1", ["default/other"], T0 + 5, ()),
    ("only the affected imports", {"services": ("default/echo", "ns/b", "ns/c")}, "west-1",
     ["ns/c", "default/echo", "ns/z"], T0 + 5, (("default/echo", "ns/c"),)),
    ("aborted: settle counts from ended_at",
     {"state": "aborted", "ended_at": T0 + 4, "end_reason": "x"},
     "west-1", ["default/echo"], T0 + 9.5, ()),
    ("aborted: still settling", {"state": "aborted", "ended_at": T0 + 4, "end_reason": "x"},
     "west-1", ["default/echo"], T0 + 8.5, (("default/echo",),)),
]


@pytest.mark.parametrize("name,kw,cluster,imports,now,want", OBS_CASES,
                         ids=[c[0] for c in OBS_CASES])
def test_observations(name, kw, cluster, imports, now, want):
    d = drill(**kw)
    got = observations([d], cluster, imports, now)
    assert tuple(o.services for o in got) == want
    for o in got:
        assert o == Observation(d.id, o.services, d.probe_rate, d.fault_stop + d.settle)


# -- next_change --------------------------------------------------------------------------------

NEXT_CASES = [
    ("before creation", {}, T0 - 5, T0),
    ("baseline -> fault_start", {}, T0 + 1, T0 + 2),
    ("at fault_start -> deadline", {}, T0 + 2, T0 + 12),
    ("fault -> deadline", {}, T0 + 5, T0 + 12),
    ("settling -> observe end", {}, T0 + 12, T0 + 17),
    ("all over", {}, T0 + 17, None),
    ("aborted: observe end from ended_at",
     {"state": "aborted", "ended_at": T0 + 4, "end_reason": "x"}, T0 + 5, T0 + 9),
]


@pytest.mark.parametrize("name,kw,now,want", NEXT_CASES, ids=[c[0] for c in NEXT_CASES])
def test_next_change(name, kw, now, want):
    assert next_change([drill(**kw)], now) == want


def test_next_change_is_when_the_decision_changes():
    """Property over a timeline: between now and next_change, neither decision changes."""
    d = drill(mode="blackhole")
    t = T0 - 3
    while (nxt := next_change([d], t)) is not None:
        for c in ("east-1", "west-1"):
            for frac in (0.0, 0.3, 0.99):
                probe = t + (nxt - t) * frac
                assert fault_for([d], c, probe) == fault_for([d], c, t)
                assert (observations([d], c, ["default/echo"], probe)
                        == observations([d], c, ["default/echo"], t))
        t = nxt
    assert t == d.fault_end + d.settle


# -- samples ------------------------------------------------------------------------------------

def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    vals = [float(i) for i in range(1, 101)]
    assert percentile(vals, 50) == 50.0
    assert percentile(vals, 99) == 99.0
    assert percentile(list(reversed(vals)), 100) == 100.0


def test_make_sample_format():
    rs = [ProbeResult(True, 1.0, "east-2")] * 18 + [ProbeResult(True, 480.0, "west-1"),
                                                    ProbeResult(False, 2000.0, None)]
    s = make_sample("west-1", 1796000000,
                    {"default/echo": rs, "ns/dead": [ProbeResult(False, 2000.0, None)]})
    assert s == {
        "cluster": "west-1",
        "second": 1796000000,
        "services": {
            "default/echo": {"attempts": 20, "successes": 19, "failures": 1, "latency_p50_ms": 1.0,
                             "latency_p99_ms": 480.0, "served": {"east-2": 18, "west-1": 1}},
            "ns/dead": {"attempts": 1, "successes": 0, "failures": 1, "latency_p50_ms": None,
                        "latency_p99_ms": None, "served": {}},
        },
    }


def test_make_sample_is_accepted_by_the_federation_validator():
    from federation.drills import validate_sample

    rs = [ProbeResult(True, 0.5, "east-1"), ProbeResult(False, 12.0, None)]
    s = make_sample("west-1", int(T0) + 3, {"default/echo": rs})
    assert validate_sample(s, drill(), "west-1", int(T0) + 3) == s


def test_probe_limit_covers_a_full_timeout_of_probes():
    assert probe_limit(20) >= 40
    assert probe_limit(1000) == 2000


# -- shell, with fakes --------------------------------------------------------------------------

class FakeAgent:
    def __init__(self) -> None:
        self.withdrawn: list[bool] = []
        self.client = FakeClient()

    def set_exports_withdrawn(self, w: bool) -> None:
        self.withdrawn.append(w)


class FakeClient:
    def __init__(self) -> None:
        self.samples: list[tuple[str, str, int, dict]] = []
        self.fail_with: FederationError | None = None

    async def put_sample(self, drill_id, cluster, second, sample):
        if self.fail_with is not None:
            raise self.fail_with
        self.samples.append((drill_id, cluster, second, sample))
        return 1


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def actor(cluster: str, clock: Clock, agent=None, routers=None,
          dialer=None) -> tuple[DrillActor, SimpleNamespace]:
    inbound = SimpleNamespace(fault=None)
    a = DrillActor(cluster, clock, clock, inbound, agent or FakeAgent(), routers or {}, dialer,
                   lambda: 0.5)
    return a, inbound


def test_shell_applies_and_restores_a_drain():
    clock = Clock(T0 + 1)
    agent = FakeAgent()
    a, inbound = actor("east-1", clock, agent)
    d = drill()
    a.on_catalog(Catalog(drills={d.id: d}))
    a.evaluate()
    assert inbound.fault is None and agent.withdrawn == []
    clock.t = T0 + 2
    a.evaluate()
    assert inbound.fault.mode == "drain" and agent.withdrawn[-1] is True
    assert a.fault_gauge == {(d.id, "drain"): 1}
    assert a.status()["fault"]["until"] == d.fault_end
    clock.t = T0 + 12
    a.evaluate()
    assert inbound.fault is None and agent.withdrawn[-1] is False
    assert a.fault_gauge == {(d.id, "drain"): 0}


def test_shell_restores_when_the_drill_is_aborted():
    clock = Clock(T0 + 3)
    a, inbound = actor("east-1", clock)
    d = drill(mode="degrade", latency=0.2, error_rate=0.25)
    a.on_catalog(Catalog(drills={d.id: d}))
    a.evaluate()
    hook = inbound.fault
    assert (hook.mode, hook.latency, hook.error_rate, hook.random()) == ("degrade", 0.2, 0.25, 0.5)
    aborted = drill(mode="degrade", latency=0.2, error_rate=0.25, state="aborted", ended_at=T0 + 4,
                    end_reason="aborted by operator")
    a.on_catalog(Catalog(drills={d.id: aborted}))
    a.evaluate()
    assert inbound.fault is None


def test_flush_waits_for_the_second_to_end_and_its_probes():
    clock = Clock(T0 + 5.5)
    a, _ = actor("west-1", clock)
    from gateway.control.drill_actor import _Bucket

    b = _Bucket({"default/echo": [ProbeResult(True, 1.0, "east-1")]}, pending=1)
    a.buckets[("d1", int(T0) + 5)] = b
    a.flush(clock.t)
    assert not a.queue  # the second is not over
    a.flush(T0 + 6.1)
    assert not a.queue  # a probe of that second is still in flight
    b.pending = 0
    a.flush(T0 + 6.1)
    assert [(d, s) for d, s, _ in a.queue] == [("d1", int(T0) + 5)]


def test_sample_queue_is_bounded():
    a, _ = actor("west-1", Clock(T0))
    from gateway.control.drill_actor import _Bucket

    for i in range(SAMPLE_BUFFER + 10):
        a.buckets[("d1", int(T0) - 1000 + i)] = _Bucket(
            {"default/echo": [ProbeResult(False, 1, None)]})
    a.flush(T0)
    assert len(a.queue) == SAMPLE_BUFFER and a.dropped == 10
    assert a.queue[0][1] == int(T0) - 1000 + 10  # the oldest went


class FakeRouter:
    def __init__(self, clusters: list[str]) -> None:
        self.clusters = clusters
        self.reports: list[bool] = []

    def plan(self):
        return [Target(f"remote:{c}", Locality("r", "z", c), "127.0.0.1", 1, 1, True, True)
                for c in self.clusters]

    def report(self, target, ok):
        self.reports.append(ok)


class FakeLeg:
    closed = False

    def close(self):
        self.closed = True


class FakeDialer:
    """east-1 refuses; west-1 answers; 'hole' never answers."""

    def __init__(self) -> None:
        self.legs: list[FakeLeg] = []

    async def dial(self, target, service):
        from gateway.errors import DialError

        c = target.locality.cluster
        if c == "hole":
            await asyncio.sleep(3600)
        if c == "east-1":
            raise DialError("refused")
        leg = FakeLeg()
        self.legs.append(leg)
        return leg


async def test_observer_probes_at_rate_and_sends_samples():
    async def main():
        now = T0 + 0.0
        import time as _time

        base = _time.monotonic()

        def wall():
            return now + (_time.monotonic() - base)

        agent = FakeAgent()
        dialer = FakeDialer()
        router = FakeRouter(["east-1", "west-1"])
        a = DrillActor("west-2", wall, _time.monotonic, SimpleNamespace(fault=None), agent,
                       {ServiceKey("default", "echo"): router}, dialer, lambda: 0.5)
        # created 0.2 s ago; observing ends 2.3 s from now (fault_stop + settle)
        d = drill(created_at=wall() - 0.2, fault_start=wall(), fault_end=wall() + 1.3, settle=1.0,
                  probe_rate=50.0, clusters_in_scope=("east-1",), scope_kind="cluster",
                  scope="east-1")
        a.on_catalog(Catalog(drills={d.id: d}))
        task = asyncio.create_task(a.run())
        await asyncio.sleep(3.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return a, agent, dialer, router

    a, agent, dialer, router = await main()
    total = sum(s["services"]["default/echo"]["attempts"] for *_, s in agent.client.samples)
    assert 90 <= total <= 125  # 50/s for ~2.3 s
    samples = agent.client.samples
    assert all(s["services"]["default/echo"]["served"].keys() <= {"west-1"} for *_, s in samples)
    assert sum(s["services"]["default/echo"]["successes"] for *_, s in samples) == total
    assert all(leg.closed for leg in dialer.legs)
    assert a.probes[(a.drills[0].id, "ok")] == total
    # east-1 refused each time first; not app-traffic stats
    assert a.stats.attempt_failures == total
    seconds = [sec for _, _, sec, _ in agent.client.samples]
    assert seconds == sorted(seconds) and len(set(seconds)) == len(seconds)


async def test_a_blackholed_probe_fails_after_the_timeout(monkeypatch):
    import gateway.control.drill_actor as m

    monkeypatch.setattr(m, "PROBE_TIMEOUT", 0.2)

    async def main():
        a = DrillActor("west-1", lambda: T0, asyncio.get_running_loop().time,
                       SimpleNamespace(fault=None), FakeAgent(), {}, FakeDialer(), lambda: 0.5)
        return await a._probe(FakeRouter(["hole"]), ServiceKey("default", "echo"))

    r = await main()
    assert not r.ok and r.served is None and 150 <= r.latency_ms < 1000


async def test_samples_are_retried_while_the_federation_is_down():
    async def main():
        agent = FakeAgent()
        a, _ = actor("west-1", Clock(T0), agent)
        a.queue.append(("d1", int(T0), make_sample("west-1", int(T0), {})))
        a._queued.set()
        agent.client.fail_with = FederationError("federation at x: connection refused")
        task = asyncio.create_task(a._send_loop())
        await asyncio.sleep(0.5)
        assert len(a.queue) == 1 and not agent.client.samples
        agent.client.fail_with = None
        await asyncio.sleep(1.0)
        assert not a.queue and len(agent.client.samples) == 1
        a.queue.append(("d1", int(T0) + 1, make_sample("west-1", int(T0) + 1, {})))
        a._queued.set()
        agent.client.fail_with = FederationError("outside the window", 409)
        await asyncio.sleep(0.2)
        assert not a.queue and a.dropped == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    await main()
