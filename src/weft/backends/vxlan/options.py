"""`Backend` options of the vxlan backend, and the bytes its encapsulation adds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weft.core.config import BackendOptions
from weft.core.constants import IP_HEADER, UDP_HEADER, VXLAN_HEADER


class VxlanOptions(BackendOptions):
    type: Literal["vxlan"] = Field(default="vxlan", alias="Type")
    vni: Annotated[int, Field(ge=1, le=16_777_215)] = Field(default=1, alias="VNI")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8472, alias="Port")
    direct_routing: bool = Field(default=False, alias="DirectRouting")


def vxlan_overhead(ip_version: int) -> int:
    """Outer IP + UDP + VXLAN header + the inner Ethernet header."""
    return IP_HEADER[ip_version] + UDP_HEADER + VXLAN_HEADER
