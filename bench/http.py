"""HTTP benchmark (issue 14, `python -m bench --only http`): the HTTP import listener against
HAProxy `mode http`, side by side in one run.

nginx (64-byte `/`) is east-2's `web` endpoint. Paths, each measured in every round:

    local      client -> east-2's HTTP import (routes on, traceparent added) -> nginx
    HAProxy    client -> HAProxy mode http, nbthread 1, keep-alive to nginx (http-reuse safe)
    cross      client -> east-1's HTTP import -> mTLS link -> east-2 -> nginx
    chain      client -> HAProxy A (mode http) -> TLS 1.3 with client certs -> HAProxy B
               (mode http) -> nginx: the same hops done by HAProxy
    direct     client -> nginx

wrk -c50 keep-alive on core 0 with nginx; the proxies (gateways, HAProxies) on core 1.
Keep-alive rps, p50 and p99 (wrk --latency), medians over rounds; ratios from the same run.

`--policies` adds the route policies (README.md, "Policies"), on a second import of east-2,
`webp` (the same nginx), whose routes rewrite to nginx's `/`:

    no policy, rewrite  GET  /plain on east-2's `web` (no policy anywhere): the baseline
    no policy, POST     POST /plain there, a 27-byte JSON body (wrk Lua script)
    policies on, none   GET  /plain on `webp`: a route with no policy of its own on an import
                        that has some (the built-in timeouts and retry budget: timers, one
                        budget count)
    POST, none          POST /plain on `webp`
    JWT                 GET  /jwt with an RS256 bearer token (the same token every request:
                        after the first, a cache hit — one SHA-256 and a dict lookup)
    OpenAPI             POST /oas, the body checked against a JSON schema
    JWT + OpenAPI       POST /both, both

The cost of each in µs per request is 1/rps - 1/rps of its baseline (the same request without
that policy), one core being the proxy's: CPU time per request.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import infra

FED, E1, E2 = 27601, 27611, 27621  # federation; east-1 / east-2: inbound, admin +1, import +2
NGINX = 27631
HAPROXY_HTTP, CHAIN_IN, CHAIN_TLS = 27641, 27642, 27643
PATHS = ("Isthmus local", "HAProxy mode http", "Isthmus cross-cluster", "HAProxy http TLS chain",
         "direct")
POLICY_PATHS = ("no policy, rewrite", "no policy, POST", "policies on, none", "POST, none", "JWT",
                "OpenAPI", "JWT + OpenAPI")
REWRITE = ("filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, "
           "replaceFullPath: /}}}]")
BODY = '{"item": "book", "quantity": 2}'

HTTP_DEFAULTS = """
defaults
  mode http
  option http-keep-alive
  http-reuse safe
  timeout connect 1s
  timeout client 300s
  timeout server 300s
"""


def _policy_files(d: Path) -> str:
    """JWKS, token, OpenAPI spec, wrk script of the --policies paths; the `webp` import."""
    from joserfc import jwt
    from joserfc.jwk import KeySet, RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "bench"}, private=True)
    (d / "jwks.json").write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    claims = {"iss": "https://idp.bench", "aud": "bench", "sub": "alice",
              "exp": int(time.time()) + 86400}
    (d / "jwt-token").write_text(jwt.encode({"alg": "RS256", "kid": "bench"}, claims, key,
                                        algorithms=["RS256"]))
    schema = {"type": "object", "required": ["item", "quantity"],
              "properties": {"item": {"type": "string", "maxLength": 64},
                             "quantity": {"type": "integer", "minimum": 1}}}
    op = {"post": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}}}, "responses": {"200": {"description": "ok"}}}}
    (d / "orders.json").write_text(json.dumps({
        "openapi": "3.0.3", "info": {"title": "bench", "version": "1"},
        "paths": {"/oas": op, "/both": op}}))
    (d / "post.lua").write_text(f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
                                "wrk.headers[\"Content-Type\"] = \"application/json\"\n")
    rewrite = REWRITE
    routes = "".join(f"""
      - name: {n}
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /{n}}}}}]
            {rewrite}""" for n in ("plain", "jwt", "oas", "both"))
    jwt_block = (f"jwt: {{issuer: 'https://idp.bench', audiences: [bench], "
                 f"jwks_file: {d / 'jwks.json'}}}")
    oas_block = f"openapi: {{spec: {d / 'orders.json'}}}"
    return f"""
  - name: webp
    listen: 127.0.0.1:{E2 + 3}
    protocol: http
    failover: {{tiers: [cluster, zone, region, any]}}
    routes:{routes}
