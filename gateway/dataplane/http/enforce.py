"""Route policies on the HTTP data plane: what session.py does for timeouts, retries, JWT and
OpenAPI once core/policies.py has merged the policies of a request's chain.

Theory of operation
-------------------
Per config version the runtime builds a `PolicyBook` (the PolicyIndex of core/policies.py, the
JWT verifiers and OpenAPI validators of its policies) and hands each HTTP import listener a
table `(route name, rule name) -> Enforcement` (`PolicyBook.table`), or None when no policy is
on the import's chain at all: then a request pays nothing (one `is None` test). An
`Enforcement` is one EffectivePolicy made ready for the hot path (its verifier, validator, the
timeouts in seconds, the retry policy or None).

The session calls, in the order of an exchange (session.py `_begin` and the upstream events):

  admit           request timer started; JWT (401 / 503 with WWW-Authenticate, claim headers
                  put in place of any the client sent); OpenAPI: the body is held until
                  complete (413 beyond max_body_bytes, before parsing) and checked (400 / 404 /
                  405 / 415 problem+json; `drop` mode: the body without the unknown fields and
                  its new Content-Length). Then the request counts in its retry budget.
  body_complete   the held body is whole: check it, and go on (session.proceed) or answer
  sent            a try began: its per-try timer
  failed          a try failed (connect failure, reset before the response head, per-try
                  timeout, a retryable status seen in the framed response head): core/retry.py
                  `decide` says whether to try again and after how long; a retry goes to
                  another endpoint when there is one (`Avoiding`), after `loop.call_later`.
                  Only a request whose body is complete and still held is sent again.
  request timer   no response head yet: 504; else the client connection is aborted.
  idle            after an exchange with a policy, the connection is closed when no new
                  request begins within the policy's `timeouts.idle` (session.py `done`).

Counters (host.http): retries by (route, reason), requests refused by a policy by
(route, policy, status), the retry budgets' windows (host.budgets).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from federation.logs import LogLimiter, quote
from gateway.config.values import GatewayConfig, ImportConfig
from gateway.core.policies import GATEWAY, IMPORT, Attachment, EffectivePolicy, PolicyIndex
from gateway.core.retry import CONNECT_FAILURE, RESET, STATUS, TIMEOUT, Outcome, decide
from gateway.dataplane.http.auth.jwks import JwksError
from gateway.dataplane.http.auth.jwt import JwtVerifier
from gateway.dataplane.http.auth.openapi import OpenApiError, OpenApiValidator
from gateway.dataplane.http.head import CONTINUE
from gateway.errors import ConfigError, Problem

log = logging.getLogger("isthmus.gateway.http")
limited = LogLimiter(log)

PROBLEM_JSON = (b"content-type", b"application/problem+json")
__all__ = ["CONNECT_FAILURE", "RESET", "STATUS", "TIMEOUT", "Avoiding", "Enforcement",
           "PolicyBook", "PolicyLoadError", "admit", "body_complete", "failed", "policy_book",
           "sent"]


class PolicyLoadError(Exception):
    """A policy's JWKS file or OpenAPI spec cannot be used: the config is refused."""


@dataclass(frozen=True, slots=True)
class Enforcement:
    """One EffectivePolicy, ready for the hot path."""

    policy: EffectivePolicy
    jwt: JwtVerifier | None
    openapi: OpenApiValidator | None
    request_timeout: float | None
    try_timeout: float | None
    retry: Any  # RetryPolicy, or None: retries off
    framed: bool  # retries on response statuses: such a head is held (framed relay)
    hold: frozenset[bytes] | None  # those statuses as the status line spells them (upstream.py)
    jwt_name: str
    openapi_name: str

    @classmethod
    def of(cls, p: EffectivePolicy, jwt: JwtVerifier | None, openapi: OpenApiValidator | None
           ) -> Enforcement:
        retry = p.retry if p.retry.attempts > 0 else None
        hold: frozenset[bytes] | None = None
        if retry is not None:
            codes = set(retry.codes) | (set(range(500, 600)) if "5xx" in retry.retry_on
                                        else set())
            hold = frozenset(str(c).encode() for c in codes) or None
        request, try_ = p.timeouts.request, p.try_timeout
        if try_ is not None and request is not None and try_ >= request:
            try_ = None  # the request timer ends the try first: no second timer per request
        return cls(p, jwt, openapi, request, try_, retry, hold is not None, hold,
                   p.source("jwt") or "", p.source("openapi") or "")


