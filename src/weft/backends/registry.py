"""Backends by `Type`: a plain dict, explicit wiring, no import side effects.

Adding a backend is one entry here: its options model (validated from `Backend` in the
config), its factory and its per-packet overhead. Factories are named, not imported: the
udp and wireguard backends pull in threads, crypto and more, and a host imports only the
one it runs. Pure: importing this module imports only the options models.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from weft.backends.auto.options import AutoOptions, auto_data_problem, auto_overhead
from weft.backends.hostgw.options import HostGwOptions, hostgw_data_problem, hostgw_overhead
from weft.backends.udp.options import UdpOptions, udp_data_problem, udp_overhead
from weft.backends.vxlan.options import VxlanOptions, vxlan_data_problem, vxlan_overhead
from weft.backends.wireguard.options import (
    WireguardOptions,
    wireguard_data_problem,
    wireguard_overhead,
)
from weft.core import config as core_config
from weft.core.config import BackendOptions, BackendTypes, NetworkConfig
from weft.core.host import HostContext

if TYPE_CHECKING:
    from weft.backends.base import Backend


@dataclass(frozen=True)
class BackendSpec:
    options: type[BackendOptions]
    factory: str  # "module:Class", a class taking (NetworkConfig, HostContext)
    overhead: Callable[[int], int]  # bytes added to every packet, by outer IP version
    data_problem: Callable[[Mapping[str, Any]], str | None]  # a peer's BackendData, checked
    encrypted: bool = False


BACKENDS: dict[str, BackendSpec] = {
    "vxlan": BackendSpec(VxlanOptions, "weft.backends.vxlan.apply:VxlanBackend",
                         vxlan_overhead, vxlan_data_problem),
    "host-gw": BackendSpec(HostGwOptions, "weft.backends.hostgw.apply:HostGwBackend",
                           hostgw_overhead, hostgw_data_problem),
    "udp": BackendSpec(UdpOptions, "weft.backends.udp.apply:UdpBackend", udp_overhead,
                       udp_data_problem),
    "auto": BackendSpec(AutoOptions, "weft.backends.auto.apply:AutoBackend", auto_overhead,
                        auto_data_problem),
    "wireguard": BackendSpec(WireguardOptions, "weft.backends.wireguard.apply:WireguardBackend",
                             wireguard_overhead, wireguard_data_problem, encrypted=True),
}


# The backend of a config whose `Backend` names no `Type` (flannel's default too).
DEFAULT_TYPE = "vxlan"
TYPES = BackendTypes({name: spec.options for name, spec in BACKENDS.items()}, DEFAULT_TYPE)


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate the JSON network config, `Backend` by its `Type`'s own options
    model, or raise ConfigError naming the field and the value."""
    return core_config.parse_config(text, TYPES)


def create_backend(config: NetworkConfig, host: HostContext) -> Backend:
    module, _, name = BACKENDS[config.backend.type].factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return cast("Backend", factory(config, host))


def overhead(backend_type: str, ip_version: int = 4) -> int:
    """Bytes an encapsulation adds to every packet on the underlay."""
    try:
        return BACKENDS[backend_type].overhead(ip_version)
    except KeyError:
        raise ValueError(f"no backend {backend_type!r}") from None


def overlay_mtu(options: BackendOptions, underlay_mtu: int, ip_version: int) -> int:
    """The MTU of the overlay: `Backend.MTU` if set, else what the underlay leaves."""
    return options.mtu or underlay_mtu - overhead(options.type, ip_version)


def backend_data_problem(backend_type: str, data: Mapping[str, Any]) -> str | None:
    """Why a lease's BackendData cannot be used by its own backend, or None."""
    spec = BACKENDS.get(backend_type)
    if spec is None:
        return f"unknown BackendType {backend_type!r}"
    return spec.data_problem(data)
