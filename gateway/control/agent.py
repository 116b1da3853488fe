"""The gateway's agent: joins the federation, publishes exports with live health, renews its
lease, follows the catalog, rotates its SVID, and keeps what it learnt on disk.

Theory of operation
-------------------
- Identity is local: the cluster's CA lives in the state dir (or is the user's), and the agent
  issues its own SVID from it, rotating at half life (`Identity`, control/identity.py, which
  also follows a CA rotation plan: `rotation_loop` calls `Identity.refresh` every second, hands
  a new SVID or a new own bundle to `on_svid` (the runtime's TLS snapshot) and wakes
  `lease_loop` to publish a changed bundle before anything depends on it).
- First start: join with the single-use token (token_file or ISTHMUS_JOIN_TOKEN); the answer's
  federation bundle is saved in `joined.json`. Later starts skip the join. What cannot get
  better by retrying is a PermanentError and stops the gateway: a missing or unreadable
  `federation.ca_file` or no token at all (ConfigError), a join the federation refuses with a
  4xx other than 408/429 (JoinRefused: token unknown, used, expired, for another cluster).
  Unreachable, timeouts, 408/429 and 5xx are retried by the caller (runtime) with backoff.
- Bundle: published (PUT) before every lease grant and whenever `Identity.bundle` changed (a CA
  rotation phase); once the federation took it, `Identity.published` is told (the rotation's
  switch is timed from then). A 409 whose `held_sequence` is at least ours (a state dir
  restored from a backup, or the same sequence with other keys) raises our persisted sequence
  to held_sequence + 1 (one WARNING with both numbers) and publishes again.
- Refusals and readiness: a 4xx (but 408/425/429) answer to our bundle or to a lease grant is a
  *refusal*: counted by reason (`refusals`, a metric), kept in `refusal` (in /status), and
  retried with the usual backoff, forever. While refused and without a lease the gateway is
  not ready (`not_ready()`: /readyz answers 503 with the cause): the federation will not route
  to us, and an operator must look. A federation that is merely unreachable or answers 5xx is
  no refusal: the gateway stays ready and routes from its catalog (the data plane does not need
  the federation). `refusal` is cleared when a lease is granted.
- Lease: publish our cluster record (inbound address, region, zone: they may have changed since
  the join), grant, publish every export, then keep alive every ttl/3. A keepalive refused (the
  lease expired while we were away) means our exports were withdrawn: grant a new lease and
  publish them all again. Another cluster's lease expiring shows in the catalog (it leaves
  `live`, its exports stop counting): logged at INFO, as is its return (`log_peers`; the
  primary only, so workers do not repeat it), rate-limited per cluster. A keepalive that fails
  (federation down) is retried every ttl/3 at most, not after the usual growing backoff: a
  restarted federation gives every stored lease one ttl of grace, and the first keepalive must
  land inside it, or the federation withdraws exports of a gateway that was alive all along.
- Exports carry health: when the HealthBook changes a local endpoint, the export is published
  again (coalesced: at most one publish in flight per export, the latest state wins).
- Imports are published the same way (an `ImportRecord` per configured import: its failover
  policy, so `isthmus drill plan` can compute where traffic would go), after every lease grant
  and whenever they differ from what was last published. A federation without the route yet
  (404/405) is logged once and skipped until the next lease grant.
- Drills: while a `drain` drill holds this cluster, `exports_withdrawn` is set and
  `publish_all` reconciles to "no exports": every configured export key is deleted at the
  federation (again after each lease grant, so a re-registration never brings them back);
  clearing it republishes them. The drill actor sets it; this loop does the I/O and retries.
- Catalog: snapshot, then long-poll `watch(after=revision)`; every event is folded in order, so
  nothing is missed across reconnects; `CompactedError` (history gone) and
  `FutureRevisionError` (the federation's store is behind us: reset or restored) mean resync
  from a snapshot. Every
  new catalog goes to `on_catalog` and (coalesced) to `catalog.json`, which a restarted gateway
  routes from while the federation is down.
- Every loop retries with capped exponential backoff; the federation being down never stops
  the data plane.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from federation.client import FederationClient, load_federation_bundle
from federation.errors import (
    CompactedError,
    FederationError,
    FutureRevisionError,
    IdentityError,
    InputError,
    IsthmusError,
    JoinRefused,
)
from federation.files import write_atomic
from federation.identity import Svid, TrustBundle
from federation.logs import LogLimiter
from federation.model import (
    EXPORTS,
    IMPORTS,
    Catalog,
    ClusterRecord,
    Export,
    ImportRecord,
    Tunnel,
)
from gateway.config.schema import GatewayConfig
from gateway.control.identity import Identity
from gateway.errors import ConfigError, Problem

__all__ = ["Agent", "Backoff", "Identity", "federation_ca", "join_refused_for_good"]

log = logging.getLogger("isthmus.gateway.agent")

RETRIED_4XX = (408, 425, 429)  # a 4xx a join may get past by waiting (timeout, too early, busy)
_CALLS = {"record": "cluster record", "bundle": "bundle", "lease": "lease grant"}  # refused calls
PLAN_POLL = 1.0  # the CA rotation plan file is looked at this often


def federation_ca(cfg: GatewayConfig) -> TrustBundle:
    """The federation's CA (federation.ca_file). Missing or not PEM is a ConfigError: the
    operator's to fix, so the gateway stops (exit 2) instead of retrying."""
    try:
        return load_federation_bundle(cfg.federation.ca_file)
    except IdentityError as e:
        raise ConfigError([Problem(str(cfg.source), None, "federation.ca_file", str(e))]) from None


