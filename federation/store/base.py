"""The Store protocol: a revisioned key-value store with leases and watchable history.

Shaped after etcd's v3 API so that `store/etcd.py` can implement it without changing callers:
- every write (put, delete, lease expiry deleting a key) gets the next global revision;
- keys may be attached to a lease; when the lease expires or is revoked, those keys are deleted
  (each deletion an event, so watchers see the withdrawal);
- `events(prefix, after)` returns every change with revision > `after`, in order, waiting up to
  `timeout` for the first one (long-poll); history older than the compaction point raises
  `CompactedError`, and a revision the store has not reached raises `FutureRevisionError`
  (as etcd refuses a future revision); either way the caller resyncs from `range()`;
- a lease's deadline is kept across restarts, but a restart says nothing new about liveness:
  the process that serves the leases calls `renew_all_leases()` when it starts, so each lease
  gets one full TTL from then (etcd does this itself when a new leader takes over: its
  lessor's `Promote` extends every lease by its TTL).
A write is acknowledged only once it is durable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["put", "delete"]
    key: str
    value: bytes | None  # None for deletes
    revision: int


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def revision(self) -> int:
        """The current (latest) revision; 0 for an empty store."""
        ...

    async def get(self, key: str) -> KV | None: ...

    async def range(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under prefix (sorted by key) and the revision they were read at."""
        ...

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Write a key (optionally attached to a live lease); returns the new revision.
        Raises StoreError if the lease is unknown or expired. A put whose value and lease are
        equal to the stored ones is still a new revision (callers dedupe if they care)."""
        ...

    async def delete(self, key: str) -> KV | None:
        """Delete a key atomically; returns the previous KV or None if it did not exist.
        (Join tokens are consumed this way: only one caller can get the KV back.)"""
        ...

    async def grant_lease(self, ttl: float) -> int:
        """A new lease that expires `ttl` seconds from now unless kept alive. Returns its id."""
        ...

    async def keepalive(self, lease: int) -> bool:
        """Renew a lease for another ttl. False if it is unknown or already expired."""
        ...

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys."""
        ...

    async def renew_all_leases(self) -> int:
        """Renew every lease for a full ttl from now (none ends earlier than before); returns
        how many. The federation calls it once at start, before serving, so leases restored
        from an outage longer than their ttl are not expired before their holders could renew
        them. Stores that do this by themselves at leader change (etcd) return 0."""
        ...

    async def expire_leases(self) -> int:
        """Delete the keys of every lease past its deadline; returns how many leases ended.
        Stores that expire leases by themselves (etcd) return 0."""
        ...

    async def events(self, prefix: str, after: int, timeout: float) -> list[Event]:
        """Events under prefix with revision > after, oldest first; waits up to `timeout`
        seconds for the first one and returns [] if none came. Raises CompactedError if `after`
        is older than the history kept, FutureRevisionError if it is above the current
        revision."""
        ...


def open_store(url: str) -> Store:
    """`sqlite:PATH` (the default embedded store) or `etcd://host:port,...[?cacert=&cert=&key=]`
    (store/etcd.py; the query is TLS to etcd)."""
    from federation.errors import InputError

    scheme, _, rest = url.partition(":")
    if scheme == "sqlite" and rest:
        from federation.store.sqlite import SqliteStore

        return SqliteStore(rest)
    if scheme == "etcd" and rest.startswith("//"):
        from federation.store.etcd import EtcdStore, parse_etcd_tls, parse_etcd_url

        return EtcdStore(parse_etcd_url(url), tls=parse_etcd_tls(url))
    raise InputError(f"store {url!r}: expected sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]"
                     "[?cacert=PATH&cert=PATH&key=PATH]")
