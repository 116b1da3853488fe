"""HTTP imports with real processes: routes (every match kind and the precedence between them),
canary weights, header filters, redirect and rewrite, W3C trace context, limits, locality
failover per backend, and a route change reloaded under a steady request stream
(README.md, "HTTP routes").

Three clusters (tests/integration/harness.py). east-1 and east-2 export `web` (HTTP backends
answering JSON about the request, tests/helpers/http_backends.py), west-1 exports `web-v2`.
east-1 imports `web` with `protocol: http` and the routes below, from a service file it
reloads live. Clients: aiohttp and curl.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.http_backends import HttpBackend
from tests.helpers.processes import free_port
from tests.helpers.traffic import metric_value, wait_for
from tests.integration.harness import Topology, running
from tests.integration.test_reload import replace_file

pytestmark = pytest.mark.integration

TOP = "services_dir: services\n\nreload:\n  debounce: 50ms\n"
CANARY_N = 10_000
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def export_file(name: str, backends: list[HttpBackend]) -> str:
    eps = "".join(f"      - {b.address}\n" for b in backends)
    return (f"exports:\n  - name: {name}\n    port: 8080\n    protocol: http\n"
            f"    endpoints:\n{eps}    health_check:\n      interval: 200ms\n"
            "      timeout: 150ms\n")


def routes_file(port: int, exact_backend: str = "web-v2") -> str:
    return f"""\
imports:
  - name: web
    listen: 127.0.0.1:{port}
    protocol: http
    access_log: true
    failover:
      tiers: [cluster, zone, region, any]
      failback_after: 1s
    routes:
      - name: exact
        rules:
          - matches: [{{path: {{type: Exact, value: /exact}}}}]
            backendRefs: [{{name: {exact_backend}}}]
      - name: api
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
            filters:
              - type: RequestHeaderModifier
                requestHeaderModifier:
                  set: [{{name: x-route, value: api}}]
                  add: [{{name: x-added, value: "1"}}]
                  remove: [x-secret]
              - type: ResponseHeaderModifier
                responseHeaderModifier:
                  set: [{{name: x-route-out, value: api}}]
                  remove: [x-cluster]
            backendRefs: [{{name: web}}]
          - matches:
              - path: {{type: PathPrefix, value: /api}}
                headers: [{{name: X-Canary, value: "yes"}}]
            backendRefs: [{{name: web-v2}}]
          - matches: [{{path: {{type: PathPrefix, value: /api/long}}}}]
            backendRefs: [{{name: web-v2}}]
          - matches: [{{path: {{type: RegularExpression, value: "/re/v[0-9]+/items"}}}}]
            backendRefs: [{{name: web-v2}}]
          - matches: [{{path: {{type: PathPrefix, value: /m}}, method: POST}}]
            backendRefs: [{{name: web-v2}}]
          - matches: [{{queryParams: [{{name: version, value: "2"}}]}}]
            backendRefs: [{{name: web-v2}}]
      - name: hosts
        hostnames: [only.example.com]
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /host}}}}]
            backendRefs: [{{name: web-v2}}]
      - name: moves
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
            filters:
              - type: RequestRedirect
                requestRedirect:
                  path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}
                  statusCode: 301
          - matches: [{{path: {{type: PathPrefix, value: /rw}}}}]
            filters:
              - type: URLRewrite
                urlRewrite:
                  hostname: internal.example
                  path: {{type: ReplacePrefixMatch, replacePrefixMatch: /internal}}
            backendRefs: [{{name: web}}]
      - name: canary
        rules:
          - matches: [{{path: {{type: PathPrefix, value: /canary}}}}]
            backendRefs: [{{name: web, weight: 99}}, {{name: web-v2, weight: 1}}]
      - name: default
        rules:
          - backendRefs: [{{name: web}}]
"""


class Http:
    def __init__(self, topo: Topology, port: int) -> None:
        self.topo = topo
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def get(self, path: str, **kw) -> tuple[int, dict, dict]:
        method = kw.pop("method", "GET")
        async with self.session.request(method, self.base + path, allow_redirects=False,
                                        **kw) as r:
            text = await r.text()
            body = json.loads(text) if r.content_type == "application/json" else {"text": text}
            return r.status, body, dict(r.headers)

    async def close(self) -> None:
        await self.session.close()


class Collector:
    """An OTLP/HTTP traces endpoint (JSON encoding) on the test's loop: keeps every span."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[tuple[str, dict]] = []  # (the resource's isthmus.cluster, span)
        self.runner: web.AppRunner | None = None

    async def _post(self, req: web.Request) -> web.Response:
        assert req.content_type == "application/json"
        msg = await req.json()
        for rs in msg["resourceSpans"]:
            attrs = {a["key"]: a["value"].get("stringValue") for a in rs["resource"]["attributes"]}
            for ss in rs["scopeSpans"]:
                self.spans += [(attrs.get("isthmus.cluster", ""), sp) for sp in ss["spans"]]
        return web.json_response({})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._post)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def of_trace(self, trace_id: str) -> dict[str, dict]:
        return {c: sp for c, sp in self.spans if sp["traceId"] == trace_id}


