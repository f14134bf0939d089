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


def desired_peers(
    peers: Iterable[Lease],
    own_key: PublicKey,
    listen_port: int,
    keepalive: int,
    psk: bytes | None,
) -> tuple[dict[PublicKey, PeerConfig], dict[str, str]]:
    """The peer set the leases ask for, and per-lease errors for leases that cannot be
    peers (another backend, a missing or malformed key). A bad lease never stops the rest."""
    wanted: dict[PublicKey, PeerConfig] = {}
    errors: dict[str, str] = {}
    for lease in peers:
        where = str(lease.subnet)
        problem = backend_mismatch(lease, "wireguard")
        if problem is not None:
            errors[where] = problem
            continue
        text = lease.backend_data.get("PublicKey")
        if not isinstance(text, str):
            errors[where] = f"peer {lease.public_ip} has no PublicKey in its lease"
            continue
        try:
            key = PublicKey.from_base64(text)
        except KeyFormatError as exc:
            errors[where] = f"peer {lease.public_ip} has a malformed PublicKey ({exc})"
            continue
        if key == own_key:
            continue  # our own lease, should the caller pass it
        if key in wanted:
            errors[where] = (
                f"peer {lease.public_ip} uses the same PublicKey as another peer; each host "
                "needs its own key (copied state directory?)"
            )
            continue
        wanted[key] = PeerConfig(
            public_key=key,
            endpoint=(lease.public_ip, listen_port),
            # Dual stack: both subnets ride one peer (one key, one endpoint).
            allowed_ips=frozenset(lease.subnets),
            keepalive=keepalive,
            psk=psk,
        )
    return wanted, errors


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
