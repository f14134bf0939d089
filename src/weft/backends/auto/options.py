"""`Backend` options of the auto backend, and the bytes its largest encapsulation adds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.backends.udp.options import udp_data_problem, udp_overhead
from weft.backends.vxlan.options import vxlan_data_problem, vxlan_overhead
from weft.core.config import BackendOptions
from weft.core.constants import UDP_DEVICE, VXLAN_DEVICE_PREFIX

# The data planes auto may choose, fastest first. Never wireguard: an encrypted network
# is chosen by hand, and auto must never fall back from it to plaintext.
PLANES: tuple[str, ...] = ("host-gw", "vxlan", "udp")
# How each plane is named in the lease's BackendData.
DATA_KEYS: Mapping[str, str] = {"host-gw": "hostgw", "vxlan": "vxlan", "udp": "udp"}
# Per plane, a routing table and the fwmark that selects it: a probe socket marked for a
# plane is routed by that plane's table whatever the main table chose for the peer. The
# table number doubles as the mark; the rules sit before main.
AUTO_TABLES: Mapping[str, int] = {"host-gw": 0x5701, "vxlan": 0x5702, "udp": 0x5703}
AUTO_RULE_PRIORITY = 0x5700


class AutoOptions(BackendOptions):
    type: Literal["auto"] = Field(default="auto", alias="Type")
    vni: Annotated[int, Field(ge=1, le=16_777_215)] = Field(default=1, alias="VNI")
    vxlan_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8472, alias="VxlanPort")
    udp_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8285, alias="UdpPort")
    # The probe responder's port on the overlay address (inside the overlay, never on the
    # underlay).
    probe_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8286, alias="ProbePort")
    probe_interval: Annotated[float, Field(ge=0.05, le=10.0)] = Field(
        default=0.2, alias="ProbeInterval")
    # Consecutive unanswered probes that abandon a plane, and consecutive answers that take
    # it back: fall fast, return only once the path is steady.
    probe_misses: Annotated[int, Field(ge=1, le=100)] = Field(default=3, alias="ProbeMisses")
    probe_answers: Annotated[int, Field(ge=1, le=1000)] = Field(default=5, alias="ProbeAnswers")
    offloads: bool = Field(default=True, alias="Offloads")


def auto_overhead(ip_version: int) -> int:
    """The largest overhead among the planes auto may use: one MTU for every container."""
    return max(vxlan_overhead(ip_version), udp_overhead(ip_version))


def auto_data_problem(data: Mapping[str, Any]) -> str | None:
    """Why a peer's auto BackendData cannot be used, or None: every plane it advertises
    must be well formed (a bad entry is that peer's error) and it must advertise one."""
    planes = [key for key in DATA_KEYS.values() if key in data]
    if not planes:
        known = ", ".join(sorted(DATA_KEYS.values()))
        return f"BackendData advertises no data plane (expected one of {known})"
    for key, check in (("vxlan", vxlan_data_problem), ("udp", udp_data_problem)):
        if key not in data:
            continue
        entry = data[key]
        if not isinstance(entry, Mapping):
            return f"BackendData {key} {entry!r} is not an object"
        problem = check(entry)
        if problem is not None:
            return f"BackendData {key}: {problem}"
    if not isinstance(data.get("hostgw", {}), Mapping):
        return f"BackendData hostgw {data['hostgw']!r} is not an object"
    return None


def auto_facts(options: AutoOptions, underlay: str) -> BackendFacts:
    """Every plane a peer may be on: the VXLAN and TUN devices and the bare underlay, and
    a peer's packets may arrive on any of them. The ingress filter guards the VXLAN port
    by member address; the udp plane's forwarder checks its members by itself."""
    vxlan = f"{VXLAN_DEVICE_PREFIX}{options.vni}"
    return BackendFacts(by_ip_version(auto_overhead), encap_port=options.vxlan_port,
                        tunnels=(vxlan, UDP_DEVICE), bare_underlay=underlay,
                        peer_iifs=(vxlan, UDP_DEVICE, underlay),
                        tables=frozenset(AUTO_TABLES.values()))


AUTO_BACKEND = BackendSpec(AutoOptions, "weft.backends.auto.apply:AutoBackend", auto_facts,
                           auto_overhead, auto_data_problem, no_dual_stack=None)
