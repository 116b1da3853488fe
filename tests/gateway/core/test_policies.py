"""gateway/core/policies.py: policy attachment precedence (GEP-713), field-by-field merging."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.policies import (
    DEFAULT_TIMEOUTS,
    GATEWAY,
    IMPORT,
    ROUTE,
    Attachment,
    JwtSettings,
    OpenApiSettings,
    Part,
    Policy,
    PolicyIndex,
    PolicySpec,
    TargetRef,
    Timeouts,
    effective_policy,
)
from gateway.core.retry import RetryPolicy

GW = TargetRef(GATEWAY, "east-1")
IMP = TargetRef(IMPORT, "shop", namespace="web")
ROUTE_API = TargetRef(ROUTE, "api", "web", import_="shop")
RULE_READ = TargetRef(ROUTE, "api", "web", "read", "shop")
OTHER_IMPORTS_ROUTE = TargetRef(ROUTE, "api", "web", import_="cart")  # same route name
LEVELS = (RULE_READ, ROUTE_API, IMP, GW)  # most specific first
AT = Attachment("east-1", ("web", "shop"), "api", "read")


def timeouts(**kw) -> Part[Timeouts]:
    return Part.of(Timeouts(**kw), kw)


def pol(name, target, order=0, overrides=None, **defaults) -> Policy:
    spec = PolicySpec(timeouts=timeouts(**defaults)) if defaults else PolicySpec()
    over = PolicySpec(timeouts=timeouts(**overrides)) if overrides else PolicySpec()
    return Policy(name, target, spec, over, order)


@pytest.mark.parametrize(
    "policies, at, request_s, winner",
    [
        ([], AT, DEFAULT_TIMEOUTS.request, None),
        ([pol("g", GW, request=5)], AT, 5, "g"),
        ([pol("g", GW, request=5), pol("i", IMP, request=4)], AT, 4, "i"),
        ([pol("g", GW, request=5), pol("r", ROUTE_API, request=3)], AT, 3, "r"),
        ([pol("r", ROUTE_API, request=3), pol("rr", RULE_READ, request=2)], AT, 2, "rr"),
        # a rule's policy does not reach another rule of the same route
        ([pol("r", ROUTE_API, request=3), pol("rr", RULE_READ, request=2)],
         Attachment("east-1", ("web", "shop"), "api", "write"), 3, "r"),
        # nor a request not yet routed (route unknown: only import and gateway apply)
        ([pol("r", ROUTE_API, request=3), pol("i", IMP, request=4)],
         Attachment("east-1", ("web", "shop")), 4, "i"),
        # a route of the same name in another import is another route
        ([pol("o", OTHER_IMPORTS_ROUTE, request=3), pol("i", IMP, request=4)], AT, 4, "i"),
        # another gateway's and another import's policies do not apply
        ([pol("g2", TargetRef(GATEWAY, "west-1"), request=9),
          pol("i2", TargetRef(IMPORT, "shop", namespace="other"), request=8)],
         AT, DEFAULT_TIMEOUTS.request, None),
        # overrides: the least specific wins, over every default
        ([pol("g", GW, overrides={"request": 9}), pol("rr", RULE_READ, request=2)], AT, 9, "g"),
        ([pol("i", IMP, overrides={"request": 7}), pol("g", GW, overrides={"request": 9})],
         AT, 9, "g"),
        ([pol("rr", RULE_READ, overrides={"request": 1}), pol("r", ROUTE_API, request=3)],
         AT, 1, "rr"),
        # same target: listed first wins, then the name
        ([pol("b", ROUTE_API, order=2, request=3), pol("a", ROUTE_API, order=1, request=6)],
         AT, 6, "a"),
        ([pol("b", ROUTE_API, request=3), pol("a", ROUTE_API, request=6)], AT, 6, "a"),
    ],
)
def test_precedence(policies, at, request_s, winner):
    got = effective_policy(at, policies)
    assert got.timeouts.request == request_s
    assert got.source("timeouts.request") == winner
    assert PolicyIndex(policies).effective(at) == got


def test_fields_merge_leaf_by_leaf():
    policies = [
        pol("g", GW, request=20, idle=60),
        pol("r", ROUTE_API, backend_request=2),
        Policy("retry-g", GW, PolicySpec(retry=Part.of(RetryPolicy(attempts=5), ["attempts"]))),
        Policy("retry-r", ROUTE_API,
               PolicySpec(retry=Part.of(RetryPolicy(codes=frozenset({502})), ["codes"]))),
    ]
    got = effective_policy(AT, policies)
    assert got.timeouts == Timeouts(request=20, backend_request=2, idle=60)
    assert (got.retry.attempts, got.retry.codes) == (5, frozenset({502}))
    assert got.retry.backoff_cap == RetryPolicy().backoff_cap  # nobody set it
    assert dict(got.sources) == {
        "timeouts.request": "g", "timeouts.idle": "g", "timeouts.backend_request": "r",
        "retry.attempts": "retry-g", "retry.codes": "retry-r",
    }


def test_jwt_and_openapi_merge_as_whole_blocks():
    gw_jwt = JwtSettings("https://idp.example", ("shop",), jwks_file="/etc/jwks.json",
                         required_claims=("sub",))
    route_jwt = JwtSettings("https://other.example", ("api",), jwks_url="https://k/jwks")
    spec = OpenApiSettings("/etc/shop.yaml")
    policies = [
        Policy("g", GW, PolicySpec(jwt=gw_jwt, openapi=spec)),
        Policy("r", ROUTE_API, PolicySpec(jwt=route_jwt)),
    ]
    got = effective_policy(AT, policies)
    assert got.jwt == route_jwt  # nothing of the gateway's issuer or claims mixed in
    assert got.openapi == spec
    assert (got.source("jwt"), got.source("openapi")) == ("r", "g")


@pytest.mark.parametrize(
    "set_, expected",
    [
        (Timeouts(request=10), Timeouts(10, 10, DEFAULT_TIMEOUTS.idle)),
        (Timeouts(request=10, backend_request=3), Timeouts(10, 3, DEFAULT_TIMEOUTS.idle)),
        (Timeouts(request=10, backend_request=30), Timeouts(10, 10, DEFAULT_TIMEOUTS.idle)),
        (Timeouts(request=0, backend_request=3), Timeouts(None, 3, DEFAULT_TIMEOUTS.idle)),
        (Timeouts(request=0, backend_request=0, idle=0), Timeouts(None, None, None)),
    ],
)
def test_timeouts_resolve_like_httproute(set_, expected):
    names = [n for n in ("request", "backend_request", "idle") if getattr(set_, n) is not None]
    got = effective_policy(AT, [Policy("p", GW, PolicySpec(timeouts=Part.of(set_, names)))])
    assert got.timeouts == expected


@pytest.mark.parametrize("per_try, backend, expected", [
    (None, None, DEFAULT_TIMEOUTS.request),  # backend_request defaults to request
    (1.0, None, 1.0),
    (1.0, 0.5, 0.5),
    (None, 2.0, 2.0),
])
def test_one_try_is_bounded_by_per_try_and_backend_request(per_try, backend, expected):
    policies = [Policy("r", GW, PolicySpec(retry=Part.of(RetryPolicy(per_try_timeout=per_try),
                                                         ["per_try_timeout"])))]
    if backend is not None:
        policies.append(Policy("t", GW, PolicySpec(timeouts=timeouts(backend_request=backend))))
    assert effective_policy(AT, policies).try_timeout == expected


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        TargetRef("Service", "x")
    with pytest.raises(ValueError):
        TargetRef(IMPORT, "x", section="rule")
    with pytest.raises(ValueError):
        TargetRef(ROUTE, "x")  # without its import
    with pytest.raises(ValueError):
        TargetRef(IMPORT, "x", import_="y")
    with pytest.raises(ValueError):
        Part.of(Timeouts(), ["requests"])


# --- properties ---------------------------------------------------------------------------

FIELDS = ("request", "backend_request", "idle")
policy_st = st.builds(
    lambda i, level, over, values: (i, level, over, values),
    st.integers(0, 5),
    st.integers(0, len(LEVELS) - 1),
    st.booleans(),
    st.dictionaries(st.sampled_from(FIELDS), st.integers(1, 100).map(float), min_size=1),
)


def build(raw) -> list[Policy]:
    out = []
    for n, (order, level, over, values) in enumerate(raw):
        spec = PolicySpec(timeouts=timeouts(**values))
        out.append(Policy(f"p{n:02d}", LEVELS[level],
                          PolicySpec() if over else spec, spec if over else PolicySpec(), order))
    return out


def rank(p: Policy) -> tuple:
    """The declarative rule: overrides first, least specific first; then defaults, most
    specific first; then listed first; then the name."""
    level = LEVELS.index(p.target)
    if not p.overrides.empty:
        return (0, -level, p.order, p.name)
    return (1, level, p.order, p.name)


@settings(max_examples=300)
@given(st.lists(policy_st, max_size=12), st.randoms())
def test_each_field_comes_from_the_best_ranked_policy_that_sets_it(raw, rnd):
    policies = build(raw)
    shuffled = list(policies)
    rnd.shuffle(shuffled)
    got = effective_policy(AT, shuffled)
    for name in FIELDS:
        setters = [p for p in policies
                   if name in ((p.defaults.timeouts or p.overrides.timeouts).names)]
        expected = min(setters, key=rank).name if setters else None
        assert got.source(f"timeouts.{name}") == expected
    assert got == effective_policy(AT, policies)  # the listing order only matters via `order`
    assert got == PolicyIndex(shuffled).effective(AT)
    t = got.timeouts
    if t.request is not None:
        assert t.backend_request is not None and t.backend_request <= t.request


def test_index_cache_stays_bounded():
    index = PolicyIndex([pol("g", GW, request=5)], max_cached=4)
    for i in range(10):
        assert index.effective(Attachment("east-1", ("web", f"s{i}"))).timeouts.request == 5
    assert len(index._cache) <= 4
