"""The Store on an etcd cluster (`federation serve --store etcd://HOST:PORT,HOST:PORT,...`),
through aetcd (asyncio gRPC).

Revisions, leases, watches and compaction are etcd's own: a revision is etcd's (an empty etcd
is at revision 1), a lease is an etcd lease (whole seconds; etcd expires it and keeps its
deadline across a leader change, so `renew_all_leases` and `expire_leases` do nothing), events
come from a watch started at `after + 1` (history first, then new writes) on a gRPC stream of
its own (not aetcd's shared one, which under load handed one watch another's events), and a
watch behind etcd's compaction is a CompactedError (the federation's 410: resync from a
snapshot). A delete
returns the previous value to exactly one caller (single-use join tokens, even across
replicas). Several endpoints: each is tried in turn when one is unreachable.

TLS to etcd is optional, given as query parameters on the URL (so `federation serve --store`
and `federation token create --store` take it alike):
`etcd://HOST:PORT,...?cacert=CA.pem&cert=CLIENT.pem&key=CLIENT-KEY.pem`. `cacert` alone is
server-authenticated TLS (etcd's certificate checked against that CA, its name or IP against
HOST); with `cert` and `key` the store also presents a client certificate (etcd started with
`--client-cert-auth`). The files are read at `open()`; one missing or unreadable is a
StoreError naming it. aetcd 1.0 opens plaintext channels only: `_TlsClient` opens a gRPC TLS
channel and sets up the same stubs.

Limits as the SQLite store: keys ≤ MAX_KEY_BYTES, values ≤ MAX_VALUE_BYTES (etcd's own default
request limit is 1.5 MiB).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc
from aetcd import rpc, watcher

from federation.errors import CompactedError, FutureRevisionError, InputError, StoreError
from federation.store.base import KV, Event

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
BATCH = 10_000  # events returned by one call at most (the next call goes on from the last)
BATCH_WAIT = 0.005  # after the first event, this long for the rest of its batch
RANGE_PAGE = 2000  # keys per range request (~1 MB of exports)

__all__ = ["EtcdStore", "EtcdTls", "parse_etcd_tls", "parse_etcd_url"]
TLS_PARAMS = ("cacert", "cert", "key")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Paths of the PEM files for TLS to etcd; `cert` and `key` both or neither."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(what: str, path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise StoreError(f"etcd TLS {what} file {path}: {e.strerror or e}") from None

        return grpc.ssl_channel_credentials(read("cacert", self.cacert), read("key", self.key),
                                            read("cert", self.cert))


def parse_etcd_tls(url: str) -> EtcdTls | None:
    """The `?cacert=&cert=&key=` of an etcd:// URL; None when it has none (plaintext)."""
    _, sep, query = url.partition("?")
    if not sep:
        return None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InputError(f"store {url!r}: the part after '?' is not NAME=VALUE&... "
                         f"(expected {', '.join(TLS_PARAMS)})") from None
    params = dict(pairs)
    unknown = sorted(set(params) - set(TLS_PARAMS))
    if unknown:
        raise InputError(f"store {url!r}: unknown parameter {unknown[0]!r}; expected "
                         f"{', '.join(TLS_PARAMS)}")
    if len(params) != len(pairs):
        raise InputError(f"store {url!r}: a parameter is given twice")
    empty = [k for k, v in params.items() if not v]
    if empty:
        raise InputError(f"store {url!r}: {empty[0]}= needs a file path")
    if ("cert" in params) != ("key" in params):
        raise InputError(f"store {url!r}: cert= and key= go together (the client certificate "
                         "and its private key)")
    return EtcdTls(params.get("cacert"), params.get("cert"), params.get("key"))


