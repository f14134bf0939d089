"""Facts about the host and its switches: the underlay, root, IP forwarding."""

from __future__ import annotations

import os
from ipaddress import IPv6Address
from pathlib import Path

from weft.core.config import IPAddress
from weft.core.errors import PermissionProblem, UsageError
from weft.core.host import HostContext
from weft.host.netlink import Netlink


def detect_host(public_ip: IPAddress | None, iface: str | None, state_dir: Path,
                public_ipv6: IPv6Address | None = None, want_ipv6: bool = False
                ) -> HostContext:
    """The underlay interface and public IP: from flags, else the default route's interface.
    `want_ipv6` (dual stack, or an IPv6 overlay routed via underlay next hops): also the
    IPv6 underlay address (`--public-ipv6`, else the interface's first non-link-local IPv6
    address; none when the public IP is IPv6 itself or there is none)."""
    if public_ipv6 is not None and not want_ipv6:
        raise UsageError(f"--public-ipv6 {public_ipv6}: the network is not dual stack "
                         '(set "EnableIPv6": true and IPv6Network in the config)')
    if public_ipv6 is not None and public_ip is not None and public_ip.version == 6:
        raise UsageError(f"--public-ipv6 {public_ipv6}: --public-ip {public_ip} is IPv6 "
                         "already; give --public-ip the IPv4 address")
    with Netlink() as nl:
        if iface is None and public_ip is not None:
            iface = nl.ifname_with_address(public_ip)
            if iface is None:
                raise UsageError(f"--public-ip {public_ip}: no interface on this host has it")
        if iface is None:
            iface = nl.default_route_ifname()
            if iface is None:
                raise UsageError("no default route: name the underlay with --iface")
        link = nl.link(iface)
        if link is None:
            raise UsageError(f"--iface {iface}: no such interface")
        if public_ip is None:
            public_ip = _first_address(nl, link.index)
            if public_ip is None:
                raise UsageError(f"--iface {iface} has no address: give --public-ip")
        elif public_ip not in {a.ip for a in nl.addresses(link.index)}:
            # Encapsulated traffic leaves by --iface with --public-ip as its source: an
            # address of another interface (or of no interface) reaches no peer.
            raise UsageError(f"--public-ip {public_ip} is not an address of --iface {iface}: "
                             "give the underlay interface that holds it, or leave one out")
        if public_ipv6 is not None and nl.ifname_with_address(public_ipv6) is None:
            raise UsageError(f"--public-ipv6 {public_ipv6}: no interface on this host has it")
        if want_ipv6 and public_ipv6 is None and public_ip.version == 4:
            # fe80:: is on every interface and reaches only the link: never an underlay.
            public_ipv6 = next((a.ip for a in nl.addresses(link.index)
                                if isinstance(a.ip, IPv6Address) and not a.ip.is_link_local
                                and not a.ip.is_loopback and not a.ip.is_multicast), None)
    return HostContext(public_ip=public_ip, underlay_ifname=iface, underlay_mtu=link.mtu,
                       state_dir=state_dir, public_ipv6=public_ipv6)


def _first_address(nl: Netlink, index: int) -> IPAddress | None:
    """The address the agent uses when none is pinned: the first IPv4 one, else any."""
    addrs = [a for a in nl.addresses(index) if a.version == 4] or nl.addresses(index)
    return addrs[0].ip if addrs else None


def underlay_address(ifname: str, current: IPAddress) -> tuple[bool, IPAddress | None]:
    """(whether `current` is still an address of `ifname`, the address the agent would
    take now when none is pinned)."""
    with Netlink() as nl:
        link = nl.link(ifname)
        if link is None:
            return False, None
        present = current in {a.ip for a in nl.addresses(link.index)}
        return present, current if present else _first_address(nl, link.index)


def require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionProblem("weft agent needs root (CAP_NET_ADMIN) to program the kernel")


def enable_forwarding(version: int) -> None:
    path = ("/proc/sys/net/ipv4/ip_forward" if version == 4
            else "/proc/sys/net/ipv6/conf/all/forwarding")
    Path(path).write_text("1\n")


def tx_checksum_offload(ifname: str) -> bool | None:
    """Whether `ifname` has generic transmit checksum offload on (ethtool's
    `tx-checksum-ip-generic`), or None when it cannot be read (no such device, no ethtool
    support). Read-only; for `weft doctor`."""
    from pyroute2.ethtool import Ethtool

    try:
        ethtool = Ethtool()
        try:
            feature = ethtool.get_features(ifname).features.get("tx-checksum-ip-generic")
        finally:
            ethtool.close()
    except Exception:  # pyroute2 raises plain and netlink errors alike: not readable
        return None
    return None if feature is None else bool(feature.enable)
