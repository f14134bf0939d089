"""The embedded store: one SQLite file shared by every agent on one machine.

Why SQLite: the demo, the tests and a single host need a store with transactions and
no server. Every write runs in a `BEGIN IMMEDIATE` transaction, so create-if-absent is
atomic across processes. Every change appends a row to `events`; its rowid is the store
revision, which is what `watch(since)` resumes from. Expired leases are deleted (with a
DELETE event) by whichever process looks first, so an expired lease is gone for everyone.

A watcher sleeps until the file changes (inotify on its directory) or the next lease
expires; it never polls.

The store holds the config (a WireGuard PSK included) and every agent writes it, so it is
root's alone: the directory 0700, the file and SQLite's -wal/-shm 0600 from their creation
(umask set before the first open; SQLite gives side files the database's mode). An
existing file others can write is refused with the fix, one others can read is warned
about: another user who can open the file can hold a lock on -shm that stops every
agent's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv6Network
from pathlib import Path
from typing import TypeVar

from asyncinotify import Inotify, Mask

from weft.core.config import IPNetwork
from weft.core.constants import MAX_WATCH_BATCH
from weft.core.errors import (
    LeaseNotFound,
    PermissionProblem,
    StoreRewound,
    StoreUnavailable,
    WatchCompacted,
)
from weft.core.events import EventKind, LeaseEvent
from weft.core.lease import (
    Lease,
    LeaseFormatError,
    held_by,
    parse_lease,
    parse_subnet_key,
    subnet_key,
)
from weft.store.base import RejectedRecords, record_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, public_ip TEXT, expiration REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT, expiration REAL);
"""

T = TypeVar("T")
log = logging.getLogger("weft.store.sqlite")

# History kept for watchers that reconnect; older events are compacted away.
HISTORY_EVENTS = 10_000


