"""The federation's own credentials: its CA, its server SVID and rotation, the operator's
credentials, and the TLS context built from them and the joined clusters' bundles.

* Identity. The federation has its own trust domain (default `federation.isthmus.local`) and a
  CA kept in `--state-dir` (`ca.pem`, `ca-key.pem`); gateways trust only that CA for the
  federation (it issues nothing but the federation's own server SVID). The server SVID is
  issued at every start and reissued at half life by a background task, then swapped into the
  live SSL context (`reload_server_context`), so open connections are not dropped.
* Operator identity. At every start the server makes sure `<state-dir>/operator/` holds an
  operator SVID `spiffe://<federation-td>/ns/isthmus-system/sa/operator` (valid 30 days,
  `svid.pem` + `svid-key.pem`, key 0600) issued by the federation CA, reissued when missing,
  unreadable, past half life or not issued by the current CA, plus a copy of `ca.pem`: that
  directory is all the CLI needs (`client.operator_client`).
* Trust. The server context trusts the federation CA and every joined cluster's bundle, and is
  REBUILT from the current bundles on every change (a join, a bundle update, a removal, an SVID
  rotation; `reload_trust`): OpenSSL cannot forget a CA in place, and a context that only grows
  would go on completing handshakes for a CA retired or a cluster removed. The one exception
  is a first join (`add_trust`): a new trust domain retires nothing, so its CAs are added in
  place (a rebuild loads every cluster's CA, ~0.5 s with 1,000 clusters). New handshakes get
  the new context (`on_context`: the TLS site's setter); open connections keep theirs, and
  every request is authorized against the current bundles anyway (auth.py).
* Join tokens are tokens.py's; expired ones are swept here every minute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from federation.ca import CertificateAuthority
from federation.errors import IdentityError, StoreError
from federation.identity import (
    SYSTEM_NAMESPACE,
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    federation_id,
    verify_svid,
)
from federation.server.state import State, log
from federation.server.tokens import list_tokens
from federation.tls import reload_server_context, server_context

FEDERATION_TRUST_DOMAIN = "federation.isthmus.local"
TOKEN_SWEEP_INTERVAL = 60.0
SVID_CHECK_INTERVAL = 1.0
OPERATOR_DIR = "operator"
OPERATOR_SVID_TTL = 30 * 86400.0


def operator_id(td: str | TrustDomain) -> SpiffeId:
    """spiffe://<federation-td>/ns/isthmus-system/sa/operator"""
    return SpiffeId(td if isinstance(td, TrustDomain) else TrustDomain(td),
                    f"/ns/{SYSTEM_NAMESPACE}/sa/operator")


