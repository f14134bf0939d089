"""The ingress filter by difference (pure): over a table of event sequences, applying each
step's element delta to the sets gives exactly the sets of a full rebuild, and a plan
updated from a store event's changed peers alone is the plan rebuilt from all of them; a
plan of another shape is not delta-able; `nft list` text is split into skeleton and
elements."""

from __future__ import annotations

import ipaddress
import re

import pytest

from ingress_plans import ingress_plan_for
from weft.backends.registry import parse_config
from weft.core.config import NetworkConfig
from weft.core.events import diff_peers
from weft.core.lease import Lease
from weft.host.ingress_rules import (
    ingress_delta,
    ingress_update,
    member_elements,
    same_shape,
    split_listing,
    subnet_elements,
)

ME = ipaddress.ip_address("198.18.0.1")
MAC = "02:00:00:00:00:02"


def lease(subnet: str, ip: str, backend: str = "vxlan", **data: object) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), backend,
                 data or {"VtepMAC": MAC})


OWN = lease("198.19.0.0/29", "198.18.0.1")
A, B = lease("198.19.0.8/29", "198.18.1.1"), lease("198.19.0.16/29", "198.18.1.2")
B_MOVED = lease("198.19.0.16/29", "198.18.1.9")  # same subnet, new public IP
C_SHARES_B_IP = lease("198.19.0.24/29", "198.18.1.2")
SEQUENCES = {
    "add, add, remove": [[], [A], [A, B], [B]],
    "a peer's IP changes": [[A, B], [A, B_MOVED], [A, B]],
    "two leases share one IP, one goes": [[A, B, C_SHARES_B_IP], [A, C_SHARES_B_IP], [A]],
    "everything goes": [[A, B], []],
}
VXLAN = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 29}')
UDP = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 29, "Backend": {"Type": "udp"}}')

_LINE = re.compile(r"^(add|delete) element inet weft-ingress (members|subnets) \{ (.+) \}$")


@pytest.mark.parametrize("config", [VXLAN, UDP], ids=["vxlan", "udp"])
@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_deltas_give_the_sets_of_a_full_rebuild(config: NetworkConfig,
                                                steps: list[list[Lease]]) -> None:
    plan = ingress_plan_for(config, ME, OWN, steps[0])
    sets = {"members": set(member_elements(plan)), "subnets": set(subnet_elements(plan))}
    for peers in steps[1:]:
        new = ingress_plan_for(config, ME, OWN, peers)
        delta = ingress_delta(plan, new)
        for line in delta.script.splitlines():
            match = _LINE.match(line)
            assert match, line
            op, name, element = match.groups()
            if op == "delete":
                assert element in sets[name]  # nft refuses to delete what is not there
                sets[name].remove(element)
            else:
                assert element not in sets[name]
                sets[name].add(element)
        assert sets == {"members": set(member_elements(new)),
                        "subnets": set(subnet_elements(new))}
        assert list(delta.deleted) == [x for x in delta.script.splitlines()
                                       if x.startswith("delete")]
        plan = new


def test_no_change_is_no_script_and_deletions_come_first() -> None:
    plan = ingress_plan_for(VXLAN, ME, OWN, [A, B])
    assert ingress_delta(plan, plan).script == ""
    lines = ingress_delta(plan, ingress_plan_for(VXLAN, ME, OWN, [A, B_MOVED])).script.splitlines()
    assert lines == ["delete element inet weft-ingress members { 198.18.1.2 }",
                     "add element inet weft-ingress members { 198.18.1.9 }"]


def test_another_backend_or_port_is_not_delta_able() -> None:
    assert not same_shape(ingress_plan_for(VXLAN, ME, OWN, [A]), ingress_plan_for(UDP, ME, OWN, [A]))
    assert same_shape(ingress_plan_for(VXLAN, ME, OWN, [A]), ingress_plan_for(VXLAN, ME, OWN, [A, B]))


LISTING = """table inet weft-ingress {
\tset members {
\t\ttype ipv4_addr
\t\telements = { 198.18.1.1, 198.18.1.2,
\t\t\t     198.18.1.3 }
\t}

\tset subnets {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 198.19.0.0/29, 198.19.0.16 }
\t}

\tset empty {
\t\ttype ipv4_addr
\t}
}
"""


def test_a_listing_splits_into_skeleton_and_elements() -> None:
    skeleton, elements = split_listing(LISTING)
    assert elements == {"members": {"198.18.1.1", "198.18.1.2", "198.18.1.3"},
                        "subnets": {"198.19.0.0/29", "198.19.0.16"}}
    assert "elements" not in skeleton
    assert "set empty" in skeleton
    assert "flags interval" in skeleton


A_NEW_PORT = lease("198.19.0.8/29", "198.18.1.1", "udp", Port=9000)
# Validated views only: two peers never share a PublicIP (core.validate holds one back).
UPDATES = {
    **{name: steps for name, steps in SEQUENCES.items() if "share one IP" not in name},
    "a peer's backend data changes, its IP stays": [[A, B], [A_NEW_PORT, B], [A, B]],
    "this host's address in a peer's lease (no member)": [[A], [A, lease("198.19.0.32/29",
                                                                         "198.18.0.1")]],
    "a peer out of the subnet range": [[A], [A, lease("10.0.0.0/29", "198.18.1.7")]],
}


@pytest.mark.parametrize("config", [VXLAN, UDP], ids=["vxlan", "udp"])
@pytest.mark.parametrize("steps", UPDATES.values(), ids=UPDATES.keys())
def test_a_plan_updated_by_difference_equals_the_plan_rebuilt(
        config: NetworkConfig, steps: list[list[Lease]]) -> None:
    plan = ingress_plan_for(config, ME, OWN, steps[0])
    view = {x.subnet: x for x in steps[0]}
    for peers in steps[1:]:
        new = {x.subnet: x for x in peers}
        diff = diff_peers(view, new)
        plan = ingress_update(config, ME, plan, [view[s] for s in diff.subnets() if s in view],
                              [new[s] for s in diff.subnets() if s in new])
        assert plan == ingress_plan_for(config, ME, OWN, peers)
        view = new
