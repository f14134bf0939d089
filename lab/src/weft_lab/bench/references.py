"""Reference rows for `weft bench`: a kernel path built by hand, with no agent and no rules,
and flannel's data plane (weft_lab.bench.flannel) as the peer rows.

A reference is measured like a backend (same testbed, same container attachment through
`weft-cni`, same pinning, interleaved with native), but its hosts are programmed here
with `ip` and `bridge` only: the devices, routes, neighbours and FDB entries weft would
program, and nothing else (no masquerade table, no FORWARD rules, no agent). A report then
shows what weft adds on top of the kernel path, not only on top of native.

The peer rows `flannel-vxlan` and `flannel-host-gw` are built the same way, with the
devices, routes, neighbours, FDB entries and iptables rules flannel v0.28 programs (what
they follow, file by file, is in weft_lab.bench.flannel).

To add a row, write a `program(tb, subnets)` and add a `Reference` to `REFERENCES`; the
runner and `--backends` pick it up by name. A row with a `program6` (the kernel paths) is
measured over IPv6 too under `weft bench --ipv6`: dual stack on a dual-stack underlay, as
the backends' `/ipv6` rows are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from weft.backends.registry import overhead
from weft.core.constants import VXLAN_DEVICE_PREFIX
from weft_lab.bench.flannel import program_flannel_host_gw, program_flannel_vxlan
from weft_lab.testbed import Host, Testbed

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network
# The overlay the bench's backends lease from; references use the same addresses.
BENCH_NETWORK = ipaddress.IPv4Network("198.19.0.0/16")
BENCH_NETWORK6 = ipaddress.IPv6Network("2001:db8:1::/48")  # dual stack's (--ipv6)
VNI = 1
VXLAN_PORT = 8472


def host_subnet(host: Host) -> IPv4Net:
    """Host i's subnet, 198.19.i.0/24: what a backend's lease would give it (pure)."""
    return IPv4Net(f"198.19.{host.index}.0/24")


def host_subnet6(host: Host) -> IPv6Net:
    """Host i's IPv6 subnet in dual stack, 2001:db8:1:i::/64 (pure)."""
    return IPv6Net(f"2001:db8:1:{host.index:x}::/64")


@dataclass(frozen=True)
class Reference:
    name: str
    # The backend this row stands beside (its MTU overhead, its place in the table).
    beside: str
    program: Callable[[Testbed, Sequence[IPv4Net]], None]
    # Run once the containers are attached (their devices exist), if the row needs it.
    after_attach: Callable[[Testbed], None] | None = None
    # In the default list of `weft bench`; an experimental row is measured only by name.
    default: bool = True
    # The IPv6 half of dual stack over the IPv6 underlay (`weft bench --ipv6`), if the row
    # has one.
    program6: Callable[[Testbed, Sequence[IPv6Net]], None] | None = None


def _vxlan_mac(host: Host) -> str:
    """A fixed, locally administered MAC per host, so peers can be programmed before the
    device exists (a lease carries the VtepMAC for the same reason)."""
    return f"02:77:65:66:74:{host.index:02x}"


def program_kernel_vxlan(tb: Testbed, subnets: Sequence[IPv4Net]) -> None:
    """What the vxlan backend programs (weft.backends.vxlan.apply), by hand."""
    dev = f"{VXLAN_DEVICE_PREFIX}{VNI}"
    mtu = 1500 - overhead("vxlan")
    for host, subnet in zip(tb.hosts, subnets, strict=True):
        tb.run(host.netns, ["ip", "link", "add", dev, "address", _vxlan_mac(host), "type",
                            "vxlan", "id", str(VNI), "dstport", str(VXLAN_PORT), "local",
                            str(host.underlay_ip), "dev", "eth0", "nolearning"])
        tb.run(host.netns, ["ip", "addr", "add", f"{subnet.network_address}/32", "dev", dev])
        tb.run(host.netns, ["ip", "link", "set", dev, "mtu", str(mtu), "up"])
        for peer, peer_subnet in zip(tb.hosts, subnets, strict=True):
            if peer is host:
                continue
            vtep = str(peer_subnet.network_address)
            mac = _vxlan_mac(peer)
            tb.run(host.netns, ["bridge", "fdb", "append", mac, "dev", dev, "dst",
                                str(peer.underlay_ip)])
            tb.run(host.netns, ["ip", "neigh", "replace", vtep, "lladdr", mac, "dev", dev,
                                "nud", "permanent"])
            tb.run(host.netns, ["ip", "route", "replace", str(peer_subnet), "via", vtep,
                                "dev", dev, "onlink"])