class PolicyBook:
    """The policies of one config version, with their verifiers and validators (reused from
    the previous book when their settings did not change, so keys and caches survive)."""

    def __init__(self, policies: Iterable[Any], gateway: str,
                 previous: PolicyBook | None = None) -> None:
        self.policies = tuple(policies)
        self.gateway = gateway
        self.index = PolicyIndex(self.policies)
        old_v = previous.verifiers if previous is not None else {}
        old_o = previous.validators if previous is not None else {}
        self.verifiers: dict[Any, JwtVerifier] = {}
        self.validators: dict[Any, OpenApiValidator] = {}
        for p in self.policies:
            for spec in (p.defaults, p.overrides):
                if spec.jwt is not None and spec.jwt not in self.verifiers:
                    self.verifiers[spec.jwt] = old_v.get(spec.jwt) or _verifier(p.name, spec.jwt)
                if spec.openapi is not None and spec.openapi not in self.validators:
                    self.validators[spec.openapi] = (old_o.get(spec.openapi)
                                                     or _validator(p.name, spec.openapi))

    def touches(self, im: ImportConfig) -> bool:
        """Some policy is on this import's chain (the gateway, the import, one of its routes)."""
        for p in self.policies:
            t = p.target
            if t.kind == GATEWAY:
                if t.name == self.gateway:
                    return True
            elif t.namespace == im.namespace and (
                    t.name == im.name if t.kind == IMPORT else t.import_ == im.name):
                return True
        return False

    def attachments(self, im: ImportConfig) -> list[tuple[tuple[str, str | None], Attachment]]:
        """(route name, rule name) -> chain, for the default ("" : no route matched) and every
        rule of every route of `im`."""
        imp = (im.namespace, im.name)
        out = [(("", None), Attachment(self.gateway, imp))]
        for route in im.routes:
            for rule in route.rules:
                out.append(((route.name, rule.name),
                            Attachment(self.gateway, imp, route.name, rule.name)))
        return out

    def table(self, im: ImportConfig) -> dict[tuple[str, str | None], Enforcement] | None:
        if not self.touches(im):
            return None
        made: dict[EffectivePolicy, Enforcement] = {}
        out: dict[tuple[str, str | None], Enforcement] = {}
        for key, at in self.attachments(im):
            p = self.index.effective(at)
            enf = made.get(p)
            if enf is None:
                enf = made[p] = Enforcement.of(
                    p, self.verifiers.get(p.jwt) if p.jwt else None,
                    self.validators.get(p.openapi) if p.openapi else None)
            out[key] = enf
        return out

    def describe(self, im: ImportConfig) -> list[dict[str, Any]]:
        """For /status: each route (and named rule) of `im` with its effective policy."""
        return [{"route": route or None, "rule": rule,
                 "policy": policy_json(self.index.effective(at))}
                for (route, rule), at in self.attachments(im)]


def policy_book(cfg: GatewayConfig, previous: PolicyBook | None = None) -> PolicyBook:
    """The policies of `cfg` made ready; a JWKS file or OpenAPI spec that cannot be used is a
    ConfigError naming the policy (at start, on a reload, and in `isthmus config validate`)."""
    try:
        return PolicyBook(cfg.policies, cfg.cluster.name, previous)
    except PolicyLoadError as e:
        raise ConfigError([Problem(str(cfg.source), None, "policies", str(e))]) from None


def policy_json(p: EffectivePolicy) -> dict[str, Any]:
    t, r = p.timeouts, p.retry
    return {
        "timeouts": {"request": t.request, "backendRequest": t.backend_request, "idle": t.idle},
        "retry": {"attempts": r.attempts, "per_try_timeout": r.per_try_timeout,
                  "backoff_base": r.backoff_base, "backoff_cap": r.backoff_cap,
                  "retry_on": sorted(r.retry_on), "codes": sorted(r.codes),
                  "methods": sorted(r.methods),
                  "budget": {"percent": round(r.budget_ratio * 100, 3),
                             "min_per_second": r.budget_min_per_second,
                             "window": r.budget_window}},
        "jwt": None if p.jwt is None else {"issuer": p.jwt.issuer,
                                           "audiences": list(p.jwt.audiences)},
        "openapi": None if p.openapi is None else {"spec": str(p.openapi.spec_file),
                                                   "unknown_fields": p.openapi.unknown_fields},
        "sources": dict(p.sources),
    }


