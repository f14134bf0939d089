"""Leases: which host holds which subnet. Pure logic — no I/O, no clock (time is passed in).

A lease's stored value is flannel's JSON
(`{"PublicIP": "198.18.0.2", "BackendType": "vxlan", "BackendData": {...}}`) under the key
`<prefix>/subnets/10.244.3.0-24`; its expiry is kept by the store (an etcd lease, a column).

In dual stack one lease holds both families, as flannel's etcd registry keeps it: the key
names both subnets (`<prefix>/subnets/10.244.3.0-24&2001:db8:1:3::-64`) and the value adds
`PublicIPv6` (the host's IPv6 underlay address, when it has one) and `BackendV6Data` (the
backend's data for the IPv6 overlay). A host's two subnets are the n-th of each range
(`choose_pair`), so two hosts racing for one IPv4 subnet race for one key.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from weft.core import untrusted_json
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import RENEW_FRACTION, SUBNETS_DIR
from weft.core.errors import NetworkFull
from weft.core.untrusted_json import UntrustedJson

# The lease record's field naming its holder (see `Lease.host_id`).
HOST_ID_FIELD = "HostID"
# A host ID as weft writes it (32 hex digits); a record's is checked against this shape.
_HOST_ID = re.compile(r"[0-9a-f]{8,64}")


class LeaseFormatError(ValueError):
    """A stored lease record does not parse (written by something else, or corrupt)."""


@dataclass(frozen=True)
class Lease:
    subnet: IPNetwork  # the IPv4 subnet in dual stack; the only one otherwise
    public_ip: IPAddress
    backend_type: str
    backend_data: Mapping[str, Any] = field(default_factory=dict)
    expiration: float = 0.0  # seconds since the epoch; 0 while unknown
    # Dual stack (flannel's IPv6Subnet, PublicIPv6, BackendV6Data): None otherwise.
    ipv6_subnet: ipaddress.IPv6Network | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_v6_data: Mapping[str, Any] | None = None
    # The holder's stable identity (weft.agent.identity), not its address: the address is a
    # fact of the lease and may change. "" in a record written before weft carried it (or by
    # flannel): such a record is known by its PublicIP alone.
    host_id: str = ""

    def to_json(self) -> str:
        value: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "BackendType": self.backend_type,
            "BackendData": dict(self.backend_data),
        }
        if self.public_ipv6 is not None:
            value["PublicIPv6"] = str(self.public_ipv6)
        if self.backend_v6_data is not None:
            value["BackendV6Data"] = dict(self.backend_v6_data)
        if self.host_id:
            # An extra field: flannel's readers (Go's encoding/json) skip fields they don't
            # know, so a mixed store stays readable by both.
            value[HOST_ID_FIELD] = self.host_id
        return json.dumps(value, sort_keys=True)

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        """Every subnet this host holds: one, or the IPv4 and the IPv6 one in dual stack."""
        return (self.subnet,) if self.ipv6_subnet is None else (self.subnet, self.ipv6_subnet)

    @property
    def own_ipv6_address(self) -> ipaddress.IPv6Interface | None:
        """`own_address` of the IPv6 subnet in dual stack."""
        if self.ipv6_subnet is None:
            return None
        return ipaddress.IPv6Interface(f"{self.ipv6_subnet.network_address}/128")

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
    return ((a.subnet, a.public_ip, a.backend_type, a.ipv6_subnet, a.public_ipv6, a.host_id)
            == (b.subnet, b.public_ip, b.backend_type, b.ipv6_subnet, b.public_ipv6,
                b.host_id)
            and _same_json(dict(a.backend_data), dict(b.backend_data))
            and _same_json(a.backend_v6_data is None or dict(a.backend_v6_data),
                           b.backend_v6_data is None or dict(b.backend_v6_data)))


def _same_json(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_json(v, y[k]) for k, v in x.items())
    if isinstance(x, list):
        return len(x) == len(y) and all(map(_same_json, x, y))
    return bool(x == y)


def subnet_key(subnet: IPNetwork, ipv6_subnet: ipaddress.IPv6Network | None = None) -> str:
    """`10.244.3.0/24` -> `subnets/10.244.3.0-24` (flannel's layout, relative to the prefix);
    with a dual-stack lease's IPv6 subnet, `subnets/10.244.3.0-24&2001:db8:1:3::-64`."""
    key = f"{SUBNETS_DIR}/{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(key: str) -> IPNetwork:
    """The inverse of `subnet_key`, for a key relative to the store's prefix: the lease's
    (first) subnet, by which the agent knows a lease (`parse_lease_key` gives both halves)."""
    return parse_lease_key(key)[0]


def parse_lease_key(key: str) -> tuple[IPNetwork, ipaddress.IPv6Network | None]:
    """A key's subnet and, for a dual-stack lease, its IPv6 subnet. Only the canonical form
    is a lease: `subnets/zz/10.244.4.0-24` or `subnets/10.244.004.0-24` would otherwise alias
    a live peer's subnet under a second key. A dual-stack key is an IPv4 subnet then an
    IPv6 one, as flannel writes it."""
    directory, _, name = key.rpartition("/")
    first, amp, second = name.partition("&")
    if directory != SUBNETS_DIR or "-" not in first or (amp and "-" not in second):
        raise LeaseFormatError(f"lease key {key!r} is not of the form {SUBNETS_DIR}/<ip>-<len>"
                               f" or {SUBNETS_DIR}/<ipv4>-<len>&<ipv6>-<len>")
    try:
        subnet = _key_network(first)
        ipv6 = _key_network(second) if amp else None
    except ValueError as exc:
        raise LeaseFormatError(f"lease key {key!r}: {exc}") from None
    if ipv6 is not None and (subnet.version != 4 or not isinstance(ipv6, ipaddress.IPv6Network)):
        raise LeaseFormatError(f"lease key {key!r}: a dual-stack key is an IPv4 subnet, '&', "
                               "then an IPv6 subnet")
    if subnet_key(subnet, ipv6) != key:
        raise LeaseFormatError(f"lease key {key!r} is not canonical "
                               f"({subnet_key(subnet, ipv6)!r})")
    return subnet, ipv6


def _key_network(text: str) -> IPNetwork:
    addr, _, length = text.rpartition("-")
    return ipaddress.ip_network(f"{addr}/{int(length)}", strict=True)


def parse_lease(key: str, value: str | bytes, expiration: float = 0.0) -> Lease:
    """Build a Lease from a stored key and JSON value, or raise LeaseFormatError."""
    subnet, ipv6_subnet = parse_lease_key(key)
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
    public_ipv6, v6_data = data.get("PublicIPv6"), data.get("BackendV6Data")
    if public_ipv6 is not None:  # flannel writes null for a host without one
        try:
            if not isinstance(public_ipv6, str):
                raise TypeError(f"{public_ipv6!r} is not a string")
            public_ipv6 = ipaddress.IPv6Address(public_ipv6)
        except (TypeError, ValueError) as exc:
            raise LeaseFormatError(f"lease {key!r}: PublicIPv6: {exc}") from None
    if v6_data is not None and not isinstance(v6_data, dict):
        raise LeaseFormatError(f"lease {key!r} has a malformed BackendV6Data")
    host_id = data.get(HOST_ID_FIELD, "")
    if not isinstance(host_id, str) or (host_id and not valid_host_id(host_id)):
        raise LeaseFormatError(f"lease {key!r} has a malformed {HOST_ID_FIELD}")
    return Lease(subnet, public_ip, backend_type, backend_data, expiration,
                 ipv6_subnet, public_ipv6, v6_data, host_id)


def valid_host_id(host_id: str) -> bool:
    return _HOST_ID.fullmatch(host_id) is not None


def held_by(record: Lease, lease: Lease) -> bool:
    """Whether the stored `record` is `lease`'s holder's: by host identity when both carry
    one, else (a record from before identities, or flannel's) by PublicIP. The identity
    decides even when the address changed, and a second host that shares an address
    never passes for the holder."""
    if record.host_id and lease.host_id:
        return record.host_id == lease.host_id
    return record.public_ip == lease.public_ip


def all_subnets(config: NetworkConfig) -> Iterator[IPNetwork]:
    """Every host subnet from SubnetMin to SubnetMax, in order."""
    step = 1 << (config.network.max_prefixlen - config.length)
    addr = int(config.first_subnet.network_address)
    last = int(config.last_subnet.network_address)
    network_type = type(config.network)  # an int alone can't say whether it is v4 or v6
    while addr <= last:
        yield network_type((addr, config.length))
        addr += step


def choose_pair(config: NetworkConfig, leases: Collection[Lease], rng: random.Random
                ) -> tuple[IPNetwork, ipaddress.IPv6Network | None]:
    """A free subnet, and in dual stack a free IPv6 subnet with it: the n-th of each range,
    so every host that picks one IPv4 subnet picks the same key and create-if-absent
    settles the race (two free halves chosen apart would make two keys, both created).
    A pair is free when neither half is held by any lease. Raises NetworkFull."""
    six = config.ipv6
    if six is None:
        return choose_subnet(config, {lease.subnet for lease in leases}, rng), None
    four = config.range
    taken4 = {i for lease in leases if (i := four.index(lease.subnet)) is not None}
    taken6 = {i for lease in leases
              if lease.ipv6_subnet is not None and (i := six.index(lease.ipv6_subnet)) is not None}
    free: list[int] = []
    for index in range(config.capacity):
        if index not in taken4 and index not in taken6:
            free.append(index)
            if len(free) >= 100:
                break
    if not free:
        raise NetworkFull(
            f"no free pair of subnets in {config.network} and {six.network}: all "
            f"{config.capacity} pairs of a /{config.length} and a /{six.length} are leased; "
            "widen Network or IPv6Network (or their Subnet bounds), or remove hosts that are "
            "gone")
    index = rng.choice(free)
    six_subnet = six.nth(index)
    assert isinstance(six_subnet, ipaddress.IPv6Network)  # the range of IPv6Network
    return four.nth(index), six_subnet


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
    config: NetworkConfig, leases: Collection[Lease], public_ip: IPAddress, host_id: str = ""
) -> Lease | None:
    """A restarted host takes back the lease it held before, if that subnet still belongs
    to the configured network: the one carrying its identity (whatever address it names),
    else a record without an identity naming its public IP (written before identities). In
    dual stack, with an IPv6 subnet of IPv6Network's range; otherwise with none (flannel's
    rule: a lease of the other shape is left to expire, and a new one is leased)."""
    six = config.ipv6
    in_range = subnet_range(config)
    probe = Lease(next(iter(all_subnets(config))), public_ip, "", host_id=host_id)

    def shaped(lease: Lease) -> bool:
        if six is None:
            return lease.ipv6_subnet is None
        return lease.ipv6_subnet is not None and six.index(lease.ipv6_subnet) is not None

    mine = [lease for lease in leases
            if in_range(lease.subnet) and held_by(lease, probe) and shaped(lease)]
    # Its own identity first: an old record at the same address is the fallback only.
    mine.sort(key=lambda lease: not (host_id and lease.host_id == host_id))
    return mine[0] if mine else None


def address_holder(leases: Collection[Lease], public_ip: IPAddress, host_id: str,
                   now: float) -> Lease | None:
    """A live lease of another host (another identity) that names `public_ip`: a second
    host with this host's address (a copied config, cloned VMs). Records without an
    identity can't tell and are not counted."""
    for lease in leases:
        if (lease.public_ip == public_ip and lease.host_id and lease.host_id != host_id
                and (lease.expiration == 0.0 or lease.expires_in(now) > 0)):
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
