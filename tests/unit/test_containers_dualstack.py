"""Containers in dual stack: what weft-cni hands its delegate and what `weft docker-opts`
gives dockerd, from a dual-stack subnet.env."""

from __future__ import annotations

import ipaddress
import json

import pytest

from weft.integrations.cni.handler import NetConf, delegate_config
from weft.integrations.docker_opts import docker_options, render_docker_opts
from weft.integrations.subnet_env import SubnetEnv

net = ipaddress.ip_network
ENV = SubnetEnv(net("198.19.0.0/16"), net("198.19.3.0/24"), 1450, True,
                net("2001:db8:1::/48"), net("2001:db8:1:3::/64"))


def conf(delegate: dict[str, object]) -> NetConf:
    return NetConf("1.0.0", "weft", "/run/weft/subnet.env", "/var/lib/cni/weft", delegate, {})


def test_cni_gives_one_address_of_each_family() -> None:
    ipam = delegate_config(conf({}), ENV)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "198.19.3.0/24", "gateway": "198.19.3.1"}],
                              [{"subnet": "2001:db8:1:3::/64", "gateway": "2001:db8:1:3::1"}]]
    assert ipam["routes"] == []  # the bridge plugin's default routes, one per family


@pytest.mark.parametrize(("delegate", "routes"), [
    ({"type": "bridge", "isDefaultGateway": False},
     [{"dst": "198.19.0.0/16"}, {"dst": "2001:db8:1::/48"}]),
    ({"type": "ptp"}, [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
])
def test_cni_routes_both_families(delegate: dict[str, object],
                                  routes: list[dict[str, str]]) -> None:
    assert delegate_config(conf(delegate), ENV)["ipam"]["routes"] == routes


def test_docker_opts_give_dockerd_ipv6_on_the_hosts_ipv6_subnet() -> None:
    assert docker_options(ENV) == {"BIP": "--bip=198.19.3.1/24", "IPV6": "--ipv6",
                                   "FIXED_CIDR_V6": "--fixed-cidr-v6=2001:db8:1:3::/64",
                                   "IPMASQ": "--ip-masq=false", "MTU": "--mtu=1450"}
    assert json.loads(render_docker_opts(ENV, "json")) == {
        "bip": "198.19.3.1/24", "ipv6": True, "fixed-cidr-v6": "2001:db8:1:3::/64",
        "ip-masq": False, "mtu": 1450}
    single = SubnetEnv(net("198.19.0.0/16"), net("198.19.3.0/24"), 1450, True)
    assert "IPV6" not in docker_options(single)


def test_bench_ipv6_testbeds_are_dual_stack() -> None:
    """`weft bench --ipv6` measures over IPv6 beside IPv4 in dual-stack testbeds."""
    from weft.backends.registry import parse_config
    from weft_lab.bench.runner import IPV6_SUFFIX, bench_config

    config = parse_config(bench_config("vxlan", dual_stack=True))
    assert config.dual_stack
    assert config.ipv6 is not None
    assert str(config.ipv6.network) == "2001:db8:1::/48"
    assert not parse_config(bench_config("vxlan")).dual_stack
    assert IPV6_SUFFIX == "/ipv6"
