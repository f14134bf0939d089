"""The fast path's pure parts: where it hooks, its map keys, what wakes its convergence."""

from __future__ import annotations

import ipaddress
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from weft.agent.triggers import tc_hook_change
from weft.backends.registry import backend_facts, parse_config
from weft.core.constants import ROUTE_PROTOCOL
from weft.core.kernel_events import LinkAdded, RouteAdded, TcRemoved
from weft.host.fastpath import FROM_CONTAINER, FROM_UNDERLAY
from weft.host.fastpath_hooks import Hook, plan_hooks, subnet_key


def config(backend: dict[str, Any]) -> Any:
    return parse_config(json.dumps({"Network": "198.19.0.0/16", "Backend": backend}))


def arrival_device(config: Any, underlay: str) -> str | None:
    return backend_facts(config.backend, underlay).arrival


def test_arrival_is_the_underlay_for_host_gw_and_the_vxlan_device_for_vxlan() -> None:
    assert arrival_device(config({"Type": "host-gw"}), "eth0") == "eth0"
    assert arrival_device(config({"Type": "vxlan", "VNI": 7}), "eth0") == "weft.vx7"
    # DirectRouting mixes both; udp and wireguard are userspace or encrypted: no fast path
    assert arrival_device(config({"Type": "vxlan", "DirectRouting": True}), "eth0") is None
    assert arrival_device(config({"Type": "udp"}), "eth0") is None


def test_dual_stack_vxlan_serves_its_ipv6_underlay_device_too() -> None:
    def arrival6(backend: dict[str, Any]) -> tuple[str, ...]:
        return backend_facts(config(backend).backend, "eth0", dual_stack=True).arrival6

    assert arrival6({"Type": "vxlan", "VNI": 7}) == ("weft.vx7v6",)
    assert arrival6({"Type": "host-gw"}) == ()  # both families arrive on the underlay
    assert arrival6({"Type": "vxlan", "DirectRouting": True}) == ()  # no fast path at all
    assert arrival6({"Type": "wireguard"}) == ()
    assert backend_facts(config({"Type": "vxlan"}).backend, "eth0").arrival6 == ()


def test_a_bridge_port_s_hook_knows_its_bridge() -> None:
    from weft.host.fastpath_hooks import BridgeOf, bridge_value

    weft0 = BridgeOf(7, "02:00:00:00:01:02")
    hooks = plan_hooks(["eth0"], ["weft0", "veth1"], {"veth1": weft0})
    assert hooks == [Hook("eth0", FROM_UNDERLAY), Hook("veth1", FROM_CONTAINER, weft0),
                     Hook("weft0", FROM_CONTAINER)]
    # The map value: ifindex (little endian here), MAC, padding; zero off a port.
    assert bridge_value(weft0) == ("7", "0", "0", "0", "2", "0", "0", "0", "1", "2", "0", "0")
    assert bridge_value(None) == ("0",) * 12


def test_hooks_put_the_arrivals_first_and_never_twice() -> None:
    assert plan_hooks(["eth0"], ["veth2", "veth1", "eth0", "veth1"]) == [
        Hook("eth0", FROM_UNDERLAY), Hook("veth1", FROM_CONTAINER), Hook("veth2", FROM_CONTAINER)]
    assert plan_hooks(["weft.vx1", "weft.vx1v6"], ["cni0", "weft.vx1v6"]) == [
        Hook("weft.vx1", FROM_UNDERLAY), Hook("weft.vx1v6", FROM_UNDERLAY),
        Hook("cni0", FROM_CONTAINER)]


