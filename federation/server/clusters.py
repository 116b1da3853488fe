"""Clusters at the federation: trust bundles, leases, exports and imports (joining, re-joining
and removal are membership.py's).

* State. A cluster's record (`catalog/clusters/<c>`) and bundle (`catalog/bundles/<td>`) are
  written by its join; `load_state` rebuilds the in-memory maps (`State`) from the store at
  start. A stored value that does not parse is skipped with one log line.
* Bundles. A changed bundle must carry a higher sequence than the one held (409 with
  `held_sequence` otherwise, so the cluster can publish above it); the same bundle again is
  not a new revision. Every authority that names a SPIFFE trust domain must name the
  cluster's. Joins, updates and removals rebuild the TLS trust (credentials.py).
* Leases. A reaper calls `store.expire_leases()` every 200 ms, so a cluster that stops renewing
  loses `catalog/live/<c>` and its exports within ttl + 0.2 s; watchers see the deletes.
  A restart knows nothing new about liveness: `load_state` renews every stored lease for a
  full ttl (`store.renew_all_leases()`) before the listeners open, so after an outage longer
  than the ttl the gateways' next keepalives (every ttl/3, retried as often while the
  federation is down) find their leases alive and nothing is withdrawn.
  Granting a new lease does not revoke the previous one: keys re-put under the new lease move
  to it, and the old lease ends (deleting only what is still attached to it) at its deadline.
* Exports and imports are stored on the cluster's lease, so they disappear with it; an
  identical write is not a new revision.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from federation import api
from federation.errors import (
    ApiError,
    BundleSequenceError,
    CompactedError,
    IdentityError,
    InputError,
    StoreError,
)
from federation.fields import check_name
from federation.identity import TrustBundle, spiffe_id_of
from federation.logs import quote
from federation.model import (
    BUNDLES,
    CATALOG_PREFIX,
    CLUSTERS,
    EXPORTS,
    IMPORTS,
    LIVE,
    SILENT,
    ClusterRecord,
    Export,
    ImportRecord,
)
from federation.server.auth import Auth
from federation.server.credentials import Credentials
from federation.server.state import State, log, read_json
from federation.store.base import KV
from federation.units import parse_int

REAP_INTERVAL = 0.2
TRUST_REBUILD_EVERY = 1.0  # seconds between TLS trust rebuilds for other replicas' writes


class Clusters:
    def __init__(self, state: State, credentials: Credentials, auth: Auth) -> None:
        self.state = state
        self.credentials = credentials
        self.auth = auth

    async def load_state(self) -> None:
        renewed = await self.state.store.renew_all_leases()
        if renewed:
            log.info("%d stored leases renewed for a full ttl: their gateways renew them from "
                     "now on (a restart says nothing about liveness)", renewed)
        await self.refresh_maps()

    async def refresh_maps(self) -> int:
        """Records, bundles and leases from the store (replaced whole); the revision read at."""
        kvs, revision = await self.state.store.range(CATALOG_PREFIX)
        maps: tuple[dict, dict, dict] = ({}, {}, {})
        for kv in kvs:
            self._fold(maps, kv.key, kv)
        self._install(*maps)
        return revision

    def _fold(self, maps: tuple[dict, dict, dict], key: str, kv: KV | None) -> bool:
        """One stored key (None: deleted) into (records, bundles, leases); True if the trust
        (a bundle) changed. A value that does not parse is skipped with one log line."""
        records, bundles, leases = maps
        try:
            if key.startswith(CLUSTERS):
                if kv is None:
                    records.pop(key[len(CLUSTERS):], None)
                else:
                    rec = ClusterRecord.from_json(json.loads(kv.value), kv.key)
                    records[rec.name] = rec
            elif key.startswith(BUNDLES):
                td = key[len(BUNDLES):]
                new = None if kv is None else TrustBundle.from_jwks(td, json.loads(kv.value))
                old = bundles.pop(td, None) if new is None else bundles.get(td)
                if new is not None:
                    bundles[td] = new
                return old != new
            elif key.startswith(LIVE):
                if kv is None or kv.lease is None:
                    leases.pop(key[len(LIVE):], None)
                else:
                    leases[key[len(LIVE):]] = kv.lease
        except (ValueError, InputError, IdentityError) as e:
            log.error("ignoring unreadable stored value %s: %s", quote(key), quote(e))
        return False

    def _install(self, records: dict, bundles: dict, leases: dict) -> None:
        self.state.records = records
        self.state.cluster_by_td = {r.trust_domain: r.name for r in records.values()}
        self.state.bundles = bundles
        self.state.leases = leases

    async def follow_store(self) -> None:
        """With a store other federation processes write too (etcd), follow their changes to
        records, bundles and leases, so a cluster that joined at another replica is known (and
        its certificate trusted) here. Each changed key is read again (its latest value, never
        an older one than a handler here just installed) and folded into copies of the maps,
        which then replace the old ones: O(changes), not a re-read of the whole catalog. The
        TLS trust is rebuilt only when a bundle differs from the one held (this process's own
        joins installed theirs already), at most once per TRUST_REBUILD_EVERY: a rebuild
        loads every cluster's CA (~0.5 s of CPU with 1,000 clusters), so 1,000 joins would
        otherwise cost minutes."""
        store = self.state.store
        if not getattr(store, "shared", False):
            return
        loop = asyncio.get_running_loop()
        after = await store.revision()
        stale, rebuilt = False, -TRUST_REBUILD_EVERY
        while True:
            wait = max(0.0, rebuilt + TRUST_REBUILD_EVERY - loop.time()) if stale else 25.0
            try:
                events = await store.events(CATALOG_PREFIX, after, wait)
                if events:
                    keys = dict.fromkeys(ev.key for ev in events
                                         if ev.key.startswith((CLUSTERS, BUNDLES, LIVE)))
                    if keys:
                        latest = [(key, await store.get(key)) for key in keys]
                        # no await from the copy to the install: a handler's change to the
                        # maps meanwhile is not lost
                        maps = (dict(self.state.records), dict(self.state.bundles),
                                dict(self.state.leases))
                        for key, kv in latest:
                            stale |= self._fold(maps, key, kv)
                        self._install(*maps)
                    after = events[-1].revision  # only now: a failed read is tried again
            except CompactedError:
                after = await self.refresh_maps()
                stale = True
            except StoreError as e:
                log.warning("following the store: %s", e)
                await asyncio.sleep(1.0)
                continue
            if stale and loop.time() >= rebuilt + TRUST_REBUILD_EVERY:
                self.credentials.reload_trust()
                stale, rebuilt = False, loop.time()

    # ---- leases --------------------------------------------------------------------------

    async def reaper(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                ended = await self.state.store.expire_leases()
            except StoreError as e:
                log.warning("lease reaper: %s", e)
                continue
            if ended:
                for name, lease in list(self.state.leases.items()):
                    if not await self._lease_alive(name, lease):
                        log.info("cluster %s: lease %d expired, exports withdrawn", name, lease)
                        self.state.leases.pop(name, None)
                        await self._silent_since(name, self.state.clock())

    async def _silent_since(self, name: str, now: float) -> None:
        """Remember when `name` went silent (membership.forget_silent reads it)."""
        try:
            await self.state.store.put(SILENT + name, api.canonical_json({"since": now}))
        except StoreError as e:
            log.warning("cluster %s: cannot record when it went silent: %s", name, e)

    async def _lease_alive(self, name: str, lease: int) -> bool:
        kv = await self.state.store.get(LIVE + name)
        return kv is not None and kv.lease == lease

    # ---- /v1/join and /v1/clusters/{name}/... ---------------------------------------------

    async def h_put_bundle(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        body = await read_json(request)
        td = self.state.records[name].trust_domain
        try:
            new = TrustBundle.from_jwks(td, body)
        except (InputError, IdentityError) as e:
            raise ApiError(400, f"bundle: {e}") from None
        check_bundle_domain(new, td)
        held = self.state.bundles.get(td)
        if held is not None:
            sequence_check(held, new)
            if new.sequence == held.sequence:  # the same bundle again: nothing to write
                return web.json_response({"revision": await self.state.store.revision()})
        rev = await self.state.store.put(BUNDLES + td, api.canonical_json(new.to_jwks()))
        self.state.bundles = {**self.state.bundles, td: new}
        self.credentials.reload_trust()
        log.info("cluster %s: bundle of %s updated to sequence %d", name, td, new.sequence)
        return web.json_response({"revision": rev})

    async def h_grant_lease(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        lease = await self.state.store.grant_lease(self.state.lease_ttl)
        now = self.state.clock()
        await self.state.store.put(LIVE + name, api.canonical_json({"since": now}), lease=lease)
        self.state.leases[name] = lease
        self.state.renewed[name] = now
        await self.state.store.delete(SILENT + name)
        log.info("cluster %s: lease %d granted (ttl %gs)", name, lease, self.state.lease_ttl)
        return web.json_response({"lease": lease, "ttl": self.state.lease_ttl})

    async def h_keepalive(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        try:
            lease = parse_int(request.match_info["lease"], "lease (a lease id)", 1, api.MAX_ID)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        if self.state.leases.get(name) != lease or not await self.state.store.keepalive(lease):
            raise ApiError(404, f"lease {lease} of cluster {name!r} is unknown or expired")
        self.state.renewed[name] = self.state.clock()
        return web.json_response({"lease": lease, "ttl": self.state.lease_ttl})

    async def h_put_export(self, request: web.Request) -> web.Response:
        return await self._put_leased(request, Export, "export")

    async def h_delete_export(self, request: web.Request) -> web.Response:
        return await self._delete_leased(request, EXPORTS)

    async def h_put_import(self, request: web.Request) -> web.Response:
        return await self._put_leased(request, ImportRecord, "import")

    async def h_delete_import(self, request: web.Request) -> web.Response:
        return await self._delete_leased(request, IMPORTS)

    async def _put_leased(self, request: web.Request, kind: type, what: str) -> web.Response:
        """Store one of the caller's own per-service records (an Export or an ImportRecord) on
        its lease, so it disappears with the lease. An identical write is not a new revision."""
        name = self.auth.owner(request)
        body = await read_json(request)
        try:
            rec = kind.from_json(body, what)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        ns, svc = request.match_info["namespace"], request.match_info["service"]
        if (rec.cluster, rec.namespace, rec.name) != (name, ns, svc):
            raise ApiError(
                400,
                f"{what}: names {rec.cluster}/{rec.namespace}/{rec.name} but the "
                f"path is {name}/{ns}/{svc}",
            )
        lease = self.state.leases.get(name)
        if lease is None:
            raise ApiError(409, f"cluster {name!r} has no live lease; grant one first")
        value = api.canonical_json(rec.to_json())
        current = await self.state.store.get(rec.key)
        if current is not None and current.value == value and current.lease == lease:
            return web.json_response({"revision": current.mod_revision})
        try:
            rev = await self.state.store.put(rec.key, value, lease=lease)
        except StoreError:
            try:
                alive = await self._lease_alive(name, lease)
            except StoreError:
                alive = True  # the store does not answer: that is the error, not the lease
            if alive:
                raise  # 503: the write is not acknowledged, the lease stays
            if self.state.leases.get(name) == lease:
                self.state.leases.pop(name, None)
            raise ApiError(
                409, f"cluster {name!r} has no live lease (lease {lease} expired)"
            ) from None
        return web.json_response({"revision": rev})

    async def _delete_leased(self, request: web.Request, prefix: str) -> web.Response:
        name = self.auth.owner(request)
        try:
            ns = check_name(request.match_info["namespace"], "namespace")
            svc = check_name(request.match_info["service"], "service")
        except InputError as e:
            raise ApiError(400, str(e)) from None
        key = f"{prefix}{name}/{ns}/{svc}"
        prev = await self.state.store.delete(key)
        return web.json_response({
            "deleted": prev is not None,
            "revision": await self.state.store.revision(),
        })


def sequence_check(held: TrustBundle, new: TrustBundle) -> None:
    """ApiError 409 (with `held_sequence`, so the cluster can publish above it) unless `new` may
    replace `held`: a higher sequence, or the same bundle at the same sequence."""
    try:
        held.successor(new)
    except BundleSequenceError as e:
        raise ApiError(409, f"{e}: publish it at a sequence above {held.sequence}",
                       held_sequence=held.sequence, sequence=new.sequence) from None


def check_bundle_domain(bundle: TrustBundle, td: str) -> None:
    """A JWKS carries no trust domain; but an authority whose URI SAN is a SPIFFE ID (as our CAs
    have: `spiffe://<td>`) must name the cluster's trust domain."""
    for i, der in enumerate(bundle.authorities):
        try:
            claimed = spiffe_id_of(der)
        except IdentityError:
            continue  # a CA without a SPIFFE URI SAN: nothing to compare
        if claimed.trust_domain.name != td:
            raise ApiError(
                400,
                f"bundle: keys[{i}] is an authority of trust domain "
                f"{claimed.trust_domain.name!r}, not of the cluster's {td!r}",
            )


