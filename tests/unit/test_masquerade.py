"""The masquerade table's pure parts: the ruleset, and when overlay traffic is untracked."""

from __future__ import annotations

import ipaddress

import pytest

from weft.backends.auto.options import AutoOptions
from weft.backends.hostgw.options import HostGwOptions
from weft.backends.registry import backend_facts
from weft.backends.vxlan.options import VxlanOptions
from weft.backends.wireguard.options import WireguardOptions
from weft.core.errors import UsageError
from weft.host.masquerade import (
    decide_conntrack,
    dnat_tables,
    masquerade_ruleset,
    parse_conntrack_mode,
)
from weft.host.untrack import Untrack

NET = ipaddress.ip_network("198.19.0.0/16")
SUBNET = ipaddress.ip_network("198.19.3.0/24")
UNTRACK = Untrack(ipaddress.ip_address("198.19.3.0"), ipaddress.ip_address("198.18.0.11"), 8472)


def _rule(table: str, *expr: object, family: str = "ip") -> dict[str, object]:
    return {"rule": {"family": family, "table": table, "chain": "c", "expr": list(expr)}}


def test_ruleset_untracks_overlay_and_encapsulation_but_not_replies_to_the_host() -> None:
    text = masquerade_ruleset(NET, SUBNET, UNTRACK)
    assert "type filter hook output priority raw" in text
    # Prerouting's notrack rules are the ingress chain's (test_ingress_rules), so the
    # hook has one base chain of weft's, not two.
    assert "hook prerouting" not in text
    assert "ip saddr 198.19.0.0/16 ip daddr 198.19.0.0/16 notrack" in text
    assert "ip saddr 198.18.0.11 udp dport 8472 notrack" in text
    assert "notrack" not in masquerade_ruleset(NET, SUBNET)


def test_an_underlay_of_the_other_family_keeps_its_encapsulation_tracked() -> None:
    v6 = ipaddress.ip_network("2001:db8:1::/48")
    text = masquerade_ruleset(v6, ipaddress.ip_network("2001:db8:1:3::/64"), Untrack(
        ipaddress.ip_address("2001:db8:1:3::"), ipaddress.ip_address("198.18.0.11"), 8472))
    assert "udp dport" not in text
    assert "ip6 saddr 2001:db8:1::/48 ip6 daddr 2001:db8:1::/48 notrack" in text


def test_dual_stack_untracks_each_underlay_s_encapsulation_in_its_family_s_table() -> None:
    """One decision, two tables: `ip weft` untracks the IPv4 underlay's encapsulated
    packets and the IPv4 overlay; `ip6 weft` the IPv6 underlay's (vxlan's second device)
    and not the IPv6 overlay, which stays tracked."""
    untrack = Untrack(ipaddress.ip_address("198.19.3.0"), ipaddress.ip_address("198.18.0.11"),
                      8472, ipaddress.ip_address("2001:db8::11"))
    four = masquerade_ruleset(NET, SUBNET, untrack)
    assert "ip saddr 198.18.0.11 udp dport 8472 notrack" in four
    assert "2001:db8::11" not in four
    v6 = ipaddress.ip_network("2001:db8:1::/48")
    six = masquerade_ruleset(v6, ipaddress.ip_network("2001:db8:1:3::/64"), untrack)
    assert "ip6 saddr 2001:db8::11 udp dport 8472 notrack" in six
    assert "ip6 daddr 2001:db8:1::/48 notrack" not in six
    # wireguard's second device listens on a port of its own.
    other_port = Untrack(untrack.own_address, untrack.public_ip, 51820, untrack.public_ipv6,
                         51821)
    assert "udp dport 51821 notrack" in masquerade_ruleset(
        v6, ipaddress.ip_network("2001:db8:1:3::/64"), other_port)
    assert Untrack(untrack.own_address, untrack.public_ip, None,
                   untrack.public_ipv6).encapsulations(6) == []  # host-gw: nothing encapsulated


def test_destination_nat_is_found_in_native_iptables_nft_and_legacy_tables() -> None:
    ruleset = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        _rule("svc", {"match": {}}, {"dnat": {"addr": "198.19.2.2"}}),
        _rule("nat", {"xt": {"type": "target", "name": "DNAT"}}),
        _rule("filter", {"xt": {"type": "target", "name": "ACCEPT"}}),
        _rule("proxy", {"redirect": {"port": 100}}, family="ip6"),
        _rule("weft", {"dnat": {"addr": "x"}}),  # weft's own table never counts
        _rule("masq", {"masquerade": None}),  # source NAT needs no tracked replies here
    ]}
    assert dnat_tables(ruleset) == ["ip nat", "ip svc", "ip6 proxy"]
    assert dnat_tables({}, ["filter", "nat"]) == ["iptables-legacy nat"]
    assert dnat_tables({"nftables": [{"rule": "bad"}, _rule("t", "bad")]}) == []


