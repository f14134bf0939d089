"""Kernel events as values: what an rtnetlink message means for weft (`kernel_removal`),
and which events are the echoes of weft's own changes (`EchoFilter`)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from weft.agent.triggers import kernel_removal
from weft.core.constants import CNI_BRIDGE, ROUTE_PROTOCOL
from weft.core.dataplane import Route
from weft.core.kernel_events import (
    AddressRemoved,
    EchoFilter,
    FdbRemoved,
    LinkAdded,
    LinkDown,
    LinkRemoved,
    NeighbourRemoved,
    RouteRemoved,
    RuleRemoved,
    concerns_link,
)

DEVICES = {1: "lo", 2: "eth0", 7: "weft.vx1", 8: "weft0"}


class Msg(dict[str, Any]):
    def __init__(self, attrs: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs or {}

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


TABLES = frozenset({0x5701, 0x5703})  # the routing tables a backend's facts name as its own


def removal(msg: Msg) -> object:
    return kernel_removal(msg, DEVICES, "weft", TABLES)


def deleted_route(dst: str, table: int, *, proto: int = ROUTE_PROTOCOL) -> Msg:
    net = ipaddress.ip_network(dst)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    attrs: dict[str, Any] = {"RTA_TABLE": table}
    if net.prefixlen:
        attrs["RTA_DST"] = str(net.network_address)
    return Msg(attrs, event="RTM_DELROUTE", proto=proto, family=family,
               dst_len=net.prefixlen, table=table if table < 256 else 252)


def test_weft_devices_removed_or_down_are_events_others_are_not() -> None:
    assert removal(Msg({"IFLA_IFNAME": "weft.vx1"}, event="RTM_DELLINK")) == \
        LinkRemoved("weft.vx1")
    assert removal(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_DELLINK")) is None
    assert removal(Msg({"IFLA_IFNAME": "weft0"}, event="RTM_NEWLINK", flags=0)) == \
        LinkDown("weft0")
    assert removal(Msg({"IFLA_IFNAME": "weft0"}, event="RTM_NEWLINK", flags=1)) is None
    assert removal(Msg(event="RTM_DELADDR", index=8)) == AddressRemoved("weft0")
    assert removal(Msg(event="RTM_DELADDR", index=2)) is None


def test_a_removed_route_is_keyed_as_weft_names_it_and_only_weft_routes_count() -> None:
    # The key a backend's own removal names (weft.backends.bulk) is the one the kernel
    # reports, so the echo matches by equality: main table, a table > 255 (auto's), IPv6.
    for dst, table in [("198.19.3.0/24", 254), ("198.19.4.0/24", 0x5702),
                       ("2001:db8:3::/64", 254)]:
        route = Route(ipaddress.ip_network(dst), None, 7, table=table)
        assert removal(deleted_route(dst, table)) == RouteRemoved(route.dst, route.table)
    assert removal(deleted_route("198.19.3.0/24", 254)) != \
        RouteRemoved(ipaddress.ip_network("198.19.5.0/24"), 254)
    assert removal(deleted_route("198.19.3.0/24", 254, proto=3)) is None


def test_permanent_neighbours_on_weft_devices_and_rules_of_weft_tables() -> None:
    neighbour = {"NDA_DST": "198.19.3.0", "NDA_LLADDR": "02:00:00:00:00:03"}
    assert removal(Msg(neighbour, event="RTM_DELNEIGH", family=socket.AF_INET, ifindex=7,
                       state=0x80)) == \
        NeighbourRemoved("weft.vx1", ipaddress.ip_address("198.19.3.0"))
    # an FDB entry (the bridge family) is keyed by its MAC, as weft's FdbEntry names it
    fdb = {"NDA_DST": "198.18.0.3", "NDA_LLADDR": "02:00:00:00:00:0A"}
    assert removal(Msg(fdb, event="RTM_DELNEIGH", family=7, ifindex=7, state=0x80)) == \
        FdbRemoved("weft.vx1", "02:00:00:00:00:0a")
    assert removal(Msg(neighbour, event="RTM_DELNEIGH", family=socket.AF_INET, ifindex=7,
                       state=0x02)) is None  # learned, not weft's
    assert removal(Msg(neighbour, event="RTM_DELNEIGH", family=socket.AF_INET, ifindex=2,
                       state=0x80)) is None
    table = 0x5703
    assert removal(Msg({"FRA_TABLE": table}, event="RTM_DELRULE", table=0)) == \
        RuleRemoved(table)
    assert removal(Msg({"FRA_TABLE": 100}, event="RTM_DELRULE", table=100)) is None
    # a rule of a table the backend does not own is not weft's
    assert kernel_removal(Msg({"FRA_TABLE": table}, event="RTM_DELRULE", table=0), DEVICES,
                          "weft") is None


def test_the_logged_reason_reads_as_before() -> None:
    assert str(NeighbourRemoved("weft.vx1", None)) == "neighbour removed on weft.vx1"
    assert str(FdbRemoved("weft.vx1", "02:00:00:00:00:03")) == "neighbour removed on weft.vx1"
    assert str(RuleRemoved(0x5701)) == "routing rule for table 0x5701 removed"
    assert str(LinkRemoved("weft0")) == "link weft0 deleted"


def test_only_events_of_the_bridge_itself_concern_it() -> None:
    assert concerns_link(LinkDown(CNI_BRIDGE), CNI_BRIDGE)
    assert concerns_link(LinkAdded(CNI_BRIDGE), CNI_BRIDGE)
    assert not concerns_link(LinkDown("weft.vx1"), CNI_BRIDGE)
    assert not concerns_link(AddressRemoved(CNI_BRIDGE), CNI_BRIDGE)


def test_an_expected_echo_is_taken_once_and_anything_else_is_a_change() -> None:
    route = RouteRemoved(ipaddress.ip_network("198.19.3.0/24"), 254)
    echoes = EchoFilter()
    echoes.hold()
    fdb = FdbRemoved("weft.vx1", "02:00:00:00:00:03")
    assert echoes.settle([route, fdb]) == []
    assert not echoes.admit(route)
    assert echoes.admit(route)  # a second removal of it is not ours
    assert echoes.admit(RouteRemoved(ipaddress.ip_network("198.19.4.0/24"), 254))
    assert echoes.admit(FdbRemoved("weft.vx1", "02:00:00:00:00:04"))  # another entry
    assert not echoes.admit(fdb)


def test_events_during_an_update_wait_for_what_it_caused() -> None:
    route = RouteRemoved(ipaddress.ip_network("198.19.3.0/24"), 254)
    echoes = EchoFilter()
    echoes.hold()
    assert not echoes.admit(route)  # held: may be the running update's own
    assert not echoes.admit(LinkDown("weft.vx1"))
    assert echoes.settle([route]) == [LinkDown("weft.vx1")]
    assert echoes.admit(LinkDown("weft.vx1"))  # nothing held any more


def test_a_full_pass_forgets_the_echoes_still_expected() -> None:
    route = RouteRemoved(ipaddress.ip_network("198.19.3.0/24"), 254)
    echoes = EchoFilter()
    echoes.hold()
    echoes.settle([route])
    echoes.forget()
    assert echoes.admit(route)
