"""Leases: which host holds which subnet. Pure logic — no I/O, no clock (time is passed in).

A lease's stored value is flannel's JSON
(`{"PublicIP": "198.18.0.2", "BackendType": "vxlan", "BackendData": {...}}`) under the key
`<prefix>/subnets/10.244.3.0-24`; its expiry is kept by the store (an etcd lease, a column).
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from weft.core import untrusted_json
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import RENEW_FRACTION, SUBNETS_DIR
from weft.core.errors import NetworkFull
from weft.core.untrusted_json import UntrustedJson


class LeaseFormatError(ValueError):
    """A stored lease record does not parse (written by something else, or corrupt)."""


@dataclass(frozen=True)
class Lease:
    subnet: IPNetwork
    public_ip: IPAddress
    backend_type: str
    backend_data: Mapping[str, Any] = field(default_factory=dict)
    expiration: float = 0.0  # seconds since the epoch; 0 while unknown

    def to_json(self) -> str:
        return json.dumps(
            {
                "PublicIP": str(self.public_ip),
                "BackendType": self.backend_type,
                "BackendData": dict(self.backend_data),
            },
            sort_keys=True,
        )

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    @property
    def own_address(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The host's own overlay address: its subnet's network address, as a host route
        (flannel's VTEP address). Host-originated overlay traffic leaves with it."""
        return ipaddress.ip_interface(
            f"{self.subnet.network_address}/{self.subnet.max_prefixlen}"
        )

    def with_expiration(self, expiration: float) -> Lease:
        return replace(self, expiration=expiration)

    def expires_in(self, now: float) -> float:
        return self.expiration - now

    def renew_at(self, ttl: float) -> float:
        """When to renew: with RENEW_FRACTION of the TTL still left."""
        return self.expiration - ttl * RENEW_FRACTION


def same_peer(a: Lease, b: Lease) -> bool:
    """The same lease but for its expiry (a renewal: no check and no data plane reads it).
    BackendData is compared type for type, as the JSON it came from: in Python
    True == 1 == 1.0, so a record turning {"Port": 1} into {"Port": true} would pass for a
    renewal, unchecked."""
    if a is b:
        return True
    return ((a.subnet, a.public_ip, a.backend_type) == (b.subnet, b.public_ip, b.backend_type)
            and _same_json(dict(a.backend_data), dict(b.backend_data)))


def _same_json(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_json(v, y[k]) for k, v in x.items())
    if isinstance(x, list):
        return len(x) == len(y) and all(map(_same_json, x, y))
    return bool(x == y)


def subnet_key(subnet: IPNetwork) -> str:
    """`10.244.3.0/24` -> `subnets/10.244.3.0-24` (flannel's layout, relative to the prefix)."""
    return f"{SUBNETS_DIR}/{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPNetwork:
    """The inverse of `subnet_key`, for a key relative to the store's prefix. Only the
    canonical form is a lease: `subnets/zz/10.244.4.0-24` or `subnets/10.244.004.0-24`
    would otherwise alias a live peer's subnet under a second key."""
    directory, _, name = key.rpartition("/")
    addr, sep, length = name.rpartition("-")
    if directory != SUBNETS_DIR or not sep:
        raise LeaseFormatError(f"lease key {key!r} is not of the form {SUBNETS_DIR}/<ip>-<len>")
    try:
        subnet = ipaddress.ip_network(f"{addr}/{int(length)}", strict=True)
    except ValueError as exc:
        raise LeaseFormatError(f"lease key {key!r}: {exc}") from None
    if subnet_key(subnet) != key:
        raise LeaseFormatError(f"lease key {key!r} is not canonical ({subnet_key(subnet)!r})")
    return subnet


def parse_lease(key: str, value: str | bytes, expiration: float = 0.0) -> Lease:
    """Build a Lease from a stored key and JSON value, or raise LeaseFormatError."""
    subnet = parse_subnet_key(key)
    try:
        data = untrusted_json.loads(value)
    except UntrustedJson as exc:
        raise LeaseFormatError(f"lease {key!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LeaseFormatError(f"lease {key!r} is not a JSON object")
    if not isinstance(data.get("PublicIP"), str):
        # ip_address() would take a number (5 -> 0.0.0.5) or true (0.0.0.1) for one
        raise LeaseFormatError(f"lease {key!r}: PublicIP is not a string")
    try:
        public_ip = ipaddress.ip_address(data["PublicIP"])
        backend_type = data["BackendType"]
        backend_data = data.get("BackendData") or {}
    except (KeyError, TypeError, ValueError) as exc:
        raise LeaseFormatError(f"lease {key!r} lacks a valid field: {exc}") from None
    if not isinstance(backend_type, str) or not isinstance(backend_data, dict):
        raise LeaseFormatError(f"lease {key!r} has a malformed BackendType or BackendData")
    return Lease(subnet, public_ip, backend_type, backend_data, expiration)


def all_subnets(config: NetworkConfig) -> Iterator[IPNetwork]:
    """Every host subnet from SubnetMin to SubnetMax, in order."""
    step = 1 << (config.network.max_prefixlen - config.length)
    addr = int(config.first_subnet.network_address)
    last = int(config.last_subnet.network_address)
    network_type = type(config.network)  # an int alone can't say whether it is v4 or v6
    while addr <= last:
        yield network_type((addr, config.length))
        addr += step


def choose_subnet(
    config: NetworkConfig, taken: Collection[IPNetwork], rng: random.Random
) -> IPNetwork:
    """Pick a free subnet: randomly among the first free ones, so hosts starting at once
    rarely race for the same one (flannel does the same). Raises NetworkFull."""
    candidates: list[IPNetwork] = []
    for subnet in all_subnets(config):
        if subnet not in taken:
            candidates.append(subnet)
            if len(candidates) >= 100:
                break
    if not candidates:
        raise NetworkFull(
            f"no free subnet in {config.network}: all {config.capacity} /{config.length} "
            f"subnets between {config.first_subnet.network_address} and "
            f"{config.last_subnet.network_address} are leased; widen Network or SubnetMin/Max, "
            "or remove hosts that are gone"
        )
    return rng.choice(candidates)


def find_reclaimable(
    config: NetworkConfig, leases: Collection[Lease], public_ip: IPAddress
) -> Lease | None:
    """A restarted host takes back the lease it held before (same public IP), if that
    subnet still belongs to the configured network."""
    for lease in leases:
        if lease.public_ip == public_ip and subnet_in_range(config, lease.subnet):
            return lease
    return None


def subnet_in_range(config: NetworkConfig, subnet: IPNetwork) -> bool:
    return subnet_range(config)(subnet)


def subnet_range(config: NetworkConfig) -> Callable[[IPNetwork], bool]:
    """`subnet_in_range` for one config, its bounds computed once: a loop over thousands
    of leases spent most of its time building SubnetMin and SubnetMax again per lease."""
    version, length = config.network.version, config.length
    low = int(config.first_subnet.network_address)
    high = int(config.last_subnet.network_address)

    def in_range(subnet: IPNetwork) -> bool:
        return (subnet.version == version and subnet.prefixlen == length
                and low <= int(subnet.network_address) <= high)
    return in_range