def _verifier(name: str, settings: Any) -> JwtVerifier:
    try:
        return JwtVerifier(settings, time.time)
    except (JwksError, ValueError) as e:
        raise PolicyLoadError(f"policy {name!r}: jwt: {e}") from None


def _validator(name: str, settings: Any) -> OpenApiValidator:
    try:
        return OpenApiValidator.from_file(settings.spec_file, settings)
    except OpenApiError as e:
        raise PolicyLoadError(f"policy {name!r}: openapi: {e}") from None


# -- the exchange ------------------------------------------------------------------------------

def admit(s: Any, ex: Any, enf: Enforcement) -> bool:
    """Start `ex` under its policy: True to connect now; False when answered here or waiting
    for the body (body_complete goes on)."""
    host = s.host
    if enf.request_timeout is not None:
        left = enf.request_timeout - (host.loop.time() - ex.started)
        ex.timer = host.loop.call_later(max(left, 0.0), _request_timeout, s, ex)
    if enf.jwt is not None and not _jwt(s, ex, enf):
        return False
    if enf.retry is not None:
        d = ex.decision
        host.budgets.budget((d.route, d.backend), enf.retry).record_request(host.loop.time())
    if enf.openapi is not None:
        limit = enf.openapi.settings.max_body_bytes
        if ex.length is not None and (not ex.length.isdigit() or int(ex.length) > limit):
            too_large(s, ex, enf)
            return False
        if not ex.body_done:
            ex.waiting_body = True  # Exchange.body_chunk checks the size, body_end calls us
            if ex.expect and not ex.body_size:
                s.down.send(CONTINUE)  # the client waits for it before sending the body
            return False
        return _openapi(s, ex, enf)
    return True


def too_large(s: Any, ex: Any, enf: Enforcement) -> None:
    limit = enf.openapi.settings.max_body_bytes  # type: ignore[union-attr]
    ex.waiting_body = False
    _deny(s, ex, enf.openapi_name, 413, _problem(413, "body-too-large", "Request body too large",
                                                 f"the body is larger than {limit} bytes"))


def body_complete(s: Any, ex: Any) -> None:
    """The held body of `ex` is whole (Exchange.body_end)."""
    ex.waiting_body = False
    if ex.finished or ex.dropped:
        return
    if _openapi(s, ex, ex.enf):
        s.proceed(ex)


def _jwt(s: Any, ex: Any, enf: Enforcement) -> bool:
    auth = next((v for n, v in ex.headers if n == b"authorization"), None)
    got = enf.jwt.verify(auth.decode("latin-1") if auth is not None else None)  # type: ignore
    if not got.ok:
        extra = [(b"www-authenticate", got.www_authenticate.encode("latin-1"))] \
            if got.www_authenticate else []
        limited.info(f"jwt-{got.status}", "%s: request refused with %d by jwt policy %s: %s",
                     s.host.name, got.status, quote(enf.jwt_name), quote(got.error))
        _deny(s, ex, enf.jwt_name, got.status, f"{got.error}\n".encode(), extra, plain=True)
        return False
    names = enf.jwt.claim_header_names  # type: ignore[union-attr]
    if names or got.headers_to_add:
        drop = {n.encode("latin-1") for n in names}
        ex.headers = [hv for hv in ex.headers if hv[0] not in drop] + [
            (n.encode("latin-1"), v.encode("latin-1", "replace")) for n, v in got.headers_to_add]
    return True


def _openapi(s: Any, ex: Any, enf: Enforcement) -> bool:
    target = ex.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for n, v in ex.headers:
        name, value = n.decode("latin-1"), v.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    body = b"".join(ex.body) if ex.body else b""
    got = enf.openapi.check(ex.method.decode("latin-1"), path, query, headers, body)  # type: ignore
    if not got.ok:
        extra = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in got.headers]
        _deny(s, ex, enf.openapi_name, got.status, got.problem_body or b"", extra)
        return False
    new = got.new_body
    if new is not None:
        s.held += len(new) - ex.body_size
        ex.body, ex.body_size = [new], len(new)
        ex.chunked_in = False
        ex.length = str(len(new)).encode()
        ex.headers = [hv for hv in ex.headers
                      if hv[0] not in (b"content-length", b"transfer-encoding")] + [
            (b"content-length", ex.length)]
    return True


