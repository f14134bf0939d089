"""The distributed store: etcd v3, through the `aetcd` client (asyncio, grpc.aio).

Keys follow flannel's layout under a prefix (default `/weft/network`;
`/coreos.com/network` is flannel's own):

    <prefix>/config                  the network config JSON
    <prefix>/subnets/10.244.3.0-24   {"PublicIP": ..., "BackendType": ..., "BackendData": ...}

Expiry is etcd's: every lease key is attached to an etcd lease with the lease's TTL, so
etcd deletes it (and every watcher sees a DELETE) when its host stops renewing.

- create: grant an etcd lease, then one transaction "if create_revision(key) == 0 then
  put(key, value, lease)"; whoever loses the race gets None (and its etcd lease revoked).
- renew: two requests, however many hosts there are. A keep-alive of the etcd lease this
  store granted (its id remembered from create/renew), then one transaction "if the key
  is still attached to that etcd lease then put(value, same lease)". A renewal is a PUT
  event, so a changed BackendData (a restarted host) reaches every peer; watchers see
  that nothing else changed and apply nothing. When the id is not known (a restarted
  agent) or the lease ran out, the slow path: read the key, check the record's PublicIP
  is ours, grant a new etcd lease, put guarded by the key's mod_revision, revoke the old.
- expiration: carried in the record ("Expiration", seconds since the epoch, written by
  the holder on create and renew), so neither list nor watch asks etcd about any lease
  (a query per lease made every renewal cost 4 + N requests). etcd's TTL, not this
  field, removes a lease; a record without it shows expiration 0.0 (unknown).
- watch(since): one etcd watch on `<prefix>/subnets/`; events after `since` arrive in
  revision order and are yielded in the batches etcd sends them in. The etcd watch starts
  at `since` itself (its events dropped): etcd reports a compaction only to a watch that
  starts below the compaction revision, and compacting at since+1 would otherwise swallow
  a deletion made at since+1 silently.

Faults, decided here so the agent's code stays simple:
- A request that cannot reach a member (refused, timed out after 3 s, member without a
  leader: every request carries etcd's `hasleader` requirement) is retried once on each
  other endpoint; when all fail it raises StoreUnavailable naming the endpoints and what
  each said. The caller retries.
- A watch never raises StoreUnavailable: when its stream breaks it reconnects by itself
  (next endpoint, backoff 0.1 s doubling to 5 s, one warning line per attempt) and resumes
  from the revision after the last event it yielded, so nothing is lost or repeated. If
  that history was compacted meanwhile it raises WatchCompacted; resync with a list.
- Anything else etcd refuses (bad credentials, permission denied on the prefix) is a
  StoreError with etcd's reason, not retried.

Why aetcd: it is asyncio-native (the agent runs one asyncio TaskGroup) and maintained
(1.0.0, 2026). Alternatives: `etcd3` (python-etcd3) has had no release since 2020 and its
generated code does not load with protobuf >= 4; `etcd-sdk-python` is its maintained but
synchronous fork (every call would need a thread); `etcd3gw` speaks to the HTTP/JSON
gateway with synchronous requests and long-polls watches. aetcd 1.0.0 opens only
plaintext channels to one endpoint, so `_Client.connect` opens the gRPC channel itself
(TLS credentials when asked) and this module rotates through the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc
import grpc.aio

from weft.core import untrusted_json
from weft.core.config import IPAddress, IPNetwork
from weft.core.constants import (
    CONFIG_KEY,
    DEFAULT_ETCD_PREFIX,
    MAX_RECORD_BYTES,
    MAX_WATCH_BATCH,
    SUBNETS_DIR,
)
from weft.core.errors import (
    LeaseNotFound,
    StoreError,
    StoreRewound,
    StoreUnavailable,
    UsageError,
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
from weft.store.base import RejectedRecords
from weft.store.etcd.client import (
    DEFAULT_TIMEOUT,
    LIBRARY_ERRORS,
    WATCH_INTERRUPTIONS,
    Client,
    Connection,
    StreamEnded,
    detail,
    is_expired_token,
    is_retryable,
    revoke_quietly,
    tls_credentials,
)
from weft.store.etcd.url import Endpoint, normalize_prefix, parse_etcd_url

log = logging.getLogger("weft.store.etcd")

T = TypeVar("T")

_WATCH_BACKOFF_FIRST = 0.1
_WATCH_BACKOFF_MAX = 5.0
# Renewals that lose a race (another write to the key between read and transaction).
_RENEW_ATTEMPTS = 10

class _LeaseCompare(aetcd.transactions.BaseCompare):  # type: ignore[misc]
    """'the key is attached to etcd lease N' (etcd >= 3.3; aetcd has no helper for it)."""

    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = self.value


def _record(lease: Lease, expiration: float) -> bytes:
    data = json.loads(lease.to_json())
    data["Expiration"] = round(expiration, 3)
    return json.dumps(data, separators=(",", ":")).encode()


def _expiration(value: bytes) -> float:
    """The expiry a record carries (0.0 when it has none or it is not a number)."""
    if len(value) > MAX_RECORD_BYTES:
        return 0.0  # not read at all: the record is refused unparsed
    try:
        data = untrusted_json.loads(value)  # bounded: the record is anyone's
        found = data.get("Expiration", 0.0) if isinstance(data, dict) else 0.0
        return float(found) if isinstance(found, int | float) and math.isfinite(found) else 0.0
    except (ValueError, TypeError):
        return 0.0



def _held_by(key: str, value: bytes, lease: Lease) -> bool:
    """Whether a stored lease record is `lease`'s holder's (weft.core.lease.held_by; a
    record that doesn't parse: no)."""
    try:
        return len(value) <= MAX_RECORD_BYTES and held_by(parse_lease(key, value), lease)
    except LeaseFormatError:
        return False


class EtcdLeaseStore:
    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        prefix: str = DEFAULT_ETCD_PREFIX,
        credentials: grpc.ChannelCredentials | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not endpoints:
            raise UsageError("an etcd store needs at least one endpoint")
        if (username is None) != (password is None):
            raise UsageError("etcd authentication needs both --etcd-username and --etcd-password")
        self.endpoints = list(endpoints)
        self.prefix = normalize_prefix(prefix)
        self._credentials = credentials
        self._username = username
        self._password = password
        self._timeout = timeout
        self._deadline = timeout  # longer during an agent's start (`starting`)
        self._clock = clock
        self._index = 0
        self._conn: Connection | None = None
        self._stale: list[Connection] = []
        self._subnets = f"{self.prefix}/{SUBNETS_DIR}/".encode()
        # The etcd lease (id, granted TTL) of each lease this store holds: a keep-alive
        # renews it with the TTL it was granted with, so a new TTL takes the slow path.
        # Keyed by subnet and holder: a renewal naming another PublicIP is not ours.
        self._grants: dict[tuple[IPNetwork, IPAddress], tuple[int, int]] = {}
        self._config_key = f"{self.prefix}/{CONFIG_KEY}".encode()
        self._rejected = RejectedRecords()
        self._cluster: int | None = None  # the etcd cluster id last seen (a restore: new)
        self._listed: tuple[int, bytes, bytes] | None = None  # (revision, key, value)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> EtcdLeaseStore:
        """`etcd://h:p[,h:p]` (plaintext) or `etcds://...` (TLS: cafile verifies the
        server, else the system's roots; certfile+keyfile authenticate this client)."""
        endpoints, tls = parse_etcd_url(url)
        credentials = None
        if tls:
            credentials = tls_credentials(cafile, certfile, keyfile)
        elif cafile or certfile or keyfile:
            raise UsageError(
                f"TLS files given but the store URL {url!r} is plaintext; "
                "use etcds:// to talk TLS to etcd"
            )
        return cls(
            endpoints,
            prefix=prefix or DEFAULT_ETCD_PREFIX,
            credentials=credentials,
            username=username or None,
            password=password if username else None,
        )

    @property
    def rejected(self) -> RejectedRecords:
        return self._rejected

    def __repr__(self) -> str:
        scheme = "etcds" if self._credentials else "etcd"
        hosts = ",".join(map(str, self.endpoints))
        return f"EtcdLeaseStore('{scheme}://{hosts}', prefix={self.prefix!r})"

    # --- connections --------------------------------------------------------------------

    def _acquire(self) -> Connection:
        if self._conn is None:
            endpoint = self.endpoints[self._index % len(self.endpoints)]
            client = Client(
                endpoint, self._credentials, self._username, self._password, self._timeout
            )
            self._conn = Connection(client)
        self._conn.users += 1
        return self._conn

    def _retire(self, conn: Connection, *, next_endpoint: bool = True) -> None:
        """Stop handing out a connection that failed; the next request opens a new one (on
        the next endpoint). It is closed once its last user lets go."""
        conn.stale = True
        if conn is self._conn:
            self._conn = None
            if next_endpoint:
                self._index += 1

    async def _release(self, conn: Connection) -> None:
        conn.users -= 1
        if not conn.stale:
            return
        if conn.users > 0:
            if conn not in self._stale:
                self._stale.append(conn)
            return
        if conn in self._stale:
            self._stale.remove(conn)
        with contextlib.suppress(*LIBRARY_ERRORS, RuntimeError):
            await conn.client.close()

    async def _call(self, what: str, op: Callable[[Client], Awaitable[T]]) -> T:
        """Run `op` on a connected client; try each endpoint once before giving up."""
        failures: list[str] = []
        reauthenticated = False
        while len(failures) < len(self.endpoints):
            conn = self._acquire()
            conn.client.set_deadline(self._deadline)
            try:
                return await op(conn.client)
            except LIBRARY_ERRORS as exc:
                if is_expired_token(exc) and not reauthenticated:
                    # Simple tokens expire (etcd --auth-token-ttl); a new connection
                    # authenticates again.
                    reauthenticated = True
                    self._retire(conn, next_endpoint=False)
                    continue
                if not is_retryable(exc):
                    raise StoreError(
                        f"etcd at {conn.client.endpoint} refused to {what}: {detail(exc)}"
                        f"{self._hint(detail(exc))}"
                    ) from None
                failures.append(f"{conn.client.endpoint}: {detail(exc)}")
                self._retire(conn)
            finally:
                await self._release(conn)
        raise StoreUnavailable(
            f"cannot reach etcd to {what} ({'; '.join(failures)}); check that etcd is "
            f"running and reachable at {', '.join(map(str, self.endpoints))}"
            f"{self._hint(' '.join(failures))}"
        )

    def starting(self, deadline: float | None) -> None:
        self._deadline = self._timeout if deadline is None else max(self._timeout, deadline)

    def _hint(self, detail: str) -> str:
        """What to do about the usual refusals, in weft's terms."""
        if "user name is empty" in detail:
            return "; etcd requires authentication: give --etcd-username and --etcd-password"
        if "authentication failed" in detail:
            return "; check --etcd-username and --etcd-password"
        if "permission denied" in detail:
            return (f"; grant the user read and write on {self.prefix}/ (etcdctl role "
                    f"grant-permission ROLE --prefix=true readwrite {self.prefix}/)")
        if "CERTIFICATE_VERIFY_FAILED" in detail:
            return ("; the server's certificate is not signed by --etcd-cafile, or does not "
                    "name the host in the URL")
        if self._credentials is None and "Socket closed" in detail:
            return "; if etcd serves TLS, use etcds:// (with --etcd-cafile)"
        if self._credentials is not None and "Handshake read failed" in detail:
            return "; this etcd may not serve TLS: try etcd://"
        return ""

    async def close(self) -> None:
        conns = [*self._stale, *([self._conn] if self._conn else [])]
        self._conn = None
        self._stale = []
        for conn in conns:
            with contextlib.suppress(*LIBRARY_ERRORS, RuntimeError):
                await conn.client.close()

    # --- config -------------------------------------------------------------------------

    async def get_config(self) -> str | None:
        result = await self._call("read the config", lambda c: c.get(self._config_key))
        if result is None:
            return None
        value: bytes = result.value
        return value.decode("utf-8", errors="replace")

    async def put_config(self, text: str) -> None:
        await self._call("write the config", lambda c: c.put(self._config_key, text.encode()))

    # --- leases -------------------------------------------------------------------------

    def _relative(self, key: bytes) -> str:
        """A key below the prefix as the store seam speaks of it (`subnets/...`)."""
        return _text(key).removeprefix(f"{self.prefix}/")

    def _key(self, subnet: IPNetwork, ipv6_subnet: ipaddress.IPv6Network | None = None) -> bytes:
        return f"{self.prefix}/{subnet_key(subnet, ipv6_subnet)}".encode()

    async def list_leases(self) -> tuple[list[Lease], int]:
        async def op(client: Client) -> tuple[list[Lease], int]:
            result = await client.get_prefix(self._subnets)
            rejected = RejectedRecords()
            leases = [
                lease
                for kv in result.kvs
                if (lease := rejected.parse(self._relative(kv.key), kv.value,
                                            _expiration(kv.value)))
            ]
            self._rejected.replace(rejected)
            revision: int = result.header.revision
            # The listing's newest record, when it is the revision itself (a watch from
            # there must replay it: see `watch`).
            newest = max(result.kvs, key=lambda kv: int(kv.mod_revision), default=None)
            self._listed = ((revision, bytes(newest.key), bytes(newest.value or b""))
                            if newest is not None and int(newest.mod_revision) == revision
                            else None)
            return leases, revision

        return await self._call("list leases", op)

    async def create_lease(self, lease: Lease, ttl: float) -> Lease | None:
        key = self._key(lease.subnet, lease.ipv6_subnet)

        async def op(client: Client) -> Lease | None:
            now = self._clock()
            grant = await client.lease(_ttl_seconds(ttl))
            expiration = now + int(grant.ttl)
            created, _ = await client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, _record(lease, expiration),
                                                 lease=grant.id)],
                failure=[],
            )
            if not created:
                await revoke_quietly(client, grant.id)
                return None
            self._grants[lease.subnet, lease.public_ip] = (int(grant.id), _ttl_seconds(ttl))
            return lease.with_expiration(expiration)

        return await self._call(f"create the lease for {lease.subnet}", op)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        key = self._key(lease.subnet, lease.ipv6_subnet)

        async def fast(client: Client, lease_id: int, granted: int) -> Lease | None:
            """One guarded put, then the keep-alive; None when the slow path must decide.
            The put first: a store that refuses our writes must not have its lease kept
            alive by the keep-alive alone (etcd does not check it against the key's
            permissions), or a refused host would hold its subnet with no renewal."""
            now = self._clock()
            expiration = now + granted
            try:
                renewed, _ = await client.transaction(
                    compare=[_LeaseCompare(key) == lease_id],
                    success=[client.transactions.put(key, _record(lease, expiration),
                                                     lease=lease_id)],
                    failure=[],
                )
            except LIBRARY_ERRORS as exc:
                if is_retryable(exc) or is_expired_token(exc):
                    raise
                return None  # refused: the slow path reads first (a record gone is said so)
            if not renewed:
                return None  # the etcd lease ran out: its key is gone (or someone else's)
            reply = await client.refresh_lease(lease_id)
            if reply is None or int(reply.TTL) <= 0:
                return None
            return lease.with_expiration(now + int(reply.TTL))

        async def op(client: Client) -> Lease:
            known = self._grants.get((lease.subnet, lease.public_ip))
            if known is not None and known[1] == _ttl_seconds(ttl):
                renewed = await fast(client, known[0], known[1])
                if renewed is not None:
                    return renewed
                self._grants.pop((lease.subnet, lease.public_ip), None)
            for _ in range(_RENEW_ATTEMPTS):
                current = await client.get(key)
                if current is None or not _held_by(self._relative(key), current.value,
                                                   lease):
                    raise LeaseNotFound(
                        f"lease for {lease.subnet} ({lease.public_ip}) is gone: it expired or "
                        "another host holds the subnet now"
                    )
                now = self._clock()
                grant = await client.lease(_ttl_seconds(ttl))
                expiration = now + int(grant.ttl)
                try:
                    renewed, _ = await client.transaction(
                        compare=[client.transactions.mod(key) == current.mod_revision],
                        success=[client.transactions.put(key, _record(lease, expiration),
                                                         lease=grant.id)],
                        failure=[],
                    )
                except LIBRARY_ERRORS:
                    await revoke_quietly(client, grant.id)  # a refusal: no grant left behind
                    raise
                if renewed:
                    if current.lease:
                        await revoke_quietly(client, current.lease)
                    self._grants[lease.subnet, lease.public_ip] = (int(grant.id), _ttl_seconds(ttl))
                    return lease.with_expiration(expiration)
                await revoke_quietly(client, grant.id)
            raise StoreError(
                f"could not renew the lease for {lease.subnet}: the key changed under every "
                f"one of {_RENEW_ATTEMPTS} attempts"
            )

        return await self._call(f"renew the lease for {lease.subnet}", op)

    async def restore_lease(self, lease: Lease, ttl: float) -> Lease:
        key = self._key(lease.subnet, lease.ipv6_subnet)

        async def op(client: Client) -> Lease:
            now = self._clock()
            grant = await client.lease(_ttl_seconds(ttl))
            expiration = now + int(grant.ttl)
            previous = await client.put(key, _record(lease, expiration), lease=grant.id,
                                        prev_kv=True)
            old = getattr(getattr(previous, "prev_kv", None), "lease", 0)
            if old:  # the writer's etcd lease, if it attached one, has nothing left to keep
                await revoke_quietly(client, old)
            known = self._grants.pop((lease.subnet, lease.public_ip), None)
            if known is not None and known[0] != old:
                await revoke_quietly(client, known[0])
            self._grants[lease.subnet, lease.public_ip] = (int(grant.id), _ttl_seconds(ttl))
            return lease.with_expiration(expiration)

        return await self._call(f"restore the lease for {lease.subnet}", op)

    async def delete_lease(self, subnet: IPNetwork,
                           ipv6_subnet: ipaddress.IPv6Network | None = None) -> None:
        key = self._key(subnet, ipv6_subnet)
        for held in [g for g in self._grants if g[0] == subnet]:
            del self._grants[held]

        async def op(client: Client) -> None:
            deleted = await client.delete(key, prev_kv=True)
            if deleted is not None and deleted.prev_kv is not None and deleted.prev_kv.lease:
                await revoke_quietly(client, deleted.prev_kv.lease)

        await self._call(f"delete the lease for {subnet}", op)

    # --- watch --------------------------------------------------------------------------

    async def _check_position(self, client: Client, last: int) -> None:
        """Raise StoreRewound if etcd is another cluster than the one this store last
        spoke to, or its revision is behind `last` (restored from an older snapshot):
        what came after the snapshot is gone without a DELETE, and a watch from `last`
        would drop the new history's first events as already seen."""
        header = (await client.get_prefix(self._config_key)).header
        cluster, revision = int(header.cluster_id), int(header.revision)
        known, self._cluster = self._cluster, cluster
        if known is not None and cluster != known:
            raise StoreRewound(f"etcd at {client.endpoint} is another cluster ({cluster:x}, "
                               f"was {known:x}): a new or restored cluster")
        if revision < last:
            raise StoreRewound(f"etcd at {client.endpoint} is at revision {revision}, behind "
                               f"revision {last} this watch had seen: restored from an older "
                               "snapshot?")

    async def watch(self, since: int) -> AsyncGenerator[list[LeaseEvent], None]:
        last = since  # the revision of the last event received: resume after it
        # The last event received (at `last`), its key and value: a watch from `last` must
        # deliver it again first; another event there is a history that was rewritten (a
        # restore, and a new host's write at the same revision, maybe on the same key).
        last_event: tuple[bytes, bytes] | None = None
        if self._listed is not None and self._listed[0] == since:
            last_event = self._listed[1:]  # from a listing whose newest write is `since`
        backoff = _WATCH_BACKOFF_FIRST
        while True:
            conn = self._acquire()
            failure: BaseException | None = None
            watcher: Any = None
            try:
                await conn.client.connect()
                await self._check_position(conn.client, last)
                queue: asyncio.Queue[Any] = asyncio.Queue()
                # A stream of our own (not the client's shared one), so ending this watch
                # or losing it touches nothing else.
                watcher = aetcd.watcher.Watcher(
                    aetcd.rpc.WatchStub(conn.client.channel),
                    timeout=self._timeout,
                    metadata=conn.client.metadata,
                )
                # From `last`, not last+1, dropping what we already had: etcd only calls a
                # watch compacted when it starts *below* the compaction revision, and a
                # compaction at exactly last+1 removes a deletion made there without a word.
                await watcher.add_callback(
                    self._subnets,
                    queue.put,
                    range_end=aetcd.utils.prefix_range_end(self._subnets),
                    start_revision=max(last, 1),
                )
                backoff = _WATCH_BACKOFF_FIRST
                replay = last_event  # checked against the first event of this stream
                while True:
                    seen = dict(self._rejected.by_key)
                    events, reached, error, newest = await self._next_batch(
                        conn.client, queue, last, replay)
                    replay = None
                    if reached > last:
                        last, last_event = reached, newest
                    # A batch of records that are not leases is yielded empty: the
                    # watcher reports them (see `rejected`).
                    if events or self._rejected.by_key != seen:
                        yield events
                    if error is not None:
                        raise error
            except aetcd.exceptions.RevisionCompactedError as exc:
                raise WatchCompacted(last, int(exc.compacted_revision)) from None
            except WATCH_INTERRUPTIONS as exc:
                if not isinstance(exc, StreamEnded) and not is_retryable(exc):
                    raise StoreError(
                        f"etcd at {conn.client.endpoint} refused to watch {self.prefix}: "
                        f"{detail(exc)}{self._hint(detail(exc))}"
                    ) from None
                failure = exc
                self._retire(conn)
            finally:
                if watcher is not None:
                    with contextlib.suppress(*LIBRARY_ERRORS):
                        await watcher.shutdown()
                await self._release(conn)
            log.warning(
                "etcd watch interrupted; reconnecting",
                extra={
                    "endpoint": str(conn.client.endpoint),
                    "error": detail(failure),
                    "resume_revision": last + 1,
                    "retry_in": round(backoff, 2),
                },
            )
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    async def _next_batch(
        self, client: Client, queue: asyncio.Queue[Any], after: int,
        replay: tuple[bytes, bytes] | None,
    ) -> tuple[list[LeaseEvent], int, BaseException | None, tuple[bytes, bytes] | None]:
        """Everything the stream delivered so far (waiting for at least one item) past
        revision `after`: the events, the highest revision among them (records that don't
        parse included), the error that ended the stream, if one came after them, and the
        last event's key and value. `replay`: the key and value the stream's first event
        must have (it is at `after`; StoreRewound otherwise)."""
        items = [await queue.get()]
        first = items[0]
        if (replay is not None and not isinstance(first, BaseException) and first is not None
                and (int(first.kv.mod_revision) > after
                     or (bytes(first.kv.key), bytes(first.kv.value or b"")) != replay)):
            raise StoreRewound(f"etcd at {client.endpoint} no longer holds the event at "
                               f"revision {after} this watch had seen: its history was "
                               "rewritten (restored from an older snapshot?)")
        while not queue.empty() and len(items) < MAX_WATCH_BATCH:  # the rest: next batch
            items.append(queue.get_nowait())
        raw: list[Any] = []
        error: BaseException | None = None
        for item in items:
            if isinstance(item, BaseException):
                error = item
                break
            if item is None:  # the stream closed without an error
                error = StreamEnded("the watch stream closed")
                break
            if int(item.kv.mod_revision) > after:
                raw.append(item)
        events = [event for ev in raw if (event := self._to_event(ev)) is not None]
        reached = max((int(ev.kv.mod_revision) for ev in raw), default=0)
        newest = (bytes(raw[-1].kv.key), bytes(raw[-1].kv.value or b"")) if raw else None
        return events, reached, error, newest

    def _to_event(self, ev: Any) -> LeaseEvent | None:
        key = self._relative(ev.kv.key)
        revision = int(ev.kv.mod_revision)
        if ev.kind == "DELETE":
            self._rejected.deleted(key)
            try:
                return LeaseEvent(EventKind.DELETE, parse_subnet_key(key), revision)
            except ValueError:
                return None
        lease = self._rejected.parse(key, ev.kv.value, _expiration(ev.kv.value))
        if lease is None:
            return None
        return LeaseEvent(EventKind.PUT, lease.subnet, revision, lease)


def _ttl_seconds(ttl: float) -> int:
    # etcd TTLs are whole seconds (and etcd raises anything below its minimum, ~2 s).
    return max(1, math.ceil(ttl))


def _text(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")
