"""dockerd flags from `subnet.env`, in the formats flannel's mk-docker-opts.sh offers (pure).

For FLANNEL_SUBNET=10.244.3.1/24, FLANNEL_MTU=1450, FLANNEL_IPMASQ=true:

    flags       --bip=10.244.3.1/24 --ip-masq=false --mtu=1450
    combined    DOCKER_OPTS="--bip=10.244.3.1/24 --ip-masq=false --mtu=1450"
    individual  DOCKER_OPT_BIP="--bip=10.244.3.1/24"
                DOCKER_OPT_IPMASQ="--ip-masq=false"
                DOCKER_OPT_MTU="--mtu=1450"
    env         individual, then combined (mk-docker-opts.sh's default; an EnvironmentFile)
    json        {"bip": "10.244.3.1/24", "ip-masq": false, "mtu": 1450}  (daemon.json keys)

`--ip-masq` is the opposite of FLANNEL_IPMASQ: when weft masquerades traffic leaving the
overlay, docker must not masquerade it a second time.

In dual stack (FLANNEL_IPV6_SUBNET=2001:db8:1:3::1/64) two more, after BIP (mk-docker-opts
has no IPv6 of its own; these are dockerd's flags): DOCKER_OPT_IPV6="--ipv6" and
DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=2001:db8:1:3::/64" (json: "ipv6": true,
"fixed-cidr-v6"): docker0 takes the subnet's first address, as the IPv4 gateway.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Final

from weft.core.errors import UsageError
from weft.integrations.subnet_env import SubnetEnv

DEFAULT_KEY: Final = "DOCKER_OPTS"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DockerOptsFormat(StrEnum):
    FLAGS = "flags"
    COMBINED = "combined"
    INDIVIDUAL = "individual"
    ENV = "env"
    JSON = "json"


def docker_options(env: SubnetEnv, *, ip_masq: bool = True) -> dict[str, str]:
    """The flags by mk-docker-opts' variable suffix (BIP, IPMASQ, MTU), in its order.

    `ip_masq=False` leaves `--ip-masq` out (mk-docker-opts.sh -m, for old dockerd)."""
    if env.subnet.version != 4:
        raise UsageError(f"dockerd's --bip takes an IPv4 subnet; subnet.env has {env.subnet}")
    opts = {"BIP": f"--bip={env.gateway}/{env.subnet.prefixlen}"}
    if env.ipv6_subnet is not None:
        opts["IPV6"] = "--ipv6"
        opts["FIXED_CIDR_V6"] = f"--fixed-cidr-v6={env.ipv6_subnet}"
    if ip_masq:
        opts["IPMASQ"] = f"--ip-masq={'false' if env.ipmasq else 'true'}"
    opts["MTU"] = f"--mtu={env.mtu}"
    return opts


def render_docker_opts(env: SubnetEnv, fmt: DockerOptsFormat | str = DockerOptsFormat.ENV,
                       *, key: str = DEFAULT_KEY, ip_masq: bool = True) -> str:
    """The text `weft docker-opts` prints or writes, ending in a newline."""
    try:
        fmt = DockerOptsFormat(fmt)
    except ValueError:
        choices = ", ".join(f.value for f in DockerOptsFormat)
        raise UsageError(f"unknown format {fmt!r}: use one of {choices}") from None
    if _KEY.fullmatch(key) is None:
        raise UsageError(f"invalid variable name {key!r}: letters, digits and '_'")
    opts = docker_options(env, ip_masq=ip_masq)
    flags = " ".join(opts.values())
    combined = f'{key}="{flags}"\n'
    individual = "".join(f'DOCKER_OPT_{name}="{flag}"\n' for name, flag in opts.items())
    if fmt is DockerOptsFormat.FLAGS:
        return flags + "\n"
    if fmt is DockerOptsFormat.COMBINED:
        return combined
    if fmt is DockerOptsFormat.INDIVIDUAL:
        return individual
    if fmt is DockerOptsFormat.ENV:
        return individual + combined
    daemon: dict[str, object] = {"bip": f"{env.gateway}/{env.subnet.prefixlen}"}
    if env.ipv6_subnet is not None:
        daemon.update({"ipv6": True, "fixed-cidr-v6": str(env.ipv6_subnet)})
    if ip_masq:
        daemon["ip-masq"] = not env.ipmasq
    daemon["mtu"] = env.mtu
    return json.dumps(daemon, indent=2) + "\n"
