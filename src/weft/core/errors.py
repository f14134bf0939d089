"""Every error weft raises on purpose, in one hierarchy.

    WeftError                      anything weft reports to a user
    ├── ConfigError                the network config (JSON) is wrong: names field and value
    ├── UsageError                 a CLI argument or environment is wrong
    │   └── AddressInUse           another host's live lease names this host's address
    ├── PermissionProblem          needs root / CAP_NET_ADMIN
    ├── KernelFeatureMissing       the kernel lacks a device type or feature
    ├── KernelError                netlink/nftables refused a change (translated at the edge)
    ├── StoreError                 the lease store failed
    │   ├── StoreUnavailable       cannot reach the store (etcd down, file unreadable)
    │   ├── NetworkFull            no free subnet left in Network/SubnetMin..SubnetMax
    │   ├── LeaseNotFound          renewing/releasing a lease that is gone (expired)
    │   ├── WatchCompacted         a watch asked for history the store no longer keeps
    │   └── StoreRewound           the store went back in time (restored, or a new cluster)
    └── CodecError                 the UDP encapsulation codec
        ├── RemoteProtocolError    bytes from the wire are malformed (drop and count)
        └── LocalProtocolError     the caller misused the codec (a bug)

Library exceptions (pyroute2's NetlinkError, grpc errors, sqlite3 errors) are
translated into these where they enter weft, so callers handle one family.
"""

from __future__ import annotations


class WeftError(Exception):
    """Base of every error weft reports to a user."""


class ConfigError(WeftError):
    """The network config is invalid; the message names the field and the value."""


class UsageError(WeftError):
    """A command-line argument or the environment is wrong."""


class AddressInUse(UsageError):
    """Another host (another identity) holds a live lease naming this host's address."""


class PermissionProblem(WeftError):
    """An operation needs root (CAP_NET_ADMIN)."""


class KernelFeatureMissing(WeftError):
    """The running kernel lacks something weft needs (a module, a device type)."""


class KernelError(WeftError):
    """The kernel refused a change; the message says which change."""


class StoreError(WeftError):
    """The lease store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached."""


class NetworkFull(StoreError):
    """Every subnet of the network is leased."""


class LeaseNotFound(StoreError):
    """The lease no longer exists (it expired or was released)."""


class WatchCompacted(StoreError):
    """The store no longer holds the history a watch asked for; resync from a list."""

    def __init__(self, revision: int, oldest: int) -> None:
        super().__init__(
            f"watch from revision {revision} is no longer possible: history starts at {oldest}"
        )
        self.revision = revision
        self.oldest = oldest


class StoreRewound(StoreError):
    """The store's revision went back (restored from a snapshot) or it is another cluster:
    what the watch saw may be gone without a DELETE; re-list and re-assert."""


class CodecError(WeftError):
    """The UDP encapsulation codec failed."""


class RemoteProtocolError(CodecError):
    """Bytes received from the network are malformed; the datagram is dropped and counted."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LocalProtocolError(CodecError):
    """The caller used the codec wrongly (a bug in weft, not bad input)."""
