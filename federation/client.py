"""The async client of the federation API, used by gateways and the CLI.

The client trusts only the federation's bundle (its CA, usually the `ca.pem` the federation
wrote into its state directory). The federation CA issues nothing but the federation's own
certificate, so the chain check against that bundle alone identifies the server (hostname
checks are off: the URL may use any address of the federation).

Every non-2xx answer raises `FederationError(message, status)` with the server's JSON error
message; an unreachable server raises `FederationError` naming the URL (status None). A watch
whose history was compacted raises `CompactedError`, and one after a revision the federation's
store has not reached (it was reset, or restored from an older backup) `FutureRevisionError`:
either way, fetch `catalog()` and watch after its revision.

`set_svid()` swaps the client certificate after a rotation: new requests open connections with
the new SVID; the old session is closed once its in-flight requests (e.g. a long-poll) finish.

Operators (the CLI) use `operator_client(url, credentials_dir)`: the directory the federation
writes at `<state-dir>/operator/` (svid.pem, svid-key.pem, ca.pem). Drill methods:
`create_drill`, `list_drills`, `get_drill`, `drill_report`, `abort_drill` (operator; reads are
open to clusters too) and `put_sample` (an observing cluster, its own samples only).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from federation import api
from federation.drill_model import Drill
from federation.errors import (
    CompactedError,
    FederationError,
    FutureRevisionError,
    IdentityError,
    InputError,
)
from federation.identity import Svid, TrustBundle
from federation.model import Catalog, ClusterRecord, Export, ImportRecord
from federation.proof import message, sign_proof
from federation.store.base import Event
from federation.tls import client_context
from federation.units import format_duration

DEFAULT_FEDERATION_TRUST_DOMAIN = "federation.isthmus.local"


def load_federation_bundle(
    ca_file: Path, trust_domain: str = DEFAULT_FEDERATION_TRUST_DOMAIN
) -> TrustBundle:
    """Wrap the federation's PEM CA file (one or more certificates) as a bundle, sequence 0."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(ca_file).read_bytes()
    except OSError as e:
        raise IdentityError(f"federation CA file {ca_file}: {e.strerror or e}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise IdentityError(f"federation CA file {ca_file}: not a PEM certificate ({e})") from None
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
    return TrustBundle(trust_domain, ders, 0)


class _Session:
    """A ClientSession plus the count of requests running on it (for graceful retirement)."""

    def __init__(self, ctx: ssl.SSLContext):
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=32),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.inflight = 0
        self.retired = False