def test_decision_per_mode() -> None:
    assert decide_conntrack("auto", []).untracked
    assert not decide_conntrack("auto", ["ip nat"]).untracked
    assert "ip nat" in decide_conntrack("auto", ["ip nat"]).reason
    assert decide_conntrack("untrack", ["ip nat"]).untracked
    assert "will not see its replies" in decide_conntrack("untrack", ["ip nat"]).reason
    assert not decide_conntrack("track", []).untracked
    assert decide_conntrack("auto", []).to_json() == {
        "mode": "auto", "overlay": "untracked", "reason": "no destination NAT on this host"}


def test_mode_and_port_parsing() -> None:
    assert parse_conntrack_mode("untrack") == "untrack"
    with pytest.raises(UsageError, match="auto, untrack, track"):
        parse_conntrack_mode("off")
    assert backend_facts(VxlanOptions(Port=4789), "eth0").encap_port == 4789
    assert backend_facts(WireguardOptions(), "eth0").encap_port == 51820
    assert backend_facts(HostGwOptions(), "eth0").encap_port is None
    # auto: its VXLAN plane's port, as the ingress filter guards it
    assert backend_facts(AutoOptions(VxlanPort=4789), "eth0").encap_port == 4789


def test_forward_accept_only_where_the_chain_could_drop() -> None:
    from weft.host.forward_accept import COMMENT, forward_accept_needed

    assert not forward_accept_needed("-P FORWARD ACCEPT\n")
    assert not forward_accept_needed(
        f'-P FORWARD ACCEPT\n-A FORWARD -s 198.19.0.0/16 -m comment --comment "{COMMENT}" '
        "-j ACCEPT\n")
    assert forward_accept_needed("-P FORWARD DROP\n")
    assert forward_accept_needed("-P FORWARD ACCEPT\n-A FORWARD -j DOCKER-USER\n")


@pytest.mark.parametrize(("backend", "tunnels", "direct"), [
    ({"Type": "host-gw"}, (), "eth0"),
    ({"Type": "vxlan"}, ("weft.vx1",), None),
    ({"Type": "vxlan", "DirectRouting": True}, ("weft.vx1",), "eth0"),
    ({"Type": "udp"}, ("weft.udp0",), None),
    # auto: a peer may be on any of its planes, so a FORWARD drop must miss none of them
    ({"Type": "auto"}, ("weft.vx1", "weft.udp0"), "eth0"),
])
def test_forward_accepts_cover_every_device_overlay_traffic_crosses(
        backend: dict[str, object], tunnels: tuple[str, ...], direct: str | None) -> None:
    import json

    from weft.backends.registry import parse_config
    from weft.host.forward_accept import forward_accept_rules

    config = parse_config(json.dumps({"Network": "198.19.0.0/16", "Backend": backend}))
    facts = backend_facts(config.backend, "eth0")
    assert (facts.tunnels, facts.bare_underlay) == (tunnels, direct)
    rules = forward_accept_rules(config.network, tunnels, direct)
    devices = {r[r.index(flag) + 1] for r in rules for flag in ("-i", "-o") if flag in r}
    assert devices == set(tunnels) | ({direct} if direct else set())