def _vxlan_mac6(host: Host) -> str:
    return f"02:77:65:66:76:{host.index:02x}"


def program_kernel_vxlan6(tb: Testbed, subnets6: Sequence[IPv6Net]) -> None:
    """What the vxlan backend programs for dual stack's IPv6 half over an IPv6 underlay
    (its second device, weft.backends.vxlan.plan), by hand: peers routed via the link-local
    address of their VTEP MAC."""
    from weft.backends.vxlan.plan import link_local

    dev = f"{VXLAN_DEVICE_PREFIX}{VNI}v6"
    mtu = 1500 - overhead("vxlan") - 20  # the IPv6 underlay's header is 20 bytes longer
    for host in tb.hosts:
        assert host.underlay_ip6 is not None, "an IPv6 row needs the dual underlay"
        tb.run(host.netns, ["ip", "link", "add", dev, "address", _vxlan_mac6(host), "type",
                            "vxlan", "id", str(VNI), "dstport", str(VXLAN_PORT), "local",
                            str(host.underlay_ip6), "dev", "eth0", "nolearning"])
        tb.run(host.netns, ["ip", "link", "set", dev, "mtu", str(mtu), "up"])
        for peer, peer_subnet in zip(tb.hosts, subnets6, strict=True):
            if peer is host:
                continue
            mac = _vxlan_mac6(peer)
            gateway = str(link_local(mac))
            tb.run(host.netns, ["bridge", "fdb", "append", mac, "dev", dev, "dst",
                                str(peer.underlay_ip6)])
            tb.run(host.netns, ["ip", "-6", "neigh", "replace", gateway, "lladdr", mac,
                                "dev", dev, "nud", "permanent"])
            tb.run(host.netns, ["ip", "-6", "route", "replace", str(peer_subnet), "via",
                                gateway, "dev", dev])


def program_kernel_routes(tb: Testbed, subnets: Sequence[IPv4Net]) -> None:
    """What the host-gw backend programs (weft.backends.hostgw.apply), by hand."""
    for host in tb.hosts:
        for peer, peer_subnet in zip(tb.hosts, subnets, strict=True):
            if peer is not host:
                tb.run(host.netns, ["ip", "route", "replace", str(peer_subnet), "via",
                                    str(peer.underlay_ip), "dev", "eth0"])


def program_kernel_routes6(tb: Testbed, subnets6: Sequence[IPv6Net]) -> None:
    """What the host-gw backend programs for dual stack's IPv6 half (routes via the peer's
    IPv6 underlay address on the shared segment), by hand."""
    for host in tb.hosts:
        for peer, peer_subnet in zip(tb.hosts, subnets6, strict=True):
            if peer is not host:
                assert peer.underlay_ip6 is not None, "an IPv6 row needs the dual underlay"
                tb.run(host.netns, ["ip", "-6", "route", "replace", str(peer_subnet), "via",
                                    str(peer.underlay_ip6), "dev", "eth0"])


REFERENCES: dict[str, Reference] = {
    r.name: r for r in (
        Reference("kernel-vxlan", "vxlan", program_kernel_vxlan,
                  program6=program_kernel_vxlan6),
        Reference("flannel-vxlan", "vxlan", partial(program_flannel_vxlan,
                                                    network=BENCH_NETWORK)),
        Reference("kernel-routes", "host-gw", program_kernel_routes,
                  program6=program_kernel_routes6),
        Reference("flannel-host-gw", "host-gw", partial(program_flannel_host_gw,
                                                        network=BENCH_NETWORK)),
    )
}
