"""The federation API over real TLS 1.3 on 127.0.0.1: documents, admin, input, restarts."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from federation import api
from federation.ca import CertificateAuthority
from federation.client import FederationClient
from federation.drill_model import is_drill_id
from federation.errors import FederationError, InputError
from federation.fields import check_name
from federation.server.app import REAP_INTERVAL
from federation.server.ui import UI_ROUTES
from federation.units import parse_duration, parse_int
from tests.helpers.federation import Fed, make_cluster, raw_session

# ---- documents, admin, input ---------------------------------------------------------------


async def test_numbers_and_addresses_are_ascii_digits_only(fed: Fed) -> None:
    """`str.isdigit()` takes '¹', `int()` takes '٣٣', ' 1', '+1' and '1_0': each was a 500 or
    was stored as is. Now each is a 400 naming the field."""
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    bad_numbers = ("¹", "²", "٣", "٣٣", "+1", " 1", "1_0", "-1", "1.0", "9" * 20, "")
    async with raw_session(fed, east.svid) as s:
        for raw in (*bad_numbers, "0"):
            if not raw:
                continue
            async with s.put(f"{fed.url}/v1/clusters/east-1/lease/{raw}") as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("lease"), (raw, body)
        for raw in bad_numbers:
            async with s.get(f"{fed.url}/v1/watch", params={"after": raw, "timeout": "1ms"}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("after"), (raw, body)
        for raw in bad_numbers:
            if not raw:
                continue
            url = f"{fed.url}/v1/drills/d-20250101-000000-abcd/samples/east-1/{raw}"
            async with s.put(url, json={}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("second"), (raw, body)
        for address in ("127.0.0.1:²", "127.0.0.1:٣٣", "127.0.0.1:+80", "127.0.0.1: 80"):
            export = east.export().to_json()
            export["endpoints"][0]["address"] = address
            async with s.put(f"{fed.url}/v1/clusters/east-1/exports/default/web", json=export) as r:
                body = await r.json()
                assert r.status == 400, (address, body)
                assert body["error"].startswith("export.endpoints[0].address"), body
                assert "ASCII digits" in body["error"]
        async with s.get(f"{fed.url}/v1/drills/d-20250101-000000-abcd%0A") as r:
            assert r.status == 404  # a trailing newline is not part of a drill id
    assert (await c.catalog()).exports == {}
    async with raw_session(fed, None) as s:  # unauthenticated: the join (with a token)
        for address in ("127.0.0.1:²", "127.0.0.1:٣٣"):
            body = {"token": await fed.token("west-1"),
                    "cluster": {**make_cluster("west-1").record.to_json(),
                                "gateway_address": address},
                    "bundle": make_cluster("west-1").bundle().to_jwks()}
            async with s.post(f"{fed.url}/v1/join", json=body) as r:
                answer = await r.json()
                assert r.status == 400, answer
                assert answer["error"].startswith("cluster.gateway_address"), answer
        body = {"token": await fed.token("east-1"),
                "cluster": {**east.record.to_json(), "name": "east-1\n"},
                "bundle": east.bundle().to_jwks()}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 400 and "cluster.name" in (await r.json())["error"]
    assert "west-1" not in (await c.catalog()).clusters


async def test_openapi_covers_every_route(fed: Fed) -> None:
    doc = await fed.client().openapi()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = fed.server._runners[0].app
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD"
    }
    dashboard = {("GET", p) for p in UI_ROUTES}  # HTML and its state: not API routes
    assert dashboard <= served
    assert served - dashboard == documented
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])


async def test_openapi_parameters_have_the_schemas_the_server_enforces(fed: Fed) -> None:
    doc = await fed.client().openapi()
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"svid", "operator"}  # the join token is a body field, not a scheme
    assert doc["paths"]["/v1/join"]["post"]["security"] == []
    assert "join token" in doc["components"]["schemas"]["JoinRequest"]["properties"]["token"][
        "description"]
    seen: dict[str, dict] = {}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            params = op.get("parameters", [])
            assert [p["name"] for p in params if p["in"] == "path"] == api.path_params(path)
            for p in params:
                assert p["schema"] != {"type": "string"}, (path, p)  # every one constrained
                seen[p["name"]] = p["schema"]
    assert set(seen) == {"name", "namespace", "service", "lease", "id", "cluster", "second",
                         "after", "timeout"}
    assert seen["lease"] == {**seen["lease"], "type": "integer", "minimum": 1,
                             "maximum": 2**63 - 1}
    assert seen["second"]["type"] == "integer" and seen["after"]["type"] == "integer"

    def doc_accepts(schema: dict, text: str) -> bool:
        if schema["type"] == "integer":
            return (re.fullmatch("[0-9]+", text) is not None
                    and schema["minimum"] <= int(text) <= schema["maximum"])
        return re.fullmatch(schema["pattern"].removeprefix("^").removesuffix("$"), text) is not None

    def server_accepts(check: Callable[[str], object], text: str) -> bool:
        try:
            check(text)
            return True
        except InputError:
            return False

    def drill_id(text: str) -> None:
        if not is_drill_id(text):
            raise InputError(f"{text!r} is not a drill id")

    checks = {
        "name": lambda t: check_name(t, "name"),
        "lease": lambda t: parse_int(t, "lease", 1, api.MAX_ID),
        "after": lambda t: parse_int(t, "after", 0, api.MAX_ID),
        "second": lambda t: parse_int(t, "second", 0, api.MAX_SECOND),
        "timeout": parse_duration,
        "id": drill_id,
    }
    samples = ("east-1", "a", "A", "-a", "a-", "a" * 63, "a" * 64, "east-1\n", "0", "1", "٣",
               "¹", "+1", " 1", "1_0", str(2**63 - 1), str(2**63), "999999999999",
               "1000000000000", "5s", " 5 s ", "1.5m", "5", "٣s", "5s\n", "1e3s", "-1s",
               "d-20250101-000000-abcd", "d-20250101-000000-abcd\n", "d-2025-000000-abcd")
    for name, check in checks.items():
        for text in samples:
            assert doc_accepts(seen[name], text) == server_accepts(check, text), (name, text)

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fed.admin_url}/metrics") as r:
            served = r.headers["Content-Type"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [served]


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? -?[0-9.e+]+$'
)


async def test_metrics_are_prometheus_text(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fed.admin_url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    names = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram")
            continue
        assert _SAMPLE.match(line), line
        names.add(re.split(r"[ {]", line)[0])
    assert {
        "isthmus_federation_requests_total",
        "isthmus_federation_authz_denied_total",
        "isthmus_federation_watchers",
        "isthmus_federation_revision",
        "isthmus_federation_clusters",
        "isthmus_federation_live_clusters",
        "isthmus_federation_request_duration_seconds_bucket",
        "isthmus_federation_drills",
    } <= names
    assert 'route="/v1/join",code="200"' in text
    assert "isthmus_federation_clusters 1" in text
    assert "isthmus_federation_live_clusters 1" in text


async def test_admin_endpoints_and_status(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1", "us-west", "b")
    ce = await fed.join(east)
    await fed.join(west)
    await ce.grant_lease("east-1")
    await ce.put_export(east.export())
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(fed.admin_url + path) as r:
                assert r.status == 200
        async with s.get(fed.admin_url + "/status") as r:
            st = await r.json()
        async with s.get(fed.admin_url + "/v1/catalog") as r:
            assert r.status == 404  # the admin listener serves admin endpoints only
    assert st["clusters"]["east-1"]["live"] is True
    assert st["clusters"]["west-1"]["live"] is False
    assert st["clusters"]["west-1"]["region"] == "us-west"
    assert 0 <= st["clusters"]["east-1"]["lease_age_seconds"] < 5
    assert st["services"]["default/web"]["east-1"][0]["healthy"] is True
    tls_status = await ce.status()
    assert tls_status["services"] == st["services"]
    assert tls_status["clusters"].keys() == st["clusters"].keys()
    with pytest.raises(FederationError) as e:
        await fed.client().status()
    assert e.value.status == 401
    async with raw_session(fed, None) as s:
        async with s.get(fed.url + "/healthz") as r:
            assert r.status == 200


async def test_malformed_and_oversize_bodies(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    url = f"{fed.url}/v1/clusters/east-1/exports/default/web"
    async with raw_session(fed, east.svid) as s:
        async with s.put(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]
        bad = {**east.export().to_json(), "port": 0}
        async with s.put(url, json=bad) as r:
            assert r.status == 400
            assert "export.port" in (await r.json())["error"]
        async with s.put(url, data=b"x" * (api.MAX_BODY + 10)) as r:
            assert r.status == 413
            assert "1 MiB" in (await r.json())["error"]

        async def chunks():
            for _ in range(20):
                yield b" " * 65536
            yield b"{}"

        async with s.put(url, data=chunks()) as r:  # chunked: no Content-Length
            assert r.status == 413
            assert "1 MiB" in (await r.json())["error"]
    west = make_cluster("west-1")
    token = await fed.token("west-1")
    async with raw_session(fed, None) as s:
        body = {"token": "x", "cluster": {**west.record.to_json(), "zone": "A"}}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 401  # no valid token: nothing else is looked at
            assert "join token unknown" in (await r.json())["error"]
        body = {"token": token, "cluster": {"name": "A"}}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 400
            assert "bundle" in (await r.json())["error"]
        body = {"token": token, "cluster": {**west.record.to_json(), "zone": "A"},
                "bundle": west.bundle().to_jwks()}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 400
            assert "cluster.zone" in (await r.json())["error"]
    # a refused body did not use the token up: a good one still joins with it
    await fed.client().join(token, west.record, west.bundle())


async def test_restart_keeps_records(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    await fed.start()
    east = make_cluster("east-1")
    c = await fed.join(east, sequence=4)
    await c.grant_lease("east-1")
    await fed.stop()

    fed2 = Fed(tmp_path)
    await fed2.start()
    try:
        c2 = fed2.client(east.svid)  # same state dir: same federation CA
        cat = await c2.catalog()
        assert cat.clusters["east-1"] == east.record
        assert cat.bundles[east.td]["spiffe_sequence"] == 4
        with pytest.raises(FederationError) as e:
            await c2.put_bundle("east-1", east.bundle(3))
        assert e.value.status == 409
        lease, _ = await c2.grant_lease("east-1")
        assert await c2.keepalive("east-1", lease)
    finally:
        await fed2.stop()


async def test_restart_after_an_outage_longer_than_the_ttl_withdraws_nothing(
    tmp_path: Path,
) -> None:
    """A restarted federation knows nothing new about liveness: every stored lease gets a full
    ttl from the restart, so the gateways' next keepalives find them alive. (It used to expire
    them all at the reaper's first tick, 0.2 s after start, before anyone could renew.)"""
    now = [time.time()]
    fed = Fed(tmp_path, lease_ttl=1.0, clock=lambda: now[0])
    await fed.start()
    east = make_cluster("east-1")
    c = await fed.join(east)
    lease, _ = await c.grant_lease("east-1")
    await c.put_export(east.export())
    await fed.stop()

    now[0] += 30.0  # down for 30 ttls
    fed2 = Fed(tmp_path, lease_ttl=1.0, clock=lambda: now[0])
    await fed2.start()
    try:
        c2 = fed2.client(east.svid)
        before = await c2.catalog()
        assert before.live == {"east-1"}
        await asyncio.sleep(3 * REAP_INTERVAL)  # the reaper ran a few times
        now[0] += 0.9  # and most of a ttl passed: the gateway's keepalive is due about now
        await asyncio.sleep(2 * REAP_INTERVAL)
        after = await c2.catalog()
        assert after.live == {"east-1"} and after.revision == before.revision
        assert [e.cluster for e in after.exports.values()] == ["east-1"]
        assert await c2.keepalive("east-1", lease)  # the same lease: nothing to re-grant

        now[0] += 1.5  # nobody renews any more: withdrawn like any lapsed lease
        async def gone() -> bool:
            return (await c2.catalog()).live == frozenset()

        deadline = time.monotonic() + 5
        while not await gone():
            assert time.monotonic() < deadline, "east-1's lease never expired"
            await asyncio.sleep(REAP_INTERVAL)
        assert (await c2.catalog()).exports == {}
    finally:
        await fed2.stop()


async def test_unreachable_federation_names_url(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("federation.isthmus.local", time.time())
    c = FederationClient("https://127.0.0.1:1", ca.bundle(0), timeout=2)
    try:
        with pytest.raises(FederationError) as e:
            await c.catalog()
        assert "https://127.0.0.1:1" in str(e.value) and e.value.status is None
    finally:
        await c.close()