def test_the_bridge_accept_is_container_to_container_on_weft_s_bridge_only() -> None:
    """With br_netfilter, bridged packets on weft0 cross FORWARD as -i weft0 -o weft0: the
    one rule more is scoped to that and to the overlay on both ends."""
    from weft.host.forward_accept import COMMENT, forward_accept_rules, same_rule

    net = ipaddress.ip_network("198.19.0.0/16")
    rules = forward_accept_rules(net, ("weft.vx1",), None, "weft0")
    assert rules[-1] == ["-s", "198.19.0.0/16", "-d", "198.19.0.0/16", "-i", "weft0", "-o",
                         "weft0", "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]
    assert len(forward_accept_rules(net, ("weft.vx1",), None)) == len(rules) - 1
    # `iptables -S` prints the options in its own order: each rule is found as printed.
    listed = ('-A FORWARD -s 198.19.0.0/16 -d 198.19.0.0/16 -i weft0 -o weft0 -m comment '
              f'--comment "{COMMENT}" -j ACCEPT')
    assert same_rule(listed, rules[-1])
    assert same_rule(f'-A FORWARD -d 198.19.0.0/16 -i weft.vx1 -m comment --comment '
                     f'"{COMMENT}" -j ACCEPT', rules[0])
    assert not same_rule(listed, rules[0])
    assert not same_rule("-A FORWARD -i weft0 -o weft0 -j ACCEPT", rules[-1])  # the user's
    assert not same_rule('-A FORWARD -m comment --comment "unclosed', rules[-1])


def test_netfilter_lines_that_wake_the_agent() -> None:
    """`nft monitor` lines (as printed for iptables-nft): removals, and a FORWARD chain that
    could now drop overlay traffic; weft's own accepts wake nothing (no loop)."""
    from weft.agent.triggers import netfilter_change
    from weft.host.forward_accept import COMMENT

    chain = "add chain ip filter FORWARD { type filter hook forward priority filter; policy %s; }"
    assert netfilter_change("delete table ip weft\n") == "netfilter rules removed"
    assert netfilter_change("flush chain ip filter FORWARD\n") == "netfilter rules removed"
    assert netfilter_change(chain % "drop") == "FORWARD policy set to drop"
    assert netfilter_change(chain % "accept") is None
    assert netfilter_change("add rule ip filter FORWARD counter jump DOCKER-USER\n") == \
        "FORWARD rule added"
    assert netfilter_change(f'add rule ip filter FORWARD iifname "weft.vx1" ip daddr '
                            f'198.19.0.0/16 counter comment "{COMMENT}" accept\n') is None
    assert netfilter_change("add rule ip nat POSTROUTING masquerade\n") is None
    assert netfilter_change("# new generation 4 by process 15084 (iptables)\n") is None
    # The monitor's socket overran: the events it dropped may have removed anything.
    assert netfilter_change("# ERROR: We lost some netlink events!\n") == \
        "netfilter events lost"
    # A destination NAT, as `nft monitor` prints iptables-nft's and nft's: decide again.
    from weft.agent.triggers import DESTINATION_NAT_ADDED

    for rule in ("add rule ip nat PREROUTING ip daddr 198.18.200.10 tcp dport 80 counter "
                 "packets 0 bytes 0 dnat to 198.19.1.2:8080",
                 "add rule ip nat OUTPUT tcp dport 81 counter packets 0 bytes 0 redirect to "
                 ":8081",
                 "add rule ip svc pre ip daddr 198.18.200.11 tcp dport 80 dnat to "
                 "198.19.1.3:8080"):
        assert netfilter_change(rule + "\n") == DESTINATION_NAT_ADDED, rule
    assert netfilter_change("add chain ip svc pre { type nat hook prerouting priority dstnat; "
                            "policy accept; }\n") is None


def test_weft_s_own_rules_are_found_whatever_device_they_name() -> None:
    """The rules ensure and remove work from: weft's (its comment) for this network, a
    device no longer used included (dual stack's second tunnel after it was turned off);
    never a rule of the user's, nor weft's for another network."""
    from weft.host.forward_accept import COMMENT, weft_rules

    mark = f'-m comment --comment "{COMMENT}" -j ACCEPT'
    listing = "\n".join([
        "-P FORWARD DROP",
        f"-A FORWARD -d 198.19.0.0/16 -i weft.vx1 {mark}",
        f"-A FORWARD -d 198.19.0.0/16 -i weft.vx1v6 {mark}",  # a device gone from the plan
        "-A FORWARD -d 198.19.0.0/16 -i weft.vx1 -j ACCEPT",  # the user's own
        f"-A FORWARD -d 10.5.0.0/16 -i weft.vx1 {mark}",  # another network's
        '-A FORWARD -m comment --comment "unclosed',
    ])
    assert weft_rules(listing, ipaddress.ip_network("198.19.0.0/16")) == [
        ["-d", "198.19.0.0/16", "-i", "weft.vx1", "-m", "comment", "--comment", COMMENT,
         "-j", "ACCEPT"],
        ["-d", "198.19.0.0/16", "-i", "weft.vx1v6", "-m", "comment", "--comment", COMMENT,
         "-j", "ACCEPT"]]
    assert weft_rules(listing, ipaddress.ip_network("2001:db8:1::/48")) == []
