"""The lifecycle of an east-west link: keep it, replace it (make-before-break), or close it now.

Theory of operation
-------------------
A link between two gateways (gateway/dataplane/mux.py) is authenticated once, at its TLS
handshake: each side checks the other's SVID against the bundle of the other's trust domain.
What held then is the link's `LinkFacts` (the peer's certificate, our SVID, the peer's bundle).
Certificates expire and rotate, bundles change, clusters leave the federation, so every link
is judged again (`decide`) whenever the gateway's TLS material changes and on a sweep about once
a second, against what holds now (`LinkNow`). Close rules come first:

    CLOSE now   "cluster-removed"    the peer's cluster left the federation: no bundle for its
                                     trust domain any more (or it belongs to another cluster)
                "revoked"            the peer's certificate no longer verifies against its
                                     bundle (e.g. the authority that signed it was removed)
                "peer-cert-expired"  a certificate of the link expires within `margin` (the
                "own-cert-expired"   next sweep would be too late): no link carries traffic past
                                     the expiry of either certificate
    REPLACE     "own-svid-rotated"   our SVID changed since the handshake: the peer must see it
                "peer-bundle-changed" the peer's bundle changed (sequence or authorities)
                "half-life"          `now` passed the earlier of the two certificates' rotation
                                     points (`federation.identity.half_life`), and the link was
                                     made before that point
    KEEP        otherwise

The rotation points make a link be replaced well before either certificate expires, even when
the peer never rotates or never says so. Only a link made *before* the point is replaced for
it: a link dialled just after it still meets the peer's old certificate (the peer rotates a
moment later), and replacing that one again would gain nothing; the peer's own rule
("own-svid-rotated": it sends GOAWAY) replaces it as soon as it rotates.

How the shells act on a verdict: the caller (pool.py) replaces make-before-break: it dials the
new link first, then retires the old one (no new streams; it closes after its last stream). The
answerer (l4.py) cannot dial; it sends GOAWAY once, and the caller then does the same. A retired
link is still judged, for the close rules only. CLOSE aborts the link: streams still on it are
reset (and counted). So a stream outlives the replacement of its link, but not the certificates
of that link: it is guaranteed about half the SVID TTL after it opened (with the default 24 h
SVIDs, ~12 h; with `identity.svid_ttl: 1m`, ~30 s); a stream open longer than that may be cut
when the older certificate of its link expires.

Pure: no I/O; the clock (`now`, epoch seconds, as in certificates) is passed in, and whether
the peer's certificate verifies against its current bundle is computed by the caller
(gateway/dataplane/tls.py, which does so only when the bundle changed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from federation.identity import TrustBundle, half_life

__all__ = ["Action", "Verdict", "LinkFacts", "LinkNow", "decide", "same_bundle", "KEEP"]

CLUSTER_REMOVED = "cluster-removed"
REVOKED = "revoked"
PEER_CERT_EXPIRED = "peer-cert-expired"
OWN_CERT_EXPIRED = "own-cert-expired"
OWN_SVID_ROTATED = "own-svid-rotated"
PEER_BUNDLE_CHANGED = "peer-bundle-changed"
HALF_LIFE = "half-life"

CLOSE_REASONS = (CLUSTER_REMOVED, REVOKED, PEER_CERT_EXPIRED, OWN_CERT_EXPIRED)
REPLACE_REASONS = (OWN_SVID_ROTATED, PEER_BUNDLE_CHANGED, HALF_LIFE)


class Action(Enum):
    KEEP = "keep"
    REPLACE = "replace"  # make-before-break: a new link first, then retire this one
    CLOSE = "close"  # abort now: its streams are reset


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str = ""  # one of CLOSE_REASONS / REPLACE_REASONS; "" for KEEP


KEEP = Verdict(Action.KEEP)


def same_bundle(a: TrustBundle | None, b: TrustBundle | None) -> bool:
    """The same trust: sequence and authorities (the refresh hint does not matter)."""
    if a is None or b is None:
        return a is b
    return a.sequence == b.sequence and a.authorities == b.authorities


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What one link was authenticated with, recorded at its handshake."""

    role: str  # "caller" | "answerer"
    peer: str  # the peer's cluster
    trust_domain: str  # the peer's trust domain
    peer_cert: bytes  # DER: checked again against the peer's bundle when that changes
    peer_serial: int
    peer_not_before: float
    peer_not_after: float
    own_serial: int  # the SVID we presented
    own_not_before: float
    own_not_after: float
    bundle: TrustBundle  # the peer's bundle that verified it
    made_at: float  # epoch seconds

    @property
    def rotate_at(self) -> float:
        """The earlier of the two certificates' rotation points."""
        return min(half_life(self.peer_not_before, self.peer_not_after),
                   half_life(self.own_not_before, self.own_not_after))

    @property
    def expires_at(self) -> float:
        """The earlier expiry: after it, the link carries nothing."""
        return min(self.peer_not_after, self.own_not_after)


@dataclass(frozen=True, slots=True)
class LinkNow:
    """What holds now, for one link."""

    own_serial: int  # our current SVID
    bundle: TrustBundle | None  # the peer's bundle now; None: its cluster left the federation
    verifies: bool = True  # the link's peer certificate verifies against `bundle` now


def decide(facts: LinkFacts, state: LinkNow, now: float, margin: float = 0.0) -> Verdict:
    """Keep, replace or close one link (the table in the module docstring). `margin`: how
    long before an expiry the link is closed (the shell's sweep interval)."""
    if state.bundle is None:
        return Verdict(Action.CLOSE, CLUSTER_REMOVED)
    if not state.verifies:
        return Verdict(Action.CLOSE, REVOKED)
    if now + margin >= facts.peer_not_after:
        return Verdict(Action.CLOSE, PEER_CERT_EXPIRED)
    if now + margin >= facts.own_not_after:
        return Verdict(Action.CLOSE, OWN_CERT_EXPIRED)
    if state.own_serial != facts.own_serial:
        return Verdict(Action.REPLACE, OWN_SVID_ROTATED)
    if not same_bundle(state.bundle, facts.bundle):
        return Verdict(Action.REPLACE, PEER_BUNDLE_CHANGED)
    due = facts.rotate_at
    if now >= due > facts.made_at:
        return Verdict(Action.REPLACE, HALF_LIFE)
    return KEEP
