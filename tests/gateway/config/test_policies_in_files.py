"""`policies:` in the gateway file and in service files (issue 15): their order across files,
the guard rails on service files, rule names for sectionName, a policy change as a reload
change, and the per-import tables the HTTP listeners get (dataplane/http/enforce.py
PolicyBook). Pure: tmp_path files and load_config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config.schema import load_config
from gateway.core import routes as rt
from gateway.core.reconcile import reconcile
from gateway.dataplane.http.enforce import PolicyBook, policy_book
from gateway.errors import ConfigError
from tests.gateway.config.samples import ROOT, cfg
from tests.gateway.config.test_split import DIR, _problems, _where, _write
from tests.helpers.processes import run_cli

HTTP_IMPORT = """\
imports:
  - name: shop
    namespace: web
    listen: 127.0.0.1:16001
    protocol: http
    routes:
      - name: orders
        rules:
          - name: read
            matches: [{path: {type: PathPrefix, value: /orders}, method: GET}]
          - matches: [{path: {type: PathPrefix, value: /orders}}]
"""
OTHER_IMPORT = """\
imports:
  - name: other
    listen: 127.0.0.1:16002
    protocol: http
"""


def policy(name: str, target: str, block: str = "timeouts: {request: 5s}") -> str:
    return f"  - name: {name}\n    targetRef: {target}\n    {block}\n"


def test_policies_in_order_gateway_file_first(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR + "policies:\n" + policy("admin", "{kind: Gateway, name: "
                                                              "east-1}")),
                a=HTTP_IMPORT + "policies:\n"
                + policy("a1", "{kind: Import, name: shop, namespace: web}")
                + policy("a2", "{kind: Route, import: shop, namespace: web, name: orders, "
                               "sectionName: read}"),
                b="policies:\n" + policy("b1", "{kind: Import, name: shop, namespace: web}"))
    c = load_config(gw)
    assert [(p.name, p.order) for p in c.policies] == [("admin", 0), ("a1", 1), ("a2", 2),
                                                       ("b1", 3)]
    assert c.policies[2].target.section == "read"


@pytest.mark.parametrize("gateway, text, where, words", [
    ("", "policies:\n" + policy("p", "{kind: Gateway, name: east-1}"),
     (3, "policies[0].targetRef.kind"), "only the gateway file may attach a policy"),
    ("policy:\n  namespaces: [shop]\n",
     "policies:\n" + policy("p", "{kind: Import, name: shop, namespace: web}"),
     (3, "policies[0].targetRef.namespace"),
     "namespace 'web' is not allowed by policy.namespaces for this file (allowed: shop)"),
    ("", "policies:\n  - name: p\n    targetRef: {kind: Import, name: shop}\n"
         "    timeouts: {request: soon}\n",
     (4, "policies[0].timeouts.request"), "duration"),
])
def test_service_file_policies_are_checked(tmp_path: Path, gateway: str, text: str,
                                           where: tuple, words: str) -> None:
    gw = _write(tmp_path, cfg(DIR + gateway), a=text)
    (p,) = _problems(gw)
    assert _where(p) == ("a.yaml", *where), p
    assert words in p.message, p.message


def test_rule_names_are_unique_within_a_route(tmp_path: Path) -> None:
    dup = HTTP_IMPORT.replace("          - matches: [{path: {type: PathPrefix, value: /orders}}]",
                              "          - name: read\n            matches: [{path: {type: "
                              "PathPrefix, value: /x}}]")
    (p,) = _problems(_write(tmp_path, cfg(DIR), a=dup))
    assert _where(p) == ("a.yaml", 11, "imports[0].routes[0].rules[1].name"), p
    assert "rule 'read' is already named by" in p.message


def test_the_decision_names_the_rule(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, cfg(DIR), a=HTTP_IMPORT))
    routes = rt.compile_routes(c.imports[0].routes)
    default = rt.Decision(rt.PROXY, "", None)
    got = rt.decide(routes, default, "GET", "/orders/1", {}, "", lambda: 0.5)
    assert (got.route, got.rule) == ("orders", "read")
    got = rt.decide(routes, default, "POST", "/orders/1", {}, "", lambda: 0.5)
    assert (got.route, got.rule) == ("orders", None)


def test_a_policy_change_is_a_reload_change(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, cfg(DIR), a=HTTP_IMPORT))
    d = load_config(_write(tmp_path, cfg(DIR), a=HTTP_IMPORT, b="policies:\n" + policy(
        "p", "{kind: Import, name: shop, namespace: web}")))
    changes = reconcile(c, d)
    assert changes.other and not changes.services


def test_tables_per_import_and_none_without_a_policy(tmp_path: Path) -> None:
    c = load_config(_write(
        tmp_path, cfg(DIR), a=HTTP_IMPORT, o=OTHER_IMPORT,
        p="policies:\n"
        + policy("shop", "{kind: Import, name: shop, namespace: web}",
                 "timeouts: {request: 5s}\n    retry: {attempts: 0}")
        + policy("read", "{kind: Route, import: shop, namespace: web, name: orders, "
                         "sectionName: read}",
                 "timeouts: {request: 1s}\n    retry: {attempts: 1, codes: [502]}")))
    book = PolicyBook(c.policies, "east-1")
    shop, other = (next(i for i in c.imports if i.name == n) for n in ("shop", "other"))
    assert book.table(other) is None  # no policy on its chain: the hot path pays nothing
    table = book.table(shop)
    assert table is not None and set(table) == {("", None), ("orders", "read"), ("orders", None)}
    read, rest = table[("orders", "read")], table[("orders", None)]
    assert (read.request_timeout, rest.request_timeout) == (1.0, 5.0)
    assert read.retry is not None and read.framed  # a status to retry: the head is held
    assert rest.retry is None and not rest.framed  # attempts 0: retries off
    assert read.policy.source("retry.attempts") == "read"  # field by field
    assert read.policy.source("timeouts.request") == "read"
    assert rest.policy.source("timeouts.request") == "shop"
    # a Gateway policy is on every import's chain
    gw_policy = replace(c.policies[0], name="all", target=replace(
        c.policies[0].target, kind="Gateway", name="east-1", namespace="default"))
    assert PolicyBook((*c.policies, gw_policy), "east-1").table(other) is not None


def test_a_spec_that_cannot_be_read_refuses_the_config(tmp_path: Path) -> None:
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "bad-openapi.yaml.txt").write_text("openapi: 3.0.3\npaths: 7\n")
    c = load_config(_write(tmp_path, cfg(DIR), a=HTTP_IMPORT + "policies:\n" + policy(
        "api", "{kind: Import, name: shop, namespace: web}",
        "openapi: {spec: bad-openapi.yaml.txt}")))
    with pytest.raises(ConfigError) as info:
        policy_book(c)
    (p,) = info.value.problems
    assert p.path == "policies" and "policy 'api': openapi:" in p.message, p
    assert "bad-openapi.yaml.txt" in p.message


EXAMPLE = ROOT / "examples" / "policies" / "gateway.yaml"


def test_the_example_validates_and_means_what_it_says() -> None:
    r = run_cli("config", "validate", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    c = load_config(EXAMPLE)
    (shop,) = c.imports
    table = PolicyBook(c.policies, c.cluster.name).table(shop)
    assert table is not None
    read, write = table[("orders", "read")], table[("orders", "write")]
    assert read.request_timeout == 3.0 and write.request_timeout == 10.0
    assert read.jwt is None and write.jwt is not None and write.openapi is not None
    assert write.policy.timeouts.idle == 60.0  # the import's default beats the gateway's
    assert write.policy.source("retry.budget_ratio") == "cluster-limits"  # the override
