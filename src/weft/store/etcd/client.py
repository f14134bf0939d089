"""The etcd client: aetcd with a gRPC channel weft opens itself (TLS, leader required),
and the translation of its failures into "try another endpoint" or "refused"."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc
import grpc.aio

from weft.core.errors import UsageError
from weft.store.etcd.url import Endpoint

# Per request. A healthy etcd answers in milliseconds; a request caught on a follower when
# the leader dies waits until this runs out (measured: the whole timeout), then the next
# endpoint is tried, by when a new leader is normally elected (~1 s with etcd defaults).
DEFAULT_TIMEOUT = 3.0

CHANNEL_OPTIONS: dict[str, Any] = {
    # Notice a dead peer on an idle watch stream. etcd refuses pings more often than
    # every 5 s (--grpc-keepalive-min-time), so stay above that.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # A list of many leases can exceed grpc's 4 MiB default; etcd itself allows 2 GiB.
    "grpc.max_receive_message_length": 2**31 - 1,
    # After an outage grpc waits its reconnect backoff (1 s growing to 120 s) before it tries
    # the address again, and its subchannels (with that backoff) are shared by every channel
    # to the same target, so a new channel waits too: measured, an agent kept failing with
    # "connection refused" for 10 s after etcd was back, and its 6 s lease ran out. Each
    # channel its own subchannels, and a reconnect at least every second.
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1_000,
}

# etcd cancels requests and watches served by a member that has no leader, so a member
# cut off from its cluster sends us to another one instead of going quiet.
REQUIRE_LEADER = ("hasleader", "true")

_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

# What grpc.aio reports, in place of the server's status, when a streaming call's request
# cannot be written because the call already ended (grpc/grpc#36066, so in grpcio 1.85).
# etcd ends a keep-alive or watch stream at once on a member without a leader (we ask for
# `hasleader`), so a renewal or watch there right after the leader died gets this about
# every other time instead of UNAVAILABLE "no leader": not a refusal, nor etcd's word.
_LOCAL_WRITE_FAILURE = (grpc.StatusCode.INTERNAL, "Internal error from Core")
# etcd's own word for a request that ran out of its deadline on the server (a keep-alive
# on a follower whose leader just died, say), which gRPC passes on as UNKNOWN.
_SERVER_DEADLINE = (grpc.StatusCode.UNKNOWN, "context deadline exceeded")

class Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
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
            options=CHANNEL_OPTIONS,
        )
        self.endpoint = endpoint
        self._weft_credentials = credentials

    def set_deadline(self, seconds: float) -> None:
        """The deadline of the requests made from now on (aetcd reads it per request)."""
        self._timeout = seconds

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
            metadata: list[tuple[str, str]] = [REQUIRE_LEADER]
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
class Connection:
    """One client, and how many requests use it: a client that failed is closed only
    once nobody uses it (closing a grpc.aio channel cancels the calls still on it)."""

    client: Client
    users: int = 0
    stale: bool = False


LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError,
    grpc.RpcError,
    TimeoutError,
)


class StreamEnded(Exception):
    """The watch stream closed without saying why: reconnect."""


WATCH_INTERRUPTIONS: tuple[type[BaseException], ...] = (*LIBRARY_ERRORS, StreamEnded)


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc
    cause = exc.__cause__
    return cause if isinstance(cause, grpc.aio.AioRpcError) else None


def is_retryable(exc: BaseException) -> bool:
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
    if rpc_error is None:
        return False
    status = (rpc_error.code(), rpc_error.details())
    return status[0] in _RETRYABLE_CODES or status in (_LOCAL_WRITE_FAILURE, _SERVER_DEADLINE)


def is_expired_token(exc: BaseException) -> bool:
    rpc_error = _rpc_error(exc)
    return (
        isinstance(exc, aetcd.exceptions.UnauthenticatedError)
        or (rpc_error is not None and rpc_error.code() is grpc.StatusCode.UNAUTHENTICATED)
    ) and "token" in detail(exc)


def detail(exc: BaseException) -> str:
    rpc_error = _rpc_error(exc)
    if rpc_error is not None:
        return f"{rpc_error.code().name}: {rpc_error.details()}"
    return str(exc) or type(exc).__name__


async def revoke_quietly(client: Client, lease_id: int) -> None:
    # Best effort: an etcd lease nobody revokes runs out by itself.
    with contextlib.suppress(*LIBRARY_ERRORS):
        await client.revoke_lease(lease_id)


def tls_credentials(
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
