"""The gateway's agent: joins the federation, publishes exports with live health, renews its
lease, follows the catalog, rotates its SVID, and keeps what it learnt on disk.

Theory of operation
-------------------
- Identity is local: the cluster's CA lives in the state dir (or is the user's), and the agent
  issues its own SVID from it, rotating at half life (`Identity`).
- First start: join with the single-use token (token_file or ISTHMUS_JOIN_TOKEN); the answer's
  federation bundle is saved in `joined.json`. Later starts skip the join. What cannot get
  better by retrying is a PermanentError and stops the gateway: a missing or unreadable
  `federation.ca_file` or no token at all (ConfigError), a join the federation refuses with a
  4xx other than 408/429 (JoinRefused: token unknown, used, expired, for another cluster).
  Unreachable, timeouts, 408/429 and 5xx are retried by the caller (runtime) with backoff.
- Lease: publish our cluster record (inbound address, region, zone: they may have changed since
  the join) and bundle, grant, publish every export, then keep alive every ttl/3. A keepalive
  refused (the lease expired while we were away) means our exports were withdrawn: grant a new
  lease and publish them all again. Another cluster's lease expiring shows in the catalog (it
  leaves `live`, its exports stop counting): logged at INFO, as is its return (`log_peers`; the
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

from federation.ca import CertificateAuthority
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
from federation.identity import Svid, TrustBundle, gateway_id
from federation.logs import LogLimiter
from federation.model import Catalog, ClusterRecord, Export, ImportRecord
from gateway.config.schema import GatewayConfig
from gateway.errors import ConfigError, GatewayError, Problem

log = logging.getLogger("isthmus.gateway.agent")

RETRIED_4XX = (408, 425, 429)  # a 4xx a join may get past by waiting (timeout, too early, busy)


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


class Identity:
    """The cluster CA, our current SVID and our bundle (sequence persisted in the state dir)."""

    def __init__(self, cfg: GatewayConfig, now: float, persist: bool = True) -> None:
        self.cfg = cfg
        self.persist = persist  # False in extra workers: their SVIDs live in memory only
        self.dir = cfg.state_dir / "identity"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ic = cfg.identity
        if (not persist and ic.ca_cert_file is None
                and not (self.dir / CertificateAuthority.CERT_FILE).exists()):
            raise GatewayError(f"{self.dir}: no cluster CA to issue from (a worker never creates "
                               "one; its primary does, before it starts the workers)")
        self.ca = CertificateAuthority.load_or_create(
            self.dir, cfg.cluster.trust_domain, now, ic.ca_cert_file, ic.ca_key_file
        )
        self.bundle = self._bundle()
        svid = Svid.load(self.dir)
        if svid is None or svid.rotation_due(now) or not self._issued_by_ca(svid, now):
            svid = self.issue(now)
        self.svid = svid

    def _bundle(self) -> TrustBundle:
        """Sequence goes up whenever the CA certificate changes."""
        meta_path = self.dir / "bundle.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        fingerprint = self.ca.cert_der.hex()[-64:]
        seq = int(meta.get("sequence", 0))
        if meta.get("ca") != fingerprint:
            seq += 1
            if self.persist:  # a worker only reads what its primary keeps
                write_atomic(meta_path, json.dumps({"sequence": seq, "ca": fingerprint}).encode())
        return self.ca.bundle(seq)

    def _issued_by_ca(self, svid: Svid, now: float) -> bool:
        from federation.identity import verify_svid

        try:
            verify_svid(svid.cert_der(), self.bundle, now)
            return True
        except IsthmusError:
            return False

    def issue(self, now: float) -> Svid:
        svid = self.ca.issue(gateway_id(self.cfg.cluster.trust_domain), now,
                             self.cfg.identity.svid_ttl)
        if self.persist:
            svid.write(self.dir)
        self.svid = svid
        log.info("issued SVID %s serial %x, valid until %.0f", svid.spiffe_id, svid.serial,
                 svid.not_after)
        return svid


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
        self.client: FederationClient | None = None
        self.lease: int | None = None
        self.lease_ttl = 6.0
        self.published: dict[str, bytes] = {}  # store key -> body last PUT (exports and imports)
        self.withdrawn: set[str] = set()  # export keys deleted while exports_withdrawn
        self.exports_withdrawn = False  # a drain drill holds this cluster
        self.imports_unsupported = False  # the federation answered 404/405 to put_import
        self.publish_wanted = asyncio.Event()
        self.connected = False
        self.last_error: str | None = None
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
        return ClusterRecord(c.name, c.region, c.zone, c.trust_domain, self.cfg.listen.advertise)

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
        url, name = self.cfg.federation.url, self.cfg.cluster.name
        client = FederationClient(url, fed_bundle, None)
        try:
            # signed with our current SVID: if the cluster exists already (we lost joined.json
            # but kept our CA), that proves we are it; a new cluster's join ignores it
            reply = await client.join(token, self._record(), self.identity.bundle,
                                      prove_with=self.identity.svid)
        except FederationError as e:
            if not join_refused_for_good(e.status):
                raise
            hint = ("; create a new one with `isthmus federation token create --cluster "
                    f"{name}`") if e.status in (401, 403) else ""
            raise JoinRefused(f"federation at {url} refused to join {name} ({e.status}): {e}{hint}",
                              e.status) from None
        finally:
            await client.close()
        write_atomic(self.joined_path, json.dumps(reply).encode())
        log.info("joined the federation at %s as %s", self.cfg.federation.url,
                 self.cfg.cluster.name)
        self._make_client(fed_bundle)

    def _make_client(self, fed_bundle: TrustBundle) -> None:
        self.client = FederationClient(self.cfg.federation.url, fed_bundle, self.identity.svid)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    # -- loops (each owned by the runtime's task group) --------------------------------------
    async def lease_loop(self) -> None:
        backoff = Backoff()
        name = self.cfg.cluster.name
        while True:
            try:
                if self.lease is None:
                    # our record first: a gateway back with another inbound address (or
                    # region, zone) is found there, not at the one it joined with
                    await self.client.put_record(self._record())
                    await self.client.put_bundle(name, self.identity.bundle)
                    self.lease, self.lease_ttl = await self.client.grant_lease(name)
                    self.published.clear()
                    self.withdrawn.clear()
                    self.imports_unsupported = False
                    await self.publish_all()
                    log.info("lease %s granted (ttl %.1fs); exports published", self.lease,
                             self.lease_ttl)
                elif not await self.client.keepalive(name, self.lease):
                    self.events.warning("own-lease", "cluster %s: lease %s expired at the "
                                        "federation (our exports were withdrawn); re-registering",
                                        name, self.lease)
                    self.lease = None
                    continue
                self.connected = True
                self.last_error = None
                backoff.reset()
                await asyncio.sleep(self.lease_ttl / 3)
            except FederationError as e:
                self._failed("lease", e)
                if e.status == 409:  # e.g. "no live lease" racing an expiry: start over
                    self.lease = None
                await asyncio.sleep(min(backoff.next(), self.lease_ttl / 3))

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
                self.connected = True
                backoff.reset()
            except (CompactedError, FutureRevisionError):
                synced = False
            except FederationError as e:
                self._failed("watch", e)
                await asyncio.sleep(backoff.next())

    def _set_catalog(self, cat: Catalog) -> None:
        old, self.catalog = self.catalog, cat
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
        """Reissue the SVID at half life; open connections keep theirs."""
        while True:
            delay = max(1.0, self.identity.svid.rotate_at - self.clock())
            await asyncio.sleep(delay)
            svid = self.identity.issue(self.clock())
            self.on_svid(svid)
            if self.client is not None:
                self.client.set_svid(svid)

    def _failed(self, what: str, e: Exception) -> None:
        msg = f"{what}: {e}"
        if msg != self.last_error:
            log.warning("federation %s", msg)
        self.last_error = msg
        self.connected = False

    def status(self) -> dict[str, Any]:
        return {
            "federation": self.cfg.federation.url,
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
