"""Peer rows for `weft bench`: the kernel state flannel programs, built by the bench.

What users would run instead of weft is flannel, and flannel's data plane is not the bare
kernel path of the `kernel-*` rows: it adds its iptables rules. These rows build, on the
same testbed as every other row (two hosts, one container each, attached by `weft-cni`),
what flanneld v0.28.9 (commit 5cd0d52648e891d73a6dcb9bb2c67d7c365cf7aa; the same files are
unchanged at the newer commits read) programs with `--ip-masq` (as its kube-flannel.yml
runs it) and its default `--iptables-forward-rules`, in iptables mode:

    flannel-vxlan    pkg/backend/vxlan/device.go (newVXLANDevice, Configure, AddARP,
                     AddFDB), vxlan.go (createVXLANDevice, configureDeviceIPv4IPv6),
                     vxlan_network.go (handleSubnetEvents), pkg/ip/iface.go
                     (EnsureV4AddressOnLink):
                       flannel.<VNI> (VNI 1), local = the public IP, dev = the public
                       interface, learning off, no UDP_CSUM attribute sent (so the
                       kernel's default, `udpcsum`), no port sent (the kernel's 8472),
                       MTU = interface MTU - 50, IPv6 accept_ra=0; the lease's
                       network address /32 on it, up; per peer a permanent ARP entry
                       (the peer's network address -> its VtepMAC), a permanent
                       `self` FDB entry (VtepMAC -> the peer's public IP, replaced, not
                       appended), and `route replace <subnet> via <network address> dev
                       flannel.1 onlink`
    flannel-host-gw  pkg/backend/hostgw/hostgw.go, pkg/backend/route_network.go:
                       per peer `<subnet> via <public IP> dev <public interface>`
    both             pkg/trafficmngr/iptables/iptables.go (masqRules, forwardRules,
                     CreateIP4Chain, ipTablesBootstrap), iptables_restore.go
                     (buildIPTablesRestorePayload), pkg/trafficmngr/trafficmngr.go
                     (KubeProxyMark): chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD
                     (filter) created, then one `iptables-restore --noflush --wait` of
                     the rules below, in flannel's order. MASQUERADE takes
                     `--random-fully` because this iptables has it (go-iptables'
                     HasRandomFully: iptables >= 1.6.2). The nat table turns on
                     connection tracking for every packet, as on a flannel host.

Not built: flanneld itself (a lease is fixed here, as for the kernel-* rows) and its
periodic resync of the same rules; flannel's CNI plugin (weft-cni attaches every row's
containers, so the attachment is the same in every row). flanneld also refuses to start
without br_netfilter; the module is in this kernel, so bridged traffic (the default
`--attach bridge`) passes iptables on every row alike.

The rule list and the restore payload are pure; `program_*` are the edges.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from weft.backends.registry import overhead
from weft_lab.testbed import Host, Testbed, netns_exec, sh

IPv4Net = ipaddress.IPv4Network

FLANNEL_VERSION = "v0.28.9"
FLANNEL_COMMIT = "5cd0d52648e891d73a6dcb9bb2c67d7c365cf7aa"
FLANNEL_VNI = 1
FLANNEL_DEVICE = f"flannel.{FLANNEL_VNI}"
# Linux's default VXLAN port, which flannel gets by not sending one (Port 0 in its config).
FLANNEL_VXLAN_PORT = 8472
# kube-proxy's masquerade mark, which flannel's POSTROUTING chain leaves to kube-proxy.
KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
POSTRTG_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
UNDERLAY_DEVICE = "eth0"


@dataclass(frozen=True)
class IptablesRule:
    """One `-A chain spec...` line of a table, as flannel's trafficmngr.IPTablesRule."""

    table: str
    chain: str
    spec: tuple[str, ...]


def masq_rules(network: IPv4Net, subnet: IPv4Net, random_fully: bool = True
               ) -> list[IptablesRule]:
    """flannel's masqRules for the IPv4 network and this host's leased subnet (pure)."""
    cluster, pod = str(network), str(subnet)
    masq = ("-j", "MASQUERADE", *(("--random-fully",) if random_fully else ()))
    comment = ("-m", "comment", "--comment", MASQ_COMMENT)
    return [
        # Jump first, so flannel's rules run before the host's other POSTROUTING rules.
        IptablesRule("nat", "POSTROUTING", (*comment, "-j", POSTRTG_CHAIN)),
        # Leave what kube-proxy marked to kube-proxy (a double NAT otherwise).
        IptablesRule("nat", POSTRTG_CHAIN, ("-m", "mark", "--mark", KUBE_PROXY_MARK,
                                            *comment, "-j", "RETURN")),
        # Overlay to overlay: never NATed.
        IptablesRule("nat", POSTRTG_CHAIN, ("-s", pod, "-d", cluster, *comment,
                                            "-j", "RETURN")),
        IptablesRule("nat", POSTRTG_CHAIN, ("-s", cluster, "-d", pod, *comment,
                                            "-j", "RETURN")),
        # Outside traffic arriving for a local container keeps its source.
        IptablesRule("nat", POSTRTG_CHAIN, ("!", "-s", cluster, "-d", pod, *comment,
                                            "-j", "RETURN")),
        # Containers leaving the overlay (not multicast): masqueraded.
        IptablesRule("nat", POSTRTG_CHAIN, ("-s", cluster, "!", "-d", "224.0.0.0/4",
                                            *comment, *masq)),
        # The host towards the overlay: masqueraded.
        IptablesRule("nat", POSTRTG_CHAIN, ("!", "-s", cluster, "-d", cluster, *comment,
                                            *masq)),
    ]


