"""Lease stores: the seam (`base`), the embedded SQLite store and etcd v3."""

from __future__ import annotations

from weft.store.base import LeaseStore

__all__ = ["LeaseStore", "open_store"]


def open_store(url: str, **options: str | None) -> LeaseStore:
    """Open a store from a URL: `sqlite:///path/to/file.db` (or a bare path), or
    `etcd://host:port[,host:port]` / `etcds://...` (options: prefix, cafile, certfile,
    keyfile, username, password)."""
    if url.startswith(("etcd://", "etcds://")):
        from weft.store.etcd import EtcdLeaseStore  # grpc is heavy: import only when used

        store: LeaseStore = EtcdLeaseStore.from_url(url, **options)
        return store
    from weft.store.sqlite import SqliteLeaseStore

    return SqliteLeaseStore(url.removeprefix("sqlite://"))
