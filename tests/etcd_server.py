"""Real etcd servers for tests, on free loopback ports with temporary data.

    with etcd_cluster(members=3) as cluster:     # weft.etcd_local.LocalEtcd
        cluster.url                              # "etcd://127.0.0.1:P1,..."
        cluster.kill(1); cluster.restart(1)      # a member crashes and comes back
        cluster.etcdctl("put", key, value)       # the real etcdctl

There is one etcd launcher in weft (`weft.etcd_local`, also behind `weft demo --store
etcd`); this module adds what tests need around it: the skip when the server binary is
missing, and a prefix per test so tests can share one server without seeing each other.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.etcd_local import ETCD_BINARY, ETCDCTL_BINARY, LocalEtcd

ETCD_MISSING_REASON = (
    f"needs the etcd server ({ETCD_BINARY}, Debian package etcd-server) and "
    f"{ETCDCTL_BINARY} (etcd-client)"
)
ETCD_AVAILABLE = os.access(ETCD_BINARY, os.X_OK) and os.access(ETCDCTL_BINARY, os.X_OK)

requires_etcd = pytest.mark.skipif(not ETCD_AVAILABLE, reason=ETCD_MISSING_REASON)


@contextlib.contextmanager
def etcd_cluster(members: int = 1, base_dir: Path | None = None) -> Iterator[LocalEtcd]:
    """Start an N-member etcd cluster on loopback; stop it and remove its data after."""
    if not ETCD_AVAILABLE:
        pytest.skip(ETCD_MISSING_REASON)
    cluster = LocalEtcd(members, base_dir=base_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def unique_prefix() -> str:
    """A key prefix no other test uses (shaped like flannel's)."""
    return f"/weft-test/{uuid.uuid4().hex[:12]}/network"
