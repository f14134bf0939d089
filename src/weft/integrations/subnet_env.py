"""`subnet.env`: the file that tells container runtimes about this host's subnet.

Same variables as flannel's, so anything made for flannel reads it unchanged:

    FLANNEL_NETWORK=10.244.0.0/16
    FLANNEL_SUBNET=10.244.3.1/24
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=true

and in dual stack, after FLANNEL_SUBNET as flannel writes them,

    FLANNEL_IPV6_NETWORK=2001:db8:1::/48
    FLANNEL_IPV6_SUBNET=2001:db8:1:3::1/64
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from weft.core.config import IPNetwork
from weft.core.errors import UsageError
from weft.host.files import write_atomic


@dataclass(frozen=True)
class SubnetEnv:
    network: IPNetwork
    subnet: IPNetwork  # this host's subnet
    mtu: int
    ipmasq: bool
    ipv6_network: IPNetwork | None = None  # dual stack: IPv6Network
    ipv6_subnet: IPNetwork | None = None  # dual stack: this host's IPv6 subnet

    @property
    def gateway(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The bridge address containers route through: the subnet's first host address."""
        return self.subnet.network_address + 1

    @property
    def ipv6_gateway(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """`gateway` of the IPv6 subnet, in dual stack."""
        return None if self.ipv6_subnet is None else self.ipv6_subnet.network_address + 1

    def render(self) -> str:
        six = ""
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            six = (f"FLANNEL_IPV6_NETWORK={self.ipv6_network}\n"
                   f"FLANNEL_IPV6_SUBNET={self.ipv6_gateway}/{self.ipv6_subnet.prefixlen}\n")
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.gateway}/{self.subnet.prefixlen}\n"
            f"{six}"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def parse_subnet_env(text: str, source: str = "subnet.env") -> SubnetEnv:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip().strip('"')
    try:
        network = ipaddress.ip_network(values["FLANNEL_NETWORK"])
        subnet = ipaddress.ip_interface(values["FLANNEL_SUBNET"]).network
        mtu = int(values["FLANNEL_MTU"])
        ipmasq = values.get("FLANNEL_IPMASQ", "false").lower() == "true"
        ipv6_network = ipv6_subnet = None
        if "FLANNEL_IPV6_NETWORK" in values or "FLANNEL_IPV6_SUBNET" in values:
            ipv6_network = ipaddress.IPv6Network(values["FLANNEL_IPV6_NETWORK"])
            ipv6_subnet = ipaddress.IPv6Interface(values["FLANNEL_IPV6_SUBNET"]).network
    except KeyError as exc:
        raise UsageError(f"{source}: {exc.args[0]} is missing") from None
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    return SubnetEnv(network, subnet, mtu, ipmasq, ipv6_network, ipv6_subnet)


def read_subnet_env(path: str | Path) -> SubnetEnv:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(
            f"{path} does not exist: is `weft agent` running on this host?"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    return parse_subnet_env(text, str(path))


def write_subnet_env(path: str | Path, env: SubnetEnv) -> None:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    write_atomic(Path(path), env.render().encode())