def test_subnet_key_is_prefix_length_then_address_in_network_order() -> None:
    assert subnet_key(ipaddress.IPv4Network("198.19.3.0/24")) == [
        "24", "0", "0", "0", "198", "19", "3", "0"]
    # `subnets6`'s key: the same length, then the 16 bytes of the IPv6 address.
    assert subnet_key(ipaddress.IPv6Network("2001:db8:1:a00::/56")) == [
        "56", "0", "0", "0", "32", "1", "13", "184", "0", "1", "10", "0",
        *["0"] * 8]
    assert subnet_key(ipaddress.IPv6Network("2001:db8::1/128"))[:4] == ["128", "0", "0", "0"]
    assert len(subnet_key(ipaddress.IPv6Network("2001:db8::1/128"))) == 20


class Msg(dict[str, Any]):
    def __init__(self, attrs: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs or {}

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_new_links_foreign_routes_and_removed_filters_wake_the_fast_path() -> None:
    known = {1: "lo", 2: "eth0"}
    new = Msg({"IFLA_IFNAME": "veth9"}, event="RTM_NEWLINK", index=9, flags=1)
    assert tc_hook_change(new, known) == LinkAdded("veth9")
    assert tc_hook_change(Msg(event="RTM_NEWLINK", index=2, flags=1), known) is None
    # A known veth put on the CNI bridge (or taken off it): its hook changes.
    masters = {1: 0, 2: 0, 5: 0}
    enslaved = Msg({"IFLA_IFNAME": "veth5", "IFLA_MASTER": 4}, event="RTM_NEWLINK", index=5)
    assert tc_hook_change(enslaved, {**known, 5: "veth5"}, masters) == LinkAdded("veth5")
    assert tc_hook_change(enslaved, {**known, 5: "veth5"}, {**masters, 5: 4}) is None
    assert tc_hook_change(Msg(event="RTM_NEWROUTE", proto=3, table=254, type=1),
                          known) == RouteAdded()
    # weft's own routes do not feed back into a loop
    assert tc_hook_change(Msg(event="RTM_NEWROUTE", proto=ROUTE_PROTOCOL, table=254, type=1),
                          known) is None
    # nor do the kernel's local routes of an address, or another table's routes
    assert tc_hook_change(Msg(event="RTM_NEWROUTE", proto=2, table=255, type=2), known) is None
    assert tc_hook_change(Msg(event="RTM_NEWROUTE", proto=186, table=100, type=1),
                          known) is None
    assert tc_hook_change(Msg(event="RTM_DELTFILTER"), known) == TcRemoved()
    assert tc_hook_change(Msg(event="RTM_NEWTFILTER"), known) is None


def test_where_the_fast_path_cannot_run_the_status_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default; another backend, or a missing tool: the nftables path carries
    everything and `weft status` says why (no kernel is touched here). An IPv6 overlay is
    served like an IPv4 one."""
    from weft.agent import fastpath_state

    monkeypatch.setattr(fastpath_state, "remove_fastpath", lambda: [])
    udp = config({"Type": "udp"})
    state = fastpath_state.FastPathState(True)
    state.start(udp, None, tmp_path)
    assert state.status()["reason"] == ("unavailable: the fast path serves host-gw and vxlan "
                                        "(without DirectRouting), not udp")
    monkeypatch.setattr(fastpath_state, "fastpath_object",
                        lambda out_dir: (out_dir / "fastpath.o", "kept"))
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    v6 = parse_config(json.dumps({"Network": "2001:db8:1::/48", "SubnetLen": 64,
                                  "Backend": {"Type": "host-gw"}}))
    state = fastpath_state.FastPathState(True)
    state.start(v6, "eth0", tmp_path)
    assert state.status()["active"], state.status()
    assert state.status()["reason"] is None
    monkeypatch.setattr(shutil, "which",
                        lambda tool: None if tool == "bpftool" else f"/usr/bin/{tool}")
    state = fastpath_state.FastPathState(True)
    state.start(config({"Type": "host-gw"}), "eth0", tmp_path)
    status = state.status()
    assert not status["active"]
    assert "the fast path needs `bpftool`" in status["reason"], status
    assert fastpath_state.FastPathState(False).status() == {
        "enabled": False, "active": False, "reason": "off (--no-fastpath)"}
