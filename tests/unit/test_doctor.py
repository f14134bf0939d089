"""`weft doctor`'s checks, pure: each one passes on a healthy host's facts and fails (or
warns) with what to do when one fact is broken."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.agent import doctor
from weft.agent.doctor import BridgeFact, Facts, LeaseFact

NET = ipaddress.ip_network
IP = ipaddress.ip_address

AGENT: dict[str, Any] = {
    "subnet": "198.19.5.0/24", "public_ip": "198.18.0.11", "backend": "vxlan",
    "network": "198.19.0.0/16", "mtu": 1450, "underlay_iface": "eth0", "encap_port": 8472,
    "devices": ["weft.vx1"],
    "peer_health": {"peers": {
        "198.19.7.0/24": {"public_ip": "198.18.0.12", "plane": "vxlan", "state": "reachable",
                          "since_s": 30.0, "pmtu": 1450}}},
}
ENV = ("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.5.1/24\nFLANNEL_MTU=1450\n"
       "FLANNEL_IPMASQ=true\n")
FORWARD = ("-P FORWARD DROP\n-A FORWARD -i weft.vx1 -d 198.19.0.0/16 -m comment --comment "
           '"weft: overlay traffic" -j ACCEPT\n-A FORWARD -j DOCKER-USER\n'
           "-A FORWARD -s 198.19.0.0/16 -d 198.19.0.0/16 -i weft0 -o weft0 -m comment "
           '--comment "weft: overlay traffic" -j ACCEPT\n')
WEFT0_ACCEPT = FORWARD.splitlines(keepends=True)[-1]
HEALTHY = Facts(
    agent=AGENT,
    leases=[LeaseFact(NET("198.19.5.0/24"), IP("198.18.0.11"), 3000.0),
            LeaseFact(NET("198.19.7.0/24"), IP("198.18.0.12"), 3000.0)],
    addresses={"eth0": (IP("198.18.0.11"),), "lo": (IP("127.0.0.1"),)},
    subnet_env_path="/run/weft/subnet.env", subnet_env=ENV,
    docker=BridgeFact("docker0", (ipaddress.ip_interface("198.19.5.1/24"),), 1450),
    bridges=[BridgeFact("weft0", (ipaddress.ip_interface("198.19.5.1/24"),), 1450, ports=2)],
    iptables_forward=FORWARD, iptables_input="-P INPUT ACCEPT\n",
    nft={"nftables": []},
    sysctl={"net/bridge/bridge-nf-call-iptables": "1", "net/ipv4/conf/all/rp_filter": "0",
            "net/ipv4/conf/weft.vx1/rp_filter": "2"},
    tx_checksum={"weft.vx1": True}, kernel=(6, 1),
)


def agent(**changes: Any) -> dict[str, Any]:
    return {**AGENT, **changes}


def one(facts: Facts, name: str) -> doctor.Check:
    return next(c for c in doctor.diagnose(facts) if c.name == name)


def test_a_healthy_host_passes_every_check() -> None:
    checks = doctor.diagnose(HEALTHY)
    assert [c for c in checks if c.result != "pass"] == []
    assert doctor.exit_status(checks) == 0


def peers(**row: Any) -> dict[str, Any]:
    base = AGENT["peer_health"]["peers"]["198.19.7.0/24"]
    return agent(peer_health={"peers": {"198.19.7.0/24": {**base, **row}}})


BROKEN = [
    ("agent", {"agent": None, "agent_error": "no agent answers at /var/lib/weft/agent.sock"},
     "fail", "start it (`systemctl start weft`)"),
    ("lease", {"addresses": {"eth0": (IP("198.18.0.99"),)}}, "fail",
     "no longer on eth0 (it has 198.18.0.99): peers send to an address this host does not "
     "have; restart the agent"),
    ("lease", {"leases": []}, "fail", "the store holds no lease for 198.19.5.0/24"),
    ("lease", {"leases": [LeaseFact(NET("198.19.5.0/24"), IP("198.18.0.11"), -5.0)]}, "fail",
     "expired"),
    ("subnet.env", {"subnet_env": None}, "fail", "/run/weft/subnet.env is missing"),
    ("subnet.env", {"subnet_env": ENV.replace("198.19.5.1", "198.19.9.1")}, "fail",
     "stale: FLANNEL_SUBNET=198.19.9.1/24 is not in the lease's 198.19.5.0/24"),
    ("subnet.env", {"subnet_env": ENV.replace("1450", "1500")}, "fail",
     "FLANNEL_MTU=1500, the overlay's is 1450"),
    ("store", {"store_error": "etcd at 198.18.0.1:2379 does not answer"}, "fail",
     "check --store"),
    ("store", {"config_error": "Backend.Type 'vxlann' is not one of"}, "fail",
     "fix it with `weft config set FILE`"),
    ("duplicate address", {"leases": [
        LeaseFact(NET("198.19.5.0/24"), IP("198.18.0.11"), 3000.0),
        LeaseFact(NET("198.19.6.0/24"), IP("198.18.0.11"), 3000.0)]}, "fail",
     "2 leases name this host's address 198.18.0.11: 198.19.5.0/24, 198.19.6.0/24"),
    ("peers", {"agent": peers(state="unreachable", since_s=42.0)}, "fail",
     "1 of 1 peers unreachable: 198.19.7.0/24 (198.18.0.12) on vxlan for 42s: check that "
     "their agent runs"),
    ("MTU", {"agent": peers(pmtu=576)}, "fail",
     "the overlay MTU 1450 does not fit the path to 1 peer(s): 198.19.7.0/24 (198.18.0.12) "
     "passes 576"),
    ("FORWARD", {"iptables_forward": "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n"}, "fail",
     "the FORWARD policy is DROP (Docker sets it) and weft's accepts are missing"),
    ("FORWARD", {"iptables_forward": "-P FORWARD ACCEPT\n-A FORWARD -s 198.19.0.0/16 -j DROP\n"
                 + FORWARD.split("\n", 1)[1]}, "fail", "a rule before weft's accepts drops"),
    ("other rules", {"iptables_input": "-A INPUT -p udp -m udp --dport 8472 -j DROP\n"},
     "fail", "drops UDP port 8472"),
    ("other rules", {"nft": {"nftables": [{"chain": {
        "family": "inet", "table": "firewalld", "name": "fwd", "hook": "forward",
        "policy": "drop"}}]}}, "fail", "inet firewalld fwd drops forwarded packets"),
    ("other rules", {"nft": {"nftables": [{"rule": {
        "family": "inet", "table": "fw", "chain": "in", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": 8472}}, {"drop": None}]}}]}}, "fail",
     "nftables inet fw in drops UDP port 8472"),
    ("br_netfilter", {"iptables_forward": FORWARD.replace(WEFT0_ACCEPT, "")}, "fail",
     "bridge-nf-call-iptables=1 sends packets between containers on weft0 through FORWARD "
     "(policy DROP) and no rule accepts them: containers on this host cannot reach each "
     "other; the agent adds its accept for weft0 on its next pass"),
    # An accept narrower than the bridge's whole traffic does not count.
    ("br_netfilter", {"iptables_forward": FORWARD.replace(
        WEFT0_ACCEPT, "-A FORWARD -i weft0 -o weft0 -p tcp -j ACCEPT\n")}, "fail",
     "no rule accepts them"),
    # The operator's own accept (the advice of earlier releases) is as good as weft's.
    ("br_netfilter", {"iptables_forward": FORWARD.replace(
        WEFT0_ACCEPT, "-A FORWARD -i weft0 -o weft0 -j ACCEPT\n")}, "pass",
     "every container bridge's own traffic is accepted"),
    ("br_netfilter", {"bridges": [BridgeFact("docker0", (), 1450, ports=2)]}, "fail",
     "`iptables -I FORWARD -i docker0 -o docker0 -j ACCEPT` (dockerd adds it unless started "
     "with --icc=false)"),
    ("rp_filter", {"sysctl": {"net/ipv4/conf/all/rp_filter": "1",
                              "net/ipv4/conf/weft.vx1/rp_filter": "0"}}, "warn",
     "net.ipv4.conf.weft.vx1.rp_filter=2"),
    ("rp_filter", {"agent": agent(backend="auto"),
                   "sysctl": {"net/ipv4/conf/weft.vx1/rp_filter": "1"}}, "fail",
     "strict reverse-path filtering on weft.vx1"),
    ("VXLAN offload", {"kernel": (5, 4)}, "warn",
     "ethtool -K weft.vx1 tx-checksum-ip-generic off"),
    ("Docker", {"docker": BridgeFact("docker0", (ipaddress.ip_interface("172.17.0.1/16"),),
                                     1500)}, "fail",
     "docker0 has 172.17.0.1/16, not in this host's subnet 198.19.5.0/24: containers get "
     "addresses no peer routes to; start dockerd with `$(weft docker-opts)`"),
    # A bridge with no container on it says nothing of dockerd's --mtu: no failure.
    ("Docker", {"docker": BridgeFact("docker0", (ipaddress.ip_interface("198.19.5.1/24"),),
                                     1500, ports=0)}, "pass", "no container yet"),
    ("Docker", {"docker": BridgeFact("docker0", (ipaddress.ip_interface("198.19.5.1/24"),),
                                     1500)}, "fail", "docker0 has MTU 1500, the overlay's"),
]


@pytest.mark.parametrize(("name", "change", "result", "advice"), BROKEN,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_each_broken_fact_fails_its_check_with_advice(name: str, change: dict[str, Any],
                                                      result: str, advice: str) -> None:
    check = one(dataclasses.replace(HEALTHY, **change), name)
    assert check.result == result, check
    assert advice in check.message
    assert "\n" not in check.message  # one line each
    if result == "fail":
        assert doctor.exit_status(doctor.diagnose(dataclasses.replace(HEALTHY, **change))) == 1


def test_nothing_there_is_a_pass_not_a_failure() -> None:
    bare = dataclasses.replace(HEALTHY, docker=None, iptables_forward=None, nft=None,
                               iptables_input=None, sysctl={}, tx_checksum={})
    for name in ("Docker", "FORWARD", "other rules", "br_netfilter", "VXLAN offload"):
        assert one(bare, name).result == "pass"


A, B, C = "198.19.1.0/24", "198.19.2.0/24", "198.19.3.0/24"
NAMES = {A: "198.18.0.11", B: "198.18.0.12", C: "198.18.0.13"}
View = doctor.View
ALL_WELL = View(frozenset())


def pairs(own: str, views: dict[str, doctor.View | None]) -> list[tuple[str, str, str, str]]:
    return [(f.source, f.target, f.broken, f.other_way)
            for f in doctor.mesh(own, views, NAMES)]


def test_the_mesh_names_the_way_that_fails_seen_from_a_third_host() -> None:
    """B's packets are dropped on their way to C (C's firewall): B cannot reach C but
    hears C's probes; C hears nothing from B. Seen from A, which reaches both."""
    views: dict[str, doctor.View | None] = {
        A: ALL_WELL,
        B: View(frozenset({C}), hears=frozenset({C})),
        C: View(frozenset({B})),
    }
    failures = doctor.mesh(A, views, NAMES)
    assert [(f.source, f.target, f.broken, f.other_way) for f in failures] == \
        [(B, C, "one way", "works")]
    assert failures[0].message.startswith(
        f"{B} -> {C}: packets from {B} (198.18.0.12) do not arrive at {C} (198.18.0.13); "
        "the other way works: look for what drops 198.18.0.12's packets on 198.18.0.13")
    assert failures[0].as_json()["from"] == B


