"""The dashboard's door (federation/server/ui.py) and the traffic reports (federation/traffic.py),
against an in-process federation with real TLS: who gets in, what a report must look like."""

from __future__ import annotations

import aiohttp
import pytest

from federation.errors import FederationError, InputError
from federation.traffic import MAX_FLOWS, parse_report, rates
from tests.helpers.federation import Fed, make_cluster, raw_session


def report(count: int = 10, dest: str = "east-2", **extra) -> dict:
    return {"admin": "127.0.0.1:15102",
            "flows": [{"destination": dest, "service": "default/echo", "tier": "region",
                       "result": "served", "count": count}],
            "tiers": [{"service": "default/echo", "active": "region", "panic": False}],
            "events": [{"at": 1.0, "kind": "failover", "text": "tier cluster -> region",
                        "service": "default/echo"}], **extra}


def token_of(fed: Fed) -> str:
    path = fed.tmp / "state" / "operator" / "dashboard-token"
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


async def test_admin_port_needs_the_token_and_keeps_it_in_a_cookie(fed: Fed) -> None:
    token = token_of(fed)
    # unsafe: aiohttp's jar keeps no cookie of an IP address otherwise (browsers do)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        for path in ("/ui/", "/ui/app.js", "/ui/api/state", f"/ui/?token={token}x"):
            async with s.get(fed.admin_url + path, allow_redirects=False) as r:
                body = await r.text()
                assert r.status == 401, (path, body)
                assert "dashboard-token" in body and token not in body
        async with s.get(f"{fed.admin_url}/ui/?token={token}", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/ui/"
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
        async with s.get(f"{fed.admin_url}/ui/") as r:  # the cookie jar has it now
            assert r.status == 200 and "<svg id=\"map\"" in await r.text()
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with s.get(f"{fed.admin_url}/ui/nothere.js") as r:
            assert r.status == 404
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        async with s.get(f"{fed.admin_url}/ui/api/state") as r:
            state = await r.json()
            assert r.status == 200 and state["clusters"] == {} and state["drill"] is None


async def test_tls_port_lets_the_operator_in_not_a_cluster_and_the_token_opens_no_api(
        fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east)
    async with raw_session(fed, fed.server.operator_svid) as s:
        async with s.get(f"{fed.url}/ui/api/state") as r:
            assert r.status == 200 and "east-1" in (await r.json())["clusters"]
    async with raw_session(fed, east.svid) as s:
        async with s.get(f"{fed.url}/ui/api/state") as r:
            assert r.status == 401
    async with raw_session(fed, None) as s:
        async with s.get(f"{fed.url}/v1/catalog",
                         headers={"Authorization": f"Bearer {token_of(fed)}"}) as r:
            assert r.status == 401


async def test_reports_make_rates_and_only_the_owner_may_report(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1", "us-west")
    ce, cw = await fed.join(east), await fed.join(west)
    await ce.put_report("east-1", report(10))
    await ce.put_report("east-1", report(30))
    with pytest.raises(FederationError) as e:
        await cw.put_report("east-1", report())
    assert e.value.status == 403
    with pytest.raises(FederationError) as e:
        await ce.put_report("east-1", report(dest="East_2"))
    assert e.value.status == 400 and "report.flows[0].destination" in str(e.value)
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token_of(fed)}"}) as s:
        async with s.get(f"{fed.admin_url}/ui/api/state") as r:
            state = await r.json()
        async with s.get(f"{fed.admin_url}/status") as r:
            status = await r.json()
    (flow,) = state["flows"]
    assert flow["source"] == "east-1" and flow["count"] == 30 and flow["per_second"] > 0
    assert state["tiers"]["east-1"][0]["active"] == "region"
    assert state["events"][0]["cluster"] == "east-1"
    assert status["clusters"]["east-1"]["admin"] == "127.0.0.1:15102"
    assert status["clusters"]["west-1"]["admin"] is None


@pytest.mark.parametrize("body, field", [
    ({"flows": [], "tiers": []}, "report.events"),
    ({**report(), "flows": "x"}, "report.flows"),
    ({**report(), "flows": [{**report()["flows"][0], "result": "nope"}]},
     "report.flows[0].result"),
    ({**report(), "flows": [{**report()["flows"][0], "count": -1}]}, "report.flows[0].count"),
    ({**report(), "flows": [{**report()["flows"][0], "service": "echo"}]},
     "report.flows[0].service"),
    ({**report(), "flows": report()["flows"] * (MAX_FLOWS + 1)}, "report.flows"),
    ({**report(), "events": [{"at": 1, "kind": "x", "text": "a" * 301}]}, "report.events[0].text"),
    ({**report(), "extra": 1}, "report: unknown field(s) 'extra'"),
    ({**report(), "events": [{"at": float("nan"), "kind": "x", "text": "y"}]},
     "report.events[0].at"),
    ({**report(), "tiers": [{"service": "default/echo", "panic": False}]},
     "report.tiers[0].active"),
    ({**report(), "flows": [{**report()["flows"][0], "x": 1}]}, "report.flows[0]: unknown"),
    ({**report(), "flows": [{**report()["flows"][0], "unit": "bytes"}]}, "report.flows[0].unit"),
    ({**report(), "admin": 5}, "report.admin"),
])
def test_a_bad_report_names_its_field(body, field):
    with pytest.raises(InputError) as e:
        parse_report("east-1", body, 0.0)
    assert str(e.value).startswith(field), e.value


def test_rates_between_two_reports_and_after_a_restart():
    a = parse_report("east-1", report(100), 10.0)
    b = parse_report("east-1", report(120), 12.0)
    assert rates(None, a)[0]["per_second"] == 0.0
    assert rates(a, b)[0]["per_second"] == 10.0
    restarted = parse_report("east-1", report(4), 14.0)
    assert rates(b, restarted)[0]["per_second"] == 2.0
