"""The distributed store: etcd v3, through the `aetcd` client (asyncio, grpc.aio).

Keys follow flannel's layout under a prefix (default `/weft/network`;
`/coreos.com/network` is flannel's own):

    <prefix>/config                  the network config JSON
    <prefix>/subnets/10.244.3.0-24   {"PublicIP": ..., "BackendType": ..., "BackendData": ...}

Expiry is etcd's: every lease key is attached to an etcd lease with the lease's TTL, so
etcd deletes it (and every watcher sees a DELETE) when its host stops renewing.

- create: grant an etcd lease, then one transaction "if create_revision(key) == 0 then
  put(key, value, lease)"; whoever loses the race gets None (and its etcd lease revoked).
- renew: re-grant. Read the key, check the record's PublicIP is ours, grant a new etcd
  lease, then put the (possibly changed) value with it in a transaction guarded by the
  key's mod_revision; the old etcd lease is revoked afterwards. A renewal is a PUT event,
  so a changed BackendData (a restarted host) reaches every peer.
- expiration: filled from the etcd lease (now + granted TTL on create/renew; a
  LeaseTimeToLive query for leases read by list or watch; 0.0 when it cannot be asked).
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc
import grpc.aio

from weft.config import IPAddress, IPNetwork
from weft.constants import CONFIG_KEY, DEFAULT_ETCD_PREFIX, SUBNETS_DIR
from weft.errors import LeaseNotFound, StoreError, StoreUnavailable, UsageError, WatchCompacted
from weft.events import EventKind, LeaseEvent
from weft.lease import Lease, parse_subnet_key, subnet_key
from weft.store.base import lease_or_none

log = logging.getLogger("weft.store.etcd")

T = TypeVar("T")

DEFAULT_PORT = 2379
# Per request. A healthy etcd answers in milliseconds; a request caught on a follower when
# the leader dies waits until this runs out (measured: the whole timeout), then the next
# endpoint is tried, by when a new leader is normally elected (~1 s with etcd defaults).
DEFAULT_TIMEOUT = 3.0
_WATCH_BACKOFF_FIRST = 0.1
_WATCH_BACKOFF_MAX = 5.0
# Renewals that lose a race (another write to the key between read and transaction).
_RENEW_ATTEMPTS = 10
# TimeToLive queries in flight at once when filling expirations for a list.
_TTL_QUERIES = 32

_CHANNEL_OPTIONS: dict[str, Any] = {
    # Notice a dead peer on an idle watch stream. etcd refuses pings more often than
    # every 5 s (--grpc-keepalive-min-time), so stay above that.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # A list of many leases can exceed grpc's 4 MiB default; etcd itself allows 2 GiB.
    "grpc.max_receive_message_length": 2**31 - 1,
}

# etcd cancels requests and watches served by a member that has no leader, so a member
# cut off from its cluster sends us to another one instead of going quiet.
_REQUIRE_LEADER = ("hasleader", "true")

_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


# --- the URL: pure --------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_etcd_url(url: str) -> tuple[list[Endpoint], bool]:
    """`etcd://h1:2379,h2:2379` or `etcds://...` -> (endpoints, tls). Raises UsageError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise UsageError(f"store URL {url!r}: expected etcd://host:port[,host:port...] or etcds://")
    if "/" in rest or "?" in rest or "#" in rest:
        raise UsageError(
            f"store URL {url!r}: no path or query allowed after the endpoints; "
            "give the key prefix with --etcd-prefix"
        )
    if "@" in rest:
        raise UsageError(
            f"store URL {url!r}: do not put credentials in the URL; "
            "use --etcd-username and --etcd-password"
        )
    endpoints = [_parse_endpoint(url, item) for item in rest.split(",") if item.strip()]
    if not endpoints:
        raise UsageError(f"store URL {url!r} names no etcd endpoint, e.g. etcd://127.0.0.1:2379")
    return endpoints, scheme == "etcds"


