"""The `routes` of an HTTP import (gateway/config/routes_section.py): values, defaults, and
every problem named as FILE:LINE: path: message."""

from __future__ import annotations

import pytest

from federation.model import ServiceKey
from gateway.config.route_values import Backend, HeaderMatch, HeaderModifier, Match, Redirect
from gateway.config.schema import parse_config
from tests.gateway.config.samples import SRC, cfg, problems

HEAD = """\
imports:
  - name: shop
    namespace: web
    listen: 127.0.0.1:16001
    protocol: http
    routes:
"""  # lines 12..17; routes from line 18


def one(routes: str) -> str:
    return cfg(HEAD + routes)


def test_a_full_route_reads_into_values():
    c = parse_config(one("""\
      - name: canary
        hostnames: [Shop.Example.com, "*.example.org"]
        rules:
          - matches:
              - path: {type: Exact, value: /cart}
                headers:
                  - {name: X-Env, value: beta}
                  - {name: ua, value: "curl/.*", type: RegularExpression}
                queryParams: [{name: v, value: "2"}]
                method: POST
            filters:
              - type: RequestHeaderModifier
                requestHeaderModifier: {set: [{name: X-A, value: b}], remove: [x-c]}
            backendRefs: [{name: shop, weight: 99}, {name: shop-v2, namespace: beta, weight: 1}]
          - filters:
              - type: RequestRedirect
                requestRedirect: {scheme: https, port: 8443, statusCode: 301,
                                  path: {type: ReplaceFullPath, replaceFullPath: /new}}
"""), SRC)
    (im,) = c.imports
    assert im.protocol == "http" and im.access_log is False
    (route,) = im.routes
    assert route.name == "canary" and route.hostnames == ("shop.example.com", "*.example.org")
    first, second = route.rules
    (m,) = first.matches
    assert m == Match("Exact", "/cart", (HeaderMatch("x-env", "beta"),
                                         HeaderMatch("ua", "curl/.*", "RegularExpression")),
                      (HeaderMatch("v", "2"),), "POST")
    assert first.request_headers == HeaderModifier((("x-a", "b"),), (), ("x-c",))
    assert first.backends == (Backend(ServiceKey("web", "shop"), 99),
                              Backend(ServiceKey("beta", "shop-v2"), 1))
    assert second.matches == (Match(),) and second.backends == ()
    assert second.redirect == Redirect("https", None, 8443, "ReplaceFullPath", "/new", 301)


def test_defaults_a_route_without_rules_sends_everything_to_the_import():
    (im,) = parse_config(one("      - name: all\n"), SRC).imports
    (rule,) = im.routes[0].rules
    assert rule.matches == (Match(),) and rule.backends == (Backend(ServiceKey("web", "shop")),)


def test_an_http_import_without_routes_and_a_tcp_import_by_default():
    text = cfg("imports:\n  - {name: a, listen: 127.0.0.1:16001, protocol: http}\n"
               "  - {name: b, listen: 127.0.0.1:16002}\n")
    a, b = parse_config(text, SRC).imports
    assert (a.protocol, a.routes, b.protocol) == ("http", (), "tcp")


@pytest.mark.parametrize("routes, line, path, message", [
    ("      - name: a\n        rules:\n          - matches: [{path: {type: Prefix}}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].path.type", "'Prefix' is not a supported"),
    ("      - name: a\n        rules:\n          - matches: [{path: {value: api}}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].path.value", "must start with '/'"),
    ("      - name: a\n        rules:\n          - matches: [{path: {type: RegularExpression, "
     "value: '(['}}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].path.value", "not a valid regular expression"),
    ("      - name: a\n        rules:\n          - matches: [{headers: [{name: 'a b', "
     "value: x}]}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].headers[0].name", "not an HTTP header name"),
    ("      - name: a\n        rules:\n          - matches: [{headers: [{name: a, value: 1}]}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].headers[0].value", "quote it"),
    ("      - name: a\n        rules:\n          - matches: [{method: FETCH}]\n",
     20, "imports[0].routes[0].rules[0].matches[0].method", "not a supported method"),
    ("      - name: a\n        rules:\n          - filters: [{type: URLRewrite}]\n",
     20, "imports[0].routes[0].rules[0].filters[0].urlRewrite", "required for a URLRewrite"),
    ("      - name: a\n        rules:\n          - filters: [{type: URLRewrite, "
     "requestRedirect: {}}]\n",
     20, "imports[0].routes[0].rules[0].filters[0].requestRedirect", "another type"),
    ("      - name: a\n        rules:\n          - filters:\n              - {type: URLRewrite, "
     "urlRewrite: {hostname: a.b}}\n              - {type: RequestRedirect, requestRedirect: "
     "{statusCode: 301}}\n",
     21, "imports[0].routes[0].rules[0].filters", "cannot be in the same rule"),
    ("      - name: a\n        rules:\n          - filters: [{type: RequestRedirect, "
     "requestRedirect: {statusCode: 307}}]\n",
     20, "imports[0].routes[0].rules[0].filters[0].requestRedirect.statusCode", "not one of"),
    ("      - name: a\n        rules:\n          - filters: [{type: RequestRedirect, "
     "requestRedirect: {hostname: a.b}}]\n            backendRefs: [{name: shop}]\n",
     21, "imports[0].routes[0].rules[0].backendRefs", "answers itself"),
    ("      - name: a\n        rules:\n          - matches: [{path: {type: Exact, value: /a}}]\n"
     "            filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, "
     "replacePrefixMatch: /b}}}]\n",
     21, "imports[0].routes[0].rules[0].filters", "needs every match of the rule to be a"),
    ("      - name: a\n        hostnames: ['*.a.b']\n        rules:\n          - filters: "
     "[{type: URLRewrite, urlRewrite: {hostname: '*.x.y'}}]\n",
     21, "imports[0].routes[0].rules[0].filters[0].urlRewrite.hostname", "is not a DNS name"),
    ("      - name: a\n      - name: a\n",
     19, "imports[0].routes[1].name", "already defined by imports[0].routes[0]"),
    ("      - name: a\n        rules:\n          - backendRefs: [{name: b, weight: -1}]\n",
     20, "imports[0].routes[0].rules[0].backendRefs[0].weight", "not in 0..1000000"),
    ("      - name: a\n        rules:\n          - {matches: [], surprise: 1}\n",
     20, "imports[0].routes[0].rules[0].surprise", "unknown field 'surprise'"),
])
def test_problems_name_file_line_and_field(routes, line, path, message):
    got = problems(one(routes))
    assert any(p.line == line and p.path == path and message in p.message for p in got), got


def test_routes_and_access_log_need_protocol_http():
    got = problems(cfg("imports:\n  - name: a\n    listen: 127.0.0.1:16001\n"
                       "    routes: []\n"))
    assert [(p.line, p.path) for p in got] == [(15, "imports[0].routes")]
    assert "protocol: http" in got[0].message


def test_too_many_rules_are_refused():
    rules = "".join("          - backendRefs: [{name: b}]\n" for _ in range(17))
    got = problems(one("      - name: a\n        rules:\n" + rules))
    assert any("17 rules, at most 16" in p.message for p in got), got
