"""The network config: every mistake is one clear message naming the field and value."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.backends.registry import parse_config
from weft.backends.udp.options import UdpOptions
from weft.backends.vxlan.options import VxlanOptions
from weft.backends.wireguard.options import WireguardOptions
from weft.core.errors import ConfigError, NetworkFull
from weft.core.lease import all_subnets, choose_subnet, subnet_in_range


def test_defaults_follow_flannel() -> None:
    c = parse_config('{"Network": "10.244.0.0/16"}')
    assert c.length == 24
    assert isinstance(c.backend, VxlanOptions)
    assert (c.backend.vni, c.backend.port, c.backend.direct_routing) == (1, 8472, False)
    assert str(c.first_subnet) == "10.244.1.0/24"  # the zero subnet shares Network's address
    assert str(c.last_subnet) == "10.244.255.0/24"
    assert c.capacity == 255


def test_backend_options_are_typed_per_backend() -> None:
    c = parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7, '
                     '"Port": 4789, "DirectRouting": true, "MTU": 1400}}')
    assert isinstance(c.backend, VxlanOptions)
    assert (c.backend.vni, c.backend.port, c.backend.direct_routing, c.backend.mtu) == (
        7, 4789, True, 1400)
    assert isinstance(parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}}')
                      .backend, UdpOptions)
    wg = parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "wireguard"}}').backend
    assert isinstance(wg, WireguardOptions)
    assert wg.listen_port == 51820


def test_round_trip_through_json() -> None:
    text = ('{"Network": "198.19.0.0/16", "SubnetLen": 26, "SubnetMin": "198.19.1.0", '
            '"SubnetMax": "198.19.9.192", "Backend": {"Type": "host-gw"}}')
    c = parse_config(text)
    assert parse_config(c.to_json()) == c
    vx = parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan", "VNI": 9, "DirectRouting": true}}')
    assert parse_config(vx.to_json()) == vx  # backend options survive the store


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"Network": "10.0.0.0/8", "SubnetLen": 4}', "SubnetLen 4 must be longer than the Network prefix /8"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.9.0.0"}', "SubnetMin 10.9.0.0 is outside Network 10.244.0.0/16"),
        ('{"Network": "10.244.0.0/16", "SubnetMax": "192.168.0.0"}', "SubnetMax 192.168.0.0 is outside Network"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.5"}', "SubnetMin 10.244.1.5 is not the start of a /24 subnet"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.2.0"}', "SubnetMin 10.244.9.0 is after SubnetMax 10.244.2.0"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "foo"}}', "unknown backend Type 'foo'"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0}}', "Backend.VNI"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}', "Backend.Port"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Colour": 1}}', "Backend.Colour: unknown field"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "PSK": "short"}}', "Backend.PSK"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', "SubnetLen 31 leaves no room"),
        ('{"Network": "10.244.1.0/16"}', "Network: 10.244.1.0/16 has host bits set"),
        ('{"Network": "not-a-net"}', "Network:"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": "x"}', "SubnetLen:"),
        ('{"Network": "10.244.0.0/16", "Extra": true}', "Extra: unknown field"),
        ('{"SubnetLen": 24}', "Network: required"),
        ("{bad json", "config is not valid JSON"),
        ("[1, 2]", "config must be a JSON object"),
    ],
)
def test_each_mistake_has_its_message(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert expected in str(info.value)


@st.composite
def valid_configs(draw: st.DrawFn) -> str:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(min_value=8 if version == 4 else 16, max_value=bits - 8))
    base = draw(st.integers(min_value=0, max_value=(1 << bits) - 1)) >> (bits - prefix) << (bits - prefix)
    net_type = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    net = net_type((base, prefix))
    length = draw(st.integers(min_value=prefix + 1, max_value=min(prefix + 12, bits - 2)))
    step = 1 << (bits - length)
    count = 1 << (length - prefix)
    lo = draw(st.integers(min_value=0, max_value=count - 1))
    hi = draw(st.integers(min_value=lo, max_value=count - 1))
    cfg: dict[str, object] = {"Network": str(net), "SubnetLen": length}
    if draw(st.booleans()):
        cfg["SubnetMin"] = str(net.network_address + lo * step)
        cfg["SubnetMax"] = str(net.network_address + hi * step)
    return json.dumps(cfg)


@settings(max_examples=200, deadline=None)
@given(valid_configs(), st.integers(min_value=0, max_value=40), st.randoms())
def test_every_allocated_subnet_is_in_range(text: str, taken_count: int, rng: random.Random) -> None:
    config = parse_config(text)
    taken: set[object] = set()
    for _ in range(min(taken_count, config.capacity)):
        subnet = choose_subnet(config, taken, rng)  # type: ignore[arg-type]
        assert subnet not in taken
        assert subnet.prefixlen == config.length
        assert subnet.subnet_of(config.network)  # type: ignore[arg-type]
        assert subnet_in_range(config, subnet)
        taken.add(subnet)
    if len(taken) == config.capacity:
        with pytest.raises(NetworkFull, match="no free subnet"):
            choose_subnet(config, taken, rng)  # type: ignore[arg-type]


def test_capacity_matches_enumeration() -> None:
    c = parse_config('{"Network": "198.19.0.0/24", "SubnetLen": 29}')
    assert len(list(all_subnets(c))) == c.capacity == 31


def test_core_parses_with_the_backend_types_it_is_handed() -> None:
    """core knows no backend: the registry hands its parser the options models."""
    from weft.backends.hostgw.options import HostGwOptions
    from weft.core import config as core_config

    types = core_config.BackendTypes({"host-gw": HostGwOptions}, "host-gw")
    assert isinstance(core_config.parse_config('{"Network": "198.19.0.0/16"}', types).backend,
                      HostGwOptions)
    with pytest.raises(ConfigError, match="unknown backend Type 'vxlan'; known types: host-gw"):
        core_config.parse_config(
            '{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}', types)
