"""federation.drills: creation and validation, overlap, end/due, SLO grammar and trips, sample
validation, and the report model over tables of synthetic sample sequences."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.drill_model import Drill
from federation.drill_report import compute_report
from federation.drills import (
    DrillStateError,
    due,
    end,
    new_drill,
    overlapping,
    parse_slo,
    sample_window,
    slo_tripped,
    validate_sample,
)
from federation.errors import InputError
from federation.model import Catalog, ClusterRecord, Endpoint, Export

NOW = 1_796_000_000.25  # fault_start = ceil(NOW + 2s baseline) = 1_796_000_003
SVC = "default/echo"


def catalog(live: tuple[str, ...] = ("east-1", "east-2", "west-1")) -> Catalog:
    items: list[tuple[str, bytes]] = []
    for name, region, zone in (("east-1", "us-east", "a"), ("east-2", "us-east", "b"),
                               ("west-1", "us-west", "a")):
        rec = ClusterRecord(name, region, zone, f"{name}.isthmus.local", "127.0.0.1:15443")
        items.append((rec.key, json.dumps(rec.to_json()).encode()))
        if name in live:
            items.append((f"catalog/live/{name}", b"{}"))
    for cluster, svc in (("east-1", "echo"), ("east-2", "echo"), ("east-1", "db"),
                         ("west-1", "web")):
        exp = Export(cluster, "default", svc, 80, "tcp", (Endpoint("127.0.0.1", 80),))
        items.append((exp.key, json.dumps(exp.to_json()).encode()))
    return Catalog.from_items(items, 10)


def request(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"scope": {"region": "us-east"}, "mode": "blackhole", "duration": "10s"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def drill(**kw: Any) -> Drill:
    return new_drill(request(**kw), catalog(), NOW, "ab12")


# ---- new_drill -------------------------------------------------------------------------------


def test_new_drill_fills_scope_services_times_and_id() -> None:
    d = new_drill(
        request(mode="degrade", latency="200ms", error_rate=0.3, abort_on="success<99%:5s",
                probe_rate=10),
        catalog(), NOW, "x9z0",
    )
    stamp = datetime.fromtimestamp(NOW, UTC).strftime("%Y%m%d-%H%M%S")
    assert d.id == f"d-{stamp}-x9z0"
    assert d.scope_kind == "region" and d.scope == "us-east"
    assert d.clusters_in_scope == ("east-1", "east-2")
    assert dict(d.regions) == {"east-1": "us-east", "east-2": "us-east", "west-1": "us-west"}
    assert d.services == ("default/db", "default/echo")
    assert d.created_at == NOW
    assert d.fault_start == 1_796_000_003.0  # created_at + 2 s, up to the next whole second
    assert d.fault_end == d.fault_start + 10
    assert (d.latency, d.error_rate, d.probe_rate, d.settle) == (0.2, 0.3, 10.0, 5.0)
    assert d.abort_on == "success<99%:5s" and d.state == "running"
    assert Drill.from_json(d.to_json()) == d  # a valid record


def test_new_drill_cluster_scope_and_live_exports_only() -> None:
    d = new_drill(request(scope={"cluster": "east-2"}, baseline="0s", settle="1s"),
                  catalog(live=("east-1", "west-1")), NOW, "0000")
    assert d.clusters_in_scope == ("east-2",)
    assert d.services == ()  # east-2 holds no lease: its exports are not in the catalog's view
    assert d.fault_start == 1_796_000_001.0 and d.settle == 1.0


@pytest.mark.parametrize("kw, quoted", [
    ({"scope": {"region": "eu-west"}}, ["'eu-west'", "us-east, us-west"]),
    ({"scope": {"cluster": "north-1"}}, ["'north-1'", "east-1, east-2, west-1"]),
    ({"scope": {"zone": "a"}}, ["{'zone': 'a'}"]),
    ({"scope": {"region": "US"}}, ["'US'"]),
    ({"mode": "nuke"}, ["'nuke'", "drain, blackhole, degrade"]),
    ({"duration": None}, ["duration: missing"]),
    ({"duration": "0.5s"}, ["'0.5s'", "1s..1h"]),
    ({"duration": "2h"}, ["'2h'"]),
    ({"duration": 30}, ["30", "unit"]),
    ({"mode": "degrade"}, ["latency", "error_rate"]),
    ({"mode": "degrade", "error_rate": 1.5}, ["1.5"]),
    ({"mode": "degrade", "latency": "2m"}, ["'2m'"]),
    ({"error_rate": 0.2}, ["'blackhole'"]),
    ({"probe_rate": 0}, ["0"]),
    ({"probe_rate": "fast"}, ["'fast'"]),
    ({"baseline": "5"}, ["'5'"]),
    ({"settle": "1h"}, ["'1h'"]),
    ({"abort_on": "success<99"}, ["'success<99'"]),
    ({"abort_on": 5}, ["5"]),
    ({"colour": "red"}, ["'colour'", "allowed"]),
])
def test_new_drill_errors_quote_the_bad_value(kw: dict, quoted: list[str]) -> None:
    with pytest.raises(InputError) as e:
        new_drill(request(**kw), catalog(), NOW, "ab12")
    for q in quoted:
        assert q in str(e.value), (q, str(e.value))


def test_new_drill_refuses_bad_randomness_and_non_object() -> None:
    with pytest.raises(InputError, match="'AB'"):
        new_drill(request(), catalog(), NOW, "AB")
    with pytest.raises(InputError, match="list"):
        new_drill([], catalog(), NOW, "ab12")


# ---- overlap, end, due -----------------------------------------------------------------------


def test_overlap_running_or_observing() -> None:
    d = drill(settle="5s")
    assert overlapping([], NOW) is None
    assert overlapping([d], NOW + 1000) is d  # running past its deadline still counts
    ended = end(d, d.fault_start + 4, "aborted", "aborted by operator")
    assert ended.fault_stop == d.fault_start + 4
    assert overlapping([ended], d.fault_start + 8.9) is ended  # still observing (settle)
    assert overlapping([ended], d.fault_start + 9) is None
    cat = Catalog.from_items(
        [*((k, v) for k, v in _catalog_items()), (d.key, json.dumps(d.to_json()).encode())], 11
    )
    assert overlapping(cat, NOW).id == d.id
    older = Drill.from_json({**d.to_json(), "id": "d-20200101-000000-aaaa", "created_at": 1.0,
                             "fault_start": 2.0, "fault_end": 3.0})
    assert overlapping([older, d], NOW) is d  # the newest first


def _catalog_items() -> list[tuple[str, bytes]]:
    cat = catalog()
    return [(r.key, json.dumps(r.to_json()).encode()) for r in cat.clusters.values()]


def test_end_and_due() -> None:
    d = drill()
    assert not due(d, d.fault_end - 0.001) and due(d, d.fault_end)
    e = end(d, d.fault_end + 3, "ended", "deadline")
    assert (e.state, e.end_reason, e.ended_at) == ("ended", "deadline", d.fault_end + 3)
    assert e.fault_stop == d.fault_end and not due(e, d.fault_end + 10)
    with pytest.raises(DrillStateError, match="already ended"):
        end(e, d.fault_end + 4, "aborted", "aborted by operator")
    with pytest.raises(InputError):
        end(d, NOW, "running", "x")
    with pytest.raises(InputError):
        end(d, NOW, "aborted", "")


# ---- SLO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, metric, op, threshold, window", [
    ("success<99%:5s", "success", "<", 0.99, 5),
    ("success<0.95:10s", "success", "<", 0.95, 10),
    ("p99>500:3s", "p99", ">", 500.0, 3),
    ("p99 > 250.5 : 1m", "p99", ">", 250.5, 60),
    ("success>0%:1s", "success", ">", 0.0, 1),
])
def test_parse_slo_good(text: str, metric: str, op: str, threshold: float, window: int) -> None:
    slo = parse_slo(text)
    assert (slo.metric, slo.op, slo.window) == (metric, op, window)
    assert slo.threshold == pytest.approx(threshold)


@pytest.mark.parametrize("text", [
    "", "success<99", "success<99%", "latency>5:1s", "success=99%:5s", "p99>50%:3s",
    "success<150%:5s", "success<2:5s", "success<99%:500ms", "success<99%:1.5s",
    "success<99%:0s", "success<99%:2h", "success<99%:5", "SUCCESS<99%:5s", "x" * 300,
])
def test_parse_slo_bad_quotes_text(text: str) -> None:
    with pytest.raises(InputError) as e:
        parse_slo(text)
    assert repr(text)[:40] in str(e.value) or len(text) > 200


def test_parse_slo_refuses_non_string() -> None:
    with pytest.raises(InputError, match="None"):
        parse_slo(None)


def smp(d: Drill, t: int, attempts: int, successes: int, served: dict[str, int] | None = None,
        cluster: str = "west-1", failures: int | None = None, p99: float | None = None,
        service: str = SVC) -> dict[str, Any]:
    """A sample of `cluster` for the second at t (relative to fault_start)."""
    return {
        "cluster": cluster,
        "second": int(d.fault_start) + t,
        "services": {service: {
            "attempts": attempts, "successes": successes,
            "failures": attempts - successes if failures is None else failures,
            "latency_p50_ms": None if p99 is None else p99 / 2, "latency_p99_ms": p99,
            "served": served if served is not None else {"west-1": successes},
        }},
    }


def test_slo_trips_after_window_of_fault_seconds() -> None:
    d = drill(abort_on="success<99%:3s")
    slo = parse_slo(d.abort_on)
    bad = [smp(d, t, 20, 10) for t in range(0, 5)]
    baseline_bad = [smp(d, t, 20, 0) for t in (-2, -1)]
    now = d.fault_start + 10
    assert slo_tripped(slo, d, baseline_bad + bad[:2], now) is None  # baseline does not count
    assert slo_tripped(slo, d, bad[:3], now) == "aborted: SLO success<99% for 3s tripped"
    good_between = [bad[0], bad[1], smp(d, 2, 20, 20), bad[3]]
    assert slo_tripped(slo, d, good_between, now) is None
    assert slo_tripped(slo, d, [*good_between, bad[4]], now) is None  # last 3: good, bad, bad
    assert slo_tripped(slo, d, [*good_between, bad[4], smp(d, 5, 20, 0)], now) is not None
    # seconds without probes have no success ratio: skipped, not "good"
    assert slo_tripped(slo, d, [bad[0], smp(d, 1, 0, 0), bad[2], bad[3]], now) is not None
    # not yet: seconds after `now` are ignored
    assert slo_tripped(slo, d, bad[:3], d.fault_start + 1) is None
    # after the fault stopped: settle seconds do not count
    aborted = end(d, d.fault_start + 2, "aborted", "x")
    assert slo_tripped(slo, aborted, bad, now) is None


def test_slo_success_sums_over_clusters_and_p99_takes_worst() -> None:
    d = drill()
    mixed = [smp(d, 0, 20, 20), smp(d, 0, 20, 19, cluster="west-2")]
    assert slo_tripped(parse_slo("success<99%:1s"), d, mixed, d.fault_end) is not None  # 39/40
    assert slo_tripped(parse_slo("success<97%:1s"), d, mixed, d.fault_end) is None
    lat = [smp(d, 0, 20, 20, p99=100), smp(d, 0, 20, 20, p99=600, cluster="west-2"),
           smp(d, 1, 20, 20, p99=501)]
    assert slo_tripped(parse_slo("p99>500:2s"), d, lat, d.fault_end) == \
        "aborted: SLO p99>500 for 2s tripped"
    assert slo_tripped(parse_slo("p99>550:2s"), d, lat, d.fault_end) is None


# ---- samples ---------------------------------------------------------------------------------


def test_validate_sample_normalizes() -> None:
    d = drill()
    raw = {"cluster": "west-1", "second": 1_796_000_005, "services": {
        SVC: {"attempts": 20, "successes": 19, "failures": 1, "latency_p50_ms": 1,
              "latency_p99_ms": 480.0, "served": {"east-2": 19}}}}
    out = validate_sample(raw, d, "west-1", 1_796_000_005)
    assert out["services"][SVC]["latency_p50_ms"] == 1.0
    assert out["services"][SVC]["served"] == {"east-2": 19}
    lo, hi = sample_window(d)
    assert lo == d.created_at - 1 and hi == d.fault_end + d.settle + 5


def _svc(**kw: Any) -> dict[str, Any]:
    base = {"attempts": 20, "successes": 19, "failures": 1, "served": {"east-2": 19}}
    base.update(kw)
    return base


@pytest.mark.parametrize("obj, field", [
    ([], "sample: expected a JSON object"),
    ({"cluster": "east-2", "second": 5, "services": {}}, "sample.cluster: 'east-2'"),
    ({"cluster": "west-1", "second": 6, "services": {}}, "sample.second: 6"),
    ({"cluster": "west-1", "second": True, "services": {}}, "sample.second: True"),
    ({"cluster": "west-1", "second": 5, "services": []}, "sample.services: []"),
    ({"cluster": "west-1", "second": 5, "services": {}, "x": 1}, "'x'"),
    ({"cluster": "west-1", "second": 5, "services": {"default/other": _svc()}}, "'default/other'"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(attempts=-1)}}, "attempts: -1"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(attempts=True)}}, "attempts: True"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(successes=21)}}, "successes (21)"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(failures=None)}}, "failures: None"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(served={"east-2": 20})}},
     "20 served"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(served={"East": 1})}}, "'East'"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(latency_p99_ms=-3)}},
     "latency_p99_ms: -3"),
    ({"cluster": "west-1", "second": 5, "services": {SVC: _svc(latency_p50_ms="1ms")}}, "'1ms'"),
    ({"cluster": "west-1", "second": 5,
      "services": {SVC: _svc(served={f"c{i}": 0 for i in range(1001)})}}, "at most 1000"),
])
def test_validate_sample_names_bad_field(obj: Any, field: str) -> None:
    with pytest.raises(InputError) as e:
        validate_sample(obj, drill(), "west-1", 5)
    assert field in str(e.value), str(e.value)


def test_validate_sample_bounds_services() -> None:
    d = Drill.from_json({**drill().to_json(), "services": [f"ns/s{i}" for i in range(1001)]})
    services = {f"ns/s{i}": _svc() for i in range(1001)}
    with pytest.raises(InputError, match="at most 1000"):
        validate_sample({"cluster": "west-1", "second": 5, "services": services}, d, "west-1", 5)


# ---- report ----------------------------------------------------------------------------------

E1, W1 = {"east-1": 20}, {"west-1": 20}


def seq(d: Drill, spec: dict[int, tuple[int, int, dict[str, int]]]) -> list[dict[str, Any]]:
    return [smp(d, t, a, s, served) for t, (a, s, served) in spec.items()]


def baseline() -> dict[int, tuple[int, int, dict[str, int]]]:
    return {-2: (20, 20, E1), -1: (20, 20, E1)}


def clean(d: Drill) -> dict[int, tuple[int, int, dict[str, int]]]:
    """Baseline on east-1; fault 0..9: 8 failures at 0, shifted to west-1 from 1; failback at 11."""
    spec = baseline()
    spec[0] = (20, 12, {"west-1": 12})
    for t in range(1, 10):
        spec[t] = (20, 20, W1)
    spec[10] = (20, 20, W1)  # settle, failback hysteresis
    for t in range(11, 15):
        spec[t] = (20, 20, E1)
    return spec


def case_clean(d):
    return clean(d), dict(detection_s=0.0, shift_s=1.0, failed_during_shift=8,
                          failback_s=1.0, flapped=False)


def case_never_shifts(d):
    spec = baseline()
    for t in range(0, 10):
        spec[t] = (20, 10, {"west-1": 10})
    for t in range(10, 13):
        spec[t] = (20, 20, E1)
    return spec, dict(detection_s=0.0, shift_s=None, failed_during_shift=100,
                      failback_s=0.0, flapped=False)


def case_flap_during_fault(d):
    spec = clean(d)
    spec[5] = (20, 20, {"east-1": 5, "west-1": 15})
    return spec, dict(detection_s=0.0, shift_s=1.0, failed_during_shift=8,
                      failback_s=1.0, flapped=True)


def case_flap_after_failback(d):
    spec = clean(d)
    spec[13] = (20, 20, {"east-1": 10, "west-1": 10})
    return spec, dict(shift_s=1.0, failback_s=1.0, flapped=True)


def case_failback_never(d):
    spec = clean(d)
    for t in range(11, 15):
        spec[t] = (20, 20, W1)
    return spec, dict(shift_s=1.0, failback_s=None, flapped=False)


def case_drain_polite(d):
    spec = baseline()
    for t in range(0, 10):
        spec[t] = (20, 20, W1)
    spec[10] = (20, 20, E1)
    return spec, dict(detection_s=0.0, shift_s=0.0, failed_during_shift=0,
                      failback_s=0.0, flapped=False)


def case_late_detection(d):
    spec = baseline()
    spec[0] = (20, 20, E1)  # the fault is not visible yet (stale health)
    spec[1] = (20, 20, E1)
    spec[2] = (20, 5, {"west-1": 5})
    spec[3] = (20, 19, {"west-1": 19})  # 95%: not yet shifted
    spec[4] = (20, 20, W1)
    return spec, dict(detection_s=2.0, shift_s=4.0, failed_during_shift=16,
                      failback_s=None, flapped=False)


def case_no_samples(d):
    return {}, dict(detection_s=None, shift_s=None, failed_during_shift=0, failback_s=None,
                    flapped=False, p99_ms_worst=None)


@pytest.mark.parametrize("case", [
    case_clean, case_never_shifts, case_flap_during_fault, case_flap_after_failback,
    case_failback_never, case_drain_polite, case_late_detection, case_no_samples,
])
def test_report_table(case) -> None:
    d = drill()
    spec, expected = case(d)
    report = compute_report(d, seq(d, spec))
    for k, v in expected.items():
        assert report[k] == v, (case.__name__, k, report[k])
    assert [r["t"] for r in report["timeline"]] == sorted(float(t) for t in spec)


def test_report_rows_and_fields() -> None:
    d = drill()
    samples = seq(d, clean(d))
    samples.append(smp(d, 0, 10, 10, {"east-2": 4, "west-1": 6}, cluster="west-2", p99=40.0))
    samples.append(smp(d, 1, 10, 10, {"west-1": 10}, cluster="west-2", p99=900.0))
    samples.append(smp(d, 2, 10, 10, {"west-1": 10}, cluster="west-2", p99=60.0))
    samples.append(smp(d, -1, 10, 10, {"east-1": 10}, cluster="west-2", p99=5000.0))
    r = compute_report(d, list(reversed(samples)))
    row0 = next(x for x in r["timeline"] if x["t"] == 0)
    assert row0 == {
        "t": 0.0, "second": int(d.fault_start), "attempts": 30, "successes": 22, "failures": 8,
        "served_by_cluster": {"east-2": 4, "west-1": 18},
        "served_by_region": {"us-east": 4, "us-west": 18},
        "in_scope_share": pytest.approx(4 / 22), "p99_ms": 40.0, "phase": "fault",
    }
    assert [x["phase"] for x in r["timeline"]][:3] == ["baseline", "baseline", "fault"]
    assert r["timeline"][-1]["phase"] == "settle"
    assert r["p99_ms_worst"] == 900.0  # the baseline's 5000 ms does not count
    assert r["p99_ms_median"] == 60.0
    assert r["shift_s"] == 1.0  # west-2 served in scope at t=0 only
    assert r["scope"] == {"region": "us-east"} and r["state"] == "running"
    assert r["by_mode"] == {"mode": "blackhole", "latency": 0.0, "error_rate": 0.0}
    assert r["totals"] == {"attempts": 17 * 20 + 40, "successes": 17 * 20 - 8 + 40,
                           "failures": 8}  # 17 seconds of west-1 (t=-2..14) + west-2
    assert r["baseline_share"] == 1.0
    assert r["affected_streams"] == [f"west-1 {SVC}", f"west-2 {SVC}"]


def test_report_ignores_streams_never_served_in_scope() -> None:
    """An observer whose own endpoints always served the service saw nothing of the drill."""
    d = drill()
    samples = seq(d, clean(d)) + [
        smp(d, t, 20, 20, {"west-2": 20}, cluster="west-2") for t in range(-2, 15)
    ]
    r = compute_report(d, samples)
    assert (r["detection_s"], r["shift_s"], r["failback_s"]) == (0.0, 1.0, 1.0)
    only_local = [smp(d, t, 20, 20, {"west-2": 20}, cluster="west-2") for t in range(-2, 15)]
    r2 = compute_report(d, only_local)  # no stream affected: all count; nothing failed
    assert r2["affected_streams"] == [] and r2["baseline_share"] == 0.0
    assert r2["detection_s"] == 0.0 and r2["failed_during_shift"] == 0


def test_report_partial_baseline_share_and_aborted_drill() -> None:
    d = end(drill(), 0, "aborted", "aborted by operator")
    d = Drill.from_json({**d.to_json(), "ended_at": d.fault_start + 4})
    half = {"east-1": 10, "west-1": 10}
    spec = {-2: (20, 20, half), -1: (20, 20, half)}
    for t in range(0, 4):
        spec[t] = (20, 20, W1)
    spec[4] = (20, 20, {"east-1": 8, "west-1": 12})  # 0.4 < 0.45: not yet
    spec[5] = (20, 20, {"east-1": 9, "west-1": 11})  # 0.45: back
    r = compute_report(d, seq(d, spec))
    assert r["fault_stop_t"] == 4.0 and r["state"] == "aborted"
    assert r["end_reason"] == "aborted by operator"
    assert r["baseline_share"] == 0.5
    assert r["failback_s"] == 1.0  # relative to fault_stop
    assert r["shift_s"] == 0.0 and r["flapped"] is False


# ---- properties ------------------------------------------------------------------------------

_CLUSTERS = ("east-1", "east-2", "west-1", "west-2")


@st.composite
def sample_sets(draw):
    d = drill()
    keys = draw(st.sets(
        st.tuples(st.sampled_from(("west-1", "west-2", "south-1")), st.integers(-2, 16)),
        max_size=40,
    ))
    out = []
    for cluster, t in sorted(keys):
        services = {}
        for svc in draw(st.sets(st.sampled_from(("default/echo", "default/db")), max_size=2)):
            attempts = draw(st.integers(0, 50))
            successes = draw(st.integers(0, attempts))
            failures = draw(st.integers(0, attempts - successes))
            served: dict[str, int] = {}
            left = successes
            for c in draw(st.lists(st.sampled_from(_CLUSTERS), unique=True, max_size=3)):
                n = draw(st.integers(0, left))
                served[c] = n
                left -= n
            p99 = draw(st.none() | st.floats(0, 5000))
            services[svc] = {"attempts": attempts, "successes": successes, "failures": failures,
                             "latency_p50_ms": None, "latency_p99_ms": p99, "served": served}
        out.append({"cluster": cluster, "second": int(d.fault_start) + t, "services": services})
    return d, out


@settings(max_examples=300, deadline=None)
@given(sample_sets())
def test_report_properties(data) -> None:
    d, samples = data
    # every generated sample is valid input
    for s in samples:
        assert validate_sample(s, d, s["cluster"], s["second"]) is not None
    r = compute_report(d, samples)
    for k in ("attempts", "successes", "failures"):
        total = sum(svc[k] for s in samples for svc in s["services"].values())
        assert r["totals"][k] == total
        assert sum(row[k] for row in r["timeline"]) == total
    if r["shift_s"] is not None and r["detection_s"] is not None:
        assert r["shift_s"] >= r["detection_s"]
    if r["shift_s"] is not None:
        assert r["detection_s"] is not None
    if r["p99_ms_worst"] is not None:
        assert r["p99_ms_median"] <= r["p99_ms_worst"]
    assert r["failed_during_shift"] <= r["totals"]["failures"]
    json.dumps(r)  # the report is plain JSON
    assert compute_report(d, list(reversed(samples))) == r  # order does not matter
