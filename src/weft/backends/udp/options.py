"""`Backend` options of the udp backend, and the bytes its encapsulation adds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weft.core.config import BackendOptions
from weft.core.constants import IP_HEADER, UDP_ENCAP_HEADER, UDP_HEADER, VNET_HEADER


class UdpOptions(BackendOptions):
    type: Literal["udp"] = Field(default="udp", alias="Type")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8285, alias="Port")
    # The switch for TUN/UDP offloads: kernel regressions in TUN GSO/GRO have bitten every
    # project that relies on them, so an operator can turn them off without a new release.
    offloads: bool = Field(default=True, alias="Offloads")


def udp_overhead(ip_version: int) -> int:
    """Outer IP + UDP + weft's header + the virtio-net header it carries."""
    return IP_HEADER[ip_version] + UDP_HEADER + UDP_ENCAP_HEADER + VNET_HEADER
