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
            public_ip = _first_address(nl, link.index)
            if public_ip is None:
                raise UsageError(f"--iface {iface} has no address: give --public-ip")
        elif public_ip not in {a.ip for a in nl.addresses(link.index)}:
            # Encapsulated traffic leaves by --iface with --public-ip as its source: an
            # address of another interface (or of no interface) reaches no peer.
            raise UsageError(f"--public-ip {public_ip} is not an address of --iface {iface}: "
                             "give the underlay interface that holds it, or leave one out")
    return HostContext(public_ip=public_ip, underlay_ifname=iface, underlay_mtu=link.mtu,
                       state_dir=state_dir)


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
