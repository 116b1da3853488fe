"""JSON Web Key Sets (RFC 7517) for JWT verification: read from a file or fetched from a URL.

`parse_jwks(data, source)` turns the bytes of a JWKS document into a `KeySet`: the signing keys
by `kid`, imported with joserfc. Keys that cannot verify our algorithms are skipped and named
(symmetric `oct` keys — a shared secret has no place in a public key set — keys marked
`use: enc`, RSA keys under 2048 bits, and unknown key types), so one odd key does not take
the others down. A document that is not JSON, has no `keys` list, holds no usable key, or
repeats a `kid` is a `JwksError` naming the source.

`read_jwks_file(path)` reads at most MAX_JWKS_BYTES from a file; `fetch_jwks(url)` GETs it with
aiohttp under a total timeout, refusing a non-200 answer and a body over MAX_JWKS_BYTES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey

from federation.logs import quote

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100
MIN_RSA_BITS = 2048
FETCH_TIMEOUT = 5.0
Key = RSAKey | ECKey | OKPKey


class JwksError(Exception):
    """A key set that cannot be used; the message names the source and what is wrong."""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: dict[str | None, Key]  # by kid (None: a key without kid)
    skipped: tuple[str, ...] = ()  # why each skipped key was skipped
    source: str = ""

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(sorted(k or "(no kid)" for k in self.keys))


def parse_jwks(data: bytes, source: str) -> KeySet:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError(f"{source}: not a JSON key set ({e})") from None
    items = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise JwksError(f"{source}: expected a JSON object with a 'keys' list (RFC 7517)")
    if len(items) > MAX_KEYS:
        raise JwksError(f"{source}: {len(items)} keys, at most {MAX_KEYS} are read")
    keys: dict[str | None, Key] = {}
    skipped: list[str] = []
    for i, item in enumerate(items):
        why = _unusable(item)
        kid = item.get("kid") if isinstance(item, dict) else None
        label = f"keys[{i}]" + (f" (kid {quote(kid)})" if isinstance(kid, str) else "")
        if why is None and kid is not None and not isinstance(kid, str):
            why = "its kid is not a string"
        if why is not None:
            skipped.append(f"{label}: {why}")
            continue
        if kid in keys:
            raise JwksError(f"{source}: {label} repeats a kid; each key needs its own")
        try:
            key = JWKRegistry.import_key(item)
        except (JoseError, ValueError, TypeError) as e:
            skipped.append(f"{label}: cannot be imported ({e})")
            continue
        if isinstance(key, RSAKey) and key.raw_value.key_size < MIN_RSA_BITS:
            skipped.append(f"{label}: an RSA key of {key.raw_value.key_size} bits; "
                           f"at least {MIN_RSA_BITS} are required")
            continue
        keys[kid] = key  # type: ignore[assignment]
    if not keys:
        detail = "; ".join(skipped) or "the list is empty"
        raise JwksError(f"{source}: no usable signing key ({detail})")
    return KeySet(keys, tuple(skipped), source)


def _unusable(item: object) -> str | None:
    if not isinstance(item, dict):
        return "not a JSON object"
    kty = item.get("kty")
    if kty == "oct":
        return "a symmetric (oct) key; only public keys (RSA, EC, OKP) verify tokens here"
    if kty not in ("RSA", "EC", "OKP"):
        return f"key type {quote(kty)} is not RSA, EC or OKP"
    if item.get("use", "sig") != "sig":
        return f"use {quote(item.get('use'))} is not sig"
    return None


def read_jwks_file(path: str) -> KeySet:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as e:
        raise JwksError(f"{path}: cannot read the key set ({e.strerror or e})") from None
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"{path}: larger than {MAX_JWKS_BYTES} bytes; not a key set")
    return parse_jwks(data, path)


async def fetch_jwks(url: str, timeout: float = FETCH_TIMEOUT) -> KeySet:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise JwksError(f"{url}: answered HTTP {resp.status}, not 200")
                data = await resp.content.read(MAX_JWKS_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise JwksError(f"{url}: cannot fetch the key set ({type(e).__name__}: {e})") from None
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"{url}: larger than {MAX_JWKS_BYTES} bytes; not a key set")
    return parse_jwks(data, url)
