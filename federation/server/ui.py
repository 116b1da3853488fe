"""The dashboard at `/ui/`: static files, one JSON state, and who may see them.

* Files. `federation/server/dashboard/` (index.html, app.js, style.css: no build step, no CDN,
  no library; plain JS and SVG) is served as is, with a strict Content-Security-Policy
  (`default-src 'self'`: the page loads nothing from elsewhere) and `no-store`.
* State. `GET /ui/api/state` is the one JSON the page polls (every second): the federation's
  /status (clusters with region, zone, lease, the admin address their gateway reported;
  services and endpoints), every cluster's latest traffic report with the rate of each flow
  between its last two reports (federation/traffic.py), the running drill with its timeline,
  the latest drill's report, and recent events (failovers, health) from all reports, newest
  first. Reports come from `PUT /v1/clusters/{name}/report` (a cluster SVID, its own name only:
  `Auth.owner`), are kept in memory only, and are 400 when malformed (the field is named).
* Who. Never open by default. On the TLS port the operator SVID gets in (a browser with the
  operator's certificate imported). On both ports a read-only dashboard token does: a random
  secret in `STATE_DIR/operator/dashboard-token` (0600, made at first start, like the operator
  SVID). A browser opens `/ui/?token=SECRET` once: the token is checked (constant time), set
  as an HttpOnly, SameSite=Strict cookie for `/ui`, and the browser is redirected to `/ui/` so
  the secret leaves the address bar; API clients may send `Authorization: Bearer SECRET`. The
  token opens the dashboard's GETs only: nothing of `/v1`. Anything else is 401 with a page
  saying how to get in (the token's path, never the token). Refusals are counted and logged as
  every 401 is (`Auth.refused`).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from aiohttp import web

from federation.drill_report import compute_report
from federation.errors import ApiError, InputError
from federation.files import private_dir, write_atomic
from federation.logs import quote
from federation.server.auth import Auth
from federation.server.drills import Drills
from federation.server.state import State, read_json
from federation.traffic import parse_report, rates

STATIC = Path(__file__).with_name("dashboard")
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
COOKIE = "isthmus_ui"
TOKEN_FILE = "dashboard-token"
MAX_EVENTS = 50
UI_ROUTES = ("/ui", "/ui/", "/ui/api/state", "/ui/{file}")  # GET each
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def load_token(state_dir: Path) -> str:
    """The dashboard token: read, or made (32 random bytes, 0600) at first start."""
    path = state_dir / "operator" / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
    token = secrets.token_urlsafe(32)
    private_dir(path.parent)
    write_atomic(path, (token + "\n").encode())
    return token


class Dashboard:
    def __init__(self, state: State, auth: Auth, drills: Drills, status: Any,
                 state_dir: Path) -> None:
        self.state = state
        self.auth = auth
        self.drills = drills
        self.status = status  # async () -> the /status dict (Admin.status)
        self.token_path = state_dir / "operator" / TOKEN_FILE
        self.token = ""

    def start(self, state_dir: Path) -> None:
        self.token = load_token(state_dir)

    # ---- who -----------------------------------------------------------------------------
    def _token_ok(self, given: str | None) -> bool:
        return bool(given) and bool(self.token) and hmac.compare_digest(
            given.encode(), self.token.encode())

    def _allowed(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and self._token_ok(bearer[7:].strip()):
            return True
        if self._token_ok(request.cookies.get(COOKIE)):
            return True
        transport = request.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            try:
                return self.auth.identify(request)[0] == "operator"
            except ApiError:
                return False
        return False

    def _refuse(self, request: web.Request) -> web.Response:
        self.auth.refused("ui-unauthenticated", "dashboard: refused %s %s from %s (no valid "
                          "token or operator SVID)", request.method, quote(request.path),
                          quote(request.remote))
        text = ("The Isthmus dashboard needs the read-only dashboard token: open\n"
                f"  /ui/?token=<the contents of {self.token_path}>\n"
                "once (it is then kept in a cookie), or send 'Authorization: Bearer <token>'.\n"
                "On the TLS port the operator SVID works too.\n")
        return web.Response(status=401, text=text, headers=HEADERS)

    # ---- handlers ------------------------------------------------------------------------
    async def h_redirect(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/ui/"})

    async def h_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file") or "index.html"
        given = request.query.get("token")
        if given is not None and name == "index.html":
            if not self._token_ok(given):
                return self._refuse(request)
            resp = web.Response(status=303, headers={**HEADERS, "Location": "/ui/"})
            resp.set_cookie(COOKIE, given, path="/ui", httponly=True, samesite="Strict",
                            secure=request.secure)
            return resp
        if not self._allowed(request):
            return self._refuse(request)
        if name not in FILES:
            raise ApiError(404, f"no dashboard file {name[:80]!r}")
        body = (STATIC / name).read_bytes()
        return web.Response(body=body, content_type=FILES[name], charset="utf-8",
                            headers=HEADERS)

    async def h_state(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refuse(request)
        return web.json_response(await self.view(), headers=HEADERS)

    async def h_put_report(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        body = await read_json(request)
        try:
            rep = parse_report(name, body, self.state.clock())
        except InputError as e:
            raise ApiError(400, str(e)) from None
        held = self.state.reports.get(name)
        self.state.reports = {**self.state.reports, name: (held[1] if held else None, rep)}
        return web.json_response({"accepted": True})

    # ---- the state -----------------------------------------------------------------------
    async def view(self) -> dict[str, Any]:
        status = await self.status()
        reports = self.state.reports
        flows, tiers, events = [], {}, []
        for cluster, (prev, cur) in sorted(reports.items()):
            if cluster not in status["clusters"]:
                continue  # removed since it reported
            flows += rates(prev, cur)
            tiers[cluster] = list(cur.tiers)
            events += [{**e, "cluster": cluster} for e in cur.events]
        events.sort(key=lambda e: e["at"], reverse=True)
        drills = sorted(await self.drills.load(), key=lambda d: (d.created_at, d.id),
                        reverse=True)
        running = next((d for d in drills if d.state == "running"), None)
        latest = running or (drills[0] if drills else None)
        report = compute_report(latest, await self.drills.samples(latest.id)) if latest else None
        return {
            "now": self.state.clock(),
            "pid": os.getpid(),
            **status,
            "flows": flows,
            "tiers": tiers,
            "events": events[:MAX_EVENTS],
            "drill": None if latest is None else {
                "running": running is not None, "drill": latest.to_json(), "report": report},
        }

    def add_routes(self, app: web.Application) -> None:
        """UI_ROUTES, on `app` (they are not API routes: the OpenAPI document leaves them out)."""
        handlers = {"/ui": self.h_redirect, "/ui/": self.h_file, "/ui/api/state": self.h_state,
                    "/ui/{file}": self.h_file}
        for path in UI_ROUTES:
            app.router.add_get(path, handlers[path])
