"""The agent's command-line values, checked before anything is opened or changed.

Each check raises one UsageError naming the flag, the value and what to do. `check_paths`
looks at the filesystem (nothing else here does): a read-only state directory must stop
the agent before it has leased a subnet or touched the kernel.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from weft.core.errors import UsageError

STORE_SCHEMES = ("sqlite://", "etcd://", "etcds://")
MIN_LEASE_TTL = 2.0  # etcd refuses shorter leases
MAX_LEASE_TTL = 365 * 24 * 3600.0


def check_store_url(url: str) -> None:
    """`sqlite:///path`, `etcd://…` or `etcds://…`: anything else used to become a SQLite
    file named like the URL."""
    if url.startswith(STORE_SCHEMES):
        if url.startswith("sqlite://") and not url.removeprefix("sqlite://").startswith("/"):
            raise UsageError(f"--store {url!r}: a SQLite store needs an absolute path, "
                             "e.g. sqlite:///var/lib/weft/store.db")
        return
    raise UsageError(f"--store {url!r}: use sqlite:///path/file.db, etcd://host:port[,…] "
                     "or etcds://host:port[,…]")


def check_metrics_addr(addr: str | None) -> None:
    if addr is None:
        return
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics-addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9465")
    if host and host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--metrics-addr {addr!r}: {host!r} is not an IP address "
                             "(or localhost)") from None


def check_numbers(lease_ttl: float, resync_interval: float) -> None:
    if not MIN_LEASE_TTL <= lease_ttl <= MAX_LEASE_TTL:
        raise UsageError(f"--lease-ttl {lease_ttl:g}: choose between {MIN_LEASE_TTL:g} s and "
                         f"{MAX_LEASE_TTL:g} s (a year)")
    if not 1.0 <= resync_interval <= 86400.0:
        raise UsageError(f"--resync-interval {resync_interval:g}: choose between 1 s and a day")


def _writable_dir(path: Path, flag: str) -> None:
    """`path` is, or can be made, a directory weft can write to."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable (read-only file system or "
                         "permissions); choose another path")


def check_paths(state_dir: Path, subnet_file: Path) -> None:
    if subnet_file.is_dir():
        raise UsageError(f"--subnet-file {subnet_file}: is a directory; name a file, e.g. "
                         "/run/weft/subnet.env")
    _writable_dir(state_dir, "--state-dir")
    _writable_dir(subnet_file.parent, "--subnet-file")
