"""gateway/config/policy_objects.py: the `policies` list of a service file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.policy_objects import parse_policies
from gateway.config.reader import Reader, _child
from gateway.core.policies import (
    GATEWAY,
    IMPORT,
    ROUTE,
    Attachment,
    JwtSettings,
    OpenApiSettings,
    RetryPolicy,
    TargetRef,
    Timeouts,
    effective_policy,
)
from gateway.errors import Problem

FILE = "/etc/isthmus/services/shop.yaml"


def read(text: str, first_order: int = 0):
    r = Reader(FILE, Path(FILE).parent)
    root = r.compose(text)
    assert root is not None, r.problems
    return parse_policies(r, _child(root, "policies"), first_order=first_order), r


def problems(text: str) -> list[Problem]:
    policies, r = read(text)
    assert r.problems, f"expected problems, got {policies}"
    return r.problems


FULL = """\
policies:
  - name: shop-defaults
    targetRef: {kind: Import, name: shop, namespace: web}
    timeouts: {request: 10s, backendRequest: 2s, idle: 1m}
    retry:
      attempts: 3
      per_try_timeout: 1s
      backoff_base: 50ms
      backoff_cap: 1s
      retry_on: [connect-failure, reset, 5xx]
      codes: [429, 503]
      methods: [GET, PUT]
      budget: {percent: 20, min_per_second: 5, window: 30s}
  - name: api-auth
    targetRef: {kind: Route, name: api, import: shop, namespace: web, sectionName: read}
    jwt:
      issuer: https://idp.example
      audiences: [shop]
      jwks_file: keys/jwks.json
      clock_skew: 10s
      required_claims: [sub]
      claim_headers: {sub: X-User, tenant: x-tenant}
    openapi: {spec: shop-openapi.yaml, unknown_fields: drop, max_body_bytes: 65536}
  - name: admin-pins
    targetRef: {kind: Gateway, name: east-1}
    overrides:
      timeouts: {idle: 30s}