class FederationClient:
    """Calls to the federation. With several URLs (replicas serving one etcd store), a call that
    cannot reach the current one fails as before and moves the client to the next one, so the
    caller's retry goes there; a watch resumes there at the same revision (the replicas share
    etcd's revisions)."""

    def __init__(
        self,
        url: str | Sequence[str],
        federation_bundle: TrustBundle,
        svid: Svid | None = None,
        timeout: float = 10.0,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("FederationClient: no URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.url = self.urls[0]
        self.moves = 0  # times a replica could not be reached and the next one was taken
        self.federation_bundle = federation_bundle
        self.svid = svid
        self.timeout = timeout
        self._session: _Session | None = None
        self._retired: list[_Session] = []
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------

    def _current(self) -> _Session:
        if self._closed:
            raise FederationError(f"federation client for {self.url} is closed")
        if self._session is None:
            self._session = _Session(client_context(self.svid, self.federation_bundle))
        return self._session

    def set_svid(self, svid: Svid | None) -> None:
        """Use `svid` for new connections; the old session closes when it goes idle."""
        self.svid = svid
        if self._session is not None:
            self._session.retired = True
            self._retired.append(self._session)
            self._session = None

    async def _sweep(self) -> None:
        idle = [s for s in self._retired if s.inflight == 0]
        self._retired = [s for s in self._retired if s.inflight > 0]
        for s in idle:
            await s.http.close()

    async def close(self) -> None:
        self._closed = True
        sessions = [*self._retired, *([self._session] if self._session else [])]
        self._session = None
        self._retired = []
        for s in sessions:
            await s.http.close()

    async def __aenter__(self) -> FederationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- transport -----------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        answered: tuple[int, ...] = (410,),
    ) -> tuple[int, Any]:
        """(status, parsed JSON) of a 2xx answer or of a status in `answered`; FederationError
        otherwise."""
        if self._retired:
            await self._sweep()
        session = self._current()
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else None
        session.inflight += 1
        try:
            async with session.http.request(
                method,
                url,
                data=data,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:  # (a subclass of OSError: catch it first)
            failed = self.url
            self._next_replica(None)  # a long poll also has a bound the server answers within
            raise FederationError(
                f"federation at {failed}: {method} {path}: no answer within "
                f"{format_duration(timeout or self.timeout)}"
            ) from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as e:
            failed = self.url
            self._next_replica(e)
            raise FederationError(
                f"federation at {failed}: {method} {path}: {_describe(e)}"
            ) from None
        finally:
            session.inflight -= 1
            if session.retired and session.inflight == 0 and session in self._retired:
                self._retired.remove(session)
                await session.http.close()
        try:
            parsed = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if 200 <= status < 300 or status in answered:
            if parsed is None and raw:
                raise FederationError(
                    f"federation at {self.url}: {method} {path}: answer is not JSON", status
                )
            return status, parsed
        message = parsed.get("error") if isinstance(parsed, dict) else None
        if not isinstance(message, str):
            message = raw[:200].decode("utf-8", "replace") or f"HTTP {status}"
        raise FederationError(message, status, parsed if isinstance(parsed, dict) else None)

    def _next_replica(self, error: BaseException | None) -> None:
        """The current URL did not answer: use the next one from now on (connection errors
        only; an HTTP answer, even 5xx, came from a replica that is up)."""
        if len(self.urls) < 2 or isinstance(error, aiohttp.ClientResponseError):
            return
        i = self.urls.index(self.url) if self.url in self.urls else -1
        self.url = self.urls[(i + 1) % len(self.urls)]
        self.moves += 1

    async def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, parsed = await self._request(method, path, body)
        if status == 410:
            raise FederationError(str(parsed.get("error", "gone")), 410)
        return parsed

    # ---- API -----------------------------------------------------------------------------

    async def join(self, token: str, record: ClusterRecord, bundle: TrustBundle,
                   prove_with: Svid | None = None) -> dict:
        """Join with a single-use token. Returns {federation_trust_domain, federation_bundle
        (JWKS), lease_ttl}. `prove_with`: the cluster's current SVID, signing a proof of
        possession, which a re-join of an existing cluster needs (federation/proof.py)."""
        jwks = bundle.to_jwks()
        body: dict[str, Any] = {"token": token, "cluster": record.to_json(), "bundle": jwks}
        if prove_with is not None:
            body["proof"] = sign_proof(prove_with,
                                       message(token, record.name, api.canonical_json(jwks)))
        return await self._ok("POST", "/v1/join", body)

    async def put_record(self, record: ClusterRecord) -> int:
        """Publish our cluster record again (gateway address, region, zone)."""
        return (await self._ok("PUT", f"/v1/clusters/{record.name}", record.to_json()))[
            "revision"]

    async def remove_cluster(self, name: str) -> dict:
        """Remove a cluster (operator). 404 if unknown: FederationError."""
        return await self._ok("DELETE", f"/v1/clusters/{name}")

    async def put_bundle(self, name: str, bundle: TrustBundle) -> int:
        return (await self._ok("PUT", f"/v1/clusters/{name}/bundle", bundle.to_jwks()))["revision"]

    async def grant_lease(self, name: str) -> tuple[int, float]:
        out = await self._ok("POST", f"/v1/clusters/{name}/lease")
        return int(out["lease"]), float(out["ttl"])

    async def keepalive(self, name: str, lease_id: int) -> bool:
        """True if renewed; False if the lease is unknown or expired (grant a new one)."""
        try:
            await self._ok("PUT", f"/v1/clusters/{name}/lease/{lease_id}")
        except FederationError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def put_export(self, export: Export) -> int:
        path = f"/v1/clusters/{export.cluster}/exports/{export.namespace}/{export.name}"
        return (await self._ok("PUT", path, export.to_json()))["revision"]

    async def delete_export(self, cluster: str, namespace: str, name: str) -> bool:
        path = f"/v1/clusters/{cluster}/exports/{namespace}/{name}"
        return bool((await self._ok("DELETE", path))["deleted"])

    async def put_import(self, rec: ImportRecord) -> int:
        """Publish an import's failover policy (attached to the cluster's lease)."""
        path = f"/v1/clusters/{rec.cluster}/imports/{rec.namespace}/{rec.name}"
        return (await self._ok("PUT", path, rec.to_json()))["revision"]

    async def delete_import(self, cluster: str, ns: str, name: str) -> bool:
        path = f"/v1/clusters/{cluster}/imports/{ns}/{name}"
        return bool((await self._ok("DELETE", path))["deleted"])

    async def put_report(self, cluster: str, report: dict) -> None:
        """The cluster's traffic report for the dashboard (federation/traffic.py)."""
        await self._ok("PUT", f"/v1/clusters/{cluster}/report", report)

    # ---- drills --------------------------------------------------------------------------

    def _drill(self, obj: Any, what: str) -> Drill:
        try:
            return Drill.from_json(obj, what)
        except InputError as e:
            raise FederationError(f"federation at {self.url}: malformed {what}: {e}") from None

    async def create_drill(self, spec: dict) -> Drill:
        """POST /v1/drills (operator). 400 bad spec, 409 overlapping drill: FederationError."""
        return self._drill(await self._ok("POST", "/v1/drills", spec), "drill")

    async def list_drills(self) -> list[Drill]:
        """Every drill, newest first."""
        obj = await self._ok("GET", "/v1/drills")
        raw = obj.get("drills") if isinstance(obj, dict) else None
        if not isinstance(raw, list):
            raise FederationError(f"federation at {self.url}: malformed drill list")
        return [self._drill(d, f"drills[{i}]") for i, d in enumerate(raw)]

    async def get_drill(self, drill_id: str) -> tuple[Drill, list[dict]]:
        """The drill and its samples (sorted by second, then cluster). 404: FederationError."""
        obj = await self._ok("GET", f"/v1/drills/{drill_id}")
        if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list):
            raise FederationError(f"federation at {self.url}: malformed drill answer")
        return self._drill(obj.get("drill"), "drill"), obj["samples"]

    async def drill_report(self, drill_id: str) -> dict:
        """federation.drill_report.compute_report of the drill, computed by the federation."""
        obj = await self._ok("GET", f"/v1/drills/{drill_id}/report")
        if not isinstance(obj, dict):
            raise FederationError(f"federation at {self.url}: malformed drill report")
        return obj

    async def abort_drill(self, drill_id: str, reason: str = "aborted by operator") -> Drill:
        """Abort a running drill (operator). 409 if it already ended: FederationError."""
        obj = await self._ok("POST", f"/v1/drills/{drill_id}/abort", {"reason": reason})
        return self._drill(obj, "drill")

    async def put_sample(self, drill_id: str, cluster: str, second: int, sample: dict) -> int:
        """Store one per-second sample of `cluster` (the caller). Returns the store revision."""
        path = f"/v1/drills/{drill_id}/samples/{cluster}/{int(second)}"
        return (await self._ok("PUT", path, sample))["revision"]

    async def catalog(self) -> Catalog:
        obj = await self._ok("GET", "/v1/catalog")
        try:
            return Catalog.from_json(obj)
        except InputError as e:
            raise FederationError(f"federation at {self.url}: malformed catalog: {e}") from None

    async def watch(self, after: int, timeout: float = 25.0) -> tuple[int, list[Event]]:
        """Long-poll events after `after`. Returns (revision to resume after, events)."""
        timeout = min(timeout, api.MAX_WATCH_TIMEOUT)
        status, obj = await self._request(
            "GET",
            "/v1/watch",
            params={"after": str(after), "timeout": f"{max(timeout, 0.0):.3f}s"},
            timeout=timeout + self.timeout,
            answered=(400, 410),
        )
        if status == 400:
            current = obj.get("revision") if isinstance(obj, dict) else None
            if isinstance(current, int) and not isinstance(current, bool):
                raise FutureRevisionError(after, current)
            message = obj.get("error") if isinstance(obj, dict) else None
            raise FederationError(str(message or "HTTP 400"), 400)
        if status == 410:
            compacted = obj.get("compacted") if isinstance(obj, dict) else None
            raise CompactedError(after, compacted if isinstance(compacted, int) else after + 1)
        try:
            revision = obj["revision"]
            raw_events = obj["events"]
            if not isinstance(revision, int) or not isinstance(raw_events, list):
                raise TypeError
            events = [api.event_from_json(e, f"events[{i}]") for i, e in enumerate(raw_events)]
        except (KeyError, TypeError, InputError) as e:
            raise FederationError(
                f"federation at {self.url}: malformed watch answer: {e}"
            ) from None
        return revision, events

    async def status(self) -> dict:
        return await self._ok("GET", "/status")

    async def refuses_our_certificate(self) -> bool:
        """After a request with our SVID got no answer: does the federation answer without a
        client certificate? Then it is up and its TLS layer refused our SVID (a CA it does not
        trust: TLS 1.3 reports that as a closed connection, not as an HTTP status)."""
        if self.svid is None:
            return False
        async with FederationClient(self.url, self.federation_bundle, None,
                                    timeout=min(self.timeout, 5.0)) as anonymous:
            try:
                await anonymous.openapi()
            except FederationError:
                return False
        return True

    async def openapi(self) -> dict:
        return await self._ok("GET", "/v1/openapi.json")


def operator_client(url: str, credentials_dir: Path, timeout: float = 10.0) -> FederationClient:
    """A client authenticated as the operator, from a credentials directory holding svid.pem,
    svid-key.pem and ca.pem (what `isthmus federation serve` writes to <state-dir>/operator/).
    FederationError names a missing or unreadable file."""
    d = Path(credentials_dir).expanduser()
    for name in (Svid.CERT_FILE, Svid.KEY_FILE, "ca.pem"):
        if not (d / name).is_file():
            raise FederationError(
                f"operator credentials: {d / name} is missing (the federation writes them to "
                "<state-dir>/operator/; pass --credentials DIR or set ISTHMUS_CREDENTIALS)"
            )
    try:
        svid = Svid.load(d)
        assert svid is not None
        bundle = load_federation_bundle(d / "ca.pem", svid.spiffe_id.trust_domain.name)
    except (IdentityError, OSError) as e:
        raise FederationError(f"operator credentials in {d}: {e}") from None
    return FederationClient(url, bundle, svid, timeout=timeout)


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text
