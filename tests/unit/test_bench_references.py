"""Reference rows: listed beside their backends, flannel's rules and kernel objects, and the
fast path's compile line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from weft.host.fastpath import attach_argv, compile_args
from weft_lab.bench.flannel import (
    flannel_rules,
    hostgw_peer_argv,
    restore_payload,
    vtep_mac,
    vxlan_device_argv,
    vxlan_peer_argv,
)
from weft_lab.bench.references import REFERENCES
from weft_lab.bench.runner import available_backends
from weft_lab.nodes import Host

NETWORK = ipaddress.IPv4Network("198.19.0.0/16")
SUBNET = ipaddress.IPv4Network("198.19.1.0/24")


def test_each_default_reference_sits_just_before_its_backend() -> None:
    names = available_backends()
    for ref in REFERENCES.values():
        if ref.default:
            # Between the backend before it and its own: the kernel path, then flannel's.
            between = names[names.index(ref.name):names.index(ref.beside)]
            assert all(n in REFERENCES for n in between), names
        else:  # experimental rows are measured only when named
            assert ref.name not in names
    assert names[:6] == ["kernel-vxlan", "flannel-vxlan", "vxlan", "kernel-routes",
                         "flannel-host-gw", "host-gw"]


def test_flannel_rules_are_flannels_masquerade_then_forward_rules_in_its_order() -> None:
    payload = restore_payload(flannel_rules(NETWORK, SUBNET))
    masq = '-m comment --comment "flanneld masq"'
    fwd = '-m comment --comment "flanneld forward"'
    assert payload.splitlines() == [
        "*nat",
        f"-A POSTROUTING {masq} -j FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 198.19.1.0/24 -d 198.19.0.0/16 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 198.19.0.0/16 -d 198.19.1.0/24 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 198.19.0.0/16 -d 198.19.1.0/24 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 198.19.0.0/16 ! -d 224.0.0.0/4 {masq} -j MASQUERADE "
        "--random-fully",
        f"-A FLANNEL-POSTRTG ! -s 198.19.0.0/16 -d 198.19.0.0/16 {masq} -j MASQUERADE "
        "--random-fully",
        "COMMIT",
        "*filter",
        f"-A FORWARD {fwd} -j FLANNEL-FWD",
        f"-A FLANNEL-FWD -s 198.19.0.0/16 {fwd} -j ACCEPT",
        f"-A FLANNEL-FWD -d 198.19.0.0/16 {fwd} -j ACCEPT",
        "COMMIT",
    ]
    # An iptables without --random-fully gets the plain MASQUERADE, as go-iptables decides.
    plain = restore_payload(flannel_rules(NETWORK, SUBNET, random_fully=False))
    assert "--random-fully" not in plain
    assert plain.count("-j MASQUERADE\n") == 2


def test_flannel_vxlan_device_and_peer_objects_are_flannels() -> None:
    host = Host(1, "ns-h1", ipaddress.IPv4Address("198.18.0.11"), Path("/nonexistent"))
    peer = Host(2, "ns-h2", ipaddress.IPv4Address("198.18.0.12"), Path("/nonexistent"))
    add, addr, up = vxlan_device_argv(host, SUBNET, 1450)
    # flannel.1, VNI 1, the kernel's port 8472, learning off, no udpcsum given (the
    # kernel's default, as flannel's netlink call sends none), MTU 1500 - 50.
    assert add == ["ip", "link", "add", "flannel.1", "address", vtep_mac(host), "mtu", "1450",
                   "type", "vxlan", "id", "1", "local", "198.18.0.11", "dev", "eth0",
                   "dstport", "8472", "nolearning"]
    assert addr == ["ip", "addr", "add", "198.19.1.0/32", "dev", "flannel.1"]
    assert up == ["ip", "link", "set", "flannel.1", "up"]
    peer_subnet = ipaddress.IPv4Network("198.19.2.0/24")
    arp, fdb, route = vxlan_peer_argv(peer, peer_subnet)
    assert arp == ["ip", "neigh", "replace", "198.19.2.0", "lladdr", vtep_mac(peer), "dev",
                   "flannel.1", "nud", "permanent"]
    assert fdb == ["bridge", "fdb", "replace", vtep_mac(peer), "dev", "flannel.1", "dst",
                   "198.18.0.12", "self", "permanent"]
    assert route == ["ip", "route", "replace", "198.19.2.0/24", "via", "198.19.2.0", "dev",
                     "flannel.1", "onlink"]
    assert hostgw_peer_argv(peer, peer_subnet) == [
        ["ip", "route", "replace", "198.19.2.0/24", "via", "198.18.0.12", "dev", "eth0"]]
    assert vtep_mac(host) != vtep_mac(peer)


def test_fastpath_is_compiled_once_for_every_network() -> None:
    argv = compile_args(Path("f.c"), Path("f.o"))
    assert not [a for a in argv if a.startswith("-D")]  # nothing of a network in it
    assert argv[argv.index("-target"):argv.index("-target") + 2] == ["-target", "bpf"]
    assert attach_argv("eth0", Path("f.o"), "tc/from_underlay")[1][-4:] == [
        "obj", "f.o", "sec", "tc/from_underlay"]