"""


def test_a_full_list():
    (imp, auth, admin), r = read(FULL, first_order=7)
    assert r.problems == [] and r.warnings == []
    assert imp.target == TargetRef(IMPORT, "shop", namespace="web")
    assert imp.order == 7 and auth.order == 8
    assert imp.defaults.timeouts.value == Timeouts(10.0, 2.0, 60.0)
    retry = imp.defaults.retry
    assert retry.value == RetryPolicy(
        attempts=3, per_try_timeout=1.0, backoff_base=0.05, backoff_cap=1.0,
        retry_on=frozenset({"connect-failure", "reset", "5xx"}), codes=frozenset({429, 503}),
        methods=frozenset({"GET", "PUT"}), budget_ratio=0.2, budget_min_per_second=5.0,
        budget_window=30.0)
    assert len(retry.names) == 10
    assert auth.target == TargetRef(ROUTE, "api", "web", "read", "shop")
    assert auth.defaults.jwt == JwtSettings(
        "https://idp.example", ("shop",), jwks_file="/etc/isthmus/services/keys/jwks.json",
        clock_skew=10.0, required_claims=("sub",),
        claim_headers=(("sub", "x-user"), ("tenant", "x-tenant")))
    assert auth.defaults.openapi == OpenApiSettings(
        "/etc/isthmus/services/shop-openapi.yaml", "drop", 65536, "")
    assert admin.target == TargetRef(GATEWAY, "east-1") and admin.defaults.empty
    assert admin.overrides.timeouts.names == {"idle"}
    got = effective_policy(Attachment("east-1", ("web", "shop"), "api", "read"), [imp, auth, admin])
    assert got.timeouts == Timeouts(10.0, 2.0, 30.0)  # the gateway's override wins on idle
    assert got.jwt == auth.defaults.jwt


def test_only_what_is_written_counts():
    (p,), r = read("policies:\n  - name: p\n    targetRef: {kind: Route, name: api, import: s}\n"
                   "    retry: {attempts: 0}\n")
    assert p.defaults.retry.names == {"attempts"} and p.defaults.retry.value.attempts == 0
    assert p.defaults.timeouts is None


def test_a_jwks_url_on_loopback_may_be_http():
    (p,), r = read("policies:\n  - name: p\n    targetRef: {kind: Gateway, name: east-1}\n"
                   "    jwt: {issuer: me, audiences: [a], jwks_url: 'http://127.0.0.1:9000/k'}\n")
    assert p.defaults.jwt.jwks_url == "http://127.0.0.1:9000/k"


def test_unsafe_retry_methods_are_a_warning():
    (p,), r = read("policies:\n  - name: p\n    targetRef: {kind: Route, name: api, import: s}\n"
                   "    retry: {methods: [GET, post]}\n")
    assert p.defaults.retry.value.methods == {"GET", "POST"}
    assert [w.path for w in r.warnings] == ["policies[0].retry.methods"]


HEAD = "policies:\n  - name: p\n    targetRef: {kind: Route, name: api, import: s}\n"  # 1-3


@pytest.mark.parametrize(
    "body, line, path, message",
    [
        ("    timeout: {request: 1s}\n", 4, "policies[0].timeout", "unknown field 'timeout'"),
        ("    timeouts: {request: 200}\n", 4, "policies[0].timeouts.request", "with a unit"),
        ("    timeouts: {request: 1s, backendRequest: 2s}\n", 4,
         "policies[0].timeouts.backendRequest", "at most request"),
        ("    timeouts: {requests: 1s}\n", 4, "policies[0].timeouts.requests", "unknown field"),
        ("    retry: {attempts: 17}\n", 4, "policies[0].retry.attempts", "not in 0..16"),
        ("    retry: {retry_on: [sometimes]}\n", 4, "policies[0].retry.retry_on[0]",
         "not a retry condition"),
        ("    retry: {codes: [200]}\n", 4, "policies[0].retry.codes[0]", "not in 400..599"),
        ("    retry: {methods: ['GE T']}\n", 4, "policies[0].retry.methods[0]", "not a valid"),
        ("    retry: {backoff_base: 2s, backoff_cap: 1s}\n", 4,
         "policies[0].retry.backoff_base", "at most backoff_cap"),
        ("    retry: {budget: {percent: 101}}\n", 4, "policies[0].retry.budget.percent",
         "not in 0..100"),
        ("    jwt: {issuer: me, audiences: [a]}\n", 4, "policies[0].jwt", "exactly one"),
        ("    jwt: {issuer: me, audiences: [a], jwks_file: k, jwks_url: 'https://k'}\n", 4,
         "policies[0].jwt", "both are set"),
        ("    jwt: {issuer: me, audiences: [], jwks_file: k}\n", 4,
         "policies[0].jwt.audiences", "at least 1"),
        ("    jwt: {issuer: me, audiences: [a], jwks_url: 'http://10.0.0.1/k'}\n", 4,
         "policies[0].jwt.jwks_url", "loopback"),
        ("    jwt: {issuer: me, audiences: [a], jwks_file: k, algorithms: [HS256]}\n", 4,
         "policies[0].jwt.algorithms[0]", "forge"),
        ("    jwt: {issuer: me, audiences: [a], jwks_file: k, algorithms: [none]}\n", 4,
         "policies[0].jwt.algorithms[0]", "never accepted"),
        ("    jwt: {issuer: me, audiences: [a], jwks_file: k, claim_headers: {sub: Host}}\n",
         4, "policies[0].jwt.claim_headers.sub", "proxy owns"),
        ("    jwt: {issuer: me, audiences: [a], jwks_file: k, clock_skew: 10m}\n", 4,
         "policies[0].jwt.clock_skew", "too long"),
        ("    openapi: {spec: s.yaml, unknown_fields: keep}\n", 4,
         "policies[0].openapi.unknown_fields", "'reject' or 'drop'"),
        ("    openapi: {spec: s.yaml, base_path: api}\n", 4, "policies[0].openapi.base_path",
         "starting with '/'"),
        ("    overrides: {}\n", 4, "policies[0].overrides", "sets nothing"),
        ("", 2, "policies[0]", "sets nothing"),
    ],
)
def test_problems_name_line_field_and_reason(body, line, path, message):
    got = problems(HEAD + body)
    assert any(p.line == line and p.path == path and message in p.message for p in got), got
    assert str(got[0]).startswith(f"{FILE}:")


@pytest.mark.parametrize(
    "ref, path, message",
    [
        ("{kind: Service, name: a}", "policies[0].targetRef.kind", "not a supported"),
        ("{kind: Import, name: a, sectionName: r}", "policies[0].targetRef.sectionName",
         "only a Route"),
        ("{kind: Gateway, name: a, namespace: web}", "policies[0].targetRef.namespace",
         "no namespace"),
        ("{kind: Import, name: a, import: b}", "policies[0].targetRef.import", "only a Route"),
        ("{kind: Route, name: a}", "policies[0].targetRef.import", "unique per import"),
        ("{kind: Route}", "policies[0].targetRef.name", "missing required"),
        ("{kind: Route, name: Bad_Name}", "policies[0].targetRef.name", "not a valid name"),
    ],
)
def test_bad_target_refs(ref, path, message):
    got = problems(f"policies:\n  - name: p\n    targetRef: {ref}\n    timeouts: {{idle: 1s}}\n")
    assert any(p.path == path and message in p.message for p in got), got


def test_every_problem_at_once_and_names_unique():
    text = ("policies:\n"
            "  - name: p\n    targetRef: {kind: Import, name: a}\n    timeouts: {idle: 1}\n"
            "  - name: p\n    targetRef: {kind: Import, name: b}\n    timeouts: {idle: 1s}\n"
            "  - name: q\n    targetRef: {kind: Pod, name: b}\n    retry: {attempts: -1}\n")
    policies, r = read(text)
    assert policies == ()
    assert [p.path for p in r.problems] == [
        "policies[0].timeouts.idle", "policies[1].name",
        "policies[2].targetRef.kind", "policies[2].retry.attempts",
    ]


def test_the_example_in_the_readme_policies_section_parses():
    readme = Path(__file__).resolve().parents[3] / "README.md"
    section = readme.read_text().split("\n## Policies\n", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    policies, r = read(example)
    assert r.problems == [] and [p.name for p in policies] == [
        "shop-timeouts", "orders-write-auth", "cluster-limits"]


def test_not_a_list():
    got = problems("policies: {name: p}\n")
    assert got[0].path == "policies" and "list of policies" in got[0].message
