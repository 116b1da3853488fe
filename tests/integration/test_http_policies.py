"""Route policies on a real HTTP import (README.md, "Policies"): retries with their budget and
on another endpoint, request and per-try timeouts, JWT, OpenAPI validation, the precedence of a
route's policy over its import's as /status shows it, and a policy change reloaded live.

Three clusters (tests/integration/harness.py); east-1 exports `web` (one backend), `flaky`
(one healthy endpoint and one answering 503 to everything but its health check) and `down`
(two endpoints answering 503), and imports `web` with `protocol: http`, routes to all three and
the `policies` below, from service files it reloads live. Clients: aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from tests.helpers.http_backends import HttpBackend
from tests.helpers.processes import free_port
from tests.helpers.traffic import metric_value, wait_for
from tests.integration.harness import Topology, running
from tests.integration.test_http import TOP, Http, export_file
from tests.integration.test_reload import replace_file

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[1] / "data" / "petstore-openapi.yaml"
ISS, AUD = "https://idp.example", "shop"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)  # same kid, wrong key
BUDGET_N = 200
LISTENER = 'listener="import default/web"'


PLAIN = free_port()  # an import without routes, with an Import policy


def routes_file(port: int, jwks: Path, auth_policy: bool = True) -> str:
    auth = f"""\
  - name: auth-jwt
    targetRef: {{kind: Route, import: web, name: auth}}
    jwt:
      issuer: {ISS}
      audiences: [{AUD}]
      jwks_file: {jwks}
      claim_headers: {{sub: x-user}}
""" if auth_policy else ""
    return f"""\
imports:
  - name: web
    listen: 127.0.0.1:{port}
    protocol: http
    access_log: true
    routes:
      - name: flaky
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]
            backendRefs: [{{name: flaky}}]
      - name: down
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /down}}}}]
            backendRefs: [{{name: down}}]
      - name: slow
        rules:
          - name: whole
            matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
          - name: per-try
            matches: [{{path: {{type: PathPrefix, value: /try}}}}]
      - name: auth
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /auth}}}}]
      - name: pets
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /pets}}}}]
      - name: default
        rules:
          - backendRefs: [{{name: web}}]
  - name: plain
    listen: 127.0.0.1:{PLAIN}
    protocol: http

policies:
  - name: plain-timeout
    targetRef: {{kind: Import, name: plain}}
    timeouts: {{request: 400ms}}
  - name: web-defaults
    targetRef: {{kind: Import, name: web}}
    timeouts: {{request: 10s}}
    retry: {{attempts: 0}}
  - name: flaky-retries
    targetRef: {{kind: Route, import: web, name: flaky}}
    retry: {{attempts: 2, codes: [503]}}
  - name: down-retries
    targetRef: {{kind: Route, import: web, name: down}}
    retry:
      attempts: 2
      codes: [503]
      budget: {{percent: 10, min_per_second: 0, window: 1m}}
  - name: slow-timeouts
    targetRef: {{kind: Route, import: web, name: slow, sectionName: whole}}
    timeouts: {{request: 500ms, idle: 1s}}
  - name: per-try
    targetRef: {{kind: Route, import: web, name: slow, sectionName: per-try}}
    timeouts: {{request: 3s, backendRequest: 300ms}}
    retry: {{attempts: 1, retry_on: [timeout], backoff_base: 1ms, backoff_cap: 1ms}}
{auth}  - name: pets-openapi
    targetRef: {{kind: Route, import: web, name: pets}}
    openapi: {{spec: {SPEC}, unknown_fields: drop, max_body_bytes: 1000}}
