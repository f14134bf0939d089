"""`Backend` options of the vxlan backend, and the bytes its encapsulation adds."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.core.config import BackendOptions
from weft.core.constants import IP_HEADER, UDP_HEADER, VXLAN_DEVICE_PREFIX, VXLAN_HEADER


class VxlanOptions(BackendOptions):
    type: Literal["vxlan"] = Field(default="vxlan", alias="Type")
    vni: Annotated[int, Field(ge=1, le=16_777_215)] = Field(default=1, alias="VNI")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8472, alias="Port")
    direct_routing: bool = Field(default=False, alias="DirectRouting")


def vxlan_overhead(ip_version: int) -> int:
    """Outer IP + UDP + VXLAN header + the inner Ethernet header."""
    return IP_HEADER[ip_version] + UDP_HEADER + VXLAN_HEADER


def ipv6_device_name(vni: int) -> str | None:
    """The second VXLAN device of dual stack, on the IPv6 underlay (flannel's
    flannel-v6.<VNI>): `weft.vx<VNI>v6`; None when that is longer than a device name may be
    (VNI over 99999: the IPv6 overlay then rides the IPv4 device)."""
    name = f"{VXLAN_DEVICE_PREFIX}{vni}v6"
    return name if len(name) <= 15 else None


def vxlan_ipv6_tunnels(options: VxlanOptions) -> tuple[str, ...]:
    """Dual stack's second device, on the IPv6 underlay, if its name fits."""
    six = ipv6_device_name(options.vni)
    return () if six is None else (six,)


def vxlan_facts(options: VxlanOptions, underlay: str) -> BackendFacts:
    """One VXLAN device; with DirectRouting, peers on the same link are plain routes over
    the underlay (so the fast path, which serves the devices packets arrive on
    decapsulated, is not used: they would arrive on the underlay too)."""
    device = f"{VXLAN_DEVICE_PREFIX}{options.vni}"
    return BackendFacts(by_ip_version(vxlan_overhead), encap_port=options.port,
                        tunnels=(device,),
                        bare_underlay=underlay if options.direct_routing else None,
                        arrival=None if options.direct_routing else device)


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def vxlan_data_problem(data: Mapping[str, Any]) -> str | None:
    """Why a peer's vxlan BackendData cannot be programmed, or None."""
    mac = data.get("VtepMAC")
    if not isinstance(mac, str) or not _MAC.match(mac.lower()):
        return f"VtepMAC {mac!r} is not a MAC address like 02:42:c0:a8:00:01"
    if int(mac[:2], 16) & 1 or mac.lower() == "00:00:00:00:00:00":
        return f"VtepMAC {mac!r} is not a unicast MAC address"
    return None


VXLAN_BACKEND = BackendSpec(VxlanOptions, "weft.backends.vxlan.apply:VxlanBackend", vxlan_facts,
                            vxlan_overhead, vxlan_data_problem, no_dual_stack=None,
                            ipv6_tunnels=vxlan_ipv6_tunnels)
