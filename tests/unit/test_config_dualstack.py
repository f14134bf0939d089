"""Dual stack in flannel's spelling: EnableIPv4, EnableIPv6, IPv6Network, IPv6SubnetLen,
IPv6SubnetMin, IPv6SubnetMax. Single-family configs read as they always did; every mistake
is one message naming the field."""

from __future__ import annotations

import ipaddress
import json

import pytest

from weft.backends.registry import parse_config
from weft.core.errors import ConfigError

DUAL = {"Network": "198.19.0.0/16", "EnableIPv6": True, "IPv6Network": "2001:db8:1::/48"}


_NAMES = ("EnableIPv4", "EnableIPv6", "Network", "SubnetLen", "SubnetMin", "SubnetMax",
          "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax")


def test_dual_stack_defaults_follow_flannel() -> None:
    c = parse_config(json.dumps(DUAL))
    assert c.dual_stack
    assert (c.network, c.length) == (ipaddress.ip_network("198.19.0.0/16"), 24)
    six = c.ipv6
    assert six is not None
    assert six.network == ipaddress.ip_network("2001:db8:1::/48")
    assert six.length == 64
    assert str(six.first) == "2001:db8:1:1::/64"  # the second subnet, as for IPv4
    assert str(six.last) == "2001:db8:1:ffff::/64"
    assert c.networks == (c.network, six.network)
    assert c.capacity == 255  # pairs: the IPv4 side is the smaller


def test_dual_stack_bounds_and_round_trip() -> None:
    c = parse_config(json.dumps({**DUAL, "IPv6SubnetLen": 80, "IPv6SubnetMin": "2001:db8:1:0:1::",
                                 "IPv6SubnetMax": "2001:db8:1:0:3::", "SubnetLen": 26}))
    six = c.ipv6
    assert six is not None
    assert (six.length, str(six.first), str(six.last), six.capacity) == (
        80, "2001:db8:1:0:1::/80", "2001:db8:1:0:3::/80", 3)
    assert c.capacity == 3
    assert parse_config(c.to_json()) == c


@pytest.mark.parametrize("text", [
    '{"Network": "198.19.0.0/16"}',
    '{"Network": "198.19.0.0/16", "EnableIPv4": true, "EnableIPv6": false}',
    '{"Network": "2001:db8:1::/48"}',
])
def test_single_family_configs_are_unchanged(text: str) -> None:
    c = parse_config(text)
    assert not c.dual_stack
    assert c.ipv6 is None
    assert c.networks == (c.network,)
    assert parse_config(c.to_json()) == c


def test_ipv6_only_in_flannels_spelling_reads_as_an_ipv6_network() -> None:
    text = ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "2001:db8:1::/48", '
            '"IPv6SubnetLen": 64, "IPv6SubnetMin": "2001:db8:1:10::"}')
    c = parse_config(text)
    today = parse_config('{"Network": "2001:db8:1::/48", "SubnetMin": "2001:db8:1:10::"}')
    assert not c.dual_stack
    assert (c.network, c.length, c.first_subnet, c.last_subnet, c.capacity) == (
        today.network, today.length, today.first_subnet, today.last_subnet, today.capacity)
    back = json.loads(c.to_json())
    assert "Network" not in back
    assert back["IPv6Network"] == "2001:db8:1::/48"
    assert parse_config(c.to_json()) == c


@pytest.mark.parametrize(("fields", "expected"), [
    ({"EnableIPv6": False}, "IPv6Network: set but EnableIPv6 is not true"),
    ({"EnableIPv6": None, "IPv6Network": None, "IPv6SubnetLen": 64}, "IPv6SubnetLen: set but EnableIPv6 is not true"),
    ({"IPv6Network": None}, "IPv6Network: required when EnableIPv6 is true"),
    ({"Network": None}, "Network: required when EnableIPv4 is true"),
    ({"EnableIPv4": False}, "Network: not used when EnableIPv4 is false; the IPv6 range goes "
                            "in IPv6Network"),
    ({"EnableIPv4": False, "EnableIPv6": False}, "EnableIPv4: false with EnableIPv6 not true "
                                                 "leaves no network"),
    ({"EnableIPv6": "yes"}, "EnableIPv6: Input should be a valid boolean (got 'yes')"),
    ({"EnableIPv4": 0}, "EnableIPv4: Input should be a valid boolean (got 0)"),
    ({"IPv6Network": "198.18.0.0/16"}, "IPv6Network 198.18.0.0/16 must be an IPv6 network in "
                                       "dual stack; the IPv4 range goes in Network"),
    ({"Network": "2001:db8:2::/48"}, "Network 2001:db8:2::/48 must be an IPv4 network in dual "
                                     "stack; the IPv6 range goes in IPv6Network"),
    ({"IPv6Network": "2001:db8:1:1::/48"}, "IPv6Network: 2001:db8:1:1::/48 has host bits set"),
    ({"IPv6Network": "fe80::/1000"}, "IPv6Network:"),
    ({"IPv6SubnetLen": 40}, "IPv6SubnetLen 40 must be longer than the IPv6Network prefix /48"),
    ({"IPv6SubnetLen": 127}, "IPv6SubnetLen 127 leaves no room for hosts in a subnet"),
    ({"IPv6SubnetLen": 129}, "IPv6SubnetLen: Input should be less than or equal to 128"),
    ({"IPv6SubnetMin": "2001:db8:2::"}, "IPv6SubnetMin 2001:db8:2:: is outside IPv6Network "
                                        "2001:db8:1::/48"),
    ({"IPv6SubnetMax": "198.19.0.0"}, "IPv6SubnetMax 198.19.0.0 is outside IPv6Network"),
    ({"IPv6SubnetMin": "2001:db8:1:5::1"}, "IPv6SubnetMin 2001:db8:1:5::1 is not the start of "
                                           "a /64 subnet"),
    ({"IPv6SubnetMin": "2001:db8:1:9::", "IPv6SubnetMax": "2001:db8:1:2::"},
     "IPv6SubnetMin 2001:db8:1:9:: is after IPv6SubnetMax 2001:db8:1:2::"),
    ({"IPv6SubnetMax": "nope"}, "IPv6SubnetMax: 'nope' is not an IP address"),
    ({"IPv6Netwrok": "2001:db8::/32"}, "IPv6Netwrok: unknown field"),
])
def test_each_mistake_is_one_message_naming_the_field(fields: dict[str, object],
                                                      expected: str) -> None:
    data = {k: v for k, v in {**DUAL, **fields}.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(data))
    assert expected in str(err.value)
    field = expected.split(":")[0].split(" ")[0]
    assert str(err.value).startswith(field)
    problems = [p for p in str(err.value).split("; ") if p.split(" ")[0].rstrip(":") in {*_NAMES, field}]
    assert len(problems) == 1, str(err.value)  # one mistake, one message


def test_two_mistakes_are_two_messages() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('{"Network": "198.19.0.0/16", "IPv6Network": "2001:db8::/32", '
                     '"IPv6SubnetLen": 64}')
    assert str(err.value) == (
        "IPv6Network: set but EnableIPv6 is not true; add \"EnableIPv6\": true for dual stack "
        "(got '2001:db8::/32'); IPv6SubnetLen: set but EnableIPv6 is not true; add "
        "\"EnableIPv6\": true for dual stack (got 64)")