class _TlsClient(aetcd.Client):
    """An aetcd client on a gRPC TLS channel (aetcd's own `connect` opens plaintext only)."""

    def __init__(self, *, tls: EtcdTls, **kw: Any) -> None:
        super().__init__(**kw)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}",
                                               self._tls.credentials(),
                                               options=list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """`etcd://host:port,host:port[?TLS params]` -> endpoints."""
    rest = url.removeprefix("etcd://").partition("?")[0]
    out = []
    for part in filter(None, rest.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise InputError(f"store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...], "
                             f"got {part!r}")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise InputError(f"store {url!r}: no etcd endpoint")
    return out


class EtcdStore:
    shared = True  # other federation processes may write it too (server/clusters.follow_store)

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = 5.0,
                 tls: EtcdTls | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.tls = tls
        self.client: aetcd.Client | None = None
        self.where = ""

    def _client(self, host: str, port: int) -> aetcd.Client:
        kw: dict[str, Any] = {"host": host, "port": port, "timeout": int(math.ceil(self.timeout))}
        return aetcd.Client(**kw) if self.tls is None else _TlsClient(tls=self.tls, **kw)

    async def open(self) -> None:
        if self.tls is not None:
            self.tls.credentials()  # each file readable, or a StoreError naming it
        errors = []
        for host, port in self.endpoints:
            c = self._client(host, port)
            try:
                await asyncio.wait_for(c.connect(), self.timeout)
                await asyncio.wait_for(c.get_prefix(b"\0"), self.timeout)  # answers at all
            except (aetcd.exceptions.ClientError, OSError, TimeoutError) as e:
                errors.append(f"{host}:{port}: {type(e).__name__}: {e}")
                await c.close()
                continue
            self.client, self.where = c, f"{host}:{port}"
            return
        raise StoreError(f"no etcd endpoint answered: {'; '.join(errors)}")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _c(self) -> aetcd.Client:
        if self.client is None:
            raise StoreError("the etcd store is closed")
        return self.client

    async def _call(self, make: Any) -> Any:
        """`make(client)` on the member in use; if that member cannot be reached, once on each
        other member (reconnecting), then a StoreError. Only a failure to connect is retried
        elsewhere: a call the member may have applied is not repeated."""
        tried = 0
        while True:
            client = self._c()
            try:
                return await asyncio.wait_for(make(client), self.timeout)
            except aetcd.exceptions.RevisionCompactedError:
                raise
            except aetcd.exceptions.ConnectionFailedError as e:
                tried += 1
                if tried >= len(self.endpoints) or not await self._reconnect():
                    raise StoreError(f"etcd at {self.where}: {type(e).__name__}: {e}") from None
            except (aetcd.exceptions.ClientError, OSError, TimeoutError) as e:
                if len(self.endpoints) > 1:
                    await self._reconnect()  # the next call goes to another member
                raise StoreError(f"etcd at {self.where}: {type(e).__name__}: {e}") from None

    async def _reconnect(self) -> bool:
        """Move to the next member that answers; False if none does."""
        order = [ep for ep in self.endpoints if f"{ep[0]}:{ep[1]}" != self.where]
        for host, port in order:
            c = self._client(host, port)
            try:
                await asyncio.wait_for(c.connect(), self.timeout)
                await asyncio.wait_for(c.get_prefix(b"\0"), self.timeout)
            except (aetcd.exceptions.ClientError, OSError, TimeoutError):
                await c.close()
                continue
            old, self.client, self.where = self.client, c, f"{host}:{port}"
            if old is not None:
                await old.close()
            return True
        return False

    async def describe(self) -> dict:
        """The etcd members (name, client URLs, leader) and the one this store talks to."""
        members = []
        try:
            st = await self._call(lambda c: c.status())
            leader = getattr(st.leader, "id", None)

            async def collect(c: aetcd.Client) -> list:
                return [m async for m in c.members()]

            for m in await self._call(collect):
                members.append({"name": m.name, "client_urls": list(m.client_urls),
                                "leader": m.id == leader})
        except StoreError as e:
            return {"kind": "etcd", "using": self.where, "tls": self.tls is not None,
                    "error": str(e), "members": []}
        return {"kind": "etcd", "using": self.where, "tls": self.tls is not None,
                "members": members}

    async def revision(self) -> int:
        return (await self._call(lambda c: c.get_prefix(b"\0"))).header.revision

    async def get(self, key: str) -> KV | None:
        g = await self._call(lambda c: c.get(key.encode()))
        if g is None:
            return None
        return KV(key, g.value, g.mod_revision, g.lease or None)

    async def range(self, prefix: str) -> tuple[list[KV], int]:
        """Pages of up to RANGE_PAGE keys, all read at the revision of the first page (a
        catalog of 100,000 endpoints is ~11 MB: one answer would pass gRPC's 4 MiB message
        limit); a page still too large (big values) is asked again with a quarter as many
        keys. aetcd 1.0 drops a range's limit and revision, so the request is built here."""
        start, end = prefix.encode(), aetcd.utils.prefix_range_end(prefix.encode())
        out: list[KV] = []
        revision, page = 0, RANGE_PAGE
        while True:
            req = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
            try:
                r = await self._call(lambda c, req=req: _range(c, req, self.timeout))
            except _PageTooBig as e:
                if page == 1:
                    raise StoreError(f"etcd at {self.where}: range {prefix!r}: one key "
                                     f"passes gRPC's message limit ({e})") from None
                page = max(1, page // 4)
                continue
            revision = revision or r.header.revision
            out += [KV(kv.key.decode(), kv.value, kv.mod_revision, kv.lease or None)
                    for kv in r.kvs]
            if not r.more or not r.kvs:
                return out, revision
            start = r.kvs[-1].key + b"\0"

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        if len(key.encode()) > MAX_KEY_BYTES or len(value) > MAX_VALUE_BYTES:
            raise StoreError(f"key {key[:80]!r}: key or value too large (at most "
                             f"{MAX_KEY_BYTES} / {MAX_VALUE_BYTES} bytes)")
        r = await self._call(lambda c: c.put(key.encode(), value, lease=lease))
        return r.header.revision

    async def delete(self, key: str) -> KV | None:
        r = await self._call(lambda c: c.delete(key.encode(), prev_kv=True))
        if r is None or not getattr(r, "deleted", 0) or r.prev_kv is None:
            return None
        p = r.prev_kv
        return KV(key, p.value, p.mod_revision, p.lease or None)

    async def grant_lease(self, ttl: float) -> int:
        lease = await self._call(lambda c: c.lease(max(1, math.ceil(ttl))))
        return lease.id

    async def keepalive(self, lease: int) -> bool:
        try:
            r = await self._call(lambda c: c.refresh_lease(lease))
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - an unknown lease is an error from etcd: not alive
            return False
        return r is not None and getattr(r, "TTL", 0) > 0

    async def revoke(self, lease: int) -> None:
        try:
            await self._call(lambda c: c.revoke_lease(lease))
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - unknown or already gone: nothing to end
            return

    async def renew_all_leases(self) -> int:
        return 0  # etcd keeps lease deadlines itself (across leader changes too)

    async def expire_leases(self) -> int:
        return 0  # etcd expires leases itself

    async def events(self, prefix: str, after: int, timeout: float) -> list[Event]:
        """A watch from `after + 1` on a gRPC stream of its own, ended when this returns.
        (aetcd's shared watch stream pairs a late "created" answer with the next watch being
        created, so under load one call could get another's events: duplicates or gaps.)"""
        current = await self.revision()
        if after > current:
            raise FutureRevisionError(after, current)
        client = self._c()
        key = prefix.encode()
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=aetcd.utils.prefix_range_end(key), start_revision=after + 1))
        ended = asyncio.Event()

        async def requests() -> Any:
            yield create
            await ended.wait()  # the request stream stays open until the call is done

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
        out: list[Event] = []
        try:
            while len(out) < BATCH:
                wait = BATCH_WAIT if out else deadline - loop.time()
                if wait <= 0:
                    break
                try:
                    resp = await asyncio.wait_for(call.read(), wait)
                except TimeoutError:
                    break
                if resp is grpc.aio.EOF:
                    break
                if resp.compact_revision:
                    raise CompactedError(after, resp.compact_revision)
                if resp.canceled:
                    raise StoreError(f"etcd at {self.where}: watch canceled: "
                                     f"{resp.cancel_reason or 'no reason given'}")
                for ev in resp.events:
                    deleted = ev.type == rpc.Event.DELETE
                    out.append(Event("delete" if deleted else "put", ev.kv.key.decode(),
                                     None if deleted else ev.kv.value, ev.kv.mod_revision))
        except grpc.aio.AioRpcError as e:
            if not out:
                if len(self.endpoints) > 1:
                    await self._reconnect()
                raise StoreError(f"etcd at {self.where}: watch: {e.code().name}: "
                                 f"{e.details()}") from None
        finally:
            ended.set()
            call.cancel()
        return out


class _PageTooBig(Exception):
    """A range answer larger than gRPC's message limit (RESOURCE_EXHAUSTED)."""


async def _range(c: aetcd.Client, req: Any, timeout: float) -> Any:
    """One Range call on aetcd's stub, its gRPC errors mapped as aetcd maps its own."""
    try:
        return await c.kvstub.Range(req, timeout=timeout, metadata=c.metadata)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise _PageTooBig(e.details()) from None
        aetcd.exceptions._handle_exception(e)  # raises the matching aetcd error
        raise


