"""ca_rotation: which CA signs and which are trusted, from (plan, now), with fake times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.errors import InputError
from gateway.config.schema import check_overlap
from gateway.core.ca_rotation import Phase, RotationPlan, decide

OLD, NEW = "a" * 64, "b" * 64
T0 = 1_700_000_000.0


def plan(prepared_at: float | None = T0 + 5, overlap: float = 10.0, svid_ttl: float = 60.0,
         skew: float = 5.0) -> RotationPlan:
    return RotationPlan(OLD, NEW, T0, overlap, svid_ttl, skew, prepared_at)


# prepared at T0+5, overlap 10: switch at T0+15; retire at max(25, 15 + 60 + 5) = T0+80
@pytest.mark.parametrize(("now", "phase", "signer", "trusted", "next_at"), [
    (T0 + 5, Phase.PREPARE, OLD, (OLD, NEW), T0 + 15),
    (T0 + 14.999, Phase.PREPARE, OLD, (OLD, NEW), T0 + 15),
    (T0 + 15, Phase.SWITCH, NEW, (OLD, NEW), T0 + 80),
    (T0 + 79.999, Phase.SWITCH, NEW, (OLD, NEW), T0 + 80),
    (T0 + 80, Phase.RETIRE, NEW, (NEW,), None),
    (T0 + 10**6, Phase.RETIRE, NEW, (NEW,), None),
])
def test_the_phases_of_a_prepared_plan(now, phase, signer, trusted, next_at):
    s = decide(plan(), now)
    assert (s.phase, s.signer, s.trusted, s.next_at) == (phase, signer, trusted, next_at)
    assert (s.switch_at, s.retire_at) == (T0 + 15, T0 + 80)


def test_until_the_federation_has_the_new_ca_the_old_one_signs_forever():
    """A plan written while the gateway was stopped (or the federation down) never switches
    before its prepare bundle was accepted: no switch time, however late it is."""
    for now in (T0, T0 + 3600, T0 + 10**7):
        s = decide(plan(prepared_at=None), now)
        assert (s.phase, s.signer, s.trusted) == (Phase.PREPARE, OLD, (OLD, NEW))
        assert s.switch_at is s.retire_at is s.next_at is None
    assert plan(prepared_at=None).prepared(T0 + 7).prepared_at == T0 + 7
    assert plan().prepared(T0 + 99).prepared_at == T0 + 5  # recorded once


@pytest.mark.parametrize(("overlap", "ttl", "skew", "retire_after_switch"), [
    (10.0, 60.0, 5.0, 65.0),  # the old CA's last SVIDs outlive the overlap
    (3600.0, 60.0, 60.0, 3600.0),  # the overlap is the longer wait
    (10.0, 60.0, 0.0, 60.0),
])
def test_retire_waits_for_the_overlap_and_for_every_old_svid_to_expire(overlap, ttl, skew,
                                                                       retire_after_switch):
    s = decide(plan(overlap=overlap, svid_ttl=ttl, skew=skew), T0)
    assert s.retire_at - s.switch_at == retire_after_switch


@given(st.floats(0, 2e4), st.floats(1, 5e3), st.floats(60, 5e3), st.floats(0, 300),
       st.lists(st.floats(T0, T0 + 3e4), min_size=2, max_size=8))
def test_properties_phases_only_go_forward_and_the_signer_is_always_trusted(
        delay, overlap, ttl, skew, times):
    p = plan(prepared_at=T0 + delay, overlap=overlap, svid_ttl=ttl, skew=skew)
    order = [Phase.PREPARE, Phase.SWITCH, Phase.RETIRE]
    seen = [decide(p, t) for t in sorted(times)]
    assert [order.index(s.phase) for s in seen] == sorted(order.index(s.phase) for s in seen)
    for t, s in zip(sorted(times), seen, strict=True):
        assert s.signer in s.trusted
        assert (s.signer == NEW) == (s.phase is not Phase.PREPARE)
        assert (OLD in s.trusted) == (s.phase is not Phase.RETIRE)
        if s.next_at is not None:
            assert s.next_at > t and decide(p, s.next_at).phase != s.phase
        assert s.retire_at - s.switch_at >= max(overlap, ttl) - 1e-3  # both waits (float)


def test_a_plan_survives_json_and_a_bad_one_names_its_field():
    p = plan()
    assert RotationPlan.from_json(p.to_json()) == p
    assert RotationPlan.from_json(plan(prepared_at=None).to_json()).prepared_at is None
    bad = [
        ([], "expected a JSON object"),
        ({**p.to_json(), "old": "XYZ"}, "old: expected a SHA-256 fingerprint"),
        ({**p.to_json(), "new": OLD}, "new: the same CA as old"),
        ({**p.to_json(), "overlap": -1}, "overlap: expected a number"),
        ({**p.to_json(), "overlap": True}, "overlap: expected a number"),
        ({**p.to_json(), "svid_ttl": "1m"}, "svid_ttl: expected a number"),
        ({**p.to_json(), "prepared_at": float("nan")}, "prepared_at: expected a number"),
        ({**p.to_json(), "extra": 1}, "unknown field 'extra'"),
    ]
    for obj, phrase in bad:
        with pytest.raises(InputError, match=phrase) as e:
            RotationPlan.from_json(obj, "state/identity/rotation.json")
        assert str(e.value).startswith("state/identity/rotation.json: ")


@pytest.mark.parametrize(("overlap", "hint", "ok"), [
    (900.0, 300.0, True), (899.0, 300.0, False), (6.0, 2.0, True), (5.0, 2.0, False),
])
def test_the_overlap_is_at_least_three_refresh_hints(overlap, hint, ok):
    why = check_overlap(overlap, hint)
    assert (why is None) == ok
    if not ok:
        assert "shorter than 3 x the bundle refresh hint" in why
