"""Clusters at the federation: join, trust bundles, leases, exports and imports.

* State. A cluster's record (`catalog/clusters/<c>`) and bundle (`catalog/bundles/<td>`) are
  written by its join; `load_state` rebuilds the in-memory maps (`State`) from the store at
  start. A stored value that does not parse is skipped with one log line.
* Join. The token is checked first (a caller without a valid one gets 401 before the server
  parses a bundle's certificates for it), then consumed by an atomic `store.delete`. A re-join
  with a fresh token replaces the record and the bundle (even with a lower sequence: a cluster
  that lost its state starts again from 0). A trust domain belongs to one cluster (409).
* Bundles. A bundle update must not lower the sequence held (409); every authority that names a
  SPIFFE trust domain must name the cluster's. Joins and updates reload the live TLS trust.
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
    ClusterRecord,
    Export,
    ImportRecord,
)
from federation.server.auth import Auth
from federation.server.credentials import Credentials, token_cluster, token_key
from federation.server.state import State, log, read_json
from federation.units import parse_int

REAP_INTERVAL = 0.2


class Clusters:
    def __init__(self, state: State, credentials: Credentials, auth: Auth) -> None:
        self.state = state
        self.credentials = credentials
        self.auth = auth
        self._join_lock = asyncio.Lock()

    async def load_state(self) -> None:
        renewed = await self.state.store.renew_all_leases()
        if renewed:
            log.info("%d stored leases renewed for a full ttl: their gateways renew them from "
                     "now on (a restart says nothing about liveness)", renewed)
        kvs, _ = await self.state.store.range(CATALOG_PREFIX)
        records: dict[str, ClusterRecord] = {}
        bundles: dict[str, TrustBundle] = {}
        leases: dict[str, int] = {}
        for kv in kvs:
            try:
                if kv.key.startswith(CLUSTERS):
                    rec = ClusterRecord.from_json(json.loads(kv.value), kv.key)
                    records[rec.name] = rec
                elif kv.key.startswith(BUNDLES):
                    td = kv.key[len(BUNDLES):]
                    bundles[td] = TrustBundle.from_jwks(td, json.loads(kv.value))
                elif kv.key.startswith(LIVE) and kv.lease is not None:
                    leases[kv.key[len(LIVE):]] = kv.lease
            except (ValueError, InputError, IdentityError) as e:
                log.error("ignoring unreadable stored value %s: %s", quote(kv.key), quote(e))
        self.state.records = records
        self.state.cluster_by_td = {r.trust_domain: r.name for r in records.values()}
        self.state.bundles = bundles
        self.state.leases = leases

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

    async def _lease_alive(self, name: str, lease: int) -> bool:
        kv = await self.state.store.get(LIVE + name)
        return kv is not None and kv.lease == lease

    # ---- /v1/join and /v1/clusters/{name}/... ---------------------------------------------

    async def h_join(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: expected an object")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "token: missing or not a string")
        # The token first: a caller without a valid one gets 401 before the server parses a
        # bundle's certificates for it. Only peeked here; consumed atomically below.
        token_cluster(await self.state.store.get(token_key(token)), self.state.clock())
        if "bundle" not in body:
            raise ApiError(400, "bundle: missing")
        try:
            record = ClusterRecord.from_json(body.get("cluster"), "cluster")
            bundle = TrustBundle.from_jwks(record.trust_domain, body["bundle"])
        except (InputError, IdentityError) as e:
            raise ApiError(400, str(e)) from None
        if record.trust_domain == self.state.trust_domain:
            raise ApiError(
                400, f"cluster.trust_domain: {record.trust_domain!r} is the federation's own"
            )
        _check_bundle_domain(bundle, record.trust_domain)
        async with self._join_lock:
            kv = await self.state.store.delete(token_key(token))
            owner = token_cluster(kv, self.state.clock())  # again: used or expired meanwhile
            assert kv is not None
            if owner != record.name:
                self.state.limited.warning("join-token-mismatch",
                                           "join token for %s presented for cluster %s",
                                           quote(owner), quote(record.name))
                raise ApiError(
                    403,
                    f"join token was issued for cluster {owner!r}, "
                    f"not {record.name!r}",
                )
            other = self.state.cluster_by_td.get(record.trust_domain)
            if other is not None and other != record.name:
                await self.state.store.put(kv.key, kv.value)  # authorized but conflicting: keep it
                raise ApiError(
                    409,
                    f"trust domain {record.trust_domain!r} is already used by cluster "
                    f"{other!r}",
                )
            old = self.state.records.get(record.name)
            store = self.state.store
            await store.put(BUNDLES + record.trust_domain, api.canonical_json(bundle.to_jwks()))
            await self.state.store.put(CLUSTERS + record.name, api.canonical_json(record.to_json()))
            bundles = dict(self.state.bundles)
            by_td = dict(self.state.cluster_by_td)
            if old is not None and old.trust_domain != record.trust_domain:
                await self.state.store.delete(BUNDLES + old.trust_domain)
                bundles.pop(old.trust_domain, None)
                by_td.pop(old.trust_domain, None)
            bundles[record.trust_domain] = bundle
            by_td[record.trust_domain] = record.name
            self.state.bundles = bundles
            self.state.cluster_by_td = by_td
            self.state.records = {**self.state.records, record.name: record}
            self.credentials.reload_trust()
        log.info(
            "cluster %s %s (trust domain %s, %s/%s, gateway %s)",
            record.name, "re-joined" if old else "joined", record.trust_domain,
            record.region, record.zone, quote(record.gateway_address),
        )
        return web.json_response({
            "federation_trust_domain": self.state.trust_domain,
            "federation_bundle": self.credentials.federation_bundle().to_jwks(),
            "lease_ttl": self.state.lease_ttl,
        })

    async def h_put_bundle(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        body = await read_json(request)
        td = self.state.records[name].trust_domain
        try:
            new = TrustBundle.from_jwks(td, body)
        except (InputError, IdentityError) as e:
            raise ApiError(400, f"bundle: {e}") from None
        _check_bundle_domain(new, td)
        held = self.state.bundles.get(td)
        if held is not None:
            try:
                new = held.successor(new)
            except BundleSequenceError:
                raise ApiError(
                    409,
                    f"bundle of {td}: sequence {new.sequence} is lower than the held "
                    f"sequence {held.sequence}",
                    held_sequence=held.sequence,
                    sequence=new.sequence,
                ) from None
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


def _check_bundle_domain(bundle: TrustBundle, td: str) -> None:
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


