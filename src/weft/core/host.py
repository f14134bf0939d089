"""Facts about the host a backend runs on, gathered by the agent before anything is planned."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from weft.core.config import IPAddress

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class HostContext:
    """What a backend knows about the host it runs on."""

    public_ip: IPAddress
    underlay_ifname: str
    underlay_mtu: int
    state_dir: Path
    # Dual stack: the host's IPv6 underlay address beside an IPv4 `public_ip` (the lease's
    # PublicIPv6), if it has one; None otherwise.
    public_ipv6: ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class UnderlayFacts:
    """The underlay interface as it is now: read once per reconcile, passed to plans."""

    index: int
    addresses: tuple[Interface, ...]

    def on_link(self, ip: IPAddress) -> bool:
        """Whether `ip` is another host on one of the underlay's connected subnets."""
        return any(ip in a.network and ip != a.ip for a in self.addresses)
