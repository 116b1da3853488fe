"""The catalog as callers read it: one snapshot, and the long-poll watch over its changes.

* Snapshot. `snapshot()` reads every key under `catalog/` at one revision; a value that does
  not parse is skipped with one log line (quoted), so one bad record hides nothing else.
* Watch. `GET /v1/watch?after=REV&timeout=D` answers the events after `after` as soon as there
  are any, or none when `timeout` (at most `api.MAX_WATCH_TIMEOUT`) passes or the server stops.
  Watchers at the same revision share one wait on the store and one serialized answer (the
  fan-out to 1,000 gateways is one store read and one JSON encoding per change).
  A compacted `after` is 410 with the oldest revision kept (resync from a snapshot); an
  `after` the store has not reached is 400 with the current revision.
* Deltas. An answer holds only the keys that changed after `after` (a put with the record's
  whole value — one export with its endpoints — or a delete); the whole catalog is sent only
  by `GET /v1/catalog`, which a gateway reads at its first sync and after a 410 or 400.
* Coalescing (debounce). A change after a quiet spell (no answer with events for DEBOUNCE) is
  answered at once. In a burst (an answer went out less than DEBOUNCE ago) the answer waits
  until no new event came for DEBOUNCE, at most DEBOUNCE_MAX after its first event, and holds
  everything up to then. So under steady churn each watcher gets about one answer per
  DEBOUNCE_MAX instead of one per change (each answer is one HTTP response over TLS per
  watcher: that, not the store, is what 1,000 watchers cost), watchers re-polling within the
  window join the same flight, and an isolated change is not delayed.
* Memory. Answers are kept for sharing up to MAX_BODIES of them or MAX_BODY_BYTES in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from federation import api
from federation.errors import ApiError, CompactedError, FutureRevisionError, InputError
from federation.logs import quote
from federation.model import CATALOG_PREFIX, Catalog
from federation.server.auth import Auth
from federation.server.state import State, log
from federation.units import parse_duration, parse_int

MAX_BODIES = 256  # distinct watch answers kept (watchers at the same revision share one)
MAX_BODY_BYTES = 32 << 20  # and at most this many bytes of them
DEBOUNCE = 0.1  # seconds without a new event that end a burst's answer
DEBOUNCE_MAX = 1.0  # seconds from a burst answer's first event to the answer, at most
QUICK_READ = 0.02  # seconds a debounce read waits for events already there
MAX_ANSWER_EVENTS = 10_000


class CatalogView:
    def __init__(self, state: State, auth: Auth) -> None:
        self.state = state
        self.auth = auth
        self._flights: dict[int, asyncio.Task] = {}  # after -> the shared store wait
        self._bodies: dict[tuple[int, int], bytes] = {}  # (after, latest) -> JSON answer
        self._body_bytes = 0
        self._answered = -DEBOUNCE  # loop time of the last answer with events

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
            waiter = asyncio.ensure_future(self._shared_events(after, timeout))
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
        key = (after, latest)
        body = self._bodies.get(key)
        if body is None:  # once per distinct answer, however many watchers get it
            body = json.dumps({"revision": latest,
                               "events": [api.event_to_json(ev) for ev in events]}).encode()
            if len(self._bodies) >= MAX_BODIES or self._body_bytes > MAX_BODY_BYTES:
                self._bodies.clear()
                self._body_bytes = 0
            self._bodies[key] = body
            self._body_bytes += len(body)
        return web.Response(body=body, content_type="application/json")

    async def _shared_events(self, after: int, timeout: float) -> list:
        """The store's events after `after`, from one wait shared by every watcher at that
        revision (single flight): a change wakes one store read, not one per watcher. Each
        watcher still stops waiting at its own timeout (then: no events)."""
        task = self._flights.get(after)
        if task is None or task.done():
            task = asyncio.ensure_future(self._coalesced(after))
            self._flights[after] = task
            task.add_done_callback(lambda t, a=after: self._landed(a, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            return []

    async def _coalesced(self, after: int) -> list:
        """The events after `after` (waiting for the first), held back in a burst as the
        module docstring says."""
        store, loop = self.state.store, asyncio.get_running_loop()
        events = await store.events(CATALOG_PREFIX, after, api.MAX_WATCH_TIMEOUT)
        first = loop.time()
        if events and first - self._answered < DEBOUNCE:  # in a burst: collect the rest
            while len(events) < MAX_ANSWER_EVENTS:
                left = first + DEBOUNCE_MAX - loop.time()
                if left <= 0:
                    break
                await asyncio.sleep(min(DEBOUNCE, left))
                more = await store.events(CATALOG_PREFIX, events[-1].revision, QUICK_READ)
                if not more:
                    break  # quiet for DEBOUNCE
                events += more
        if events:
            self._answered = loop.time()
        return events

    def _landed(self, after: int, task: asyncio.Task) -> None:
        if self._flights.get(after) is task:
            del self._flights[after]
        if not task.cancelled():
            task.exception()  # retrieved here; the watchers that wait get it themselves

    def stop(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
        self._flights.clear()