def forward_rules(network: IPv4Net) -> list[IptablesRule]:
    """flannel's forwardRules: FORWARD accepts anything to or from the network (pure)."""
    comment = ("-m", "comment", "--comment", FORWARD_COMMENT)
    return [
        IptablesRule("filter", "FORWARD", (*comment, "-j", FWD_CHAIN)),
        IptablesRule("filter", FWD_CHAIN, ("-s", str(network), *comment, "-j", "ACCEPT")),
        IptablesRule("filter", FWD_CHAIN, ("-d", str(network), *comment, "-j", "ACCEPT")),
    ]


def flannel_rules(network: IPv4Net, subnet: IPv4Net, random_fully: bool = True
                  ) -> list[IptablesRule]:
    """Every rule flanneld --ip-masq installs on a host, masquerade first as in its main."""
    return [*masq_rules(network, subnet, random_fully), *forward_rules(network)]


def restore_payload(rules: Sequence[IptablesRule]) -> str:
    """The `iptables-restore --noflush` input flannel builds: a `*table ... COMMIT` block
    per table (in first-seen order), `-A chain spec`, the comment's text quoted (pure)."""
    tables: dict[str, list[str]] = {}
    for rule in rules:
        words = ["-A", rule.chain]
        for i, word in enumerate(rule.spec):
            words.append(f'"{word}"' if i > 0 and rule.spec[i - 1] == "--comment" else word)
        tables.setdefault(rule.table, []).append(" ".join(words))
    return "".join(f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"
                   for table, lines in tables.items())


def chain_argv() -> list[list[str]]:
    """flannel's CreateIP4Chain for both chains (go-iptables ClearChain: -N, new here)."""
    return [["iptables", "-w", "-t", "nat", "-N", POSTRTG_CHAIN],
            ["iptables", "-w", "-t", "filter", "-N", FWD_CHAIN]]


def vtep_mac(host: Host) -> str:
    """A fixed, locally administered MAC per host (flannel keeps a random one in its lease:
    any MAC programs the same), distinct from the kernel-vxlan row's."""
    return f"02:66:6c:61:6e:{host.index:02x}"


def vxlan_device_argv(host: Host, subnet: IPv4Net, mtu: int) -> list[list[str]]:
    """flannel.1 as newVXLANDevice + Configure leave it, for `host` leasing `subnet`
    (pure)."""
    dev = FLANNEL_DEVICE
    return [
        ["ip", "link", "add", dev, "address", vtep_mac(host), "mtu", str(mtu), "type",
         "vxlan", "id", str(FLANNEL_VNI), "local", str(host.underlay_ip), "dev",
         UNDERLAY_DEVICE, "dstport", str(FLANNEL_VXLAN_PORT), "nolearning"],
        ["ip", "addr", "add", f"{subnet.network_address}/32", "dev", dev],
        ["ip", "link", "set", dev, "up"],
    ]


def vxlan_peer_argv(peer: Host, peer_subnet: IPv4Net) -> list[list[str]]:
    """What handleSubnetEvents programs for one added peer lease, in its order (pure):
    ARP, FDB, then the route (so the kernel never ARPs for the gateway)."""
    dev, vtep, mac = FLANNEL_DEVICE, str(peer_subnet.network_address), vtep_mac(peer)
    return [
        ["ip", "neigh", "replace", vtep, "lladdr", mac, "dev", dev, "nud", "permanent"],
        ["bridge", "fdb", "replace", mac, "dev", dev, "dst", str(peer.underlay_ip), "self",
         "permanent"],
        ["ip", "route", "replace", str(peer_subnet), "via", vtep, "dev", dev, "onlink"],
    ]


def hostgw_peer_argv(peer: Host, peer_subnet: IPv4Net) -> list[list[str]]:
    """host-gw's route for one peer lease (pure)."""
    return [["ip", "route", "replace", str(peer_subnet), "via", str(peer.underlay_ip), "dev",
             UNDERLAY_DEVICE]]


def _install_rules(tb: Testbed, host: Host, network: IPv4Net, subnet: IPv4Net) -> None:
    for argv in chain_argv():
        tb.run(host.netns, argv)
    sh(netns_exec(host.netns, ["iptables-restore", "--noflush", "--wait"]),
       input=restore_payload(flannel_rules(network, subnet)))


def program_flannel_vxlan(tb: Testbed, subnets: Sequence[IPv4Net], network: IPv4Net) -> None:
    """flannel's vxlan backend and its iptables rules on every host of `tb`."""
    mtu = 1500 - overhead("vxlan")
    for host, subnet in zip(tb.hosts, subnets, strict=True):
        for argv in vxlan_device_argv(host, subnet, mtu):
            tb.run(host.netns, argv)
        # flannel sets it and ignores a failure (no IPv6 on the host).
        tb.run(host.netns, ["sysctl", "-q", "-w",
                            f"net/ipv6/conf/{FLANNEL_DEVICE}/accept_ra=0"], check=False)
        for peer, peer_subnet in zip(tb.hosts, subnets, strict=True):
            if peer is not host:
                for argv in vxlan_peer_argv(peer, peer_subnet):
                    tb.run(host.netns, argv)
        _install_rules(tb, host, network, subnet)


def program_flannel_host_gw(tb: Testbed, subnets: Sequence[IPv4Net], network: IPv4Net
                            ) -> None:
    """flannel's host-gw backend and its iptables rules on every host of `tb`."""
    for host, subnet in zip(tb.hosts, subnets, strict=True):
        for peer, peer_subnet in zip(tb.hosts, subnets, strict=True):
            if peer is not host:
                for argv in hostgw_peer_argv(peer, peer_subnet):
                    tb.run(host.netns, argv)
        _install_rules(tb, host, network, subnet)