@pytest.fixture
async def http(tmp_path, request):
    collector = Collector()
    await collector.start()
    tracing = (f"tracing:\n  otlp_endpoint: http://127.0.0.1:{collector.port}/v1/traces\n"
               "  flush_interval: 200ms\n")
    topo = Topology(tmp_path / "topo", top={c: TOP + tracing for c in ("east-1", "east-2",
                                                                        "west-1")})
    port = free_port()
    backends = {
        "east-1": [HttpBackend("east-1", "web", free_port()), HttpBackend("east-1", "web",
                                                                         free_port())],
        "east-2": [HttpBackend("east-2", "web", free_port())],
        "west-1": [HttpBackend("west-1", "web-v2", free_port())],
    }
    for bs in backends.values():
        for b in bs:
            await b.start()
    for cluster, bs in backends.items():
        files = topo.nodes[cluster].dir / "services"
        files.mkdir(parents=True, exist_ok=True)
        (files / "exports.yaml").write_text(export_file(bs[0].name, bs))
    (topo.nodes["east-1"].dir / "services" / "routes.yaml").write_text(routes_file(port))
    client = None
    try:
        async with running(topo, request):
            client = Http(topo, port)
            client.backends = backends  # type: ignore[attr-defined]
            client.collector = collector  # type: ignore[attr-defined]
            try:
                await wait_for(lambda: _served_by(client, "/exact", "west-1"), 15.0,
                               what="east-1's HTTP import to reach west-1's web-v2")
            except AssertionError:
                topo.dump_logs()
                raise
            yield client
    finally:
        if collector.runner is not None:
            await collector.runner.cleanup()
        if client is not None:
            await client.close()
        for bs in backends.values():
            for b in bs:
                await b.stop()


async def _served_by(client: Http, path: str, cluster: str) -> bool:
    try:
        status, body, _ = await client.get(path)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == 200 and body.get("cluster") == cluster


async def test_matches_precedence_and_filters(http: Http):
    """Every match kind, HTTPRoute precedence, header modifiers, redirect and rewrite."""
    cases = [
        ("/exact", {}, "web-v2"),  # Exact
        ("/exact/more", {}, "web"),  # not Exact: the catch-all
        ("/api/x", {}, "web"),  # PathPrefix
        ("/apix", {}, "web"),  # a prefix matches whole path elements only: catch-all (web)
        ("/api/x", {"X-Canary": "yes"}, "web-v2"),  # same prefix, more header matches wins
        ("/api/long/y", {}, "web-v2"),  # the longer prefix wins
        ("/re/v12/items", {}, "web-v2"),  # RegularExpression
        ("/re/vx/items", {}, "web"),
        ("/?version=2", {}, "web-v2"),  # query parameter
        ("/?version=3", {}, "web"),
        ("/host/a", {"Host": "only.example.com"}, "web-v2"),  # hostnames
        ("/host/a", {"Host": "other.example.com"}, "web"),
    ]
    for path, headers, name in cases:
        status, body, _ = await http.get(path, headers=headers)
        assert (status, body.get("name")) == (200, name), (path, headers, body)
    status, body, _ = await http.get("/m/1", method="POST", data=b"x")
    assert (status, body["name"]) == (200, "web-v2")  # method
    status, body, _ = await http.get("/m/1")
    assert body["name"] == "web"

    status, body, headers = await http.get("/api/h", headers={"x-secret": "s", "x-route": "old"})
    seen = body["headers"]
    assert seen["x-route"] == "api" and seen["x-added"] == "1" and "x-secret" not in seen
    assert headers.get("x-route-out") == "api" and "x-cluster" not in headers

    status, _, headers = await http.get("/old/page?a=1", headers={"Host": "shop.example:8080"})
    assert status == 301 and headers["Location"] == "http://shop.example:8080/new/page?a=1"
    status, body, _ = await http.get("/rw/p?q=1")
    assert body["path"] == "/internal/p" and body["query"] == "q=1"
    assert body["headers"]["host"] == "internal.example"