def _parse_endpoint(url: str, item: str) -> Endpoint:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, close, port_text = item[1:].partition("]")
        if not close or (port_text and not port_text.startswith(":")):
            raise UsageError(f"store URL {url!r}: endpoint {item!r} is not [address]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise UsageError(f"store URL {url!r}: endpoint {item!r} has no host")
    if not port_text:
        return Endpoint(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"store URL {url!r}: endpoint {item!r} has no valid port (1-65535)")
    return Endpoint(host, int(port_text))


def normalize_prefix(prefix: str) -> str:
    """`/coreos.com/network/` -> `/coreos.com/network`. Raises UsageError."""
    cleaned = prefix.strip().rstrip("/")
    if not cleaned or any(ch.isspace() for ch in cleaned):
        raise UsageError(
            f"etcd prefix {prefix!r} is not a key path like {DEFAULT_ETCD_PREFIX} "
            "(flannel uses /coreos.com/network)"
        )
    return cleaned


def _held_by(value: bytes, public_ip: IPAddress) -> bool:
    """Whether a stored lease record names `public_ip` (a record that doesn't parse: no)."""
    try:
        data = json.loads(value)
        return isinstance(data, dict) and ipaddress.ip_address(data["PublicIP"]) == public_ip
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False


# --- the client: aetcd with a channel we open ------------------------------------------


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd's client, connecting over TLS when asked and requiring a leader."""

    # Set by aetcd's __init__; declared for the type checker.
    _connected: asyncio.Event
    _is_connecting: bool
    _connect_wait_timeout: float

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        super().__init__(
            host=endpoint.host,
            port=endpoint.port,
            username=username,
            password=password,
            timeout=timeout,
            options=_CHANNEL_OPTIONS,
        )
        self.endpoint = endpoint
        self._weft_credentials = credentials

    async def connect(self) -> None:
        # This mirrors aetcd 1.0.0's Client.connect (pinned), which can only open
        # insecure channels: same attributes, a channel of our choosing.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = str(self.endpoint)
            options = list(self._options.items())
            if self._weft_credentials is not None:
                channel = grpc.aio.secure_channel(target, self._weft_credentials, options)
            else:
                channel = grpc.aio.insecure_channel(target, options)
            metadata: list[tuple[str, str]] = [_REQUIRE_LEADER]
            try:
                if self._username is not None:
                    auth = aetcd.rpc.AuthStub(channel)
                    resp = await auth.Authenticate(
                        aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password),
                        timeout=self._timeout,
                        metadata=tuple(metadata),
                    )
                    metadata.append(("token", resp.token))
            except BaseException:
                await channel.close()
                raise
            self.channel = channel
            self.metadata = tuple(metadata)
            self.kvstub = aetcd.rpc.KVStub(channel)
            self.clusterstub = aetcd.rpc.ClusterStub(channel)
            self.leasestub = aetcd.rpc.LeaseStub(channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


@dataclass
class _Connection:
    """One client, and how many requests use it: a client that failed is closed only
    once nobody uses it (closing a grpc.aio channel cancels the calls still on it)."""

    client: _Client
    users: int = 0
    stale: bool = False


_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError,
    grpc.RpcError,
    TimeoutError,
)


class _StreamEnded(Exception):
    """The watch stream closed without saying why: reconnect."""


_WATCH_INTERRUPTIONS: tuple[type[BaseException], ...] = (*_LIBRARY_ERRORS, _StreamEnded)


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc
    cause = exc.__cause__
    return cause if isinstance(cause, grpc.aio.AioRpcError) else None


def _is_retryable(exc: BaseException) -> bool:
    """Whether `exc` means "this endpoint cannot serve us now" (as opposed to a refusal)."""
    if isinstance(
        exc,
        (
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
            aetcd.exceptions.WatchTimeoutError,
            TimeoutError,
        ),
    ):
        return True
    rpc_error = _rpc_error(exc)
    return rpc_error is not None and rpc_error.code() in _RETRYABLE_CODES


