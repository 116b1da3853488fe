"""`isthmus status --admin <gateway>` shows the HTTP listeners' requests per route."""

from __future__ import annotations

import io

from isthmus.status import render_status


def test_a_gateway_status_shows_http_requests_per_route_and_cluster():
    data = {"cluster": "east-1", "locality": {"region": "us-east", "zone": "a"}, "ready": True,
            "catalog": {"revision": 7, "live": ["east-1", "west-1"]}, "imports": [],
            "listeners": {
                "import default/web": {"accepted": 3, "http": {"routes": [
                    {"route": "canary", "cluster": "west-1", "classes": [0, 0, 98, 0, 2, 1],
                     "buckets": [], "total": 0.505, "count": 101}]}},
                "inbound": {"accepted": 1}}}
    out = io.StringIO()
    render_status(data, out)
    text = out.getvalue()
    assert "HTTP requests" in text
    line = next(ln for ln in text.splitlines() if "canary" in ln)
    for cell in ("import default/web", "west-1", "98", "2", "5.0"):
        assert cell in line, line