async def test_canary_split_and_metrics(http: Http):
    """1% to web-v2 over 10,000 requests, within a binomial tolerance (6 sigma)."""
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            status, body, _ = await http.get(f"/canary/{i}")
            counts[body.get("name") if status == 200 else f"status {status}"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(CANARY_N)))
    took = time.monotonic() - t0
    p = 0.01
    mean, sd = CANARY_N * p, math.sqrt(CANARY_N * p * (1 - p))
    print(f"\ncanary: {dict(counts)} in {took:.1f} s; expected web-v2 {mean:.0f} ± {sd:.1f}")
    assert counts["web"] + counts["web-v2"] == CANARY_N, counts
    assert abs(counts["web-v2"] - mean) <= 6 * sd, counts
    text = await http.topo.metrics("east-1")
    got = metric_value(text, "isthmus_gateway_http_requests_total",
                       'listener="import default/web",route="canary",cluster="west-1",'
                       'code="2xx"')
    assert got == counts["web-v2"], got


async def test_trace_context(http: Http):
    """A valid traceparent is continued (trace id kept, new parent id, flags kept, tracestate
    passed on); a missing or malformed one starts a new trace; the access log names it."""
    _, body, _ = await http.get("/api/t", headers={"traceparent": TRACE,
                                                   "tracestate": "vendor=1"})
    tp = body["headers"]["traceparent"]
    assert tp.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and tp.endswith("-01")
    assert tp.split("-")[2] != "00f067aa0ba902b7"
    assert body["headers"]["tracestate"] == "vendor=1"
    for bad in ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "garbage",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        _, body, _ = await http.get("/api/t", headers={"traceparent": bad,
                                                       "tracestate": "vendor=1"})
        new = body["headers"]["traceparent"].split("-")
        assert len(new) == 4 and new[1] != "4bf92f3577b34da6a3ce929d0e0e4736" and new[1] != "0" * 32
        assert "tracestate" not in body["headers"]
    _, body, _ = await http.get("/api/t")
    assert len(body["headers"]["traceparent"]) == 55
    text = (http.topo.root / "logs" / "east-1.log").read_text()
    assert "trace_id=4bf92f3577b34da6a3ce929d0e0e4736" in text and "route=api" in text


async def test_trace_continues_across_two_gateways(http: Http):
    """/exact goes to west-1's web-v2, an http export: west-1 handles each request as a hop of
    its own, so the backend sees the client's trace id with west-1's span as its parent — not
    east-1's span (logged by east-1), nor the client's."""
    _, body, _ = await http.get("/exact?hop=2", headers={"traceparent": TRACE})
    assert body["cluster"] == "west-1"
    _, trace_id, parent, flags = body["headers"]["traceparent"].split("-")
    assert trace_id == TRACE.split("-")[1] and flags == "01"
    log = http.topo.root / "logs" / "east-1.log"

    def logged() -> list[str]:  # the line follows the response: wait for it
        return [ln for ln in log.read_text().splitlines() if "'/exact?hop=2'" in ln]

    await wait_for(logged, 3.0, what="east-1's access log line")
    line = logged()[0]
    east_span = line.split("span_id=")[1].split()[0]
    assert f"parent_id={TRACE.split('-')[2]}" in line
    assert parent not in (east_span, TRACE.split("-")[2]), (parent, east_span)
    text = await http.topo.metrics("west-1")
    assert metric_value(text, "isthmus_gateway_http_requests_total",
                        'listener="inbound",route="export default/web-v2",cluster="west-1",'
                        'code="2xx"') >= 1
    # the OTLP spans of both hops: east-1's is the client's child, west-1's is east-1's child
    collector = http.collector  # type: ignore[attr-defined]
    await wait_for(lambda: _both(collector, trace_id), 5.0, what="both hops' spans")
    spans = collector.of_trace(trace_id)
    e1, w1 = spans["east-1"], spans["west-1"]
    assert e1["parentSpanId"] == TRACE.split("-")[2] and e1["spanId"] == east_span
    assert w1["parentSpanId"] == e1["spanId"] and w1["spanId"] == parent
    assert e1["kind"] == w1["kind"] == 2  # SERVER
    # two processes' clocks (each span's start is its end minus a loop-time duration): the
    # inner hop lies within the outer one, give or take a few milliseconds
    assert int(w1["startTimeUnixNano"]) >= int(e1["startTimeUnixNano"]) - 5_000_000
    assert int(w1["endTimeUnixNano"]) <= int(e1["endTimeUnixNano"]) + 50_000_000
    assert metric_value(await http.topo.metrics("east-1"), "isthmus_gateway_otlp_spans_total",
                        'result="exported"') >= 1


