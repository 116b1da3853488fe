"""gateway/core/routes.py: HTTPRoute matching, precedence, weights and filters (pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.model import ServiceKey
from gateway.core.routes import (
    Backend,
    HeaderMatch,
    HeaderModifier,
    Match,
    Redirect,
    Rewrite,
    Route,
    Rule,
    compile_routes,
    modify_headers,
    pick,
    redirect_location,
    rewrite_path,
)

V1, V2 = ServiceKey("default", "web-v1"), ServiceKey("default", "web-v2")


def rule(tag: str, *matches: Match) -> Rule:
    return Rule(matches=matches or (Match(),), backends=(Backend(ServiceKey("t", tag)),))


def which(routes, method="GET", path="/", headers=None, query=None, host=""):
    got = compile_routes(routes).match(method, path, headers or {}, query or {}, host)
    return None if got is None else got[1].backends[0].service.name


@pytest.mark.parametrize("kind, want, path, ok", [
    ("PathPrefix", "/foo", "/foo", True),
    ("PathPrefix", "/foo", "/foo/", True),
    ("PathPrefix", "/foo", "/foo/bar", True),
    ("PathPrefix", "/foo", "/foobar", False),
    ("PathPrefix", "/foo/", "/foo", True),
    ("PathPrefix", "/", "/anything", True),
    ("Exact", "/foo", "/foo", True),
    ("Exact", "/foo", "/foo/", False),
    ("RegularExpression", "/v[0-9]+/.*", "/v2/items", True),
    ("RegularExpression", "/v[0-9]+", "/v2/items", False),  # a full match
])
def test_path_kinds(kind, want, path, ok):
    routes = [Route("r", (rule("hit", Match(kind, want)),))]
    assert (which(routes, path=path) == "hit") is ok


def test_headers_query_and_method_all_must_hold():
    m = Match(headers=(HeaderMatch("X-Env", "canary"),
                       HeaderMatch("user-agent", "curl/.*", "RegularExpression")),
              query=(HeaderMatch("debug", "1"),), method="POST")
    routes = [Route("r", (rule("hit", m),))]
    good = dict(headers={"x-env": "canary", "user-agent": "curl/8.1"}, query={"debug": "1"},
                method="POST")
    assert which(routes, **good) == "hit"
    for bad in ({"method": "GET"}, {"query": {}}, {"headers": {"x-env": "canary"}},
                {"headers": {"x-env": "prod", "user-agent": "curl/8"}}):
        assert which(routes, **{**good, **bad}) is None


def test_precedence_across_routes_and_rules():
    routes = [
        Route("a", (rule("prefix-short", Match("PathPrefix", "/api")),
                    rule("regex", Match("RegularExpression", "/api/o.*")))),
        Route("b", (rule("exact", Match("Exact", "/api/items")),
                    rule("prefix-long", Match("PathPrefix", "/api/items")),
                    rule("method", Match("PathPrefix", "/api/items", method="GET")),
                    rule("headers", Match("PathPrefix", "/api/items",
                                          headers=(HeaderMatch("x", "1"),))))),
    ]
    assert which(routes, path="/api/items") == "exact"
    assert which(routes, path="/api/items/1") == "method"  # method beats no method
    assert which(routes, path="/api/items/1", method="PUT", headers={"x": "1"}) == "headers"
    assert which(routes, path="/api/items/1", method="PUT") == "prefix-long"
    assert which(routes, path="/api/other") == "regex"  # a regex beats a prefix
    assert which(routes, path="/api/zz") == "prefix-short"


def test_ties_go_to_the_first_route_then_the_first_rule():
    routes = [Route("a", (rule("a1", Match("PathPrefix", "/x")), rule("a2", Match("PathPrefix",
                                                                                  "/x")))),
              Route("b", (rule("b1", Match("PathPrefix", "/x")),))]
    assert which(routes, path="/x/y") == "a1"


def test_hostnames():
    routes = [Route("a", (rule("api"),), hostnames=("api.example.com",)),
              Route("w", (rule("wild"),), hostnames=("*.example.com",)),
              Route("any", (rule("any"),))]
    assert which(routes, host="api.example.com:8080") == "api"
    assert which(routes, host="web.example.com") == "wild"
    assert which(routes, host="example.com") == "any"


def test_canary_weights_within_binomial_tolerance():
    rng = random.Random(7)
    b = (Backend(V1, 99), Backend(V2, 1))
    n = 20_000
    got = Counter(pick(b, rng.random).service for _ in range(n))
    # 1%: mean 200, sd ~14; 5 sd either side
    assert 130 <= got[V2] <= 270, got


def test_zero_weights():
    assert pick((Backend(V1, 0), Backend(V2, 0)), random.random) is None
    assert all(pick((Backend(V1, 0), Backend(V2, 3)), random.random).service == V2
               for _ in range(100))


@given(st.lists(st.integers(0, 50), min_size=1, max_size=6), st.floats(0, 1, exclude_max=True))
def test_pick_never_returns_a_zero_weight(weights, x):
    backends = [Backend(ServiceKey("t", str(i)), w) for i, w in enumerate(weights)]
    got = pick(backends, lambda: x)
    assert (got is None) == (sum(weights) == 0)
    assert got is None or got.weight > 0


def test_header_modifier():
    h = [("Host", "a"), ("X-Old", "1"), ("x-keep", "k"), ("X-Set", "old")]
    got = modify_headers(h, HeaderModifier(set=(("x-set", "new"),), add=(("X-Add", "v"),),
                                           remove=("x-old",)))
    assert got == [("Host", "a"), ("x-keep", "k"), ("x-set", "new"), ("X-Add", "v")]


@pytest.mark.parametrize("match, kind, new, path, want", [
    (Match("PathPrefix", "/foo"), "ReplacePrefixMatch", "/xyz", "/foo/bar", "/xyz/bar"),
    (Match("PathPrefix", "/foo"), "ReplacePrefixMatch", "/xyz", "/foo", "/xyz"),
    (Match("PathPrefix", "/foo"), "ReplacePrefixMatch", "/", "/foo/bar", "/bar"),
    (Match("PathPrefix", "/foo"), "ReplacePrefixMatch", "/", "/foo", "/"),
    (Match("PathPrefix", "/foo/"), "ReplacePrefixMatch", "/xyz/", "/foo/", "/xyz/"),
    (Match("PathPrefix", "/foo"), "ReplaceFullPath", "/other", "/foo/bar", "/other"),
])
def test_rewrite_paths(match, kind, new, path, want):
    assert rewrite_path(Rewrite(path_kind=kind, path=new), path, match) == want


def test_redirect_location():
    m = Match("PathPrefix", "/old")
    rd = Redirect(scheme="https", hostname="new.example", path_kind="ReplacePrefixMatch",
                  path="/new", status=301)
    assert redirect_location(rd, "http", "web:8080", "/old/a", "q=1", m) == \
        "https://new.example/new/a?q=1"  # a new scheme: its well-known port
    assert redirect_location(Redirect(hostname="b"), "http", "web:8080", "/x", "", m) == \
        "http://b:8080/x"  # the request's port
    assert redirect_location(Redirect(scheme="https", port=443), "http", "web", "/x", "", m) \
        == "https://web/x"
