"""Who is calling, and may they: identify the caller by its SVID, authorize, refuse.

* Authentication. The TLS listener asks for, but does not require, a client certificate, so a
  new cluster can `POST /v1/join` with only a join token. Every other `/v1` route (and
  `/status` on the TLS port) needs a client SVID: either one that verifies against the bundle
  of a joined cluster's trust domain and is that trust domain's gateway ID (a *cluster*), or
  the operator ID verified against the federation's own bundle (the *operator*; any other ID
  of the federation's trust domain is 403). `caller` returns ("cluster", name) or
  ("operator", id). (OpenSSL cannot forget a CA in place: after a bundle drops an authority
  the handshake may still pass on a connection opened before the change, but `verify_peer` checks
  against the current bundles only, so the request is refused with 401; new connections get a
  context rebuilt from the current bundles, which refuses such a certificate with a TLS alert,
  logged and counted: credentials.py.) No cluster may join with the federation's own trust domain.
* Authorization. A cluster writes only its own records (`/v1/clusters/{name}/...` with
  name == caller) and its own drill samples; anything else is 403 naming both, logged and
  counted. The operator reads the catalog, the watch and drills, creates and aborts drills and
  removes clusters; it writes no cluster record (403). Those three are operator-only.
* Refusals. 401/403s are logged through one `LogLimiter` (the counter carries the volume),
  quoting what came off the wire (`logs.quote`).
"""

from __future__ import annotations

from aiohttp import web

from federation.errors import ApiError, IdentityError
from federation.identity import SpiffeId, gateway_id
from federation.logs import quote
from federation.server.credentials import Credentials, operator_id
from federation.server.state import State
from federation.tls import peer_cert_der, verify_peer


class Auth:
    """Identifies callers against the live bundles; every refusal is counted and logged."""

    def __init__(self, state: State, credentials: Credentials) -> None:
        self.state = state
        self.credentials = credentials

    def identify(self, request: web.Request) -> tuple[str, str, SpiffeId]:
        """("cluster", name, id) for a joined cluster's gateway SVID, ("operator", id, id) for
        the federation-issued operator SVID; ApiError 401/403 otherwise."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = peer_cert_der(ssl_object) if ssl_object is not None else None
        if der is None:
            raise ApiError(
                401, "client certificate required (this route needs a cluster or operator SVID)"
            )
        try:
            sid = verify_peer(der, self.credentials.verify_bundles(), self.state.clock())
        except IdentityError as e:
            self.refused("unauthenticated", "refused client certificate from %s: %s",
                         quote(request.remote), quote(e))
            raise ApiError(401, f"client certificate refused: {e}") from None
        td = str(sid.trust_domain)
        if td == self.state.trust_domain:
            if sid == operator_id(td):
                return "operator", str(sid), sid
            self.refused("forbidden", "refused %s: an ID of the federation's trust domain, "
                         "not the operator", quote(sid))
            raise ApiError(403, f"peer {sid} is not the operator (expected {operator_id(td)})")
        cluster = self.state.cluster_by_td.get(td)
        if cluster is None:
            self.state.denied += 1
            raise ApiError(401, f"peer {sid}: trust domain {td!r} belongs to no joined cluster")
        if str(sid) != str(gateway_id(sid.trust_domain)):
            self.refused("forbidden", "refused %s: not the gateway ID of cluster %s",
                         quote(sid), quote(cluster))
            raise ApiError(
                403, f"peer {sid} is not the gateway of cluster {cluster!r} "
                f"(expected {gateway_id(sid.trust_domain)})"
            )
        return "cluster", cluster, sid

    def refused(self, key: str, msg: str, *args: object) -> None:
        """Count a request refused for the caller's identity; log it (one line per class,
        rate-limited: the counter carries the volume). Quote what came off the wire."""
        self.state.denied += 1
        self.state.limited.warning(key, msg, *args)

    def caller(self, request: web.Request) -> tuple[str, str]:
        """("cluster", name) or ("operator", id): who may read."""
        kind, name, _ = self.identify(request)
        return kind, name

    def cluster(self, request: web.Request, action: str) -> tuple[str, SpiffeId]:
        """The calling cluster; 403 for the operator (it writes no cluster record)."""
        kind, name, sid = self.identify(request)
        if kind != "cluster":
            self.refused("forbidden", "denied: operator %s tried %s %s",
                         quote(name), request.method, quote(request.path))
            raise ApiError(403, f"the operator ({name}) may not {action}: clusters only")
        return name, sid

    def operator(self, request: web.Request, action: str) -> str:
        kind, name, _ = self.identify(request)
        if kind != "operator":
            self.refused("forbidden", "denied: cluster %s tried %s %s (operator only)",
                         quote(name), request.method, quote(request.path))
            raise ApiError(
                403,
                f"cluster {name!r} may not {action}: operator only "
                f"({operator_id(self.state.trust_domain)})",
            )
        return name

    def owner(self, request: web.Request) -> str:
        """Authenticate, and require the caller to be the cluster named in the path."""
        caller, sid = self.cluster(request, "write cluster records")
        target = request.match_info["name"]
        if caller != target:
            self.refused(
                "forbidden", "denied: cluster %s (%s) tried %s %s, a record of cluster %s",
                quote(caller), quote(sid), request.method, quote(request.path), quote(target),
            )
            raise ApiError(
                403,
                f"cluster {caller!r} may not write records of cluster {target!r}",
                caller=caller,
                target=target,
            )
        return caller

    def sample_writer(self, request: web.Request) -> str:
        """The calling cluster, which must be the one named in the samples' path."""
        caller, _ = self.cluster(request, "write drill samples")
        target = request.match_info["cluster"]
        if caller != target:
            self.refused("forbidden", "denied: cluster %s tried to write samples of cluster %s",
                         quote(caller), quote(target))
            raise ApiError(
                403, f"cluster {caller!r} may not write samples of cluster {target!r}",
                caller=caller, target=target,
            )
        return caller