async def _both(collector, trace_id: str) -> bool:
    return set(collector.of_trace(trace_id)) >= {"east-1", "west-1"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl: apt-get install -y curl")
async def test_curl_bodies_limits_and_bad_requests(http: Http, tmp_path):
    """curl: chunked uploads, Expect: 100-continue, pipelining-free keep-alive; oversized
    heads -> 431, garbage -> 400, and the gateway keeps serving."""
    big = tmp_path / "body.bin"
    big.write_bytes(b"z" * 3_000_000)

    async def curl(*args: str) -> subprocess.CompletedProcess:
        # not subprocess.run: the backends run on this event loop
        p = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "10", *args,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 15)
        return subprocess.CompletedProcess(args, p.returncode, out.decode(), err.decode())

    r = await curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{big}",
             f"{http.base}/api/up")
    assert r.returncode == 0 and r.stdout, (r.returncode, r.stdout, r.stderr)
    assert json.loads(r.stdout)["body_bytes"] == 3_000_000
    r = await curl("-H", "Expect: 100-continue", "--data-binary", f"@{big}", "-w", "\n%{http_code}",
             f"{http.base}/api/up")
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["body_bytes"] == 3_000_000
    r = await curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-H", "x-big: 2000000",
             f"{http.base}/api/big")
    assert r.stdout == "200 2000000", r.stdout

    status, _, _ = await http.get("/api/x", headers={"x-huge": "a" * 70_000})
    assert status == 431
    status, _, _ = await http.get("/api/x", headers={f"x-h{i}": "1" for i in range(120)})
    assert status == 431
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    writer.write(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    line = await asyncio.wait_for(reader.readline(), 3)
    assert line.startswith(b"HTTP/1.1 400"), line
    writer.close()
    status, body, _ = await http.get("/exact")
    assert status == 200 and body["name"] == "web-v2"


async def test_failover_per_backend(http: Http):
    """east-1's own web endpoints stop: requests move to east-2 (the zone tier), none fail;
    they come back when the endpoints do."""
    failed: list[str] = []
    seen: list[str] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            try:
                status, body, _ = await http.get("/api/s")
                seen.append(body.get("cluster", f"status {status}"))
                if status != 200:
                    failed.append(f"status {status}: {body}")
            except (aiohttp.ClientError, TimeoutError) as e:
                failed.append(repr(e))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(stream())
    try:
        await wait_for(lambda: _true(seen), 3.0, what="requests")
        for b in http.backends["east-1"]:  # type: ignore[attr-defined]
            await b.stop()
        await wait_for(lambda: _last(seen, "east-2"), 5.0, what="requests served by east-2")
        for b in http.backends["east-1"]:  # type: ignore[attr-defined]
            await b.start()
        await wait_for(lambda: _last(seen, "east-1"), 8.0, what="requests back on east-1")
    finally:
        stop.set()
        await task
    print(f"\nfailover: {Counter(seen)}, failed {len(failed)}")
    assert not failed, failed[:5]


async def test_route_change_reloaded_under_steady_requests(http: Http):
    """/exact moves from web-v2 to web by a reload while requests stream: none fails."""
    failed: list[str] = []
    seen: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            try:
                status, body, _ = await http.get("/exact")
                if status != 200:
                    failed.append(f"status {status}")
                seen.append((time.monotonic(), body.get("name", "")))
            except (aiohttp.ClientError, TimeoutError) as e:
                failed.append(repr(e))
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(stream()) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)
        path = http.topo.nodes["east-1"].dir / "services" / "routes.yaml"
        replace_file(path, routes_file(http.port, exact_backend="web"))
        await wait_for(lambda: _last([n for _, n in seen], "web"), 5.0,
                       what="/exact to go to web after the reload")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    print(f"\nreload under load: {len(seen)} requests, {len(failed)} failed")
    assert not failed, failed[:5]
    status = await http.topo.status("east-1")
    assert status["config"]["last_reload"]["result"] == "applied", status["config"]


async def _true(xs: list) -> bool:
    return bool(xs)


async def _last(xs: list, want: str) -> bool:
    return len(xs) >= 3 and all(x == want for x in xs[-3:])