def _deny(s: Any, ex: Any, policy: str, status: int, body: bytes,
          extra: list[tuple[bytes, bytes]] = (), plain: bool = False) -> None:  # type: ignore
    d = ex.decision
    s.host.http.denied_by(d.route, policy, status)
    ex.error = f"refused by policy {policy}"
    headers = list(extra) + ([] if plain else [PROBLEM_JSON])
    s.answer(ex, status, body, headers)


def _problem(status: int, kind: str, title: str, detail: str) -> bytes:
    return json.dumps({"type": f"urn:isthmus:problem:{kind}", "title": title,
                       "status": status, "detail": detail}).encode()


def sent(s: Any, ex: Any, up: Any) -> None:
    """A try went out on `up`: its per-try timer."""
    enf = ex.enf
    if enf.try_timeout is not None:
        if ex.try_timer is not None:
            ex.try_timer.cancel()
        ex.try_timer = s.host.loop.call_later(enf.try_timeout, _try_timeout, s, ex, up)


def _try_timeout(s: Any, ex: Any, up: Any) -> None:
    if ex.finished or ex.upstream is not up:
        return
    ex.try_timer = None
    ex.upstream = None
    up.abort()
    if ex.responded:
        ex.error = "backend request timeout"
        s.abort_client(ex)
        return
    if not failed(s, ex, Outcome(TIMEOUT), up.target):
        ex.error = "backend request timeout"
        s.answer(ex, 504, f"upstream {up.target.key} did not answer in time\n")


def _request_timeout(s: Any, ex: Any) -> None:
    ex.timer = None
    if ex.finished:
        return
    ex.error = "request timeout"
    if ex.try_timer is not None:
        ex.try_timer.cancel()
        ex.try_timer = None
    up, ex.upstream = ex.upstream, None
    if up is not None:
        up.abort()
    if ex.responded:
        s.abort_client(ex)
    else:
        s.answer(ex, 504, "request timeout\n")


def failed(s: Any, ex: Any, outcome: Outcome, target: Any, retry_after: str | None = None
           ) -> bool:
    """A try of `ex` failed: True when a retry is scheduled (the caller answers nothing)."""
    enf = ex.enf
    policy = enf.retry
    if policy is None or ex.responded or ex.finished:
        return False
    held = ex.body is not None and not ex.sent_body and ex.body_done  # can be sent again
    host = s.host
    loop = host.loop
    now = loop.time()
    d = ex.decision
    left = None
    if enf.request_timeout is not None:
        left = enf.request_timeout - (now - ex.started)
    budget = host.budgets.budget((d.route, d.backend), policy) if held else None
    verdict = decide(policy, method=ex.method.decode("latin-1"), outcome=outcome,
                     retries_done=ex.tries, budget=budget, now=now, random=host.random,
                     retry_after=retry_after,
                     now_epoch=time.time() if retry_after is not None else None, time_left=left)
    if not verdict.retry or not held:
        reason = verdict.reason if not verdict.retry else "body"  # body: streamed, not held
        if reason not in ("condition", "attempts"):
            host.http.retry_skipped(d.route, reason)
        return False
    ex.tries += 1
    ex.retried = True  # no second 100 Continue, no keep-alive-race resend on top
    if target is not None:
        ex.tried = (*ex.tried, target.key)
        router = host.router(d.backend)
        if router is not None and outcome.kind == TIMEOUT:  # the others are reported already
            router.report(target, False)
    host.http.retried(d.route, outcome.kind if outcome.kind != STATUS else str(outcome.status))
    ex.try_timer = loop.call_later(verdict.delay, s.retry, ex)
    return True


class Avoiding:
    """A router's plan without the targets a request already failed on (all of them when
    nothing else is left): a retry goes to another endpoint or tier."""

    def __init__(self, router: Any, keys: tuple[str, ...]) -> None:
        self.router = router
        self.keys = keys

    def plan(self) -> list[Any]:
        full = self.router.plan()
        rest = [t for t in full if t.key not in self.keys]
        return rest or full

    def report(self, target: Any, ok: bool) -> None:
        self.router.report(target, ok)