class Credentials:
    """The federation CA, the server SVID (rotated at half life), the operator SVID, and the
    live server SSL context with the trust of every joined cluster."""

    def __init__(self, state: State, state_dir: Path, host: str) -> None:
        self.state = state
        self.state_dir = state_dir
        self.host = host  # the TLS listener's host: the server SVID's SANs
        self.ca: CertificateAuthority | None = None
        self.svid: Svid | None = None
        self.operator_svid: Svid | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.on_context: Callable[[ssl.SSLContext], None] | None = None  # the TLS site's setter

    def load(self, now: float) -> None:
        """The CA (made at the first start), a fresh server SVID, the operator's directory."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(
            self.state_dir, TrustDomain(self.state.trust_domain), now
        )
        self.svid = self.issue_svid(now)
        self.operator_svid = self.ensure_operator_credentials(now)

    def make_context(self) -> ssl.SSLContext:
        """The TLS listener's context: asks for, does not require, a client certificate."""
        assert self.svid is not None
        self.ssl_context = server_context(self.svid, self.trust(), require_client_cert=False)
        return self.ssl_context

    def federation_bundle(self) -> TrustBundle:
        assert self.ca is not None
        return self.ca.bundle(0)

    def trust(self) -> list[TrustBundle]:
        return [self.federation_bundle(), *self.state.bundles.values()]

    def verify_bundles(self) -> dict[str, TrustBundle]:
        """Bundles `verify_peer` checks callers against: clusters' and the federation's own."""
        return {**self.state.bundles, self.state.trust_domain: self.federation_bundle()}

    def add_trust(self, bundle: TrustBundle) -> None:
        """A trust domain not trusted before (a first join): its CAs are added to the live
        context in place (O(1); nothing is retired, so nothing needs forgetting), instead of a
        rebuild loading every cluster's CA."""
        if self.ssl_context is not None:
            reload_server_context(self.ssl_context, trust=[bundle])

    def reload_trust(self) -> None:
        """A new context from the current SVID and bundles, for every new handshake."""
        if self.ssl_context is None:
            return
        self.make_context()
        if self.on_context is not None:
            self.on_context(self.ssl_context)

    def issue_svid(self, now: float) -> Svid:
        assert self.ca is not None
        host = self.host
        ips: list[str] = []
        dns: list[str] = ["localhost"]
        try:
            addr = ipaddress.ip_address(host)
            if addr.is_unspecified:
                ips += ["127.0.0.1", "::1"]
                dns.append(socket.gethostname())
            else:
                ips.append(host)
        except ValueError:
            if host and host != "localhost":
                dns.append(host)
        return self.ca.issue(
            federation_id(self.state.trust_domain),
            now,
            dns_names=tuple(dns),
            ip_addresses=tuple(ips),
        )

    def ensure_operator_credentials(self, now: float) -> Svid:
        """`<state-dir>/operator/`: svid.pem + svid-key.pem (0600) + ca.pem; reissued when
        missing, unreadable, another ID, past half life or not from the current CA."""
        assert self.ca is not None
        directory = self.state_dir / OPERATOR_DIR
        want = operator_id(self.state.trust_domain)
        svid: Svid | None = None
        try:
            svid = Svid.load(directory)
        except IdentityError as e:
            log.warning("operator SVID in %s unreadable (%s): issuing a new one", directory, e)
        reason = None
        if svid is None:
            reason = "none yet"
        elif svid.spiffe_id != want:
            reason = f"it names {svid.spiffe_id}"
        elif svid.rotation_due(now):
            reason = "past half life"
        else:
            try:
                verify_svid(svid.cert_der(), self.ca.bundle(0), now)
            except IdentityError:
                reason = "not issued by the current federation CA"
        if reason is not None:
            svid = self.ca.issue(want, now, ttl=OPERATOR_SVID_TTL)
            svid.write(directory)
            log.info("operator SVID %s issued into %s (%s)", want, directory, reason)
        assert svid is not None
        ca_copy = directory / CertificateAuthority.CERT_FILE
        if not ca_copy.exists() or ca_copy.read_bytes() != self.ca.cert_pem:
            tmp = directory / f".{ca_copy.name}.{secrets.token_hex(6)}.tmp"
            tmp.write_bytes(self.ca.cert_pem)
            os.replace(tmp, ca_copy)
        return svid

    # ---- background tasks ----------------------------------------------------------------

    async def svid_rotator(self) -> None:
        while True:
            await asyncio.sleep(SVID_CHECK_INTERVAL)
            now = self.state.clock()
            if self.svid is not None and self.svid.rotation_due(now):
                try:
                    svid, old = self.issue_svid(now), self.svid
                    self.svid = svid
                    try:
                        self.reload_trust()
                    except Exception:
                        self.svid = old
                        raise
                    log.info("federation SVID rotated (serial %s)", svid.serial)
                except Exception:  # keep serving with the old one; try again next tick
                    log.exception("federation SVID rotation failed")

    async def token_sweeper(self) -> None:
        store = self.state.store
        while True:
            await asyncio.sleep(TOKEN_SWEEP_INTERVAL)
            try:
                now = self.state.clock()
                for t in await list_tokens(store):
                    if t.expired(now):
                        await store.delete(t.key)
            except StoreError as e:
                log.warning("token sweep: %s", e)