class SqliteLeaseStore:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._rejected = RejectedRecords()
        try:
            _private_place(self.path)
            old_umask = os.umask(0o077)  # SQLite's files and side files 0600 from creation
            try:
                self._db = sqlite3.connect(
                    self.path, timeout=30.0, isolation_level=None, check_same_thread=False
                )
                # A row something else wrote that is not UTF-8 reads as replacement
                # characters (then fails to parse, logged and skipped) instead of failing
                # every query.
                self._db.text_factory = lambda raw: raw.decode("utf-8", errors="replace")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            finally:
                os.umask(old_umask)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open the store file {self.path}: {exc}") from None

    @property
    def rejected(self) -> RejectedRecords:
        return self._rejected

    def __repr__(self) -> str:
        return f"SqliteLeaseStore({str(self.path)!r})"

    # --- plumbing -----------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        return await asyncio.to_thread(self._run_sync, fn, write)

    def _run_sync(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        with self._lock:
            db = self._db
            try:
                # IMMEDIATE takes the write lock up front: no two writers interleave, and
                # expiry purges happen inside the same transaction as what follows.
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    if write:
                        self._purge_expired(db)
                    result = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"store file {self.path}: {exc}") from None

    def _purge_expired(self, db: sqlite3.Connection) -> None:
        now = self._clock()
        rows = db.execute("SELECT key FROM leases WHERE expiration <= ?", (now,)).fetchall()
        for (key,) in rows:
            db.execute("DELETE FROM leases WHERE key IS ?", (key,))
            if key is not None:  # SQLite lets a TEXT PRIMARY KEY be NULL; events' is not
                self._event(db, EventKind.DELETE, key, None, None)

    def _event(
        self, db: sqlite3.Connection, kind: EventKind, key: str, value: str | None,
        expiration: float | None,
    ) -> None:
        cur = db.execute(
            "INSERT INTO events (kind, key, value, expiration) VALUES (?, ?, ?, ?)",
            (kind.value, key, value, expiration),
        )
        rev = cur.lastrowid or 0
        if rev % 1000 == 0:  # compact now and then, not on every write
            cutoff = rev - HISTORY_EVENTS
            if cutoff > 0:
                db.execute("DELETE FROM events WHERE rev <= ?", (cutoff,))
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('compacted', ?)",
                    (str(cutoff),),
                )

    @staticmethod
    def _revision(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    # --- config -------------------------------------------------------------------------

    async def get_config(self) -> str | None:
        def q(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
            return str(row[0]) if row else None

        return await self._run(q)

    async def put_config(self, text: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('config', ?)", (text,))

        await self._run(q, write=True)

    # --- leases -------------------------------------------------------------------------

    async def list_leases(self) -> tuple[list[Lease], int]:
        def q(db: sqlite3.Connection) -> tuple[list[Lease], int]:
            rows = db.execute("SELECT key, value, expiration FROM leases ORDER BY key")
            rejected = RejectedRecords()
            leases = [
                lease
                for key, value, exp in rows.fetchall()
                if (lease := rejected.parse(key, value, exp)) is not None
            ]
            self._rejected.replace(rejected)
            return leases, self._revision(db)

        return await self._run(q, write=True)

    async def create_lease(self, lease: Lease, ttl: float) -> Lease | None:
        def q(db: sqlite3.Connection) -> Lease | None:
            key = lease.key
            if db.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
                return None
            expiration = self._clock() + ttl
            value = lease.to_json()
            db.execute(
                "INSERT INTO leases (key, value, public_ip, expiration) VALUES (?, ?, ?, ?)",
                (key, value, str(lease.public_ip), expiration),
            )
            self._event(db, EventKind.PUT, key, value, expiration)
            return lease.with_expiration(expiration)

        return await self._run(q, write=True)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        def q(db: sqlite3.Connection) -> Lease:
            key = lease.key
            row = db.execute("SELECT value FROM leases WHERE key = ?", (key,)).fetchone()
            if row is None or not _held_by(key, row[0], lease):
                raise LeaseNotFound(
                    f"lease for {lease.subnet} ({lease.public_ip}) is gone: it expired or "
                    "another host holds the subnet now"
                )
            expiration = self._clock() + ttl
            value = lease.to_json()
            db.execute(
                "UPDATE leases SET value = ?, public_ip = ?, expiration = ? WHERE key = ?",
                (value, str(lease.public_ip), expiration, key),
            )
            self._event(db, EventKind.PUT, key, value, expiration)
            return lease.with_expiration(expiration)

        return await self._run(q, write=True)

    async def restore_lease(self, lease: Lease, ttl: float) -> Lease:
        def q(db: sqlite3.Connection) -> Lease:
            key = lease.key
            expiration = self._clock() + ttl
            value = lease.to_json()
            db.execute(
                "INSERT OR REPLACE INTO leases (key, value, public_ip, expiration) "
                "VALUES (?, ?, ?, ?)",
                (key, value, str(lease.public_ip), expiration),
            )
            self._event(db, EventKind.PUT, key, value, expiration)
            return lease.with_expiration(expiration)

        return await self._run(q, write=True)

    async def delete_lease(self, subnet: IPNetwork,
                           ipv6_subnet: IPv6Network | None = None) -> None:
        def q(db: sqlite3.Connection) -> None:
            key = subnet_key(subnet, ipv6_subnet)
            if db.execute("DELETE FROM leases WHERE key = ?", (key,)).rowcount:
                self._event(db, EventKind.DELETE, key, None, None)

        await self._run(q, write=True)

    # --- watch --------------------------------------------------------------------------

    def _changes_since(self, since: int) -> tuple[list[LeaseEvent], int, float | None]:
        """Events after `since` (purging what expired first), the revision they reach,
        and when the next lease expires."""

        def q(db: sqlite3.Connection) -> tuple[list[LeaseEvent], int, float | None]:
            row = db.execute("SELECT value FROM meta WHERE key = 'compacted'").fetchone()
            compacted = int(row[0]) if row else 0
            if since < compacted:
                raise WatchCompacted(since, compacted + 1)
            if since > (current := self._revision(db)):
                # The file was replaced by an older copy (a restored backup): what the
                # watcher saw after `current` may be gone without a deletion.
                raise StoreRewound(f"the store {self.path} is at revision {current}, behind "
                                   f"revision {since} this watch had seen: restored from an "
                                   "older copy?")
            rows = db.execute(
                "SELECT rev, kind, key, value, expiration FROM events WHERE rev > ? "
                "ORDER BY rev LIMIT ?",
                (since, MAX_WATCH_BATCH),
            ).fetchall()
            # A record that doesn't parse is skipped, but the watch still moves past it.
            events = [
                event for row in rows
                if (event := _to_event(self._rejected, *row)) is not None
            ]
            reached = rows[-1][0] if rows else since
            (next_exp,) = db.execute("SELECT min(expiration) FROM leases").fetchone()
            if len(rows) == MAX_WATCH_BATCH:
                next_exp = self._clock()  # a full batch: more are waiting, fetch them now
            return events, reached, next_exp

        return self._run_sync(q, write=True)

    async def watch(self, since: int) -> AsyncIterator[list[LeaseEvent]]:
        with Inotify() as inotify:
            inotify.add_watch(
                self.path.parent, Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.MOVED_TO
            )
            name = self.path.name
            while True:
                seen = dict(self._rejected.by_key)
                events, since, next_exp = await asyncio.to_thread(self._changes_since, since)
                # A batch of records that are not leases is yielded empty: the watcher
                # reports them (see `rejected`).
                if events or self._rejected.by_key != seen:
                    yield events
                timeout = None if next_exp is None else max(0.0, next_exp - self._clock()) + 0.01
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        async for change in inotify:
                            if change.name is not None and str(change.name).startswith(name):
                                break

    async def close(self) -> None:
        with self._lock:
            self._db.close()

    def starting(self, deadline: float | None) -> None:
        pass  # a local file: no request deadline



def _private_place(path: Path) -> None:
    """The store's directory 0700 (made if missing) and its files: none a symlink, of
    another user, or writable by others (refused with the fix); readable by others is
    warned about. The store's own minimal check: a store does not import the host layer,
    whose `files.private_dir` the CLI runs first to check the directories above."""
    old = os.umask(0o077)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    for place, what in [(path.parent, "store directory")] + [
            (path.with_name(path.name + suffix), "store file")
            for suffix in ("", "-wal", "-shm", "-journal")]:
        try:
            info = os.lstat(place)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        fix = "chmod 700" if stat.S_ISDIR(info.st_mode) else "chmod 600"
        if stat.S_ISLNK(info.st_mode):
            raise PermissionProblem(f"{what} {place} is a symlink; weft will not follow it: "
                                    f"remove it (rm {place})")
        if info.st_uid not in (os.geteuid(), 0):
            raise PermissionProblem(f"{what} {place} belongs to uid {info.st_uid}, not to "
                                    f"this user: check who made it, then chown root {place}")
        if mode & 0o022:
            raise PermissionProblem(f"{what} {place} has mode {mode:04o}: others can write "
                                    f"it; fix it with `{fix} {place}`")
        if stat.S_ISDIR(info.st_mode):
            if info.st_uid == os.geteuid() and mode & 0o077:
                os.chmod(place, 0o700)  # ours, but made by an older release: close it
        elif mode & 0o044:
            log.warning("file readable by other users", extra={
                "path": str(place), "mode": f"{mode:04o}", "fix": f"chmod 600 {place}"})


def _to_event(
    rejected: RejectedRecords, rev: int, kind: object, key: object, value: object,
    expiration: object
) -> LeaseEvent | None:
    """One events row as a LeaseEvent (None: not a lease). Its columns hold whatever
    something else wrote there (SQLite keeps any type in any column)."""
    if kind == EventKind.DELETE.value:
        rejected.deleted(key)
        try:
            return LeaseEvent(EventKind.DELETE, parse_subnet_key(record_key(key)), rev)
        except ValueError:
            return None
    lease = rejected.parse(key, "" if value is None else value,
                           0.0 if expiration is None else expiration)
    if lease is None:
        return None
    return LeaseEvent(EventKind.PUT, lease.subnet, rev, lease)


def _held_by(key: str, value: str | bytes, lease: Lease) -> bool:
    """Whether the stored record is `lease`'s holder's (a record that doesn't parse: no)."""
    try:
        return held_by(parse_lease(key, value), lease)
    except LeaseFormatError:
        return False
