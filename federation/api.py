"""Wire schemas of the federation HTTP API: the one place that describes every route.

The server registers its aiohttp routes from `ROUTES` (method, path, operation id), and
`openapi_document()` renders the same list as an OpenAPI 3.1 document, which the service
serves at `GET /v1/openapi.json`. A test checks that the app's routes and the document agree.

Conventions
-----------
- Bodies are JSON, at most `MAX_BODY` bytes (larger: 413). Errors are `{"error": "..."}`; the
  message names the field or the peer at fault.
- `auth` of a route: "token" (single-use join token in the body, no client certificate needed;
  OpenAPI has no security scheme for a body field, so the route declares none and its
  `JoinRequest.token` says so),
  "svid" (a client certificate that verifies as `spiffe://<td>/ns/isthmus-system/sa/gateway`
  against the bundle of a joined cluster's trust domain; writes only to the caller's own
  cluster), "operator" (the federation-issued operator SVID
  `spiffe://<federation-td>/ns/isthmus-system/sa/operator`), "any" (a cluster SVID or the
  operator SVID), or "none" (health, metrics, this document).
- Path and query parameters are declared with the schema the server enforces (`PARAMS`): names
  are DNS labels, `lease` and `after` are integers in ASCII digits (`units.parse_int`), `id` a
  drill id; anything else is 400 (or 403/404 for a name that is not the caller's).
- Watch events carry `value` as parsed JSON (null for deletes); `event_to_json` and
  `event_from_json` convert to and from the store's `Event` (whose value is raw JSON bytes, so
  `Catalog.apply` can fold it).

This module is pure: it imports no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from federation import metrics
from federation.drill_model import DRILL_ID_PATTERN
from federation.drills import MAX_PROBE_RATE, MAX_REASON
from federation.errors import InputError
from federation.fields import NAME_PATTERN
from federation.identity import MAX_BUNDLE_KEYS
from federation.jwk import MAX_CERT_BYTES
from federation.store.base import Event
from federation.units import HOSTPORT_PATTERN

API_VERSION = "1.0.0"
MAX_BODY = 1 << 20  # 1 MiB
MAX_WATCH_TIMEOUT = 60.0
DEFAULT_WATCH_TIMEOUT = 25.0
MAX_ID = 2**63 - 1  # lease ids and revisions (SQLite and etcd integers are int64)
MAX_SECOND = 999_999_999_999  # drill sample seconds: epoch seconds, at most 12 digits
METRICS_CONTENT_TYPE = metrics.CONTENT_TYPE  # Prometheus text format


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp and OpenAPI share the {param} syntax
    operation_id: str
    summary: str
    auth: str  # "token" | "svid" | "none"
    request: str | None = None  # component schema name of the JSON body
    response: str | None = None  # component schema name of the 200 body
    errors: tuple[int, ...] = ()
    query: tuple[str, ...] = ()  # query parameters (optional; schemas in PARAMS)
    content_type: str = "application/json"
    tags: tuple[str, ...] = field(default=("federation",))
    status: int = 200  # the success status (201 for creations)
    request_required: bool = True


_W = (400, 401, 403, 413)  # errors every authenticated write can answer

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/join", "join",
          "Join the federation with a single-use join token; returns the federation's bundle.",
          "token", "JoinRequest", "JoinResponse", (400, 401, 403, 409, 413)),
    Route("PUT", "/v1/clusters/{name}", "putCluster",
          "Publish the cluster's record again (gateway address, region, zone); its trust "
          "domain is fixed (409: changing it is a re-join with a --replace token).",
          "svid", "ClusterRecord", "Revision", _W + (409,)),
    Route("DELETE", "/v1/clusters/{name}", "removeCluster",
          "Remove a cluster (operator only): its record, bundle, liveness, exports, imports and "
          "tokens are deleted and its trust domain is trusted no more; 404 if unknown.",
          "operator", None, "Removed", (401, 403, 404)),
    Route("PUT", "/v1/clusters/{name}/bundle", "putBundle",
          "Replace the cluster's trust bundle. A changed bundle must carry a higher "
          "spiffe_sequence than the one held (409 with held_sequence otherwise); the same "
          "bundle again is not a new revision.",
          "svid", "Jwks", "Revision", _W + (409,)),
    Route("POST", "/v1/clusters/{name}/lease", "grantLease",
          "Grant a liveness lease; marks the cluster live until it expires.",
          "svid", None, "Lease", _W),
    Route("PUT", "/v1/clusters/{name}/lease/{lease}", "keepAlive",
          "Renew a lease; 404 when it is unknown or expired (grant a new one and republish).",
          "svid", None, "Lease", _W + (404,)),
    Route("PUT", "/v1/clusters/{name}/exports/{namespace}/{service}", "putExport",
          "Publish an export, attached to the cluster's current lease (409 if it has none).",
          "svid", "Export", "Revision", _W + (409,)),
    Route("DELETE", "/v1/clusters/{name}/exports/{namespace}/{service}", "deleteExport",
          "Withdraw an export.", "svid", None, "Deleted", _W),
    Route("PUT", "/v1/clusters/{name}/imports/{namespace}/{service}", "putImport",
          "Publish an import's failover policy (for drill plans), attached to the cluster's "
          "current lease (409 if it has none).",
          "svid", "ImportRecord", "Revision", _W + (409,)),
    Route("DELETE", "/v1/clusters/{name}/imports/{namespace}/{service}", "deleteImport",
          "Withdraw an import.", "svid", None, "Deleted", _W),
    Route("PUT", "/v1/clusters/{name}/report", "putReport",
          "Report the cluster's traffic counters, active tiers and latest events "
          "(federation/traffic.py); kept in memory for the dashboard, not in the store.",
          "svid", "TrafficReport", "Accepted", _W),
    Route("GET", "/v1/catalog", "getCatalog",
          "Snapshot of the catalog with the revision it was read at.",
          "any", None, "Catalog", (401,)),
    Route("GET", "/v1/watch", "watch",
          "Long-poll catalog changes after a revision (410 when that history is compacted).",
          "any", None, "WatchResponse", (400, 401, 410),
          query=("after", "timeout")),
    Route("POST", "/v1/drills", "createDrill",
          "Start a drill (operator only). 400 for an unknown scope (the message lists the known "
          "ones) or a bad mode/duration/abort_on; 409 while another drill runs or observes.",
          "operator", "DrillRequest", "Drill", (400, 401, 403, 409, 413), status=201,
          tags=("drills",)),
    Route("GET", "/v1/drills", "listDrills", "Every drill, newest first.",
          "any", None, "DrillList", (401,), tags=("drills",)),
    Route("GET", "/v1/drills/{id}", "getDrill",
          "One drill and its samples (sorted by second, then cluster).",
          "any", None, "DrillDetail", (401, 404), tags=("drills",)),
    Route("GET", "/v1/drills/{id}/report", "drillReport",
          "The drill's report (federation.drill_report.compute_report over its samples).",
          "any", None, "DrillReport", (401, 404), tags=("drills",)),
    Route("POST", "/v1/drills/{id}/abort", "abortDrill",
          "Abort a running drill (operator only); 409 if it already ended.",
          "operator", "AbortRequest", "Drill", (400, 401, 403, 404, 409), tags=("drills",),
          request_required=False),
    Route("PUT", "/v1/drills/{id}/samples/{cluster}/{second}", "putSample",
          "Store one per-second probe sample of an observing cluster (that cluster only); "
          "409 for a second outside [created_at-1, fault_stop+settle+5]. abort_on is "
          "evaluated on every write.",
          "svid", "Sample", "Revision", (400, 401, 403, 404, 409, 413), tags=("drills",)),
    Route("GET", "/v1/openapi.json", "openapi", "This document.", "none", None, "OpenApi"),
    Route("GET", "/healthz", "healthz", "The process is up.", "none", None, "Text",
          content_type="text/plain", tags=("admin",)),
    Route("GET", "/readyz", "readyz", "The store is open and the TLS listener is bound.",
          "none", None, "Text", (503,), content_type="text/plain", tags=("admin",)),
    Route("GET", "/metrics", "metrics", "Prometheus text exposition.", "none", None, "Text",
          content_type=METRICS_CONTENT_TYPE, tags=("admin",)),
    Route("GET", "/status", "status",
          "Clusters, liveness and services. On the TLS port it needs a cluster or operator "
          "SVID; the plain-HTTP admin listener (loopback) serves it without one.",
          "any", None, "Status", (401,), tags=("admin",)),
)

ADMIN_PATHS = ("/healthz", "/readyz", "/metrics", "/status")

_NAME = {"type": "string", "pattern": f"^{NAME_PATTERN}$"}
_STR = {"type": "string"}
_SERVICE = {"type": "string", "pattern": f"^{NAME_PATTERN}/{NAME_PATTERN}$",
            "description": "NAMESPACE/NAME"}
_HOSTPORT = {"type": "string", "pattern": f"^{HOSTPORT_PATTERN}$"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}


# The schema of every path and query parameter, exactly what the handlers accept (ECMA-262 `\s`
# is wider than Python's ASCII one, hence the spelled-out class in the duration).
_SPACE = "[ \\t\\n\\r\\f\\v]*"
_DURATION = {"type": "string",
             "pattern": f"^{_SPACE}[0-9]+([.][0-9]+)?{_SPACE}(ms|s|m|h){_SPACE}$"}
PARAMS: dict[str, dict[str, Any]] = {
    "name": {**_NAME, "description": "a cluster name (the caller's own for writes)"},
    "cluster": {**_NAME, "description": "a cluster name (the caller's own)"},
    "namespace": _NAME,
    "service": _NAME,
    "lease": {"type": "integer", "minimum": 1, "maximum": MAX_ID,
              "description": "a lease id from grantLease"},
    "id": {"type": "string", "pattern": f"^{DRILL_ID_PATTERN}$", "description": "a drill id"},
    "second": {"type": "integer", "minimum": 0, "maximum": MAX_SECOND,
               "description": "epoch second of the sample"},
    "after": {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0,
              "description": "resume after this revision; at most the current revision "
              "(a future revision is 400)"},
    "timeout": {**_DURATION,
                "description": f"long-poll time like 25s (default {DEFAULT_WATCH_TIMEOUT:g}s, "
                f"at most {MAX_WATCH_TIMEOUT:g}s: longer is shortened)"},
}


def path_params(path: str) -> list[str]:
    return [p.strip("{}") for p in path.split("/") if p.startswith("{")]


_X509_KEY = {
    "type": "object",
    "properties": {
        "use": {"const": "x509-svid"},
        "kty": {"enum": ["EC", "RSA"]},
        "x5c": {"type": "array", "minItems": 1, "maxItems": 1,
                "items": {"type": "string", "contentEncoding": "base64"}},
    },
    "required": ["use", "kty", "x5c"],
}
_JWT_KEY = {"type": "object", "properties": {"use": {"const": "jwt-svid"}}, "required": ["use"]}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = False) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": props}
    out["required"] = list(props) if required is None else required
    if not extra:
        out["additionalProperties"] = False
    return out


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj({"error": _STR}, extra=True),
    "Accepted": _obj({"accepted": {"type": "boolean"}}),
    "TrafficReport": _obj({
        "admin": {"type": ["string", "null"], "maxLength": 300},
        "flows": {"type": "array", "maxItems": 2000, "items": _obj({
            "destination": {"type": "string", "pattern": f"^(none|{NAME_PATTERN})$"},
            "service": _SERVICE,
            "tier": {"type": "string", "maxLength": 300},
            "result": {"type": "string", "enum": ["served", "response_timeout", "failed"]},
            "count": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
            "unit": {"type": "string", "enum": ["connections", "requests"],
                     "description": "connections (the default: TCP imports) or requests (HTTP)"},
        }, required=["destination", "service", "tier", "result", "count"])},
        "tiers": {"type": "array", "maxItems": 500, "items": _obj({
            "service": _SERVICE, "active": {"type": ["string", "null"], "maxLength": 300},
            "panic": {"type": "boolean"}})},
        "events": {"type": "array", "maxItems": 32, "items": _obj({
            "at": {"type": "number"}, "kind": {"type": "string", "maxLength": 300},
            "text": {"type": "string", "maxLength": 300}}, extra=True)},
    }, required=["flows", "tiers", "events"]),
    "Compacted": _obj({"error": _STR, "compacted": _INT}),
    "Text": {"type": "string"},
    "OpenApi": {"type": "object"},
    "Endpoint": _obj({
        "address": {**_HOSTPORT, "description": "host:port ([v6]:port)"},
        "healthy": {"type": "boolean"},
        "weight": {"type": "integer", "minimum": 1, "maximum": 1000},
    }),
    "Export": _obj({
        "cluster": _NAME, "namespace": _NAME, "name": _NAME,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "protocol": {"type": "string", "enum": ["tcp", "http"]},
        "endpoints": {"type": "array", "items": _ref("Endpoint"), "maxItems": 1000},
        "allowed_consumers": {"type": ["array", "null"], "items": _NAME},
    }, required=["cluster", "namespace", "name", "port", "protocol", "endpoints"]),
    "ClusterRecord": _obj({
        "name": _NAME, "region": _NAME, "zone": _NAME,
        "trust_domain": {"type": "string", "pattern": "^[a-z0-9._-]{1,255}$"},
        "gateway_address": {**_HOSTPORT, "description": "host:port of the mTLS listener"},
        "tunnel": _obj({
            "public_key": {"type": "string", "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
                           "description": "WireGuard public key (base64 of 32 bytes)"},
            "endpoint": {**_HOSTPORT, "description": "host:port of its WireGuard UDP socket"},
            "overlay_address": {"type": "string", "maxLength": 64,
                                "description": "assigned by the federation from its "
                                "--overlay-cidr (what a gateway sends is replaced)"},
            "next_public_key": {"type": "string",
                                "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
                                "description": "the key a rotation will switch to"},
        }, required=["public_key", "endpoint"]),
    }, required=["name", "region", "zone", "trust_domain", "gateway_address"]),
    "Jwks": {
        "type": "object",
        "description": "SPIFFE trust bundle (JWKS): at least one x509-svid key whose x5c is the "
        "base64 DER of a CA certificate of the cluster's trust domain (which no schema can "
        "check: a bad certificate is 400); jwt-svid keys are kept out of the X.509 trust",
        "properties": {
            "keys": {"type": "array", "maxItems": MAX_BUNDLE_KEYS,
                     "items": {"oneOf": [_X509_KEY, _JWT_KEY]},
                     "contains": _X509_KEY},
            "spiffe_sequence": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
            "spiffe_refresh_hint": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        },
        "required": ["keys", "spiffe_sequence"],
    },
    "JoinRequest": _obj({
        "token": {"type": "string", "minLength": 1,
                  "description": "the single-use join token (`isthmus federation token create`); "
                  "a new cluster needs nothing else; an existing one also needs a proof (or "
                  "a token made with --replace)"},
        "cluster": _ref("ClusterRecord"), "bundle": _ref("Jwks"),
        "proof": _obj({
            "svid": {"type": "string", "maxLength": 2 * MAX_CERT_BYTES,
                     "description": "PEM: the cluster's current gateway SVID"},
            "signature": {"type": "string", "maxLength": 2048, "pattern": "^[A-Za-z0-9_=-]*$",
                          "description": "base64url signature, by the SVID's key, of the "
                          "re-join message (federation/proof.py)"},
        }),
    }, required=["token", "cluster", "bundle"]),
    "JoinResponse": _obj({
        "federation_trust_domain": _STR, "federation_bundle": _ref("Jwks"), "lease_ttl": _NUM,
    }),
    "Lease": _obj({"lease": _INT, "ttl": _NUM}),
    "Revision": _obj({"revision": _INT}),
    "Deleted": _obj({"deleted": {"type": "boolean"}, "revision": _INT}),
    "Removed": _obj({"removed": _NAME, "trust_domain": _STR, "deleted_keys": _INT,
                     "revoked_tokens": _INT, "revision": _INT}),
    "Catalog": _obj({
        "revision": _INT,
        "clusters": {"type": "object", "additionalProperties": _ref("ClusterRecord")},
        "bundles": {"type": "object", "additionalProperties": _ref("Jwks")},
        "live": {"type": "array", "items": _NAME},
        "exports": {"type": "array", "items": _ref("Export")},
        "imports": {"type": "array", "items": _ref("ImportRecord")},
        "drills": {"type": "array", "items": _ref("Drill")},
    }, required=["revision", "clusters", "bundles", "live", "exports"]),
    "ImportRecord": _obj({
        "cluster": _NAME, "namespace": _NAME, "name": _NAME,
        "failover": _obj({
            "tiers": {"type": "array", "minItems": 1, "maxItems": 4, "uniqueItems": True,
                      "items": {"enum": ["cluster", "zone", "region", "any"]}},
            "region_preference": {"type": "array", "items": _NAME, "maxItems": 64},
            "failback_after": {"type": "number", "minimum": 0, "maximum": 3600},
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 16},
        }),
    }),
    "Scope": {"type": "object", "minProperties": 1, "maxProperties": 1,
              "properties": {"region": _NAME, "cluster": _NAME}, "additionalProperties": False},
    "DrillRequest": {
        **_obj({
            "scope": _ref("Scope"),
            "mode": {"type": "string", "enum": ["drain", "blackhole", "degrade"]},
            "duration": {**_DURATION, "description": "1s..1h, e.g. 30s"},
            "latency": {**_nullable(_DURATION), "description": "degrade: 0s..60s, e.g. 200ms"},
            "error_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "probe_rate": {"type": ["number", "null"], "exclusiveMinimum": 0,
                           "maximum": MAX_PROBE_RATE, "description": "probes/s (default 20)"},
            "baseline": {**_nullable(_DURATION), "description": "0s..60s, default 2s"},
            "settle": {**_nullable(_DURATION), "description": "0s..10m, default 5s"},
            "abort_on": {"type": ["string", "null"], "maxLength": 200,
                         "description": "e.g. success<99%:5s or p99>500:3s"},
        }, required=["scope", "mode", "duration"]),
        "description": "The scope must name a region or cluster of the catalog (else 400, "
        "listing the known ones); mode degrade needs latency or error_rate, which apply to "
        "degrade only.",
        "if": {"properties": {"mode": {"const": "degrade"}}},
        "then": {"anyOf": [{"required": ["latency"], "properties": {"latency": _DURATION}},
                           {"required": ["error_rate"],
                            "properties": {"error_rate": {"type": "number"}}}]},
        "else": {"properties": {"latency": {"type": "null"}, "error_rate": {"type": "null"}}},
    },
    "Drill": _obj({
        "id": {"type": "string", "pattern": "^d-[0-9]{8}-[0-9]{6}-[a-z0-9]{4}$"},
        "scope": _ref("Scope"),
        "mode": {"type": "string", "enum": ["drain", "blackhole", "degrade"]},
        "created_at": _NUM, "fault_start": _NUM, "fault_end": _NUM,
        "clusters_in_scope": {"type": "array", "items": _NAME},
        "regions": {"type": "object", "additionalProperties": _NAME},
        "services": {"type": "array", "items": _STR},
        "latency": _NUM, "error_rate": _NUM, "probe_rate": _NUM, "settle": _NUM,
        "abort_on": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": ["running", "ended", "aborted"]},
        "ended_at": {"type": ["number", "null"]},
        "end_reason": {"type": ["string", "null"]},
    }),
    "DrillList": _obj({"drills": {"type": "array", "items": _ref("Drill")}}),
    "ServiceSample": _obj({
        "attempts": _INT, "successes": _INT, "failures": _INT,
        "latency_p50_ms": {"type": ["number", "null"]},
        "latency_p99_ms": {"type": ["number", "null"]},
        "served": {"type": "object", "additionalProperties": _INT, "maxProperties": 1000},
    }, required=["attempts", "successes", "failures"]),
    "Sample": _obj({
        "cluster": _NAME, "second": _INT,
        "services": {"type": "object", "additionalProperties": _ref("ServiceSample"),
                     "maxProperties": 1000},
    }),
    "DrillDetail": _obj({
        "drill": _ref("Drill"), "samples": {"type": "array", "items": _ref("Sample")},
    }),
    "DrillReport": {
        "type": "object",
        "description": "see docs/drills.md and federation/drill_report.py: detection_s, shift_s, "
        "failed_during_shift, p99_ms_worst, p99_ms_median, failback_s (relative to "
        "fault_stop), flapped, totals, by_mode, state, end_reason, scope, timeline",
        "properties": {
            "detection_s": {"type": ["number", "null"]},
            "shift_s": {"type": ["number", "null"]},
            "failed_during_shift": _INT,
            "failback_s": {"type": ["number", "null"]},
            "flapped": {"type": "boolean"},
            "timeline": {"type": "array", "items": {"type": "object"}},
        },
    },
    "AbortRequest": _obj({"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON,
                                     "pattern": "\\S", "description": "why (not blank)"}},
                         required=[]),
    "WatchEvent": _obj({
        "type": {"type": "string", "enum": ["put", "delete"]},
        "key": _STR,
        "value": {"description": "the JSON value put; null for deletes"},
        "revision": _INT,
    }),
    "WatchResponse": _obj({
        "revision": {"type": "integer", "description": "latest revision seen; resume after it"},
        "events": {"type": "array", "items": _ref("WatchEvent")},
    }),
    "Status": _obj({
        "revision": _INT,
        "trust_domain": _STR,
        "clusters": {"type": "object", "additionalProperties": _obj({
            "region": _STR, "zone": _STR, "trust_domain": _STR, "gateway_address": _STR,
            "bundle_sequence": {"type": ["integer", "null"]}, "bundle_authorities": _INT,
            "live": {"type": "boolean"},
            "lease_age_seconds": {"type": ["number", "null"]},
            "admin": {"type": ["string", "null"],
                      "description": "admin address the gateway reported (dashboard report)"},
            "report_age_seconds": {"type": ["number", "null"]},
            "tunnel": {"type": ["object", "null"], "properties": {
                "public_key": _STR, "endpoint": _STR, "overlay_address": _STR,
                "rotating": {"type": "boolean"}}},
        })},
        "services": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "array", "items": _ref("Endpoint")},
        }},
        "store": {"type": "object", "description": "kind (sqlite | etcd), its path or members, "
                  "and on etcd the replicas serving from it"},
    }),
}


def _operation(r: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary, "tags": list(r.tags)}
    params = [{"name": p, "in": "path", "required": True, "schema": PARAMS[p]}
              for p in path_params(r.path)]
    params += [{"name": n, "in": "query", "required": False, "schema": PARAMS[n]}
               for n in r.query]
    if params:
        op["parameters"] = params
    if r.request:
        op["requestBody"] = {
            "required": r.request_required,
            "content": {"application/json": {"schema": _ref(r.request)}},
        }
    responses: dict[str, Any] = {
        str(r.status): {"description": "Created" if r.status == 201 else "OK",
                        "content": {r.content_type: {"schema": _ref(r.response)}}}
        if r.response else {"description": "OK"},
    }
    for code in r.errors:
        schema = "Compacted" if code == 410 else "Error"
        responses[str(code)] = {
            "description": _REASONS.get(code, "error"),
            "content": {"application/json": {"schema": _ref(schema)}},
        }
    op["responses"] = responses
    if r.auth == "svid":
        op["security"] = [{"svid": []}]
    elif r.auth == "operator":
        op["security"] = [{"operator": []}]
    elif r.auth == "any":
        op["security"] = [{"svid": []}, {"operator": []}]
    else:  # "none", and "token": the join token travels in the body (JoinRequest.token)
        op["security"] = []
    return op


_REASONS = {
    400: "malformed request (the message names the field)",
    401: "no or unverifiable client certificate, or bad join token",
    403: "the caller may not do this (another cluster's records, or operator-only)",
    404: "unknown or expired",
    409: "conflict (sequence, trust domain, no live lease, overlapping or ended drill, "
         "sample outside the drill's window)",
    410: "watch history compacted: fetch a new snapshot",
    413: "body larger than 1 MiB",
    503: "not ready",
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Isthmus federation API",
            "version": API_VERSION,
            "description": "Gateways exchange catalogs and SPIFFE trust bundles. Every write "
            "is authorized by the caller's SVID (a cluster writes only its own records) or, "
            "for the first join, by a single-use expiring token.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "svid": {"type": "mutualTLS",
                         "description": "X.509 SVID spiffe://<td>/ns/isthmus-system/sa/gateway"},
                "operator": {"type": "mutualTLS",
                             "description": "X.509 SVID spiffe://<federation-td>/ns/"
                             "isthmus-system/sa/operator, issued by the federation CA"},
            },
        },
    }


# ---- pure wire conversions -------------------------------------------------------------------


def event_to_json(ev: Event) -> dict[str, Any]:
    value = None
    if ev.value is not None:
        try:
            value = json.loads(ev.value)
        except (ValueError, UnicodeDecodeError):
            value = None
    return {"type": ev.type, "key": ev.key, "value": value, "revision": ev.revision}


def event_from_json(obj: Any, what: str = "event") -> Event:
    if not isinstance(obj, dict):
        raise InputError(f"{what}: expected an object")
    typ = obj.get("type")
    key = obj.get("key")
    rev = obj.get("revision")
    if typ not in ("put", "delete"):
        raise InputError(f"{what}.type: {typ!r} is not put or delete")
    if not isinstance(key, str):
        raise InputError(f"{what}.key: expected a string")
    if not isinstance(rev, int) or isinstance(rev, bool):
        raise InputError(f"{what}.revision: expected an integer")
    value = None if typ == "delete" else json.dumps(obj.get("value")).encode()
    return Event(typ, key, value, rev)


def canonical_json(obj: Any) -> bytes:
    """The bytes stored for a value: stable, so identical writes can be skipped."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
