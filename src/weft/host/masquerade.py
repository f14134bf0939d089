"""Masquerade for traffic leaving the overlay, through nftables (one atomic transaction).

The table is replaced whole in one nft transaction, so the rules are never half-applied
and re-running is idempotent. weft owns exactly this table.
"""

from __future__ import annotations

from weft.core.config import IPNetwork
from weft.core.constants import NFT_TABLE
from weft.host.nftables import apply_nft, table_exists


def masquerade_ruleset(network: IPNetwork, subnet: IPNetwork) -> str:
    """The nft script for `network` (pure). Traffic between overlay addresses keeps its
    source; overlay -> outside is masqueraded (not multicast); outside -> another host's
    subnet is masqueraded so replies come back through this host.

    No forward chain: unlike iptables' single FORWARD chain, an `accept` in weft's own
    table cannot overrule a drop in another table (nftables runs every base chain), so it
    would only cost a rule walk per forwarded packet."""
    fam, ip = ("ip", "ip") if network.version == 4 else ("ip6", "ip6")
    mcast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    return f"""\
table {fam} {NFT_TABLE} {{}}
delete table {fam} {NFT_TABLE}
table {fam} {NFT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {ip} saddr {network} {ip} daddr {network} return
        {ip} saddr {network} {ip} daddr {mcast} return
        {ip} saddr {network} masquerade fully-random
        {ip} saddr != {network} {ip} daddr {subnet} return
        {ip} saddr != {network} {ip} daddr {network} masquerade fully-random
    }}
}}
"""


def install_masquerade(network: IPNetwork, subnet: IPNetwork) -> None:
    apply_nft(masquerade_ruleset(network, subnet))


def remove_masquerade(network: IPNetwork) -> None:
    fam = "ip" if network.version == 4 else "ip6"
    apply_nft(f"table {fam} {NFT_TABLE} {{}}\ndelete table {fam} {NFT_TABLE}\n")


def ensure_masquerade(network: IPNetwork, subnet: IPNetwork) -> bool:
    """Install the table if it is missing (flushed, deleted); True if it had to be."""
    if table_exists("ip" if network.version == 4 else "ip6", NFT_TABLE):
        return False
    install_masquerade(network, subnet)
    return True