def join_refused_for_good(status: int | None) -> bool:
    """A join answer that no retry can change: any 4xx but RETRIED_4XX (None: no answer)."""
    return status is not None and 400 <= status < 500 and status not in RETRIED_4XX


class Agent:
    def __init__(
        self,
        cfg: GatewayConfig,
        identity: Identity,
        clock: Callable[[], float],
        on_catalog: Callable[[Catalog], None],
        on_svid: Callable[[Svid], None],
        export_state: Callable[[], list[Export]],
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.clock = clock  # wall clock (certificates, leases)
        self.on_catalog = on_catalog
        self.on_svid = on_svid
        self.export_state = export_state
        self.catalog_path = cfg.state_dir / "catalog.json"
        self.joined_path = cfg.state_dir / "joined.json"
        self.catalog = Catalog()
        self.catalog_at = 0.0  # wall time the federation last answered a catalog read (0: never)
        self.bundle_changed_at: dict[str, float] = {}  # cluster -> when its bundle last changed
        self.client: FederationClient | None = None
        self.lease: int | None = None
        self.lease_ttl = 6.0
        self.published: dict[str, bytes] = {}  # store key -> body last PUT (exports and imports)
        self.withdrawn: set[str] = set()  # export keys deleted while exports_withdrawn
        self.exports_withdrawn = False  # a drain drill holds this cluster
        self.imports_unsupported = False  # the federation answered 404/405 to put_import
        self.tunnel: Tunnel | None = None  # our WireGuard side, published in our record
        self.publish_wanted = asyncio.Event()
        self.connected = False
        self.last_error: str | None = None
        self.published_bundle: TrustBundle | None = None  # what the federation took from us last
        self.bundle_wanted = asyncio.Event()  # our bundle changed: publish it now
        self.refusal: dict[str, Any] | None = None  # the federation refuses our bundle or lease
        self.refusals: dict[str, int] = {}  # reason -> count
        self._persist_wanted = asyncio.Event()
        self.log_peers = True  # log other clusters' leases expiring / coming back
        self.events = LogLimiter(log, interval=30.0, burst=4)

    # -- startup ------------------------------------------------------------------------------
    def load_cached_catalog(self) -> Catalog | None:
        try:
            obj = json.loads(self.catalog_path.read_text())
            cat = Catalog.from_json(obj)
        except FileNotFoundError:
            return None
        except (ValueError, InputError) as e:
            log.warning("ignoring cached catalog %s: %s", self.catalog_path, e)
            return None
        self.catalog = cat
        return cat

    def _record(self) -> ClusterRecord:
        c = self.cfg.cluster
        return ClusterRecord(c.name, c.region, c.zone, c.trust_domain, self.cfg.listen.advertise,
                             self.tunnel)

    def _token(self) -> str | None:
        env = os.environ.get("ISTHMUS_JOIN_TOKEN")
        if env:
            return env.strip()
        tf = self.cfg.federation.token_file
        if tf is not None and tf.exists():
            return tf.read_text().strip()
        return None

    async def ensure_joined(self) -> None:
        """Join once (first start); afterwards the saved federation bundle is enough."""
        fed_bundle = federation_ca(self.cfg)
        if self.joined_path.exists():
            self._make_client(fed_bundle)
            return
        token = self._token()
        if token is None:
            tf = self.cfg.federation.token_file
            how = (f"{tf} does not exist" if tf is not None else
                   "set federation.token_file or ISTHMUS_JOIN_TOKEN")
            raise ConfigError([Problem(
                str(self.cfg.source), None, "federation.token_file",
                f"not joined yet and no join token: {how} (create one with "
                f"`isthmus federation token create --cluster {self.cfg.cluster.name}`)")])
        url, name = self.cfg.federation.replicas, self.cfg.cluster.name
        client = FederationClient(url, fed_bundle, None)
        try:
            reply = await self._join_once(client, token)
        except FederationError as e:
            if not join_refused_for_good(e.status):
                raise
            hint = ("; create a new one with `isthmus federation token create --cluster "
                    f"{name}`") if e.status in (401, 403) else ""
            raise JoinRefused(f"federation at {client.url} refused to join {name} ({e.status}): "
                              f"{e}{hint}", e.status) from None
        finally:
            await client.close()
        write_atomic(self.joined_path, json.dumps(reply).encode())
        self.published_bundle = self.identity.bundle
        self.identity.published(self.identity.bundle, self.clock())
        log.info("joined the federation at %s as %s", client.url, self.cfg.cluster.name)
        self._make_client(fed_bundle)

    async def _join_once(self, client: FederationClient, token: str) -> dict:
        """POST /v1/join, signed with our current SVID: if the cluster exists already (we lost
        joined.json but kept our CA), that proves we are it; a new cluster's join ignores it.
        A re-join (or a --replace takeover) below the sequence the federation holds is refused
        with 409 and `held_sequence`, and the token kept: publish above it, once."""
        for attempt in (1, 2):
            try:
                return await client.join(token, self._record(), self.identity.bundle,
                                         prove_with=self.identity.svid)
            except FederationError as e:
                held = e.body.get("held_sequence")
                if (attempt == 2 or e.status != 409 or not isinstance(held, int)
                        or isinstance(held, bool) or held < self.identity.bundle.sequence):
                    raise
                log.warning("cluster %s: the federation holds bundle sequence %d, ours is %d; "
                            "joining with sequence %d", self.cfg.cluster.name, held,
                            self.identity.bundle.sequence, held + 1)
                self.identity.raise_sequence(held + 1)
        raise AssertionError("unreachable")

    def _make_client(self, fed_bundle: TrustBundle) -> None:
        self.client = FederationClient(self.cfg.federation.replicas, fed_bundle,
                                       self.identity.svid)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    # -- loops (each owned by the runtime's task group) --------------------------------------
    async def lease_loop(self) -> None:
        backoff = Backoff()
        name = self.cfg.cluster.name
        while True:
            step, bundle_ok = "record", True
            try:
                if self.lease is None:
                    # our record first: a gateway back with another inbound address (or
                    # region, zone) is found there, not at the one it joined with
                    await self.client.put_record(self._record())
                step = "bundle"
                if self.lease is None or self.identity.bundle != self.published_bundle:
                    try:
                        await self._put_bundle()
                    except FederationError as e:
                        if self.lease is None:
                            raise
                        bundle_ok = False  # keep the lease alive; the bundle is retried below
                        if not self._refused("bundle", e):
                            self._failed("bundle", e)
                if self.lease is None:
                    step = "lease"
                    self.lease, self.lease_ttl = await self.client.grant_lease(name)
                    self.refusal = None
                    self.published.clear()
                    self.withdrawn.clear()
                    self.imports_unsupported = False
                    step = "publish"
                    await self.publish_all()
                    log.info("lease %s granted (ttl %.1fs); exports published", self.lease,
                             self.lease_ttl)
                else:
                    step = "keepalive"
                    if not await self.client.keepalive(name, self.lease):
                        self.events.warning("own-lease", "cluster %s: lease %s expired at the "
                                            "federation (our exports were withdrawn); "
                                            "re-registering", name, self.lease)
                        self.lease = None
                        continue
                if bundle_ok:
                    self.connected = True
                    self.last_error = None
                    backoff.reset()
                    await self._pause(self.lease_ttl / 3)
                else:
                    await asyncio.sleep(min(backoff.next(), self.lease_ttl / 3))
            except FederationError as e:
                if e.status is None and self.lease is None:
                    e = await self._certificate_refusal(e)
                if not self._refused(step, e):
                    self._failed("bundle" if step == "bundle" else "lease", e)
                if e.status == 409 and step != "bundle":  # "no live lease" racing an expiry
                    self.lease = None
                await asyncio.sleep(min(backoff.next(), self.lease_ttl / 3))

    async def _certificate_refusal(self, e: FederationError) -> FederationError:
        """A request without an answer, while we hold no lease: if the federation answers
        anonymous requests, it is its TLS layer refusing our SVID (e.g. CA files replaced
        without an overlap): a refusal (401), not an outage, so we are not ready and say why."""
        try:
            refused = await self.client.refuses_our_certificate()
        except Exception:  # the diagnosis is best effort; the original error stands
            return e
        if not refused:
            return e
        return FederationError(
            f"the federation's TLS layer refuses our SVID (it answers without a client "
            f"certificate): its CA is not in the bundle the federation holds for "
            f"{self.cfg.cluster.trust_domain}; rotate CAs with overlap (isthmus identity "
            f"rotate-ca), or re-join with a --replace token ({e})", 401)

    async def _put_bundle(self) -> None:
        bundle = self.identity.bundle
        await self.client.put_bundle(self.cfg.cluster.name, bundle)
        self.published_bundle = bundle
        if self.refusal is not None and self.refusal["call"] == "bundle":
            self.refusal = None
        self.identity.published(bundle, self.clock())

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if our bundle changed meanwhile (publish it at once)."""
        try:
            async with asyncio.timeout(seconds):
                await self.bundle_wanted.wait()
        except TimeoutError:
            pass
        self.bundle_wanted.clear()

    def _refused(self, call: str, e: FederationError) -> bool:
        """Record a refusal of our bundle or lease grant (False: not one). A sequence conflict
        raises our sequence past the federation's, so the retry is accepted."""
        if call not in ("record", "bundle", "lease") or not join_refused_for_good(e.status):
            return False
        name, ours = self.cfg.cluster.name, self.identity.bundle.sequence
        held = e.body.get("held_sequence")
        if (call == "bundle" and e.status == 409 and isinstance(held, int)
                and not isinstance(held, bool) and held >= ours):
            reason = "bundle_sequence"
            self.identity.raise_sequence(held + 1)
            self.events.warning("bundle-sequence", "cluster %s: the federation holds bundle "
                                "sequence %d, ours is %d; publishing ours as sequence %d", name,
                                held, ours, held + 1)
        else:
            reason = {401: "unauthenticated", 403: "forbidden"}.get(
                e.status or 0, f"{call}_{'invalid' if e.status == 400 else e.status}")
            if self.refusal is None or self.refusal["reason"] != reason:
                log.warning("federation refuses cluster %s's %s (%s, retrying): %s", name,
                            _CALLS[call], e.status, e)
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        since = self.refusal["since"] if self.refusal and self.refusal["reason"] == reason else None
        self.refusal = {"call": call, "reason": reason, "status": e.status, "error": str(e),
                        "since": since or self.clock()}
        self.last_error = f"{call}: {e}"
        self.connected = False
        return True

    def not_ready(self) -> str | None:
        """Why this gateway must not be ready, or None: the federation refuses us and we hold no
        lease (so no cluster routes to us). A federation that does not answer is no reason."""
        r = self.refusal
        if r is None or self.lease is not None:
            return None
        return (f"the federation refuses our {_CALLS[r['call']]} ({r['reason']}, "
                f"HTTP {r['status']}): {r['error']}")

    def import_records(self) -> list[ImportRecord]:
        name = self.cfg.cluster.name
        return [
            ImportRecord(name, im.namespace, im.name, im.failover)
            for im in self.cfg.imports
        ]

    def set_exports_withdrawn(self, withdrawn: bool) -> None:
        """Drain (True) or restore (False) our exports at the federation; publish_loop acts."""
        if withdrawn == self.exports_withdrawn:
            return
        self.exports_withdrawn = withdrawn
        if not withdrawn:
            self.withdrawn.clear()
        self.publish_wanted.set()

    async def publish_all(self) -> None:
        """Bring the federation's view of our exports and imports to what we want now."""
        for export in self.export_state():
            if self.exports_withdrawn:
                if export.key not in self.withdrawn:
                    await self.client.delete_export(export.cluster, export.namespace, export.name)
                    self.withdrawn.add(export.key)
                    self.published.pop(export.key, None)
                continue
            body = json.dumps(export.to_json(), sort_keys=True).encode()
            if self.published.get(export.key) != body:
                await self.client.put_export(export)
                self.published[export.key] = body
        if not self.imports_unsupported:
            await self._publish_imports()
        await self._withdraw_removed()

    async def _withdraw_removed(self) -> None:
        """Delete what we published that the config no longer has (a reload removed it)."""
        wanted = {e.key for e in self.export_state()} | {r.key for r in self.import_records()}
        name = self.cfg.cluster.name
        for key in [k for k in self.published if k not in wanted]:
            for prefix, delete in ((EXPORTS, self.client.delete_export),
                                   (IMPORTS, self.client.delete_import)):
                if key.startswith(prefix):  # <prefix><cluster>/<namespace>/<name>
                    _, ns, svc = key.removeprefix(prefix).split("/", 2)
                    await delete(name, ns, svc)
            del self.published[key]
        self.withdrawn &= wanted

    async def _publish_imports(self) -> None:
        for rec in self.import_records():
            body = json.dumps(rec.to_json(), sort_keys=True).encode()
            if self.published.get(rec.key) == body:
                continue
            try:
                await self.client.put_import(rec)
            except FederationError as e:
                if e.status in (404, 405):
                    self.imports_unsupported = True
                    log.warning("federation does not take import records (%s); drill plans "
                                "will not see our failover policies (retried after the next "
                                "lease grant)", e)
                    return
                raise
            self.published[rec.key] = body

    async def publish_loop(self) -> None:
        """Republish exports whose health changed (woken by `publish_wanted`)."""
        backoff = Backoff()
        while True:
            await self.publish_wanted.wait()
            self.publish_wanted.clear()
            if self.lease is None:
                continue  # lease_loop publishes everything once it has a lease
            try:
                await self.publish_all()
                backoff.reset()
            except FederationError as e:
                self._failed("publish", e)
                self.publish_wanted.set()
                await asyncio.sleep(backoff.next())

    async def watch_loop(self) -> None:
        backoff = Backoff()
        synced = False
        while True:
            try:
                if not synced:
                    self._set_catalog(await self.client.catalog())
                    synced = True
                revision, events = await self.client.watch(self.catalog.revision, 25.0)
                cat = self.catalog.apply_all(
                    ((ev.key, ev.value, ev.revision) for ev in events),
                    on_error=lambda e: log.warning("ignoring malformed catalog record: %s", e),
                )
                if revision > cat.revision:
                    cat = replace(cat, revision=revision)  # keeps imports and drills too
                if events or revision != self.catalog.revision:
                    self._set_catalog(cat)
                self.catalog_at = self.clock()  # the federation answered: current as of now
                self.connected = True
                backoff.reset()
            except (CompactedError, FutureRevisionError):
                synced = False
            except FederationError as e:
                self._failed("watch", e)
                await asyncio.sleep(backoff.next())

    def _set_catalog(self, cat: Catalog) -> None:
        old, self.catalog = self.catalog, cat
        self.catalog_at = now = self.clock()
        for name, rec in cat.clusters.items():  # for isthmus_gateway_bundle_age_seconds
            if name not in self.bundle_changed_at or \
                    old.bundles.get(rec.trust_domain) != cat.bundles.get(rec.trust_domain):
                self.bundle_changed_at[name] = now
        for name in [n for n in self.bundle_changed_at if n not in cat.clusters]:
            del self.bundle_changed_at[name]
        if self.log_peers and old.revision:  # not for the first catalog: everyone would be "new"
            me = self.cfg.cluster.name
            for c in sorted(old.live - cat.live - {me}):
                self.events.info(f"live:{c}", "cluster %s: lease expired at the federation; its "
                                 "exports no longer count for routing", c)
            for c in sorted(cat.live - old.live - {me}):
                self.events.info(f"live:{c}", "cluster %s: live at the federation (lease granted)",
                                 c)
        self.on_catalog(cat)
        self._persist_wanted.set()

    async def persist_loop(self) -> None:
        """Write catalog.json at most every 200 ms (coalescing bursts of changes)."""
        while True:
            await self._persist_wanted.wait()
            self._persist_wanted.clear()
            data = json.dumps(self.catalog.to_json()).encode()
            await asyncio.to_thread(write_atomic, self.catalog_path, data)
            await asyncio.sleep(0.2)

    async def rotation_loop(self) -> None:
        """Reissue the SVID at half life and follow a CA rotation plan (`Identity.refresh`,
        every second); open connections keep their SVIDs."""
        while True:
            now = self.clock()
            svid, bundle = self.identity.svid, self.identity.bundle
            try:
                self.identity.refresh(now)
            except (IsthmusError, OSError) as e:  # e.g. the new CA's files cannot be written
                self.events.error("identity", "CA rotation: %s (retrying)", e)
            if self.identity.svid is svid and svid.rotation_due(now):
                self.identity.issue(now)
            if self.identity.svid is not svid or self.identity.bundle != bundle:
                self.on_svid(self.identity.svid)  # the TLS snapshot: our SVID and own bundle
            if self.identity.svid is not svid and self.client is not None:
                self.client.set_svid(self.identity.svid)
            if self.identity.bundle != bundle:
                self.bundle_wanted.set()
            left = self.identity.svid.rotate_at - self.clock()
            await asyncio.sleep(min(PLAN_POLL, max(0.05, left)))

    def _failed(self, what: str, e: Exception) -> None:
        msg = f"{what}: {e}"
        if msg != self.last_error:
            log.warning("federation %s", msg)
        self.last_error = msg
        self.connected = False

    def status(self) -> dict[str, Any]:
        return {
            "federation": self.client.url if self.client is not None else self.cfg.federation.url,
            "federation_replicas": list(self.cfg.federation.replicas),
            "federation_moves": self.client.moves if self.client is not None else 0,
            "connected": self.connected,
            "last_error": self.last_error,
            "lease": self.lease,
            "exports_withdrawn": self.exports_withdrawn,
            "catalog_revision": self.catalog.revision,
            "svid": {
                "id": str(self.identity.svid.spiffe_id),
                "serial": f"{self.identity.svid.serial:x}",
                "not_after": self.identity.svid.not_after,
                "rotate_at": self.identity.svid.rotate_at,
            },
            "bundle_sequence": self.identity.bundle.sequence,
            "registered": self.lease is not None,
            "refusal": self.refusal,
            "refusals": dict(self.refusals),
            "identity": self.identity.status(),
        }


class Backoff:
    """Capped exponential backoff: 0.2 s, 0.4 s ... 5 s."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self.value = first, cap, first

    def next(self) -> float:
        v = self.value
        self.value = min(self.cap, self.value * 2)
        return v

    def reset(self) -> None:
        self.value = self.first
