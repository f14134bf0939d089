"""The distributed store: etcd v3 (`store`), its client (`client`) and URLs (`url`)."""

from weft.store.etcd.store import EtcdLeaseStore
from weft.store.etcd.url import Endpoint, parse_etcd_url

__all__ = ["Endpoint", "EtcdLeaseStore", "parse_etcd_url"]