"""


def token(key: RSAKey = KEY, **claims) -> str:
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": time.time() + 300, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, body, key, algorithms=["RS256"])


@pytest.fixture
async def http(tmp_path, request):
    topo = Topology(tmp_path / "topo", top={c: TOP for c in ("east-1", "east-2", "west-1")})
    port = free_port()
    web = [HttpBackend("east-1", "web", free_port())]
    flaky = [HttpBackend("east-1", "flaky", free_port()),
             HttpBackend("east-1", "flaky", free_port(), fail_with=503)]
    down = [HttpBackend("east-1", "down", free_port(), fail_with=503),
            HttpBackend("east-1", "down", free_port(), fail_with=503)]
    every = web + flaky + down
    for b in every:
        await b.start()
    files = topo.nodes["east-1"].dir / "services"
    files.mkdir(parents=True, exist_ok=True)
    for name, bs in (("web", web), ("flaky", flaky), ("down", down), ("plain", web)):
        (files / f"export-{name}.yaml").write_text(export_file(name, bs))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(KeySet([KEY]).as_dict(private=False)))
    (files / "routes.yaml").write_text(routes_file(port, jwks))
    client = None
    try:
        async with running(topo, request):
            client = Http(topo, port)
            client.web, client.flaky, client.down = web, flaky, down  # type: ignore[attr-defined]
            client.jwks = jwks  # type: ignore[attr-defined]
            client.routes_path = files / "routes.yaml"  # type: ignore[attr-defined]
            for path in ("/x", "/flaky/x", "/down/x"):
                await wait_for(lambda p=path: _reached(client, p), 20.0,
                               what=f"east-1's HTTP import to reach the backend of {path}")
            yield client
    finally:
        if client is not None:
            await client.close()
        for b in every:
            await b.stop()


async def _reached(client: Http, path: str) -> bool:
    try:
        status, _, _ = await client.get(path)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == (503 if path.startswith("/down") else 200)


async def test_retries_go_elsewhere_and_the_budget_holds(http: Http):
    """A 503 from one endpoint is retried on the other (the client sees only 200s), for
    idempotent methods only; behind a backend failing everything, upstream tries stay <= 1.1x
    requests (the budget)."""
    ok_ep, bad_ep = http.flaky  # type: ignore[attr-defined]
    ok_before, bad_before = ok_ep.served, bad_ep.served
    for i in range(40):
        status, body, _ = await http.get(f"/flaky/{i}")
        assert (status, body.get("name")) == (200, "flaky"), (i, status, body)
    assert ok_ep.served - ok_before == 40
    bad = bad_ep.served - bad_before
    assert bad >= 1, "the failing endpoint was never tried first: no retry was exercised"
    text = await http.topo.metrics("east-1")
    got = metric_value(text, "isthmus_gateway_http_retries_total",
                       f'{LISTENER},route="flaky",reason="503"')
    assert got >= bad, (got, bad)

    # POST is not idempotent: its 503s go back to the client, never sent twice
    before = bad_ep.served + ok_ep.served
    posts = [(await http.get(f"/flaky/p{i}", method="POST", data=b"x"))[0] for i in range(20)]
    assert 503 in posts and set(posts) <= {200, 503}, posts
    assert bad_ep.served + ok_ep.served - before == 20  # one try each
    text = await http.topo.metrics("east-1")
    skipped = [metric_value(text, "isthmus_gateway_http_retries_skipped_total",
                            f'{LISTENER},route="flaky",reason="{why}"') or 0
               for why in ("method", "body")]  # body: streamed upstream before it ended
    assert sum(skipped) == posts.count(503), skipped

    downs = http.down  # type: ignore[attr-defined]
    before = sum(b.served for b in downs)
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> int:
        async with sem:
            status, _, _ = await http.get(f"/down/{i}")
            return status

    statuses = await asyncio.gather(*(one(i) for i in range(BUDGET_N)))
    tries = sum(b.served for b in downs) - before
    print(f"\nbudget: {BUDGET_N} requests -> {tries} upstream tries")
    assert set(statuses) == {503}
    assert BUDGET_N < tries <= 1.1 * BUDGET_N + 2, tries  # +2: the warm-up requests' share
    text = await http.topo.metrics("east-1")
    skipped = metric_value(text, "isthmus_gateway_http_retries_skipped_total",
                           f'{LISTENER},route="down",reason="budget"')
    assert skipped > 0
    requests = metric_value(text, "isthmus_gateway_http_retry_budget_requests",
                            f'{LISTENER},route="down",backend="default/down"')
    assert requests >= BUDGET_N


async def test_timeouts_fire_at_their_value(http: Http):
    """`request: 500ms` answers 504 after ~0.5 s; `backendRequest: 300ms` with one retry on
    timeout tries twice, then 504; `idle: 1s` closes a connection left idle after ~1 s."""
    t0 = time.monotonic()
    status, _, _ = await http.get("/slow/a", headers={"x-sleep": "3"})
    took = time.monotonic() - t0
    assert status == 504 and 0.45 <= took <= 1.2, (status, took)
    (backend,) = http.web  # type: ignore[attr-defined]
    before = backend.served
    t0 = time.monotonic()
    status, _, _ = await http.get("/try/a", headers={"x-sleep": "2"})
    took = time.monotonic() - t0
    assert status == 504 and 0.55 <= took <= 1.5, (status, took)
    await wait_for(lambda: _true(backend.served - before == 2), 3.0, what="two tries")
    status, body, _ = await http.get("/slow/b", headers={"x-sleep": "0.1"})
    assert status == 200  # under the limit: served

    # an import without routes takes its Import policy too (`plain`: request 400ms)
    t0 = time.monotonic()
    async with http.session.get(f"http://127.0.0.1:{PLAIN}/p", headers={"x-sleep": "2"}) as r:
        took = time.monotonic() - t0
        assert r.status == 504 and 0.35 <= took <= 1.2, (r.status, took)

    # idle: 1s after a request to /slow, a connection that sends nothing more is closed
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    try:
        writer.write(b"GET /slow/c HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3.0)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 5.0)
        took = time.monotonic() - t0
        assert rest == b"" and 0.9 <= took <= 2.0, (rest, took)  # closed by the gateway
    finally:
        writer.close()


async def _true(value: bool) -> bool:
    return value


async def test_jwt_openapi_precedence_and_reload(http: Http):
    (backend,) = http.web  # type: ignore[attr-defined]
    before = backend.served
    status, body, _ = await http.get("/auth/a", headers={"Authorization": f"Bearer {token()}",
                                                         "x-user": "mallory"})
    assert status == 200 and body["headers"]["x-user"] == "alice"  # the client's copy is gone
    refused = [
        ({}, 'Bearer realm="isthmus"'),
        ({"Authorization": f"Bearer {token(exp=time.time() - 600)}"}, "invalid_token"),
        ({"Authorization": f"Bearer {token(OTHER)}"}, "invalid_token"),
        ({"Authorization": "Bearer not.a.token"}, "invalid_token"),
    ]
    for headers, www in refused:
        status, body, got = await http.get("/auth/a", headers=headers)
        assert status == 401 and www in got.get("WWW-Authenticate", ""), (headers, status, got)
    assert backend.served - before == 1  # the refused ones never reached it

    status, body, _ = await http.get("/pets", method="POST",
                                     json={"name": "rex", "extra": {"x": 1}})
    assert status == 200 and json.loads(body["body"]) == {"name": "rex"}, body  # dropped
    async with http.session.post(http.base + "/pets", json={"name": ""}) as r:
        problem = await r.json(content_type=None)
        assert r.status == 400 and r.content_type == "application/problem+json"
        assert problem["errors"][0]["pointer"] == "#/name", problem
    status, _, _ = await http.get("/pets/abc")
    assert status == 400
    status, _, _ = await http.get("/pets", method="POST", data=b"{" * 2000,
                                  headers={"content-type": "application/json"})
    assert status == 413
    text = await http.topo.metrics("east-1")
    assert metric_value(text, "isthmus_gateway_http_policy_denied_total",
                        f'{LISTENER},route="auth",policy="auth-jwt",status="401"') == 4

    st = await http.topo.status("east-1")
    (imp,) = [i for i in st["imports"] if i["service"] == "default/web"]
    by = {(r["route"], r["rule"]): r["policy"] for r in imp["routes"]}
    whole, default = by[("slow", "whole")], by[("default", None)]
    assert whole["timeouts"]["request"] == 0.5
    assert whole["sources"]["timeouts.request"] == "slow-timeouts"  # the route's wins
    assert default["timeouts"]["request"] == 10.0
    assert default["sources"]["timeouts.request"] == "web-defaults"  # the import's otherwise
    assert by[("auth", None)]["jwt"]["issuer"] == ISS

    replace_file(http.routes_path, routes_file(http.port, http.jwks,  # type: ignore
                                               auth_policy=False))
    await wait_for(lambda: _status_is(http, "/auth/b", 200), 10.0,
                   what="the reload that removes the JWT policy")


async def _status_is(http: Http, path: str, want: int) -> bool:
    status, _, _ = await http.get(path)
    return status == want