policies:
  - {{name: p-jwt, targetRef: {{kind: Route, import: webp, name: jwt}}, {jwt_block}}}
  - {{name: p-oas, targetRef: {{kind: Route, import: webp, name: oas}}, {oas_block}}}
  - {{name: p-both, targetRef: {{kind: Route, import: webp, name: both}}, {jwt_block},
      {oas_block}}}
"""


def _gateway_file(d: Path, name: str, zone: str, base: int, exports: bool,
                  policies: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    text = f"""\
cluster: {{name: {name}, region: us-east, zone: {zone}}}
federation: {{url: "https://127.0.0.1:{FED}", ca_file: "{d.parent / 'fed' / 'ca.pem'}",
             token_file: "{d / 'token'}"}}
listen: {{inbound: "127.0.0.1:{base}", admin: "127.0.0.1:{base + 1}"}}
state_dir: {d / 'state'}
limits: {{max_connections: 20000}}
imports:
  - name: web
    listen: 127.0.0.1:{base + 2}
    protocol: http
    failover: {{tiers: [cluster, zone, region, any]}}
    routes:
      - name: api
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      - name: all
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /}}}}]
"""
    if policies:  # web gets /plain too (the baseline), then one more import and `policies:`
        text += ("      - name: plain\n        rules:\n          - matches: [{path: {type: "
                 f"PathPrefix, value: /plain}}}}]\n            {REWRITE}\n")
        text += _policy_files(d)
    if exports:
        text += "exports:\n"
        for svc in ("web", "webp") if policies else ("web",):
            text += (f"  - name: {svc}\n    port: 80\n    protocol: http\n"
                     f"    endpoints: [127.0.0.1:{NGINX}]\n"
                     "    health_check: {kind: http, path: /, interval: 1s}\n")
    path = d / "gateway.yaml"
    path.write_text(text)
    return path


class Topology:
    """The federation and the two gateways (east-2 exports nginx, east-1 has no endpoints)."""

    def __init__(self, tmp: Path, policies: bool = False) -> None:
        self.tmp = tmp
        self.policies = policies
        self.procs: list[subprocess.Popen] = []

    def _start(self, argv: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "isthmus.cli", *argv],
                             stdin=subprocess.DEVNULL, stdout=open(self.tmp / log, "ab"),
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start(self) -> dict[str, int]:
        fed = self.tmp / "fed"
        self._start(["federation", "serve", "--state-dir", str(fed), "--listen",
                     f"127.0.0.1:{FED}", "--admin", f"127.0.0.1:{FED + 1}", "--log-level",
                     "warning"], "fed.log")
        infra.wait_port(FED, 20.0)
        pids = {}
        for name, zone, base, exports in (("east-2", "b", E2, True), ("east-1", "a", E1, False)):
            cfg = _gateway_file(self.tmp / name, name, zone, base, exports,
                                policies=self.policies and exports)
            r = subprocess.run([sys.executable, "-m", "isthmus.cli", "federation", "token",
                                "create", "--cluster", name, "--state-dir", str(fed), "-o",
                                str(self.tmp / name / "token")], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"token for {name}: {r.stderr}")
            pids[name] = self._start(["gateway", "run", "--config", str(cfg), "--log-level",
                                      "warning"], f"{name}.log").pid
        for port in (E2 + 2, E1 + 2):
            _wait_200(port)
        if self.policies:
            _wait_200(E2 + 3, path="/plain")
        for pid in pids.values():
            infra.pin(pid, infra.PROXY_CORE)
        return pids

    def stop(self) -> None:
        for p in reversed(self.procs):
            infra.stop(p)


def _wait_200(port: int, timeout: float = 30.0, path: str = "/") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                            "2", f"http://127.0.0.1:{port}{path}"], capture_output=True,
                           text=True)
        if r.stdout == "200":
            return
        time.sleep(0.3)
    raise RuntimeError(f"nothing answered 200 on {port}")


def _haproxies(tmp: Path) -> list[infra.HAProxy]:
    certs = infra.make_certs(tmp / "certs")
    local = infra.HAProxy(tmp, "http", HTTP_DEFAULTS + f"""
frontend f
  bind 127.0.0.1:{HAPROXY_HTTP}
  default_backend b
backend b
  server s1 127.0.0.1:{NGINX}
""")
    a = infra.HAProxy(tmp, "http-chain-a", HTTP_DEFAULTS + f"""
frontend f
  bind 127.0.0.1:{CHAIN_IN}
  default_backend b
backend b
  server s1 127.0.0.1:{CHAIN_TLS} ssl crt {certs['client']} ca-file {certs['ca']} \
verify required verifyhost haproxy-server.bench.local sni str(haproxy-server.bench.local) \
ssl-min-ver TLSv1.3
""")
    b = infra.HAProxy(tmp, "http-chain-b", HTTP_DEFAULTS + f"""
