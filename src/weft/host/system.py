"""Facts about the host and its switches: the underlay, root, IP forwarding."""

from __future__ import annotations

import os
from pathlib import Path

from weft.core.config import IPAddress
from weft.core.errors import PermissionProblem, UsageError
from weft.core.host import HostContext
from weft.host.netlink import Netlink


def detect_host(public_ip: IPAddress | None, iface: str | None, state_dir: Path) -> HostContext:
    """The underlay interface and public IP: from flags, else the default route's interface."""
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
            addrs = [a for a in nl.addresses(link.index) if a.version == 4] or nl.addresses(
                link.index
            )
            if not addrs:
                raise UsageError(f"--iface {iface} has no address: give --public-ip")
            public_ip = addrs[0].ip
    return HostContext(public_ip=public_ip, underlay_ifname=iface, underlay_mtu=link.mtu,
                       state_dir=state_dir)


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
