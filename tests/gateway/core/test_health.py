"""Tables and properties for the active-probe and outlier-detection state machines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.health import (
    ActiveHealth,
    HealthState,
    Outlier,
    Response,
    Wait,
    client_sent,
    connect_result,
    expire,
    is_ejected,
    probe_result,
    response_verdict,
    routable,
    upstream_sent,
)

U, H, X = HealthState.UNKNOWN, HealthState.HEALTHY, HealthState.UNHEALTHY


def run_probes(results: str, start: ActiveHealth | None = None, hth: int = 2, uth: int = 3):
    """Feed 'o' (ok) / 'x' (fail) results at t = 1, 2, ...; return every intermediate state."""
    h = start or ActiveHealth()
    states = []
    for i, c in enumerate(results, start=1):
        h = probe_result(h, c == "o", float(i), hth, uth)
        states.append(h)
    return states


@pytest.mark.parametrize(
    "results, expected",
    [
        ("", U),
        ("o", H),  # first success from UNKNOWN is enough
        ("x", U),
        ("xx", U),
        ("xxx", X),  # unhealthy_threshold failures from UNKNOWN
        ("xxo", H),  # UNKNOWN is not UNHEALTHY: one success suffices
        ("oxx", H),
        ("oxxx", X),
        ("oxxox", H),  # a success in between resets the failure count
        ("oxxxo", X),  # leaving UNHEALTHY needs healthy_threshold (2) successes
        ("oxxxoo", H),
        ("oxxxoxo", X),  # a failure resets the success count
        ("oxxxoxoo", H),
        ("xxxoxoxoxoxox", X),  # alternating never flaps back
        ("oxoxoxoxoxoxo", H),  # nor away
    ],
)
def test_active_health_table(results, expected):
    states = run_probes(results)
    final = states[-1] if states else ActiveHealth()
    assert final.state is expected


def test_active_health_counters_and_changed_at():
    states = run_probes("oxxxoo")
    assert [s.state for s in states] == [H, H, H, X, X, H]
    assert [s.changed_at for s in states] == [1.0, 1.0, 1.0, 4.0, 4.0, 6.0]
    assert [(s.successes, s.failures) for s in states] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 0),
        (1, 0),
        (0, 0),
    ]


def test_threshold_of_one_switches_on_every_result():
    states = run_probes("oxoxo", hth=1, uth=1)
    assert [s.state for s in states] == [H, X, H, X, H]


@pytest.mark.parametrize("hth, uth", [(0, 1), (1, 0), (-1, 3)])
def test_bad_thresholds_raise(hth, uth):
    with pytest.raises(ValueError):
        probe_result(ActiveHealth(), True, 0.0, hth, uth)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_active_health_transitions_need_runs(results, hth, uth):
    """Every transition is justified by a run of equal results of the right length."""
    h = ActiveHealth()
    for i, ok in enumerate(results):
        new = probe_result(h, ok, float(i), hth, uth)
        if new.state is not h.state:
            assert new.changed_at == float(i)
            run = 0
            for r in reversed(results[: i + 1]):
                if r != ok:
                    break
                run += 1
            if new.state is X:
                assert not ok and run >= uth
            elif h.state is X:
                assert ok and run >= hth
            else:
                assert ok and h.state is U
        h = new


# --- outlier detection ---------------------------------------------------------------------

LIMIT, BASE, MAX = 3, 10.0, 80.0


def fail(o: Outlier, now: float) -> Outlier:
    return connect_result(o, False, now, LIMIT, BASE, MAX)


def ok(o: Outlier, now: float) -> Outlier:
    return connect_result(o, True, now, LIMIT, BASE, MAX)


def eject_at(o: Outlier, now: float) -> Outlier:
    for _ in range(LIMIT):
        o = fail(o, now)
    return o


def test_ejection_after_consecutive_limit():
    o = Outlier()
    o = fail(fail(o, 0.0), 0.0)
    assert o.consecutive_failures == 2 and not is_ejected(o, 0.0)
    o = fail(o, 0.0)
    assert o == Outlier(
        consecutive_failures=0, ejections=1, ejected_until=10.0, last_ejection_end=10.0
    )
    assert is_ejected(o, 9.99) and not is_ejected(o, 10.0)


def test_success_resets_consecutive_failures():
    o = ok(fail(fail(Outlier(), 0.0), 0.0), 0.0)
    o = fail(fail(o, 1.0), 1.0)
    assert o.consecutive_failures == 2 and o.ejections == 0


@pytest.mark.parametrize(
    "ejections, duration",
    [(0, 10.0), (1, 20.0), (2, 40.0), (3, 80.0), (4, 80.0), (10, 80.0), (5000, 80.0)],
)
def test_ejection_backoff_doubles_and_is_capped(ejections, duration):
    o = eject_at(Outlier(ejections=ejections), 100.0)
    assert o.ejected_until == 100.0 + duration
    assert o.ejections == ejections + 1


def test_repeat_offender_backoff_sequence():
    o, now, durations = Outlier(), 0.0, []
    for _ in range(6):
        o = eject_at(o, now)
        durations.append(o.ejected_until - now)
        now = o.ejected_until  # comes back and fails again right away
    assert durations == [10.0, 20.0, 40.0, 80.0, 80.0, 80.0]


def test_failures_while_ejected_are_not_counted():
    o = eject_at(Outlier(), 0.0)
    assert fail(fail(fail(fail(o, 1.0), 2.0), 3.0), 4.0) == o


def test_success_while_ejected_does_not_end_ejection():
    o = eject_at(Outlier(), 0.0)
    assert is_ejected(ok(o, 5.0), 5.0)


def test_decay_needs_max_ejection_of_quiet_time_per_step():
    o = eject_at(eject_at(Outlier(), 0.0), 10.0)  # ejected 10 s, then 20 s: until 30
    assert o.ejections == 2 and o.last_ejection_end == 30.0
    assert ok(o, 30.0 + MAX - 0.1).ejections == 2  # not quiet long enough
    o = ok(o, 30.0 + MAX)
    assert o.ejections == 1 and o.last_ejection_end == 30.0 + MAX
    assert ok(o, 30.0 + MAX + 1).ejections == 1  # the next step needs another MAX
    o = ok(o, 30.0 + 2 * MAX)
    assert o.ejections == 0
    assert ok(o, 1e9).ejections == 0  # never below zero
    # Having decayed, the next ejection is short again.
    assert eject_at(o, 1000.0).ejected_until == 1000.0 + BASE


@pytest.mark.parametrize("limit, base, mx", [(0, 1.0, 2.0), (1, -1.0, 2.0), (1, 3.0, 2.0)])
def test_bad_outlier_parameters_raise(limit, base, mx):
    with pytest.raises(ValueError):
        connect_result(Outlier(), False, 0.0, limit, base, mx)


@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 50)), max_size=80),
)
def test_outlier_properties(events):
    """Ejections never exceed max_ejection, never overlap, and only follow LIMIT failures."""
    o, now = Outlier(), 0.0
    for good, dt in events:
        now += dt
        new = connect_result(o, good, now, LIMIT, BASE, MAX)
        assert new.ejections >= 0 and new.consecutive_failures < LIMIT
        if new.ejected_until != o.ejected_until:
            assert not good and not is_ejected(o, now)
            assert o.consecutive_failures == LIMIT - 1
            assert 0 < new.ejected_until - now <= MAX
        o = new


# --- routable ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, ejected_until, now, expected",
    [
        (U, 0.0, 5.0, True),  # optimistic start
        (H, 0.0, 5.0, True),
        (X, 0.0, 5.0, False),
        (H, 10.0, 5.0, False),  # ejected
        (U, 10.0, 5.0, False),
        (H, 10.0, 10.0, True),  # ejection over
    ],
)
def test_routable(state, ejected_until, now, expected):
    assert (
        routable(ActiveHealth(state=state), Outlier(ejected_until=ejected_until), now) is expected
    )


# --- response timeout ----------------------------------------------------------------------

RT = 1.5  # response timeout in the tables below


def run_response(events: str) -> list[Response]:
    """Feed events at t = 1, 2, ...: 'c' the client's bytes reach the upstream, 'u' the upstream
    sends, 't' the timer looks at the clock. Returns every intermediate state."""
    r, states = Response(), []
    for i, e in enumerate(events, start=1):
        now = float(i)
        if e == "c":
            r = client_sent(r, now, RT)
        elif e == "u":
            r = upstream_sent(r)
        else:
            r = expire(r, now)
        states.append(r)
    return states


Q, W, A, T = Wait.QUIET, Wait.WAITING, Wait.ANSWERED, Wait.TIMED_OUT


@pytest.mark.parametrize(
    "events, final, verdict",
    [
        ("", Q, None),  # nothing happened: no result
        ("t", Q, None),  # the client never spoke: no clock runs
        ("tttt", Q, None),
        ("c", W, None),  # closed while waiting: no result either
        ("cu", A, True),
        ("ct", W, None),  # t=2 < deadline 2.5
        ("ctt", T, False),  # t=3 >= 2.5
        ("cccct", T, False),  # more client bytes do not move the deadline (1 + 1.5, not 5.5)
        ("cctu", T, False),  # expired at t=3; a late answer changes nothing
        ("uc", A, True),  # a banner before the client spoke is an answer
        ("uctttt", A, True),
        ("cutt", A, True),  # answered: final
        ("cuuu", A, True),
    ],
)
def test_response_table(events, final, verdict):
    states = run_response(events)
    r = states[-1] if states else Response()
    assert r.wait is final
    assert response_verdict(r) is verdict


def test_deadline_is_set_by_the_first_client_bytes_only():
    w = client_sent(Response(), 10.0, RT)
    assert w == Response(W, 11.5)
    assert client_sent(w, 11.0, RT) == w
    assert expire(w, 11.4999) == w
    assert expire(w, 11.5) == Response(T)


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_bad_response_timeout_raises(timeout):
    with pytest.raises(ValueError):
        client_sent(Response(), 0.0, timeout)


@given(st.text(alphabet="cut", max_size=40))
def test_response_verdict_is_final_once_given(events):
    """Once a verdict exists it never changes, and TIMED_OUT needs a 't' at/after the deadline."""
    first = None
    for r in run_response(events):
        v = response_verdict(r)
        if first is None:
            first = v
        else:
            assert v is first
        if r.wait is T:
            assert "c" in events


def test_connect_successes_would_hide_a_hung_endpoint():
    """Why a watched connection reports its verdict and not its connect: a stopped process
    accepts every connect, and each success between two timeouts resets the count."""
    both, verdicts_only = Outlier(), Outlier()
    for i in range(10):
        now = float(i)
        both = connect_result(both, True, now, 2, BASE, MAX)  # the connect "succeeded"
        both = connect_result(both, False, now + 0.5, 2, BASE, MAX)  # then it timed out
        verdicts_only = connect_result(verdicts_only, False, now + 0.5, 2, BASE, MAX)
    assert both.ejections == 0  # never ejected
    assert verdicts_only.ejections >= 1 and verdicts_only.ejected_until > 0
