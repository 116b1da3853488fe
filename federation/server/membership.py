"""Who belongs to the federation: joins, re-joins, record updates, removals.

* Join (`POST /v1/join`). The token is checked first (a caller without a valid one gets 401
  before the server parses a bundle's certificates for it), then consumed by an atomic
  `store.delete`. A new cluster joins with its token alone. A trust domain belongs to one
  cluster (409).
* Re-join of a cluster that exists. A token alone must not hand over a cluster: the joining
  gateway either proves it IS that cluster (a `proof` signed with its current SVID, verified
  against the bundle held: federation/proof.py), or presents a token the operator made with
  `token create --replace` (an explicit takeover: a new CA or trust domain; logged at WARNING).
  Otherwise 409, and the token is kept for a gateway that can prove it. Either way the bundle
  follows the sequence rules of an update (clusters.sequence_check: a changed bundle carries a
  higher sequence, so nobody rolls it back by re-joining; 409 says the held sequence). A
  replacement with a new trust domain drops the old bundle.
* Record (`PUT /v1/clusters/{name}`): the cluster itself publishes its record again on every
  lease grant, so a gateway that comes back with another inbound address, region or zone is
  found there (the trust domain is fixed: changing it is a re-join with --replace).
* Removal (`DELETE /v1/clusters/{name}`, operator only): the record, bundle, liveness, exports,
  imports and tokens of the cluster are deleted; the TLS layer forgets its CA at once (the
  context is rebuilt), watchers see the deletes, and peers drop their links to it and refuse
  it. A copy of its state dir then opens nothing. Re-adding it takes a new token.
* Silence (`federation serve --forget-silent-after D`, off by default): a cluster with no lease
  for longer than D is removed the same way, logged at WARNING. When its lease ended is kept at
  `silent/<c>`; a cluster already silent when the federation starts counts from the start.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from aiohttp import web

from federation import api
from federation.errors import ApiError, IdentityError, InputError, StoreError
from federation.identity import TrustBundle, gateway_id
from federation.logs import quote
from federation.model import BUNDLES, CLUSTERS, EXPORTS, IMPORTS, LIVE, SILENT, ClusterRecord
from federation.overlay import allocate
from federation.proof import message, verify_proof
from federation.server.auth import Auth
from federation.server.clusters import check_bundle_domain, sequence_check
from federation.server.credentials import Credentials
from federation.server.state import State, log, read_json
from federation.server.tokens import TokenInfo, revoke_tokens, token_for_join, token_key
from federation.units import format_duration

FORGET_CHECK = 60.0  # seconds between checks for clusters silent too long


class Membership:
    def __init__(self, state: State, credentials: Credentials, auth: Auth) -> None:
        self.state = state
        self.credentials = credentials
        self.auth = auth
        self.lock = asyncio.Lock()  # joins and removals, one at a time

    # ---- POST /v1/join -------------------------------------------------------------------
    async def h_join(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: expected an object")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "token: missing or not a string")
        store, clock = self.state.store, self.state.clock
        token_for_join(await store.get(token_key(token)), clock())  # peek; consumed below
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
        check_bundle_domain(bundle, record.trust_domain)
        async with self.lock:
            kv = await store.delete(token_key(token))
            info = token_for_join(kv, clock())  # again: used, revoked or expired meanwhile
            assert kv is not None
            try:
                how = self._admit(info, record, bundle, body, token)
                record = self._with_overlay(record, self.state.records.get(record.name))
            except ApiError as e:
                if e.status == 409:  # authorized, but not now: the token stays usable
                    await store.put(kv.key, kv.value)
                raise
            old = self.state.records.get(record.name)
            # a first join of a domain new here retires nothing: its CAs can be added in place
            first = old is None and record.trust_domain not in self.state.bundles
            await store.put(BUNDLES + record.trust_domain, api.canonical_json(bundle.to_jwks()))
            await store.put(CLUSTERS + record.name, api.canonical_json(record.to_json()))
            bundles = dict(self.state.bundles)
            by_td = dict(self.state.cluster_by_td)
            if old is not None and old.trust_domain != record.trust_domain:
                await store.delete(BUNDLES + old.trust_domain)
                bundles.pop(old.trust_domain, None)
                by_td.pop(old.trust_domain, None)
            bundles[record.trust_domain] = bundle
            by_td[record.trust_domain] = record.name
            self.state.bundles = bundles
            self.state.cluster_by_td = by_td
            self.state.records = {**self.state.records, record.name: record}
            if first:
                self.credentials.add_trust(bundle)
            else:
                self.credentials.reload_trust()
        where = (f"trust domain {record.trust_domain}, {record.region}/{record.zone}, "
                 f"gateway {quote(record.gateway_address)}, bundle sequence {bundle.sequence}")
        if how == "replaced":
            log.warning("cluster %s REPLACED with a --replace token (was trust domain %s, "
                        "now %s): its previous identity is no longer trusted",
                        record.name, old.trust_domain if old else "?", where)
        else:
            log.info("cluster %s %s (%s)", record.name, how, where)
        return web.json_response({
            "federation_trust_domain": self.state.trust_domain,
            "federation_bundle": self.credentials.federation_bundle().to_jwks(),
            "lease_ttl": self.state.lease_ttl,
        })

    def _admit(self, info: TokenInfo, record: ClusterRecord, bundle: TrustBundle, body: dict,
               token: str) -> str:
        """How the join is admitted: "joined", "re-joined (proved possession)" or "replaced";
        ApiError otherwise (403 wrong token, 409 conflicts and re-joins without proof)."""
        if info.cluster != record.name:
            self.state.limited.warning("join-token-mismatch",
                                       "join token for %s presented for cluster %s",
                                       quote(info.cluster), quote(record.name))
            raise ApiError(403, f"join token was issued for cluster {info.cluster!r}, "
                           f"not {record.name!r}")
        other = self.state.cluster_by_td.get(record.trust_domain)
        if other is not None and other != record.name:
            raise ApiError(409, f"trust domain {record.trust_domain!r} is already used by "
                           f"cluster {other!r}")
        old = self.state.records.get(record.name)
        if old is None:
            return "joined"
        held = self.state.bundles.get(old.trust_domain)
        if info.replace:
            how = "replaced"
        elif held is not None and "proof" in body:
            try:
                verify_proof(body["proof"], held, gateway_id(old.trust_domain),
                             self.state.clock(),
                             message(token, record.name, api.canonical_json(body["bundle"])))
            except IdentityError as e:
                self.state.denied += 1
                self.state.limited.warning("rejoin-refused", "re-join of cluster %s refused: "
                                           "bad proof: %s", quote(record.name), quote(e))
                raise ApiError(409, f"cluster {record.name!r} is already joined and the proof "
                               f"of possession does not hold: {e}; a gateway with a new identity "
                               "needs a token made with `isthmus federation token create "
                               f"--cluster {record.name} --replace`") from None
            if old.trust_domain != record.trust_domain:
                raise ApiError(409, f"cluster {record.name!r} is joined with trust domain "
                               f"{old.trust_domain!r}; moving it to {record.trust_domain!r} "
                               "needs a token made with --replace")
            how = "re-joined (proved possession)"
        else:
            self.state.denied += 1
            self.state.limited.warning("rejoin-refused", "re-join of cluster %s refused: no "
                                       "proof of possession and not a --replace token",
                                       quote(record.name))
            raise ApiError(
                409, f"cluster {record.name!r} is already joined (trust domain "
                f"{old.trust_domain}): a re-join must prove it is {record.name} (sign it with "
                "its current SVID) or use a token made with `isthmus federation token create "
                f"--cluster {record.name} --replace` (an operator's takeover)")
        if held is not None and old.trust_domain == record.trust_domain:
            sequence_check(held, bundle)
        return how

    def _with_overlay(self, record: ClusterRecord, old: ClusterRecord | None) -> ClusterRecord:
        """The record with the overlay address the federation gives it (the one it held, else
        the lowest free one of --overlay-cidr); what the gateway sent there is not used."""
        if record.tunnel is None:
            return record
        net = self.state.overlay
        if net is None:
            raise ApiError(409, f"cluster {record.name!r} runs a tunnel, but this federation "
                           "gives no overlay addresses: start it with --overlay-cidr (e.g. "
                           "10.99.0.0/16), or remove the gateway's `tunnel:` section")
        held = [r.tunnel.overlay_address for n, r in self.state.records.items()
                if n != record.name and r.tunnel is not None]
        keep = old.tunnel.overlay_address if old is not None and old.tunnel else ""
        try:
            address = allocate(net, held, keep)
        except InputError as e:
            raise ApiError(409, str(e)) from None
        return replace(record, tunnel=replace(record.tunnel, overlay_address=address))

    # ---- PUT /v1/clusters/{name} ---------------------------------------------------------
    async def h_put_cluster(self, request: web.Request) -> web.Response:
        name = self.auth.owner(request)
        body = await read_json(request)
        try:
            record = ClusterRecord.from_json(body, "cluster")
        except InputError as e:
            raise ApiError(400, str(e)) from None
        if record.name != name:
            raise ApiError(400, f"cluster.name: {record.name!r} but the path is {name!r}")
        old = self.state.records[name]
        if record.trust_domain != old.trust_domain:
            raise ApiError(409, f"cluster.trust_domain: {record.trust_domain!r}, but cluster "
                           f"{name!r} is joined with {old.trust_domain!r}; a new trust domain "
                           "is a re-join with a --replace token")
        async with self.lock:
            record = self._with_overlay(record, old)
            if record == old:
                return web.json_response({"revision": await self.state.store.revision()})
            rev = await self.state.store.put(CLUSTERS + name, api.canonical_json(record.to_json()))
            self.state.records = {**self.state.records, name: record}
        log.info("cluster %s: record updated (gateway %s -> %s, %s/%s -> %s/%s)", name,
                 quote(old.gateway_address), quote(record.gateway_address), old.region, old.zone,
                 record.region, record.zone)
        return web.json_response({"revision": rev})

    # ---- DELETE /v1/clusters/{name} ------------------------------------------------------
    async def h_remove_cluster(self, request: web.Request) -> web.Response:
        operator = self.auth.operator(request, "remove clusters")
        name = request.match_info["name"]
        async with self.lock:
            if name not in self.state.records:
                known = ", ".join(sorted(self.state.records)) or "none"
                raise ApiError(404, f"no cluster named {name!r} (joined: {known})")
            out = await self._remove(name)
        log.warning("cluster %s removed by %s: trust domain %s no longer trusted, %d stored "
                    "keys and %d unused token(s) deleted", name, quote(operator),
                    out["trust_domain"], out["deleted_keys"], out["revoked_tokens"])
        return web.json_response(out)

    async def _remove(self, name: str) -> dict:
        """Delete everything of cluster `name` and forget its trust (the caller holds the lock)."""
        store = self.state.store
        rec = self.state.records[name]
        deleted = 0
        for prefix in (f"{EXPORTS}{name}/", f"{IMPORTS}{name}/"):
            kvs, _ = await store.range(prefix)
            for kv in kvs:
                deleted += await store.delete(kv.key) is not None
        for key in (LIVE + name, BUNDLES + rec.trust_domain, CLUSTERS + name):
            deleted += await store.delete(key) is not None
        await store.delete(SILENT + name)
        tokens = await revoke_tokens(store, cluster=name)
        self.state.records = {k: v for k, v in self.state.records.items() if k != name}
        self.state.bundles = {k: v for k, v in self.state.bundles.items()
                              if k != rec.trust_domain}
        self.state.cluster_by_td = {k: v for k, v in self.state.cluster_by_td.items()
                                    if v != name}
        self.state.leases.pop(name, None)
        self.state.renewed.pop(name, None)
        self.credentials.reload_trust()
        return {"removed": name, "trust_domain": rec.trust_domain, "deleted_keys": deleted,
                "revoked_tokens": len(tokens), "revision": await store.revision()}

    # ---- trust of silent clusters expires (federation serve --forget-silent-after) --------
    async def forget_silent(self, after: float) -> None:
        """Every so often, remove the clusters that have had no lease for `after` seconds. A
        cluster silent since before this process started counts from its start."""
        started = self.state.clock()
        while True:
            await asyncio.sleep(min(FORGET_CHECK, after / 4))
            try:
                await self._forget_once(after, started)
            except StoreError as e:
                log.warning("forgetting silent clusters: %s", e)

    async def _forget_once(self, after: float, started: float) -> None:
        now = self.state.clock()
        for name in sorted(self.state.records):
            if name in self.state.leases:
                continue
            kv = await self.state.store.get(SILENT + name)
            try:
                since = max(float(json.loads(kv.value)["since"]), started) if kv else started
            except (ValueError, KeyError, TypeError):
                since = started
            if now - since < after:
                continue
            async with self.lock:
                if name not in self.state.records or name in self.state.leases:
                    continue
                out = await self._remove(name)
            log.warning("cluster %s removed: silent (no lease) for %s, longer than "
                        "--forget-silent-after %s; trust domain %s no longer trusted",
                        name, format_duration(now - since), format_duration(after),
                        out["trust_domain"])
