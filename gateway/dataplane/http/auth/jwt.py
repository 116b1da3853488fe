"""JWT bearer-token verification for a route's `jwt` policy (RFC 7519, RFC 6750), on joserfc.

Theory of operation
-------------------
`JwtVerifier(settings, clock).verify(authorization_header_value)` is synchronous and cheap, for
the proxy's hot path; it returns a `JwtResult`: `ok`, the `claims`, the `headers_to_add` (claims
mapped to request headers by `claim_headers`), or the `status` (401, or 503 while no key set is
loaded) with the `www_authenticate` value to send (RFC 6750 section 3:
`Bearer error="invalid_token", error_description="..."`; a request without a token gets a bare
`Bearer realm="isthmus"`). The caller must first remove any copy of `claim_header_names` the
client sent, so that a client cannot pose as a verified claim.

A token is accepted when, in this order:

1. the header is `Bearer <token>` (at most MAX_TOKEN_BYTES);
2. its `alg` is one of `settings.algorithms` (RS256, ES256, EdDSA/Ed25519 only: `none` and
   every HS* are refused before any key is looked at — so an HS256 token "signed" with our RSA
   public key as the HMAC secret, the classic algorithm confusion, is refused too);
3. its `kid` names a key of the current key set (no `kid`: the set must hold exactly one key)
   and that key's type fits the algorithm (RSA for RS256, EC P-256 for ES256, OKP Ed25519 for
   EdDSA);
4. the signature verifies (joserfc; no crypto of our own);
5. the claims hold: `iss` equals `settings.issuer`; `aud` (a string or a list) names one of
   `settings.audiences`; `exp` is present and now < exp + clock_skew; `nbf`, if present,
   now >= nbf - clock_skew; every `required_claims` name is present.

Verified tokens are cached (an LRU of `cache_size`, keyed by the SHA-256 of the token, until
their exp + skew), so a client reusing a token costs one hash and one dict lookup; the cache is
emptied whenever the key set changes (a removed key must stop working at once).

Keys come from `jwks_file` (read at construction and on every `refresh()`, so a rotated file is
picked up) or `jwks_url` (fetched by `refresh()` with aiohttp). The caller owns an
`asyncio` task running `refresh_loop()`: it refreshes every `refresh_interval`, and early when
`verify` saw an unknown `kid` — at most once per `unknown_kid_refresh`, so a flood of made-up
kids costs one fetch per period. A failed refresh keeps the last good key set (one log line)
and is tried again after 1, 2, 4 ... 60 s.
`verify_or_refresh` is the async form that, on an unknown kid, awaits that refresh and tries
once more. `clock` returns wall-clock seconds (Unix time); tests inject it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from federation.logs import quote
from gateway.core.policies import JwtSettings
from gateway.dataplane.http.auth.jwks import JwksError, KeySet, fetch_jwks, read_jwks_file

__all__ = ["JwtResult", "JwtVerifier", "MAX_TOKEN_BYTES"]

log = logging.getLogger("isthmus.gateway.jwt")
# joserfc warns on every EdDSA use (RFC 9864 prefers the name Ed25519); we accept both names
# on purpose, and a warning per request would cost more than the verification
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

MAX_TOKEN_BYTES = 8192
FIRST_RETRY, MAX_RETRY = 1.0, 60.0  # seconds between key refreshes after a failed one
REALM = 'Bearer realm="isthmus"'
_KEY_TYPES: dict[str, tuple[type, str | None]] = {
    "RS256": (RSAKey, None),
    "ES256": (ECKey, "P-256"),
    "EdDSA": (OKPKey, "Ed25519"),
    "Ed25519": (OKPKey, "Ed25519"),
}


@dataclass(frozen=True, slots=True)
class JwtResult:
    ok: bool
    claims: Mapping[str, Any] = field(default_factory=dict)
    headers_to_add: tuple[tuple[str, str], ...] = ()
    status: int = 200
    www_authenticate: str | None = None
    error: str = ""  # the error_description, for logs and metrics


class _Refused(Exception):
    def __init__(self, why: str, unknown_kid: bool = False):
        super().__init__(why)
        self.unknown_kid = unknown_kid


class JwtVerifier:
    def __init__(self, settings: JwtSettings, clock: Callable[[], float]):
        if (settings.jwks_file is None) == (settings.jwks_url is None):
            raise ValueError("a jwt policy needs exactly one of jwks_file and jwks_url")
        self.settings = settings
        self.clock = clock
        self.claim_header_names = tuple(h for _, h in settings.claim_headers)
        self._keys: KeySet | None = None
        self._cache: OrderedDict[bytes, tuple[float, JwtResult]] = OrderedDict()
        self._wake = asyncio.Event()
        self._last_kid_refresh = float("-inf")
        self._audiences = frozenset(settings.audiences)
        if settings.jwks_file is not None:
            self._install(read_jwks_file(settings.jwks_file))  # a bad file: JwksError at start

    @property
    def keys(self) -> KeySet | None:
        return self._keys

    # -- the hot path ------------------------------------------------------------------------

    def verify(self, authorization: str | None) -> JwtResult:
        return self._verify(authorization)[0]

    async def verify_or_refresh(self, authorization: str | None) -> JwtResult:
        result, refresh = self._verify(authorization, wake=False)
        if refresh:
            await self.refresh()
            result = self._verify(authorization, wake=False)[0]
        return result

    def _verify(self, authorization: str | None, wake: bool = True) -> tuple[JwtResult, bool]:
        """The result, and whether an unknown kid earned a key refresh (then, with `wake`,
        refresh_loop is woken to do it; else the caller does)."""
        if not authorization:
            return JwtResult(False, status=401, www_authenticate=REALM, error="no token"), False
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _fail("expected an Authorization: Bearer token"), False
        if len(token) > MAX_TOKEN_BYTES:
            return _fail(f"token longer than {MAX_TOKEN_BYTES} bytes"), False
        now = self.clock()
        raw = token.encode("ascii", "replace")
        digest = hashlib.sha256(raw).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit[0]:
                self._cache.move_to_end(digest)
                return hit[1], False
            del self._cache[digest]
        keys = self._keys
        if keys is None:
            return JwtResult(False, status=503, error="signing keys not loaded yet"), False
        try:
            claims = self._check(raw, keys, now)
        except _Refused as e:
            refresh = e.unknown_kid and self._ask_refresh(now, wake)
            return _fail(str(e)), refresh
        result = JwtResult(True, claims, self._headers(claims))
        if self.settings.cache_size > 0:
            self._cache[digest] = (float(claims["exp"]) + self.settings.clock_skew, result)
            if len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)
        return result, False

    def _check(self, raw: bytes, keys: KeySet, now: float) -> dict[str, Any]:
        def pick(obj: Any) -> Any:
            header = obj.headers()
            alg = header.get("alg")
            if alg not in self.settings.algorithms:
                raise _Refused(f"algorithm {_safe(alg)} is not accepted")
            kid = header.get("kid")
            if kid is None and len(keys.keys) != 1:
                raise _Refused("the token has no kid and the key set has several keys")
            key = keys.keys.get(kid)
            if key is None:
                raise _Refused(f"unknown key id {_safe(kid)}", unknown_kid=True)
            kind, curve = _KEY_TYPES[alg]
            if not isinstance(key, kind) or (curve and key.curve_name != curve):
                raise _Refused(f"key {_safe(kid)} does not fit algorithm {alg}")
            return key

        try:
            token = jwt.decode(raw, pick, algorithms=list(self.settings.algorithms))
        except _Refused:
            raise
        except BadSignatureError:
            raise _Refused("bad signature") from None
        except JoseError as e:
            alg = _peek_alg(raw)
            if alg is not None and alg not in self.settings.algorithms:
                raise _Refused(f"algorithm {_safe(alg)} is not accepted") from None
            raise _Refused(f"malformed token ({e.error})") from None
        except (ValueError, TypeError):
            raise _Refused("malformed token") from None
        claims = token.claims
        if not isinstance(claims, dict):
            raise _Refused("the payload is not a JSON object")
        self._claims(claims, now)
        return claims

    def _claims(self, claims: dict[str, Any], now: float) -> None:
        s = self.settings
        if claims.get("iss") != s.issuer:
            raise _Refused(f"issuer {_safe(claims.get('iss'))} is not {_safe(s.issuer)}")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self._audiences for a in auds):
            raise _Refused(f"audience {_safe(aud)} is not accepted")
        exp = claims.get("exp")
        if not _number(exp):
            raise _Refused("the token has no numeric exp claim")
        if now >= exp + s.clock_skew:
            raise _Refused("the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _number(nbf) or now < nbf - s.clock_skew):
            raise _Refused("the token is not valid yet (nbf)")
        for name in s.required_claims:
            if name not in claims:
                raise _Refused(f"claim {_safe(name)} is required")

    def _headers(self, claims: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        out = []
        for claim, header in self.settings.claim_headers:
            if claim in claims:
                out.append((header, _header_value(claims[claim])))
        return tuple(out)

    def _ask_refresh(self, now: float, wake: bool) -> bool:
        if now - self._last_kid_refresh < self.settings.unknown_kid_refresh:
            return False
        self._last_kid_refresh = now
        if wake:
            self._wake.set()
        return True

    # -- keys --------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Load the key set again (file or URL); keep the last good one on failure."""
        s = self.settings
        try:
            if s.jwks_url is not None:
                keys = await fetch_jwks(s.jwks_url)
            else:
                keys = await asyncio.to_thread(read_jwks_file, s.jwks_file)  # type: ignore[arg-type]
        except JwksError as e:
            held = len(self._keys.keys) if self._keys else 0
            log.warning("jwt keys refresh failed: %s (keeping %d keys)", e, held)
            return False
        self._install(keys)
        return True

    async def refresh_loop(self) -> None:
        """Refresh every refresh_interval, and early on an unknown kid (rate-limited). After a
        failure, try again sooner: 1 s, 2 s, 4 s ... up to 60 s (never later than the
        interval), so a key server that was down at start costs seconds of 503, not minutes."""
        retry_in = FIRST_RETRY
        while True:
            self._wake.clear()
            ok = await self.refresh()
            wait = self.settings.refresh_interval
            if ok:
                retry_in = FIRST_RETRY
            else:
                wait, retry_in = min(wait, retry_in), min(retry_in * 2, MAX_RETRY)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _install(self, keys: KeySet) -> None:
        old = self._keys
        if old is not None and _same(old, keys):
            return
        self._keys = keys
        self._cache.clear()
        log.info("jwt keys loaded from %s: %d keys (kids %s)%s", quote(keys.source),
                 len(keys.keys), ", ".join(quote(k) for k in keys.kids),
                 f"; skipped: {'; '.join(keys.skipped)}" if keys.skipped else "")


def _fail(why: str) -> JwtResult:
    return JwtResult(False, status=401, error=why,
                     www_authenticate=f'Bearer error="invalid_token", '
                                      f'error_description="{_description(why)}"')


def _description(text: str) -> str:
    """RFC 6750 allows %x20-21 / %x23-5B / %x5D-7E in error_description: no quote, backslash,
    or anything outside printable ASCII."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:200]


def _safe(value: Any) -> str:
    return quote(value, 60)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _header_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    # a header value is one line of visible characters: no CR, LF or other controls
    return "".join(c for c in text if c == "\t" or (" " <= c and c != "\x7f"))[:4096]


def _peek_alg(raw: bytes) -> Any:
    head = raw.split(b".", 1)[0]
    try:
        return json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4))).get("alg")
    except (ValueError, AttributeError):
        return None


def _same(a: KeySet, b: KeySet) -> bool:
    if a.keys.keys() != b.keys.keys():
        return False
    return all(a.keys[k].as_dict(private=False) == b.keys[k].as_dict(private=False)
               for k in a.keys)
