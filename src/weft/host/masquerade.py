"""weft's nftables table: masquerade for traffic leaving the overlay, and conntrack skipped
for traffic that stays in it. One atomic transaction.

The table is replaced whole in one nft transaction, so the rules are never half-applied
and re-running is idempotent. weft owns exactly this table.

Why skip conntrack: a NAT chain turns connection tracking on for every packet of the
namespace, and tracking costs each overlay packet several microseconds and a hash-table
entry, for traffic weft never NATs. A raw-priority output chain (before conntrack) marks
overlay <-> overlay packets and the host's own encapsulated packets `notrack`; arriving
packets are marked by the ingress filter's prerouting chain (weft.host.ingress_rules).

When that is wrong: an untracked reply is never un-NATed. A service DNAT on the client's
host (kube-proxy, Docker's published ports, a REDIRECT) rewrites the request's
destination to an overlay address; the reply comes back overlay -> overlay and must meet
its conntrack entry to get the service address back. So `--overlay-conntrack auto` (the
default) skips tracking only while no other table on the host NATs destinations, and keeps
it as soon as one does (checked again every resync); `untrack` and `track` force one side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from weft.core.config import IPNetwork
from weft.core.constants import NFT_TABLE
from weft.core.errors import UsageError
from weft.host.nftables import apply_nft, read_nft_ruleset, table_exists
from weft.host.untrack import Untrack

ConntrackMode = Literal["auto", "untrack", "track"]
CONNTRACK_MODES: tuple[str, ...] = get_args(ConntrackMode)
# Statements that rewrite a destination, in `nft -j` output (native and iptables-nft's).
_DNAT_STATEMENTS = frozenset({"dnat", "redirect", "tproxy"})
_DNAT_TARGETS = frozenset({"DNAT", "REDIRECT", "TPROXY", "DNPT"})


@dataclass(frozen=True)
class ConntrackDecision:
    mode: ConntrackMode
    untracked: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "overlay": "untracked" if self.untracked else "tracked",
                "reason": self.reason}


def parse_conntrack_mode(text: str) -> ConntrackMode:
    for mode in get_args(ConntrackMode):
        if text == mode:
            return mode  # type: ignore[no-any-return]
    raise UsageError(f"--overlay-conntrack {text!r}: use {', '.join(CONNTRACK_MODES)}")


def dnat_tables(ruleset: Mapping[str, Any], legacy_tables: Iterable[str] = ()) -> list[str]:
    """The tables other than weft's that rewrite destinations, from `nft -j list ruleset`
    and the legacy iptables table names (pure). A legacy `nat` table's rules cannot be read
    without loading modules, so its existence alone counts."""
    found: set[str] = set()
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, Mapping) else None
        if not isinstance(rule, Mapping) or rule.get("table") == NFT_TABLE:
            continue
        for expr in rule.get("expr", []):
            if not isinstance(expr, Mapping):
                continue
            xt = expr.get("xt")
            if _DNAT_STATEMENTS & expr.keys() or (
                    isinstance(xt, Mapping) and xt.get("name") in _DNAT_TARGETS):
                found.add(f"{rule.get('family')} {rule.get('table')}")
    if "nat" in legacy_tables:
        found.add("iptables-legacy nat")
    return sorted(found)


def decide_conntrack(mode: ConntrackMode, dnat: list[str]) -> ConntrackDecision:
    """Whether overlay traffic skips conntrack (pure)."""
    if mode == "track":
        return ConntrackDecision(mode, False, "--overlay-conntrack track")
    if mode == "untrack":
        return ConntrackDecision(mode, True, "--overlay-conntrack untrack"
                                 + (f" (destination NAT in {', '.join(dnat)} will not see "
                                    "its replies)" if dnat else ""))
    if dnat:
        return ConntrackDecision(mode, False, f"destination NAT in {', '.join(dnat)}: "
                                 "its replies over the overlay need conntrack")
    return ConntrackDecision(mode, True, "no destination NAT on this host")


def masquerade_ruleset(network: IPNetwork, subnet: IPNetwork,
                       untrack: Untrack | None = None) -> str:
    """The nft script for `network` (pure). Traffic between overlay addresses keeps its
    source; overlay -> outside is masqueraded (not multicast); outside -> another host's
    subnet is masqueraded so replies come back through this host. With `untrack`,
    overlay <-> overlay and the host's encapsulated packets skip conntrack (so they never
    reach the NAT chain either: it only sees a connection's first packet).

    No forward chain: unlike iptables' single FORWARD chain, an `accept` in weft's own
    table cannot overrule a drop in another table (nftables runs every base chain), so it
    would only cost a rule walk per forwarded packet."""
    fam, ip = ("ip", "ip") if network.version == 4 else ("ip6", "ip6")
    mcast = "224.0.0.0/4" if network.version == 4 else "ff00::/8"
    raw = ""
    if untrack is not None:
        # The table has the overlay's family: the host's encapsulated packets on an
        # underlay of that family (dual stack's IPv6 table: the IPv6 underlay's), and
        # overlay traffic where the decision was made for this family (dual stack's IPv6
        # half stays tracked). Prerouting's notrack rules are the ingress filter's
        # (weft.host.ingress_rules): one base chain per hook fewer for every packet.
        # The encapsulated packets first: every overlay packet a tunnel sends is one.
        lines = [f"{ip} saddr {address} udp dport {port} notrack"
                 for address, port in untrack.encapsulations(network.version)]
        if untrack.own_address.version == network.version:
            lines.append(f"{ip} saddr {network} {ip} daddr {network} notrack")
        body = "".join(f"\n        {line}" for line in lines)
        raw = f"""
    chain raw_output {{
        type filter hook output priority raw; policy accept;{body}
    }}"""
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
    }}{raw}
}}
"""


def legacy_iptables_tables() -> list[str]:
    """Tables of legacy (non-nft) iptables in this namespace; reading the list loads
    nothing."""
    try:
        return Path("/proc/net/ip_tables_names").read_text().split()
    except OSError:
        return []


def host_dnat_tables() -> list[str]:
    text = read_nft_ruleset()
    try:
        ruleset = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        ruleset = {}
    return dnat_tables(ruleset, legacy_iptables_tables())


def install_masquerade(network: IPNetwork, subnet: IPNetwork,
                       untrack: Untrack | None = None) -> None:
    apply_nft(masquerade_ruleset(network, subnet, untrack))


def remove_masquerade(network: IPNetwork) -> None:
    fam = "ip" if network.version == 4 else "ip6"
    apply_nft(f"table {fam} {NFT_TABLE} {{}}\ndelete table {fam} {NFT_TABLE}\n")


def ensure_masquerade(network: IPNetwork, subnet: IPNetwork,
                      untrack: Untrack | None = None) -> bool:
    """Install the table if it is missing (flushed, deleted); True if it had to be."""
    if table_exists("ip" if network.version == 4 else "ip6", NFT_TABLE):
        return False
    install_masquerade(network, subnet, untrack)
    return True
