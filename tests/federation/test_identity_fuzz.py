"""What a peer sends about identity, fuzzed (Hypothesis): SPIFFE bundles (JWKS), certificates
(DER), SPIFFE IDs. Each parser either returns a value or raises IdentityError naming what was
wrong, whatever the input: never another exception (a crash of the caller: the federation's
bundle PUT handler, a gateway's link check, the agent's bundle refresh).

Inputs are valid ones mutated (a byte flipped, cut short, a field replaced by any JSON value)
as well as arbitrary ones, so the fuzz reaches the deep branches, not just "not JSON".
"""

from __future__ import annotations

import base64
import copy
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.ca import CertificateAuthority
from federation.errors import IsthmusError
from federation.identity import SpiffeId, TrustBundle, gateway_id, spiffe_id_of, verify_svid

TD = "east-1.isthmus.local"
NOW = time.time()
CA = CertificateAuthority.create(TD, NOW)
BUNDLE = CA.bundle(3)
JWKS = BUNDLE.to_jwks()
LEAF = CA.issue(gateway_id(TD), NOW).cert_der()
FEW = settings(max_examples=150, deadline=None)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)


def _raises_only_identity_errors(fn, *args) -> None:
    try:
        fn(*args)
    except IsthmusError:
        pass  # a refusal that names what was wrong


@st.composite
def mutated_der(draw, der: bytes = LEAF) -> bytes:
    data = bytearray(der)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def mutated_jwks(draw) -> dict:
    obj = copy.deepcopy(JWKS)
    key = obj["keys"][0]
    where = draw(st.sampled_from(["top", "key", "x5c", "cert"]))
    if where == "top":
        obj[draw(st.sampled_from(["keys", "spiffe_sequence", "spiffe_refresh_hint", "x"]))] = \
            draw(JSON)
    elif where == "key":
        key[draw(st.sampled_from(["use", "kty", "crv", "x", "y", "n", "e", "x5c", "kid"]))] = \
            draw(JSON)
    elif where == "x5c":
        key["x5c"] = [draw(st.text(max_size=40) | st.binary(max_size=30).map(
            lambda b: base64.b64encode(b).decode()))]
    else:  # a certificate damaged inside valid base64
        key["x5c"] = [base64.b64encode(draw(mutated_der(CA.cert_der))).decode()]
    return obj


@FEW
@given(JSON)
def test_any_json_as_a_bundle_is_refused_cleanly(obj):
    _raises_only_identity_errors(TrustBundle.from_jwks, TD, obj)


@FEW
@given(mutated_jwks())
def test_a_mutated_bundle_is_refused_cleanly_or_parsed(obj):
    _raises_only_identity_errors(TrustBundle.from_jwks, TD, obj)


@FEW
@given(st.binary(max_size=300) | mutated_der())
def test_a_damaged_certificate_is_refused_cleanly(der):
    _raises_only_identity_errors(spiffe_id_of, der)
    _raises_only_identity_errors(verify_svid, der, BUNDLE, NOW)


@FEW
@given(st.text(max_size=80) | st.from_regex(r"spiffe://[a-z0-9.\-_%]{0,20}(/[^/]{0,8}){0,4}",
                                            fullmatch=True))
def test_any_text_as_a_spiffe_id_is_refused_cleanly(text):
    _raises_only_identity_errors(SpiffeId.parse, text)


def test_the_unmutated_inputs_parse():  # the mutations start from valid values
    assert TrustBundle.from_jwks(TD, JWKS).sequence == 3
    assert str(verify_svid(LEAF, BUNDLE, NOW)) == str(gateway_id(TD))
