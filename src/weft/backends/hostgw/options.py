"""`Backend` options of the host-gw backend: plain routes add no bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.core.config import BackendOptions


class HostGwOptions(BackendOptions):
    type: Literal["host-gw"] = Field(default="host-gw", alias="Type")


def hostgw_overhead(ip_version: int) -> int:
    return 0


def hostgw_data_problem(data: Mapping[str, Any]) -> str | None:
    return None  # host-gw publishes nothing but the PublicIP


def hostgw_facts(options: HostGwOptions, underlay: str) -> BackendFacts:
    """No device of its own: overlay packets cross the underlay as they are."""
    return BackendFacts(by_ip_version(hostgw_overhead), bare_underlay=underlay,
                        arrival=underlay)


HOSTGW_BACKEND = BackendSpec(HostGwOptions, "weft.backends.hostgw.apply:HostGwBackend",
                             hostgw_facts, hostgw_overhead, hostgw_data_problem,
                             no_dual_stack=None, ipv6_next_hops=True)