def test_the_mesh_names_the_way_that_fails_from_either_side_of_the_pair() -> None:
    # From B: C's answer to B's request is lost with B's request (it never arrives), but
    # B hears C, so the way from B to C is the broken one.
    assert pairs(B, {A: ALL_WELL, B: View(frozenset({C}), hears=frozenset({C})),
                     C: None}) == [(B, C, "one way", "works")]
    # From C: B did not answer, C hears nothing from B, yet A reaches B: B's agent runs, so
    # the way from B to C is broken; the other way is not known from here.
    failures = doctor.mesh(C, {A: ALL_WELL, B: None, C: View(frozenset({B}))}, NAMES)
    assert [(f.source, f.target, f.broken, f.other_way) for f in failures] == \
        [(B, C, "one way", "unknown")]
    assert f"{B}'s agent runs ({A} hears or reaches it), the other way is unknown" in \
        failures[0].message
    # Two hosts, B's ingress port blocked: A's request dies on B, B does not answer, but
    # B's probes arrive at A: B runs, and the way from A to B is named, once.
    assert pairs(A, {A: View(frozenset({B}), hears=frozenset({B})), B: None}) == \
        [(A, B, "one way", "works")]


def test_the_mesh_tells_both_ways_an_mtu_and_a_stopped_agent_apart() -> None:
    # Neither hears the other, both run: broken both ways.
    assert pairs(A, {A: ALL_WELL, B: View(frozenset({C})), C: View(frozenset({B}))}) == \
        [(B, C, "both ways", "broken")]
    # Each hears the other (the small probes pass), yet neither reaches the other.
    assert pairs(A, {A: ALL_WELL, B: View(frozenset({C}), frozenset({C})),
                     C: View(frozenset({B}), frozenset({B}))}) == [(B, C, "partly", "works")]
    # C's agent stopped: no answer, nobody reaches or hears it: one line, for C.
    failures = doctor.mesh(A, {A: View(frozenset({C})), B: View(frozenset({C})), C: None},
                           NAMES)
    assert [(f.source, f.target, f.broken) for f in failures] == [(A, C, "no answer")]
    assert failures[0].message == (f"{C}: no answer to {A} (its agent down, or the path "
                                   "between the two broken)")
    # All well: nothing.
    assert pairs(A, {A: ALL_WELL, B: ALL_WELL, C: ALL_WELL}) == []


