"""Join tokens: single-use, expiring, one live token per cluster; only their sha256 is stored.

A token is 32 random bytes (urlsafe text) shown once, to the operator who creates it. The store
keeps `tokens/<sha256 hex>` -> {cluster, created_at, expires_at, replace}; a join consumes it
with an atomic `store.delete`, and the server's sweeper deletes expired ones every minute.

* Lifetime: at most MAX_TOKEN_TTL (7 days). A token is a bearer secret: the shorter the better.
* One per cluster: creating a token for a cluster revokes the unused ones it had, so an old
  token lying in a file or a chat cannot join after a new one was handed out.
* `replace`: an ordinary token joins a NEW cluster, or re-joins an existing one only if the
  joining gateway proves it is that cluster (it presents an SVID that verifies against the
  cluster's current bundle). A token made with `replace` lets whoever holds it take over an
  existing cluster with a new identity (a new CA or trust domain): an explicit operator
  action, logged when used.
* Listing shows a token's id (the first 12 hex digits of its sha256), never the token itself;
  revoking takes that id (or a unique prefix of it) or a cluster name.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from federation import api
from federation.errors import ApiError, InputError
from federation.fields import check_name
from federation.model import TOKENS
from federation.store.base import KV, Store
from federation.units import format_duration

MAX_TOKEN_TTL = 7 * 86400.0
ID_LENGTH = 12


@dataclass(frozen=True)
class TokenInfo:
    """What the store knows of one token (never the token itself)."""

    key: str  # tokens/<sha256 hex>
    cluster: str
    expires_at: float
    created_at: float | None = None  # None for tokens made before it was recorded
    replace: bool = False

    @property
    def id(self) -> str:
        return self.key[len(TOKENS):][:ID_LENGTH]

    def expired(self, now: float) -> bool:
        return self.expires_at <= now

    def to_json(self, now: float) -> dict:
        return {"id": self.id, "cluster": self.cluster, "created_at": self.created_at,
                "expires_at": self.expires_at, "expired": self.expired(now),
                "replace": self.replace}


def token_key(token: str) -> str:
    return TOKENS + hashlib.sha256(token.encode()).hexdigest()


def parse_token(kv: KV) -> TokenInfo:
    """The stored meta of a token; ValueError (and its kin) if unreadable."""
    meta = json.loads(kv.value)
    created = meta.get("created_at")
    return TokenInfo(kv.key, check_name(meta["cluster"], "token cluster"),
                     float(meta["expires_at"]),
                     None if created is None else float(created), meta.get("replace") is True)


def check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise InputError(f"token ttl {format_duration(ttl)}: must be positive")
    if ttl > MAX_TOKEN_TTL:
        raise InputError(f"token ttl {format_duration(ttl)}: at most "
                         f"{format_duration(MAX_TOKEN_TTL)} (a join token is a bearer secret; "
                         "make a new one when it is needed)")
    return ttl


async def list_tokens(store: Store) -> list[TokenInfo]:
    """Every stored token that parses, soonest expiry first (an unreadable one is skipped)."""
    kvs, _ = await store.range(TOKENS)
    out = []
    for kv in kvs:
        try:
            out.append(parse_token(kv))
        except (ValueError, KeyError, TypeError, InputError):
            continue
    return sorted(out, key=lambda t: (t.expires_at, t.key))


async def revoke_tokens(store: Store, *, cluster: str | None = None,
                        token_id: str | None = None) -> list[TokenInfo]:
    """Delete the tokens of `cluster`, or the one whose id starts with `token_id` (InputError
    if that prefix is unknown or names several). Returns what was deleted."""
    tokens = await list_tokens(store)
    if token_id is not None:
        wanted = token_id.strip().lower()
        if len(wanted) < 4 or any(c not in "0123456789abcdef" for c in wanted):
            raise InputError(f"token id {token_id!r}: expected at least 4 hex digits "
                             "(the ID column of `isthmus federation token list`)")
        found = [t for t in tokens if t.key[len(TOKENS):].startswith(wanted)]
        if not found:
            raise InputError(f"token id {token_id!r}: no such token (see `isthmus federation "
                             "token list`)")
        if len(found) > 1:
            raise InputError(f"token id {token_id!r}: {len(found)} tokens start with it; "
                             "give more digits")
    else:
        found = [t for t in tokens if t.cluster == cluster]
    for t in found:
        await store.delete(t.key)
    return found


async def create_token(store: Store, cluster: str, ttl: float, now: float,
                       replace: bool = False) -> tuple[str, list[TokenInfo]]:
    """A single-use join token for `cluster`, valid `ttl` seconds from `now` (at most 7 days),
    and the cluster's earlier unused tokens it revoked. The store must be open; only the
    token's sha256 is stored. Show the token once; never log it."""
    check_name(cluster, "cluster")
    check_ttl(ttl)
    revoked = await revoke_tokens(store, cluster=cluster)
    token = secrets.token_urlsafe(32)
    value = api.canonical_json({"cluster": cluster, "created_at": now, "expires_at": now + ttl,
                                "replace": replace})
    await store.put(token_key(token), value)
    return token, revoked


def token_for_join(kv: KV | None, now: float) -> TokenInfo:
    """The token a join presents; ApiError 401 if it is unknown, used, unreadable or expired
    at `now`."""
    if kv is None:
        raise ApiError(401, "join token unknown, revoked or already used")
    try:
        info = parse_token(kv)
    except (ValueError, KeyError, TypeError, InputError):
        raise ApiError(401, "join token unreadable; create a new one") from None
    if info.expired(now):
        raise ApiError(401, "join token expired")
    return info
