"""The embedded store: one SQLite file, revisioned like etcd (see `base.py` for the protocol).

Theory of operation
-------------------
* One `sqlite3` connection in WAL mode with `synchronous=FULL`, so a write is on disk before it
  is acknowledged. The connection lives on ONE worker thread (a single-thread executor); every
  public method is a coroutine that ships its SQL to that thread, so the event loop never blocks
  on disk and statements never interleave. Each write is one `BEGIN IMMEDIATE` transaction.
* Tables::

      kv(key PRIMARY KEY, value, create_revision, mod_revision, lease)
      events(revision PRIMARY KEY, type, key, value)       -- one row per revision
      leases(id PRIMARY KEY AUTOINCREMENT, ttl, deadline)  -- ids are never reused
      meta(name PRIMARY KEY, value)                        -- 'revision', 'compacted'

  Every put and every delete (including deletions caused by lease expiry or revoke, one
  revision per key) bumps `meta.revision` by one and appends an event, in the same transaction.
* Compaction: after each write, events with revision <= revision - history are deleted and
  `meta.compacted` records that point (the highest discarded revision). `events(after=r)` with
  r < compacted raises `CompactedError(r, compacted + 1)`: the second number is the *oldest
  revision still kept*, as the error's message says (etcd calls this the compact revision).
* Long-poll: `events()` reads on the worker thread; if nothing matches, it waits in the event
  loop on an `asyncio.Event` that is swapped and set after every committed write of this
  process, then reads again. The Event is captured *before* the read, so a write committing
  between the read and the wait is never missed. Unrelated writes only cause a re-read; the
  waiter keeps waiting until a matching event or the timeout. Writes by other processes on the
  same file are not noticed until the timeout (one federation process owns a file).
* Leases: deadlines are wall-clock (`clock`, default `time.time`) so they survive a restart; a
  lease past its deadline is dead at once for `put` and `keepalive`, and its keys are deleted
  by the next `expire_leases()` (the server calls it periodically). `renew_all_leases()` sets
  every deadline to max(deadline, now + ttl): the server calls it at start, so an outage
  longer than a ttl does not expire every lease before any holder could renew it. `open()`
  does not do it, because `isthmus federation token create` opens the same file while the
  federation runs, and must not keep dead clusters alive.
* Keys are TEXT compared with SQLite's BINARY collation (memcmp of UTF-8), which is the same
  order as Python's `sorted()` on str; a prefix scan is `key >= p AND key < next(p)` where
  next(p) is the smallest string above every string starting with p, so '%' and '_' in keys
  mean nothing special.
* Bounds: key non-empty, valid UTF-8 without NUL, at most 1 KiB encoded; value at most 1 MiB.
* The file (and its parent directory, when created) is made owner-only: it holds token hashes.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from federation.errors import CompactedError, FutureRevisionError, StoreError
from federation.store.base import KV, Event

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
    key TEXT NOT NULL,
    value BLOB
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl REAL NOT NULL,
    deadline REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0), ('compacted', 0);
"""


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix`; None if there
    is no such bound (empty prefix, or only U+10FFFF characters)."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop()) + 1
        if 0xD800 <= c <= 0xDFFF:  # surrogates cannot be stored; skip past them
            c = 0xE000
        if c <= 0x10FFFF:
            return "".join(chars) + chr(c)
    return None


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise StoreError(f"key {key!r}: expected str, got {type(key).__name__}")
    if not key:
        raise StoreError("key '': keys must not be empty")
    if "\x00" in key:
        raise StoreError(f"key {key[:80]!r}: keys must not contain NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(f"key {key[:80]!r}: not valid UTF-8 (lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise StoreError(f"key {key[:80]!r}...: {size} bytes, at most {MAX_KEY_BYTES}")
    return key


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise StoreError(f"prefix {prefix!r}: expected str, got {type(prefix).__name__}")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"prefix {prefix[:80]!r}: not valid UTF-8 (lone surrogate)") from None
    return prefix


def _prefix_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = _prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class SqliteStore:
    """The default, embedded `Store`. `clock` gives wall-clock seconds for lease deadlines."""

    shared = False  # one federation process owns the file

    async def describe(self) -> dict:
        return {"kind": "sqlite", "path": self.path}

    def __init__(
        self,
        path: str,
        *,
        history: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history < 1:
            raise StoreError(f"history {history}: must keep at least one event")
        self.path = path
        self.history = history
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # touched only on the worker thread
        self._changed = asyncio.Event()
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            raise StoreError(f"store {self.path}: already open")
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    def _open_sync(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
        except OSError as e:
            raise StoreError(f"store {self.path}: cannot create the database file ({e})") from e
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {self.path}: cannot enable WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        executor = self._executor
        try:
            await self._run(self._close_sync)
        finally:
            self._closed = True
            self._executor = None
            executor.shutdown(wait=True)
            self._wake()  # waiters re-check and raise StoreError("closed")

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None or self._closed:
            raise StoreError(f"store {self.path}: not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from e

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _write(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self._run(self._txn, fn, *args)
        finally:
            self._wake()  # harmless if the write failed: waiters just re-read

    # ---- worker-thread helpers -----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.path}: not open")
        return self._db

    def _txn(self, fn: Callable[..., _T], *args: Any) -> _T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        db = self._conn()
        db.execute("BEGIN")
        try:
            return fn(db, *args)
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    @staticmethod
    def _meta(db: sqlite3.Connection, name: str) -> int:
        return int(db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

    def _append(self, db: sqlite3.Connection, type_: str, key: str, value: bytes | None) -> int:
        """Bump the revision, log the event, compact old history. Returns the new revision."""
        rev = self._meta(db, "revision") + 1
        db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        db.execute(
            "INSERT INTO events(revision, type, key, value) VALUES (?, ?, ?, ?)",
            (rev, type_, key, value),
        )
        floor = rev - self.history
        if floor > 0:
            db.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'", (floor,))
        return rev

    def _delete_key(self, db: sqlite3.Connection, key: str) -> KV | None:
        row = db.execute(
            "SELECT value, mod_revision, lease FROM kv WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        db.execute("DELETE FROM kv WHERE key = ?", (key,))
        self._append(db, "delete", key, None)
        return KV(key, bytes(row[0]), row[1], row[2])

    def _end_lease(self, db: sqlite3.Connection, lease: int) -> None:
        keys = [
            r[0] for r in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))
        ]
        for key in keys:
            self._delete_key(db, key)
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    # ---- reads -------------------------------------------------------------------------------

    async def revision(self) -> int:
        return await self._run(self._read, lambda db: self._meta(db, "revision"))

    async def get(self, key: str) -> KV | None:
        _check_key(key)

        def get(db: sqlite3.Connection) -> KV | None:
            row = db.execute(
                "SELECT value, mod_revision, lease FROM kv WHERE key = ?", (key,)
            ).fetchone()
            return None if row is None else KV(key, bytes(row[0]), row[1], row[2])

        return await self._run(self._read, get)

    async def range(self, prefix: str) -> tuple[list[KV], int]:
        where, params = _prefix_clause(_check_prefix(prefix))

        def range_(db: sqlite3.Connection) -> tuple[list[KV], int]:
            rows = db.execute(
                f"SELECT key, value, mod_revision, lease FROM kv WHERE {where} ORDER BY key",
                params,
            ).fetchall()
            return [KV(k, bytes(v), m, le) for k, v, m, le in rows], self._meta(db, "revision")

        return await self._run(self._read, range_)

    # ---- writes ------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        _check_key(key)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise StoreError(f"key {key!r}: value must be bytes, got {type(value).__name__}")
        value = bytes(value)
        if len(value) > MAX_VALUE_BYTES:
            raise StoreError(f"key {key!r}: value is {len(value)} bytes, at most {MAX_VALUE_BYTES}")
        if lease is not None and (isinstance(lease, bool) or not isinstance(lease, int)):
            raise StoreError(f"key {key!r}: lease {lease!r} is not a lease id")
        now = self._clock()

        def put(db: sqlite3.Connection) -> int:
            if lease is not None:
                row = db.execute("SELECT deadline FROM leases WHERE id = ?", (lease,)).fetchone()
                if row is None or row[0] <= now:
                    raise StoreError(f"key {key!r}: lease {lease} is unknown or expired")
            rev = self._append(db, "put", key, value)
            db.execute(
                "INSERT INTO kv(key, value, create_revision, mod_revision, lease) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value = excluded.value, mod_revision = excluded.mod_revision, "
                "lease = excluded.lease",
                (key, value, rev, rev, lease),
            )
            return rev

        return await self._write(put)

    async def delete(self, key: str) -> KV | None:
        _check_key(key)
        return await self._write(self._delete_key, key)

    async def grant_lease(self, ttl: float) -> int:
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not (math.isfinite(ttl) and ttl > 0)
        ):
            raise StoreError(f"lease ttl {ttl!r}: must be a positive number of seconds")
        deadline = self._clock() + ttl

        def grant(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO leases(ttl, deadline) VALUES (?, ?)", (float(ttl), deadline)
            )
            return int(cur.lastrowid)

        return await self._write(grant)

    async def keepalive(self, lease: int) -> bool:
        now = self._clock()

        def keepalive(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE leases SET deadline = ? + ttl WHERE id = ? AND deadline > ?",
                (now, lease, now),
            )
            return cur.rowcount == 1

        return await self._write(keepalive)

    async def revoke(self, lease: int) -> None:
        await self._write(self._end_lease, lease)

    async def renew_all_leases(self) -> int:
        now = self._clock()

        def renew(db: sqlite3.Connection) -> int:
            cur = db.execute("UPDATE leases SET deadline = max(deadline, ? + ttl)", (now,))
            return cur.rowcount

        return await self._write(renew)

    async def expire_leases(self) -> int:
        now = self._clock()

        def expire(db: sqlite3.Connection) -> int:
            ids = [
                r[0]
                for r in db.execute("SELECT id FROM leases WHERE deadline <= ? ORDER BY id", (now,))
            ]
            for lease in ids:
                self._end_lease(db, lease)
            return len(ids)

        return await self._write(expire)

    # ---- watch -------------------------------------------------------------------------------

    async def events(self, prefix: str, after: int, timeout: float) -> list[Event]:
        where, params = _prefix_clause(_check_prefix(prefix))
        sql = (
            "SELECT revision, type, key, value FROM events "
            f"WHERE revision > ? AND {where} ORDER BY revision"
        )

        def read(db: sqlite3.Connection) -> list[Event]:
            compacted = self._meta(db, "compacted")
            if after < compacted:
                raise CompactedError(after, compacted + 1)
            current = self._meta(db, "revision")
            if after > current:
                raise FutureRevisionError(after, current)
            rows = db.execute(sql, (after, *params)).fetchall()
            return [Event(t, k, None if v is None else bytes(v), r) for r, t, k, v in rows]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            changed = self._changed  # captured before reading: no lost wake-ups
            if self._closed:
                raise StoreError(f"store {self.path}: closed")
            found = await self._run(self._read, read)
            if found:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return []
