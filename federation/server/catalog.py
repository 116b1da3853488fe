"""The catalog as callers read it: one snapshot, and the long-poll watch over its changes.

* Snapshot. `snapshot()` reads every key under `catalog/` at one revision; a value that does
  not parse is skipped with one log line (quoted), so one bad record hides nothing else.
* Watch. `GET /v1/watch?after=REV&timeout=D` answers the events after `after` as soon as there
  are any, or none when `timeout` (at most `api.MAX_WATCH_TIMEOUT`) passes or the server stops.
  A compacted `after` is 410 with the oldest revision kept (resync from a snapshot); an
  `after` the store has not reached is 400 with the current revision.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from federation import api
from federation.errors import ApiError, CompactedError, FutureRevisionError, InputError
from federation.logs import quote
from federation.model import CATALOG_PREFIX, Catalog
from federation.server.auth import Auth
from federation.server.state import State, log
from federation.units import parse_duration, parse_int


class CatalogView:
    def __init__(self, state: State, auth: Auth) -> None:
        self.state = state
        self.auth = auth

    async def snapshot(self) -> Catalog:
        kvs, rev = await self.state.store.range(CATALOG_PREFIX)
        items = []
        for kv in kvs:
            try:
                Catalog().apply(kv.key, kv.value, rev)
                items.append((kv.key, kv.value))
            except InputError as e:
                log.error("catalog: skipping unreadable %s: %s", quote(kv.key), quote(e))
        return Catalog.from_items(items, rev)

    async def h_catalog(self, request: web.Request) -> web.Response:
        self.auth.caller(request)
        return web.json_response((await self.snapshot()).to_json())

    async def h_watch(self, request: web.Request) -> web.Response:
        self.auth.caller(request)
        q = request.query
        try:
            after = parse_int(q.get("after", "0"), "after (a revision)", 0, api.MAX_ID)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        try:
            timeout = (parse_duration(q["timeout"]) if "timeout" in q
                       else api.DEFAULT_WATCH_TIMEOUT)
        except InputError as e:
            raise ApiError(400, f"timeout: {e}") from None
        timeout = min(timeout, api.MAX_WATCH_TIMEOUT)
        state = self.state
        state.watchers += 1
        try:
            # Both tasks belong to this request: cancelled and awaited before it answers.
            waiter = asyncio.ensure_future(state.store.events(CATALOG_PREFIX, after, timeout))
            stopper = asyncio.ensure_future(state.stopping.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
            events = waiter.result() if not waiter.cancelled() else []
        except CompactedError as e:
            return web.json_response({"error": str(e), "compacted": e.compacted}, status=410)
        except FutureRevisionError as e:
            return web.json_response({"error": f"after: {e}", "revision": e.current},
                                     status=400)
        finally:
            state.watchers -= 1
        latest = events[-1].revision if events else after
        return web.json_response({
            "revision": latest,
            "events": [api.event_to_json(ev) for ev in events],
        })
