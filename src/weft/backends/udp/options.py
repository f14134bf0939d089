"""`Backend` options of the udp backend, and the bytes its encapsulation adds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.core.config import BackendOptions
from weft.core.constants import (
    IP_HEADER,
    UDP_DEVICE,
    UDP_ENCAP_HEADER,
    UDP_HEADER,
    VNET_HEADER,
)


class UdpOptions(BackendOptions):
    type: Literal["udp"] = Field(default="udp", alias="Type")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8285, alias="Port")
    # The switch for TUN/UDP offloads: kernel regressions in TUN GSO/GRO have bitten every
    # project that relies on them, so an operator can turn them off without a new release.
    offloads: bool = Field(default=True, alias="Offloads")


def udp_overhead(ip_version: int) -> int:
    """Outer IP + UDP + weft's header + the virtio-net header it carries."""
    return IP_HEADER[ip_version] + UDP_HEADER + UDP_ENCAP_HEADER + VNET_HEADER


def udp_data_problem(data: Mapping[str, Any]) -> str | None:
    """Why a peer's udp BackendData cannot be used, or None (no Port: the default)."""
    port = data.get("Port", 8285)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return f"Port {port!r} is not a UDP port (1-65535)"
    return None


# In BackendV6Data, true: the forwarder listens on the IPv6 underlay (its second socket,
# on the Port beside it). A host of an earlier weft copies its BackendData there (the same
# {"Port": ...}), so a Port alone cannot tell the two apart; this key can.
IPV6_SOCKET = "IPv6Socket"


def udp_facts(options: UdpOptions, underlay: str) -> BackendFacts:
    """A TUN device; each peer's port is its own (in its lease), so a member is an
    (address, port) pair, on the IPv6 underlay only where the peer has that socket."""
    return BackendFacts(by_ip_version(udp_overhead), encap_port=options.port,
                        members_by_port=True, member6_marker=IPV6_SOCKET,
                        tunnels=(UDP_DEVICE,))


UDP_BACKEND = BackendSpec(UdpOptions, "weft.backends.udp.apply:UdpBackend", udp_facts,
                          udp_overhead, udp_data_problem, no_dual_stack=None)