frontend f
  bind 127.0.0.1:{CHAIN_TLS} ssl crt {certs['server']} ca-file {certs['ca']} verify required \
ssl-min-ver TLSv1.3
  default_backend b
backend b
  server s1 127.0.0.1:{NGINX}
""")
    return [local, b, a]


def run(tmp: Path, rounds: int, seconds: float, log: Callable[[str], None],
        policies: bool = False) -> dict[str, dict[str, float]]:
    tmp.mkdir(parents=True, exist_ok=True)
    nginx = infra.Nginx(tmp, [NGINX])
    topo = Topology(tmp, policies)
    haproxies = _haproxies(tmp)
    results: dict[str, list[dict[str, float]]] = {
        p: [] for p in PATHS + (POLICY_PATHS if policies else ())}
    try:
        nginx.start()
        for h, port in zip(haproxies, (HAPROXY_HTTP, CHAIN_TLS, CHAIN_IN), strict=True):
            h.start(port)
        topo.start()
        plain = {p: (port, "/", (), None) for p, port in zip(
            PATHS, (E2 + 2, HAPROXY_HTTP, E1 + 2, CHAIN_IN, NGINX), strict=True)}
        if policies:
            d = tmp / "east-2"
            auth = (f"Authorization: Bearer {(d / 'jwt-token').read_text()}",)
            post = d / "post.lua"
            plain.update(zip(POLICY_PATHS, (
                (E2 + 2, "/plain", (), None), (E2 + 2, "/plain", (), post),
                (E2 + 3, "/plain", (), None), (E2 + 3, "/plain", (), post),
                (E2 + 3, "/jwt", auth, None), (E2 + 3, "/oas", (), post),
                (E2 + 3, "/both", auth, post)), strict=True))
        for port, path, headers, script in plain.values():  # warm: pools filled, links up
            infra.wrk(port, 50, 1.0, path=path, headers=headers, script=script)
        for i in range(rounds):
            for p, (port, path, headers, script) in plain.items():
                log(f"http round {i + 1}/{rounds}: {p}")
                r = infra.wrk(port, 50, seconds, path=path, headers=headers, script=script)
                results[p].append({"keep-alive req/s": r.rps, "p50 µs": r.p50_us or 0.0,
                                   "p99 µs": r.p99_us or 0.0, "errors": r.errors})
    finally:
        topo.stop()
        for h in haproxies:
            h.stop()
        nginx.stop()
    return {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for p, rs in results.items() if rs}


def table(got: dict[str, dict[str, float]]) -> str:
    rows = ["| path | keep-alive req/s | p50 µs | p99 µs | errors |", "|---|---|---|---|---|"]
    for p in PATHS:
        r = got[p]
        rows.append(f"| {p} | {r['keep-alive req/s']:,.0f} | {r['p50 µs']:,.0f} | "
                    f"{r['p99 µs']:,.0f} | {r['errors']:.0f} |")
    loc, hap, cross, chain = (got[p] for p in PATHS[:4])
    rows.append(f"| local ÷ HAProxy mode http: "
                f"{loc['keep-alive req/s'] / hap['keep-alive req/s']:.2f}x rps, "
                f"p99 {loc['p99 µs'] / hap['p99 µs']:.2f}x | | | | |")
    rows.append(f"| cross-cluster ÷ HAProxy chain: "
                f"{cross['keep-alive req/s'] / chain['keep-alive req/s']:.2f}x rps, "
                f"p99 {cross['p99 µs'] / chain['p99 µs']:.2f}x | | | | |")
    if POLICY_PATHS[0] in got:
        rows += ["", "| policy path | keep-alive req/s | p50 µs | p99 µs | errors | "
                 "cost µs/request |", "|---|---|---|---|---|---|"]
        base = {"no policy, rewrite": "Isthmus local", "no policy, POST": "no policy, rewrite",
                "policies on, none": "no policy, rewrite", "POST, none": "no policy, POST",
                "JWT": "policies on, none", "OpenAPI": "POST, none",
                "JWT + OpenAPI": "POST, none"}
        for p in POLICY_PATHS:
            r, b = got[p], got[base[p]]
            cost = 1e6 / r["keep-alive req/s"] - 1e6 / b["keep-alive req/s"]
            rows.append(f"| {p} | {r['keep-alive req/s']:,.0f} | {r['p50 µs']:,.0f} | "
                        f"{r['p99 µs']:,.0f} | {r['errors']:.0f} | {cost:+.1f} vs {base[p]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--policies", action="store_true",
                    help="also the JWT / OpenAPI policy paths (see above)")
    a = ap.parse_args()
    infra.require_tools()
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-http-") as d:
        out = run(Path(d), a.rounds, a.seconds, lambda m: print(m, file=sys.stderr),
                  a.policies)
    print(table(out))
