"""WireGuard device state and the plan that moves it to what the leases ask for.

Pure: no sockets, no netlink, no clock. Both device edges (wireguard-go's UAPI and the
kernel's generic netlink) read a `DeviceState` and apply a `DeviceChange`, so the same
leases produce the same configuration whichever implementation runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weft.backends.base import backend_mismatch
from weft.backends.wireguard.keys import KEY_LEN, KeyFormatError, PrivateKey, PublicKey
from weft.core.config import IPAddress, IPNetwork
from weft.core.lease import Lease

ZERO_KEY = bytes(KEY_LEN)


@dataclass(frozen=True)
class PeerConfig:
    """What weft sets for one peer; the fields a reconcile compares."""

    public_key: PublicKey
    endpoint: tuple[IPAddress, int] | None
    allowed_ips: frozenset[IPNetwork]
    keepalive: int = 0
    psk: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DeviceState:
    """A device as read back from the implementation (secrets never printed)."""

    private_key: PrivateKey | None
    listen_port: int
    peers: Mapping[PublicKey, PeerConfig]
    # Summed over peers: rx_bytes, tx_bytes, peers_with_handshake (for metrics/status).
    counters: Mapping[str, int] = field(default_factory=dict, compare=False)
    # Per peer, its last handshake (Unix seconds; a peer with none is absent): its age is
    # shown beside the peer's probe health.
    handshakes: Mapping[PublicKey, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DeviceChange:
    """One configuration transaction; None/empty fields leave that part alone."""

    private_key: PrivateKey | None = field(default=None, repr=False)
    listen_port: int | None = None
    remove: tuple[PublicKey, ...] = ()
    upsert: tuple[PeerConfig, ...] = ()

    @property
    def empty(self) -> bool:
        return (self.private_key is None and self.listen_port is None and not self.remove
                and not self.upsert)


def device_change(
    state: DeviceState, private_key: PrivateKey, listen_port: int
) -> DeviceChange:
    """Set the key and port only where they differ: re-setting the port makes wireguard-go
    rebind its socket, which would drop packets in flight across an agent restart."""
    return DeviceChange(
        private_key=None if state.private_key == private_key else private_key,
        listen_port=None if state.listen_port == listen_port else listen_port,
    )


@dataclass(frozen=True)
class PeerSets:
    """What the leases ask of this host's devices: the peers of the IPv4 one (`weft.wg0`)
    and, in dual stack over an IPv6 underlay address, of the IPv6 one (`weft.wg0v6`)."""

    peers: dict[PublicKey, PeerConfig]
    peers6: dict[PublicKey, PeerConfig]
    # A peer's IPv6 subnet that rides the IPv4 device although this host has an IPv6 one,
    # and why (the peer has no IPv6 underlay device): routed to the IPv4 device.
    over_ipv4: dict[IPNetwork, str]
    errors: dict[str, str]  # peer subnet -> why it is no peer


def _key(text: object, what: str, lease: Lease) -> PublicKey | str:
    """The key a lease publishes, or why it cannot be used."""
    if not isinstance(text, str):
        return f"peer {lease.public_ip} has no PublicKey in its {what}"
    try:
        return PublicKey.from_base64(text)
    except KeyFormatError as exc:
        return f"peer {lease.public_ip} has a malformed PublicKey in its {what} ({exc})"


def ipv6_endpoint(lease: Lease) -> tuple[tuple[IPAddress, int], PublicKey] | str:
    """Where the peer's IPv6 underlay device listens and its key, from its PublicIPv6 and
    BackendV6Data (flannel's layout: PublicKey, Port); or why it has none. A BackendV6Data
    without a Port is BackendData's copy (a host without that device, or an older weft)."""
    if lease.public_ipv6 is None:
        return "the peer publishes no PublicIPv6"
    data = lease.backend_v6_data or {}
    port = data.get("Port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return "the peer has no WireGuard device on the IPv6 underlay (no BackendV6Data Port)"
    key = _key(data.get("PublicKey"), "BackendV6Data", lease)
    if isinstance(key, str):
        return key
    return (lease.public_ipv6, port), key


def peer_sets(
    peers: Iterable[Lease],
    own_key: PublicKey,
    listen_port: int,
    keepalive: int,
    psk: bytes | None,
    ipv6_underlay: bool = False,
) -> PeerSets:
    """The peers the leases ask for, and per-lease errors for leases that cannot be peers
    (another backend, a missing or malformed key, a key another peer has). A bad lease
    never stops the rest.

    `ipv6_underlay`: this host has the IPv6 underlay device. A peer with one too gets its
    IPv6 subnet there (to its PublicIPv6 and BackendV6Data Port) and only its IPv4 subnet
    on the IPv4 device; any other peer's IPv6 subnet rides the IPv4 device with its IPv4
    one (`over_ipv4`). Both ends decide alike from the two leases, so a pair always uses
    one device for each family."""
    wanted: dict[PublicKey, PeerConfig] = {}
    wanted6: dict[PublicKey, PeerConfig] = {}
    over_ipv4: dict[IPNetwork, str] = {}
    errors: dict[str, str] = {}
    for lease in peers:
        where = str(lease.subnet)
        problem = backend_mismatch(lease, "wireguard")
        if problem is not None:
            errors[where] = problem
            continue
        key = _key(lease.backend_data.get("PublicKey"), "lease", lease)
        if isinstance(key, str):
            errors[where] = key
            continue
        if key == own_key:
            continue  # our own lease, should the caller pass it
        if key in wanted:
            errors[where] = (
                f"peer {lease.public_ip} uses the same PublicKey as another peer; each host "
                "needs its own key (copied state directory?)"
            )
            continue
        # Dual stack without IPv6 underlay devices at both ends: both subnets ride one
        # peer (one key, one endpoint).
        allowed = set(lease.subnets)
        six = lease.ipv6_subnet
        if ipv6_underlay and six is not None:
            found = ipv6_endpoint(lease)
            if isinstance(found, str):
                over_ipv4[six] = found
            elif found[1] == own_key or found[1] in wanted6:
                over_ipv4[six] = "the peer's BackendV6Data PublicKey is another host's"
            else:
                endpoint, key6 = found
                wanted6[key6] = PeerConfig(key6, endpoint, frozenset({six}), keepalive, psk)
                allowed.discard(six)
        wanted[key] = PeerConfig(
            public_key=key,
            endpoint=(lease.public_ip, listen_port),
            allowed_ips=frozenset(allowed),
            keepalive=keepalive,
            psk=psk,
        )
    return PeerSets(wanted, wanted6, over_ipv4, errors)


def peer_plan(
    desired: Mapping[PublicKey, PeerConfig], actual: Mapping[PublicKey, PeerConfig]
) -> DeviceChange:
    """Remove peers no lease wants; add or update the rest.  Removals go first in the
    transaction, so a subnet that moved to a new key is free for it to take."""
    remove = tuple(sorted((k for k in actual if k not in desired), key=lambda k: k.raw))
    upsert = tuple(
        desired[k] for k in sorted(desired, key=lambda k: k.raw) if actual.get(k) != desired[k]
    )
    return DeviceChange(remove=remove, upsert=upsert)


def normalise_psk(raw: bytes | None) -> bytes | None:
    """Implementations report "no PSK" as an all-zero key."""
    return None if raw is None or raw == ZERO_KEY else raw


def parse_endpoint(text: str) -> tuple[IPAddress, int] | None:
    """`198.18.0.2:51820` or `[fd00::2]:51820` (wireguard-go's form); None for none."""
    if not text or text == "(none)":
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint {text!r} has no port")
    host = host.removeprefix("[").removesuffix("]")
    return ipaddress.ip_address(host), int(port)


def format_endpoint(endpoint: tuple[IPAddress, int]) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
