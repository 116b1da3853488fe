"""The link lifecycle decision (gateway/core/links.py): tables of cases on fake times, and
properties over all times (Hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.identity import TrustBundle, half_life
from gateway.core.links import (
    CLUSTER_REMOVED,
    HALF_LIFE,
    KEEP,
    OWN_CERT_EXPIRED,
    OWN_SVID_ROTATED,
    PEER_BUNDLE_CHANGED,
    PEER_CERT_EXPIRED,
    REVOKED,
    Action,
    LinkFacts,
    LinkNow,
    Verdict,
    decide,
    same_bundle,
)

TD = "b.isthmus.local"
BUNDLE = TrustBundle(TD, (b"ca-1",), 3)


def facts(peer_issued=1000.0, own_issued=1010.0, ttl=60.0, made_at=1020.0, **kw) -> LinkFacts:
    """A link between two 1 m SVIDs issued as the CA issues them (valid from issued - 60 s to
    issued + ttl): the peer's rotates at 1030, ours at 1040; the link was made at 1020."""
    base = LinkFacts("caller", "cluster-b", TD, b"peer-der", 7, peer_issued - 60,
                     peer_issued + ttl, 11, own_issued - 60, own_issued + ttl, BUNDLE, made_at)
    return dataclasses.replace(base, **kw)


NOW_OK = LinkNow(own_serial=11, bundle=BUNDLE)


def test_the_fixture_times():
    f = facts()
    assert half_life(f.peer_not_before, f.peer_not_after) == 1030
    assert half_life(f.own_not_before, f.own_not_after) == 1040
    assert f.rotate_at == 1030 and f.expires_at == 1060


@pytest.mark.parametrize("what, f, state, now, want", [
    ("fresh link", facts(), NOW_OK, 1025, KEEP),
    ("just before the peer's half life", facts(), NOW_OK, 1029.9, KEEP),
    ("the peer's half life passed", facts(), NOW_OK, 1030, Verdict(Action.REPLACE, HALF_LIFE)),
    ("ours is the earlier half life", facts(peer_issued=1020, own_issued=1000, made_at=1010),
     NOW_OK, 1031, Verdict(Action.REPLACE, HALF_LIFE)),
    ("made after the half life: replacing again gains nothing", facts(made_at=1031), NOW_OK,
     1040, KEEP),
    ("we rotated", facts(), LinkNow(12, BUNDLE), 1021, Verdict(Action.REPLACE, OWN_SVID_ROTATED)),
    ("the peer's bundle changed (sequence)", facts(), LinkNow(11, TrustBundle(TD, (b"ca-1",), 4)),
     1021, Verdict(Action.REPLACE, PEER_BUNDLE_CHANGED)),
    ("the peer's bundle changed (an authority added)", facts(),
     LinkNow(11, TrustBundle(TD, (b"ca-1", b"ca-2"), 3)), 1021,
     Verdict(Action.REPLACE, PEER_BUNDLE_CHANGED)),
    ("only the refresh hint changed", facts(), LinkNow(11, TrustBundle(TD, (b"ca-1",), 3, 60)),
     1021, KEEP),
    ("the cluster left the federation", facts(), LinkNow(11, None), 1021,
     Verdict(Action.CLOSE, CLUSTER_REMOVED)),
    ("the peer's cert no longer verifies", facts(),
     LinkNow(11, TrustBundle(TD, (b"ca-2",), 4), verifies=False), 1021,
     Verdict(Action.CLOSE, REVOKED)),
    ("the peer's cert expired", facts(), NOW_OK, 1060, Verdict(Action.CLOSE, PEER_CERT_EXPIRED)),
    ("the peer's cert expires within the margin", facts(), NOW_OK, 1058.6,
     Verdict(Action.CLOSE, PEER_CERT_EXPIRED)),
    ("our cert expired", facts(peer_issued=1020, own_issued=1000), NOW_OK, 1061,
     Verdict(Action.CLOSE, OWN_CERT_EXPIRED)),
    ("close wins over replace: removed while we rotated", facts(), LinkNow(12, None), 1021,
     Verdict(Action.CLOSE, CLUSTER_REMOVED)),
    ("close wins over replace: expired and rotated", facts(), LinkNow(12, BUNDLE), 1070,
     Verdict(Action.CLOSE, PEER_CERT_EXPIRED)),
    ("the answerer decides the same", facts(role="answerer"), LinkNow(12, BUNDLE), 1021,
     Verdict(Action.REPLACE, OWN_SVID_ROTATED)),
])
def test_decide(what, f, state, now, want):
    assert decide(f, state, now, margin=1.5) == want, what


def test_same_bundle():
    assert same_bundle(BUNDLE, TrustBundle(TD, (b"ca-1",), 3, refresh_hint=5))
    assert not same_bundle(BUNDLE, TrustBundle(TD, (b"ca-1",), 2))
    assert not same_bundle(BUNDLE, None) and same_bundle(None, None)


times = st.floats(min_value=900, max_value=1200, allow_nan=False)


@given(now=times, made=st.floats(min_value=950, max_value=1059), margin=st.floats(0, 5))
def test_no_link_is_kept_or_replaced_past_an_expiry(now, made, margin):
    """Whatever the time, a link whose certificate expires within the margin is closed."""
    f = facts(made_at=made)
    v = decide(f, NOW_OK, now, margin)
    if now + margin >= f.expires_at:
        assert v.action is Action.CLOSE
    else:
        assert v.action is not Action.CLOSE


@given(now=times, made=st.floats(min_value=950, max_value=1059))
def test_a_link_is_replaced_before_it_expires(now, made):
    """Made before its rotation point, a link is due for replacement from that point on, a full
    half of the shorter validity before it expires; made after it, it is never replaced for
    age (which would loop), only closed at expiry."""
    f = facts(made_at=made)
    v = decide(f, NOW_OK, now)
    if made < f.rotate_at <= now < f.expires_at:
        assert v == Verdict(Action.REPLACE, HALF_LIFE)
        assert f.expires_at - f.rotate_at >= 25
    elif now < f.expires_at:
        assert v == KEEP