def test_a_view_cut_short_or_with_unprobed_peers_proves_nothing_reachable() -> None:
    summary = {"counts": {"unknown": 1}, "unreachable": [C], "hears": [C]}
    assert doctor.view_of_summary(summary) == View(frozenset({C}), frozenset({C}), False)
    rows: dict[str, dict[str, Any]] = {B: {"state": "unreachable", "hears": True},
                                       C: {"state": "reachable"}}
    assert doctor.view_of_rows(rows) == View(frozenset({B}), frozenset({B}), True)
    # B answered with a list cut short: it proves nothing about C, which did not answer.
    cut = View(frozenset(), complete=False)
    assert pairs(A, {A: View(frozenset({C})), B: cut, C: None}) == \
        [(A, C, "no answer", "unknown")]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20)
SUMMARY_KEYS = st.sampled_from(["counts", "unreachable", "hears", "truncated", "unknown"])


@given(st.one_of(JSON, st.dictionaries(SUMMARY_KEYS, JSON)))
def test_a_peers_malformed_summary_is_no_answer_never_a_crash(summary: Any) -> None:
    """A peer's agent answers what it likes: the cluster view reads a well-formed summary,
    takes any other as no answer, and never fails on one."""
    view = doctor.view_of_summary(summary)
    well_formed = isinstance(summary, dict) and isinstance(summary.get("counts") or {}, dict) \
        and all(isinstance(summary.get(k) or [], list)
                and all(isinstance(n, str) for n in summary.get(k) or [])
                for k in ("unreachable", "hears"))
    assert (view is not None) == well_formed
    doctor.mesh(A, {A: ALL_WELL, B: view, C: ALL_WELL}, NAMES)