def _is_expired_token(exc: BaseException) -> bool:
    rpc_error = _rpc_error(exc)
    return (
        isinstance(exc, aetcd.exceptions.UnauthenticatedError)
        or (rpc_error is not None and rpc_error.code() is grpc.StatusCode.UNAUTHENTICATED)
    ) and "token" in _detail(exc)


def _detail(exc: BaseException) -> str:
    rpc_error = _rpc_error(exc)
    if rpc_error is not None:
        return f"{rpc_error.code().name}: {rpc_error.details()}"
    return str(exc) or type(exc).__name__


# --- the store --------------------------------------------------------------------------


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
        self._clock = clock
        self._index = 0
        self._conn: _Connection | None = None
        self._stale: list[_Connection] = []
        self._subnets = f"{self.prefix}/{SUBNETS_DIR}/".encode()
        self._config_key = f"{self.prefix}/{CONFIG_KEY}".encode()

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
            credentials = _tls_credentials(cafile, certfile, keyfile)
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

    def __repr__(self) -> str:
        scheme = "etcds" if self._credentials else "etcd"
        hosts = ",".join(map(str, self.endpoints))
        return f"EtcdLeaseStore('{scheme}://{hosts}', prefix={self.prefix!r})"

    # --- connections --------------------------------------------------------------------

    def _acquire(self) -> _Connection:
        if self._conn is None:
            endpoint = self.endpoints[self._index % len(self.endpoints)]
            client = _Client(
                endpoint, self._credentials, self._username, self._password, self._timeout
            )
            self._conn = _Connection(client)
        self._conn.users += 1
        return self._conn

    def _retire(self, conn: _Connection, *, next_endpoint: bool = True) -> None:
        """Stop handing out a connection that failed; the next request opens a new one (on
        the next endpoint). It is closed once its last user lets go."""
        conn.stale = True
        if conn is self._conn:
            self._conn = None
            if next_endpoint:
                self._index += 1

    async def _release(self, conn: _Connection) -> None:
        conn.users -= 1
        if not conn.stale:
            return
        if conn.users > 0:
            if conn not in self._stale:
                self._stale.append(conn)
            return
        if conn in self._stale:
            self._stale.remove(conn)
        with contextlib.suppress(*_LIBRARY_ERRORS, RuntimeError):
            await conn.client.close()

    async def _call(self, what: str, op: Callable[[_Client], Awaitable[T]]) -> T:
        """Run `op` on a connected client; try each endpoint once before giving up."""
        failures: list[str] = []
        reauthenticated = False
        while len(failures) < len(self.endpoints):
            conn = self._acquire()
            try:
                return await op(conn.client)
            except _LIBRARY_ERRORS as exc:
                if _is_expired_token(exc) and not reauthenticated:
                    # Simple tokens expire (etcd --auth-token-ttl); a new connection
                    # authenticates again.
                    reauthenticated = True
                    self._retire(conn, next_endpoint=False)
                    continue
                if not _is_retryable(exc):
                    raise StoreError(
                        f"etcd at {conn.client.endpoint} refused to {what}: {_detail(exc)}"
                        f"{self._hint(_detail(exc))}"
                    ) from None
                failures.append(f"{conn.client.endpoint}: {_detail(exc)}")
                self._retire(conn)
            finally:
                await self._release(conn)
        raise StoreUnavailable(
            f"cannot reach etcd to {what} ({'; '.join(failures)}); check that etcd is "
            f"running and reachable at {', '.join(map(str, self.endpoints))}"
            f"{self._hint(' '.join(failures))}"
        )

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
            with contextlib.suppress(*_LIBRARY_ERRORS, RuntimeError):
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

    def _key(self, subnet: IPNetwork) -> bytes:
        return f"{self.prefix}/{subnet_key(subnet)}".encode()

    async def list_leases(self) -> tuple[list[Lease], int]:
        async def op(client: _Client) -> tuple[list[Lease], int]:
            result = await client.get_prefix(self._subnets)
            records = [(kv.key, kv.value, kv.lease) for kv in result.kvs]
            expirations = await self._expirations(client, [r[2] for r in records])
            leases = [
                lease
                for key, value, lease_id in records
                if (lease := lease_or_none(_text(key), value, expirations.get(lease_id, 0.0)))
            ]
            revision: int = result.header.revision
            return leases, revision

        return await self._call("list leases", op)

    async def _expirations(self, client: _Client, lease_ids: Iterable[int]) -> dict[int, float]:
        """When each etcd lease runs out, from its remaining TTL. Best effort: a lease
        that cannot be asked about is left out (its expiration stays 0.0, unknown)."""
        wanted = sorted({i for i in lease_ids if i})
        if not wanted:
            return {}
        now = self._clock()
        limit = asyncio.Semaphore(_TTL_QUERIES)
        out: dict[int, float] = {}

        async def one(lease_id: int) -> None:
            async with limit:
                try:
                    info = await client.get_lease_info(lease_id, keys=False)
                except _LIBRARY_ERRORS:
                    return
            ttl = int(info.TTL)
            out[lease_id] = now + ttl if ttl >= 0 else now  # -1: already expired

        async with asyncio.TaskGroup() as group:
            for lease_id in wanted:
                group.create_task(one(lease_id))
        return out

    async def create_lease(self, lease: Lease, ttl: float) -> Lease | None:
        key = self._key(lease.subnet)
        value = lease.to_json().encode()

        async def op(client: _Client) -> Lease | None:
            now = self._clock()
            grant = await client.lease(_ttl_seconds(ttl))
            created, _ = await client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, value, lease=grant.id)],
                failure=[],
            )
            if not created:
                await _revoke_quietly(client, grant.id)
                return None
            return lease.with_expiration(now + int(grant.ttl))

        return await self._call(f"create the lease for {lease.subnet}", op)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        key = self._key(lease.subnet)
        value = lease.to_json().encode()

        async def op(client: _Client) -> Lease:
            for _ in range(_RENEW_ATTEMPTS):
                current = await client.get(key)
                if current is None or not _held_by(current.value, lease.public_ip):
                    raise LeaseNotFound(
                        f"lease for {lease.subnet} ({lease.public_ip}) is gone: it expired or "
                        "another host holds the subnet now"
                    )
                now = self._clock()
                grant = await client.lease(_ttl_seconds(ttl))
                renewed, _ = await client.transaction(
                    compare=[client.transactions.mod(key) == current.mod_revision],
                    success=[client.transactions.put(key, value, lease=grant.id)],
                    failure=[],
                )
                if renewed:
                    if current.lease:
                        await _revoke_quietly(client, current.lease)
                    return lease.with_expiration(now + int(grant.ttl))
                await _revoke_quietly(client, grant.id)
            raise StoreError(
                f"could not renew the lease for {lease.subnet}: the key changed under every "
                f"one of {_RENEW_ATTEMPTS} attempts"
            )

        return await self._call(f"renew the lease for {lease.subnet}", op)

    async def delete_lease(self, subnet: IPNetwork) -> None:
        key = self._key(subnet)

        async def op(client: _Client) -> None:
            deleted = await client.delete(key, prev_kv=True)
            if deleted is not None and deleted.prev_kv is not None and deleted.prev_kv.lease:
                await _revoke_quietly(client, deleted.prev_kv.lease)

        await self._call(f"delete the lease for {subnet}", op)

    # --- watch --------------------------------------------------------------------------

    async def watch(self, since: int) -> AsyncGenerator[list[LeaseEvent], None]:
        last = since  # the revision of the last event received: resume after it
        backoff = _WATCH_BACKOFF_FIRST
        while True:
            conn = self._acquire()
            failure: BaseException | None = None
            watcher: Any = None
            try:
                await conn.client.connect()
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
                while True:
                    events, reached, error = await self._next_batch(conn.client, queue, last)
                    last = max(last, reached)
                    if events:
                        yield events
                    if error is not None:
                        raise error
            except aetcd.exceptions.RevisionCompactedError as exc:
                raise WatchCompacted(last, int(exc.compacted_revision)) from None
            except _WATCH_INTERRUPTIONS as exc:
                if not isinstance(exc, _StreamEnded) and not _is_retryable(exc):
                    raise StoreError(
                        f"etcd at {conn.client.endpoint} refused to watch {self.prefix}: "
                        f"{_detail(exc)}{self._hint(_detail(exc))}"
                    ) from None
                failure = exc
                self._retire(conn)
            finally:
                if watcher is not None:
                    with contextlib.suppress(*_LIBRARY_ERRORS):
                        await watcher.shutdown()
                await self._release(conn)
            log.warning(
                "etcd watch interrupted; reconnecting",
                extra={
                    "endpoint": str(conn.client.endpoint),
                    "error": _detail(failure),
                    "resume_revision": last + 1,
                    "retry_in": round(backoff, 2),
                },
            )
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    async def _next_batch(
        self, client: _Client, queue: asyncio.Queue[Any], after: int
    ) -> tuple[list[LeaseEvent], int, BaseException | None]:
        """Everything the stream delivered so far (waiting for at least one item) past
        revision `after`: the events, the highest revision among them (records that don't
        parse included), and the error that ended the stream, if one came after them."""
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        raw: list[Any] = []
        error: BaseException | None = None
        for item in items:
            if isinstance(item, BaseException):
                error = item
                break
            if item is None:  # the stream closed without an error
                error = _StreamEnded("the watch stream closed")
                break
            if int(item.kv.mod_revision) > after:
                raw.append(item)
        lease_ids = [ev.kv.lease for ev in raw if ev.kind == "PUT"]
        expirations = await self._expirations(client, lease_ids)
        events = [
            event for ev in raw if (event := self._to_event(ev, expirations)) is not None
        ]
        reached = max((int(ev.kv.mod_revision) for ev in raw), default=0)
        return events, reached, error

    def _to_event(self, ev: Any, expirations: dict[int, float]) -> LeaseEvent | None:
        key = _text(ev.kv.key)
        try:
            subnet = parse_subnet_key(key)
        except ValueError:
            log.warning("skipping lease key that does not parse", extra={"key": key})
            return None
        revision = int(ev.kv.mod_revision)
        if ev.kind == "DELETE":
            return LeaseEvent(EventKind.DELETE, subnet, revision)
        lease = lease_or_none(key, ev.kv.value, expirations.get(ev.kv.lease, 0.0))
        if lease is None:
            return None
        return LeaseEvent(EventKind.PUT, subnet, revision, lease)


# --- helpers ----------------------------------------------------------------------------


def _ttl_seconds(ttl: float) -> int:
    # etcd TTLs are whole seconds (and etcd raises anything below its minimum, ~2 s).
    return max(1, math.ceil(ttl))


def _text(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")


async def _revoke_quietly(client: _Client, lease_id: int) -> None:
    # Best effort: an etcd lease nobody revokes runs out by itself.
    with contextlib.suppress(*_LIBRARY_ERRORS):
        await client.revoke_lease(lease_id)


def _tls_credentials(
    cafile: str | None, certfile: str | None, keyfile: str | None
) -> grpc.ChannelCredentials:
    if (certfile is None) != (keyfile is None):
        raise UsageError(
            "a client certificate needs both --etcd-certfile and --etcd-keyfile"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cafile, "--etcd-cafile"),
        private_key=_read(keyfile, "--etcd-keyfile"),
        certificate_chain=_read(certfile, "--etcd-certfile"),
    )


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
