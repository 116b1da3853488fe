"""Drills at the federation: the drill handlers, the deadline timer, and probe samples.

* Decisions are in `federation/drills.py` (pure); this shell reads the store, calls them with
  its clock and randomness, and writes what they return. Records at `catalog/drills/<id>` (so
  every gateway sees them through the watch), samples at
  `drills/<id>/samples/<cluster>/<second:010d>` (outside `catalog/`, never watched).
* Every drill transition (create with the overlap check, abort, deadline, abort_on trip) runs
  under one lock and re-reads the record from the store, so two transitions never race.
* A timer task sleeps until the earliest deadline of the running drills (woken early when a
  drill is created or ends; at most 5 s) and ends due drills with reason "deadline"; `start()`
  first ends every drill found running past its deadline (after a restart), keeping its record.
* `abort_on` is evaluated after each sample write over the stored samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import string
from typing import Any

from aiohttp import web

from federation import api
from federation import drills as drill_logic
from federation.drill_model import DRILLS, Drill, is_drill_id
from federation.drill_report import compute_report
from federation.errors import ApiError, InputError, StoreError
from federation.logs import quote
from federation.model import SAMPLES
from federation.server.auth import Auth
from federation.server.catalog import CatalogView
from federation.server.state import State, log, read_json
from federation.units import parse_int

DRILL_TIMER_MAX_WAIT = 5.0
_RAND_ALPHABET = string.ascii_lowercase + string.digits


class Drills:
    def __init__(self, state: State, auth: Auth, catalog: CatalogView) -> None:
        self.state = state
        self.auth = auth
        self.catalog = catalog
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()

    async def timer(self) -> None:
        """End running drills at their deadline; sleep until the earliest one (or a change)."""
        while True:
            self.changed.clear()
            try:
                earliest = await self.end_due()
            except StoreError as e:
                log.warning("drill timer: %s", e)
                earliest = None
            wait = DRILL_TIMER_MAX_WAIT
            if earliest is not None:
                wait = min(max(earliest - self.state.clock(), 0.0), DRILL_TIMER_MAX_WAIT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), wait)

    async def end_due(self) -> float | None:
        """End every running drill past its deadline; the earliest deadline still ahead."""
        async with self.lock:
            now = self.state.clock()
            earliest: float | None = None
            for drill in await self.load():
                if drill_logic.due(drill, now):
                    await self.put(drill_logic.end(drill, now, "ended", "deadline"))
                    log.info("drill %s ended at its deadline", drill.id)
                elif drill.state == "running":
                    deadline = drill.fault_end
                    earliest = deadline if earliest is None else min(earliest, deadline)
            return earliest

    async def load(self) -> list[Drill]:
        kvs, _ = await self.state.store.range(DRILLS)
        out = []
        for kv in kvs:
            try:
                out.append(Drill.from_json(json.loads(kv.value), kv.key))
            except (ValueError, InputError) as e:
                log.error("ignoring unreadable drill %s: %s", quote(kv.key), quote(e))
        return out

    async def put(self, drill: Drill) -> int:
        rev = await self.state.store.put(drill.key, api.canonical_json(drill.to_json()))
        self.changed.set()
        return rev

    async def get(self, drill_id: str) -> Drill:
        if not is_drill_id(drill_id):
            raise ApiError(404, f"drill {drill_id!r}: not a drill id (d-YYYYMMDD-HHMMSS-xxxx)")
        kv = await self.state.store.get(DRILLS + drill_id)
        if kv is None:
            raise ApiError(404, f"drill {drill_id!r} is unknown")
        try:
            return Drill.from_json(json.loads(kv.value), kv.key)
        except (ValueError, InputError) as e:
            raise ApiError(500, f"drill {drill_id!r}: stored record unreadable: {e}") from None

    async def samples(self, drill_id: str) -> list[dict[str, Any]]:
        kvs, _ = await self.state.store.range(f"{SAMPLES}{drill_id}/samples/")
        out = []
        for kv in kvs:
            try:
                obj = json.loads(kv.value)
                if isinstance(obj, dict) and isinstance(obj.get("second"), int):
                    out.append(obj)
            except ValueError:
                log.error("ignoring unreadable sample %s", quote(kv.key))
        out.sort(key=lambda o: (o["second"], str(o.get("cluster"))))
        return out

    async def h_create_drill(self, request: web.Request) -> web.Response:
        operator = self.auth.operator(request, "create drills")
        body = await read_json(request)
        async with self.lock:
            now = self.state.clock()
            cat = await self.catalog.snapshot()
            busy = drill_logic.overlapping(cat, now)
            if busy is not None:
                raise ApiError(
                    409,
                    f"drill {busy.id} ({busy.mode} of {busy.scope_kind} {busy.scope}) is "
                    f"{'still running' if busy.state == 'running' else 'still observing'}; "
                    "wait for it to finish or abort it",
                    drill=busy.id,
                )
            rand4 = "".join(secrets.choice(_RAND_ALPHABET) for _ in range(4))
            try:
                drill = drill_logic.new_drill(body, cat, now, rand4)
            except InputError as e:
                raise ApiError(400, str(e)) from None
            await self.put(drill)
        log.info(
            "drill %s created by %s: %s of %s %s (%s), deadline in %.1fs",
            drill.id, quote(operator), drill.mode, drill.scope_kind, drill.scope,
            ", ".join(drill.clusters_in_scope), drill.fault_end - now,
        )
        return web.json_response(drill.to_json(), status=201)

    async def h_list_drills(self, request: web.Request) -> web.Response:
        self.auth.caller(request)
        drills = sorted(await self.load(), key=lambda d: (d.created_at, d.id), reverse=True)
        return web.json_response({"drills": [d.to_json() for d in drills]})

    async def h_get_drill(self, request: web.Request) -> web.Response:
        self.auth.caller(request)
        drill = await self.get(request.match_info["id"])
        return web.json_response({
            "drill": drill.to_json(),
            "samples": await self.samples(drill.id),
        })

    async def h_drill_report(self, request: web.Request) -> web.Response:
        self.auth.caller(request)
        drill = await self.get(request.match_info["id"])
        return web.json_response(compute_report(drill, await self.samples(drill.id)))

    async def h_abort_drill(self, request: web.Request) -> web.Response:
        operator = self.auth.operator(request, "abort drills")
        await self.get(request.match_info["id"])  # 404 before the body is looked at
        reason = "aborted by operator"
        raw = await request.read()
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"request body: not valid JSON ({e})") from None
            if not isinstance(body, dict) or set(body) - {"reason"}:
                raise ApiError(400, 'request body: expected {"reason": "..."}')
            r = body.get("reason")
            if r is not None:
                if not isinstance(r, str) or not r.strip() or len(r) > drill_logic.MAX_REASON:
                    raise ApiError(400, f"reason: {r!r}: expected a short non-empty text")
                reason = r.strip()
        drill = await self.end(request.match_info["id"], "aborted", reason)
        log.info("drill %s aborted by %s: %s", drill.id, quote(operator), quote(reason))
        return web.json_response(drill.to_json())

    async def end(self, drill_id: str, state: str, reason: str) -> Drill:
        async with self.lock:
            drill = await self.get(drill_id)
            try:
                ended = drill_logic.end(drill, self.state.clock(), state, reason)
            except drill_logic.DrillStateError as e:
                raise ApiError(409, str(e), state=drill.state) from None
            await self.put(ended)
            return ended

    async def h_put_sample(self, request: web.Request) -> web.Response:
        info = request.match_info
        caller = self.auth.sample_writer(request)
        try:
            second = parse_int(info["second"], "second (an epoch second)", 0, api.MAX_SECOND)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        drill = await self.get(info["id"])
        if drill.in_scope(caller):
            raise ApiError(
                403, f"cluster {caller!r} is in the scope of drill {drill.id}: only observers "
                "send samples",
            )
        body = await read_json(request)
        try:
            sample = drill_logic.validate_sample(body, drill, caller, second)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        lo, hi = drill_logic.sample_window(drill)
        if not lo <= second <= hi:
            raise ApiError(
                409,
                f"second {second} is outside drill {drill.id}'s sample window "
                f"[{lo:.0f}, {hi:.0f}]",
            )
        key = f"{SAMPLES}{drill.id}/samples/{caller}/{second:010d}"
        rev = await self.state.store.put(key, api.canonical_json(sample))
        if drill.state == "running" and drill.abort_on:
            slo = drill_logic.parse_slo(drill.abort_on)
            samples = await self.samples(drill.id)
            reason = drill_logic.slo_tripped(slo, drill, samples, self.state.clock())
            if reason is not None:
                with contextlib.suppress(ApiError):  # already ended meanwhile: nothing to do
                    await self.end(drill.id, "aborted", reason)
                    log.warning("drill %s: %s", drill.id, reason)
        return web.json_response({"revision": rev})

