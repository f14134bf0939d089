"""An anti-spoofing guard for the wireguard backend (nftables, one atomic transaction).

WireGuard authenticates every packet it decrypts: a peer may only send from the subnet in
its allowed IPs. That check is worthless if a forged packet can skip the tunnel: with
forwarding on, a neighbour on the underlay could send plaintext claiming a container's
address and the host would forward it. With this backend every packet from one overlay
address to another crosses hosts through the WireGuard device, so one arriving on the
underlay interface is forged, and is dropped (and counted)
before routing. (Overlay-sourced packets to underlay addresses are left alone: without
masquerade, a container may reach another host's own address that way.)

The table is weft's own and replaced whole (`nft -f`), so it is never half-applied.
"""

from __future__ import annotations

from weft.core.config import IPNetwork
from weft.core.errors import KernelError
from weft.host.nftables import apply_nft

GUARD_TABLE = "weft-wireguard"


def _valid_ifname(name: str) -> bool:
    return 0 < len(name) <= 15 and all(c.isalnum() or c in "-_.@" for c in name)


def guard_ruleset(network: IPNetwork, underlay_ifname: str) -> str:
    """The nft script (pure)."""
    if not _valid_ifname(underlay_ifname):
        raise ValueError(f"underlay interface name {underlay_ifname!r} is not a valid ifname")
    ip = "ip" if network.version == 4 else "ip6"
    return f"""\
table inet {GUARD_TABLE} {{}}
delete table inet {GUARD_TABLE}
table inet {GUARD_TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{underlay_ifname}" {ip} saddr {network} {ip} daddr {network} counter drop
    }}
}}
"""


def install_guard(network: IPNetwork, underlay_ifname: str) -> None:
    try:
        script = guard_ruleset(network, underlay_ifname)
    except ValueError as exc:
        raise KernelError(str(exc)) from None
    apply_nft(script, "the wireguard guard")


def remove_guard() -> None:
    apply_nft(f"table inet {GUARD_TABLE} {{}}\ndelete table inet {GUARD_TABLE}\n")
